//! Compaction's rewrite: small data files of a partition bin-packed into files of up to the
//! target size, and files whose deletion vector marks at least [`PURGE_FRACTION`] of their rows
//! rewritten without them (purged), so readers stop reading rows only to drop them and
//! merge-on-read tables do not grow without bound. lakesink's own rather than deltalake's
//! OPTIMIZE, which retries its commit on a newer state (see the last invariant).
//!
//! Invariants:
//! - The rewrite holds exactly the rewritten files' live rows (their rows minus their deletion
//!   vectors), each in its partition; the commit removes the files with the deletion vectors it
//!   read and adds the new files, with `dataChange = false` and no txn action, as an OPTIMIZE.
//! - Each bin of files (one partition, up to the target size) becomes one new file holding
//!   their live rows in order, so a row of a compacted file has a known place in it.
//! - The commit is made on the state the purge read or on a newer one it is carried to, where
//!   the rows deleted since are marked in the new files; a compacted file removed any other way
//!   since drops the compaction (see `rebase`).

use std::collections::BTreeMap;
use std::sync::Arc;

use deltalake::kernel::LogicalFileView;
use deltalake::writer::DeltaWriter;
use deltalake::{DeltaTable, DeltaTableError};
use futures::StreamExt;

use super::probe::{batches, read_error};
use super::rebase::{commit_rewrite, Bin, Source};
use super::rewrite::{conform, partition_values, BATCH_ROWS};
use super::sorted::{live, Merge, MERGE_BYTES};
use super::writer::write_rows;
use super::DeltaSink;

/// The share of a file's rows its deletion vector must mark for the file to be purged.
pub(super) const PURGE_FRACTION: f64 = 0.2;

/// Whether `file`'s deletion vector marks at least [`PURGE_FRACTION`] of its rows.
pub(super) fn worth_purging(file: &LogicalFileView) -> bool {
    match (file.deletion_vector_descriptor(), file.num_records()) {
        (Some(dv), Some(rows)) if rows > 0 => dv.cardinality as f64 >= PURGE_FRACTION * rows as f64,
        (Some(_), None) => true,
        _ => false,
    }
}

impl DeltaSink {
    /// Compacts `table` on the state it read: in each partition (directory), the data files
    /// smaller than `target` when there are at least two of them, and every file worth purging,
    /// are rewritten with their live rows into files of up to `target` bytes; returns the table
    /// after the commit (or as it was: nothing to do), the files purged, removed and written.
    pub(super) async fn rewrite_small_and_marked(
        &self,
        table: &DeltaTable,
        target: u64,
    ) -> Result<(DeltaTable, Rewritten), DeltaTableError> {
        let state = table.snapshot()?;
        let all: Vec<LogicalFileView> = state.log_data().iter().collect();
        let mut small: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (n, f) in all.iter().enumerate() {
            if (f.size().max(0) as u64) < target {
                small.entry(directory(f)).or_default().push(n);
            }
        }
        let mut chosen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut done = Rewritten::default();
        for (n, f) in all.iter().enumerate() {
            let dir = directory(f);
            let packed = small
                .get(&dir)
                .is_some_and(|s| s.len() >= 2 && s.contains(&n));
            if worth_purging(f) {
                done.purged += 1;
            } else if !packed {
                continue;
            }
            chosen.entry(dir).or_default().push(n);
        }
        if chosen.is_empty() {
            return Ok((table.clone(), done));
        }
        let partition_columns: Vec<String> = state.metadata().partition_columns().to_vec();
        let schema = state.snapshot().arrow_schema();
        let file_schema = Arc::new(arrow::datatypes::Schema::new(
            schema
                .fields()
                .iter()
                .filter(|f| !partition_columns.contains(f.name()))
                .cloned()
                .collect::<Vec<_>>(),
        ));
        let store = table.log_store().object_store(None);
        let root = table.log_store().root_url().clone();
        let mut bins = Vec::new();
        // A bin at a time (files of one partition of up to `target` bytes together), each
        // written into one new file and closed before the next opens.
        for files in chosen.into_values() {
            for bin in pack(&all, files, target) {
                let keys = self.config.upsert.as_ref().map_or(&[][..], |u| &u.keys[..]);
                // One file per bin: the place of each source's rows in it is known.
                let mut writer = self.keyed_writer(
                    schema.clone(),
                    &partition_columns,
                    None,
                    keys,
                    Some(u64::MAX),
                )?;
                let values = partition_values(&all[bin[0]], &partition_columns)?;
                let mut sources = Vec::with_capacity(bin.len());
                let mut base = 0u64;
                // Upsert tables' files are sorted by key: merged a few at a time, each bin's
                // file is a few sorted runs instead of one per file (see `sorted`).
                for group in merge_groups(&all, bin, !keys.is_empty()) {
                    let mut read = Vec::with_capacity(group.len());
                    for &n in &group {
                        let deleted = match all[n].deletion_vector_descriptor() {
                            Some(dv) => super::dv::read(store.as_ref(), &root, &dv).await?,
                            None => roaring::RoaringTreemap::new(),
                        };
                        read.push((&all[n], deleted));
                    }
                    done.removed += group.len();
                    let merge = match group.len() {
                        1 => None,
                        _ => Merge::open(&store, read.clone(), &file_schema, keys, base).await?,
                    };
                    let Some(mut merge) = merge else {
                        for (file, deleted) in read {
                            let first = base;
                            base += copy_live(
                                &store,
                                file,
                                &deleted,
                                &file_schema,
                                &values,
                                &mut writer,
                            )
                            .await?;
                            sources.push(Source {
                                path: file.remove_action(false).path,
                                dv0: deleted,
                                base: first,
                                positions: None,
                            });
                        }
                        continue;
                    };
                    while let Some(rows) = merge.next().await? {
                        write_rows(&mut writer, rows, &values).await?;
                    }
                    let (positions, end) = merge.positions();
                    for ((file, deleted), positions) in read.into_iter().zip(positions) {
                        sources.push(Source {
                            path: file.remove_action(false).path,
                            dv0: deleted,
                            base,
                            positions: Some(positions),
                        });
                    }
                    base = end;
                }
                let adds = writer.flush().await?;
                done.written += adds.len();
                bins.push(Bin { sources, adds });
            }
        }
        let table = commit_rewrite(table, state, bins, target).await?;
        Ok((table, done))
    }
}

