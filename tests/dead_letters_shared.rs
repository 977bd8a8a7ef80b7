//! Two deployments (consumer groups) that share a dead-letter topic and a sink name, each
//! loading its own table: each finds its own dead letters when it takes a partition over, never
//! the other's (the exactly-once review's F13).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread")]
async fn two_groups_sharing_a_dead_letter_topic_each_write_their_own() {
    let topic = unique("shared-dlq");
    let dlq = unique("shared-dlq-dead");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut bad = Vec::new();
    for i in 0..200i64 {
        let payload = if i % 40 == 7 {
            "{\"id\": ".to_string()
        } else {
            format!("{{\"id\": {i}}}")
        };
        let d = producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        if i % 40 == 7 {
            bad.push(d.offset);
        }
    }
    let groups = [unique("blue"), unique("green")];
    for group in &groups {
        let store = Store::local("events");
        let cfg = format!(
            r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership} }}

[[sink]]
name = "events"
topics = ["{topic}"]
table = "{url}"
format = "json"
schema = {{ id = "long" }}
errors = "dead-letter"
dead_letter_topic = "{dlq}"
flush = {{ max_rows = 50, max_latency = "1s" }}
"#,
            kafka = kafka(),
            membership = group_properties(),
            url = store.url,
        );
        catch_up(&cfg, &[]);
    }

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut by_group: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let start = Instant::now();
    while by_group.values().map(Vec::len).sum::<usize>() < 2 * bad.len()
        && start.elapsed() < Duration::from_secs(30)
    {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        let h = m.headers().expect("headers");
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        by_group
            .entry(get("lakesink.group"))
            .or_default()
            .push(get("lakesink.source.offset").parse().unwrap());
    }
    for group in &groups {
        let mut got = by_group.get(group).cloned().unwrap_or_default();
        got.sort_unstable();
        assert_eq!(got, bad, "group {group}'s dead letters: {by_group:?}");
    }
}
