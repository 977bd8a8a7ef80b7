//! The chaos harness: exactly-once under process, group and storage faults, for every sink.
//!
//! A continuous seeded stream goes to two 6-partition topics: `orders` (typed Avro with a v2
//! schema interleaved from the first third, ~0.5 % poison) and, for the sinks that upsert
//! (Delta, Databend), `customers` (Debezium JSON creates, updates, deletes with tombstones,
//! ~0.5 % poison). Three lakesink processes share one consumer group. During the run the
//! schedule SIGKILLs and restarts members, stops and starts members (rebalances), SIGSTOPs one
//! past its session timeout so it wakes up as a zombie, and a loopback fault proxy in front of
//! the destination (object store or Databend) and the registry injects 500s and 503s, resets,
//! connections cut mid-exchange (the server acted, the answer is lost), slow answers and a
//! window of total outage. Faults stay on while the group catches up.
//!
//! Reconciliation reads the destination with independent readers (pyarrow and DuckDB, python
//! deltalake, the Databend engine): every good order exactly once with exact values (v2 rows
//! carry their coupon), the customers table equal to the source's final state, every poison
//! record in the dead-letter topic, and no configured secret in any process log. One summary
//! line gives the figures.
//!
//! Short mode (CI): 45 s per target. Long mode by hand: `scripts/chaos.sh --minutes N --seed S`
//! (or `LAKESINK_CHAOS_SECONDS` / `LAKESINK_CHAOS_SEED`); the schedule and the stream are
//! reproducible from the seed up to process timing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::databend::{assert_orders_exactly_once, databend_url, ledger, rows};
use common::fault_proxy::FaultProxy;
use common::*;
use lakesink::app::workload::{order_schema, Order};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use schema_registry::{wire, SchemaId};
use serde_json::Value;
use sinks::Sink;

const PARTITIONS: i32 = 6;
/// Customer keys the change stream draws from; sentinels use keys above it.
const KEYS: i64 = 240;

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Where the run lands.
enum Target {
    /// The orders table, and optionally a Delta table of the same topic (a second sink reading
    /// it: a fence or a resync in one must never cost the other a record).
    Parquet(Store, Option<Store>),
    /// The orders table and the customers (upsert) table, and `[sink.delta]` settings of both.
    Delta(Store, Store, &'static str),
    /// A database on the Databend test server.
    Databend(String),
}

impl Target {
    fn label(&self) -> String {
        match self {
            Target::Parquet(s, copy) => format!(
                "parquet/{}{}",
                s.url.split("://").next().unwrap(),
                if copy.is_some() { "+delta-sink" } else { "" }
            ),
            Target::Delta(s, _, _) => format!("delta/{}", s.url.split("://").next().unwrap()),
            Target::Databend(_) => "databend".into(),
        }
    }

    fn upserts(&self) -> bool {
        !matches!(self, Target::Parquet(..))
    }

    /// The service the destination fault proxy fronts.
    fn upstream(&self) -> SocketAddr {
        match self {
            Target::Parquet(s, _) | Target::Delta(s, _, _) => {
                addr_of(s.endpoint.as_deref().unwrap())
            }
            Target::Databend(_) => addr_of(&databend_url()),
        }
    }

