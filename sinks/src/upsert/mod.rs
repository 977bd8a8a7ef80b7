//! Upserts: which rows are the same entity (key columns), which delete it, and a flush's changes
//! reduced to the last one per key, as every upsert sink (Delta, Databend) applies them.
//!
//! Invariants:
//! - Within a flush only the last change per key survives (rows arrive in offset order, and a
//!   key always lives in one Kafka partition); a row whose delete column is true deletes the key.
//! - A key column that is null cannot be applied: the flush fails with the column named rather
//!   than silently inserting duplicates.
//! - A column the last change did not carry (named in its unchanged list) takes the value of the
//!   latest earlier change of the key in the flush that carried one ([`unchanged`]).

pub mod message_key;
pub mod rows;
pub mod unchanged;

use std::collections::HashMap;

use arrow::array::RecordBatch;
use arrow::compute::{concat_batches, interleave_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};

use crate::{Error, Result, TopicPartition};

/// Which rows are the same entity, and which ones delete it.
#[derive(Debug, Clone)]
pub struct UpsertConfig {
    /// Key columns (top-level). Empty with `keys_from`: taken per flush from the message key.
    pub keys: Vec<String>,
    /// The decoded message-key column whose fields are the key columns when `keys` is empty
    /// (`_key`; see [`message_key`]).
    pub keys_from: Option<String>,
    /// A boolean column that marks deletes (Debezium's `_deleted`); rows without it upsert.
    pub delete_column: Option<String>,
    /// A list-of-names column naming, per row, the columns whose stored value the change
    /// keeps (values the source did not send; see [`super::unchanged`]). Never stored.
    pub unchanged_column: Option<String>,
}

/// A flush's changes, reduced to the last one per key.
#[derive(Debug)]
pub struct Changes {
    /// The last change per key, in offset order.
    pub rows: RecordBatch,
    /// Rows the reduction dropped (superseded by a later change of the same key).
    pub superseded: usize,
    /// The table is emptied before `rows` are applied (see [`crate::Flush::truncate`]).
    pub truncate: bool,
    /// The keys and columns `rows` are applied with (named keys, resolved for this flush).
    pub config: UpsertConfig,
}

impl Changes {
    /// Reduces a flush's batches to the last change per key (see [`UpsertConfig`]).
    pub fn build(
        config: &UpsertConfig,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
        tp: &TopicPartition,
    ) -> Result<Self> {
        let bad = |reason: String| Error::Upsert {
            tp: tp.clone(),
            reason,
        };
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        let mut converter = None;
        let mut keys = Vec::with_capacity(batches.len());
        for b in &batches {
            let mut key_columns = Vec::with_capacity(config.keys.len());
            for k in &config.keys {
                let c = b.column_by_name(k).ok_or_else(|| {
                    bad(format!(
                        "key column `{k}` is not in the data (columns: {})",
                        schema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                if c.null_count() > 0 {
                    return Err(bad(format!(
                        "key column `{k}` is null in {} row(s); upserts need a key on every change",
                        c.null_count()
                    )));
                }
                key_columns.push(c.clone());
            }
            if converter.is_none() {
                converter = Some(
                    RowConverter::new(
                        key_columns
                            .iter()
                            .map(|c| SortField::new(c.data_type().clone()))
                            .collect(),
                    )
                    .map_err(|e| bad(e.to_string()))?,
                );
            }
            let converter = converter.as_ref().expect("set above");
            keys.push(
                converter
                    .convert_columns(&key_columns)
                    .map_err(|e| bad(e.to_string()))?,
            );
        }
        // The last change of each key, as (batch, row): the reduction copies the rows it keeps
        // once, straight out of the flush's batches (no concatenation first).
        let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let mut keep: Vec<(usize, usize)> =
            rows::RowIndex::last_of_each(&keys).positions().collect();
        keep.sort_unstable();
        // Every change of each kept key, for the values a later change did not carry.
        let history = match unchanged::any(config, &batches) {
            false => HashMap::new(),
            true => {
                let mut by_key: HashMap<arrow::row::Row<'_>, Vec<(usize, usize)>> = HashMap::new();
                for (b, rows) in keys.iter().enumerate() {
                    for (i, row) in rows.iter().enumerate() {
                        by_key.entry(row).or_default().push((b, i));
                    }
                }
                by_key
                    .into_values()
                    .map(|all| (*all.last().expect("one change at least"), all))
                    .collect()
            }
        };
        let superseded = total - keep.len();
        let rows = match batches.as_slice() {
            [] => RecordBatch::new_empty(schema.clone()),
            [one] if superseded == 0 => one.clone(),
            _ if superseded == 0 => {
                concat_batches(schema, &batches).map_err(|e| bad(e.to_string()))?
            }
            _ => {
                let refs: Vec<&RecordBatch> = batches.iter().collect();
                interleave_record_batch(&refs, &keep).map_err(|e| bad(e.to_string()))?
            }
        };
        let rows = match history.is_empty() {
            true => rows,
            false => unchanged::coalesce(config, rows, &batches, &keep, &history).map_err(bad)?,
        };
        Ok(Self {
            rows,
            superseded,
            truncate: false,
            config: config.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::{Changes, UpsertConfig};
    use crate::TopicPartition;

    fn changes(ids: Vec<i64>, names: Vec<&str>) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
            ])),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(names)),
            ],
        )
        .unwrap()
    }

