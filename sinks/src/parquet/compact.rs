//! Compaction of Parquet tables through the marker protocol: small published files of one table
//! partition (Hive directory) are merged into larger ones, and a compaction record says which
//! files replaced which.
//!
//! ```text
//!  read ─► the directory's chain end: <table>/_lakesink/compactions/<dir>/_chain/<seq>.json
//!    │       (listed from the hint `<dir>/_last.json`; finished first if a crash interrupted it)
//!  pick ─► published files below the target size, older than min_age, whose markers' staged
//!    │       copies are gone (nothing can publish them again); grouped by schema, bin-packed
//!  stage ─► <table>/_lakesink/compaction-staging/<dir>/<seq>-<rand>-<i>.parquet.staged
//!    │
//!  commit ─► PUT If-None-Match:* <dir's chain>/<seq+1>.json  (the fence: one per sequence)
//!    │        AlreadyExists ⇒ another member compacted this directory first: drop the work
//!  finish ─► copy each staged output to <dir>/compacted-<seq>-<i>.parquet, delete the sources,
//!             delete the staged outputs (idempotent; redone by the next compaction)
//! ```
//!
//! Invariants:
//! - Compactions of one directory form a chain: sequence `n + 1` is created once, by a writer
//!   that read and finished `n`. So two compactions never take the same file, and a file is
//!   only taken once the compaction that wrote it is finished.
//! - A file is taken only when nothing can publish it again: its marker's staged copies are
//!   gone, and it was published at least `min_age` ago (a zombie's copy begun before the staged
//!   copy's deletion has that long to end).
//! - Commit markers are untouched: positions and the exactly-once fence are the markers'.
//!   A reader that follows the markers reads, for each directory, the files the markers list,
//!   minus the `sources` of every compaction record, plus their `outputs`: each record is
//!   atomic for it. A reader that lists directories sees, while a compaction finishes (between
//!   the first output's copy and the last source's deletion), some rows twice; a crash there
//!   leaves that until the next compaction of the directory, or a writer's first commit to it
//!   after a restart, finishes it.
//! - A publish that finds neither the staged copy nor the published file accepts it when a
//!   compaction record took the file (a fenced writer publishing the winner's old marker).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::committer::{offset_key, ParquetSink, META};
use super::config::ParquetCompact;
use super::writer::StagedFile;
use crate::{Error, Result};

const RECORD_VERSION: u32 = 1;

/// Compaction outputs are named `compacted-<seq>-<i>.parquet` (no `+`, which every marker's
/// file name has and no Kafka topic name can).
pub(super) const OUTPUT_PREFIX: &str = "compacted-";

/// How far a compaction record's clock may run behind the marker of a file it took.
const CLOCK_SLACK_MS: i64 = 3_600_000;

/// The commit record of one compaction of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compaction {
    /// The record format's version.
    pub version: u32,
    /// The writer that committed, for humans.
    pub writer: String,
    /// The table partition, relative to the table root (empty: an unpartitioned table).
    pub dir: String,
    /// Position in the directory's chain (from 1).
    pub seq: u64,
    /// The files whose rows the outputs hold; gone once finished.
    pub sources: Vec<CompactedFile>,
    /// The new files.
    pub outputs: Vec<StagedFile>,
    /// When the record was written (ms since the epoch).
    pub committed_at_ms: i64,
}

/// A compaction under way: written before its record and deleted after its finish, so a
/// restart finds the compactions a crash interrupted without listing every chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Intent {
    dir: String,
    seq: u64,
    at_ms: i64,
}

/// An intent older than this whose record does not exist is a compaction that died before its
/// record (or lost it): deleted.
const STALE_INTENT_MS: i64 = 3_600_000;

/// `_lakesink/compactions/<dir>/_last.json`: a finished record of the directory's chain, where
/// a process starts listing it (records are only ever added after it; a stale hint only makes
/// the listing longer).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LastHint {
    seq: u64,
}

/// A file a compaction took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactedFile {
    /// Path relative to the table root.
    pub path: String,
    /// Rows in the file.
    pub rows: u64,
    /// The file's size.
    pub bytes: u64,
}

/// What a compaction (of a directory, or of every directory) did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    /// Directories looked at.
    pub dirs: usize,
    /// Files merged (and deleted).
    pub files_compacted: usize,
    /// Files written.
    pub files_written: usize,
    /// Compactions that lost their directory's chain to another writer (work dropped).
    pub dropped: usize,
}

