//! The Parquet commit protocol: staging, the fenced marker create, publishing and recovery.
//! See the module docs of [`crate::parquet`] for the protocol and its invariants.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::compact::SharedCompactor;
use super::config::ParquetSinkConfig;
use super::writer::{encode, StagedFile};
use crate::crash::{CrashHook, CrashPoints};
use crate::store::TableStore;
use crate::{
    CommitOutcome, CommitStats, Error, Flush, Offset, Result, Sink, Staged, TopicIdentity,
    TopicPartition,
};

pub(super) const META: &str = "_lakesink";
const MARKER_VERSION: u32 = 1;

/// The commit record of one flush: `_lakesink/commits/<topic>/<partition>/<start>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The marker format's version.
    pub version: u32,
    /// The writer that committed (its sink name and a per-process id), for humans.
    pub writer: String,
    /// The source topic.
    pub topic: String,
    /// The source partition.
    pub partition: i32,
    /// Position this flush starts at (the fence key).
    pub start: i64,
    /// One past the last offset included.
    pub next: i64,
    /// Rows in the flush's files.
    pub rows: u64,
    /// The flush's data files, the only ones readers may count.
    pub files: Vec<MarkerFile>,
    /// Arrow schema of the data, as `name: type` strings, for humans and tools.
    pub columns: Vec<String>,
    /// When the marker was written (ms since the epoch).
    pub committed_at_ms: i64,
}

/// A data file a marker lists.
pub type MarkerFile = StagedFile;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hint {
    /// Start of the last marker known published.
    marker_start: i64,
    next: i64,
}

/// A Parquet table with the marker commit protocol.
pub struct ParquetSink {
    pub(super) table: TableStore,
    pub(super) config: ParquetSinkConfig,
    /// Commits since the last hint, per partition.
    since_hint: Mutex<HashMap<TopicPartition, u32>>,
    pub(super) crash: CrashPoints,
    /// Background compaction (`auto_compact`), shared with its task.
    pub(super) compactor: SharedCompactor,
}

impl std::fmt::Debug for ParquetSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetSink")
            .field("table", &self.table.location())
            .field("config", &self.config)
            .finish()
    }
}

pub(super) fn offset_key(o: i64) -> String {
    format!("{o:020}")
}

impl ParquetSink {
    /// A sink writing to `table` (nothing is read or written until the first call).
    pub fn new(table: TableStore, config: ParquetSinkConfig) -> Self {
        Self {
            table,
            config,
            since_hint: Mutex::new(HashMap::new()),
            crash: CrashPoints::default(),
            compactor: SharedCompactor::default(),
        }
    }

    /// A handle on the same table for a background task (its own hint counters).
    pub(super) fn clone_for_io(&self) -> Self {
        Self {
            table: self.table.clone(),
            config: self.config.clone(),
            since_hint: Mutex::new(HashMap::new()),
            crash: self.crash.clone(),
            compactor: self.compactor.clone(),
        }
    }

    /// Installs a hook called at each named point of the commit protocol (tests only).
    pub fn with_crash_hook(mut self, hook: CrashHook) -> Self {
        self.crash.set(hook);
        self
    }

    /// The table's store and root.
    pub fn table(&self) -> &TableStore {
        &self.table
    }

    fn commits_dir(&self, tp: &TopicPartition) -> Path {
        self.table
            .path([META, "commits", &tp.topic, &tp.partition.to_string()])
    }

    pub(crate) fn marker_path(&self, tp: &TopicPartition, start: i64) -> Path {
        self.commits_dir(tp)
            .join(format!("{}.json", offset_key(start)).as_str())
    }

    pub(super) fn staging_dir(&self, tp: &TopicPartition) -> Path {
        self.table
            .path([META, "staging", &tp.topic, &tp.partition.to_string()])
    }

    fn hint_path(&self, tp: &TopicPartition) -> Path {
        self.table.path([
            META,
            "checkpoints",
            &tp.topic,
            &format!("{}.json", tp.partition),
        ])
    }

    pub(super) fn rel(&self, rel: &str) -> Path {
        self.table.rel(rel)
    }

