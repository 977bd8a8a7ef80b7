//! Compaction that runs itself (`[sink.delta] auto_compact`): after a commit, when a table
//! partition has gathered `min_files` data files smaller than the target size, or a data file's
//! deletion vector marks a fifth of its rows, this process compacts the table in the background
//! (see `purge`: small files of each partition bin-packed towards the target size, files with
//! such deletion vectors rewritten without the deleted rows), and at most once an hour vacuums
//! what is unreferenced for longer than the retention.
//!
//! Invariants:
//! - Writers are never blocked: the compaction works on its own handle of the table, not the
//!   one commits go through. Its commit changes no data (`dataChange = false`) and no txn action.
//! - Nothing is lost or doubled: a compaction commit removes exactly the files whose rows its
//!   new files hold, in one log entry, on the state it read or on a newer one it is carried to
//!   (appends since, and deletion vectors given since to the files it rewrote, whose rows it
//!   marks in its new files; see `rebase`); any other removal of those files drops it (its
//!   files stay unreferenced), and it is tried again at a later commit. deltalake's conflict
//!   checker does not compare removes with `dataChange = false`: two compactions of the same
//!   files (two members) would both commit, and an upsert could commit its rewrite of a file a
//!   compaction had just rewritten, each keeping the rows twice. So compactions and upserts do
//!   their own conflict checks, and only appends, which remove nothing, are retried on a newer
//!   state by deltalake.
//! - A crash before the entry leaves only unreferenced files.
//! - Vacuum deletes only files unreferenced for longer than `vacuum_retention` (at least an
//!   hour, longer than any flush waits between writing its files and committing them).
//! - At most one compaction per table runs in a process at a time, at least `MIN_GAP` apart.
//!   Members of a group each compact the tables they write; of two compacting at once, the one
//!   that commits second finds the table changed and drops its work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::*;

/// The least time between two compactions of a table by one process.
const MIN_GAP: Duration = Duration::from_secs(60);

/// How often a process vacuums a table it compacts.
const VACUUM_EVERY: Duration = Duration::from_secs(3600);

/// `[sink.delta] auto_compact`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoCompact {
    /// A table partition with this many data files smaller than `target_file_size` is
    /// compacted.
    pub min_files: usize,
    /// Files are bin-packed towards this size; larger files are left alone.
    pub target_file_size: u64,
    /// Unreferenced files older than this are vacuumed.
    pub vacuum_retention: Duration,
}

/// The state of a table's background compaction in this process.
#[derive(Debug, Default)]
pub(super) struct Compactor {
    pub(super) running: AtomicBool,
    pub(super) last: std::sync::Mutex<Option<Instant>>,
    last_vacuum: std::sync::Mutex<Option<Instant>>,
}

impl DeltaSink {
    /// After a commit of `state`: starts a compaction in the background when one is due.
    pub(super) fn maybe_compact(&self, state: &deltalake::table::state::DeltaTableState) {
        let Some(auto) = self.config.auto_compact else {
            return;
        };
        let c = &self.compactor;
        if c.running.load(Ordering::Acquire)
            || c.last
                .lock()
                .expect("poisoned")
                .is_some_and(|t| t.elapsed() < MIN_GAP)
        {
            return;
        }
        let most = most_small_files(state, auto.target_file_size);
        if most < auto.min_files
            && !state
                .log_data()
                .iter()
                .any(|f| super::purge::worth_purging(&f))
        {
            return;
        }
        if c.running.swap(true, Ordering::AcqRel) {
            return;
        }
        *c.last.lock().expect("poisoned") = Some(Instant::now());
        let this = self.clone_for_io();
        let compactor = self.compactor.clone();
        debug!(table = %self.location, small_files = most, "starting a background compaction");
        tokio::spawn(async move {
            let vacuum = compactor
                .last_vacuum
                .lock()
                .expect("poisoned")
                .is_none_or(|t| t.elapsed() >= VACUUM_EVERY);
            match this.compact(auto, vacuum).await {
                Ok(report) => {
                    if vacuum {
                        *compactor.last_vacuum.lock().expect("poisoned") = Some(Instant::now());
                    }
                    info!(table = %this.location, purged = report.files_purged,
                        compacted = report.files_compacted,
                        written = report.files_written, vacuumed = report.files_vacuumed,
                        version = ?report.version_after, "background compaction committed");
                }
                Err(e) => info!(table = %this.location,
                    "background compaction dropped (nothing changed; tried again later): {e}"),
            }
            compactor.running.store(false, Ordering::Release);
        });
    }

    /// One compaction (and vacuum, when `vacuum`) of the table on a handle of its own.
    pub(super) async fn compact(&self, auto: AutoCompact, vacuum: bool) -> Result<MaintainReport> {
        let mut table = self.builder()?.build().map_err(|e| self.err("open", e))?;
        table.load().await.map_err(|e| self.err("load", e))?;
        let retention = vacuum.then_some(auto.vacuum_retention);
        let (_, report) = self
            .compact_table(table, auto.target_file_size, retention)
            .await?;
        Ok(report)
    }
}

/// The most data files smaller than `target` that one table partition (one directory) holds.
fn most_small_files(state: &deltalake::table::state::DeltaTableState, target: u64) -> usize {
    let mut per_dir: HashMap<String, usize> = HashMap::new();
    for f in state.log_data().iter() {
        if (f.size().max(0) as u64) >= target {
            continue;
        }
        *per_dir.entry(super::purge::directory(&f)).or_default() += 1;
    }
    per_dir.into_values().max().unwrap_or(0)
}

/// Shared between the sink and its background compaction task.
pub(super) type SharedCompactor = Arc<Compactor>;
