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
//! `appId = "<app_id_prefix>/<topic>/<partition>"` (`lakesink/<group>/<topic>/<partition>`),
//! `version` = the last offset the commit covers, so the committed position is `version + 1`.
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
//! - The log is cleaned of entries past `delta.logRetentionDuration` only when a commit writes a
//!   checkpoint, as the Delta protocol describes, not after every commit.

mod rewrite;
mod schema;
mod unchanged;
pub mod upsert;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use deltalake::kernel::scalars::ScalarExt;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, MetadataExt, Transaction};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use indexmap::IndexMap;
use tracing::{debug, info, warn};
use url::Url;

pub use schema::{conform_batch, delta_schema, merge as merge_schema};

use crate::crash::CrashHook;
use crate::encode::Compression;
use crate::partition::{self, PartitionSpec};
use crate::store::redact_url;
use crate::{
    CommitOutcome, CommitStats, Error, Flush, Offset, Result, Sink, Staged, TopicPartition,
};

/// How a Delta sink writes and commits.
#[derive(Debug, Clone)]
pub struct DeltaSinkConfig {
    /// Output partitioning; `day(col)` / `hour(col)` become `day` (date) / `hour` (string)
    /// partition columns of the table.
    pub partition_by: Vec<PartitionSpec>,
    pub compression: Compression,
    pub row_group_rows: usize,
    /// `lakesink/<group>`: txn app ids are `<prefix>/<topic>/<partition>`.
    pub app_id_prefix: String,
    /// Table properties set when lakesink creates the table (`delta.*` keys and free-form ones).
    pub table_properties: BTreeMap<String, String>,
    /// `delta.checkpointInterval` for tables lakesink creates: a checkpoint every N commits.
    pub checkpoint_interval: u64,
    /// Commit attempts before a commit that keeps losing races fails (retryable).
    pub commit_attempts: u32,
    /// `mode = "upsert"`: merge on these key columns instead of appending.
    pub upsert: Option<crate::upsert::UpsertConfig>,
    /// Upserts: the most change rows one grouped MERGE carries (the flush size, so a group
    /// never joins more than one full flush would).
    pub group_rows: usize,
}

impl Default for DeltaSinkConfig {
    fn default() -> Self {
        Self {
            partition_by: Vec::new(),
            compression: Compression::Snappy,
            row_group_rows: 1 << 20,
            app_id_prefix: "lakesink".into(),
            table_properties: BTreeMap::new(),
            checkpoint_interval: 10,
            commit_attempts: 20,
            upsert: None,
            group_rows: 100_000,
        }
    }
}

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
    crash_hook: Option<CrashHook>,
    /// Appends waiting for the table lock: whoever takes it commits them all in one log entry.
    pending: std::sync::Mutex<Vec<Pending>>,
}

/// One append waiting to be committed with others (group commit).
pub(super) struct Pending {
    id: u64,
    pub(super) staged: Staged,
    pub(super) reply: tokio::sync::oneshot::Sender<GroupReply>,
}

/// What the writer that led a group commit tells a member.
pub(super) enum GroupReply {
    /// Decided for this member: committed with the group, or already committed / fenced.
    Done(CommitOutcome),
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

/// Registers the object stores deltalake needs for `s3://`, `az://`/`abfss://` and `gs://`.
fn register_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        deltalake::aws::register_handlers(None);
        deltalake::azure::register_handlers(None);
        deltalake::gcp::register_handlers(None);
    });
}

