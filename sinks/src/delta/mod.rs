//! Delta Lake tables on any object store, exactly once, with Delta's own transaction log as the
//! only commit record.
//!
//! Commit protocol (one flush = the rows of one source partition between two positions):
//!
//! ```text
//!  stage  ─► data files <table>/<partition dirs>/part-*.parquet      (unreferenced: invisible)
//!  commit ─► read txn(appId) from the latest snapshot
//!              ≠ start-1 (and someone committed before) ⇒ Fenced{txn+1}: another writer owns it
//!            write _delta_log/<v+1>.json (put-if-absent) holding
//!              [metaData (only when the schema grew)] + add* + txn{appId, version = next-1}
//!            lost the race for v+1 ⇒ deltalake's conflict checker: another partition's append
//!              is no conflict (retry at v+2); a winner carrying the same appId is, and we
//!              re-read txn(appId) to decide Fenced / AlreadyCommitted
//! ```
//!
//! `appId = "<app_id_prefix>/<topic>/<partition>"` (`lakesink/<topic>/<partition>`),
//! `version` = the last offset the commit covers, so the committed position is `version + 1`.
//! The app id names the source partition, not the consumer group: a renamed group or a second
//! deployment resumes from, and is fenced by, the same position. (Earlier lakesink versions used
//! `lakesink/<group>/<topic>/<partition>`; that position is read when the new one is absent.)
//!
//! Invariants:
//! - A flush becomes visible in exactly one log entry, together with its txn action; a crash
//!   before it leaves only unreferenced files (removed by `VACUUM`), never partial data.
//! - A writer commits only if the table's txn version for its partition is the one it resumed
//!   from; a zombie that lost the partition is fenced and told where the owner got to.
//! - Concurrent writers of other partitions never fence each other (their appends don't
//!   conflict); the retry loop is bounded with jittered backoff.
//! - Schema evolution is additive and rides in the same commit as the data that needs it.
//! - Group commit: appends of one process that wait for the table at the same moment share one
//!   log entry (one txn action per partition, each fenced on its own first). A flush is never in
//!   two entries: a member is answered once, and a group that fails hands every member back to
//!   its own single commit. One entry per group matters because each commit replays the table's
//!   file list (deltalake's eager snapshot), which with many partitions was the bottleneck.
//! - Shared files: appends cut at one latency tick are written at commit time by the group's
//!   leader, one file per table partition for all of them; the files hold exactly the rows of
//!   the members the entry carries (`group`).
//! - Only appends, which remove no file, let deltalake retry their commit on a newer state.
//!   Upserts and compactions remove files, and deltalake does not check removes with
//!   `dataChange = false` (compactions) against other removes: an upsert commits on the state
//!   it read or is applied again, a compaction only where no entry since removed its files.
//! - The log is cleaned of entries past `delta.logRetentionDuration` only when a commit writes a
//!   checkpoint, as the Delta protocol describes, not after every commit.

mod committer;
mod compact;
mod config;
mod dv;
mod entry;
mod group;
mod inspect;
mod keys;
mod maintain;
mod mor;
mod probe;
mod purge;
mod rebase;
mod rewrite;
mod schema;
mod sorted;
mod table;
mod txns;
mod unchanged;
pub mod upsert;
mod writer;

use committer::conflict_backoff;
pub use compact::AutoCompact;
pub use config::{
    DeltaSection, DeltaSettings, DeltaSinkConfig, ReaderProfile, UpsertStrategy,
    FABRIC_ROW_GROUP_ROWS, MIN_VACUUM_RETENTION,
};
pub use inspect::{live_files, query};
pub use maintain::MaintainReport;
use table::{canonical_options, register_handlers};
use writer::{partition_key, partition_rows};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use deltalake::kernel::transaction::TransactionError;
use deltalake::kernel::Add;
use deltalake::{DeltaTable, DeltaTableError};
use indexmap::IndexMap;
use url::Url;

pub use schema::{conform_batch, delta_schema, delta_schema_for, merge as merge_schema};

