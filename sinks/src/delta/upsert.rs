//! `mode = "upsert"` for Delta tables: a flush of change events becomes one MERGE whose commit
//! also carries the partition's txn action, so applying changes is exactly once too. The MERGE
//! is lakesink's copy-on-write (`rewrite.rs`) where the table allows it, deltalake's join
//! otherwise.
//!
//! Invariants (the changes themselves: [`crate::upsert`]):
//! - The MERGE is fenced like an append: the txn version is checked before, and deltalake's
//!   conflict checker rejects a concurrent commit carrying the same appId.
//! - A key column that is null cannot be merged: the flush fails with the column named rather
//!   than silently inserting duplicates.
//! - Grouped MERGE: flushes of other partitions waiting at the same moment are merged together
//!   (one scan of the table instead of one each), each fenced on its own txn, while their rows fit
//!   one flush (`group_rows`), their schemas match and their keys are disjoint. A key changed in
//!   two partitions has no order between them, so those flushes merge one at a time.

use std::collections::HashMap;

use arrow::array::RecordBatch;

use crate::upsert::{Changes, UpsertConfig};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use deltalake::datafusion::common::Column;
use deltalake::datafusion::execution::context::SessionState;
use deltalake::datafusion::prelude::{lit, Expr, SessionContext};
use deltalake::delta_datafusion::DeltaSessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::{DeltaTable, DeltaTableError};
use tracing::{debug, info, warn};

use super::{DeltaSink, GroupReply, Pending};
use crate::{CommitOutcome, Error, Result, Staged, TopicPartition};

fn column(relation: &str, name: &str) -> Expr {
    Expr::Column(Column::new(Some(relation), name))
}

/// The DataFusion session a MERGE runs in: deltalake's defaults, with the join's sides fixed.
///
/// MERGE is a full outer join of the changes (the source) with the files they may touch (the
/// target). DataFusion puts the side it estimates smaller on the hash table's build side, which is
/// kept in memory whole; once the table's files looked smaller than a flush of changes, that was
/// the target, so memory grew with the table. With join reordering off the source, which a flush
/// bounds, is always the build side, and the target streams through.
pub(super) fn merge_session() -> std::result::Result<std::sync::Arc<SessionState>, DeltaTableError>
{
    let overrides = HashMap::from([(
        "datafusion.optimizer.join_reordering".to_string(),
        "false".to_string(),
    )]);
    Ok(std::sync::Arc::new(
        DeltaSessionContext::new_with_session_overrides(&overrides)?.state(),
    ))
}

/// Whether upserts into `table` go by merge on read: the sink asks for it, or the table has the
/// `deletionVectors` feature already.
fn wants_deletion_vectors(sink: &DeltaSink, table: &DeltaTable) -> bool {
    sink.config.upsert_strategy == super::UpsertStrategy::DeletionVectors
        || super::mor::has_deletion_vectors(table)
}

