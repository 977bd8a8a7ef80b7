//! Writing a log entry ourselves: a conditional create of the next version; when another writer
//! took it, a read of only that writer's entry, and a try at the version after it.
//!
//! deltalake's commit lists `_delta_log` before every attempt, and after a lost race reads each
//! winning entry twice (its conflict summary, then the snapshot update) before it tries again;
//! upserts committed with its retries off, so any entry written meanwhile made them redo the
//! whole merge. With many members committing to one table, the time between learning the
//! table's version and writing the next entry is the window in which another member's commit
//! makes ours lose; those requests were most of it (BENCHMARKS.md, "Commit contention"). Here a
//! lost race costs one read and one write.
//!
//! Invariants:
//! - An entry is written at version `w` only after every entry between the version its actions
//!   were built on and `w` has been read and found not to conflict ([`Reads`]). An entry
//!   conflicts when it carries `metaData` or `protocol` (the schema or protocol the actions were
//!   built on changed), a `txn` of one of the entry's app ids (another writer committed one of
//!   its partitions: the fence must decide again), a `remove` of a file the entry removes
//!   (marks or rewrites; whatever its `dataChange`), or, for an upsert, an `add` of a file the
//!   entry's snapshot did not hold that holds one of its changed keys (read as the upsert reads
//!   the table's files). Nothing else bears on an append of new files or on deletion vectors
//!   of files that stay as they were read.
//! - A winner that cannot be read or parsed counts as a conflict; so does running out of hops.
//!   The caller then refreshes and fences again (or merges again), as after any lost race.
//! - Only log stores with conditional puts (deltalake's `DefaultLogStore`: S3, Azure, GCS,
//!   local) go this way; others take deltalake's commit loop. A truncate commits only on the
//!   state it read (it depends on every file).
//! - A checkpoint is written when the entry's version is the last of a checkpoint interval, as
//!   deltalake does after a commit.

use std::collections::HashSet;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, LogicalFileView};
use deltalake::protocol::DeltaOperation;
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError};
use futures::future::BoxFuture;
use tracing::{debug, warn};

use super::*;

/// The most winning entries read for one entry before the caller starts again from a refresh.
const HOPS: u64 = 32;

/// Whether any of the given data files holds one of an upsert's changed keys.
pub(super) type HoldsChanges<'a> = &'a (dyn Fn(Vec<LogicalFileView>) -> BoxFuture<'a, std::result::Result<bool, DeltaTableError>>
         + Send
         + Sync);

/// What an entry depends on, beyond the metadata and protocol it was built on.
pub(super) struct Reads<'a> {
    /// Its txns' app ids: a winner carrying one committed the same partition.
    pub(super) app_ids: Vec<String>,
    /// The files it removes (marks or rewrites; decoded paths): a winner removing one changed
    /// them.
    pub(super) removes: HashSet<String>,
    /// Upserts: a winner's new files must not hold a changed key.
    pub(super) holds: Option<HoldsChanges<'a>>,
}

impl DeltaSink {
    /// Whether entries are written directly to `table`'s log (see the module docs).
    pub(super) fn direct(&self, table: &DeltaTable) -> bool {
        self.config.direct_entries && table.log_store().name() == "DefaultLogStore"
    }

    /// Commits `actions` (with `properties`' txns, built on the loaded snapshot) as one entry;
    /// returns its version. A lost race the entry cannot move past is an error `is_conflict`
    /// accepts.
    pub(super) async fn commit_append(
        &self,
        slot: &mut Option<DeltaTable>,
        actions: Vec<Action>,
        properties: CommitProperties,
        app_ids: &[String],
        operation: DeltaOperation,
    ) -> std::result::Result<u64, DeltaTableError> {
        let table = slot.as_ref().expect("table loaded");
        let snapshot = table.snapshot()?;
        if !self.direct(table) {
            let done = CommitBuilder::from(properties)
                .with_actions(actions)
                .build(Some(snapshot), table.log_store(), operation)
                .await?;
            let version = done.version();
            self.after_commit(slot, done).await;
            return Ok(version);
        }
        let evolves = actions.iter().any(|a| matches!(a, Action::Metadata(_)));
        let interval = snapshot.table_config().checkpoint_interval().get();
        let reads = Reads {
            app_ids: app_ids.to_vec(),
            removes: HashSet::new(),
            holds: None,
        };
        let mut table = table.clone();
        let version = self
            .place(&mut table, actions, properties, operation, &reads)
            .await?;
        self.after_entry(slot, version, interval, evolves).await;
        Ok(version)
    }