use crate::crash::{CrashHook, CrashPoints};
use crate::encode::{Compression, RowGroups};
use crate::partition::PartitionSpec;
use crate::store::redact_url;
use crate::{
    CommitOutcome, CommitStats, Error, Flush, Offset, Result, Sink, Staged, TopicPartition,
};

/// What [`Sink::stage`] leaves for [`Sink::commit`] in a Delta table.
#[derive(Debug, Clone)]
pub struct DeltaStaged {
    /// Data files already written (append mode), not yet referenced by the log.
    pub adds: Vec<Add>,
    /// The table schema (Delta-normalized, partition columns included) these rows need.
    pub schema: Option<SchemaRef>,
    /// Upsert mode: the batch's rows, deduplicated to the last change per key, applied by a
    /// MERGE at commit time.
    pub changes: Option<Arc<crate::upsert::Changes>>,
    /// Append mode, a flush cut at a latency tick: its rows as read (packed or not; put in the
    /// table's form as they are written), not yet written. The commit writes them into the
    /// files it shares with the other partitions' flushes of the same tick (one file per table
    /// partition for all of them), or into files of their own when it commits alone.
    pub deferred: Vec<crate::packed::Chunk>,
    /// Until when the commit waits for other partitions' flushes cut at the same tick.
    pub gather_until: Option<std::time::Instant>,
}

/// Data files a commit wrote itself (flushes whose rows were deferred to the commit).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Written {
    pub files: usize,
    pub bytes: u64,
}

/// A Delta table written with the txn-action protocol described in the module docs.
pub struct DeltaSink {
    url: Url,
    location: String,
    options: HashMap<String, String>,
    config: DeltaSinkConfig,
    /// The loaded table (`None` until it exists). Commits of this process go through it one at
    /// a time; staging runs concurrently.
    table: tokio::sync::Mutex<Option<DeltaTable>>,
    /// The latest table schema this process knows (what staging conforms to).
    known_schema: std::sync::Mutex<Option<SchemaRef>>,
    crash: CrashPoints,
    /// Appends waiting for the table lock: whoever takes it commits them all in one log entry.
    pending: std::sync::Mutex<Vec<Pending>>,
    /// The table's background compaction in this process (`auto_compact`).
    compactor: compact::SharedCompactor,
    /// Txn versions known for the loaded table version (`txns`).
    txns: std::sync::Mutex<txns::TxnCache>,
}

/// One append waiting to be committed with others (group commit).
pub(super) struct Pending {
    id: u64,
    pub(super) staged: Staged<DeltaStaged>,
    pub(super) reply: tokio::sync::oneshot::Sender<GroupReply>,
}

/// What the writer that led a group commit tells a member.
pub(super) enum GroupReply {
    /// Decided for this member: committed with the group, or already committed / fenced; and
    /// the shared files the group wrote, counted once, with its first deferred member.
    Done(CommitOutcome, Option<Written>),
    /// The group could not commit (an error, or a flush the group cannot carry): commit alone,
    /// which reports this flush's own error, if any.
    Alone,
}

impl std::fmt::Debug for DeltaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaSink")
            .field("table", &self.location)
            .field("config", &self.config)
            .finish()
    }
}

