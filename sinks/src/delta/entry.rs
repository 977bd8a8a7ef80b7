//! Writing an append's log entry: a conditional create of the next version; when another writer
//! took it, a read of only that writer's entry, and a try at the version after it.
//!
//! deltalake's commit lists `_delta_log` before every attempt, and after a lost race reads each
//! winning entry twice (its conflict summary, then the snapshot update) before it tries again.
//! With many members committing to one table, the time between learning the table's version
//! and writing the next entry is the window in which another member's commit makes ours lose;
//! those requests were most of it (BENCHMARKS.md, "Commit contention"). Here a lost race costs
//! one read and one write.
//!
//! Invariants:
//! - An entry is written at version `w` only after every entry between the version its actions
//!   were built on and `w` has been read and found not to conflict. An entry conflicts when it
//!   carries `metaData` or `protocol` (the schema or protocol the actions were built on
//!   changed), or a `txn` of one of the entry's app ids (another writer committed one of its
//!   partitions: the fence must decide again). Nothing else bears on an append of new files.
//! - A winner that cannot be read or parsed counts as a conflict; so does running out of hops.
//!   The caller then refreshes and fences again, as after any lost race.
//! - Only log stores with conditional puts (deltalake's `DefaultLogStore`: S3, Azure, GCS,
//!   local) go this way; others, and upserts, take deltalake's commit loop.
//! - A checkpoint is written when the entry's version is the last of a checkpoint interval, as
//!   deltalake does after a commit.

use std::collections::HashSet;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::Action;
use deltalake::protocol::DeltaOperation;
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError};
use tracing::{debug, warn};

use super::*;

/// The most winning entries read for one entry before the caller starts again from a refresh.
const HOPS: u64 = 32;

impl DeltaSink {
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
        let log_store = table.log_store();
        if !self.config.direct_entries || log_store.name() != "DefaultLogStore" {
            let done = CommitBuilder::from(properties)
                .with_actions(actions)
                .build(Some(snapshot), log_store, operation)
                .await?;
            let version = done.version();
            self.after_commit(slot, done).await;
            return Ok(version);
        }
        let evolves = actions.iter().any(|a| matches!(a, Action::Metadata(_)));
        let read = snapshot.version();
        let interval = snapshot.table_config().checkpoint_interval().get();
        let prepared = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), log_store.clone(), operation)
            .into_prepared_commit_future()
            .await?;
        let bytes = prepared.commit_or_bytes().clone();
        drop(prepared);
        let ours: HashSet<&str> = app_ids.iter().map(String::as_str).collect();
        let mut version = read + 1;
        loop {
            let written = log_store
                .write_commit_entry(version, bytes.clone(), uuid::Uuid::new_v4())
                .await;
            match written {
                Ok(()) => break,
                Err(TransactionError::VersionAlreadyExists(_)) if version - read <= HOPS => {
                    let winner = log_store.read_commit_entry(version).await?;
                    if let Some(why) = conflict(winner.as_deref(), &ours) {
                        debug!(table = %self.location, version, "lost the race to an entry that {why}");
                        return Err(DeltaTableError::VersionAlreadyExists(version));
                    }
                    version += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        debug!(table = %self.location, version, read, "committed");
        self.after_entry(slot, version, interval, evolves).await;
        Ok(version)
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
        if let Ok(state) = table.snapshot() {
            self.maybe_compact(state);
        }
    }
}

/// Why a winning entry conflicts with an append whose txns are `ours`, if it does (see the
/// module docs); `None` when the append may go after it.
fn conflict(entry: Option<&[u8]>, ours: &HashSet<&str>) -> Option<&'static str> {
    let Some(entry) = entry else {
        return Some("cannot be read");
    };
    for line in entry.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
            return Some("cannot be parsed");
        };
        if action.get("metaData").is_some() {
            return Some("changes the table's metadata");
        }
        if action.get("protocol").is_some() {
            return Some("changes the protocol");
        }
        if let Some(txn) = action.get("txn") {
            match txn.get("appId").and_then(|a| a.as_str()) {
                Some(id) if !ours.contains(id) => {}
                _ => return Some("commits one of the same partitions"),
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::tests::{batch, commit, flush, position, sink};
    use super::*;
    use deltalake::kernel::Transaction;

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

    #[test]
    fn only_metadata_protocol_and_our_txns_conflict() {
        let ours: HashSet<&str> = ["lakesink/g/t/0", "lakesink/g/t/1"].into_iter().collect();
        let append = br#"{"commitInfo":{"operation":"WRITE"}}
{"add":{"path":"a.parquet","size":1,"dataChange":true}}
{"txn":{"appId":"lakesink/g/t/7","version":41}}
"#;
        assert_eq!(conflict(Some(append), &ours), None);
        let compaction = br#"{"remove":{"path":"a.parquet","dataChange":false}}
{"add":{"path":"b.parquet","size":1,"dataChange":false}}"#;
        assert_eq!(conflict(Some(compaction), &ours), None);
        let same = br#"{"txn":{"appId":"lakesink/g/t/1","version":9}}"#;
        assert!(conflict(Some(same), &ours).is_some());
        let schema = br#"{"metaData":{"id":"x"}}"#;
        assert!(conflict(Some(schema), &ours).is_some());
        let protocol = br#"{"protocol":{"minReaderVersion":3}}"#;
        assert!(conflict(Some(protocol), &ours).is_some());
        assert!(conflict(Some(b"not json"), &ours).is_some());
        assert!(conflict(None, &ours).is_some());
        let no_app_id = br#"{"txn":{"version":9}}"#;
        assert!(conflict(Some(no_app_id), &ours).is_some());
    }
}
