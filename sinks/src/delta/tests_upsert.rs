//! Upsert semantics beyond keys and deletes, on real Delta tables in a temporary directory:
//! a source TRUNCATE, and values a change did not carry (PostgreSQL TOAST under Debezium).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema};

use super::tests::{commit, flush, position, query, sink};
use super::tests_rewrite::{inserts, upsert_config};
use super::*;

#[tokio::test]
async fn a_truncate_empties_the_table_in_the_commit_that_applies_what_follows_it() {
    for partition_by in [vec![], vec![PartitionSpec::parse("id").unwrap()]] {
        let dir = tempfile::tempdir().unwrap();
        let s = sink(
            dir.path(),
            DeltaSinkConfig {
                partition_by,
                ..upsert_config()
            },
        );
        commit(&s, flush(0, 0, 3, vec![inserts(0..3)])).await;
        commit(&s, flush(1, 0, 2, vec![inserts(10..12)])).await;
        let mut truncate = flush(0, 3, 6, vec![inserts(20..22)]);
        truncate.truncate = true;
        assert!(matches!(
            commit(&s, truncate).await,
            CommitOutcome::Committed { .. }
        ));
        let ids = || async {
            let out = query(dir.path(), "SELECT id FROM t ORDER BY id").await;
            out.iter()
                .flat_map(|b| {
                    let c = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                    c.values().to_vec()
                })
                .collect::<Vec<i64>>()
        };
        assert_eq!(ids().await, [20, 21], "every partition's rows went");
        assert_eq!(position(dir.path(), 0).await, Some(Offset(6)));
        // A truncate with nothing after it in its flush.
        let mut empty = flush(0, 6, 7, vec![inserts(0..0)]);
        empty.truncate = true;
        commit(&s, empty).await;
        assert_eq!(ids().await, Vec::<i64>::new());
        assert_eq!(position(dir.path(), 0).await, Some(Offset(7)));
    }
}

/// Changes `(id, name, bio, unchanged columns)`.
fn changes(rows: &[(i64, &str, Option<&str>, &[&str])]) -> RecordBatch {
    let mut unchanged = ListBuilder::new(StringBuilder::new());
    for (_, _, _, cols) in rows {
        if cols.is_empty() {
            unchanged.append_null();
        } else {
            for c in *cols {
                unchanged.values().append_value(c);
            }
            unchanged.append(true);
        }
    }
    let unchanged = unchanged.finish();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("bio", DataType::Utf8, true),
            Field::new("_deleted", DataType::Boolean, true),
            Field::new("_unchanged", unchanged.data_type().clone(), true),
        ])),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))),
            Arc::new(BooleanArray::from(vec![false; rows.len()])),
            Arc::new(unchanged) as ArrayRef,
        ],
    )
    .unwrap()
}

#[tokio::test]
async fn a_value_the_change_did_not_carry_keeps_what_the_key_had() {
    for partition_by in [vec![], vec![PartitionSpec::parse("id").unwrap()]] {
        let dir = tempfile::tempdir().unwrap();
        let s = sink(
            dir.path(),
            DeltaSinkConfig {
                partition_by,
                ..upsert_config()
            },
        );
        let none: &[&str] = &[];
        let bio: &[&str] = &["bio"];
        commit(
            &s,
            flush(
                0,
                0,
                2,
                vec![changes(&[
                    (1, "a", Some("long 1"), none),
                    (2, "b", Some("long 2"), none),
                ])],
            ),
        )
        .await;
        commit(
            &s,
            flush(
                0,
                2,
                6,
                vec![
                    // An update of a stored key; a new key updated in the same flush; an update
                    // of a key the table never had.
                    changes(&[(1, "a2", None, bio), (3, "c", Some("long 3"), none)]),
                    changes(&[(3, "c2", None, bio), (9, "z", None, bio)]),
                ],
            ),
        )
        .await;
        let out = query(dir.path(), "SELECT * FROM t ORDER BY id").await;
        let mut rows = Vec::new();
        for b in &out {
            assert!(b.column_by_name("_unchanged").is_none(), "never stored");
            let id = b
                .column_by_name("id")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            let name = b.column_by_name("name").unwrap();
            let name = arrow::compute::cast(name, &DataType::Utf8).unwrap();
            let bio = b.column_by_name("bio").unwrap();
            let bio = arrow::compute::cast(bio, &DataType::Utf8).unwrap();
            for i in 0..b.num_rows() {
                let text = |a: &ArrayRef| {
                    a.is_valid(i)
                        .then(|| a.as_string::<i32>().value(i).to_string())
                };
                rows.push((id.value(i), text(&name), text(&bio)));
            }
        }
        let row =
            |id, name: &str, bio: Option<&str>| (id, Some(name.to_string()), bio.map(String::from));
        assert_eq!(
            rows,
            [
                row(1, "a2", Some("long 1")),
                row(2, "b", Some("long 2")),
                row(3, "c2", Some("long 3")),
                row(9, "z", None),
            ]
        );
    }
}

/// `inserts(ids)` with the message key as a `_key` struct beside the row; with no ids and
/// `known_key = false`, a `_key` of no fields: what a worker whose first record is a keyless
/// source TRUNCATE decodes (no key of the topic seen yet).
fn keyed(ids: std::ops::Range<i64>, known_key: bool) -> RecordBatch {
    let rows = inserts(ids.clone());
    let key: ArrayRef = if known_key {
        Arc::new(arrow::array::StructArray::from(vec![(
            Arc::new(Field::new("id", DataType::Int64, false)),
            Arc::new(Int64Array::from_iter_values(ids)) as ArrayRef,
        )]))
    } else {
        Arc::new(arrow::array::StructArray::new_empty_fields(0, None))
    };
    let mut fields: Vec<Field> = rows
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("_key", key.data_type().clone(), true));
    let mut columns = rows.columns().to_vec();
    columns.push(key);
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
}

#[tokio::test]
async fn a_truncate_before_any_key_was_seen_empties_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = upsert_config();
    let upsert = config.upsert.as_mut().unwrap();
    upsert.keys = vec![];
    upsert.keys_from = Some("_key".into());
    let s = sink(dir.path(), config.clone());
    commit(&s, flush(0, 0, 3, vec![keyed(0..3, true)])).await;
    // A restarted worker whose first record is a TRUNCATE: no key decoded yet.
    let restarted = sink(dir.path(), config);
    let mut truncate = flush(0, 3, 4, vec![keyed(0..0, false)]);
    truncate.truncate = true;
    assert!(matches!(
        commit(&restarted, truncate).await,
        CommitOutcome::Committed { .. }
    ));
    let out = query(dir.path(), "SELECT id FROM t").await;
    assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    assert_eq!(position(dir.path(), 0).await, Some(Offset(4)));
    // Keys are taken from the message again after it.
    commit(&restarted, flush(0, 4, 6, vec![keyed(5..7, true)])).await;
    commit(&restarted, flush(0, 6, 7, vec![keyed(5..6, true)])).await;
    let out = query(dir.path(), "SELECT id FROM t").await;
    assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
}