impl DeltaSink {
    /// Opens (lazily) the Delta table at `location`. Nothing is read until the first call.
    pub fn new<I, K, V>(location: &str, options: I, config: DeltaSinkConfig) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        register_handlers();
        let bad = |reason: String| Error::Location {
            location: redact_url(location),
            reason,
        };
        let url = Url::parse(location).map_err(|e| bad(e.to_string()))?;
        if !url.username().is_empty() && !matches!(url.scheme(), "abfs" | "abfss")
            || url.password().is_some()
        {
            return Err(bad(
                "credentials in the table URL are not allowed; put them in the `storage` table"
                    .into(),
            ));
        }
        if url.scheme() == "file" {
            let dir = url
                .to_file_path()
                .map_err(|_| bad("not an absolute local path".into()))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| bad(format!("cannot create directory: {e}")))?;
        }
        let options = canonical_options(
            &url,
            options
                .into_iter()
                .map(|(k, v)| (k.as_ref().to_string(), v.into())),
        );
        Ok(Self {
            location: redact_url(location),
            url,
            options,
            config,
            table: tokio::sync::Mutex::new(None),
            known_schema: std::sync::Mutex::new(None),
            crash: CrashPoints::default(),
            pending: std::sync::Mutex::new(Vec::new()),
            compactor: Default::default(),
            txns: Default::default(),
        })
    }

    /// Installs a hook called at `after_stage` and `after_commit` (tests only).
    pub fn with_crash_hook(mut self, hook: CrashHook) -> Self {
        self.crash.set(hook);
        self
    }

    /// How the sink writes and commits.
    pub fn config(&self) -> &DeltaSinkConfig {
        &self.config
    }

    fn err(&self, op: &'static str, source: DeltaTableError) -> Error {
        Error::Delta {
            table: self.location.clone(),
            op,
            source: Box::new(source),
        }
    }

    fn schema_err(&self, tp: &TopicPartition, reason: String) -> Error {
        Error::Schema {
            table: self.location.clone(),
            tp: tp.clone(),
            reason,
        }
    }

    /// The table's partition columns, in path order.
    fn partition_columns(&self) -> Vec<String> {
        self.config
            .partition_by
            .iter()
            .map(|p| p.name().to_string())
            .collect()
    }

    fn app_id(&self, tp: &TopicPartition) -> String {
        format!(
            "{}/{}/{}",
            self.config.app_id_prefix, tp.topic, tp.partition
        )
    }
}

fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_)
        } | DeltaTableError::VersionAlreadyExists(_)
    )
}

fn describe_new_columns(old: &Schema, new: &Schema) -> String {
    let added: Vec<String> = new
        .fields()
        .iter()
        .filter(|f| {
            old.field_with_name(f.name())
                .map(|o| o != f.as_ref())
                .unwrap_or(true)
        })
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect();
    added.join(", ")
}

type PartitionValues = IndexMap<String, delta_kernel::expressions::Scalar>;

#[async_trait::async_trait]
impl Sink for DeltaSink {
    type Data = DeltaStaged;

    fn retained_bytes(&self, staged: &Staged<DeltaStaged>) -> usize {
        let deferred: usize = staged.data.deferred.iter().map(|c| c.memory_size()).sum();
        deferred
            + staged
                .data
                .changes
                .as_ref()
                .map_or(0, |c| c.rows.get_array_memory_size())
    }

    async fn recover(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        // A Delta commit is one atomic log entry: there is never anything half-done to finish.
        self.committed(tp).await
    }

    async fn committed(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        let mut slot = self.table.lock().await;
        if !self.refresh(&mut slot).await? {
            return Ok(None);
        }
        let table = slot.as_ref().expect("table loaded");
        self.txn_position(table, tp).await
    }

    async fn last_commit(&self, tp: &TopicPartition) -> Result<Option<crate::LastCommit>> {
        let mut slot = self.table.lock().await;
        if !self.refresh(&mut slot).await? {
            return Ok(None);
        }
        let table = slot.as_ref().expect("table loaded");
        let Some(next) = self.txn_position(table, tp).await? else {
            return Ok(None);
        };
        Ok(Some(crate::LastCommit {
            next,
            at_ms: self.txn_time(table, tp).await?,
        }))
    }