    /// The `[[sink]]` sections, with the destination behind `proxy`.
    fn sinks(&self, run: &Run, proxy: &FaultProxy) -> String {
        let through = |store: &Store| {
            let mut s = store.clone();
            if s.url.starts_with("gs://") {
                // object_store takes a GCS emulator's base URL from the service-account file.
                let account = scratch("gcs").join("account.json");
                std::fs::write(
                    &account,
                    serde_json::json!({"gcs_base_url": proxy.url(), "disable_oauth": true,
                        "client_email": "", "private_key": "", "private_key_id": ""})
                    .to_string(),
                )
                .unwrap();
                s.options
                    .insert("service_account_path".into(), account.display().to_string());
                return s;
            }
            let endpoint = if s.url.starts_with("az://") {
                format!("{}/devstoreaccount1", proxy.url())
            } else {
                proxy.url()
            };
            s.options.insert("endpoint".into(), endpoint);
            if s.url.starts_with("az://") {
                // Azurite keeps connections alive (moto closes them), and the proxy injects per
                // connection: without a pool, Azure requests meet faults as often as S3's.
                s.options
                    .insert("pool_max_idle_per_host".into(), "0".into());
            }
            s
        };
        // The Databend test engine runs one transaction at a time (~0.3-0.5 s each): fewer,
        // larger loads keep it ahead of the stream (12 partitions flushing every 2 s would not).
        let latency = if matches!(self, Target::Databend(_)) {
            "10s"
        } else {
            "2s"
        };
        let common = |name: &str, topic: &str, max_rows: u32| {
            format!(
                "\n[[sink]]\nname = \"{name}\"\ntopics = [\"{topic}\"]\n\
                 flush = {{ max_rows = {max_rows}, max_latency = \"{latency}\" }}\n\
                 dead_letter_topic = \"{dlq}\"\n",
                dlq = run.dlq
            )
        };
        let upsert = "mode = \"upsert\"\nkey = [\"id\"]\nformat = \"debezium-json\"\n\
                      schema = { id = \"long\", name = \"string\" }\n";
        match self {
            Target::Parquet(orders, copy) => {
                let s = through(orders);
                let mut out = common("orders", &run.orders, 500)
                    + &format!(
                        "table = \"{}\"\nstorage = {}\npartition_by = [\"day(ts)\"]\n\
                         parquet = {{ auto_compact = true, compact_min_files = 4, \
                         compact_min_age = \"2s\" }}\n",
                        s.url,
                        s.toml_options()
                    );
                if let Some(copy) = copy {
                    // A Delta table of the same topic, with other flush boundaries than the
                    // first sink's; poison is skipped here (the first sink dead-letters it).
                    let c = through(copy);
                    out += &format!(
                        "\n[[sink]]\nname = \"orders_copy\"\ntopics = [\"{}\"]\n\
                         flush = {{ max_rows = 300, max_latency = \"{latency}\" }}\n\
                         errors = \"skip\"\nkind = \"delta\"\ntable = \"{}\"\nstorage = {}\n\
                         partition_by = [\"day(ts)\"]\n",
                        run.orders,
                        c.url,
                        c.toml_options()
                    );
                }
                out
            }
            Target::Delta(orders, customers, delta) => {
                let (o, c) = (through(orders), through(customers));
                common("orders", &run.orders, 500)
                    + &format!(
                        "kind = \"delta\"\ntable = \"{}\"\nstorage = {}\npartition_by = [\"day(ts)\"]\n{delta}\n",
                        o.url,
                        o.toml_options()
                    )
                    + &common("customers", run.customers.as_ref().unwrap(), 200)
                    + &format!(
                        "kind = \"delta\"\ntable = \"{}\"\nstorage = {}\n{upsert}{delta}\n",
                        c.url,
                        c.toml_options()
                    )
            }
            Target::Databend(database) => {
                let mut url = url::Url::parse(&databend_url()).unwrap();
                url.set_port(Some(proxy.addr.port())).unwrap();
                let base = format!("{}/{database}", url.as_str().trim_end_matches('/'));
                let section = |table: &str| {
                    format!("kind = \"databend\"\ndatabend = {{ url = \"{base}\" }}\ntable = \"{table}\"\n")
                };
                common("orders", &run.orders, 5000)
                    + &section("orders")
                    + &common("customers", run.customers.as_ref().unwrap(), 2000)
                    + &section("customers")
                    + upsert
            }
        }
    }

    /// Committed next offsets of `topic`'s partitions for sink `sink`, read from the
    /// destination directly (not through the proxy).
    async fn positions(&self, group: &str, sink: &str, topic: &str) -> BTreeMap<i32, i64> {
        let mut out = BTreeMap::new();
        match self {
            Target::Databend(database) => return ledger(database, sink, topic).await,
            Target::Parquet(_, Some(copy)) if sink == "orders_copy" => {
                let reader = copy.delta_sink(group);
                for p in 0..PARTITIONS {
                    let tp = sinks::TopicPartition::new(topic, p);
                    if let Ok(Some(o)) = reader.committed(&tp).await {
                        out.insert(p, o.0);
                    }
                }
            }
            Target::Parquet(store, _) => {
                let reader = sinks::parquet::ParquetSink::new(
                    store.table_store(),
                    sinks::parquet::ParquetSinkConfig::default(),
                );
                for p in 0..PARTITIONS {
                    let tp = sinks::TopicPartition::new(topic, p);
                    if let Ok(Some(o)) = reader.committed(&tp).await {
                        out.insert(p, o.0);
                    }
                }
            }
            Target::Delta(orders, customers, _) => {
                let store = if sink == "orders" { orders } else { customers };
                let reader = store.delta_sink(group);
                for p in 0..PARTITIONS {
                    let tp = sinks::TopicPartition::new(topic, p);
                    if let Ok(Some(o)) = reader.committed(&tp).await {
                        out.insert(p, o.0);
                    }
                }
            }
        }
        out
    }

