//! A missing dead-letter topic: `check` asks the broker whether lakesink may create it (and
//! creates nothing), the service creates it at start-up with the configured partitions, and a
//! principal that may not create it stops the start with the ACL to grant.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// The partition count of `topic`, `None` when the broker does not know it.
fn partitions(topic: &str) -> Option<usize> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("allow.auto.create.topics", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let t = md.topics().first()?;
    (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_dead_letter_topic_is_created_at_start_up() {
    let store = Store::local("orders");
    let topic = unique("dlq-src");
    let dlq = unique("dlq-made");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let mut produced = produce(&topic, id, 0..50, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let poison_at = producer
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key("k")
                .payload(&b"not avro"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap()
        .offset;
    produced.extend(produce(&topic, id, 50..100, 1).await);

    let cfg = config(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        &format!("dead_letter_topic = \"{dlq}\"\ndead_letter_partitions = 3"),
    );
    // `check` says it is missing and may be created, and creates nothing.
    let (code, out) = lakesink_check(&cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "ok    dead-letter topic `{dlq}`: missing; lakesink creates it at start-up (partitions: 3,"
        )),
        "{out}"
    );
    assert_eq!(partitions(&dlq), None, "check created the topic");

    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, 100, &mut proc_, Duration::from_secs(120)).await;
    let log = proc_.stop();
    assert!(log.contains("created the dead-letter topic"), "{log}");
    assert_exactly_once(&store.read(), &produced);
    // Created by lakesink, with its partitions (the broker's default is 1).
    assert_eq!(partitions(&dlq), Some(3));

    // The poison record is in it, once.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut offsets = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            let h = m.headers().unwrap();
            let offset = h
                .iter()
                .find(|x| x.key == "lakesink.source.offset")
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).parse::<i64>().unwrap())
                .unwrap();
            offsets.push(offset);
        } else if !offsets.is_empty() {
            break;
        }
    }
    assert_eq!(offsets, vec![poison_at]);

    // Once it exists, `check` reports its partitions.
    let (code, out) = lakesink_check(&cfg);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("ok    dead-letter topic `{dlq}`: 3 partitions")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_dead_letter_topic_settings_fail_at_start_up() {
    let store = Store::local("orders");
    for (extra, want) in [
        (
            "dead_letter_topic = \"d\"\ndead_letter_partitions = 0",
            "`sink[0].dead_letter_partitions`",
        ),
        (
            "dead_letter_replication_factor = 3",
            "`sink[0].dead_letter_replication_factor`",
        ),
    ] {
        let cfg = config("t", "g", "http://127.0.0.1:9", &store, extra);
        let (code, out) = lakesink_check(&cfg);
        assert_eq!(code, 2, "{extra}: {out}");
        assert!(out.contains(want), "{extra}: {out}");
    }
}