/// Storage options in the spelling deltalake's object stores expect: object_store's aliases
/// (`endpoint`, `access_key_id`) become their canonical keys (`aws_endpoint`, ...), which also
/// stops deltalake from probing the AWS SDK credential chain when explicit settings are given.
fn canonical_options(
    url: &Url,
    options: impl IntoIterator<Item = (String, String)>,
) -> HashMap<String, String> {
    use std::str::FromStr;
    options
        .into_iter()
        .map(|(k, v)| {
            let lower = k.to_ascii_lowercase();
            let key = match url.scheme() {
                "s3" | "s3a" => object_store::aws::AmazonS3ConfigKey::from_str(&lower)
                    .map(|c| c.as_ref().to_string())
                    .unwrap_or(k),
                "az" | "azure" | "abfs" | "abfss" | "adl" => {
                    object_store::azure::AzureConfigKey::from_str(&lower)
                        .map(|c| c.as_ref().to_string())
                        .unwrap_or(k)
                }
                "gs" => object_store::gcp::GoogleConfigKey::from_str(&lower)
                    .map(|c| c.as_ref().to_string())
                    .unwrap_or(k),
                _ => k,
            };
            (key, v)
        })
        .collect()
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
            crash_hook: None,
            pending: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Installs a hook called at `after_stage` and `after_commit` (tests only).
    pub fn with_crash_hook(mut self, hook: CrashHook) -> Self {
        self.crash_hook = Some(hook);
        self
    }

    fn point(&self, name: &'static str) {
        if let Some(h) = &self.crash_hook {
            h(name);
        }
    }

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

    fn app_id(&self, tp: &TopicPartition) -> String {
        format!(
            "{}/{}/{}",
            self.config.app_id_prefix, tp.topic, tp.partition
        )
    }

    fn builder(&self) -> Result<DeltaTableBuilder> {
        DeltaTableBuilder::from_url(self.url.clone())
            .map(|b| b.with_storage_options(self.options.clone()))
            .map_err(|e| self.err("open", e))
    }

    /// Loads the table into `slot` if it exists (refreshing it if loaded). Returns whether it
    /// exists.
    async fn refresh(&self, slot: &mut Option<DeltaTable>) -> Result<bool> {
        match slot {
            Some(t) => {
                t.update_incremental(None)
                    .await
                    .map_err(|e| self.err("refresh", e))?;
            }
            None => {
                let mut t = self.builder()?.build().map_err(|e| self.err("open", e))?;
                match t.load().await {
                    Ok(()) => *slot = Some(t),
                    Err(DeltaTableError::NotATable(_)) => return Ok(false),
                    Err(e) => return Err(self.err("load", e)),
                }
            }
        }
        if let Some(t) = slot.as_ref() {
            if let Ok(s) = t.snapshot() {
                *self.known_schema.lock().expect("poisoned") = Some(s.snapshot().arrow_schema());
            }
        }
        Ok(true)
    }

    /// Creates the table with `schema` (Delta-normalized, partition columns included). Another
    /// writer creating it at the same moment is fine: the loser loads the winner's table.
    async fn create(&self, slot: &mut Option<DeltaTable>, schema: &SchemaRef) -> Result<()> {
        let kernel = schema::kernel_schema(schema).map_err(|reason| Error::Location {
            location: self.location.clone(),
            reason,
        })?;
        let mut properties: BTreeMap<String, String> = self.config.table_properties.clone();
        properties
            .entry("delta.checkpointInterval".into())
            .or_insert_with(|| self.config.checkpoint_interval.to_string());
        let partition_columns: Vec<String> = self
            .config
            .partition_by
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        let created = CreateBuilder::new()
            .with_location(self.url.as_str())
            .with_storage_options(self.options.clone())
            .with_columns(kernel.fields().cloned())
            .with_partition_columns(partition_columns)
            .with_configuration(properties.into_iter().map(|(k, v)| (k, Some(v))))
            .with_save_mode(SaveMode::Ignore)
            .await;
        match created {
            Ok(t) => {
                info!(table = %self.location, "created Delta table");
                *slot = Some(t);
                Ok(())
            }
            Err(e) => {
                // Lost a creation race? Then the table exists now.
                if self.refresh(slot).await? {
                    Ok(())
                } else {
                    Err(self.err("create", e))
                }
            }
        }
    }

    /// The table's committed position for `tp`, from the loaded snapshot.
    async fn txn_position(
        &self,
        table: &DeltaTable,
        tp: &TopicPartition,
    ) -> Result<Option<Offset>> {
        let snapshot = table.snapshot().map_err(|e| self.err("snapshot", e))?;
        let v = snapshot
            .transaction_version(table.log_store().as_ref(), self.app_id(tp))
            .await
            .map_err(|e| self.err("read txn", e))?;
        Ok(v.map(|v| Offset(v + 1)))
    }

    /// The Delta form of a flush's rows: derived partition columns added, conformed to the
    /// table schema merged with the data's.
    fn prepare(&self, flush: &Flush) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let mut batches = Vec::with_capacity(flush.batches.len());
        for b in &flush.batches {
            batches.push(with_partition_columns(
                b,
                &self.config.partition_by,
                &flush.tp,
            )?);
        }
        let known = self.known_schema.lock().expect("poisoned").clone();
        let mut target: Option<SchemaRef> = known;
        for b in &batches {
            let data = delta_schema(&b.schema()).map_err(|r| self.schema_err(&flush.tp, r))?;
            target = Some(match target {
                None => data,
                Some(t) => schema::merge(&t, &data).map_err(|r| self.schema_err(&flush.tp, r))?,
            });
        }
        let target = match target {
            Some(t) => t,
            None => return Ok((Arc::new(Schema::empty()), Vec::new())),
        };
        let conformed = batches
            .iter()
            .map(|b| conform_batch(b, &target).map_err(|r| self.schema_err(&flush.tp, r)))
            .collect::<Result<Vec<_>>>()?;
        Ok((target, conformed))
    }

    /// `schema` without the columns that are never stored (an upsert's unchanged-values list).
    fn table_schema(&self, schema: &SchemaRef) -> SchemaRef {
        let unchanged = self
            .config
            .upsert
            .as_ref()
            .and_then(|u| u.unchanged_column.as_ref());
        match unchanged.and_then(|c| schema.index_of(c).ok()) {
            None => schema.clone(),
            Some(i) => {
                let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
                fields.remove(i);
                Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
            }
        }
    }

    /// Writes `batches` (conformed to `schema`) as data files, one per output partition.
    async fn write_files(
        &self,
        tp: &TopicPartition,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<Vec<Add>> {
        let partition_columns: Vec<String> = self
            .config
            .partition_by
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        let mut writer = RecordBatchWriter::try_new(
            self.url.as_str(),
            schema.clone(),
            Some(partition_columns.clone()),
            Some(self.options.clone()),
        )
        .map_err(|e| self.err("open writer", e))?
        .with_writer_properties(match batches.first() {
            Some(sample) => crate::encode::writer_properties_for(
                self.config.compression,
                self.config.row_group_rows,
                sample,
            ),
            None => crate::encode::writer_properties(
                self.config.compression,
                self.config.row_group_rows,
            ),
        });
        for batch in batches {
            for (values, part) in split_by_partition(&batch, &partition_columns, tp)? {
                writer
                    .write_partition(part, &values, deltalake::writer::WriteMode::Default)
                    .await
                    .map_err(|e| self.err("write data file", e))?;
            }
        }
        writer
            .flush()
            .await
            .map_err(|e| self.err("write data file", e))
    }

    /// Keeps the state the commit produced (it already replayed our own commit: the next
    /// `refresh` then reads only what other writers added since) and cleans up the log when the
    /// commit wrote a checkpoint.
    async fn after_commit(
        &self,
        slot: &mut Option<DeltaTable>,
        done: deltalake::kernel::transaction::FinalizedCommit,
    ) {
        let version = done.version();
        let state = done.snapshot;
        if done.metrics.new_checkpoint_created {
            if let Some(table) = slot.as_ref() {
                self.clean_expired_logs(table.log_store(), &state, version)
                    .await;
            }
        }
        *self.known_schema.lock().expect("poisoned") = Some(state.snapshot().arrow_schema());
        if let Some(table) = slot.as_mut() {
            table.state = Some(state);
        }
    }

    /// Removes the log entries older than the table's log retention, as Delta does each time it
    /// writes a checkpoint (commits leave this to us: deltalake would list the whole `_delta_log`
    /// after every commit). A failure only logs: the next checkpoint retries.
    pub(crate) async fn clean_expired_logs(
        &self,
        log_store: deltalake::logstore::LogStoreRef,
        state: &deltalake::table::state::DeltaTableState,
        version: u64,
    ) {
        use deltalake::table::config::TablePropertiesExt;
        if !state.table_config().enable_expired_log_cleanup() {
            return;
        }
        let cutoff = chrono::Utc::now().timestamp_millis()
            - state.table_config().log_retention_duration().as_millis() as i64;
        match deltalake::checkpoints::cleanup_expired_logs_for(
            version,
            log_store.as_ref(),
            cutoff,
            None,
        )
        .await
        {
            Ok(n) => debug!(table = %self.location, version, removed = n,
                "expired log entries cleaned up"),
            Err(e) => warn!(table = %self.location, version,
                "could not clean up expired log entries (the next checkpoint retries): {e}"),
        }
    }

    /// The operation an append commit records.
    fn append_operation(&self) -> DeltaOperation {
        let partition_by: Vec<String> = self
            .config
            .partition_by
            .iter()
            .map(|p| p.name().to_string())
            .collect();
        DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: (!partition_by.is_empty()).then_some(partition_by),
            predicate: None,
        }
    }

    /// Commits an append, together with the appends of this process's other partitions that
    /// are waiting at the same moment (group commit). Every Delta commit re-reads and replays the
    /// table's file list, so one commit for many flushes is what keeps the log from being the
    /// bottleneck when many partitions flush at once. Each flush is still fenced on its own
    /// txn: a fenced or already committed member is answered without being written, and a
    /// group that fails falls back to one commit per flush.
    async fn commit_queued(&self, staged: &Staged) -> Result<CommitOutcome> {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.pending.lock().expect("poisoned").push(Pending {
            id,
            staged: staged.clone(),
            reply,
        });
        let mut slot = tokio::select! {
            biased;
            got = &mut answer => match got {
                Ok(GroupReply::Done(outcome)) => return Ok(outcome),
                Ok(GroupReply::Alone) | Err(_) => self.table.lock().await,
            },
            slot = self.table.lock() => slot,
        };
        match answer.try_recv() {
            Ok(GroupReply::Done(outcome)) => return Ok(outcome),
            Ok(GroupReply::Alone) | Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                return self.commit_alone(&mut slot, staged).await;
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
        }
        // Nobody has taken this flush yet: lead a group of everything waiting.
        let group = {
            let mut pending = self.pending.lock().expect("poisoned");
            let mut waiting = std::mem::take(&mut *pending);
            // This flush first, then one flush per other partition; the rest wait their turn.
            let own = waiting
                .iter()
                .position(|p| p.id == id)
                .expect("queued above");
            let mut group = vec![waiting.swap_remove(own)];
            for p in waiting {
                if group.iter().any(|g| g.staged.tp == p.staged.tp) {
                    pending.push(p);
                } else {
                    group.push(p);
                }
            }
            group
        };
        if group.len() > 1 && slot.is_some() {
            if self.config.upsert.is_some() {
                upsert::commit_group(self, &mut slot, group).await;
            } else {
                self.commit_group(&mut slot, group).await;
            }
        } else {
            for p in group {
                let _ = p.reply.send(GroupReply::Alone);
            }
        }
        match answer.try_recv() {
            Ok(GroupReply::Done(outcome)) => Ok(outcome),
            _ => self.commit_alone(&mut slot, staged).await,
        }
    }

    async fn commit_alone(
        &self,
        slot: &mut Option<DeltaTable>,
        staged: &Staged,
    ) -> Result<CommitOutcome> {
        let delta = staged.delta.as_ref().expect("a Delta flush");
        if let Some(changes) = &delta.changes {
            return upsert::commit(self, slot, staged, delta.schema.as_ref(), changes).await;
        }
        let actions: Vec<Action> = delta.adds.iter().cloned().map(Action::Add).collect();
        self.commit_actions(slot, staged, delta.schema.as_ref(), actions, || {
            self.append_operation()
        })
        .await
    }

    /// Commits `group` (distinct partitions, an existing table) in one log entry and answers
    /// every member. Members the group cannot carry, and all of them when it fails, are told to
    /// commit alone.
    async fn commit_group(&self, slot: &mut Option<DeltaTable>, group: Vec<Pending>) {
        let mut members = group;
        let mut attempt: u32 = 0;
        let failed = loop {
            attempt += 1;
            match self.refresh(slot).await {
                Ok(true) => {}
                Ok(false) | Err(_) => break members,
            }
            let table = slot.as_ref().expect("table loaded");
            // Fence each member on its own partition's txn.
            let (carried, unread) = self.fence_members(table, members).await;
            if !unread.is_empty() {
                break unread.into_iter().chain(carried).collect();
            }
            if carried.is_empty() {
                return;
            }
            let Ok(snapshot) = table.snapshot() else {
                break carried;
            };
            // One schema for the whole entry: the table's, grown by every member's needs.
            let current = snapshot.snapshot().arrow_schema();
            let mut merged = current.clone();
            let mut mergeable = true;
            for p in &carried {
                if let Some(wanted) = p.staged.delta.as_ref().and_then(|d| d.schema.as_ref()) {
                    match schema::merge(&merged, wanted) {
                        Ok(m) => merged = m,
                        Err(_) => mergeable = false,
                    }
                }
            }
            if !mergeable {
                break carried;
            }
            let mut all = Vec::new();
            if !Arc::ptr_eq(&merged, &current) {
                let Ok(kernel) = schema::kernel_schema(&merged) else {
                    break carried;
                };
                let Ok(metadata) = snapshot.metadata().clone().with_schema(&kernel) else {
                    break carried;
                };
                info!(table = %self.location, "evolving the table schema: {}",
                    describe_new_columns(&current, &merged));
                all.push(Action::Metadata(metadata));
            }
            let mut properties = CommitProperties::default()
                .with_max_retries(self.config.commit_attempts as usize)
                .with_cleanup_expired_logs(Some(false));
            for p in &carried {
                let delta = p.staged.delta.as_ref().expect("a Delta flush");
                all.extend(delta.adds.iter().cloned().map(Action::Add));
                properties = properties.with_application_transaction(Transaction::new(
                    self.app_id(&p.staged.tp),
                    p.staged.next.0 - 1,
                ));
            }
            let result = CommitBuilder::from(properties)
                .with_actions(all)
                .build(Some(snapshot), table.log_store(), self.append_operation())
                .await;
            match result {
                Ok(done) => {
                    debug!(table = %self.location, version = done.version(),
                        flushes = carried.len(), "committed a group");
                    self.after_commit(slot, done).await;
                    for p in carried {
                        let next = p.staged.next;
                        let _ = p
                            .reply
                            .send(GroupReply::Done(CommitOutcome::Committed { next }));
                    }
                    return;
                }
                Err(e) if is_conflict(&e) && attempt < self.config.commit_attempts => {
                    warn!(table = %self.location, attempt, flushes = carried.len(),
                        "group commit conflict, re-checking: {e}");
                    conflict_backoff(20, attempt).await;
                    members = carried;
                }
                Err(e) => {
                    debug!(table = %self.location, "group commit failed, committing alone: {e}");
                    break carried;
                }
            }
        };
        for p in failed {
            let _ = p.reply.send(GroupReply::Alone);
        }
    }

    /// Fences each member of a group on its own partition's txn: answers those already committed
    /// or fenced, and returns the ones to carry and the ones whose txn could not be read.
    pub(super) async fn fence_members(
        &self,
        table: &DeltaTable,
        members: Vec<Pending>,
    ) -> (Vec<Pending>, Vec<Pending>) {
        let mut carried = Vec::with_capacity(members.len());
        let mut unread = Vec::new();
        for p in members {
            let (start, next) = (p.staged.start, p.staged.next);
            match self.txn_position(table, &p.staged.tp).await {
                Ok(recorded) => match crate::fence::decide(recorded, start, next) {
                    Some(outcome) => {
                        let _ = p.reply.send(GroupReply::Done(outcome));
                    }
                    None => carried.push(p),
                },
                Err(_) => unread.push(p),
            }
        }
        (carried, unread)
    }

    /// Runs one commit attempt loop for `staged`'s actions, fenced on the partition's txn.
    async fn commit_actions(
        &self,
        slot: &mut Option<DeltaTable>,
        staged: &Staged,
        schema: Option<&SchemaRef>,
        actions: Vec<Action>,
        operation: impl Fn() -> DeltaOperation,
    ) -> Result<CommitOutcome> {
        let tp = &staged.tp;
        let app_id = self.app_id(tp);
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let exists = self.refresh(slot).await?;
            if !exists {
                let Some(schema) = schema else {
                    // Nothing to write and no table: there is no position to record either.
                    return Ok(CommitOutcome::Committed { next: staged.next });
                };
                self.create(slot, schema).await?;
            }
            let table = slot.as_ref().expect("table loaded");
            let recorded = self.txn_position(table, tp).await?;
            if let Some(done) = crate::fence::decide(recorded, staged.start, staged.next) {
                return Ok(done);
            }
            let snapshot = table.snapshot().map_err(|e| self.err("snapshot", e))?;
            let mut all = Vec::with_capacity(actions.len() + 1);
            if let Some(wanted) = schema {
                let current = snapshot.snapshot().arrow_schema();
                let merged = schema::merge(&current, wanted).map_err(|r| self.schema_err(tp, r))?;
                if !Arc::ptr_eq(&merged, &current) {
                    let kernel =
                        schema::kernel_schema(&merged).map_err(|r| self.schema_err(tp, r))?;
                    let metadata = snapshot
                        .metadata()
                        .clone()
                        .with_schema(&kernel)
                        .map_err(|e| self.err("evolve schema", e.into()))?;
                    info!(table = %self.location, %tp, "evolving the table schema: {}",
                        describe_new_columns(&current, &merged));
                    all.push(Action::Metadata(metadata));
                }
            }
            all.extend(actions.iter().cloned());
            let properties = CommitProperties::default()
                .with_application_transaction(Transaction::new(&app_id, staged.next.0 - 1))
                .with_max_retries(self.config.commit_attempts as usize)
                // deltalake would list the whole `_delta_log` after every commit; Delta's own
                // rule is to clean up when a checkpoint is written (`after_commit` below).
                .with_cleanup_expired_logs(Some(false));
            let result = CommitBuilder::from(properties)
                .with_actions(all)
                .build(Some(snapshot), table.log_store(), operation())
                .await;
            match result {
                Ok(done) => {
                    debug!(table = %self.location, %tp, version = done.version(), "committed");
                    self.after_commit(slot, done).await;
                    return Ok(CommitOutcome::Committed { next: staged.next });
                }
                Err(e) if is_conflict(&e) && attempt < self.config.commit_attempts => {
                    // Someone committed this partition's appId, changed the schema, or we ran
                    // out of quick retries: re-read and decide again.
                    warn!(table = %self.location, %tp, attempt, "commit conflict, re-checking: {e}");
                    conflict_backoff(20, attempt).await;
                }
                Err(e) => return Err(self.err("commit", e)),
            }
        }
    }
}

