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
use lakesink::config::Config;
use lakesink::pipeline::Progress;
use lakesink::source::SourceOptions;
use lakesink::workload::ORDER_SCHEMA;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
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
    let feed = bootstrap.clone();
    let produce = move |ids: std::ops::Range<i64>| {
        let bootstrap = feed.clone();
        tokio::task::spawn_blocking(move || {
            lakesink::app::demo::produce_orders(&bootstrap, topic, id, ids, |_| {})
        })
    };
    // Half the records are there at start; the other half arrives in steps while faults run.
    produce(0..n / 2).await.unwrap().unwrap();
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
    let steps = 30;
    let late = tokio::spawn({
        let produce = produce.clone();
        async move {
            for step in 0..steps {
                let from = n / 2 + step * (n / 2) / steps;
                let to = n / 2 + (step + 1) * (n / 2) / steps;
                produce(from..to).await.unwrap().unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let (mut faults, mut outages, mut round) = (0, 0, 0u32);
    while progress.rows_committed.load(Ordering::Relaxed) < n as u64 {
        assert!(!run.is_finished(), "the pipeline stopped under faults");
        if round % 4 == 3 {
            cluster.broker_down(2).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            cluster.broker_up(2).unwrap();
            outages += 1;
        } else {
            match round % 4 {
                1 => cluster.request_errors(
                    RDKafkaApiKey::Fetch,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 3],
                ),
                2 => cluster.request_errors(
                    RDKafkaApiKey::OffsetCommit,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 3],
                ),
                _ => cluster.request_errors(
                    RDKafkaApiKey::Heartbeat,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 2],
                ),
            }
        }
        faults += 1;
        round += 1;
        // One fault every 400 ms: faster than librdkafka's own backoffs, the group never
        // settles and nothing can be measured.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            round < 300,
            "not every record committed after {round} fault rounds: {} of {n}",
            progress.rows_committed.load(Ordering::Relaxed)
        );
    }
    late.await.unwrap();
    cancel.cancel();
    run.await.unwrap().unwrap();
    println!("{faults} faults ({outages} broker outages) injected while {n} records were sunk");
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
