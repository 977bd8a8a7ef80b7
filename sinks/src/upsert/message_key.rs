//! Upsert keys taken from the message key. When a sink names no key columns, a flush's key
//! columns are the fields of its decoded message-key column (`_key`: Debezium's key struct, an
//! Avro or Kafka Connect JSON key), found per flush, so one sink upserts many tables whose keys
//! differ (a whole database) without naming any of them.
//!
//! Invariants:
//! - Every batch of a flush has the same key fields (a flush is of one schema); a flush whose
//!   batches disagree fails, naming both.
//! - A key field the row also carries as a column (Debezium's row images always carry the
//!   primary key) is that column; a field the row lacks is added to it from the key.
//! - A record without a message key cannot be applied: the flush fails, naming the partition
//!   and the fix (the pipeline rejects such records before they reach a flush).
//! - The message-key struct is never stored; a key that is not a struct (a string key) is
//!   itself the key column.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};

use super::UpsertConfig;
use crate::{Error, Result, TopicPartition};

/// The keys `batches` are applied with, and the batches as they are stored: without
/// `config.keys_from`, `config` and `batches` as they are; with it, the fields of the message-key
/// column (or `config.keys` when it names them: one table's override), the struct dropped.
pub fn resolve(
    config: &UpsertConfig,
    batches: Vec<RecordBatch>,
    tp: &TopicPartition,
) -> Result<(UpsertConfig, Vec<RecordBatch>)> {
    let Some(from) = config.keys_from.as_deref() else {
        return Ok((config.clone(), batches));
    };
    let bad = |reason: String| Error::Upsert {
        tp: tp.clone(),
        reason,
    };
    let mut keys: Option<Vec<String>> = None;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        if !config.keys.is_empty() || b.num_rows() == 0 {
            // No row to key (what a source TRUNCATE leaves): its key, perhaps one of no
            // fields decoded before any key was seen, names no key column.
            out.push(without(b, from)?);
            continue;
        }
        let (names, b) = one(b, from).map_err(|r| {
            bad(format!(
                "{r}; name the key columns with `key = [..]` (or `[sink.tables.\"{}\"]` `key`)",
                tp.topic
            ))
        })?;
        match &keys {
            Some(k) if *k != names => {
                return Err(bad(format!(
                    "the message key changed its fields within one flush ({} then {})",
                    k.join(", "),
                    names.join(", ")
                )))
            }
            Some(_) => {}
            None => keys = Some(names),
        }
        out.push(b);
    }
    // Named keys (one table's override) win over the message key.
    let resolved = UpsertConfig {
        keys: match config.keys.is_empty() {
            true => keys.unwrap_or_default(),
            false => config.keys.clone(),
        },
        keys_from: None,
        ..config.clone()
    };
    Ok((resolved, out))
}

/// `batch` without the message-key struct (a plain key stays: it is a column like any other).
fn without(batch: RecordBatch, from: &str) -> Result<RecordBatch> {
    match batch.schema().index_of(from) {
        Ok(at) if matches!(batch.column(at).data_type(), DataType::Struct(_)) => {
            let mut batch = batch;
            batch.remove_column(at);
            Ok(batch)
        }
        _ => Ok(batch),
    }
}

