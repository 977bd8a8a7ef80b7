//! Debezium CDC in Avro: a generated MySQL-style change stream (snapshot reads, creates,
//! updates, deletes and tombstones) is unwrapped to row images with `_op`, `_deleted`, the source
//! position and converted semantic types; the append table holds every change exactly once.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use apache_avro::types::Value;
use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use schema_registry::wire;

const ENVELOPE: &str = r#"{"type":"record","name":"Envelope","namespace":"dbserver1.inventory.customers","fields":[
 {"name":"before","type":["null",{"type":"record","name":"Value","fields":[
   {"name":"id","type":"int"},
   {"name":"name","type":"string"},
   {"name":"credit","type":{"type":"bytes","connect.version":1,"connect.parameters":{"scale":"2","connect.decimal.precision":"10"},"connect.name":"org.apache.kafka.connect.data.Decimal"}},
   {"name":"born","type":["null",{"type":"int","connect.version":1,"connect.name":"io.debezium.time.Date"}],"default":null},
   {"name":"created","type":{"type":"long","connect.version":1,"connect.name":"io.debezium.time.MicroTimestamp"}},
   {"name":"updated","type":{"type":"string","connect.version":1,"connect.name":"io.debezium.time.ZonedTimestamp"}}
 ],"connect.name":"dbserver1.inventory.customers.Value"}],"default":null},
 {"name":"after","type":["null","Value"],"default":null},
 {"name":"source","type":{"type":"record","name":"Source","namespace":"io.debezium.connector.mysql","fields":[
   {"name":"connector","type":"string"},
   {"name":"ts_ms","type":"long"},
   {"name":"db","type":"string"},
   {"name":"table","type":["null","string"],"default":null},
   {"name":"file","type":"string"},
   {"name":"pos","type":"long"}]}},
 {"name":"op","type":"string"},
 {"name":"ts_ms","type":["null","long"],"default":null}
]}"#;

/// One row image: (id, name, credit in cents, born days, created µs, updated µs).
type Row = (i32, String, i64, Option<i32>, i64, i64);

fn row(id: i32, version: i64) -> Row {
    (
        id,
        format!("customer {id} v{version}"),
        id as i64 * 1000 + version * 7 - 5000,
        (id % 3 != 0).then_some(7000 + id),
        1_700_000_000_000_000 + id as i64 * 1_000_001,
        1_790_000_000_000_000 + version * 60_000_000 + id as i64,
    )
}

