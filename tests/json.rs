//! Schemaless JSON into a declared table schema: coercions (ISO timestamps, numeric strings to
//! decimals), missing fields as nulls, unknown fields ignored; records that are not JSON or do
//! not fit the schema go to the dead-letter topic and every good record lands exactly once.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread")]
async fn json_records_fit_the_declared_schema_and_bad_ones_are_dead_lettered() {
    let store = Store::local("events");
    let topic = unique("json");
    let dlq = unique("json-dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut good: BTreeMap<i64, i64> = BTreeMap::new(); // offset -> id
    let mut bad: BTreeMap<i64, &str> = BTreeMap::new(); // offset -> class
    for i in 0..400i64 {
        let (payload, class) = match i % 50 {
            7 => ("{\"id\": 7, \"amount\": ".to_string(), Some("malformed")),
            19 => (format!("{{\"id\": \"id-{i}\"}}"), Some("type-mismatch")),
            33 => ("[1, 2, 3]".to_string(), Some("type-mismatch")),
            _ => (
                format!(
                    "{{\"id\": {i}, \"amount\": \"{}.{:02}\", \"at\": \"2026-11-21T10:{:02}:{:02}Z\", \"label\": {}, \"extra\": [1]}}",
                    i * 3,
                    i % 100,
                    (i / 60) % 60,
                    i % 60,
                    if i % 4 == 0 { "null".to_string() } else { format!("\"l{i}\"") }
                ),
                None,
            ),
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
        match class {
            Some(c) => {
                bad.insert(d.offset, c);
            }
            None => {
                good.insert(d.offset, i);
            }
        }
    }
    let (registry_url, _client) = registry().await;
    let cfg = config_with(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        "[]",
        &format!(
            "format = \"json\"\nschema = {{ id = \"long\", amount = \"decimal(12,2)\", at = \"timestamp\", label = \"string\" }}\ndead_letter_topic = \"{dlq}\""
        ),
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        good.len() as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    proc_.stop();

    let table = store.dump();
    assert_eq!(table["types"]["amount"], "decimal128(12, 2)");
    assert_eq!(table["types"]["at"], "timestamp[us, tz=+00:00]");
    let names: Vec<&str> = table["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        &names[..4],
        ["id", "amount", "at", "label"],
        "declared column order"
    );
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), good.len());
    let base = 1_795_255_200_000_000i64; // 2026-11-21T10:00:00Z in µs
    for r in rows {
        let offset = r["_kafka_offset"].as_i64().unwrap();
        let i = good[&offset];
        assert_eq!(r["id"], i);
        assert_eq!(r["amount"], format!("{}.{:02}", i * 3, i % 100).as_str());
        assert_eq!(r["at"], base + (((i / 60) % 60) * 60 + i % 60) * 1_000_000);
        if i % 4 == 0 {
            assert!(r["label"].is_null());
        } else {
            assert_eq!(r["label"], format!("l{i}").as_str());
        }
    }

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut seen = BTreeMap::new();
    let start = Instant::now();
    while seen.len() < bad.len() && start.elapsed() < Duration::from_secs(60) {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        let h = m.headers().unwrap();
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap()
        };
        let offset: i64 = get("lakesink.source.offset").parse().unwrap();
        assert!(seen.insert(offset, get("lakesink.error.class")).is_none());
    }
    let want: BTreeMap<i64, String> = bad.iter().map(|(o, c)| (*o, c.to_string())).collect();
    assert_eq!(seen, want);
}

/// Confluent-framed JSON whose JSON Schemas live in the registry: no declared schema; a second
/// schema version adds a field mid-stream; unframed and unknown-id records are skipped with
/// counts.
#[tokio::test(flavor = "multi_thread")]
async fn json_schema_from_the_registry() {
    let store = Store::local("events");
    let topic = unique("jsonschema");
    create_topic(&topic, 1).await;
    let (registry_url, _client) = registry().await;
    let register = |schema: serde_json::Value| {
        let url = format!("{registry_url}/subjects/{topic}-value/versions");
        async move {
            let body = serde_json::json!({"schemaType": "JSON", "schema": schema.to_string()});
            let r: serde_json::Value = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            schema_registry::SchemaId(r["id"].as_u64().unwrap() as u32)
        }
    };
    let v1 = register(serde_json::json!({"type": "object", "properties": {
        "id": {"type": "integer"}, "at": {"type": "string", "format": "date-time"}}}))
    .await;
    let v2 = register(serde_json::json!({"type": "object", "properties": {
        "id": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
        "note": {"type": ["null", "string"]}}}))
    .await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut good = BTreeMap::new();
    for i in 0..120i64 {
        let (id, doc) = if i < 60 {
            (
                v1,
                serde_json::json!({"id": i, "at": "2026-11-21T10:00:00Z"}),
            )
        } else {
            (
                v2,
                serde_json::json!({"id": i, "at": "2026-11-21T11:00:00Z", "note": format!("n{i}")}),
            )
        };
        let payload = schema_registry::wire::frame(id, doc.to_string().as_bytes());
        let d = producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        good.insert(d.offset, i);
        if i == 30 {
            // Not framed, and framed with an id the registry does not know.
            for bad in [
                b"{\"id\": 1}".to_vec(),
                schema_registry::wire::frame(schema_registry::SchemaId(777), b"{}"),
            ] {
                producer
                    .send(
                        FutureRecord::<(), _>::to(&topic).partition(0).payload(&bad),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
            }
        }
    }
    let cfg = config_with(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        "[]",
        "format = \"json\"\nerrors = \"skip\"",
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        good.len() as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    let log = proc_.stop();
    assert_eq!(
        log.matches("skipping a record that cannot be decoded")
            .count(),
        2,
        "{log}"
    );
    let table = store.dump();
    assert_eq!(table["types"]["id"], "int64");
    assert_eq!(table["types"]["at"], "timestamp[us, tz=+00:00]");
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), good.len());
    for r in rows {
        let i = good[&r["_kafka_offset"].as_i64().unwrap()];
        assert_eq!(r["id"], i);
        if i < 60 {
            assert!(r["note"].is_null(), "{r}");
        } else {
            assert_eq!(r["note"], format!("n{i}").as_str());
        }
    }
}
