//! Upserts by merge on read (`[sink.delta] upsert = "deletion-vectors"`): the rows a flush
//! replaces or deletes are marked in deletion vectors of the files that hold them, and only the
//! changes are written, so a flush costs what it changes plus a key lookup, not what the files
//! it touches weigh.
//!
//! ```text
//!  keys    ─► the changes' keys (as in `rewrite`): a hash set and per key column sorted values
//!  find    ─► per data file: the log's min/max, then each row group's, rule files and row
//!             groups out; the key columns of the rest give the rows (their indexes in the file)
//!             holding a changed key
//!  mark    ─► per file with such rows: its deletion vector (read) ∪ those rows; all of them
//!             in one new deletion-vector file
//!  write   ─► the changes that are not deletes, as new data files by partition
//!  commit  ─► [metaData if the schema grew] + per marked file remove(old DV) + add(same path,
//!             new DV) + add(new files) + txn per flush, as one MERGE entry written directly
//!             (`entry`): it goes after entries written meanwhile unless one removed a file it
//!             marks or added a file holding a changed key
//! ```
//!
//! Invariants:
//! - The result is the MERGE's: after the commit, a key among the changes has exactly the
//!   change's row (none for a delete), every other live row is kept as it was.
//! - A file's new deletion vector contains its old one: rows deleted before stay deleted.
//! - A marked file's add keeps its statistics, with `tightBounds` false: its min/max may now be
//!   wider than its live rows, as the protocol allows for files with deletion vectors.
//! - Only tables with the `deletionVectors` feature go this way (`upsert` adds it first), and
//!   never a key among the partition columns (the files do not hold those values).

use std::collections::BTreeMap;
use std::time::Instant;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use deltalake::kernel::{Action, LogicalFileView};
use deltalake::operations::merge::MergeMetrics;
use deltalake::writer::DeltaWriter;
use deltalake::{DeltaTable, DeltaTableError};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use roaring::RoaringTreemap;

use super::keys::ChangeIndex;
use super::probe::matching_rows;
use super::rewrite::{commit_upsert, conform, operation, Depends, Keys, Outcome};
use super::{schema, DeltaSink};
use crate::upsert::UpsertConfig;
use crate::TopicPartition;

/// What the key lookup found in a file: its rows holding a changed key (index in the file,
/// and whether the change deletes it); `None` when its statistics ruled every change out.
type Found = Option<Vec<(u64, bool)>>;

/// Files whose footers and key columns are read at the same time.
const PROBES: usize = 8;

/// Whether `table` has the `deletionVectors` feature (reader and writer).
pub(super) fn has_deletion_vectors(table: &DeltaTable) -> bool {
    use delta_kernel::table_features::TableFeature;
    let Ok(state) = table.snapshot() else {
        return false;
    };
    let protocol = state.protocol();
    protocol
        .reader_features()
        .is_some_and(|f| f.contains(&TableFeature::DeletionVectors))
        && protocol
            .writer_features()
            .is_some_and(|f| f.contains(&TableFeature::DeletionVectors))
}

/// Adds the `deletionVectors` feature to `table` (protocol 3/7 and
/// `delta.enableDeletionVectors`), in a commit of its own that changes no data.
pub(super) async fn enable(table: &DeltaTable) -> Result<DeltaTable, DeltaTableError> {
    table
        .clone()
        .set_tbl_properties()
        .with_properties(
            [(
                "delta.enableDeletionVectors".to_string(),
                "true".to_string(),
            )]
            .into_iter()
            .collect(),
        )
        .await
}