impl std::ops::AddAssign for CompactReport {
    fn add_assign(&mut self, o: Self) {
        self.dirs += o.dirs;
        self.files_compacted += o.files_compacted;
        self.files_written += o.files_written;
        self.dropped += o.dropped;
    }
}

/// The background compaction's state in this process (`auto_compact`).
#[derive(Debug, Default)]
pub(super) struct Compactor {
    pub(super) running: AtomicBool,
    pub(super) last: Mutex<Option<Instant>>,
    /// Files committed per directory since its last compaction by this process.
    pub(super) pending: Mutex<HashMap<String, usize>>,
    /// The last chain position known per directory (its records are listed after it).
    known: Mutex<HashMap<String, u64>>,
    /// Whether this process has finished the compactions a crash interrupted.
    resumed: AtomicBool,
    /// Shutting down: no compaction starts, a waiting one gives up.
    pub(super) closing: AtomicBool,
}

/// The directory of a path relative to the table root (empty at the root).
pub(super) fn parent(rel: &str) -> &str {
    rel.rsplit_once('/').map_or("", |(d, _)| d)
}

impl ParquetSink {
    pub(super) fn dir_path(&self, dir: &str) -> Path {
        self.table.path(dir.split('/').filter(|s| !s.is_empty()))
    }

    fn chain_dir(&self, dir: &str) -> Path {
        let mut parts = vec![META, "compactions"];
        parts.extend(dir.split('/').filter(|s| !s.is_empty()));
        parts.push("_chain");
        self.table.path(parts)
    }

    fn record_path(&self, dir: &str, seq: u64) -> Path {
        self.chain_dir(dir)
            .join(format!("{}.json", offset_key(seq as i64)).as_str())
    }

    fn last_hint_path(&self, dir: &str) -> Path {
        let mut parts = vec![META, "compactions"];
        parts.extend(dir.split('/').filter(|s| !s.is_empty()));
        parts.push("_last.json");
        self.table.path(parts)
    }

    fn intents_dir(&self) -> Path {
        self.table.path([META, "compactions", "_open"])
    }

    /// Finishes every compaction a crash interrupted (their intents are still there), once per
    /// process; called at recovery. Errors are logged: compaction never stops a partition.
    pub(super) async fn resume_compactions(&self) {
        if self.compactor.resumed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.finish_interrupted().await {
            info!(
                table = self.table.location(),
                "finishing interrupted compactions failed (tried again later): {e}"
            );
            self.compactor.resumed.store(false, Ordering::Release);
        }
    }

