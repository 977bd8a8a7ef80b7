//! A record that cannot be decoded stops the sink with an error naming topic, partition, offset
//! and cause; nothing after it is committed and nothing is skipped silently.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_record_stops_the_sink_naming_its_offset() {
    let store = Store::local("orders");
    let topic = unique("poison");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..50, 1).await;
    let poison_offset = produced.keys().map(|(_, o)| *o).max().unwrap() + 1;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let d = producer
        .send(
            FutureRecord::<(), _>::to(&topic)
                .partition(0)
                .payload("{\"not\": \"avro\"}"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(d.offset, poison_offset);
    produce(&topic, id, 50..60, 1).await;

    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = proc_.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "lakesink kept running:\n{}",
            proc_.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    let log = proc_.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let needle = format!("cannot decode {topic}/0 offset {poison_offset}");
    assert!(log.contains(&needle), "expected `{needle}` in:\n{log}");
    assert!(log.contains("magic byte"), "the cause is named:\n{log}");
    // Nothing at or after the poison record was committed.
    let table = store.read();
    for r in table["rows"].as_array().unwrap() {
        assert!(
            r["o"].as_i64().unwrap() < poison_offset,
            "row after the poison record: {r}"
        );
    }
}
