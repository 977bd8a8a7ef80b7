//! The commit protocol under broker faults, in process: librdkafka's mock cluster (3 brokers,
//! replication 3) fails Fetch, OffsetCommit and Heartbeat requests and takes brokers
//! down and up while the real pipeline sinks a topic into a local Parquet table; pyarrow then
//! reads every order exactly once.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use lakesink::app::workload::{order_schema, Order, ORDER_SCHEMA};
use lakesink::config::Config;
use lakesink::kafka::SourceOptions;
use lakesink::pipeline::Progress;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use schema_registry::wire;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_through_request_errors_and_broker_outages() {
    let topic = "torture.orders";
    let n: i64 = 6000;
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic(topic, 3, 3).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let (registry_url, client) = registry().await;
    let id = client
        .register(&format!("{topic}-value"), ORDER_SCHEMA)
        .await
        .unwrap();
    // One idempotent producer feeds the topic: its retries cannot duplicate a record, and every
    // delivery is checked (a lost record would otherwise show up as a pipeline loss). Short
    // time-outs and back-off, so a step sent right after an outage is retried quickly.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("reconnect.backoff.max.ms", "500")
        .set("request.timeout.ms", "3000")
        .set("socket.timeout.ms", "5000")
        .create()
        .unwrap();
    let schema = order_schema();
    let produce = move |ids: std::ops::Range<i64>| {
        let producer = producer.clone();
        let records: Vec<_> = ids
            .map(|i| {
                let order = Order::generate(i);
                let payload = wire::frame(id, &order.encode(&schema));
                (order.order_id, payload)
            })
            .collect();
        async move {
            let sends = records.iter().map(|(key, payload)| {
                producer.send(
                    FutureRecord::to(topic).key(key.as_str()).payload(payload),
                    Timeout::Never,
                )
            });
            for delivery in futures::future::join_all(sends).await {
                if let Err((e, _)) = delivery {
                    panic!("the test's producer failed to deliver to {topic}: {e}");
                }
            }
        }
    };
    // Half the records are there at start; the other half arrives in steps between faults.
    let steps: i64 = 30;
    produce(0..n / 2).await;
    let store = Store::local(&unique("torture"));
    let text = config_with(topic, &unique("g"), &registry_url, &store, "[]", "")
        .replace(
            &format!("bootstrap_servers = \"{}\"", kafka()),
            &format!("bootstrap_servers = \"{bootstrap}\""),
        )
        .replace("max_rows = 400", "max_rows = 100");
    let cfg = Config::from_toml(&text).unwrap().validate().unwrap();
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    let run = tokio::spawn(lakesink::app::run(
        cfg,
        SourceOptions {
            until_caught_up: false,
            // librdkafka's mock cluster has no topic ids.
            topic_ids: false,
        },
        cancel.clone(),
        progress.clone(),
    ));
    // Faults start once records flow (assignment and recovery are done): request errors, and a
    // broker outage every fourth round, until every record is committed.
    while progress.records_in.load(Ordering::Relaxed) == 0 {
        assert!(!run.is_finished(), "the pipeline stopped before any record");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Faults run until every record is committed, for at most FAULT_ROUNDS rounds (60 s); then
    // the cluster is healthy and every record must be committed within QUIET. Each injection
    // first clears what is left of the previous one for that request: the mock queues injected
    // errors until requests consume them, and a consumer in fetch back-off sends about one Fetch
    // a second, so three errors every 1.6 s piled up and outlived the faults by a minute; and
    // even three at a time, cleared, kept such a consumer failing every Fetch for a minute.
    // The late records are produced between faults, each step delivered before the next fault:
    // a producer running through the outages was held up for a minute or more at a time.
    const FAULT_ROUNDS: u32 = 150;
    const STEP_DELIVERY: Duration = Duration::from_secs(30);
    const QUIET: Duration = Duration::from_secs(60);
    let kinds = [
        RDKafkaApiKey::Fetch,
        RDKafkaApiKey::OffsetCommit,
        RDKafkaApiKey::Heartbeat,
    ];
    let committed = || progress.rows_committed.load(Ordering::Relaxed);
    let (mut faults, mut outages, mut round) = (0, 0, 0u32);
    let at_first_fault = committed();
    while committed() < n as u64 && round < FAULT_ROUNDS {
        assert!(!run.is_finished(), "the pipeline stopped under faults");
        let step = i64::from(round);
        if step < steps {
            let ids = n / 2 + step * (n / 2) / steps..n / 2 + (step + 1) * (n / 2) / steps;
            tokio::time::timeout(STEP_DELIVERY, produce(ids))
                .await
                .unwrap_or_else(|_| panic!("the test's producer took over {STEP_DELIVERY:?}"));
        }
        if round % 4 == 3 {
            cluster.broker_down(2).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            cluster.broker_up(2).unwrap();
            outages += 1;
        } else {
            let (kind, error, count) = match round % 4 {
                1 => (
                    RDKafkaApiKey::Fetch,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                    1,
                ),
                2 => (
                    RDKafkaApiKey::OffsetCommit,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                    3,
                ),
                _ => (
                    RDKafkaApiKey::Heartbeat,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                    2,
                ),
            };
            cluster.clear_request_errors(kind);
            cluster.request_errors(kind, &vec![error; count]);
        }
        faults += 1;
        round += 1;
        // One fault every 400 ms: faster than librdkafka's own backoffs, the group never
        // settles and nothing can be measured.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    for kind in kinds {
        cluster.clear_request_errors(kind);
    }
    let under_faults = committed() - at_first_fault;
    println!(
        "{faults} faults ({outages} broker outages): {under_faults} rows committed under them, {} of {n} in all",
        committed()
    );
    assert!(
        under_faults > 0,
        "no row was committed in {round} fault rounds"
    );
    let quiet = std::time::Instant::now();
    while committed() < n as u64 {
        assert!(!run.is_finished(), "the pipeline stopped after the faults");
        assert!(
            quiet.elapsed() < QUIET,
            "{} of {n} rows committed {QUIET:?} after the faults ended: the pipeline stalled",
            committed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "the last rows were committed {:?} after the faults",
        quiet.elapsed()
    );
    cancel.cancel();
    run.await.unwrap().unwrap();
    assert!(
        faults >= 4 && outages >= 1,
        "the run ended before every kind of fault ran"
    );

    let table = store.read();
    let rows = table["rows"].as_array().unwrap();
    let mut ids: BTreeMap<i64, usize> = BTreeMap::new();
    let mut positions = std::collections::BTreeSet::new();
    for r in rows {
        *ids.entry(r["id"].as_i64().unwrap()).or_default() += 1;
        assert!(
            positions.insert((r["p"].as_i64().unwrap(), r["o"].as_i64().unwrap())),
            "duplicate position in {r}"
        );
    }
    let dup: Vec<_> = ids.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(dup.is_empty(), "duplicated orders: {dup:?}");
    let missing: Vec<_> = (0..n).filter(|i| !ids.contains_key(i)).take(5).collect();
    assert!(missing.is_empty(), "missing orders, e.g. {missing:?}");
    assert_eq!(rows.len(), n as usize);
}
