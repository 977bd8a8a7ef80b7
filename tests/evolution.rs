//! Schema evolution without small files: two writer-schema versions interleaved record by record
//! in one partition resolve to one reader schema; rows of both versions land in the same files,
//! with nulls for the field the older version lacks.

mod common;

use std::time::Duration;

use apache_avro::types::Value;
use common::*;
use lakesink::app::workload::{order_schema, Order, ORDER_SCHEMA};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use schema_registry::wire;

#[tokio::test(flavor = "multi_thread")]
async fn interleaved_versions_share_files_and_gain_a_nullable_column() {
    let store = Store::local("orders");
    let topic = unique("evolve");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let v1 = register_orders(&client, &topic).await;
    let v2_text = order_v2_schema();
    let v2 = client
        .register(&format!("{topic}-value"), &v2_text)
        .await
        .unwrap();
    assert!(v2.0 > v1.0);
    let s1 = order_schema();
    let s2 = apache_avro::Schema::parse_str(&v2_text).unwrap();

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let n = 2000i64;
    let mut produced = Produced::new();
    let mut futs = Vec::new();
    for i in 0..n {
        let order = Order::generate(i);
        let payload = if i % 2 == 0 {
            wire::frame(v1, &order.encode(&s1))
        } else {
            frame_order_v2(v2, &s2, i)
        };
        let producer = producer.clone();
        let topic = topic.clone();
        futs.push(async move {
            let d = producer
                .send(
                    FutureRecord::<(), _>::to(&topic)
                        .partition(0)
                        .payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .unwrap();
            ((d.partition, d.offset), i)
        });
    }
    for (k, v) in futures::future::join_all(futs).await {
        produced.insert(k, v);
    }

    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        n as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    proc_.stop();

    let table = store.read();
    assert_exactly_once(&table, &produced);
    for r in table["rows"].as_array().unwrap() {
        let id = r["id"].as_i64().unwrap();
        let coupon = r["coupon"].as_str();
        if id % 2 == 0 {
            assert_eq!(coupon, None, "v1 row {id} reads the new field as null");
        } else {
            assert_eq!(coupon, Some(format!("C{id}").as_str()), "v2 row {id}");
        }
    }
    // Files rotate per flush (max_rows = 400), not per version: at most one extra commit where
    // the reader schema was upgraded, versus ~n/2 if every version flip rotated a file.
    let markers = committed_markers(&store, &topic).await;
    assert!(
        markers <= (n as usize).div_ceil(400) + 2,
        "{markers} commits for {n} rows: files rotate on version flips"
    );
}

/// An incompatible version (a field's type changed from string to long) is rejected record by
/// record with an error naming the subject, the schema ids and the field; the compatible
/// records around it land.
#[tokio::test(flavor = "multi_thread")]
async fn an_incompatible_version_is_rejected_naming_the_field() {
    let store = Store::local("orders");
    let topic = unique("incompatible");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let v1 = register_orders(&client, &topic).await;
    // Our registry would refuse this under BACKWARD: turn the subject's checks off, as a team
    // that "just deployed it" would.
    reqwest::Client::new()
        .put(format!("{registry_url}/config/{topic}-value"))
        .json(&serde_json::json!({"compatibility": "NONE"}))
        .send()
        .await
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(ORDER_SCHEMA).unwrap();
    v["fields"][1]["type"] = serde_json::json!("long");
    let v3 = client
        .register(&format!("{topic}-value"), &v.to_string())
        .await
        .unwrap();
    let s1 = order_schema();
    let s3 = apache_avro::Schema::parse_str(&v.to_string()).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut good = 0u64;
    for i in 0..45i64 {
        let payload = if (20..25).contains(&i) {
            let Value::Record(mut fields) = Order::generate(i).to_avro_value() else {
                unreachable!()
            };
            fields[1].1 = Value::Long(i);
            wire::frame(
                v3,
                &apache_avro::to_avro_datum(&s3, Value::Record(fields)).unwrap(),
            )
        } else {
            good += 1;
            wire::frame(v1, &Order::generate(i).encode(&s1))
        };
        producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let cfg = config(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        "errors = \"skip\"",
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, good, &mut proc_, Duration::from_secs(120)).await;
    let log = proc_.stop();
    assert_eq!(
        log.matches("skipping a record that cannot be decoded")
            .count(),
        5,
        "{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("cannot be resolved to the reader schema"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("writer schema id {v3}")), "{line}");
    assert!(line.contains(&format!("{topic}-value")), "{line}");
    assert!(line.contains("order_id"), "the field is named: {line}");
}
