//! Record keys decoded into `_key`: Avro keys from the registry, JSON keys of a declared schema
//! and string keys; a record whose key cannot be decoded is handled by `errors` and its value
//! never lands. Two sinks read the same topic into two tables.

mod common;

use std::time::Duration;

use apache_avro::types::Value;
use common::*;
use lakesink::app::workload::{order_schema, Order};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use schema_registry::wire;

const KEY_SCHEMA: &str =
    r#"{"type":"record","name":"OrderKey","fields":[{"name":"id","type":"long"}]}"#;

#[tokio::test(flavor = "multi_thread")]
async fn avro_json_and_string_keys_land_in_key_columns() {
    let topic = unique("keyed");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let value_id = register_orders(&client, &topic).await;
    let key_id = client
        .register(&format!("{topic}-key"), KEY_SCHEMA)
        .await
        .unwrap();
    let key_schema = apache_avro::Schema::parse_str(KEY_SCHEMA).unwrap();
    let schema = order_schema();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let n = 100i64;
    let mut utf8_keys = 0u64;
    for i in 0..n {
        let value = wire::frame(value_id, &Order::generate(i).encode(&schema));
        let key = wire::frame(
            key_id,
            &apache_avro::to_avro_datum(
                &key_schema,
                Value::Record(vec![("id".into(), Value::Long(i))]),
            )
            .unwrap(),
        );
        // Framed Avro keys are bytes: only some happen to be valid UTF-8 for the string sink.
        utf8_keys += u64::from(std::str::from_utf8(&key).is_ok());
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key(&key)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        if i == 50 {
            // A key that is neither framed Avro nor UTF-8.
            producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(0)
                        .key(&b"\xff\xfe"[..])
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    let avro_table = Store::local("by-avro-key");
    let string_table = Store::local("by-string-key");
    let cfg = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}

[schema_registry]
url = "{registry_url}"

[[sink]]
name = "avro-keys"
topics = ["{topic}"]
table = "{avro}"
key_format = "avro"
errors = "skip"
flush = {{ max_latency = "1s" }}

[[sink]]
name = "string-keys"
topics = ["{topic}"]
table = "{string}"
key_format = "string"
errors = "skip"
metadata = {{ key = true }}
flush = {{ max_latency = "1s" }}
"#,
        kafka = kafka(),
        group = unique("g"),
        avro = avro_table.url,
        string = string_table.url,
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &avro_table,
        &topic,
        n as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    wait_rows(
        &string_table,
        &topic,
        utf8_keys,
        &mut proc_,
        Duration::from_secs(60),
    )
    .await;
    let log = proc_.stop();
    assert!(log.contains("the key cannot be decoded"), "{log}");

    // Avro keys: `_key` is a struct with the key's fields; the bad key's record is skipped.
    let t = avro_table.dump();
    assert!(
        t["types"]["_key"]
            .as_str()
            .unwrap()
            .starts_with("struct<id: int64"),
        "{}",
        t["types"]
    );
    assert!(
        t["types"].get("_kafka_key").is_none(),
        "raw keys are dropped unless asked for"
    );
    let rows = t["rows"].as_array().unwrap();
    assert_eq!(rows.len(), n as usize);
    for r in rows {
        assert_eq!(r["_key"]["id"], r["id"], "{r}");
    }
    // String keys: exactly the records whose key is valid UTF-8, the raw key kept on request.
    let t = string_table.dump();
    assert_eq!(t["types"]["_key"], "string");
    assert_eq!(t["types"]["_kafka_key"], "binary");
    let rows = t["rows"].as_array().unwrap();
    assert_eq!(rows.len() as u64, utf8_keys);
    assert!(rows.iter().all(|r| r["_key"].is_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_keys_with_a_declared_key_schema() {
    let topic = unique("jsonkeys");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let value_id = register_orders(&client, &topic).await;
    let schema = order_schema();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    for i in 0..60i64 {
        let value = wire::frame(value_id, &Order::generate(i).encode(&schema));
        let key = if i == 30 {
            "{\"id\": \"not a number\"}".to_string()
        } else {
            format!("{{\"id\": {i}, \"region\": \"eu\"}}")
        };
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key(&key)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let store = Store::local("orders");
    let cfg = config_with(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        "[]",
        "key_format = \"json\"\nkey_schema = { id = \"long\", region = \"string\" }\nerrors = \"skip\"",
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, 59, &mut proc_, Duration::from_secs(120)).await;
    proc_.stop();
    let t = store.dump();
    let rows = t["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 59);
    for r in rows {
        assert_eq!(r["_key"]["id"], r["id"], "{r}");
        assert_eq!(r["_key"]["region"], "eu");
    }
}