/// Runs `sql` over the Delta table at `location` (a URL), registered as `t`: what the bench reads
/// back to check what an upsert left.
pub async fn query(
    location: &str,
    sql: &str,
) -> std::result::Result<Vec<RecordBatch>, DeltaTableError> {
    register_handlers();
    let url =
        Url::parse(location).map_err(|e| DeltaTableError::InvalidTableLocation(e.to_string()))?;
    let mut table = DeltaTableBuilder::from_url(url)?.build()?;
    table.load().await?;
    let ctx = deltalake::datafusion::prelude::SessionContext::new();
    ctx.register_table("t", table.table_provider().await?)?;
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// The data files the Delta table at `location` (a URL) references now, and their bytes: what
/// upserts leave, since their commits replace files (what they committed does not add up to it).
pub async fn live_files(location: &str) -> std::result::Result<(usize, u64), DeltaTableError> {
    register_handlers();
    let url =
        Url::parse(location).map_err(|e| DeltaTableError::InvalidTableLocation(e.to_string()))?;
    let mut table = DeltaTableBuilder::from_url(url)?.build()?;
    table.load().await?;
    let (mut files, mut bytes) = (0, 0);
    for f in table.snapshot()?.log_data().iter() {
        files += 1;
        bytes += f.size().max(0) as u64;
    }
    Ok((files, bytes))
}

/// Sleeps before retrying a commit that lost a race: `base_ms` per attempt so far (at most 10),
/// plus as much again at random, so that racing writers spread out.
pub(super) async fn conflict_backoff(base_ms: u64, attempt: u32) {
    let backoff = base_ms * u64::from(attempt.min(10));
    let jitter = rand::random::<u64>() % (backoff + 1);
    tokio::time::sleep(Duration::from_millis(backoff + jitter)).await;
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

/// `batch` plus the derived partition columns (`day` as a date, `hour` as `YYYY-MM-DD-HH`).
fn with_partition_columns(
    batch: &RecordBatch,
    specs: &[PartitionSpec],
    tp: &TopicPartition,
) -> Result<RecordBatch> {
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    for spec in specs {
        let value_err = |reason: String| Error::PartitionValue {
            spec: format!("{spec:?}"),
            tp: tp.clone(),
            reason,
        };
        if matches!(spec, PartitionSpec::Field(_)) {
            continue;
        }
        if batch.schema().field_with_name(spec.name()).is_ok() {
            return Err(value_err(format!(
                "the data already has a column `{}`; partition by it directly",
                spec.name()
            )));
        }
        let source = batch
            .column_by_name(spec.column())
            .ok_or_else(|| value_err(format!("no column `{}` in the data", spec.column())))?;
        let (dt, array) = partition::derived_column(spec, source).map_err(value_err)?;
        fields.push(Arc::new(Field::new(spec.name(), dt, true)));
        columns.push(array);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| {
        Error::PartitionValue {
            spec: "partition_by".into(),
            tp: tp.clone(),
            reason: e.to_string(),
        }
    })
}

type PartitionValues = IndexMap<String, delta_kernel::expressions::Scalar>;

/// Splits `batch` by the values of its partition columns (kept in the batches; the writer
/// strips them from the files).
fn split_by_partition(
    batch: &RecordBatch,
    columns: &[String],
    tp: &TopicPartition,
) -> Result<Vec<(PartitionValues, RecordBatch)>> {
    if columns.is_empty() || batch.num_rows() == 0 {
        return Ok(vec![(IndexMap::new(), batch.clone())]);
    }
    partition_rows(batch, columns, tp)?
        .into_iter()
        .map(|(values, rows)| {
            let part = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                take_record_batch(batch, &UInt32Array::from(rows)).map_err(|e| {
                    Error::PartitionValue {
                        spec: columns.join(","),
                        tp: tp.clone(),
                        reason: e.to_string(),
                    }
                })?
            };
            Ok((values, part))
        })
        .collect()
}

/// The rows of `batch` in each partition, by the values of its partition columns (one group
/// of every row when there are none), in the order of [`partition_key`].
fn partition_rows(
    batch: &RecordBatch,
    columns: &[String],
    tp: &TopicPartition,
) -> Result<Vec<(PartitionValues, Vec<u32>)>> {
    let err = |reason: String| Error::PartitionValue {
        spec: columns.join(","),
        tp: tp.clone(),
        reason,
    };
    let arrays: Vec<&ArrayRef> = columns
        .iter()
        .map(|c| {
            batch
                .column_by_name(c)
                .ok_or_else(|| err(format!("no column `{c}`")))
        })
        .collect::<Result<_>>()?;
    let values_of = |row: usize| -> Result<PartitionValues> {
        let mut v = IndexMap::new();
        for (name, a) in columns.iter().zip(&arrays) {
            let scalar = delta_kernel::expressions::Scalar::from_array(a.as_ref(), row)
                .ok_or_else(|| {
                    err(format!(
                        "column `{name}` of type {} cannot partition a Delta table",
                        a.data_type()
                    ))
                })?;
            v.insert(name.clone(), scalar);
        }
        Ok(v)
    };
    // Group on the row-encoded values, then serialize each group's values once.
    let owned: Vec<ArrayRef> = arrays.iter().map(|a| (*a).clone()).collect();
    let mut groups: BTreeMap<String, (PartitionValues, Vec<u32>)> = BTreeMap::new();
    for rows in partition::group_rows(&owned, batch.num_rows()).map_err(err)? {
        let values = values_of(rows[0] as usize)?;
        match groups.entry(partition_key(&values)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((values, rows));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                // Distinct row encodings that serialize alike (a float's -0 and 0).
                let all = &mut o.get_mut().1;
                all.extend(rows);
                all.sort_unstable();
            }
        }
    }
    Ok(groups.into_values().collect())
}

