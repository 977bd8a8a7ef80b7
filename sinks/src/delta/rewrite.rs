//! Upserts by copy-on-write without a join: the changes' keys decide which data files hold a
//! changed row, only those files are rewritten, and they stream through one file at a time.
//!
//! deltalake's MERGE joins the changes with every file the key range may touch, and its barrier
//! holds each scanned file's rows until one of them is known to change: a file without a changed
//! key stays in memory until the join ends, so a MERGE's memory grew with the table (72 MiB of a
//! 194 MiB peak heap in the upsert bench, where most changes are new keys). Here a file is
//! rewritten only once its key columns have shown it holds a changed key:
//!
//! ```text
//!  keys    ─► the changes' keys: a hash set (membership) and, per key column, the sorted values
//!  prune   ─► a file whose min/max in the log admits no change of some key column is not
//!             opened; then each file's footer: a row group whose min/max admits none is skipped,
//!             and a file with no row group left is untouched (its data is never read)
//!  probe   ─► the key columns of the remaining row groups: a file without a changed key is
//!             untouched
//!  rewrite ─► partition by partition: each file that holds one streams through (rows of
//!             changed keys are dropped, the rest are written conformed to the table schema),
//!             then the partition's changes that are not deletes; the partition's files are
//!             closed before the next partition's open, and roll at a target size
//!  commit  ─► [metaData if the schema grew] + remove(rewritten) + add(new) + txn per flush, as
//!             a MERGE entry written directly (`entry`): it goes after entries written meanwhile
//!             unless one removed a rewritten file or added a file holding a changed key (a
//!             truncate goes only on the state it read)
//! ```
//!
//! Invariants:
//! - The result is the MERGE's: a target row whose key is among the changes is replaced by the
//!   change (or deleted by it), every other row is kept, and a change of a new key is inserted.
//! - Memory is the changes, their key set, one batch of one file in flight and one partition's
//!   open output files, whatever the table's size and however many partitions the changes span.
//! - A kept row goes back to its file's partition; a change goes to the partition of its own
//!   values, so a key whose partition column changed leaves its old partition.
//! - Only tables this can rewrite exactly go this way: without column mapping, without deletion
//!   vectors (a file's deleted rows would come back) and with no key among the partition
//!   columns. Others answer [`Outcome::Unsupported`] and take deltalake's MERGE.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::{filter_record_batch, take_record_batch};
use arrow::datatypes::SchemaRef;
use deltalake::datafusion::common::Column;
use deltalake::datafusion::prelude::{lit, Expr};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, LogicalFileView, MetadataExt, Transaction};
use deltalake::operations::merge::MergeMetrics;
use deltalake::protocol::{DeltaOperation, MergePredicate};
use deltalake::table::config::TablePropertiesExt as _;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::ObjectStore;
use tracing::info;

use super::{schema, DeltaSink, PartitionValues};
use crate::upsert::UpsertConfig;
use crate::TopicPartition;

pub(super) use super::keys::{ChangeIndex, Keys};
use super::probe::*;

/// Files whose footers and key columns are read at the same time.
const PROBES: usize = 8;

/// Rows per batch read from a file.
pub(super) const BATCH_ROWS: usize = 8192;

/// The size at which a rewrite rolls to its next data file.
const TARGET_FILE_BYTES: u64 = 128 << 20;