    /// Orders as read back: (partition, offset) -> (order id, coupon), after checking every
    /// produced order's values exactly once.
    async fn reconcile_orders(
        &self,
        sent: &Sent,
        topic: &str,
        logs: &str,
    ) -> BTreeMap<(i32, i64), Value> {
        let coupons: Vec<(i32, i64, Option<String>)> = match self {
            Target::Parquet(store, _) | Target::Delta(store, _, _) => {
                let table = match self {
                    Target::Parquet(..) => store.read(),
                    _ => store.read_delta(&[]),
                };
                if let Target::Parquet(_, copy) = self {
                    let evidence = duplicate_evidence(store, topic, &table, logs).await;
                    assert!(evidence.is_empty(), "duplicated rows:\n{evidence}");
                    // The background compaction ran through the kills and outages too.
                    let files: Vec<&str> = table["files"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(|f| f.as_str())
                        .filter(|f| f.ends_with(".parquet"))
                        .collect();
                    let merged = files.iter().filter(|f| f.contains("compacted-")).count();
                    eprintln!(
                        "parquet files at the end: {} ({merged} merged by compaction)",
                        files.len()
                    );
                    assert!(merged > 0, "no compaction committed: {files:?}");
                    if let Some(copy) = copy {
                        // The Delta table of the same topic: every order once (python deltalake).
                        assert_exactly_once(&copy.read_delta(&[]), &sent.orders);
                    }
                }
                assert_exactly_once(&table, &sent.orders);
                table["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        (
                            r["p"].as_i64().unwrap() as i32,
                            r["o"].as_i64().unwrap(),
                            r["coupon"].as_str().map(str::to_string),
                        )
                    })
                    .collect()
            }
            Target::Databend(database) => {
                assert_orders_exactly_once(database, "orders", &sent.orders).await;
                rows(
                    database,
                    &format!(
                        "SELECT _kafka_partition, _kafka_offset, coupon FROM \"{database}\".orders"
                    ),
                )
                .await
                .into_iter()
                .map(|r| {
                    (
                        r[0].as_deref().unwrap().parse().unwrap(),
                        r[1].as_deref().unwrap().parse().unwrap(),
                        r[2].clone(),
                    )
                })
                .collect()
            }
        };
        let mut out = BTreeMap::new();
        for (p, o, coupon) in coupons {
            let id = sent.orders[&(p, o)];
            let want = sent.v2.contains(&id).then(|| format!("C{id}"));
            assert_eq!(coupon, want, "coupon of order {id} at {p}/{o}");
            out.insert((p, o), Value::from(id));
        }
        out
    }