/// One batch's key names, and the batch with the key's fields as columns and without the
/// message-key struct.
fn one(batch: RecordBatch, from: &str) -> std::result::Result<(Vec<String>, RecordBatch), String> {
    let schema = batch.schema();
    let Ok(at) = schema.index_of(from) else {
        return Err(format!(
            "the records carry no decoded message key (no `{from}` column)"
        ));
    };
    let key = batch.column(at);
    if key.null_count() > 0 {
        return Err(format!(
            "{} record(s) without a message key: an upsert without `key` takes its key columns \
             from the message key",
            key.null_count()
        ));
    }
    let DataType::Struct(fields) = key.data_type() else {
        // A plain key (a string): it is the key column.
        return Ok((vec![from.to_string()], batch));
    };
    if fields.is_empty() {
        return Err("the message key has no fields".into());
    }
    let key = key.as_struct();
    let mut out_fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
    let mut columns = batch.columns().to_vec();
    out_fields.remove(at);
    columns.remove(at);
    let mut names = Vec::with_capacity(fields.len());
    for (i, f) in fields.iter().enumerate() {
        if schema.index_of(f.name()).is_err() {
            out_fields.push(Arc::new(f.as_ref().clone().with_nullable(true)));
            columns.push(key.column(i).clone());
        }
        names.push(f.name().clone());
    }
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(
            out_fields,
            schema.metadata().clone(),
        )),
        columns,
    )
    .map_err(|e| e.to_string())?;
    Ok((names, batch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, StringArray, StructArray};

    fn config() -> UpsertConfig {
        UpsertConfig {
            keys: Vec::new(),
            keys_from: Some("_key".into()),
            delete_column: Some("_deleted".into()),
            unchanged_column: None,
        }
    }

    fn key(fields: Vec<(&str, ArrayRef)>) -> ArrayRef {
        Arc::new(StructArray::from(
            fields
                .into_iter()
                .map(|(n, a)| (Arc::new(Field::new(n, a.data_type().clone(), false)), a))
                .collect::<Vec<_>>(),
        ))
    }

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns).unwrap()
    }

    fn tp() -> TopicPartition {
        TopicPartition::new("pg.shop.order_lines", 2)
    }

    #[test]
    fn a_composite_key_names_the_row_columns_and_is_not_stored() {
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 1]));
        let lines: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        let b = batch(vec![
            ("order_id", ids.clone()),
            ("line_no", lines.clone()),
            ("qty", Arc::new(Int64Array::from(vec![5, 6])) as ArrayRef),
            ("_key", key(vec![("order_id", ids), ("line_no", lines)])),
        ]);
        let (c, out) = resolve(&config(), vec![b], &tp()).unwrap();
        assert_eq!(c.keys, vec!["order_id", "line_no"]);
        assert_eq!(c.keys_from, None);
        assert_eq!(c.delete_column.as_deref(), Some("_deleted"));
        let names: Vec<_> = out[0]
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, vec!["order_id", "line_no", "qty"]);
    }

    #[test]
    fn a_key_field_the_row_lacks_is_added_from_the_key() {
        let b = batch(vec![
            ("qty", Arc::new(Int64Array::from(vec![5])) as ArrayRef),
            (
                "_key",
                key(vec![("sku", Arc::new(StringArray::from(vec!["a-1"])))]),
            ),
        ]);
        let (c, out) = resolve(&config(), vec![b], &tp()).unwrap();
        assert_eq!(c.keys, vec!["sku"]);
        assert_eq!(
            out[0]
                .column_by_name("sku")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "a-1"
        );
        assert!(out[0].column_by_name("_key").is_none());
    }

    #[test]
    fn a_string_key_is_the_key_column() {
        let b = batch(vec![
            ("qty", Arc::new(Int64Array::from(vec![5])) as ArrayRef),
            ("_key", Arc::new(StringArray::from(vec!["k"])) as ArrayRef),
        ]);
        let (c, out) = resolve(&config(), vec![b.clone()], &tp()).unwrap();
        assert_eq!(c.keys, vec!["_key"]);
        assert_eq!(out[0], b);
    }

    #[test]
    fn missing_keys_and_changed_key_fields_fail_naming_the_topic() {
        let no_key = batch(vec![
            ("qty", Arc::new(Int64Array::from(vec![5])) as ArrayRef),
            (
                "_key",
                Arc::new(StringArray::from(vec![None::<&str>])) as ArrayRef,
            ),
        ]);
        let err = resolve(&config(), vec![no_key], &tp())
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 record(s) without a message key"), "{err}");
        assert!(err.contains("pg.shop.order_lines"), "{err}");
        assert!(err.contains("key = [..]"), "{err}");

        let a = batch(vec![(
            "_key",
            key(vec![("a", Arc::new(Int64Array::from(vec![1])))]),
        )]);
        let b = batch(vec![(
            "_key",
            key(vec![("b", Arc::new(Int64Array::from(vec![1])))]),
        )]);
        let err = resolve(&config(), vec![a, b], &tp())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("changed its fields within one flush (a then b)"),
            "{err}"
        );
    }

    #[test]
    fn named_keys_win_over_the_message_key() {
        let c = UpsertConfig {
            keys: vec!["id".into()],
            ..config()
        };
        let id: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        let b = batch(vec![
            ("id", id.clone()),
            ("sku", Arc::new(StringArray::from(vec!["a"])) as ArrayRef),
            (
                "_key",
                key(vec![("sku", Arc::new(StringArray::from(vec!["a"])))]),
            ),
        ]);
        let (resolved, out) = resolve(&c, vec![b.clone()], &tp()).unwrap();
        assert_eq!(resolved.keys, vec!["id"]);
        assert_eq!(out[0].num_columns(), 2, "the key struct is never stored");
        let plain = UpsertConfig {
            keys_from: None,
            ..c
        };
        let (resolved, out) = resolve(&plain, vec![b.clone()], &tp()).unwrap();
        assert_eq!(resolved.keys, vec!["id"]);
        assert_eq!(out, vec![b], "without keys_from nothing changes");
    }
}