/// Applies `batches` (at most one change per key, one schema; batch `i` from partition `tps[i]`)
/// to `table` by merge on read and commits them with the `txns` (appId, version).
pub(super) async fn upsert(
    sink: &DeltaSink,
    config: &UpsertConfig,
    table: &DeltaTable,
    batches: &[RecordBatch],
    tps: &[TopicPartition],
    txns: &[(String, i64)],
) -> Result<Outcome, DeltaTableError> {
    let started = Instant::now();
    let state = table.snapshot()?;
    let partition_columns: Vec<String> = state.metadata().partition_columns().to_vec();
    if config.keys.iter().any(|k| partition_columns.contains(k)) {
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
    if !has_deletion_vectors(table) {
        return Ok(Outcome::Unsupported(
            "the table does not have the deletionVectors feature",
        ));
    }
    let files: Vec<LogicalFileView> = state.log_data().iter().collect();
    let current = state.snapshot().arrow_schema();
    let merged = schema::merge(&current, &batches[0].schema()).map_err(DeltaTableError::Generic)?;
    let keys = Keys::new(config, batches)?;
    let index = ChangeIndex::new(config, batches, &keys);
    let mut metrics = MergeMetrics {
        num_source_rows: index.len(),
        ..Default::default()
    };

    // Find: the rows of each file that hold a changed key.
    let store = table.log_store().object_store(None);
    let root = table.log_store().root_url().clone();
    let probes: Vec<BoxFuture<'_, Result<(usize, Found), DeltaTableError>>> = files
        .iter()
        .enumerate()
        .map(|(n, f)| {
            let (store, keys, index) = (&store, &keys, &index);
            async move { Ok((n, matching_rows(store, f, keys, index).await?)) }.boxed()
        })
        .collect();
    let found: Vec<(usize, Found)> = futures::stream::iter(probes)
        .buffer_unordered(PROBES)
        .try_collect()
        .await?;

    // Mark: each touched file's deletion vector, its old one included.
    let mut marked: BTreeMap<usize, RoaringTreemap> = BTreeMap::new();
    for (n, rows) in found {
        let Some(rows) = rows else {
            metrics.num_target_files_skipped_during_scan += 1;
            continue;
        };
        metrics.num_target_files_scanned += 1;
        if rows.is_empty() {
            continue;
        }
        let file = &files[n];
        let mut dv = match file.deletion_vector_descriptor() {
            Some(d) => super::dv::read(store.as_ref(), &root, &d).await?,
            None => RoaringTreemap::new(),
        };
        let before = dv.len();
        for (row, deletes) in rows {
            if dv.insert(row) {
                match deletes {
                    true => metrics.num_target_rows_deleted += 1,
                    false => metrics.num_target_rows_updated += 1,
                }
            }
        }
        if dv.len() > before {
            marked.insert(n, dv);
        }
    }
    metrics.scan_time_ms = started.elapsed().as_millis() as u64;

    // Write: the deletion vectors, and the changes that are not deletes.
    let write_started = Instant::now();
    let descriptors = if marked.is_empty() {
        Vec::new()
    } else {
        super::dv::write(store.as_ref(), marked.values().cloned().collect()).await?
    };
    let mut writer = sink.keyed_writer(
        merged.clone(),
        &partition_columns,
        Some(&batches[0]),
        &config.keys,
        None,
    )?;
    // Each table partition's new rows in one file, sorted by key: its pages' key ranges are
    // then narrow, and a later flush reads only the pages that may hold its keys (`probe`).
    let mut by_partition: Vec<(super::PartitionValues, Vec<RecordBatch>)> = Vec::new();
    for (b, (batch, deleted)) in batches.iter().zip(index.deleted()).enumerate() {
        let groups = super::partition_rows(batch, &partition_columns, &tps[b])
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        for (values, mut rows) in groups {
            if let Some(d) = deleted {
                rows.retain(|&r| !d.value(r as usize));
            }
            if rows.is_empty() {
                continue;
            }
            metrics.num_output_rows += rows.len();
            let upserts = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                take_record_batch(batch, &UInt32Array::from(rows))?
            };
            let upserts = conform(&upserts, &merged)?;
            match by_partition.iter_mut().find(|(v, _)| *v == values) {
                Some((_, list)) => list.push(upserts),
                None => by_partition.push((values, vec![upserts])),
            }
        }
    }
    for (values, list) in by_partition {
        let rows = sorted_by_key(&merged, &list, &config.keys)?;
        super::writer::write_rows(&mut writer, rows, &values).await?;
    }
    let adds = writer.flush().await?;
    metrics.num_target_rows_inserted = metrics
        .num_output_rows
        .saturating_sub(metrics.num_target_rows_updated);
    metrics.rewrite_time_ms = write_started.elapsed().as_millis() as u64;
    metrics.num_target_files_added = adds.len();
    metrics.num_target_files_removed = marked.len();

    // Commit.
    let mut actions = Vec::with_capacity(2 * marked.len() + adds.len());
    for (&n, descriptor) in marked.keys().zip(descriptors) {
        let file = &files[n];
        actions.push(Action::Remove(file.remove_action(true)));
        #[allow(deprecated)] // the file's own add, with its new deletion vector
        let mut add = file.add_action();
        add.deletion_vector = Some(descriptor);
        add.data_change = true;
        add.stats = add.stats.as_deref().map(loose_bounds);
        actions.push(Action::Add(add));
    }
    actions.extend(adds.into_iter().map(Action::Add));
    let operation = operation(config, &keys, index.any_deletes());
    // What the marks depend on: the marked files stay as read, and no row with a changed key
    // arrives in a file written since.
    let depends = Depends {
        removes: marked
            .keys()
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
        Some(depends),
    )
    .await?;
    metrics.execution_time_ms = started.elapsed().as_millis() as u64;
    Ok(Outcome::Done(table, metrics))
}

/// `batches` as one batch sorted by the key columns `keys`.
pub(super) fn sorted_by_key(
    schema: &arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
    keys: &[String],
) -> Result<RecordBatch, DeltaTableError> {
    let all = match batches {
        [one] => one.clone(),
        _ => arrow::compute::concat_batches(schema, batches)?,
    };
    let columns = keys
        .iter()
        .map(|k| {
            let column = all.column_by_name(k).ok_or_else(|| {
                DeltaTableError::Generic(format!("key column `{k}` is missing from the changes"))
            })?;
            Ok(arrow::compute::SortColumn {
                values: column.clone(),
                options: None,
            })
        })
        .collect::<Result<Vec<_>, DeltaTableError>>()?;
    let order = arrow::compute::lexsort_to_indices(&columns, None)?;
    // Already in key order (a snapshot read in key order): no copy.
    if order
        .values()
        .iter()
        .enumerate()
        .all(|(i, &o)| i as u32 == o)
    {
        return Ok(all);
    }
    Ok(take_record_batch(&all, &order)?)
}

/// A data file's statistics with `tightBounds` false: once rows of the file are deleted, its
/// min/max may be wider than its live rows.
pub(super) fn loose_bounds(stats: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(stats) {
        Ok(serde_json::Value::Object(mut o)) => {
            o.insert("tightBounds".into(), serde_json::Value::Bool(false));
            serde_json::Value::Object(o).to_string()
        }
        _ => stats.to_string(),
    }
}