    async fn stage(&self, flush: Flush) -> Result<Staged<DeltaStaged>> {
        let rows = flush.rows() as u64;
        // The flush's keys (named, or the message key's fields, whose struct is never stored).
        // An upsert needs all its rows at once; an append streams its chunks into its files.
        let (upsert, flush) = match &self.config.upsert {
            None => (None, flush),
            Some(u) => {
                let flush = flush.unpacked()?;
                let (u, batches) =
                    crate::upsert::message_key::resolve(u, flush.batches, &flush.tp)?;
                (Some(u), Flush { batches, ..flush })
            }
        };
        let (schema, batches) = match upsert {
            Some(_) => self.prepare(&flush)?,
            None => (self.append_schema(&flush)?, Vec::new()),
        };
        let columns = schema
            .fields()
            .iter()
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect();
        let schema = (!schema.fields().is_empty()).then_some(schema);
        let mut staged = Staged {
            tp: flush.tp.clone(),
            start: flush.start,
            next: flush.next,
            rows,
            columns,
            data: DeltaStaged {
                adds: Vec::new(),
                // The table's schema: without the upsert's unchanged-values column.
                schema: schema.as_ref().map(|s| self.table_schema(s)),
                changes: None,
                deferred: Vec::new(),
                gather_until: flush.tick.map(|t| t.gather_until),
            },
        };
        let Some(schema) = schema else {
            return Ok(staged);
        };
        if let Some(upsert) = &upsert {
            let mut changes = crate::upsert::Changes::build(upsert, &schema, batches, &flush.tp)?;
            changes.truncate = flush.truncate;
            staged.data.changes = Some(Arc::new(changes));
            return Ok(staged);
        }
        if flush.tick.is_some() && self.config.shared_files {
            // Written at commit time, together with the other partitions of the same tick.
            staged.data.deferred = flush.chunks();
            self.crash.at("after_stage");
            return Ok(staged);
        }
        let adds = self
            .write_blocking(&schema, writer::FlushRows::of(&flush))
            .await?;
        staged.data.adds = adds;
        self.crash.at("after_stage");
        Ok(staged)
    }

    async fn commit(&self, staged: &Staged<DeltaStaged>) -> Result<(CommitOutcome, CommitStats)> {
        let delta = &staged.data;
        let (outcome, written) = self.commit_queued(staged).await?;
        let stats = CommitStats {
            files: written.map_or(delta.adds.len(), |w| w.files),
            rows: staged.rows,
            bytes: written.map_or_else(
                || delta.adds.iter().map(|a| a.size.max(0) as u64).sum(),
                |w| w.bytes,
            ),
        };
        if matches!(outcome, CommitOutcome::Committed { .. }) {
            self.crash.at("after_commit");
        }
        Ok((outcome, stats))
    }

    async fn adopt_topic_id(&self, topic: &str, topic_id: &str) -> Result<crate::TopicIdentity> {
        // Beside the log, below `_lakesink/` (VACUUM and readers skip `_` directories).
        let table = self.builder()?.build().map_err(|e| self.err("open", e))?;
        let store = table.object_store();
        let path =
            object_store::path::Path::from_iter(["_lakesink", "topics", &format!("{topic}.json")]);
        crate::store::adopt_topic_id(&*store, &self.location, &path, topic, topic_id).await
    }

    async fn check(&self) -> Result<()> {
        let mut slot = self.table.lock().await;
        self.refresh(&mut slot).await?;
        // Prove we can write where the data files go (the table may not exist yet).
        let table = self.builder()?.build().map_err(|e| self.err("open", e))?;
        let store = table.object_store();
        let probe = object_store::path::Path::from(format!(
            "_lakesink/check-{}.tmp",
            rand::random::<u64>()
        ));
        crate::store::check_conditional_create(&*store, &self.location, &probe).await
    }

    fn location(&self) -> &str {
        &self.location
    }
}

impl DeltaSink {
    /// A second handle on the same table for blocking-thread I/O (shares nothing mutable).
    fn clone_for_io(&self) -> Arc<DeltaSink> {
        Arc::new(DeltaSink {
            url: self.url.clone(),
            location: self.location.clone(),
            options: self.options.clone(),
            config: self.config.clone(),
            table: tokio::sync::Mutex::new(None),
            known_schema: std::sync::Mutex::new(None),
            crash: CrashPoints::default(),
            pending: std::sync::Mutex::new(Vec::new()),
            compactor: Default::default(),
            txns: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_compact;
#[cfg(test)]
mod tests_mor;
#[cfg(test)]
mod tests_resume;
#[cfg(test)]
mod tests_rewrite;
#[cfg(test)]
mod tests_shared;
#[cfg(test)]
mod tests_upsert;