    pub(super) async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &Path,
    ) -> Result<Option<T>> {
        match self.table.store.get(path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(|e| self.table.err(path, e))?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::CorruptMarker {
                        table: self.table.location().to_string(),
                        path: path.to_string(),
                        reason: e.to_string(),
                    })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.table.err(path, e)),
        }
    }

    /// Reads the marker committed at `start`, if any.
    pub async fn read_marker(&self, tp: &TopicPartition, start: Offset) -> Result<Option<Marker>> {
        self.read_json(&self.marker_path(tp, start.0)).await
    }

    /// Lists the markers of `tp` in position order, starting after the recovery hint.
    async fn markers_after(&self, tp: &TopicPartition, after: Option<i64>) -> Result<Vec<Marker>> {
        let dir = self.commits_dir(tp);
        let list = match after {
            Some(start) => self
                .table
                .store
                .list_with_offset(Some(&dir), &self.marker_path(tp, start)),
            None => self.table.store.list(Some(&dir)),
        };
        let mut metas: Vec<_> = list
            .try_collect()
            .await
            .map_err(|e| self.table.err(&dir, e))?;
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            if !meta.location.as_ref().ends_with(".json") {
                continue;
            }
            let marker: Marker =
                self.read_json(&meta.location)
                    .await?
                    .ok_or_else(|| Error::CorruptMarker {
                        table: self.table.location().to_string(),
                        path: meta.location.to_string(),
                        reason: "listed but vanished".into(),
                    })?;
            out.push(marker);
        }
        Ok(out)
    }

    /// Copies a marker's staged files to their final paths and deletes the staged copies.
    /// Idempotent: any number of writers may publish the same marker concurrently.
    async fn publish(&self, marker: &Marker) -> Result<()> {
        for (i, f) in marker.files.iter().enumerate() {
            if i == 1 {
                self.crash.at("mid_publish");
            }
            let staged = self.rel(&f.staged);
            let dest = self.rel(&f.path);
            match self.table.store.copy(&staged, &dest).await {
                Ok(()) => {}
                // The published file is there already: an earlier publish of this marker whose
                // answer was lost, or another publisher. Its path names this marker's start
                // offset, which one marker owns, so it holds these rows. Stores whose copy is
                // create-only report that as AlreadyExists (GCS through object_store 0.13).
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    // Someone else published it already; the destination must then exist,
                    // unless a compaction has taken it since.
                    if self.table.store.head(&dest).await.is_ok()
                        || self.compacted_away(&f.path, marker.committed_at_ms).await?
                    {
                        continue;
                    }
                    return Err(Error::Chain {
                        table: self.table.location().to_string(),
                        tp: TopicPartition::new(marker.topic.as_str(), marker.partition),
                        reason: format!(
                            "marker at {} lists `{}` but neither the staged copy nor the \
                                 published file exists, and no compaction took it",
                            marker.start, f.path
                        ),
                    });
                }
                Err(e) => return Err(self.table.err(&staged, e)),
            }
        }
        for f in &marker.files {
            let staged = self.rel(&f.staged);
            match self.table.store.delete(&staged).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.table.err(&staged, e)),
            }
        }
        Ok(())
    }

    async fn write_hint(&self, tp: &TopicPartition, marker: &Marker) -> Result<()> {
        let path = self.hint_path(tp);
        let body = serde_json::to_vec(&Hint {
            marker_start: marker.start,
            next: marker.next,
        })
        .expect("hint serializes");
        self.table
            .store
            .put(&path, PutPayload::from(body))
            .await
            .map_err(|e| self.table.err(&path, e))?;
        Ok(())
    }

    async fn maybe_hint(&self, tp: &TopicPartition, marker: &Marker) -> Result<()> {
        let due = {
            let mut m = self.since_hint.lock().expect("hint counter");
            let n = m.entry(tp.clone()).or_insert(0);
            *n += 1;
            if *n >= self.config.hint_every {
                *n = 0;
                true
            } else {
                false
            }
        };
        if due {
            self.write_hint(tp, marker).await?;
        }
        Ok(())
    }

    /// The paths of `tp`'s staged objects that exist now (a marker naming one is not fully
    /// published).
    pub(super) async fn staged_now(&self, tp: &TopicPartition) -> Result<HashSet<String>> {
        let staging = self.staging_dir(tp);
        self.table
            .store
            .list(Some(&staging))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .map_err(|e| self.table.err(&staging, e))
    }

    /// Follows the marker chain of `tp` to its end. With `repair`, republishes markers whose
    /// staged files are still there and moves the recovery hint; without, only reads.
    async fn walk_chain(&self, tp: &TopicPartition, repair: bool) -> Result<Option<Offset>> {
        Ok(self.walk(tp, repair).await?.0)
    }

    /// [`Self::walk_chain`], with the last marker found after the hint (if any) and the hint.
    async fn walk(
        &self,
        tp: &TopicPartition,
        repair: bool,
    ) -> Result<(Option<Offset>, Option<Marker>, Option<Hint>)> {
        let hint: Option<Hint> = self.read_json(&self.hint_path(tp)).await?;
        let markers = self
            .markers_after(tp, hint.as_ref().map(|h| h.marker_start))
            .await?;
        let mut expected = hint.as_ref().map(|h| h.next);
        // Staged objects that still exist: only their markers need (re)publishing.
        let staged_now = self.staged_now(tp).await?;
        let mut last = None;
        for marker in markers {
            if let Some(exp) = expected {
                if marker.start < exp {
                    return Err(Error::Chain {
                        table: self.table.location().to_string(),
                        tp: tp.clone(),
                        reason: format!(
                            "marker at {} overlaps the chain that ends at {exp}",
                            marker.start
                        ),
                    });
                }
                if marker.start > exp {
                    // Every writer starts at a chain end, so a hole means a marker was lost
                    // (deleted by hand, or a store that lost a write): the records in it were
                    // read and perhaps published, but no commit says so. Stop this partition
                    // rather than resume after the hole and skip them.
                    return Err(Error::Chain {
                        table: self.table.location().to_string(),
                        tp: tp.clone(),
                        reason: format!(
                            "offsets {exp}..{} are in no commit: the marker `{}` is missing \
                             (deleted by hand?). The partition is not consumed rather than \
                             skip them; restore that marker, or write it with \
                             `\"files\": []` to accept that those records are not in the table",
                            marker.start,
                            self.marker_path(tp, exp)
                        ),
                    });
                }
            }
            let unpublished = marker
                .files
                .iter()
                .any(|f| staged_now.contains(self.rel(&f.staged).as_ref()));
            if unpublished && repair {
                info!(table = self.table.location(), %tp, start = marker.start,
                      "finishing an interrupted publish");
                self.publish(&marker).await?;
            }
            expected = Some(marker.next);
            last = Some(marker);
        }
        if let (Some(m), true) = (&last, repair) {
            self.write_hint(tp, m).await?;
        }
        Ok((expected.map(Offset), last, hint))
    }

    /// Deletes staged files of a lost flush that the winning marker does not reference.
    async fn discard(&self, staged: &Staged<Vec<StagedFile>>, winner: &Marker) {
        let keep: HashSet<&str> = winner.files.iter().map(|f| f.staged.as_str()).collect();
        for f in &staged.data {
            if keep.contains(f.staged.as_str()) {
                continue;
            }
            let p = self.rel(&f.staged);
            if let Err(e) = self.table.store.delete(&p).await {
                debug!(path = %p, error = %e, "could not delete a fenced writer's staged file");
            }
        }
    }
}