    /// The customers table as read back: id -> name.
    async fn customers(&self) -> BTreeMap<i64, String> {
        match self {
            Target::Parquet(..) => BTreeMap::new(),
            Target::Delta(_, store, _) => {
                let table = store.read_delta(&[]);
                table["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        assert_eq!(r["_deleted"], Value::Bool(false), "deleted row kept: {r}");
                        (
                            r["id"].as_i64().unwrap(),
                            r["name"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            }
            Target::Databend(database) => {
                let got = rows(
                    database,
                    &format!("SELECT id, name FROM \"{database}\".customers"),
                )
                .await;
                let n = got.len();
                let map: BTreeMap<i64, String> = got
                    .into_iter()
                    .map(|r| {
                        (
                            r[0].as_deref().unwrap().parse().unwrap(),
                            r[1].clone().unwrap(),
                        )
                    })
                    .collect();
                assert_eq!(map.len(), n, "one row per key");
                map
            }
        }
    }
}

/// For each duplicated (partition, offset) of a Parquet table (at most 3): the commit markers
/// whose range covers it and every log line about that partition's fencing, so a rare failure
/// of a long run can be explained after the in-memory store is gone.
async fn duplicate_evidence(store: &Store, topic: &str, table: &Value, logs: &str) -> String {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let mut seen = BTreeSet::new();
    let mut dups = Vec::new();
    for r in table["rows"].as_array().into_iter().flatten() {
        let key = (r["p"].as_i64().unwrap_or(-1), r["o"].as_i64().unwrap_or(-1));
        if !seen.insert(key) && dups.len() < 3 && !dups.contains(&key) {
            dups.push(key);
        }
    }
    let mut out = String::new();
    let t = store.table_store();
    for (p, o) in dups {
        out.push_str(&format!("== partition {p} offset {o}\n"));
        let prefix = t.path(["_lakesink", "commits", topic, &p.to_string()]);
        let metas: Vec<_> = t
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .unwrap_or_default();
        for m in metas {
            let Ok(got) = t.store.get(&m.location).await else {
                continue;
            };
            let Ok(bytes) = got.bytes().await else {
                continue;
            };
            let marker: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let (start, next) = (marker["start"].as_i64(), marker["next"].as_i64());
            if start.is_some_and(|s| s <= o) && next.is_some_and(|n| o < n) {
                out.push_str(&format!(
                    "marker {}: writer {} start {} next {} committed_at_ms {} files {}\n",
                    m.location,
                    marker["writer"],
                    marker["start"],
                    marker["next"],
                    marker["committed_at_ms"],
                    marker["files"]
                ));
            }
        }
        let tp = format!("{topic}/{p}");
        for line in logs.lines().filter(|l| {
            l.contains(&tp)
                && (l.contains("fenced")
                    || l.contains("another writer")
                    || l.contains("interrupted"))
        }) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Names of one run.
struct Run {
    orders: String,
    customers: Option<String>,
    dlq: String,
    group: String,
}

/// What the producer had acknowledged.
#[derive(Default, Clone)]
struct Sent {
    orders: Produced,
    /// Order ids sent with the v2 schema (they carry a coupon).
    v2: BTreeSet<i64>,
    /// Customer changes: (partition, offset) -> (key, Some(name) or None for a delete).
    changes: BTreeMap<(i32, i64), (i64, Option<String>)>,
    poison: BTreeSet<(String, i32, i64)>,
    /// Next offset after the last record of each (topic, partition).
    ends: BTreeMap<(String, i32), i64>,
}

impl Sent {
    fn end(&mut self, topic: &str, p: i32, o: i64) {
        let e = self.ends.entry((topic.to_string(), p)).or_default();
        *e = (*e).max(o + 1);
    }

    /// The source's final state: changes replayed in offset order per partition (a key always
    /// lands on the same partition).
    fn final_state(&self) -> BTreeMap<i64, String> {
        let mut state = BTreeMap::new();
        for (key, name) in self.changes.values() {
            match name {
                Some(n) => state.insert(*key, n.clone()),
                None => state.remove(key),
            };
        }
        state
    }
}

/// One record to send.
struct Out {
    topic: String,
    partition: i32,
    key: Option<String>,
    payload: Option<Vec<u8>>,
    what: What,
}

enum What {
    Order(i64, bool),
    Change(i64, Option<String>),
    Tombstone,
    Poison,
}

/// The seeded stream: orders (v1, v2 from the first third, poison) and customer changes.
struct Stream {
    rng: StdRng,
    run_orders: String,
    run_customers: Option<String>,
    v1: SchemaId,
    v2: SchemaId,
    s1: apache_avro::Schema,
    s2: apache_avro::Schema,
    next_order: i64,
    next_change: i64,
    /// Live keys and the position of their last image.
    alive: BTreeMap<i64, i64>,
}

impl Stream {
    fn order(&mut self, partition: i32, late: bool, poison_ok: bool) -> Out {
        let id = self.next_order;
        self.next_order += 1;
        let (payload, what) = if poison_ok && self.rng.random_range(0..1000) < 5 {
            (b"\x00\x00\x00\x00\x01garbage".to_vec(), What::Poison)
        } else if late && self.rng.random_range(0..3) == 0 {
            (frame_order_v2(self.v2, &self.s2, id), What::Order(id, true))
        } else {
            (
                wire::frame(self.v1, &Order::generate(id).encode(&self.s1)),
                What::Order(id, false),
            )
        };
        Out {
            topic: self.run_orders.clone(),
            partition,
            key: None,
            payload: Some(payload),
            what,
        }
    }

    /// One customer change (and a tombstone after a delete) for `key`.
    fn change(&mut self, key: i64, poison_ok: bool) -> Vec<Out> {
        let topic = self.run_customers.clone().unwrap();
        let pos = self.next_change;
        self.next_change += 1;
        let partition = (key % PARTITIONS as i64) as i32;
        let image = |v: i64| serde_json::json!({"id": key, "name": format!("customer {key} v{v}")});
        let rec = |payload: Option<Vec<u8>>, what| Out {
            topic: topic.clone(),
            partition,
            key: Some(key.to_string()),
            payload,
            what,
        };
        if poison_ok && self.rng.random_range(0..1000) < 5 {
            return vec![rec(
                Some(br#"{"before": null, "after": {"id": "#.to_vec()),
                What::Poison,
            )];
        }
        let name = format!("customer {key} v{pos}");
        let Some(&last) = self.alive.get(&key) else {
            self.alive.insert(key, pos);
            let json = debezium_json("c", Value::Null, image(pos), pos);
            return vec![rec(Some(json.into_bytes()), What::Change(key, Some(name)))];
        };
        if self.rng.random_range(0..10) < 7 {
            self.alive.insert(key, pos);
            let json = debezium_json("u", image(last), image(pos), pos);
            vec![rec(Some(json.into_bytes()), What::Change(key, Some(name)))]
        } else {
            self.alive.remove(&key);
            let json = debezium_json("d", image(last), Value::Null, pos);
            vec![
                rec(Some(json.into_bytes()), What::Change(key, None)),
                rec(None, What::Tombstone),
            ]
        }
    }
}

async fn send_all(producer: &FutureProducer, batch: Vec<Out>, sent: &Mutex<Sent>) {
    let sends = batch.into_iter().map(|out| async move {
        let mut rec = FutureRecord::<String, Vec<u8>>::to(&out.topic).partition(out.partition);
        if let Some(k) = &out.key {
            rec = rec.key(k);
        }
        if let Some(p) = &out.payload {
            rec = rec.payload(p);
        }
        let d = producer
            .send(rec, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {}: {e}", out.topic));
        (out.topic, d.partition, d.offset, out.what)
    });
    for (topic, p, o, what) in futures::future::join_all(sends).await {
        let mut s = sent.lock().unwrap();
        s.end(&topic, p, o);
        match what {
            What::Order(id, v2) => {
                s.orders.insert((p, o), id);
                if v2 {
                    s.v2.insert(id);
                }
            }
            What::Change(key, name) => {
                s.changes.insert((p, o), (key, name));
            }
            What::Tombstone => {}
            What::Poison => {
                s.poison.insert((topic, p, o));
            }
        }
    }
}

#[derive(Default, Debug)]
struct Figures {
    kills: u32,
    rebalances: u32,
    zombies: u32,
    outages: u32,
    broker_restarts: u32,
}

/// `drain_timeout`: how long a revoked member may take to flush and commit; shorter than a
/// flush under load, the flush task outlives its worker and races the partition's next owner.
async fn chaos(target: Target, protocol: &str, drain_timeout: &str) {
    let seconds = env_u64(
        "LAKESINK_CHAOS_SECONDS",
        env_u64("LAKESINK_CHAOS_MINUTES", 0) * 60,
    );
    let seconds = if seconds == 0 { 45 } else { seconds };
    let seed = env_u64("LAKESINK_CHAOS_SEED", 1);
    let mut rng = StdRng::seed_from_u64(seed);
    let run = Run {
        orders: unique("chaos"),
        customers: target
            .upserts()
            .then(|| unique("chaos.inventory.customers")),
        dlq: unique("chaos-dlq"),
        group: unique("chaos-g"),
    };
    create_topic(&run.orders, PARTITIONS).await;
    if let Some(c) = &run.customers {
        create_topic(c, PARTITIONS).await;
    }
    create_topic(&run.dlq, 1).await;
    let (registry_url, client) = registry().await;
    let v1 = register_orders(&client, &run.orders).await;
    let v2_text = order_v2_schema();
    let v2 = client
        .register(&format!("{}-value", run.orders), &v2_text)
        .await
        .unwrap();

    let dest_proxy = FaultProxy::start(target.upstream(), 40, seed).await;
    let registry_proxy = FaultProxy::start(addr_of(&registry_url), 40, seed + 1).await;

    // The producer: continuous and seeded; the v2 schema interleaved from the first third.
    let sent: Arc<Mutex<Sent>> = Arc::default();
    let stop_producing = Arc::new(AtomicBool::new(false));
    let mut stream = Stream {
        rng: StdRng::seed_from_u64(seed ^ 0x5eed),
        run_orders: run.orders.clone(),
        run_customers: run.customers.clone(),
        v1,
        v2,
        s1: order_schema(),
        s2: apache_avro::Schema::parse_str(&v2_text).unwrap(),
        next_order: 0,
        next_change: 0,
        alive: BTreeMap::new(),
    };
    // Idempotent, so a broker crash never duplicates a record the harness counted once;
    // zstd-compressed batches, as producers in the field send them.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("compression.type", "zstd")
        .create()
        .unwrap();
    let producer_task = {
        let (sent, stop, producer) = (sent.clone(), stop_producing.clone(), producer.clone());
        let total_ms = seconds * 1000;
        tokio::spawn(async move {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let late = started.elapsed().as_millis() as u64 > total_ms / 3;
                let mut batch = Vec::new();
                for _ in 0..20 {
                    let p = stream.rng.random_range(0..PARTITIONS);
                    batch.push(stream.order(p, late, true));
                }
                if stream.run_customers.is_some() {
                    for _ in 0..10 {
                        let key = stream.rng.random_range(0..KEYS);
                        batch.extend(stream.change(key, true));
                    }
                }
                send_all(&producer, batch, &sent).await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            // Sentinels: a good record last on every partition, so every end is a commit.
            let mut batch = Vec::new();
            for p in 0..PARTITIONS {
                batch.push(stream.order(p, false, false));
                if stream.run_customers.is_some() {
                    batch.extend(stream.change(KEYS * 100 + p as i64, false));
                }
            }
            send_all(&producer, batch, &sent).await;
        })
    };

    let config = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership}, "max.poll.interval.ms" = "30000", "topic.metadata.refresh.interval.ms" = "1000" }}

[schema_registry]
url = "{registry}"

[pipeline]
drain_timeout = "{drain_timeout}"
{sinks}"#,
        kafka = kafka(),
        group = run.group,
        membership = group_properties_for(protocol),
        registry = registry_proxy.url(),
        sinks = target.sinks(&run, &dest_proxy),
    );
    let env = match &target {
        Target::Parquet(s, _) | Target::Delta(s, _, _) => s.env(),
        Target::Databend(_) => Vec::new(),
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let start = || Lakesink::start(&config, &env);
    let mut procs: Vec<Lakesink> = (0..3).map(|_| start()).collect();
    let mut logs = Vec::new();

    // The schedule: at least 10 kills, 3 rebalances, 1 zombie, 1 outage and 1 broker crash
    // (SIGKILL, restart on the same data directory) in a short run; a long run adds a broker
    // crash about every 4 minutes.
    let mut plan = vec!["kill"; 10];
    plan.extend(["rebalance"; 3]);
    plan.push("zombie");
    plan.push("outage");
    plan.push("broker");
    let extra = (seconds / 4).saturating_sub(plan.len() as u64);
    for _ in 0..extra {
        let action = ["kill", "rebalance", "kill", "zombie", "outage"][rng.random_range(0..5)];
        plan.push(if rng.random_range(0..60) == 0 {
            "broker"
        } else {
            action
        });
    }
    for k in (1..plan.len()).rev() {
        let j = rng.random_range(0..=k);
        plan.swap(k, j);
    }
    let step = Duration::from_millis(seconds * 1000 / plan.len() as u64);
    // A broker crash must not land in the first seconds, before anything was committed.
    if let Some(i) = plan.iter().position(|a| *a == "broker") {
        let j = i.max(plan.len() / 3);
        plan.swap(i, j);
    }
    let mut figures = Figures::default();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for action in &plan {
        let victim = rng.random_range(0..procs.len());
        match *action {
            "kill" => {
                let p = procs.remove(victim);
                logs.push(p.log());
                p.kill9();
                procs.insert(victim, start());
                figures.kills += 1;
            }
            "rebalance" => {
                let p = procs.remove(victim);
                logs.push(p.stop());
                tokio::time::sleep(Duration::from_millis(500)).await;
                procs.insert(victim, start());
                figures.rebalances += 1;
            }
            "broker" => {
                kafka_broker("restart");
                figures.broker_restarts += 1;
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
                dest_proxy.outage(Duration::from_secs(4));
                registry_proxy.outage(Duration::from_secs(4));
                figures.outages += 1;
            }
        }
        tokio::time::sleep(step).await;
    }
    stop_producing.store(true, Ordering::Relaxed);
    producer_task.await.unwrap();
    let sent = sent.lock().unwrap().clone();

    // Catch-up, faults still on: every sink's committed position reaches every end.
    let sinks: Vec<(&str, &String)> = std::iter::once(("orders", &run.orders))
        .chain(run.customers.as_ref().map(|c| ("customers", c)))
        .chain(
            matches!(target, Target::Parquet(_, Some(_))).then_some(("orders_copy", &run.orders)),
        )
        .collect();
    // The backlog grows with the run (kills and zombie pauses stop members while the producer
    // goes on): a 20-minute Delta upsert run on moto was still committing MERGEs after 360 s.
    // A stall is caught separately (STALL below); this bound only ends a run that is slow.
    let deadline = Instant::now() + Duration::from_secs(240 + seconds / 2);
    // A stall (nothing committed for STALL while behind) fails the run at once with the members'
    // logs: a broker evicts dead members after the session timeout, so a group that stops
    // committing is a bug, never something to restart around.
    const STALL: Duration = Duration::from_secs(90);
    let mut last_progress = (Instant::now(), -1i64);
    loop {
        let mut behind = Vec::new();
        let mut total = 0i64;
        for (sink, topic) in &sinks {
            let pos = target.positions(&run.group, sink, topic).await;
            for p in 0..PARTITIONS {
                let end = sent.ends.get(&(topic.to_string(), p)).copied().unwrap_or(0);
                let at = pos.get(&p).copied().unwrap_or(0);
                total += at;
                if at < end {
                    behind.push((*sink, p, at, end));
                }
            }
        }
        if behind.is_empty() {
            break;
        }
        for (i, p) in procs.iter_mut().enumerate() {
            if let Some(s) = p.child.try_wait().unwrap() {
                panic!("process {i} exited ({s}) during catch-up:\n{}", p.log());
            }
        }
        if total > last_progress.1 {
            last_progress = (Instant::now(), total);
        }
        let stalled = last_progress.0.elapsed() >= STALL;
        if stalled || Instant::now() >= deadline {
            let tails: Vec<String> = procs
                .iter()
                .map(|p| {
                    let log = p.log();
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(40)..].join("\n")
                })
                .collect();
            let why = if stalled {
                format!("nothing committed for {STALL:?}")
            } else {
                "behind after catch-up time".to_string()
            };
            // The broker's view of open transactions: a dead-letter scan waits for them.
            let broker = [
                kafka_transactions(&[
                    "describe-producers",
                    "--topic",
                    &run.dlq,
                    "--partition",
                    "0",
                ]),
                kafka_transactions(&["find-hanging", "--broker-id", "1"]),
                kafka_transactions(&["list"]),
            ];
            panic!(
                "{why} (sink, partition, committed, end): {behind:?}; \
                 process log tails:\n{}\n----\nbroker:\n{}",
                tails.join("\n----\n"),
                broker.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for p in procs {
        logs.push(p.stop());
    }

    // Reconcile with independent readers.
    let orders = target
        .reconcile_orders(&sent, &run.orders, &logs.join("\n"))
        .await;
    let want = sent.final_state();
    let customers = target.customers().await;
    assert_eq!(
        customers.len(),
        want.len(),
        "customer rows vs the source's live keys"
    );
    for (key, name) in &want {
        assert_eq!(customers.get(key), Some(name), "customer {key}");
    }
    let dead = dead_letters(&run.dlq, |dead| {
        sent.poison.iter().all(|k| dead.contains_key(k))
    })
    .await;
    let missing: Vec<_> = sent
        .poison
        .iter()
        .filter(|k| !dead.contains_key(k))
        .collect();
    if !missing.is_empty() {
        // Keep what the members said, for the cause: which session covered each missing
        // record's partition, and which position (`last`) it read from the dead-letter tail.
        let all = logs.join("\n");
        let path = scratch("chaos-logs").join("members.log");
        std::fs::write(&path, &all).unwrap();
        let sessions: Vec<&str> = all
            .lines()
            .filter(|l| l.contains("dead-letter session open"))
            .filter(|l| {
                missing
                    .iter()
                    .any(|(t, p, _)| l.contains(&format!("tp={t}/{p} ")))
            })
            .take(40)
            .collect();
        panic!(
            "poison never dead-lettered: {missing:?}; every member's log is in {}; the \
             dead-letter sessions of those partitions:\n{}",
            path.display(),
            sessions.join("\n")
        );
    }
    let extra: Vec<_> = dead.keys().filter(|k| !sent.poison.contains(k)).collect();
    assert!(extra.is_empty(), "good records dead-lettered: {extra:?}");
    // Asserted after the summary line, which reports it.
    let twice: u32 = dead.values().map(|n| n - 1).sum();

    // Secrets: the Azurite account key and the Databend password never reach a log.
    let all_logs = logs.join("\n");
    let password = url::Url::parse(&databend_url())
        .ok()
        .and_then(|u| u.password().map(str::to_string));
    for secret in [Some(AZURITE_KEY.to_string()), password]
        .into_iter()
        .flatten()
    {
        assert!(!all_logs.contains(&secret), "a secret leaked into the logs");
    }
    // How often a revoked worker outlived the drain timeout, and how often a writer was fenced
    // by another's commit: the races the run exercised.
    let drains_timed_out = all_logs
        .matches("did not finish within the drain timeout")
        .count();
    let fences = all_logs
        .matches("another writer committed this range first")
        .count()
        + all_logs.matches("fenced by another writer").count();
    println!(
        "chaos summary: target={} protocol={protocol} drain_timeout={drain_timeout} seed={seed} seconds={seconds} kills={} rebalances={} zombies={} outages={} \
         drains_timed_out={drains_timed_out} fences={fences} \
         broker_restarts={} faults_injected={} records_reconciled={} changes_reconciled={} final_keys={} lost=0 duplicated=0 \
         dlq_matched={}/{} dlq_duplicated={twice}",
        target.label(),
        figures.kills,
        figures.rebalances,
        figures.zombies,
        figures.outages,
        figures.broker_restarts,
        dest_proxy.injected() + registry_proxy.injected(),
        orders.len(),
        sent.changes.len(),
        want.len(),
        sent.poison.len(),
        sent.poison.len(),
    );
    let written_twice: Vec<_> = dead.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        written_twice.is_empty(),
        "dead letters written more than once (position: copies): {written_twice:?}"
    );
    assert!(figures.kills >= 10 && figures.rebalances >= 3 && figures.zombies >= 1);
    assert!(figures.broker_restarts >= 1);
    assert!(dest_proxy.injected() > 0, "no fault was injected");
}

// Every sink kind under both consumer group protocols, the classic one and KIP-848's (the
// protocol is the source's concern, so Parquet takes KIP-848 on one store, Azurite, and the
// classic protocol on the other two).
#[tokio::test(flavor = "multi_thread")]
async fn chaos_parquet_on_moto() {
    // Two sinks read the orders topic here.
    chaos(
        Target::Parquet(Store::s3("orders"), Some(Store::s3("orders_copy"))),
        "classic",
        "10s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_parquet_on_azurite() {
    // Drains shorter than a flush under load: flush tasks outlive their workers.
    chaos(
        Target::Parquet(Store::azure("orders"), None),
        "consumer",
        "1s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_parquet_on_gcs() {
    chaos(
        Target::Parquet(Store::gcs("orders"), None),
        "classic",
        "10s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_delta_on_moto() {
    chaos(
        Target::Delta(Store::s3("orders"), Store::s3("customers"), ""),
        "classic",
        "10s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_delta_on_moto_kip848() {
    // Upserts by deletion vectors, and compaction in the background (kills land in
    // merge-on-read commits, purges and compactions too).
    chaos(
        Target::Delta(
            Store::s3("orders"),
            Store::s3("customers"),
            "delta = { upsert = \"deletion-vectors\", auto_compact = true, compact_min_files = 4 }",
        ),
        "consumer",
        // Drains shorter than a flush under load: flush tasks outlive their workers.
        "1s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_databend() {
    chaos(Target::Databend(unique("chaos")), "classic", "10s").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_databend_kip848() {
    chaos(Target::Databend(unique("chaos")), "consumer", "10s").await;
}
