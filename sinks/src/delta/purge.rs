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
//! - The commit is made on the state the purge read, or not at all: when anything was
//!   committed since, the purge is dropped (its files stay unreferenced) and tried again later.
//!   A concurrent upsert may have marked the same file, and a concurrent compaction may have
//!   rewritten it; deltalake's conflict checker catches neither case for removes with
//!   `dataChange = false`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::BooleanArray;
use arrow::compute::filter_record_batch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, LogicalFileView};
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter, WriteMode};
use deltalake::{DeltaTable, DeltaTableError};
use futures::StreamExt;

use super::probe::{read_error, reader};
use super::rewrite::{conform, partition_values, BATCH_ROWS};
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
        let mut writer = RecordBatchWriter::try_new(
            self.url.as_str(),
            schema.clone(),
            Some(partition_columns.clone()),
            Some(self.options.clone()),
        )?
        .with_writer_properties(crate::encode::writer_properties_keyed(
            self.config.compression,
            self.config.row_group_rows,
            None,
            self.config.upsert.as_ref().map_or(&[][..], |u| &u.keys[..]),
        ))
        .with_target_file_size(target.max(1));
        let mut actions = Vec::new();
        // A partition at a time: its files closed before the next partition's open.
        for files in chosen.into_values() {
            for n in files {
                let file = &all[n];
                let values = partition_values(file, &partition_columns)?;
                let deleted = match file.deletion_vector_descriptor() {
                    Some(dv) => super::dv::read(store.as_ref(), &root, &dv).await?,
                    None => roaring::RoaringTreemap::new(),
                };
                let path = file.object_store_path();
                let mut stream = reader(&store, file, false)
                    .await?
                    .with_batch_size(BATCH_ROWS)
                    .build()
                    .map_err(read_error(&path))?;
                let mut at = 0u64;
                while let Some(batch) = stream.next().await {
                    let batch = batch.map_err(read_error(&path))?;
                    let rows = batch.num_rows() as u64;
                    let kept = if deleted.is_empty() {
                        batch
                    } else {
                        let keep = BooleanArray::from_iter(
                            (0..rows).map(|i| Some(!deleted.contains(at + i))),
                        );
                        filter_record_batch(&batch, &keep)?
                    };
                    at += rows;
                    if kept.num_rows() > 0 {
                        writer
                            .write_partition(
                                conform(&kept, &file_schema)?,
                                &values,
                                WriteMode::Default,
                            )
                            .await?;
                    }
                }
                actions.push(Action::Remove(file.remove_action(false)));
                done.removed += 1;
            }
            for mut add in writer.flush().await? {
                add.data_change = false;
                actions.push(Action::Add(add));
                done.written += 1;
            }
        }
        let table = commit_rewrite(table, state, actions, target).await?;
        Ok((table, done))
    }
}

/// Commits a compaction's `actions` (removes and adds with `dataChange = false`) read on
/// `state`. deltalake does not compare removes with `dataChange = false` against each other, so
/// it would commit two compactions of the same files (every row twice): here each commit is
/// made on one known state only, and when others committed since, their log entries are read.
/// Entries that removed none of the files this one removes (appends, other partitions'
/// compactions) leave it valid on the newer state, where it is tried again; one that removed
/// such a file makes it a conflict, and the compaction is dropped.
async fn commit_rewrite(
    table: &DeltaTable,
    state: &deltalake::table::state::DeltaTableState,
    actions: Vec<Action>,
    target: u64,
) -> Result<DeltaTable, DeltaTableError> {
    let ours: std::collections::HashSet<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(r) => Some(r.path.clone()),
            _ => None,
        })
        .collect();
    let log = table.log_store();
    let mut state = state.clone();
    for _ in 0..20 {
        let properties = CommitProperties::default()
            .with_max_retries(0)
            .with_cleanup_expired_logs(Some(false));
        let result = CommitBuilder::from(properties)
            .with_actions(actions.clone())
            .build(
                Some(&state),
                log.clone(),
                DeltaOperation::Optimize {
                    predicate: None,
                    target_size: target as i64,
                },
            )
            .await;
        let err = match result {
            Ok(committed) => {
                let mut table = table.clone();
                table.state = Some(committed.snapshot);
                return Ok(table);
            }
            Err(e) if super::is_conflict(&e) => e,
            Err(e) => return Err(e),
        };
        let latest = log.get_latest_version(state.version()).await?;
        for version in state.version() + 1..=latest {
            let Some(entry) = log.read_commit_entry(version).await? else {
                continue;
            };
            for line in String::from_utf8_lossy(&entry).lines() {
                let action: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| DeltaTableError::Generic(format!("log entry {version}: {e}")))?;
                if let Some(path) = action.pointer("/remove/path").and_then(|p| p.as_str()) {
                    let decoded = percent_decode(path);
                    if ours.contains(path) || ours.contains(&decoded) {
                        return Err(DeltaTableError::Generic(format!(
                            "log entry {version} removed {path}, which this compaction rewrote \
                             ({err})"
                        )));
                    }
                }
            }
        }
        state.update(log.as_ref(), Some(latest)).await?;
    }
    Err(DeltaTableError::Generic(
        "the table kept changing under the compaction".into(),
    ))
}

/// `path` with its `%XX` escapes decoded (log paths are URL-encoded).
fn percent_decode(path: &str) -> String {
    url::form_urlencoded::parse(format!("p={}", path.replace('+', "%2B")).as_bytes())
        .next()
        .map_or_else(|| path.to_string(), |(_, v)| v.into_owned())
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
