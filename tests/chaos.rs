//! The chaos harness, short mode (CI): a continuous seeded stream into a 6-partition topic
//! (typed Avro with an interleaved schema change and ~0.5 % poison records), three lakesink
//! processes in one consumer group, and during the run: SIGKILLs and restarts, stop/start
//! rebalances, a SIGSTOP zombie that loses its partitions and comes back, and a fault proxy in
//! front of the object store and the registry (503s, resets, cut connections, slow answers, a
//! total outage). At the end the table is reconciled with pyarrow/DuckDB: every good record
//! exactly once; every poison record in the dead-letter topic.
//!
//! `LAKESINK_CHAOS_SECONDS` (default 45) and `LAKESINK_CHAOS_SEED` (default 1) choose the
//! length and the schedule; a run is reproducible from its seed up to process timing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use common::fault_proxy::FaultProxy;
use common::*;
use lakesink::workload::{order_schema, Order, ORDER_SCHEMA};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use schema_registry::wire;

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn addr_of(url: &str) -> SocketAddr {
    let u = url::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
        .parse()
        .unwrap()
}

#[derive(Default, Debug)]
struct Figures {
    kills: u32,
    rebalances: u32,
    zombies: u32,
    outages: u32,
}

async fn chaos(store: Store, store_proxy_endpoint: impl Fn(&FaultProxy) -> String) {
    let seconds = env_u64("LAKESINK_CHAOS_SECONDS", 45);
    let seed = env_u64("LAKESINK_CHAOS_SEED", 1);
    let mut rng = StdRng::seed_from_u64(seed);
    let topic = unique("chaos");
    let dlq = unique("chaos-dlq");
    create_topic(&topic, 6).await;
    create_topic(&dlq, 1).await;
    let (registry_url, client) = registry().await;
    let v1 = register_orders(&client, &topic).await;
    let mut v2_json: serde_json::Value = serde_json::from_str(ORDER_SCHEMA).unwrap();
    v2_json["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
            {"name": "coupon", "type": ["null", "string"], "default": null}
        ));
    let v2 = client
        .register(&format!("{topic}-value"), &v2_json.to_string())
        .await
        .unwrap();

    let store_up = addr_of(store.endpoint.as_deref().unwrap());
    let store_proxy = FaultProxy::start(store_up, 40, seed).await;
    let registry_proxy = FaultProxy::start(addr_of(&registry_url), 40, seed + 1).await;
    let mut sink_store = store.clone();
    sink_store
        .options
        .insert("endpoint".into(), store_proxy_endpoint(&store_proxy));

    // The producer: continuous, seeded, ~0.5 % poison, v2 interleaved from the second third.
    let produced: Arc<Mutex<Produced>> = Arc::default();
    let poison: Arc<Mutex<BTreeSet<(i32, i64)>>> = Arc::default();
    let stop_producing = Arc::new(AtomicBool::new(false));
    let producer_task = {
        let (produced, poison, stop) = (produced.clone(), poison.clone(), stop_producing.clone());
        let topic = topic.clone();
        let mut prng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let total_ms = seconds * 1000;
        tokio::spawn(async move {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", kafka())
                .set("linger.ms", "5")
                .create()
                .unwrap();
            let (s1, s2) = (
                order_schema(),
                apache_avro::Schema::parse_str(&v2_json.to_string()).unwrap(),
            );
            let started = Instant::now();
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let mut batch = Vec::new();
                for _ in 0..20 {
                    let p = prng.random_range(0..6);
                    let is_poison = prng.random_range(0..1000) < 5;
                    let late = started.elapsed().as_millis() as u64 > total_ms / 3;
                    let payload = if is_poison {
                        b"\x00\x00\x00\x00\x01garbage".to_vec()
                    } else if late && prng.random_range(0..3) == 0 {
                        let Value::Record(mut f) = Order::generate(i).to_avro_value() else {
                            unreachable!()
                        };
                        f.push((
                            "coupon".into(),
                            Value::Union(1, Box::new(Value::String(format!("C{i}")))),
                        ));
                        wire::frame(
                            v2,
                            &apache_avro::to_avro_datum(&s2, Value::Record(f)).unwrap(),
                        )
                    } else {
                        wire::frame(v1, &Order::generate(i).encode(&s1))
                    };
                    let producer = producer.clone();
                    let topic = topic.clone();
                    batch.push(async move {
                        let d = producer
                            .send(
                                FutureRecord::<(), _>::to(&topic)
                                    .partition(p)
                                    .payload(&payload),
                                Duration::from_secs(30),
                            )
                            .await
                            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
                        (d.partition, d.offset, is_poison, i)
                    });
                    i += 1;
                }
                for (p, o, is_poison, id) in futures::future::join_all(batch).await {
                    if is_poison {
                        poison.lock().unwrap().insert((p, o));
                    } else {
                        produced.lock().unwrap().insert((p, o), id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    let group = unique("chaos-g");
    let cfg = config(
        &topic,
        &group,
        &registry_proxy.url(),
        &sink_store,
        &format!("dead_letter_topic = \"{dlq}\""),
    )
    .replace("drain_timeout = \"20s\"", "drain_timeout = \"10s\"")
    // tansu waits for every member to rejoin for the whole rebalance timeout
    // (max.poll.interval.ms) instead of dropping SIGKILLed members after the session
    // timeout as Kafka does; keep that wait short.
    .replace(
        "\"heartbeat.interval.ms\" = \"500\"",
        "\"heartbeat.interval.ms\" = \"500\", \"max.poll.interval.ms\" = \"30000\"",
    )
    .replace(
        "max_rows = 400, max_latency = \"1s\"",
        "max_rows = 500, max_latency = \"2s\"",
    );
    let mut procs: Vec<Lakesink> = (0..3).map(|_| Lakesink::start(&cfg, &[])).collect();
    let mut logs = Vec::new();

    // The schedule: at least 10 kills, 3 rebalances, 1 zombie and 1 outage in a short run.
    let mut plan = vec!["kill"; 10];
    plan.extend(["rebalance"; 3]);
    plan.push("zombie");
    plan.push("outage");
    let extra = (seconds / 4).saturating_sub(plan.len() as u64);
    for _ in 0..extra {
        plan.push(["kill", "rebalance", "kill"][rng.random_range(0..3)]);
    }
    for k in (1..plan.len()).rev() {
        let j = rng.random_range(0..=k);
        plan.swap(k, j);
    }
    let step = Duration::from_millis(seconds * 1000 / plan.len() as u64);
    let mut figures = Figures::default();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for action in &plan {
        let victim = rng.random_range(0..procs.len());
        match *action {
            "kill" => {
                let p = procs.remove(victim);
                logs.push(p.log());
                p.kill9();
                procs.insert(victim, Lakesink::start(&cfg, &[]));
                figures.kills += 1;
            }
            "rebalance" => {
                let p = procs.remove(victim);
                logs.push(p.stop());
                tokio::time::sleep(Duration::from_millis(500)).await;
                procs.insert(victim, Lakesink::start(&cfg, &[]));
                figures.rebalances += 1;
            }
            "zombie" => {
                // Longer than the session timeout: the group moves its partitions away, then it
                // wakes up believing it still owns them.
                procs[victim].signal("STOP");
                tokio::time::sleep(Duration::from_secs(9)).await;
                procs[victim].signal("CONT");
                figures.zombies += 1;
            }
            _ => {
                store_proxy.outage(Duration::from_secs(4));
                registry_proxy.outage(Duration::from_secs(4));
                figures.outages += 1;
            }
        }
        tokio::time::sleep(step).await;
    }
    stop_producing.store(true, Ordering::Relaxed);
    producer_task.await.unwrap();
    // Faults stay on while the group catches up.
    let produced = produced.lock().unwrap().clone();
    let poison = poison.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let rows = committed_rows(&store, &topic).await;
        if rows >= produced.len() as u64 {
            break;
        }
        for (i, p) in procs.iter_mut().enumerate() {
            if let Some(s) = p.child.try_wait().unwrap() {
                panic!("process {i} exited ({s}) during catch-up:\n{}", p.log());
            }
        }
        if Instant::now() >= deadline {
            let tails: Vec<String> = procs
                .iter()
                .map(|p| {
                    let log = p.log();
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(40)..].join("\n")
                })
                .collect();
            panic!(
                "only {rows}/{} rows after catch-up time; process log tails:\n{}",
                produced.len(),
                tails.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for p in procs {
        logs.push(p.stop());
    }
    let table = store.read();
    assert_exactly_once(&table, &produced);

    // Dead letters: every poison record, deduplicated on its source position.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut dead: BTreeMap<(i32, i64), u32> = BTreeMap::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let h = m.headers().unwrap();
            let get = |k: &str| -> i64 {
                let v = h.iter().find(|x| x.key == k).and_then(|x| x.value).unwrap();
                String::from_utf8_lossy(v).parse().unwrap()
            };
            *dead
                .entry((
                    get("lakesink.source.partition") as i32,
                    get("lakesink.source.offset"),
                ))
                .or_default() += 1;
        } else if poison.iter().all(|k| dead.contains_key(k)) {
            break;
        }
    }
    let missing: Vec<_> = poison.iter().filter(|k| !dead.contains_key(k)).collect();
    assert!(
        missing.is_empty(),
        "poison records never dead-lettered: {missing:?}"
    );
    let extra: Vec<_> = dead.keys().filter(|k| !poison.contains(k)).collect();
    assert!(extra.is_empty(), "good records dead-lettered: {extra:?}");
    let redelivered: u32 = dead.values().map(|n| n - 1).sum();
    let all_logs = logs.join("\n");
    for secret in ["test", common::AZURITE_KEY] {
        if secret.len() > 8 {
            assert!(!all_logs.contains(secret), "a secret leaked into the logs");
        }
    }
    println!(
        "chaos summary: store={} seed={seed} seconds={seconds} kills={} rebalances={} zombies={} outages={} \
         faults_injected={} records_reconciled={} lost=0 duplicated=0 dlq_matched={}/{} dlq_redelivered={redelivered}",
        store.url.split("://").next().unwrap(),
        figures.kills,
        figures.rebalances,
        figures.zombies,
        figures.outages,
        store_proxy.injected() + registry_proxy.injected(),
        produced.len(),
        poison.len(),
        poison.len(),
    );
    assert!(figures.kills >= 10 && figures.rebalances >= 3 && figures.zombies >= 1);
    assert!(store_proxy.injected() > 0, "no fault was injected");
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_parquet_on_moto() {
    chaos(Store::s3("orders"), |p| p.url()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_parquet_on_azurite() {
    chaos(Store::azure("orders"), |p| {
        format!("{}/devstoreaccount1", p.url())
    })
    .await;
}
