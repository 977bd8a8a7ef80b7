//! The Protobuf decoder against the in-process registry server: every mapped type, interleaved
//! schema versions in one batch, poison records, and rejected incompatible writers.

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use prost::Message as _;
use prost_reflect::{DynamicMessage, MapKey, MessageDescriptor, Value};
use schema_registry::protobuf::compile;
use schema_registry::references::Reference;
use schema_registry::{wire, RegistryClient, RegistryConfig, SchemaId};
use sinks::TopicPartition;

use super::ProtobufDecoder;
use crate::config::MetadataConfig;
use crate::decode::Record;

const COMMON: &str = include_str!("../../../tests/data/protobuf/common.proto");

const V1: &str = include_str!("../../../tests/data/protobuf/orders.proto");

/// V1 plus a field: a compatible newer version.
fn v2() -> String {
    V1.replace(
        "optional string note = 28;",
        "optional string note = 28;\n  string channel = 29;",
    )
}

async fn setup() -> (RegistryClient, tokio::task::JoinHandle<std::io::Result<()>>) {
    let (addr, task) = schema_registry::server::spawn("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let client = RegistryClient::new(RegistryConfig::new(format!("http://{addr}"))).unwrap();
    client
        .register_protobuf("shop/common.proto", COMMON, &[])
        .await
        .unwrap();
    (client, task)
}

fn refs() -> Vec<Reference> {
    vec![Reference {
        name: "shop/common.proto".into(),
        subject: "shop/common.proto".into(),
        version: 1,
    }]
}

fn order(schema: &str) -> MessageDescriptor {
    let c = compile(schema, &[("shop/common.proto".into(), COMMON.into())]).unwrap();
    c.pool.get_message_by_name("shop.Order").unwrap()
}

fn frame(id: SchemaId, path: &[i32], m: &DynamicMessage) -> Vec<u8> {
    let mut body = wire::message_indexes(path);
    body.extend(m.encode_to_vec());
    wire::frame(id, &body)
}

fn rec(offset: i64, payload: Vec<u8>) -> Record {
    Record {
        offset,
        timestamp_ms: Some(1_700_000_000_000),
        key: None,
        payload: Some(payload.into()),
        headers: vec![],
    }
}

fn full(d: &MessageDescriptor, id: i64) -> DynamicMessage {
    let mut m = DynamicMessage::new(d.clone());
    let set = |m: &mut DynamicMessage, k: &str, v: Value| m.set_field_by_name(k, v);
    set(&mut m, "id", Value::I64(id));
    set(&mut m, "qty", Value::I32(-3));
    set(&mut m, "u32", Value::U32(u32::MAX));
    set(&mut m, "u64", Value::U64(u64::MAX));
    set(&mut m, "s32", Value::I32(-5));
    set(&mut m, "s64", Value::I64(-6));
    set(&mut m, "f32", Value::U32(7));
    set(&mut m, "f64", Value::U64(8));
    set(&mut m, "sf32", Value::I32(-9));
    set(&mut m, "sf64", Value::I64(-10));
    set(&mut m, "ratio", Value::F32(0.5));
    set(&mut m, "price", Value::F64(12.25));
    set(&mut m, "paid", Value::Bool(true));
    set(&mut m, "customer", Value::String("ada".into()));
    set(&mut m, "blob", Value::Bytes(vec![1u8, 2].into()));
    set(&mut m, "status", Value::EnumNumber(2));
    let total_d = d.get_field_by_name("total").unwrap().kind();
    let mut total = DynamicMessage::new(total_d.as_message().unwrap().clone());
    total.set_field_by_name("units", Value::I64(42));
    total.set_field_by_name("currency", Value::String("EUR".into()));
    set(&mut m, "total", Value::Message(total));
    set(
        &mut m,
        "tags",
        Value::List(vec![Value::String("a".into()), Value::String("b".into())]),
    );
    set(
        &mut m,
        "counts",
        Value::List(vec![Value::I32(1), Value::I32(-2), Value::I32(3)]),
    );
    let line_d = d.get_field_by_name("lines").unwrap().kind();
    let mut line = DynamicMessage::new(line_d.as_message().unwrap().clone());
    line.set_field_by_name("sku", Value::String("x1".into()));
    line.set_field_by_name("n", Value::I32(2));
    set(&mut m, "lines", Value::List(vec![Value::Message(line)]));
    set(
        &mut m,
        "attrs",
        Value::Map(
            [(MapKey::String("k".into()), Value::I64(1))]
                .into_iter()
                .collect(),
        ),
    );
    set(&mut m, "voucher", Value::I64(77));
    let ts_d = d.get_field_by_name("placed").unwrap().kind();
    let mut ts = DynamicMessage::new(ts_d.as_message().unwrap().clone());
    ts.set_field_by_name("seconds", Value::I64(1_700_000_000));
    ts.set_field_by_name("nanos", Value::I32(123_456_000));
    set(&mut m, "placed", Value::Message(ts));
    let dur_d = d.get_field_by_name("wait").unwrap().kind();
    let mut dur = DynamicMessage::new(dur_d.as_message().unwrap().clone());
    dur.set_field_by_name("seconds", Value::I64(3));
    dur.set_field_by_name("nanos", Value::I32(500_000_000));
    set(&mut m, "wait", Value::Message(dur));
    let w_d = d.get_field_by_name("maybe").unwrap().kind();
    let mut w = DynamicMessage::new(w_d.as_message().unwrap().clone());
    w.set_field_by_name("value", Value::I64(0));
    set(&mut m, "maybe", Value::Message(w));
    m
}

#[tokio::test]
async fn every_type_maps_to_its_column_and_versions_share_a_batch() {
    let (client, _task) = setup().await;
    let v1 = client
        .register_protobuf("orders-value", V1, &refs())
        .await
        .unwrap();
    let v2_text = v2();
    let v2 = client
        .register_protobuf("orders-value", &v2_text, &refs())
        .await
        .unwrap();
    let (d1, d2) = (order(V1), order(&v2_text));
    let tp = TopicPartition::new("orders", 0);
    let mut dec = ProtobufDecoder::new(tp, client.clone(), MetadataConfig::default(), 100);
    let mut out = Vec::new();
    // The newest version first: it is the reader, and the older one's records read with it.
    let mut newer = full(&d2, 2);
    newer.set_field_by_name("channel", Value::String("web".into()));
    newer.set_field_by_name("card", Value::String("visa".into()));
    let records = [
        rec(0, frame(v2, &[0], &newer)),
        rec(1, frame(v1, &[0], &full(&d1, 1))),
        rec(2, frame(v1, &[0], &DynamicMessage::new(d1.clone()))),
    ];
    for r in &records {
        dec.prepare(r).await.unwrap();
        dec.push(r.clone(), &mut out).await.unwrap();
    }
    dec.finish(&mut out).unwrap();
    assert_eq!(out.len(), 1, "one schema, one batch");
    let b = &out[0];
    assert_eq!(b.num_rows(), 3);
    let col = |n: &str| {
        b.column_by_name(n)
            .unwrap_or_else(|| panic!("column {n}"))
            .clone()
    };
    assert_eq!(col("id").as_primitive::<Int64Type>().values(), &[2, 1, 0]);
    assert_eq!(col("qty").as_primitive::<Int32Type>().value(1), -3);
    assert_eq!(
        col("u32").as_primitive::<Int64Type>().value(1),
        i64::from(u32::MAX)
    );
    assert_eq!(col("u64").data_type(), &DataType::Decimal128(20, 0));
    assert_eq!(
        col("u64")
            .as_primitive::<arrow::datatypes::Decimal128Type>()
            .value(1),
        i128::from(u64::MAX)
    );
    assert_eq!(col("s32").as_primitive::<Int32Type>().value(1), -5);
    assert_eq!(col("s64").as_primitive::<Int64Type>().value(1), -6);
    assert_eq!(col("f32").as_primitive::<Int64Type>().value(1), 7);
    assert_eq!(col("sf32").as_primitive::<Int32Type>().value(1), -9);
    assert_eq!(col("sf64").as_primitive::<Int64Type>().value(1), -10);
    assert_eq!(
        col("price")
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(1),
        12.25
    );
    assert!(col("paid").as_boolean().value(1));
    assert_eq!(col("customer").as_string::<i32>().value(1), "ada");
    assert_eq!(col("status").as_string::<i32>().value(1), "SHIPPED");
    // Absent proto3 scalars read as defaults, absent messages and `optional` fields as null.
    assert_eq!(col("status").as_string::<i32>().value(2), "STATUS_UNKNOWN");
    assert_eq!(col("customer").as_string::<i32>().value(2), "");
    assert!(col("total").is_null(2) && col("note").is_null(2) && col("maybe").is_null(2));
    let total = col("total");
    let total = total.as_struct();
    assert_eq!(total.column(0).as_primitive::<Int64Type>().value(1), 42);
    let tags = col("tags");
    assert_eq!(
        tags.as_list::<i32>().value(1).as_string::<i32>().value(1),
        "b"
    );
    assert_eq!(tags.as_list::<i32>().value(2).len(), 0);
    let counts = col("counts");
    let counts = counts.as_list::<i32>().value(1);
    assert_eq!(
        counts.as_primitive::<Int32Type>().values(),
        &[1, -2, 3],
        "packed"
    );
    let lines = col("lines");
    let line = lines.as_list::<i32>().value(1);
    assert_eq!(line.as_struct().column(0).as_string::<i32>().value(0), "x1");
    let attrs = col("attrs");
    let attrs = attrs.as_map();
    assert_eq!(attrs.value(1).column(0).as_string::<i32>().value(0), "k");
    // The oneof: one struct, only the case set is filled.
    let pay = col("payment");
    let pay = pay.as_struct();
    assert_eq!(
        pay.column_by_name("voucher")
            .unwrap()
            .as_primitive::<Int64Type>()
            .value(1),
        77
    );
    assert!(pay.column_by_name("card").unwrap().is_null(1));
    assert_eq!(
        pay.column_by_name("card")
            .unwrap()
            .as_string::<i32>()
            .value(0),
        "visa"
    );
    assert!(pay.is_null(2));
    let placed = col("placed");
    assert_eq!(
        placed
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
            .value(1),
        1_700_000_000_123_456
    );
    assert_eq!(col("wait").as_primitive::<Int64Type>().value(1), 3_500_000);
    assert_eq!(
        col("maybe").as_primitive::<Int64Type>().value(1),
        0,
        "a set wrapper is not null"
    );
    // The v2 field: filled from v2, default for v1 records.
    assert_eq!(col("channel").as_string::<i32>().value(0), "web");
    assert_eq!(col("channel").as_string::<i32>().value(1), "");
    assert!(b.column_by_name("_kafka_offset").is_some());
}

#[tokio::test]
async fn poison_records_are_rejected_and_the_batch_survives() {
    let (client, _task) = setup().await;
    let v1 = client
        .register_protobuf("orders-value", V1, &refs())
        .await
        .unwrap();
    let avro = client
        .register("other-value", r#"{"type":"record","name":"R","fields":[]}"#)
        .await
        .unwrap();
    let d = order(V1);
    let mut dec = ProtobufDecoder::new(
        TopicPartition::new("orders", 0),
        client,
        MetadataConfig::default(),
        100,
    );
    let mut out = Vec::new();
    dec.push(rec(0, frame(v1, &[0], &full(&d, 1))), &mut out)
        .await
        .unwrap();
    let mut truncated = frame(v1, &[0], &full(&d, 2));
    // A field that claims 16 bytes where one is left (as a record cut short).
    truncated.extend([0x72, 0x10, b'a']);
    let bad_utf8 = {
        let mut body = wire::message_indexes(&[0]);
        body.extend([0x72, 2, 0xff, 0xfe]); // field 14 (customer) = invalid UTF-8
        wire::frame(v1, &body)
    };
    for (offset, payload, class) in [
        (1, truncated, "malformed"),
        (2, bad_utf8, "malformed"),
        (3, b"plain text".to_vec(), "wire-format"),
        (4, frame(v1, &[7], &full(&d, 3)), "wire-format"),
        (5, frame(avro, &[0], &full(&d, 3)), "schema-type"),
        (
            6,
            frame(SchemaId(999), &[0], &full(&d, 3)),
            "unknown-schema",
        ),
    ] {
        let e = dec
            .push(rec(offset, payload), &mut out)
            .await
            .expect_err(&format!("offset {offset} must be rejected"));
        assert_eq!(e.error.class, class, "offset {offset}: {}", e.error.reason);
        assert_eq!(e.record.offset, offset);
    }
    dec.push(rec(7, frame(v1, &[0], &full(&d, 4))), &mut out)
        .await
        .unwrap();
    dec.finish(&mut out).unwrap();
    let ids: Vec<i64> = out
        .iter()
        .flat_map(|b| {
            b.column_by_name("id")
                .unwrap()
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(ids, vec![1, 4]);
}

#[tokio::test]
async fn a_writer_that_reuses_a_field_number_is_rejected_by_name() {
    let (client, _task) = setup().await;
    // The registry itself refuses this version under BACKWARD (checked below); with NONE it
    // lands, and the decoder must refuse its records.
    reqwest::Client::new()
        .put(format!("{}/config/orders-value", client.url()))
        .json(&serde_json::json!({ "compatibility": "NONE" }))
        .send()
        .await
        .unwrap();
    let v1 = client
        .register_protobuf("orders-value", V1, &refs())
        .await
        .unwrap();
    let bad = V1.replace("string customer = 14;", "int64 customer = 14;");
    let v2 = client
        .register_protobuf("orders-value", &bad, &refs())
        .await
        .unwrap();
    let mut dec = ProtobufDecoder::new(
        TopicPartition::new("orders", 0),
        client,
        MetadataConfig::default(),
        100,
    );
    let mut out = Vec::new();
    dec.push(rec(0, frame(v1, &[0], &full(&order(V1), 1))), &mut out)
        .await
        .unwrap();
    let mut m = DynamicMessage::new(order(&bad));
    m.set_field_by_name("customer", Value::I64(5));
    let e = dec
        .push(rec(1, frame(v2, &[0], &m)), &mut out)
        .await
        .unwrap_err();
    assert_eq!(e.error.class, "incompatible-schema");
    assert!(e.error.reason.contains("customer"), "{}", e.error.reason);
}

#[tokio::test]
async fn the_registry_refuses_an_incompatible_protobuf_version() {
    let (client, _task) = setup().await;
    client
        .register_protobuf("orders-value", V1, &refs())
        .await
        .unwrap();
    let bad = V1.replace("string customer = 14;", "double customer = 14;");
    let e = client
        .register_protobuf("orders-value", &bad, &refs())
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("FIELD_SCALAR_KIND_CHANGED") && msg.contains("customer"),
        "{msg}"
    );
    client
        .register_protobuf("orders-value", &v2(), &refs())
        .await
        .expect("adding a field is compatible");
    let e = client
        .register_protobuf("broken-value", "message {", &[])
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("42201") || e.to_string().contains("Invalid schema"),
        "{e}"
    );
}

#[tokio::test]
async fn a_recursive_message_is_refused_at_each_record_without_a_commit_per_record() {
    let (client, _task) = setup().await;
    let tree = r#"syntax = "proto3"; package t; message Node { string name = 1; repeated Node children = 2; }"#;
    let id = client
        .register_protobuf("tree-value", tree, &[])
        .await
        .unwrap();
    let d = compile(tree, &[])
        .unwrap()
        .pool
        .get_message_by_name("t.Node")
        .unwrap();
    let mut m = DynamicMessage::new(d);
    m.set_field_by_name("name", Value::String("root".into()));
    let mut dec = ProtobufDecoder::new(
        TopicPartition::new("tree", 0),
        client,
        MetadataConfig::default(),
        100,
    );
    let mut out = Vec::new();
    for offset in 0..3 {
        let r = rec(offset, frame(id, &[0], &m));
        assert!(
            !dec.prepare(&r).await.unwrap(),
            "no new reader: nothing to commit first"
        );
        let e = dec.push(r, &mut out).await.unwrap_err();
        assert_eq!(e.error.class, "schema-type", "offset {offset}");
        assert!(
            e.error.reason.contains("t.Node -> t.Node"),
            "{}",
            e.error.reason
        );
    }
    dec.finish(&mut out).unwrap();
    assert!(out.is_empty());
}