    pub(super) async fn finish_interrupted(&self) -> Result<usize> {
        let dir = self.intents_dir();
        let intents: Vec<ObjectMeta> = self
            .table
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.table.err(&dir, e))?;
        let mut finished = 0;
        for meta in intents {
            let Some(intent) = self.read_json::<Intent>(&meta.location).await? else {
                continue;
            };
            match self
                .read_json::<Compaction>(&self.record_path(&intent.dir, intent.seq))
                .await?
            {
                Some(record) => {
                    info!(
                        table = self.table.location(),
                        dir = intent.dir,
                        seq = intent.seq,
                        "finishing an interrupted compaction"
                    );
                    self.finish(&record).await?;
                    finished += 1;
                }
                None if chrono::Utc::now().timestamp_millis() - intent.at_ms < STALE_INTENT_MS => {
                    continue
                }
                None => {}
            }
            match self.table.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.table.err(&meta.location, e)),
            }
        }
        Ok(finished)
    }

    pub(super) fn compaction_err(&self, dir: &str, reason: impl std::fmt::Display) -> Error {
        Error::Compaction {
            table: self.table.location().to_string(),
            dir: if dir.is_empty() {
                "/".into()
            } else {
                dir.into()
            },
            reason: reason.to_string(),
        }
    }

    /// The record paths of `dir`'s chain after position `after`, in order.
    async fn records_after(&self, dir: &str, after: Option<u64>) -> Result<Vec<Path>> {
        let chain = self.chain_dir(dir);
        let list = match after {
            Some(seq) => self
                .table
                .store
                .list_with_offset(Some(&chain), &self.record_path(dir, seq)),
            None => self.table.store.list(Some(&chain)),
        };
        let mut paths: Vec<Path> = list
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| self.table.err(&chain, e))?;
        paths.retain(|p| p.as_ref().ends_with(".json"));
        paths.sort();
        Ok(paths)
    }

    async fn read_record(&self, path: &Path) -> Result<Compaction> {
        self.read_json(path)
            .await?
            .ok_or_else(|| Error::CorruptMarker {
                table: self.table.location().to_string(),
                path: path.to_string(),
                reason: "listed but vanished".into(),
            })
    }

    /// The last compaction record of `dir`, if any.
    pub async fn last_compaction(&self, dir: &str) -> Result<Option<Compaction>> {
        let mut known = self
            .compactor
            .known
            .lock()
            .expect("poisoned")
            .get(dir)
            .copied();
        if known.is_none() {
            // A finished record's position, so the chain is not listed from its start.
            known = self
                .read_json::<LastHint>(&self.last_hint_path(dir))
                .await?
                .map(|h| h.seq);
        }
        let newer = self.records_after(dir, known).await?;
        let record = match (newer.last(), known) {
            (Some(p), _) => Some(self.read_record(p).await?),
            (None, Some(seq)) => self.read_json(&self.record_path(dir, seq)).await?,
            (None, None) => None,
        };
        if let Some(r) = &record {
            self.compactor
                .known
                .lock()
                .expect("poisoned")
                .insert(dir.to_string(), r.seq);
        }
        Ok(record)
    }

    /// Whether a compaction record written after `since_ms` (less the clock slack) took `rel`.
    pub(super) async fn compacted_away(&self, rel: &str, since_ms: i64) -> Result<bool> {
        let dir = parent(rel);
        for path in self.records_after(dir, None).await?.iter().rev() {
            let record = self.read_record(path).await?;
            if record.sources.iter().any(|s| s.path == rel) {
                return Ok(true);
            }
            if record.committed_at_ms < since_ms - CLOCK_SLACK_MS {
                break;
            }
        }
        Ok(false)
    }

    /// Publishes a committed compaction's outputs and deletes its sources, then its staged
    /// copies. Idempotent: any number of writers may finish the same record.
    pub(super) async fn finish(&self, c: &Compaction) -> Result<()> {
        for out in &c.outputs {
            let (staged, dest) = (self.rel(&out.staged), self.rel(&out.path));
            match self.table.store.copy(&staged, &dest).await {
                Ok(()) | Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    if self.table.store.head(&dest).await.is_ok()
                        || self.compacted_away(&out.path, c.committed_at_ms).await?
                    {
                        continue;
                    }
                    return Err(self.compaction_err(
                        &c.dir,
                        format!(
                            "compaction {} lists `{}`, but neither its staged copy nor the \
                             published file exists, and no later compaction took it",
                            c.seq, out.path
                        ),
                    ));
                }
                Err(e) => return Err(self.table.err(&staged, e)),
            }
        }
        self.crash.at("mid_compaction");
        for src in &c.sources {
            let p = self.rel(&src.path);
            match self.table.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.table.err(&p, e)),
            }
        }
        for out in &c.outputs {
            let p = self.rel(&out.staged);
            match self.table.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.table.err(&p, e)),
            }
        }
        Ok(())
    }

    /// Finishes the last compaction of `dir` (a crash may have interrupted it).
    pub(super) async fn finish_pending(&self, dir: &str) -> Result<Option<Compaction>> {
        let last = self.last_compaction(dir).await?;
        if let Some(c) = &last {
            self.finish(c).await?;
        }
        Ok(last)
    }

    /// Compacts `dir` when at least `min_files` of its files may be taken; finishes its last
    /// compaction first.
    pub async fn compact_dir(
        &self,
        dir: &str,
        settings: &ParquetCompact,
        min_files: usize,
    ) -> Result<CompactReport> {
        let mut report = CompactReport {
            dirs: 1,
            ..Default::default()
        };
        let last = self.finish_pending(dir).await?;
        let seq = last.map_or(1, |c| c.seq + 1);
        let candidates = self.candidates(dir, settings, seq).await?;
        if candidates.len() < min_files.max(2) {
            return Ok(report);
        }
        let bins = self
            .bins(dir, candidates, settings.target_file_size)
            .await?;
        if bins.is_empty() {
            return Ok(report);
        }
        let rand = rand::random::<u64>();
        let mut outputs = Vec::with_capacity(bins.len());
        let mut sources = Vec::new();
        for (i, bin) in bins.iter().enumerate() {
            let name = format!("{OUTPUT_PREFIX}{}-{i}.parquet", offset_key(seq as i64));
            let staged = format!(
                "{META}/compaction-staging/{}{}-{rand:016x}-{i}.parquet.staged",
                if dir.is_empty() {
                    String::new()
                } else {
                    format!("{dir}/")
                },
                offset_key(seq as i64)
            );
            let (rows, bytes) = self.merge(dir, bin, &staged).await?;
            outputs.push(StagedFile {
                staged,
                path: if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                },
                rows,
                bytes,
            });
            sources.extend(bin.iter().cloned());
        }
        let record = Compaction {
            version: RECORD_VERSION,
            writer: self.config.writer_id.clone(),
            dir: dir.to_string(),
            seq,
            sources,
            outputs,
            committed_at_ms: chrono::Utc::now().timestamp_millis(),
        };
        self.crash.at("compaction_staged");
        if self.closing() {
            // Nothing is committed yet: the staged outputs are left for nobody, as any crash
            // before the record leaves them (they are under `_lakesink/`).
            for out in &record.outputs {
                let _ = self.table.store.delete(&self.rel(&out.staged)).await;
            }
            return Ok(report);
        }
        let intent = self
            .intents_dir()
            .join(format!("{}-{rand:016x}.json", offset_key(seq as i64)).as_str());
        let body = serde_json::to_vec(&Intent {
            dir: dir.to_string(),
            seq,
            at_ms: record.committed_at_ms,
        })
        .expect("intent serializes");
        self.table
            .store
            .put(&intent, PutPayload::from(body))
            .await
            .map_err(|e| self.table.err(&intent, e))?;
        let path = self.record_path(dir, seq);
        let body = serde_json::to_vec_pretty(&record).expect("record serializes");
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .table
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                debug!(
                    table = self.table.location(),
                    dir,
                    seq,
                    "another writer compacted this directory first; dropping this compaction"
                );
                for out in &record.outputs {
                    let _ = self.table.store.delete(&self.rel(&out.staged)).await;
                }
                let _ = self.table.store.delete(&intent).await;
                report.dropped = 1;
                return Ok(report);
            }
            Err(e) => return Err(self.table.err(&path, e)),
        }
        self.compactor
            .known
            .lock()
            .expect("poisoned")
            .insert(dir.to_string(), seq);
        self.crash.at("after_compaction_record");
        // Committed: a lister sees the sources beside the outputs until the finish is done,
        // so a store that fails for a moment is retried here rather than left to a restart.
        let mut attempt = 0u32;
        loop {
            match self.finish(&record).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() && attempt < 8 => {
                    attempt += 1;
                    debug!(
                        table = self.table.location(),
                        dir, seq, attempt, "finishing a compaction failed, retrying: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                }
                Err(e) => return Err(e),
            }
        }
        match self.table.store.delete(&intent).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.table.err(&intent, e)),
        }
        let hint = serde_json::to_vec(&LastHint { seq }).expect("hint serializes");
        if let Err(e) = self
            .table
            .store
            .put(&self.last_hint_path(dir), PutPayload::from(hint))
            .await
        {
            debug!(
                table = self.table.location(),
                dir, "could not write the chain hint: {e}"
            );
        }
        report.files_compacted = record.sources.len();
        report.files_written = record.outputs.len();
        info!(
            table = self.table.location(),
            dir,
            seq,
            files = report.files_compacted,
            written = report.files_written,
            rows = record.outputs.iter().map(|o| o.rows).sum::<u64>(),
            "compacted"
        );
        Ok(report)
    }

    /// `lakesink maintain`: finishes and runs a compaction of every directory of the table
    /// holding two or more files that may be taken.
    pub async fn compact_table(&self) -> Result<CompactReport> {
        self.finish_interrupted().await?;
        let root = self.table.root.clone();
        let meta_prefix = self.table.path([META]);
        let dirs: std::collections::BTreeSet<String> = self
            .table
            .store
            .list(Some(&root))
            .try_filter(|m| {
                futures::future::ready(
                    !m.location.prefix_matches(&meta_prefix)
                        && m.location.as_ref().ends_with(".parquet"),
                )
            })
            .map_ok(|m| parent(&self.relative(&m.location)).to_string())
            .try_collect()
            .await
            .map_err(|e| self.table.err(&root, e))?;
        let mut report = CompactReport::default();
        for dir in dirs {
            report += self.compact_dir(&dir, &self.config.compact, 2).await?;
        }
        Ok(report)
    }
}

/// Shared between a sink and its background compaction task.
pub(super) type SharedCompactor = Arc<Compactor>;