/// One MERGE of `batches` (at most one change per key, all of one schema) into `table`, recording `txns`
/// (appId, version) in its commit: by copy-on-write of the files that hold a changed key (see
/// [`super::rewrite`]), or by deltalake's MERGE for the tables that cannot go that way.
async fn merge(
    sink: &DeltaSink,
    config: &UpsertConfig,
    table: &DeltaTable,
    batches: &[RecordBatch],
    tps: &[TopicPartition],
    txns: &[(String, i64)],
    truncate: bool,
) -> std::result::Result<(DeltaTable, deltalake::operations::merge::MergeMetrics), DeltaTableError>
{
    // Values the changes did not carry come from the table this commit is based on.
    let mut filled = Vec::with_capacity(batches.len());
    for b in batches {
        filled.push(super::unchanged::fill_from_table(config, table, b.clone()).await?);
    }
    // Merge on read where the sink asks for it or the table already has deletion vectors (a
    // copy-on-write of a file with one would bring its deleted rows back). A truncate removes
    // every file whole, which copy-on-write does.
    let table = &if !truncate && wants_deletion_vectors(sink, table) {
        let table = if super::mor::has_deletion_vectors(table) {
            table.clone()
        } else {
            info!(table = %sink.location,
                "adding the deletionVectors feature to the table (upsert = \"deletion-vectors\")");
            super::mor::enable(table).await?
        };
        match super::mor::upsert(sink, config, &table, &filled, tps, txns).await? {
            super::rewrite::Outcome::Done(table, metrics) => return Ok((table, metrics)),
            super::rewrite::Outcome::Unsupported(why) => {
                debug!(table = %sink.location, "upsert by deltalake's MERGE: {why}");
                table
            }
        }
    } else {
        table.clone()
    };
    match super::rewrite::upsert(sink, config, table, &filled, tps, txns, truncate).await? {
        super::rewrite::Outcome::Done(table, metrics) => return Ok((table, metrics)),
        super::rewrite::Outcome::Unsupported(why) if truncate => {
            return Err(DeltaTableError::Generic(format!(
                "cannot apply a source TRUNCATE to this table: {why}"
            )))
        }
        super::rewrite::Outcome::Unsupported(why) => {
            debug!(table = %sink.location, "upsert by deltalake's MERGE: {why}");
        }
    }
    let batches = &filled;
    let schema = batches.first().expect("a MERGE has changes").schema();
    let ctx = SessionContext::new();
    let source = ctx
        .read_batches(batches.to_vec())
        .map_err(DeltaTableError::from)?;
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
        .filter(|c| schema.field_with_name(c).is_ok())
        .map(|c| column("source", c).eq(lit(true)));
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    // On this state only (see `rewrite::commit_upsert`).
    let mut properties = CommitProperties::default()
        .with_max_retries(0)
        .with_cleanup_expired_logs(Some(false));
    for (app_id, version) in txns {
        properties = properties.with_application_transaction(Transaction::new(app_id, *version));
    }
    let mut builder = table
        .clone()
        .merge(source, predicate)
        .with_session_state(merge_session()?)
        .with_source_alias("source")
        .with_target_alias("target")
        .with_merge_schema(true)
        .with_writer_properties(crate::encode::writer_properties(
            sink.config.compression,
            sink.config.row_groups,
        ))
        .with_commit_properties(properties);
    if let Some(deleted) = &deleted {
        builder = builder.when_matched_delete(|d| d.predicate(deleted.clone()))?;
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
        })?
        .when_not_matched_insert(|mut i| {
            if let Some(p) = &upsert_rows {
                i = i.predicate(p.clone());
            }
            for n in &names {
                i = i.set(n.as_str(), column("source", n));
            }
            i
        })?;
    builder.await
}

/// Applies `changes` with one MERGE, fenced on the partition's txn.
pub(super) async fn commit(
    sink: &DeltaSink,
    slot: &mut Option<DeltaTable>,
    staged: &Staged<super::DeltaStaged>,
    schema: Option<&SchemaRef>,
    changes: &Changes,
) -> Result<CommitOutcome> {
    if sink.config.upsert.is_none() {
        return Err(Error::Join("upsert changes for an append sink".into()));
    }
    let config = &changes.config;
    let tp = &staged.tp;
    let app_id = sink.app_id(tp);
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        if !sink.refresh(slot).await? {
            let Some(schema) = schema else {
                return Ok(CommitOutcome::Committed { next: staged.next });
            };
            sink.create(slot, schema).await?;
        }
        let table = slot.as_ref().expect("table loaded");
        let recorded = sink.txn_position(table, tp).await?;
        if let Some(done) = crate::fence::decide(recorded, staged.start, staged.next) {
            return Ok(done);
        }
        let txns = [(app_id.clone(), staged.next.0 - 1)];
        match merge(
            sink,
            config,
            table,
            std::slice::from_ref(&changes.rows),
            std::slice::from_ref(tp),
            &txns,
            changes.truncate,
        )
        .await
        {
            Ok((table, metrics)) => {
                after_merge(sink, &table, &metrics, 1).await;
                *slot = Some(table);
                return Ok(CommitOutcome::Committed { next: staged.next });
            }
            Err(e) if super::is_conflict(&e) && attempt < sink.config.commit_attempts => {
                warn!(table = %sink.location, %tp, attempt, "merge conflict, re-checking: {e}");
                super::conflict_backoff(50, attempt).await;
            }
            Err(e) => return Err(sink.err("merge", e)),
        }
    }
}

