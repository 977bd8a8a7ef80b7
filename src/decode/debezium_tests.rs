//! Debezium unwrap, row-change filtering and unavailable-value marking on envelopes decoded
//! by arrow-json, and semantic types read from Avro envelope schemas.

use super::*;

#[test]
fn finds_semantic_types_in_nullable_branches() {
    let schema = r#"{"type":"record","name":"Envelope","fields":[
      {"name":"before","type":["null",{"type":"record","name":"Value","fields":[
        {"name":"id","type":"int"},
        {"name":"born","type":["null",{"type":"int","connect.name":"io.debezium.time.Date"}]},
        {"name":"price","type":{"type":"bytes","connect.name":"org.apache.kafka.connect.data.Decimal","connect.parameters":{"scale":"2","connect.decimal.precision":"10"}}},
        {"name":"at","type":{"type":"string","connect.name":"io.debezium.time.ZonedTimestamp"}}
      ]}],"default":null},
      {"name":"after","type":["null","Value"],"default":null},
      {"name":"op","type":"string"}]}"#;
    let s = semantic_types(schema);
    assert_eq!(s.get("born"), Some(&Semantic::Date));
    assert_eq!(
        s.get("price"),
        Some(&Semantic::Decimal {
            precision: 10,
            scale: 2
        })
    );
    assert_eq!(s.get("at"), Some(&Semantic::Zoned));
    assert_eq!(s.get("id"), None);
}

/// Unwraps envelopes decoded by arrow-json, as the JSON Debezium format does.
fn unwrap_json(lines: &[&str]) -> RecordBatch {
    unwrap(&unwrap_json_raw(lines), &HashMap::new()).unwrap()
}

/// Envelopes decoded by arrow-json.
fn unwrap_json_raw(lines: &[&str]) -> RecordBatch {
    let row = DataType::Struct(
        vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]
        .into(),
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("before", row.clone(), true),
        Field::new("after", row, true),
        Field::new("op", DataType::Utf8, true),
    ]));
    let mut d = arrow_json::ReaderBuilder::new(schema)
        .build_decoder()
        .unwrap();
    for l in lines {
        d.decode(l.as_bytes()).unwrap();
    }
    d.flush().unwrap().unwrap()
}

fn rows(b: &RecordBatch) -> Vec<(Option<i64>, Option<String>, bool)> {
    let id = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
    let name = b.column_by_name("name").unwrap().as_string::<i32>();
    let deleted = b.column_by_name("_deleted").unwrap().as_boolean();
    (0..b.num_rows())
        .map(|i| {
            (
                id.is_valid(i).then(|| id.value(i)),
                name.is_valid(i).then(|| name.value(i).to_string()),
                deleted.value(i),
            )
        })
        .collect()
}

#[test]
fn deletes_take_the_before_image_in_mixed_and_uniform_batches() {
    let create = r#"{"before":null,"after":{"id":1,"name":"a"},"op":"c"}"#;
    let update = r#"{"before":{"id":2,"name":"b"},"after":{"id":2,"name":"b2"},"op":"u"}"#;
    let delete = r#"{"before":{"id":3,"name":"c"},"after":null,"op":"d"}"#;
    let row = |id, name: &str, deleted| (Some(id), Some(name.to_string()), deleted);
    assert_eq!(
        rows(&unwrap_json(&[create, update])),
        vec![row(1, "a", false), row(2, "b2", false)],
        "no deletes: the after images"
    );
    assert_eq!(
        rows(&unwrap_json(&[create, delete, update])),
        vec![row(1, "a", false), row(3, "c", true), row(2, "b2", false)],
        "mixed"
    );
    assert_eq!(
        rows(&unwrap_json(&[delete, delete])),
        vec![row(3, "c", true), row(3, "c", true)],
        "deletes only: the before images"
    );
}

#[test]
fn records_that_are_not_row_changes_are_counted_out() {
    let envelope = unwrap_json_raw(&[
        r#"{"before":null,"after":{"id":1,"name":"a"},"op":"c"}"#,
        r#"{"op":"m"}"#,
        r#"{"before":null,"after":null,"op":"t"}"#,
        r#"{}"#,
    ]);
    let (rows, skipped) = row_changes(envelope).unwrap();
    assert_eq!(skipped, 2, "the message and the heartbeat");
    let rows = unwrap(&rows.unwrap(), &HashMap::new()).unwrap();
    let ops = rows.column_by_name("_op").unwrap().as_string::<i32>();
    assert_eq!(ops.iter().collect::<Vec<_>>(), [Some("c"), Some("t")]);
    // A batch of heartbeats only (no `op` field at all).
    let schema = Arc::new(Schema::new(vec![Field::new(
        "ts_ms",
        DataType::Int64,
        true,
    )]));
    let heartbeats = RecordBatch::try_new(
        schema,
        vec![Arc::new(arrow::array::Int64Array::from(vec![1, 2]))],
    )
    .unwrap();
    let (rows, skipped) = row_changes(heartbeats).unwrap();
    assert!(rows.is_none());
    assert_eq!(skipped, 2);
}

#[test]
fn unavailable_values_are_nulled_and_named() {
    let rows = unwrap(
        &unwrap_json_raw(&[
            r#"{"before":null,"after":{"id":1,"name":"__debezium_unavailable_value"},"op":"u"}"#,
            r#"{"before":null,"after":{"id":2,"name":"b"},"op":"u"}"#,
        ]),
        &HashMap::new(),
    )
    .unwrap();
    let marked = mark_unavailable(rows).unwrap();
    let name = marked.column_by_name("name").unwrap();
    assert!(name.is_null(0) && name.is_valid(1));
    let unchanged = marked
        .column_by_name(UNCHANGED_COLUMN)
        .unwrap()
        .as_list::<i32>();
    assert_eq!(
        unchanged
            .value(0)
            .as_string::<i32>()
            .iter()
            .collect::<Vec<_>>(),
        [Some("name")]
    );
    assert!(unchanged.is_null(1));
}