/// Copies `file`'s live rows (all but `deleted`), conformed to `schema`, into `writer`, into
/// the partition `values`; returns how many.
async fn copy_live(
    store: &Arc<dyn object_store::ObjectStore>,
    file: &LogicalFileView,
    deleted: &roaring::RoaringTreemap,
    schema: &arrow::datatypes::SchemaRef,
    values: &super::PartitionValues,
    writer: &mut deltalake::writer::RecordBatchWriter,
) -> Result<u64, DeltaTableError> {
    let path = file.object_store_path();
    let mut stream = batches(store, file, BATCH_ROWS).await?;
    let (mut at, mut written) = (0u64, 0u64);
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(read_error(&path))?;
        let rows = batch.num_rows() as u64;
        let kept = live(batch, deleted, at)?;
        at += rows;
        written += kept.num_rows() as u64;
        if kept.num_rows() > 0 {
            write_rows(writer, conform(&kept, schema)?, values).await?;
        }
    }
    Ok(written)
}

/// A bin's files in the groups merged at once: with `sorted`, consecutive files of up to
/// [`MERGE_BYTES`] together; otherwise each file alone.
fn merge_groups(all: &[LogicalFileView], bin: Vec<usize>, sorted: bool) -> Vec<Vec<usize>> {
    if !sorted {
        return bin.into_iter().map(|n| vec![n]).collect();
    }
    pack(all, bin, MERGE_BYTES)
}

/// Files `files` (of one partition) in bins of up to `target` bytes together, in order; a file
/// larger than `target` (a purge) is a bin of its own.
fn pack(all: &[LogicalFileView], files: Vec<usize>, target: u64) -> Vec<Vec<usize>> {
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for n in files {
        let bytes = all[n].size().max(0) as u64;
        match bins.last_mut() {
            Some(bin) if size + bytes <= target => {
                bin.push(n);
                size += bytes;
            }
            _ => {
                bins.push(vec![n]);
                size = bytes;
            }
        }
    }
    bins
}

/// What [`DeltaSink::rewrite_small_and_marked`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Rewritten {
    /// Files rewritten for their deletion vectors.
    pub purged: usize,
    /// Files removed (the purged ones included).
    pub removed: usize,
    /// Files written.
    pub written: usize,
}

/// A data file's directory: its partition.
pub(super) fn directory(file: &LogicalFileView) -> String {
    let path = file.path();
    path.rsplit_once('/').map_or("", |(d, _)| d).to_string()
}