/// What [`upsert`] did.
pub(super) enum Outcome {
    /// Committed: the table after the commit, and what the upsert changed.
    Done(DeltaTable, MergeMetrics),
    /// The table needs deltalake's MERGE; the reason says why.
    Unsupported(&'static str),
}

/// Applies `batches` (at most one change per key, one schema; batch `i` from partition `tps[i]`)
/// to `table` by copy-on-write and commits them with the `txns` (appId, version), or says why the
/// table needs deltalake's MERGE.
pub(super) async fn upsert(
    sink: &DeltaSink,
    config: &UpsertConfig,
    table: &DeltaTable,
    batches: &[RecordBatch],
    tps: &[TopicPartition],
    txns: &[(String, i64)],
    truncate: bool,
) -> Result<Outcome, DeltaTableError> {
    let started = Instant::now();
    let state = table.snapshot()?;
    let partition_columns: Vec<String> = state.metadata().partition_columns().to_vec();
    // A truncate removes every file whole: no row is kept, so keys in partition columns and
    // deletion vectors do not matter to it.
    if !truncate && config.keys.iter().any(|k| partition_columns.contains(k)) {
        return Ok(Outcome::Unsupported("a key column partitions the table"));
    }
    if state
        .metadata()
        .configuration()
        .get("delta.columnMapping.mode")
        .is_some_and(|m| m != "none")
    {
        return Ok(Outcome::Unsupported("the table uses column mapping"));
    }
    let files: Vec<LogicalFileView> = state.log_data().iter().collect();
    if !truncate
        && files
            .iter()
            .any(|f| f.deletion_vector_descriptor().is_some())
    {
        return Ok(Outcome::Unsupported("the table has deletion vectors"));
    }
    let current = state.snapshot().arrow_schema();
    let changes_schema = batches[0].schema();
    let merged = schema::merge(&current, &changes_schema).map_err(DeltaTableError::Generic)?;
    // What a data file holds: the table's columns but its partition columns.
    let file_schema = Arc::new(arrow::datatypes::Schema::new(
        merged
            .fields()
            .iter()
            .filter(|f| !partition_columns.contains(f.name()))
            .cloned()
            .collect::<Vec<_>>(),
    ));
    let keys = Keys::new(config, batches)?;
    let index = ChangeIndex::new(config, batches, &keys);

    let store = table.log_store().object_store(None);
    let mut metrics = MergeMetrics {
        num_source_rows: index.len(),
        ..Default::default()
    };
    // Boxed: an unboxed future borrowing the key set trips rustc's `Send` inference.
    let probes: Vec<BoxFuture<'_, Result<Probe, DeltaTableError>>> = files
        .iter()
        .enumerate()
        .map(|(n, f)| match truncate {
            true => futures::future::ready(Ok(Probe::Dirty(n))).boxed(),
            false => probe(&store, f, n, &keys, &index).boxed(),
        })
        .collect();
    let probed: Vec<Probe> = futures::stream::iter(probes)
        .buffer_unordered(PROBES)
        .try_collect()
        .await?;
    let mut dirty: Vec<usize> = Vec::new();
    for p in &probed {
        match p {
            Probe::Pruned => metrics.num_target_files_skipped_during_scan += 1,
            Probe::Clean => metrics.num_target_files_scanned += 1,
            Probe::Dirty(n) => {
                metrics.num_target_files_scanned += 1;
                dirty.push(*n);
            }
        }
    }
    dirty.sort_unstable();
    metrics.scan_time_ms = started.elapsed().as_millis() as u64;

    let rewrite_started = Instant::now();
    let mut writer = sink.keyed_writer(
        merged.clone(),
        &partition_columns,
        Some(&batches[0]),
        &config.keys,
        Some(TARGET_FILE_BYTES),
    )?;
    // Partition by partition, each closed before the next opens: a grouped upsert's changes
    // span several partitions (days), and each open file holds its row group's encoders and
    // an upload buffer.
    let mut parts: BTreeMap<String, Part> = BTreeMap::new();
    for &n in &dirty {
        let values = partition_values(&files[n], &partition_columns)?;
        parts
            .entry(super::partition_key(&values))
            .or_insert_with(|| Part::new(values))
            .files
            .push(n);
    }
    for (b, ((batch, deleted), tp)) in batches.iter().zip(index.deleted()).zip(tps).enumerate() {
        let groups = super::partition_rows(batch, &partition_columns, tp)
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        for (values, mut rows) in groups {
            if let Some(d) = deleted {
                rows.retain(|&r| !d.value(r as usize));
            }
            if rows.is_empty() {
                continue;
            }
            parts
                .entry(super::partition_key(&values))
                .or_insert_with(|| Part::new(values))
                .rows
                .push((b, rows));
        }
    }
    let mut adds = Vec::new();
    for part in parts.into_values() {
        for n in part.files.into_iter().filter(|_| !truncate) {
            rewrite_file(
                &store,
                &files[n],
                &part.values,
                &keys,
                &index,
                &file_schema,
                &mut writer,
                &mut metrics,
            )
            .await?;
        }
        for (b, rows) in part.rows {
            metrics.num_output_rows += rows.len();
            metrics.num_target_rows_inserted += rows.len();
            let upserts = if rows.len() == batches[b].num_rows() {
                batches[b].clone()
            } else {
                take_record_batch(&batches[b], &UInt32Array::from(rows))?
            };
            super::writer::write_rows(&mut writer, conform(&upserts, &merged)?, &part.values)
                .await?;
        }
        adds.extend(writer.flush().await?);
    }
    metrics.num_target_rows_inserted = metrics
        .num_target_rows_inserted
        .saturating_sub(metrics.num_target_rows_updated);
    metrics.rewrite_time_ms = rewrite_started.elapsed().as_millis() as u64;
    metrics.num_target_files_added = adds.len();
    metrics.num_target_files_removed = dirty.len();

    let mut actions: Vec<Action> = dirty
        .iter()
        .map(|&n| Action::Remove(files[n].remove_action(true)))
        .collect();
    actions.extend(adds.into_iter().map(Action::Add));
    let operation = match truncate {
        true => DeltaOperation::Delete { predicate: None },
        false => operation(config, &keys, index.any_deletes()),
    };
    // What the rewrite depends on (see `entry`): the rewritten files stay as read, and no row
    // with a changed key arrives in a file written since. A truncate depends on every file.
    let depends = Depends {
        removes: dirty
            .iter()
            .map(|&n| files[n].path().into_owned())
            .collect(),
        store: &store,
        keys: &keys,
        index: &index,
    };
    let table = commit_upsert(
        sink,
        table,
        (&current, &merged),
        actions,
        txns,
        operation,
        (!truncate).then_some(depends),
    )
    .await?;
    metrics.execution_time_ms = started.elapsed().as_millis() as u64;
    Ok(Outcome::Done(table, metrics))
}

/// What an upsert's entry read, so that it can go after entries written meanwhile (see
/// `entry`): the files it removes (marks or rewrites), and what tells whether a winner's new
/// files hold one of its changed keys.
pub(super) struct Depends<'a> {
    pub(super) removes: std::collections::HashSet<String>,
    pub(super) store: &'a Arc<dyn ObjectStore>,
    pub(super) keys: &'a Keys,
    pub(super) index: &'a ChangeIndex<'a>,
}