#[async_trait::async_trait]
impl Sink for ParquetSink {
    type Data = Vec<StagedFile>;

    async fn recover(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        self.resume_compactions().await;
        self.walk_chain(tp, true).await
    }

    async fn committed(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        self.walk_chain(tp, false).await
    }

    async fn last_commit(&self, tp: &TopicPartition) -> Result<Option<crate::LastCommit>> {
        let (next, last, hint) = self.walk(tp, false).await?;
        let Some(next) = next else {
            return Ok(None);
        };
        let last = match (last, hint) {
            (Some(m), _) => Some(m),
            // Nothing after the hint: the hinted marker is the last one.
            (None, Some(h)) => {
                self.read_json::<Marker>(&self.marker_path(tp, h.marker_start))
                    .await?
            }
            (None, None) => None,
        };
        Ok(Some(crate::LastCommit {
            next,
            at_ms: last.map(|m| m.committed_at_ms).filter(|ms| *ms > 0),
        }))
    }

    async fn adopt_topic_id(&self, topic: &str, topic_id: &str) -> Result<TopicIdentity> {
        let path = self.table.path([META, "topics", &format!("{topic}.json")]);
        crate::store::adopt_topic_id(
            &*self.table.store,
            self.table.location(),
            &path,
            topic,
            topic_id,
        )
        .await
    }