    /// Writes the entry at the first version after `table`'s that no winner conflicts with
    /// (see the module docs); `table` may be moved forward to read a winner's files.
    pub(super) async fn place(
        &self,
        table: &mut DeltaTable,
        actions: Vec<Action>,
        properties: CommitProperties,
        operation: DeltaOperation,
        reads: &Reads<'_>,
    ) -> std::result::Result<u64, DeltaTableError> {
        let snapshot = table.snapshot()?;
        let read = snapshot.version();
        let known: HashSet<String> = match reads.holds {
            Some(_) => snapshot
                .log_data()
                .iter()
                .map(|f| f.path().into_owned())
                .collect(),
            None => HashSet::new(),
        };
        let log_store = table.log_store();
        let prepared = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), log_store.clone(), operation)
            .into_prepared_commit_future()
            .await?;
        let bytes = prepared.commit_or_bytes().clone();
        drop(prepared);
        let ours: HashSet<&str> = reads.app_ids.iter().map(String::as_str).collect();
        let mut version = read + 1;
        loop {
            let written = log_store
                .write_commit_entry(version, bytes.clone(), uuid::Uuid::new_v4())
                .await;
            match written {
                Ok(()) => {
                    debug!(table = %self.location, version, read, "committed");
                    return Ok(version);
                }
                Err(TransactionError::VersionAlreadyExists(_)) if version - read <= HOPS => {
                    let winner = log_store.read_commit_entry(version).await?;
                    let lost = |why: &str| {
                        debug!(table = %self.location, version, "lost the race to an entry that {why}");
                        Err(DeltaTableError::VersionAlreadyExists(version))
                    };
                    let added = match judge(winner.as_deref(), &ours, &reads.removes) {
                        Ok(added) => added,
                        Err(why) => return lost(why),
                    };
                    if let Some(holds) = reads.holds {
                        let new: HashSet<String> =
                            added.into_iter().filter(|p| !known.contains(p)).collect();
                        if !new.is_empty() {
                            table.update_incremental(Some(version)).await?;
                            let files: Vec<LogicalFileView> = table
                                .snapshot()?
                                .log_data()
                                .iter()
                                .filter(|f| new.contains(f.path().as_ref()))
                                .collect();
                            if files.len() != new.len() {
                                return lost("adds files its snapshot does not show");
                            }
                            if holds(files).await? {
                                return lost("adds rows with a changed key");
                            }
                        }
                    }
                    version += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// After an entry written at `version`: loads it when the schema changed, a checkpoint is due
    /// (and writes the checkpoint) or compaction may be; otherwise the next refresh reads it
    /// with the others'.
    async fn after_entry(
        &self,
        slot: &mut Option<DeltaTable>,
        version: u64,
        interval: u64,
        load: bool,
    ) {
        let checkpoint = (version + 1).is_multiple_of(interval);
        let Some(table) = slot.as_mut() else {
            return;
        };
        // Background compaction counts the files the entry added.
        if load || checkpoint || self.config.auto_compact.is_some() {
            if let Err(e) = table.update_incremental(Some(version)).await {
                // The next refresh loads it; only the checkpoint waits for the next interval.
                warn!(table = %self.location, version, "could not load the committed entry: {e}");
                return;
            }
            if let Ok(state) = table.snapshot() {
                *self.known_schema.lock().expect("poisoned") =
                    Some(state.snapshot().arrow_schema());
            }
        }
        if checkpoint && table.version() == Some(version) {
            self.checkpoint(table, version).await;
        }
        if let Ok(state) = table.snapshot() {
            self.maybe_compact(state);
        }
    }

    /// Writes the checkpoint of `table` (loaded at `version`) and cleans up expired entries.
    pub(super) async fn checkpoint(&self, table: &DeltaTable, version: u64) {
        match deltalake::checkpoints::create_checkpoint(table, None).await {
            Ok(()) => {
                if let Ok(state) = table.snapshot() {
                    self.clean_expired_logs(table.log_store(), state, version)
                        .await;
                }
            }
            Err(e) => warn!(table = %self.location, version,
                "could not write a checkpoint (the next interval tries again): {e}"),
        }
    }
}

/// Whether a winning entry conflicts with an entry whose txns are `ours` and which removes
/// `removes` (see the module docs): `Err(why)` when it does, else the paths of the files it
/// adds (decoded).
fn judge(
    entry: Option<&[u8]>,
    ours: &HashSet<&str>,
    removes: &HashSet<String>,
) -> std::result::Result<Vec<String>, &'static str> {
    let Some(entry) = entry else {
        return Err("cannot be read");
    };
    let mut added = Vec::new();
    for line in entry.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
            return Err("cannot be parsed");
        };
        if action.get("metaData").is_some() {
            return Err("changes the table's metadata");
        }
        if action.get("protocol").is_some() {
            return Err("changes the protocol");
        }
        if let Some(txn) = action.get("txn") {
            match txn.get("appId").and_then(|a| a.as_str()) {
                Some(id) if !ours.contains(id) => {}
                _ => return Err("commits one of the same partitions"),
            }
        }
        let path = |kind: &str| {
            action
                .get(kind)
                .and_then(|a| a.get("path"))
                .and_then(|p| p.as_str())
                .map(percent_decode)
        };
        if let Some(removed) = path("remove") {
            if removes.contains(&removed) {
                return Err("removes a file this one removes");
            }
        }
        if let Some(add) = path("add") {
            added.push(add);
        }
    }
    Ok(added)
}

