//! `mode = "upsert"` for Delta tables: a flush of change events becomes one MERGE whose commit
//! also carries the partition's txn action, so applying changes is exactly once too.
//!
//! Invariants:
//! - Within a flush only the last change per key survives (rows arrive in offset order, and a
//!   key always lives in one Kafka partition); a row whose delete column is true deletes the key.
//! - The MERGE is fenced like an append: the txn version is checked before, and deltalake's
//!   conflict checker rejects a concurrent commit carrying the same appId.
//! - A key column that is null cannot be merged: the flush fails with the column named rather
//!   than silently inserting duplicates.

use std::collections::HashMap;
use std::time::Duration;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use deltalake::datafusion::common::Column;
use deltalake::datafusion::prelude::{lit, Expr, SessionContext};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::DeltaTableError;
use tracing::{debug, warn};

use super::DeltaSink;
use crate::{CommitOutcome, Error, Result, Staged, TopicPartition};

/// Which rows are the same entity, and which ones delete it.
#[derive(Debug, Clone)]
pub struct UpsertConfig {
    /// Key columns (top-level).
    pub keys: Vec<String>,
    /// A boolean column that marks deletes (Debezium's `_deleted`); rows without it upsert.
    pub delete_column: Option<String>,
}

/// A flush's changes, reduced to the last one per key.
#[derive(Debug)]
pub struct Changes {
    pub rows: RecordBatch,
    /// Rows the reduction dropped (superseded by a later change of the same key).
    pub superseded: usize,
}