/// A partition's identity: its values as the log writes them, in partition column order.
fn partition_key(values: &PartitionValues) -> String {
    let mut key = String::new();
    for v in values.values() {
        match v {
            // Apart from the string "null", which `serialize` gives it too.
            delta_kernel::expressions::Scalar::Null(_) => key.push('\u{2}'),
            v => key.push_str(&v.serialize()),
        }
        key.push('\u{1}');
    }
    key
}

#[async_trait::async_trait]
impl Sink for DeltaSink {
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

    async fn stage(&self, flush: Flush) -> Result<Staged> {
        let rows = flush.rows() as u64;
        let (schema, batches) = self.prepare(&flush)?;
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
            files: Vec::new(),
            databend: None,
            delta: Some(DeltaStaged {
                adds: Vec::new(),
                // The table's schema: without the upsert's unchanged-values column.
                schema: schema.as_ref().map(|s| self.table_schema(s)),
                changes: None,
            }),
            columns,
        };
        let Some(schema) = schema else {
            return Ok(staged);
        };
        if let Some(upsert) = &self.config.upsert {
            let mut changes = crate::upsert::Changes::build(upsert, &schema, batches, &flush.tp)?;
            changes.truncate = flush.truncate;
            if let Some(d) = staged.delta.as_mut() {
                d.changes = Some(Arc::new(changes));
            }
            return Ok(staged);
        }
        // Parquet encoding is CPU-bound: keep it off the async worker threads.
        let handle = tokio::runtime::Handle::current();
        let this = self.clone_for_io();
        let tp = flush.tp.clone();
        let schema2 = schema.clone();
        let adds = crate::encode_blocking(move || {
            handle.block_on(async move { this.write_files(&tp, &schema2, batches).await })
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))??;
        if let Some(d) = staged.delta.as_mut() {
            d.adds = adds;
        }
        self.point("after_stage");
        Ok(staged)
    }

    async fn commit(&self, staged: &Staged) -> Result<(CommitOutcome, CommitStats)> {
        let delta = staged.delta.as_ref().ok_or_else(|| {
            Error::Join("a Delta sink was handed a flush staged by another sink kind".into())
        })?;
        let stats = CommitStats {
            files: delta.adds.len(),
            rows: staged.rows,
            bytes: delta.adds.iter().map(|a| a.size.max(0) as u64).sum(),
        };
        let outcome = self.commit_queued(staged).await?;
        if matches!(outcome, CommitOutcome::Committed { .. }) {
            self.point("after_commit");
        }
        Ok((outcome, stats))
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
        use object_store::ObjectStoreExt;
        store
            .put(&probe, bytes::Bytes::from_static(b"lakesink check").into())
            .await
            .map_err(|e| Error::Store {
                table: self.location.clone(),
                path: probe.to_string(),
                source: Box::new(e),
            })?;
        let _ = store.delete(&probe).await;
        Ok(())
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
            crash_hook: None,
            pending: std::sync::Mutex::new(Vec::new()),
        })
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_upsert;