/// Commits an upsert's `actions` on `table`'s loaded state, after a metaData action when the
/// schema grew (`schemas`: the table's, and the one the changes need), with the `txns`
/// (appId, version); returns the table after the commit.
///
/// With `depends`, the entry goes after what was committed since as long as none of it
/// conflicts by `entry`'s rules (a winner removing a file this commit marks or rewrites, adding
/// rows with a changed key, changing metadata or protocol, or committing one of its
/// partitions). Without, only on that state: when anything was committed since, this fails (a
/// conflict) and the caller applies the changes again to the new state. deltalake's conflict
/// checker would let the commit through after a compaction that removed one of the files it
/// removes (`dataChange = false` removes are not checked), keeping that file's rows twice.
pub(super) async fn commit_upsert(
    sink: &DeltaSink,
    table: &DeltaTable,
    schemas: (&SchemaRef, &SchemaRef),
    actions: Vec<Action>,
    txns: &[(String, i64)],
    operation: DeltaOperation,
    depends: Option<Depends<'_>>,
) -> Result<DeltaTable, DeltaTableError> {
    let (current, merged) = schemas;
    let state = table.snapshot()?;
    let mut all = Vec::with_capacity(actions.len() + 1);
    if !Arc::ptr_eq(merged, current) {
        let kernel = schema::kernel_schema(merged).map_err(DeltaTableError::Generic)?;
        info!(table = %sink.location, "evolving the table schema: {}",
            super::describe_new_columns(current, merged));
        all.push(Action::Metadata(
            state.metadata().clone().with_schema(&kernel)?,
        ));
    }
    all.extend(actions);
    let mut properties = CommitProperties::default()
        .with_max_retries(0)
        .with_cleanup_expired_logs(Some(false));
    for (app_id, version) in txns {
        properties = properties.with_application_transaction(Transaction::new(app_id, *version));
    }
    if let Some(d) = depends.filter(|_| sink.direct(table)) {
        let interval = state.table_config().checkpoint_interval().get();
        let (store, keys, index) = (d.store, d.keys, d.index);
        let holds = |new: Vec<LogicalFileView>| -> BoxFuture<'_, Result<bool, DeltaTableError>> {
            async move { any_holds(store, &new, keys, index).await }.boxed()
        };
        let reads = super::entry::Reads {
            app_ids: txns.iter().map(|(id, _)| id.clone()).collect(),
            removes: d.removes,
            holds: Some(&holds),
        };
        let mut table = table.clone();
        let version = sink
            .place(&mut table, all, properties, operation, &reads)
            .await?;
        table.update_incremental(Some(version)).await?;
        if (version + 1).is_multiple_of(interval) {
            sink.checkpoint(&table, version).await;
        }
        return Ok(table);
    }
    let done = CommitBuilder::from(properties)
        .with_actions(all)
        .build(Some(state), table.log_store(), operation)
        .await?;
    let mut table = table.clone();
    table.state = Some(done.snapshot);
    Ok(table)
}