/// A log path with its `%XX` escapes decoded (as deltalake's `LogicalFileView::path`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{batch, commit, flush, position, sink};
    use super::*;
    use deltalake::kernel::Transaction;
    use futures::FutureExt as _;

    /// An entry built on a stale snapshot goes after other partitions' entries, reading only
    /// them, and stops at one that committed one of its own partitions.
    #[tokio::test]
    async fn an_entry_passes_other_partitions_and_stops_at_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            sink(dir.path(), DeltaSinkConfig::default()),
            sink(dir.path(), DeltaSinkConfig::default()),
        );
        commit(&a, flush(0, 0, 10, vec![batch(0..10, false)])).await;
        let mut slot = None;
        assert!(a.refresh(&mut slot).await.unwrap());
        let loaded = slot.as_ref().unwrap().version().unwrap();
        // Another member commits two flushes of partition 1 meanwhile.
        commit(&b, flush(1, 0, 10, vec![batch(100..110, false)])).await;
        commit(&b, flush(1, 10, 20, vec![batch(110..120, false)])).await;
        let tp0 = TopicPartition::new("orders", 0);
        let txn = |last: i64| {
            CommitProperties::default()
                .with_application_transaction(Transaction::new(a.app_id(&tp0), last))
        };
        let ids = [a.app_id(&tp0)];
        let version = a
            .commit_append(&mut slot, Vec::new(), txn(19), &ids, a.append_operation())
            .await
            .unwrap();
        assert_eq!(version, loaded + 3, "after the two entries of partition 1");
        assert_eq!(position(dir.path(), 0).await, Some(Offset(20)));
        assert_eq!(position(dir.path(), 1).await, Some(Offset(20)));
        // On the same stale snapshot again (a zombie's view), after another writer committed
        // partition 0: a conflict, and nothing written.
        commit(&b, flush(0, 20, 30, vec![batch(20..30, false)])).await;
        let e = a
            .commit_append(&mut slot, Vec::new(), txn(39), &ids, a.append_operation())
            .await
            .unwrap_err();
        assert!(is_conflict(&e), "{e}");
        assert_eq!(position(dir.path(), 0).await, Some(Offset(30)));
    }

    /// An upsert's entry goes after a winner's new files that hold none of its keys, and stops
    /// at one whose new files do (the check is handed the winner's files, as the table reads
    /// them after it).
    #[tokio::test]
    async fn an_upsert_entry_asks_whether_new_files_hold_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            sink(dir.path(), DeltaSinkConfig::default()),
            sink(dir.path(), DeltaSinkConfig::default()),
        );
        commit(&a, flush(0, 0, 10, vec![batch(0..10, false)])).await;
        let mut slot = None;
        assert!(a.refresh(&mut slot).await.unwrap());
        let stale = slot.unwrap();
        let loaded = stale.version().unwrap();
        commit(&b, flush(1, 0, 10, vec![batch(100..110, false)])).await;
        let tp0 = TopicPartition::new("orders", 0);
        let ids = [a.app_id(&tp0)];
        let txn = |last: i64| {
            CommitProperties::default()
                .with_application_transaction(Transaction::new(a.app_id(&tp0), last))
        };
        let asked = std::sync::Mutex::new(Vec::new());
        let answer = std::sync::atomic::AtomicBool::new(false);
        let holds = |files: Vec<LogicalFileView>| -> BoxFuture<'_, std::result::Result<bool, DeltaTableError>> {
            asked
                .lock()
                .unwrap()
                .extend(files.iter().map(|f| f.path().into_owned()));
            let held = answer.load(std::sync::atomic::Ordering::SeqCst);
            async move { Ok(held) }.boxed()
        };
        let reads = Reads {
            app_ids: ids.to_vec(),
            removes: HashSet::new(),
            holds: Some(&holds),
        };
        let version = a
            .place(
                &mut stale.clone(),
                Vec::new(),
                txn(19),
                a.append_operation(),
                &reads,
            )
            .await
            .unwrap();
        assert_eq!(version, loaded + 2, "after the other member's entry");
        assert_eq!(
            asked.lock().unwrap().len(),
            1,
            "the winner's one new file was checked"
        );
        // The same stale snapshot again, the winner's file now holding a changed key.
        answer.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = a
            .place(
                &mut stale.clone(),
                Vec::new(),
                txn(29),
                a.append_operation(),
                &reads,
            )
            .await
            .unwrap_err();
        assert!(is_conflict(&e), "{e}");
        assert_eq!(position(dir.path(), 0).await, Some(Offset(20)));
    }

    #[test]
    fn only_metadata_protocol_our_txns_and_our_files_conflict() {
        let ours: HashSet<&str> = ["lakesink/g/t/0", "lakesink/g/t/1"].into_iter().collect();
        let removes: HashSet<String> = ["day=2026-12-07/m 1.parquet".to_string()].into();
        let judge = |e: &[u8]| judge(Some(e), &ours, &removes);
        let append = br#"{"commitInfo":{"operation":"WRITE"}}
{"add":{"path":"a%20b.parquet","size":1,"dataChange":true}}
{"txn":{"appId":"lakesink/g/t/7","version":41}}
"#;
        assert_eq!(judge(append), Ok(vec!["a b.parquet".to_string()]));
        let compaction = br#"{"remove":{"path":"a.parquet","dataChange":false}}
{"add":{"path":"b.parquet","size":1,"dataChange":false}}"#;
        assert_eq!(judge(compaction), Ok(vec!["b.parquet".to_string()]));
        let marks_ours = br#"{"remove":{"path":"day=2026-12-07/m%201.parquet"}}"#;
        assert!(judge(marks_ours).is_err());
        assert!(judge(br#"{"txn":{"appId":"lakesink/g/t/1","version":9}}"#).is_err());
        assert!(judge(br#"{"metaData":{"id":"x"}}"#).is_err());
        assert!(judge(br#"{"protocol":{"minReaderVersion":3}}"#).is_err());
        assert!(judge(b"not json").is_err());
        assert!(judge(br#"{"txn":{"version":9}}"#).is_err());
        assert!(super::judge(None, &ours, &removes).is_err());
    }
}