    fn build(batches: Vec<RecordBatch>) -> Changes {
        let config = UpsertConfig {
            keys: vec!["id".into()],
            keys_from: None,
            delete_column: None,
            unchanged_column: None,
        };
        let schema = changes(vec![], vec![]).schema();
        Changes::build(&config, &schema, batches, &TopicPartition::new("t", 0)).unwrap()
    }

    fn rows(c: &Changes) -> Vec<String> {
        let ids = c.rows.column(0).as_primitive::<Int64Type>();
        let names = c.rows.column(1).as_string::<i32>();
        (0..c.rows.num_rows())
            .map(|i| format!("{}={}", ids.value(i), names.value(i)))
            .collect()
    }

    #[test]
    fn the_last_change_of_a_key_wins_across_batches_in_offset_order() {
        let c = build(vec![
            changes(vec![1, 2], vec!["a", "b"]),
            changes(vec![1, 3], vec!["a2", "c"]),
            changes(vec![], vec![]),
            changes(vec![2], vec!["b2"]),
        ]);
        assert_eq!(rows(&c), vec!["1=a2", "3=c", "2=b2"]);
        assert_eq!(c.superseded, 2);
    }

    #[test]
    fn changes_without_repeated_keys_are_kept_whole() {
        let one = changes(vec![1, 2], vec!["a", "b"]);
        let c = build(vec![one.clone()]);
        assert_eq!(c.superseded, 0);
        assert_eq!(
            c.rows.column(1).to_data().buffers()[1].as_ptr(),
            one.column(1).to_data().buffers()[1].as_ptr(),
            "a single batch without repeats is not copied"
        );
        let c = build(vec![one, changes(vec![3], vec!["c"])]);
        assert_eq!(rows(&c), vec!["1=a", "2=b", "3=c"]);
        assert_eq!(build(vec![]).rows.num_rows(), 0);
    }

    #[test]
    fn a_null_key_fails_the_flush_naming_the_column() {
        let config = UpsertConfig {
            keys: vec!["name".into()],
            keys_from: None,
            delete_column: None,
            unchanged_column: None,
        };
        let b = RecordBatch::try_new(
            changes(vec![], vec![]).schema(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("a"), None])),
            ],
        )
        .unwrap();
        let err = Changes::build(&config, &b.schema(), vec![b], &TopicPartition::new("t", 3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key column `name` is null in 1 row(s)"),
            "{err}"
        );
        assert!(err.contains("t") && err.contains('3'), "{err}");
    }
}