fn iso(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn image(r: &Row) -> Value {
    let be = r.2.to_be_bytes();
    Value::Union(
        1,
        Box::new(Value::Record(vec![
            ("id".into(), Value::Int(r.0)),
            ("name".into(), Value::String(r.1.clone())),
            ("credit".into(), Value::Bytes(be.to_vec())),
            (
                "born".into(),
                match r.3 {
                    Some(d) => Value::Union(1, Box::new(Value::Int(d))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
            ("created".into(), Value::Long(r.4)),
            ("updated".into(), Value::String(iso(r.5))),
        ])),
    )
}

fn envelope(op: &str, before: Option<&Row>, after: Option<&Row>, pos: i64) -> Value {
    let none = || Value::Union(0, Box::new(Value::Null));
    Value::Record(vec![
        ("before".into(), before.map_or_else(none, image)),
        ("after".into(), after.map_or_else(none, image)),
        (
            "source".into(),
            Value::Record(vec![
                ("connector".into(), Value::String("mysql".into())),
                ("ts_ms".into(), Value::Long(1_790_000_000_000 + pos)),
                ("db".into(), Value::String("inventory".into())),
                (
                    "table".into(),
                    Value::Union(1, Box::new(Value::String("customers".into()))),
                ),
                ("file".into(), Value::String("mysql-bin.000003".into())),
                ("pos".into(), Value::Long(pos)),
            ]),
        ),
        ("op".into(), Value::String(op.into())),
        (
            "ts_ms".into(),
            Value::Union(1, Box::new(Value::Long(1_790_000_000_500 + pos))),
        ),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn debezium_avro_change_stream_is_unwrapped_with_semantic_types() {
    let store = Store::local("customers");
    let topic = unique("dbserver1.inventory.customers");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = client
        .register(&format!("{topic}-value"), ENVELOPE)
        .await
        .unwrap();
    let schema = apache_avro::Schema::parse_str(ENVELOPE).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();

    // The change stream: snapshot reads of 1..=10, creates of 11..=40, updates of every third
    // customer, deletes (each followed by a tombstone) of every fifth.
    let mut changes: Vec<(&str, Option<Row>, Option<Row>)> = Vec::new();
    let mut version: BTreeMap<i32, i64> = BTreeMap::new();
    for c in 1..=10 {
        changes.push(("r", None, Some(row(c, 0))));
        version.insert(c, 0);
    }
    for c in 11..=40 {
        changes.push(("c", None, Some(row(c, 0))));
        version.insert(c, 0);
    }
    for c in (3..=40).step_by(3) {
        let v = version[&c];
        changes.push(("u", Some(row(c, v)), Some(row(c, v + 1))));
        version.insert(c, v + 1);
    }
    for c in (5..=40).step_by(5) {
        changes.push(("d", Some(row(c, version[&c])), None));
    }
    let mut expected: BTreeMap<i64, (&str, Row)> = BTreeMap::new();
    let mut tombstones = 0;
    for (pos, (op, before, after)) in changes.iter().enumerate() {
        let value = envelope(op, before.as_ref(), after.as_ref(), pos as i64 * 100);
        let payload = wire::frame(id, &apache_avro::to_avro_datum(&schema, value).unwrap());
        let key = before.as_ref().or(after.as_ref()).unwrap().0.to_string();
        let d = producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key(&key)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        let image = if *op == "d" { before } else { after };
        expected.insert(d.offset, (op, image.clone().unwrap()));
        if *op == "d" {
            producer
                .send(
                    FutureRecord::<str, [u8]>::to(&topic).partition(0).key(&key),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            tombstones += 1;
        }
    }
    assert!(tombstones > 0);

    let cfg = config_with(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        "[]",
        "format = \"debezium-avro\"",
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        expected.len() as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    proc_.stop();

    let table = store.dump();
    let types = &table["types"];
    assert_eq!(types["credit"], "decimal128(10, 2)", "{types}");
    assert_eq!(types["born"], "date32[day]", "{types}");
    assert_eq!(types["created"], "timestamp[us]", "{types}");
    assert_eq!(types["updated"], "timestamp[us, tz=+00:00]", "{types}");
    assert_eq!(types["_source_ts"], "timestamp[ms, tz=UTC]", "{types}");
    assert!(
        types.get("before").is_none() && types.get("after").is_none(),
        "{types}"
    );

    let rows = table["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        expected.len(),
        "one row per change, tombstones carry none"
    );
    let mut by_offset = BTreeMap::new();
    for r in rows {
        assert!(by_offset
            .insert(r["_kafka_offset"].as_i64().unwrap(), r)
            .is_none());
    }
    for (offset, (op, (cid, name, cents, born, created, updated))) in &expected {
        let r = by_offset
            .get(offset)
            .unwrap_or_else(|| panic!("change at offset {offset} missing"));
        let credit = format!(
            "{}{}.{:02}",
            if *cents < 0 { "-" } else { "" },
            cents.abs() / 100,
            cents.abs() % 100
        );
        assert_eq!(r["_op"], *op, "offset {offset}");
        assert_eq!(r["_deleted"], *op == "d", "offset {offset}");
        assert_eq!(r["id"], *cid, "offset {offset}");
        assert_eq!(r["name"], name.as_str(), "offset {offset}");
        assert_eq!(r["credit"], credit.as_str(), "offset {offset}");
        assert_eq!(r["born"], serde_json::json!(born), "offset {offset}");
        assert_eq!(r["created"], *created, "offset {offset}");
        assert_eq!(r["updated"], *updated, "offset {offset}");
        assert_eq!(r["_source_file"], "mysql-bin.000003");
        assert!(r["_source_pos"].is_i64() && r["_source_ts"].is_i64(), "{r}");
    }
}

/// The same kind of change stream as Debezium's JsonConverter writes it with `schemas.enable`
/// (a `{"schema", "payload"}` envelope) and `decimal.handling.mode=string`, decoded into the
/// declared row schema and unwrapped.
#[tokio::test(flavor = "multi_thread")]
async fn debezium_json_with_connect_envelope_is_unwrapped() {
    let store = Store::local("customers");
    let topic = unique("dbserver1.inventory.customers-json");
    create_topic(&topic, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let json_row = |r: &Row| {
        serde_json::json!({
            "id": r.0, "name": r.1,
            "credit": format!("{}{}.{:02}", if r.2 < 0 { "-" } else { "" }, r.2.abs() / 100, r.2.abs() % 100),
            "born": r.3, "created": r.4, "updated": iso(r.5)
        })
    };
    let mut expected: BTreeMap<i64, (&str, Row)> = BTreeMap::new();
    let mut changes: Vec<(&str, Option<Row>, Option<Row>)> = Vec::new();
    for c in 1..=20 {
        changes.push(("c", None, Some(row(c, 0))));
    }
    for c in (2..=20).step_by(2) {
        changes.push(("u", Some(row(c, 0)), Some(row(c, 1))));
    }
    for c in (5..=20).step_by(5) {
        let v = if c % 2 == 0 { 1 } else { 0 };
        changes.push(("d", Some(row(c, v)), None));
    }
    for (pos, (op, before, after)) in changes.iter().enumerate() {
        let value = serde_json::json!({
            "schema": {"type": "struct", "optional": false, "name": "dbserver1.inventory.customers.Envelope"},
            "payload": {
                "before": before.as_ref().map(json_row),
                "after": after.as_ref().map(json_row),
                "source": {"connector": "mysql", "ts_ms": 1_790_000_000_000i64 + pos as i64, "db": "inventory",
                           "table": "customers", "file": "mysql-bin.000004", "pos": pos as i64 * 10},
                "op": op,
                "ts_ms": 1_790_000_000_500i64 + pos as i64
            }
        })
        .to_string();
        let d = producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        expected.insert(
            d.offset,
            (
                op,
                if *op == "d" {
                    before.clone()
                } else {
                    after.clone()
                }
                .unwrap(),
            ),
        );
        if *op == "d" {
            producer
                .send(
                    FutureRecord::<(), [u8]>::to(&topic).partition(0),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    let (registry_url, _client) = registry().await;
    let cfg = config_with(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        "[]",
        "format = \"debezium-json\"\njson_envelope = \"connect\"\nschema = { id = \"int\", name = \"string\", credit = \"decimal(10,2)\", born = \"date\", created = \"timestamp\", updated = \"timestamp\" }",
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        expected.len() as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    proc_.stop();
    let table = store.dump();
    assert_eq!(table["types"]["credit"], "decimal128(10, 2)");
    assert_eq!(table["types"]["born"], "date32[day]");
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), expected.len());
    for r in rows {
        let offset = r["_kafka_offset"].as_i64().unwrap();
        let (op, (cid, name, cents, born, created, updated)) = &expected[&offset];
        let credit = format!(
            "{}{}.{:02}",
            if *cents < 0 { "-" } else { "" },
            cents.abs() / 100,
            cents.abs() % 100
        );
        assert_eq!(r["_op"], *op, "offset {offset}");
        assert_eq!(r["_deleted"], *op == "d");
        assert_eq!(r["id"], *cid);
        assert_eq!(r["name"], name.as_str());
        assert_eq!(r["credit"], credit.as_str());
        assert_eq!(r["born"], serde_json::json!(born));
        assert_eq!(r["created"], *created);
        assert_eq!(r["updated"], *updated);
        assert_eq!(r["_source_file"], "mysql-bin.000004");
    }
}

/// Heartbeats, schema-change events, logical-decoding messages and truncates are not row
/// changes: in the table topic they must never stop a sink. An upsert table applies the
/// truncate; an append table skips it; both skip and count the rest.
#[tokio::test]
async fn records_that_are_not_row_changes_never_stop_a_sink() {
    let topic = unique("dbserver1.inventory.customers-misc");
    create_topic(&topic, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let source = |pos: i64| {
        serde_json::json!({"connector": "mysql", "ts_ms": 1_790_000_000_000i64 + pos,
                           "db": "inventory", "table": "customers", "file": "mysql-bin.000004",
                           "pos": pos * 10})
    };
    let image = |id: i64, v: i64| serde_json::json!({"id": id, "name": format!("c{id}v{v}")});
    let change = |op: &str, id: i64, v: i64, pos: i64| {
        serde_json::json!({"before": null, "after": image(id, v), "source": source(pos),
                           "op": op, "ts_ms": 1_790_000_000_500i64 + pos})
    };
    let mut values: Vec<(Option<String>, serde_json::Value)> = Vec::new();
    for id in 1..=10 {
        values.push((Some(id.to_string()), change("c", id, 0, id)));
    }
    // A heartbeat, a schema-change event, a logical-decoding message, then a truncate.
    values.push((None, serde_json::json!({"ts_ms": 1_790_000_001_000i64})));
    values.push((
        None,
        serde_json::json!({"source": source(11), "databaseName": "inventory",
                           "ddl": "ALTER TABLE customers ADD COLUMN x INT", "tableChanges": []}),
    ));
    values.push((
        None,
        serde_json::json!({"op": "m", "ts_ms": 1_790_000_001_200i64, "source": source(12),
                           "message": {"prefix": "audit", "content": "aGVsbG8="}}),
    ));
    values.push((
        None,
        serde_json::json!({"before": null, "after": null, "source": source(13), "op": "t",
                           "ts_ms": 1_790_000_001_300i64}),
    ));
    for id in 20..=25 {
        values.push((Some(id.to_string()), change("c", id, 0, id)));
    }
    values.push((Some("21".into()), change("u", 21, 1, 30)));
    for (key, value) in &values {
        let payload = value.to_string();
        let mut rec = FutureRecord::<String, String>::to(&topic)
            .partition(0)
            .payload(&payload);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        producer
            .send(rec, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }

    let upserts = Store::local("customers");
    let appends = Store::local("changelog");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let common = r#"format = "debezium-json"
schema = { id = "long", name = "string" }
flush = { max_rows = 1000, max_latency = "1s" }"#;
    let cfg = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership} }}

[http]
listen = "127.0.0.1:{port}"

[[sink]]
name = "upserts"
topics = ["{topic}"]
kind = "delta"
table = "{upserts}"
mode = "upsert"
key = ["id"]
{common}

[[sink]]
name = "changelog"
topics = ["{topic}"]
table = "{appends}"
{common}
"#,
        kafka = kafka(),
        group = unique("g"),
        membership = group_properties(),
        upserts = upserts.url,
        appends = appends.url,
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    // Every change but the truncate is a row of the changelog.
    wait_rows(&appends, &topic, 17, &mut proc_, Duration::from_secs(120)).await;
    let metrics = || async {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let start = std::time::Instant::now();
    let ids = loop {
        let t = upserts.read_delta(&[]);
        let mut ids: Vec<(i64, String)> = t["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["id"].as_i64().unwrap(),
                    r["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        ids.sort();
        if ids.len() == 6 || start.elapsed() > Duration::from_secs(60) {
            break ids;
        }
        if let Some(s) = proc_.child.try_wait().unwrap() {
            panic!("lakesink exited ({s}):\n{}", proc_.log());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let want: Vec<(i64, String)> = (20..=25)
        .map(|id| (id, format!("c{id}v{}", i64::from(id == 21))))
        .collect();
    assert_eq!(ids, want, "the truncate emptied the table before 20..25");
    let text = metrics().await;
    for (sink, reason, n) in [
        ("upserts", "not-a-row-change", 3),
        ("changelog", "not-a-row-change", 3),
        ("changelog", "truncate", 1),
    ] {
        let line = format!("lakesink_skipped_total{{sink=\"{sink}\",reason=\"{reason}\"}} {n}");
        assert!(text.contains(&line), "no `{line}` in\n{text}");
    }
    let changelog = appends.read();
    let rows = changelog["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 17);
    assert!(
        rows.iter().all(|r| !r["id"].is_null()),
        "no all-null rows: {rows:?}"
    );
    let log = proc_.stop();
    assert!(
        !log.lines().any(|l| l.contains("ERROR lakesink")),
        "the sinks never failed:\n{log}"
    );
}