/// What `lakesink maintain` did to one table.
#[derive(Debug, Clone, Default)]
pub struct MaintainReport {
    pub version_before: Option<u64>,
    pub version_after: Option<u64>,
    pub files_compacted: u64,
    pub files_written: u64,
    pub files_vacuumed: usize,
    pub checkpoint: bool,
}

impl DeltaSink {
    /// Compacts small files (OPTIMIZE, bin-packing towards `target_file_size`), removes data
    /// files unreferenced for longer than `retention` (VACUUM FULL: tombstoned files and orphans
    /// of crashed flushes), and writes a checkpoint. Safe while writers run: compaction only
    /// rewrites data, never txn positions, and conflicts like any other commit.
    pub async fn maintain(
        &self,
        target_file_size: u64,
        retention: Duration,
    ) -> Result<MaintainReport> {
        let mut slot = self.table.lock().await;
        if !self.refresh(&mut slot).await? {
            return Ok(MaintainReport::default());
        }
        let table = slot.take().expect("table loaded");
        let mut report = MaintainReport {
            version_before: table.version(),
            ..Default::default()
        };
        let (table, metrics) = table
            .optimize()
            .with_target_size(std::num::NonZeroU64::new(target_file_size.max(1)).expect("non-zero"))
            .with_writer_properties(crate::encode::writer_properties(
                self.config.compression,
                self.config.row_group_rows,
            ))
            .await
            .map_err(|e| self.err("compact", e))?;
        report.files_compacted = metrics.num_files_removed;
        report.files_written = metrics.num_files_added;
        let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let (table, vacuum) = table
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
            .await
            .map_err(|e| self.err("vacuum", e))?;
        report.files_vacuumed = vacuum.files_deleted.len();
        deltalake::checkpoints::create_checkpoint(&table, None)
            .await
            .map_err(|e| self.err("checkpoint", e))?;
        report.checkpoint = true;
        report.version_after = table.version();
        *slot = Some(table);
        Ok(report)
    }
}