/// One partition's share of an upsert: the files it rewrites and the changes it writes.
struct Part {
    values: PartitionValues,
    files: Vec<usize>,
    /// Rows (that are not deletes) of a change batch, by the batch's number.
    rows: Vec<(usize, Vec<u32>)>,
}

impl Part {
    fn new(values: PartitionValues) -> Self {
        Part {
            values,
            files: Vec::new(),
            rows: Vec::new(),
        }
    }
}

/// Streams `file` into `writer`, back to its partition (`values`), without the rows whose key is
/// among the changes.
#[allow(clippy::too_many_arguments)]
async fn rewrite_file(
    store: &Arc<dyn ObjectStore>,
    file: &LogicalFileView,
    values: &PartitionValues,
    keys: &Keys,
    index: &ChangeIndex<'_>,
    schema: &SchemaRef,
    writer: &mut RecordBatchWriter,
    metrics: &mut MergeMetrics,
) -> Result<(), DeltaTableError> {
    let path = file.object_store_path();
    let mut stream = batches(store, file, BATCH_ROWS).await?;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(read_error(&path))?;
        let rows = keys.rows_of(&batch)?;
        let keep = BooleanArray::from_iter(rows.iter().map(|r| match index.get(r) {
            None => Some(true),
            Some(true) => {
                metrics.num_target_rows_deleted += 1;
                Some(false)
            }
            Some(false) => {
                metrics.num_target_rows_updated += 1;
                Some(false)
            }
        }));
        let kept = filter_record_batch(&batch, &keep)?;
        metrics.num_target_rows_copied += kept.num_rows();
        metrics.num_output_rows += kept.num_rows();
        if kept.num_rows() > 0 {
            super::writer::write_rows(writer, conform(&kept, schema)?, values).await?;
        }
    }
    Ok(())
}

/// `file`'s partition values, in the table's partition column order.
pub(super) fn partition_values(
    file: &LogicalFileView,
    columns: &[String],
) -> Result<PartitionValues, DeltaTableError> {
    let mut values = PartitionValues::with_capacity(columns.len());
    if columns.is_empty() {
        return Ok(values);
    }
    let data = file.partition_values().ok_or_else(|| {
        DeltaTableError::Generic(format!("data file {} has no partition values", file.path()))
    })?;
    for c in columns {
        let v = data
            .fields()
            .iter()
            .zip(data.values())
            .find(|(f, _)| f.name() == c)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                DeltaTableError::Generic(format!(
                    "data file {} has no value for partition column `{c}`",
                    file.path()
                ))
            })?;
        values.insert(c.clone(), v);
    }
    Ok(values)
}

pub(super) fn conform(
    batch: &RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch, DeltaTableError> {
    schema::conform_batch(batch, schema).map_err(DeltaTableError::Generic)
}

/// The MERGE this upsert is, as the log records it. Its read predicate is the changes' range of
/// each key column (`None`, the whole table, when a range cannot be written as SQL).
pub(super) fn operation(config: &UpsertConfig, keys: &Keys, deletes: bool) -> DeltaOperation {
    let mut predicate: Option<Expr> = None;
    for (c, k) in config.keys.iter().enumerate() {
        let Some((min, max)) = keys.range(c) else {
            predicate = None;
            break;
        };
        let between = Expr::Column(Column::from_name(k)).between(lit(min), lit(max));
        predicate = Some(match predicate {
            None => between,
            Some(p) => p.and(between),
        });
    }
    let predicate =
        predicate.and_then(|p| deltalake::delta_datafusion::expr::fmt_expr_to_sql(&p).ok());
    let on = config
        .keys
        .iter()
        .map(|k| format!("target.`{k}` = source.`{k}`"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let deleted = config
        .delete_column
        .as_ref()
        .map(|c| format!("source.`{c}` = true"));
    let mut matched = Vec::new();
    if deletes {
        matched.push(MergePredicate {
            action_type: "delete".into(),
            predicate: deleted.clone(),
        });
    }
    matched.push(MergePredicate {
        action_type: "update".into(),
        predicate: deleted.as_ref().map(|d| format!("NOT ({d})")),
    });
    DeltaOperation::Merge {
        predicate,
        merge_predicate: Some(on),
        matched_predicates: matched,
        not_matched_predicates: vec![MergePredicate {
            action_type: "insert".into(),
            predicate: deleted.map(|d| format!("NOT ({d})")),
        }],
        not_matched_by_source_predicates: Vec::new(),
    }
}