/// Applies the changes of `group` (distinct partitions of an existing table) with one MERGE and
/// answers every member; see `DeltaSink::commit_queued`. Members are carried while their rows fit
/// `group_rows`, their schemas are the same and their keys are disjoint (a key changed in two
/// partitions has no order between them: each of those flushes merges alone, in turn). The
/// others, and every member when the MERGE fails, are told to commit alone.
pub(super) async fn commit_group(
    sink: &DeltaSink,
    slot: &mut Option<DeltaTable>,
    group: Vec<Pending>,
) {
    if sink.config.upsert.is_none() {
        for p in group {
            let _ = p.reply.send(GroupReply::Alone);
        }
        return;
    }
    let mut members = group;
    let mut attempt: u32 = 0;
    let failed = loop {
        attempt += 1;
        match sink.refresh(slot).await {
            Ok(true) => {}
            Ok(false) | Err(_) => break members,
        }
        let table = slot.as_ref().expect("table loaded");
        let (fenced, mut alone) = sink.fence_members(table, members).await;
        let mut carried: Vec<Pending> = Vec::with_capacity(fenced.len());
        let mut rows = 0usize;
        for p in fenced {
            let Some(changes) = p.staged.data.changes.clone() else {
                alone.push(p);
                continue;
            };
            if changes.truncate {
                // Emptying the table orders this flush against every other: it goes alone.
                alone.push(p);
                continue;
            }
            let fits = carried.is_empty()
                || (rows + changes.rows.num_rows() <= sink.config.group_rows
                    && carried[0].staged.data.changes.as_ref().is_some_and(|c| {
                        c.rows.schema() == changes.rows.schema()
                            && c.config.keys == changes.config.keys
                    }));
            if fits {
                rows += changes.rows.num_rows();
                carried.push(p);
            } else {
                alone.push(p);
            }
        }
        if !alone.is_empty() {
            debug!(table = %sink.location, carried = carried.len(), alone = alone.len(),
                "flushes left out of a grouped merge");
        }
        for p in alone {
            let _ = p.reply.send(GroupReply::Alone);
        }
        if carried.is_empty() {
            return;
        }
        // The flushes' changes go to the MERGE as they are, without a concatenated copy.
        let batches: Vec<RecordBatch> = carried
            .iter()
            .filter_map(|p| p.staged.data.changes.as_ref())
            .map(|c| c.rows.clone())
            .collect();
        let config = carried[0]
            .staged
            .data
            .changes
            .as_ref()
            .map(|c| c.config.clone())
            .expect("carried flushes have changes");
        let config = &config;
        if !keys_distinct(config, &batches) {
            debug!(table = %sink.location, flushes = carried.len(),
                "a key changed in more than one partition: merging them one at a time");
            break carried;
        }
        let txns: Vec<(String, i64)> = carried
            .iter()
            .map(|p| (sink.app_id(&p.staged.tp), p.staged.next.0 - 1))
            .collect();
        let tps: Vec<TopicPartition> = carried.iter().map(|p| p.staged.tp.clone()).collect();
        match merge(sink, config, table, &batches, &tps, &txns, false).await {
            Ok((table, metrics)) => {
                after_merge(sink, &table, &metrics, carried.len()).await;
                *slot = Some(table);
                for p in carried {
                    let next = p.staged.next;
                    let _ = p
                        .reply
                        .send(GroupReply::Done(CommitOutcome::Committed { next }, None));
                }
                return;
            }
            Err(e) if super::is_conflict(&e) && attempt < sink.config.commit_attempts => {
                warn!(table = %sink.location, attempt, flushes = carried.len(),
                    "grouped merge conflict, re-checking: {e}");
                super::conflict_backoff(50, attempt).await;
                members = carried;
            }
            Err(e) => {
                debug!(table = %sink.location, "grouped merge failed, merging alone: {e}");
                break carried;
            }
        }
    };
    for p in failed {
        let _ = p.reply.send(GroupReply::Alone);
    }
}

/// Whether no key occurs twice in `rows`.
fn keys_distinct(config: &UpsertConfig, batches: &[RecordBatch]) -> bool {
    let Some(first) = batches.first() else {
        return true;
    };
    let Some(fields) = config
        .keys
        .iter()
        .map(|k| {
            first
                .column_by_name(k)
                .map(|c| SortField::new(c.data_type().clone()))
        })
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    let Ok(converter) = RowConverter::new(fields) else {
        return false;
    };
    let mut keys = Vec::with_capacity(batches.len());
    for b in batches {
        let Some(columns) = config
            .keys
            .iter()
            .map(|k| b.column_by_name(k).cloned())
            .collect::<Option<Vec<_>>>()
        else {
            return false;
        };
        let Ok(k) = converter.convert_columns(&columns) else {
            return false;
        };
        keys.push(k);
    }
    let total = batches.iter().map(RecordBatch::num_rows).sum();
    let mut seen = std::collections::HashSet::with_capacity(total);
    keys.iter().all(|k| k.iter().all(|row| seen.insert(row)))
}

/// What follows a MERGE's commit of `flushes` flushes: its metrics at debug level, and the log
/// clean-up when it wrote a checkpoint.
async fn after_merge(
    sink: &DeltaSink,
    table: &DeltaTable,
    metrics: &deltalake::operations::merge::MergeMetrics,
    flushes: usize,
) {
    debug!(table = %sink.location, flushes, inserted = metrics.num_target_rows_inserted,
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
}