    async fn stage(&self, flush: Flush) -> Result<Staged<Vec<StagedFile>>> {
        let config = self.config.clone();
        let (flush, encoded) = crate::encode::encode_blocking(move || {
            let encoded = encode(&flush, &config);
            (flush, encoded)
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))?;
        let encoded = encoded?;
        let tp = &flush.tp;
        let columns = flush
            .schema()
            .map(|s| {
                s.fields()
                    .iter()
                    .map(|f| format!("{}: {}", f.name(), f.data_type()))
                    .collect()
            })
            .unwrap_or_default();
        // Flat in the partition's staging directory, which stays: a directory per flush cost a
        // mkdir and an rmdir per commit on local disks, the dearest inode operations.
        // Unique per stage call: a zombie and the owner often stage the same range, and must
        // never overwrite each other's bytes. The marker records the exact names.
        let staging_rel = format!(
            "{META}/staging/{}/{}/{}-{}-{:016x}",
            tp.topic,
            tp.partition,
            offset_key(flush.start.0),
            offset_key(flush.next.0),
            rand::random::<u64>()
        );
        let file_name = format!(
            "{}+{}+{}.parquet",
            tp.topic,
            tp.partition,
            offset_key(flush.start.0)
        );
        let mut files = Vec::with_capacity(encoded.len());
        for (i, e) in encoded.into_iter().enumerate() {
            let staged = format!("{staging_rel}-{i}.parquet.staged");
            let path = if e.hive_dir.is_empty() {
                file_name.clone()
            } else {
                format!("{}/{file_name}", e.hive_dir)
            };
            let bytes = e.data.len() as u64;
            let p = self.rel(&staged);
            self.table
                .store
                .put(&p, PutPayload::from(e.data))
                .await
                .map_err(|err| self.table.err(&p, err))?;
            files.push(StagedFile {
                staged,
                path,
                rows: e.rows,
                bytes,
            });
        }
        Ok(Staged {
            tp: flush.tp.clone(),
            start: flush.start,
            next: flush.next,
            rows: files.iter().map(|f| f.rows).sum(),
            columns,
            data: files,
        })
    }

    async fn commit(
        &self,
        staged: &Staged<Vec<StagedFile>>,
    ) -> Result<(CommitOutcome, CommitStats)> {
        let tp = &staged.tp;
        let marker = Marker {
            version: MARKER_VERSION,
            writer: self.config.writer_id.clone(),
            topic: tp.topic.to_string(),
            partition: tp.partition,
            start: staged.start.0,
            next: staged.next.0,
            rows: staged.rows,
            files: staged.data.clone(),
            columns: staged.columns.clone(),
            committed_at_ms: chrono::Utc::now().timestamp_millis(),
        };
        let path = self.marker_path(tp, staged.start.0);
        let body = serde_json::to_vec_pretty(&marker).expect("marker serializes");
        let stats = CommitStats {
            files: staged.data.len(),
            rows: staged.rows,
            bytes: staged.data.iter().map(|f| f.bytes).sum(),
        };
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.crash.at("after_stage");
        match self
            .table
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => {
                self.crash.at("after_marker");
                self.publish(&marker).await?;
                self.maybe_hint(tp, &marker).await?;
                self.after_commit(&marker.files);
                Ok((CommitOutcome::Committed { next: staged.next }, stats))
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                // S3 answers 409 ConditionalRequestConflict (which object_store reports as
                // AlreadyExists) while another conditional write of the key is in flight: the
                // marker may not be readable yet. A retry reads the winner.
                let winner = self.read_json::<Marker>(&path).await?.ok_or_else(|| {
                    self.table.err(
                        &path,
                        object_store::Error::Generic {
                            store: "marker",
                            source: "the conditional create conflicted with another writer's \
                                     (S3 409 ConditionalRequestConflict) and its marker is not \
                                     readable yet"
                                .into(),
                        },
                    )
                })?;
                if winner.writer == marker.writer && winner.next == marker.next {
                    // Our own earlier attempt won; make sure it is published.
                    self.publish(&winner).await?;
                    return Ok((
                        CommitOutcome::AlreadyCommitted {
                            next: Offset(winner.next),
                        },
                        stats,
                    ));
                }
                warn!(table = self.table.location(), %tp, start = staged.start.0,
                      winner = %winner.writer, winner_next = winner.next,
                      "fenced: another writer committed this start position first");
                // The winner may have died between its marker and its publish (a zombie that
                // was killed). This writer goes on after the winner's end, and its next hint
                // moves recovery past this marker, so publish it now (idempotent, safe beside
                // the winner's own publish).
                self.publish(&winner).await?;
                self.discard(staged, &winner).await;
                Ok((
                    CommitOutcome::Fenced {
                        next: Offset(winner.next),
                    },
                    CommitStats::default(),
                ))
            }
            Err(e) => Err(self.table.err(&path, e)),
        }
    }

    async fn settle(&self, within: std::time::Duration) {
        self.settle_compaction(within).await
    }

    async fn check(&self) -> Result<()> {
        let path = self.table.path([META, "check", &self.config.writer_id]);
        crate::store::check_conditional_create(&*self.table.store, self.table.location(), &path)
            .await
    }

    fn location(&self) -> &str {
        self.table.location()
    }
}