impl Changes {
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
        let all = concat_batches(schema, &batches).map_err(|e| bad(e.to_string()))?;
        let mut key_columns = Vec::with_capacity(config.keys.len());
        for k in &config.keys {
            let c = all.column_by_name(k).ok_or_else(|| {
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
        let converter = RowConverter::new(
            key_columns
                .iter()
                .map(|c| SortField::new(c.data_type().clone()))
                .collect(),
        )
        .map_err(|e| bad(e.to_string()))?;
        let rows = converter
            .convert_columns(&key_columns)
            .map_err(|e| bad(e.to_string()))?;
        let mut last: HashMap<arrow::row::Row<'_>, u32> = HashMap::with_capacity(all.num_rows());
        for i in 0..all.num_rows() {
            last.insert(rows.row(i), i as u32);
        }
        let mut keep: Vec<u32> = last.into_values().collect();
        keep.sort_unstable();
        let superseded = all.num_rows() - keep.len();
        let rows = if superseded == 0 {
            all
        } else {
            take_record_batch(&all, &UInt32Array::from(keep)).map_err(|e| bad(e.to_string()))?
        };
        Ok(Self { rows, superseded })
    }
}

fn column(relation: &str, name: &str) -> Expr {
    Expr::Column(Column::new(Some(relation), name))
}

/// Applies `changes` with one MERGE, fenced on the partition's txn.
pub(super) async fn commit(
    sink: &DeltaSink,
    staged: &Staged,
    schema: Option<&SchemaRef>,
    changes: &Changes,
) -> Result<CommitOutcome> {
    let Some(config) = sink.config.upsert.as_ref() else {
        return Err(Error::Join("upsert changes for an append sink".into()));
    };
    let tp = &staged.tp;
    let app_id = sink.app_id(tp);
    let mut slot = sink.table.lock().await;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        if !sink.refresh(&mut slot).await? {
            let Some(schema) = schema else {
                return Ok(CommitOutcome::Committed { next: staged.next });
            };
            sink.create(&mut slot, schema).await?;
        }
        let table = slot.as_ref().expect("table loaded");
        match sink.txn_position(table, tp).await? {
            Some(pos) if pos == staged.next && staged.start != staged.next => {
                return Ok(CommitOutcome::AlreadyCommitted { next: pos })
            }
            Some(pos) if pos != staged.start => return Ok(CommitOutcome::Fenced { next: pos }),
            _ => {}
        }
        let ctx = SessionContext::new();
        let source = ctx
            .read_batch(changes.rows.clone())
            .map_err(|e| sink.err("merge", DeltaTableError::from(e)))?;
        let mut predicate: Option<Expr> = None;
        for k in &config.keys {
            let eq = column("target", k).eq(column("source", k));
            predicate = Some(match predicate {
                None => eq,
                Some(p) => p.and(eq),
            });
        }
        let predicate = predicate.expect("upsert keys are validated non-empty");
        let deleted = config
            .delete_column
            .as_ref()
            .filter(|c| changes.rows.schema().field_with_name(c).is_ok())
            .map(|c| column("source", c).eq(lit(true)));
        let names: Vec<String> = changes
            .rows
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let properties = CommitProperties::default()
            .with_application_transaction(Transaction::new(&app_id, staged.next.0 - 1))
            .with_max_retries(sink.config.commit_attempts as usize)
            .with_cleanup_expired_logs(Some(false));
        let mut builder = table
            .clone()
            .merge(source, predicate)
            .with_source_alias("source")
            .with_target_alias("target")
            .with_merge_schema(true)
            .with_writer_properties(crate::parquet::writer::writer_properties(
                sink.config.compression,
                sink.config.row_group_rows,
            ))
            .with_commit_properties(properties);
        let merge_err = |e| sink.err("merge", e);
        if let Some(deleted) = &deleted {
            builder = builder
                .when_matched_delete(|d| d.predicate(deleted.clone()))
                .map_err(merge_err)?;
        }
        let upsert_rows = deleted.clone().map(|d| !d);
        builder = builder
            .when_matched_update(|mut u| {
                if let Some(p) = &upsert_rows {
                    u = u.predicate(p.clone());
                }
                for n in &names {
                    u = u.update(n.as_str(), column("source", n));
                }
                u
            })
            .map_err(merge_err)?
            .when_not_matched_insert(|mut i| {
                if let Some(p) = &upsert_rows {
                    i = i.predicate(p.clone());
                }
                for n in &names {
                    i = i.set(n.as_str(), column("source", n));
                }
                i
            })
            .map_err(merge_err)?;
        match builder.await {
            Ok((table, metrics)) => {
                debug!(table = %sink.location, %tp, inserted = metrics.num_target_rows_inserted,
                    updated = metrics.num_target_rows_updated,
                    deleted = metrics.num_target_rows_deleted,
                    copied = metrics.num_target_rows_copied,
                    files_scanned = metrics.num_target_files_scanned,
                    files_skipped = metrics.num_target_files_skipped_during_scan,
                    files_removed = metrics.num_target_files_removed,
                    scan_ms = metrics.scan_time_ms,
                    rewrite_ms = metrics.rewrite_time_ms,
                    ms = metrics.execution_time_ms, "merged");
                if let Ok(state) = table.snapshot() {
                    let version = state.version();
                    let interval = {
                        use deltalake::table::config::TablePropertiesExt;
                        state.table_config().checkpoint_interval().get()
                    };
                    // deltalake's rule for when a commit writes a checkpoint.
                    if (version + 1).is_multiple_of(interval) {
                        sink.clean_expired_logs(table.log_store(), state, version)
                            .await;
                    }
                }
                *slot = Some(table);
                return Ok(CommitOutcome::Committed { next: staged.next });
            }
            Err(e) if super::is_conflict(&e) && attempt < sink.config.commit_attempts => {
                warn!(table = %sink.location, %tp, attempt, "merge conflict, re-checking: {e}");
                let backoff = 50u64 * u64::from(attempt.min(10));
                let jitter = rand::random::<u64>() % (backoff + 1);
                tokio::time::sleep(Duration::from_millis(backoff + jitter)).await;
            }
            Err(e) => return Err(sink.err("merge", e)),
        }
    }
}
