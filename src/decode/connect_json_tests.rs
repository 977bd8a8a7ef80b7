//! Records captured from Debezium 3.6.1 (PostgreSQL connector, JsonConverter with schemas) on
//! a table with every common column type; then an `ALTER TABLE ADD COLUMN`, a `TRUNCATE` and a
//! logical decoding message.

use super::*;
use crate::decode::connect_schema::decimal_text;
use arrow::array::AsArray;
use arrow::datatypes::{Date32Type, Decimal128Type, Time64MicrosecondType};

const CAPTURED: &str = include_str!("testdata/debezium-postgres-connect.jsonl");

fn records() -> Vec<Record> {
    CAPTURED
        .lines()
        .enumerate()
        .map(|(i, l)| record(i as i64, l.as_bytes()))
        .collect()
}

fn record(offset: i64, payload: &[u8]) -> Record {
    Record {
        offset,
        timestamp_ms: None,
        key: None,
        payload: Some(bytes::Bytes::copy_from_slice(payload)),
        headers: Vec::new(),
    }
}

fn decoder() -> ConnectJsonDecoder {
    let meta = MetadataConfig {
        topic: false,
        partition: false,
        offset: true,
        timestamp: false,
        key: false,
    };
    ConnectJsonDecoder::new(TopicPartition::new("pg.shop.t", 0), meta, 100)
}

fn decode(d: &mut ConnectJsonDecoder, recs: Vec<Record>) -> (Vec<RecordBatch>, Vec<Rejected>) {
    let (mut out, mut rejected) = (Vec::new(), Vec::new());
    for r in recs {
        d.prepare(&r).unwrap();
        if let Err(r) = d.push(r, &mut out, &mut rejected) {
            rejected.push(*r);
        }
    }
    d.finish(&mut out, &mut rejected).unwrap();
    (out, rejected)
}

#[test]
fn debezium_postgres_types_become_arrow_types() {
    let mut d = decoder();
    let (out, rejected) = decode(&mut d, records()[..2].to_vec());
    assert!(rejected.is_empty(), "{:?}", rejected[0].error);
    assert_eq!(out.len(), 1);
    let after = out[0].column_by_name("after").unwrap().as_struct();
    let col = |n: &str| after.column_by_name(n).unwrap();
    let types: Vec<String> = after
        .fields()
        .iter()
        .map(|f| format!("{}:{}", f.name(), f.data_type()))
        .collect();
    assert_eq!(
        types[..11],
        [
            "id:Int64",
            "price:Decimal128(12, 2)",
            "d:Date32",
            "tm:Time64(µs)",
            "ts:Timestamp(µs)",
            "tz:Timestamp(µs, \"+00:00\")",
            "u:Utf8",
            "j:Utf8",
            "tags:List(Utf8)",
            "b:Binary",
            "ok:Boolean",
        ]
        .map(String::from),
        "{types:?}"
    );
    assert_eq!(col("price").as_primitive::<Decimal128Type>().value(0), 1234);
    assert_eq!(col("d").as_primitive::<Date32Type>().value(0), 19782); // 2024-02-29
    assert_eq!(
        col("tm").as_primitive::<Time64MicrosecondType>().value(0),
        49_501_123_456 // 13:45:01.123456
    );
    assert_eq!(
        col("b").as_binary::<i32>().value(0),
        [0xde, 0xad, 0xbe, 0xef]
    );
    let tags = col("tags").as_list::<i32>().value(0);
    assert_eq!(
        tags.as_string::<i32>().iter().collect::<Vec<_>>(),
        [Some("x"), Some("y")]
    );
    assert_eq!(
        out[0]
            .column_by_name("op")
            .unwrap()
            .as_string::<i32>()
            .value(1),
        "u"
    );
    assert!(out[0].column_by_name("_kafka_offset").is_some());
}

#[test]
fn an_added_column_is_a_new_table_schema_and_commits_what_precedes_it() {
    let mut d = decoder();
    let recs = records();
    let (mut out, mut rejected) = (Vec::new(), Vec::new());
    assert!(
        !d.prepare(&recs[0]).unwrap(),
        "the first schema is no change"
    );
    d.push(recs[0].clone(), &mut out, &mut rejected).unwrap();
    assert!(!d.prepare(&recs[1]).unwrap(), "same schema text");
    d.push(recs[1].clone(), &mut out, &mut rejected).unwrap();
    assert!(out.is_empty(), "a batch is emitted when full or finished");
    assert!(
        d.prepare(&recs[2]).unwrap(),
        "ALTER TABLE ADD COLUMN changes the table"
    );
    d.push(recs[2].clone(), &mut out, &mut rejected).unwrap();
    d.finish(&mut out, &mut rejected).unwrap();
    assert_eq!(out.len(), 2, "one batch per schema");
    assert_eq!(out[0].num_rows(), 2);
    let after = out[1].column_by_name("after").unwrap().as_struct();
    assert!(after.column_by_name("note").is_some());
}

#[test]
fn a_bad_value_is_rejected_alone_and_a_plain_object_is_named() {
    let recs = records();
    let text = std::str::from_utf8(recs[0].payload.as_deref().unwrap()).unwrap();
    let bad = text.replacen("\"b\":\"3q2+7w==\"", "\"b\":\"not base64!\"", 1);
    assert_ne!(bad, text);
    let mut d = decoder();
    let (out, rejected) = decode(
        &mut d,
        vec![
            recs[0].clone(),
            record(1, bad.as_bytes()),
            record(2, br#"{"id": 1}"#),
            record(3, text.as_bytes()),
        ],
    );
    let offsets: Vec<i64> = rejected.iter().map(|r| r.error.offset).collect();
    assert_eq!(offsets, [2, 1], "{rejected:?}");
    assert!(rejected[1]
        .error
        .reason
        .contains("field `after.b`: not base64"));
    assert!(rejected[0].error.reason.contains("schemas.enable=true"));
    let rows: usize = out.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 2);
}

#[test]
fn the_schema_span_skips_braces_in_strings() {
    let p = br#"{"schema":{"doc":"a } or { \" ,"},"payload":{}}"#;
    let span = schema_span(p).unwrap();
    assert_eq!(&p[span], br#"{"doc":"a } or { \" ,"}"#);
    assert_eq!(schema_span(br#"{"payload":{}}"#), None);
}

#[test]
fn variable_scale_decimals_print_exactly() {
    assert_eq!(decimal_text(12345, 2), "123.45");
    assert_eq!(decimal_text(-5, 3), "-0.005");
    assert_eq!(decimal_text(7, 0), "7");
    assert_eq!(decimal_text(7, -2), "700");
}
