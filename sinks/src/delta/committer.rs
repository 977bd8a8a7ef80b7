//! Committing: a staged flush becomes one log entry with its txn action, alone or queued into a
//! group with the flushes of other partitions waiting at the same moment (see the module docs).

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{Action, MetadataExt, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::DeltaTable;
use tracing::{debug, info, warn};

use super::DeltaStaged;
use crate::{CommitOutcome, Result, Staged};

use super::*;

impl DeltaSink {
    /// Keeps the state the commit produced (it already replayed our own commit: the next
    /// `refresh` then reads only what other writers added since) and cleans up the log when the
    /// commit wrote a checkpoint.
    pub(super) async fn after_commit(
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
        self.maybe_compact(&state);
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
    pub(super) fn append_operation(&self) -> DeltaOperation {
        let partition_by: Vec<String> = self.partition_columns();
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
    pub(super) async fn commit_queued(
        &self,
        staged: &Staged<DeltaStaged>,
    ) -> Result<(CommitOutcome, Option<Written>)> {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.pending.lock().expect("poisoned").push(Pending {
            id,
            staged: staged.clone(),
            reply,
        });
        // A flush cut at a latency tick waits for the other partitions' flushes of that tick
        // (cut at the same moment), unless a leader takes it meanwhile.
        if let Some(until) = staged.data.gather_until {
            tokio::select! {
                biased;
                got = &mut answer => {
                    if let Ok(GroupReply::Done(outcome, written)) = got {
                        return Ok((outcome, written));
                    }
                    let mut slot = self.table.lock().await;
                    return self.commit_alone(&mut slot, staged).await;
                }
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
        let mut slot = tokio::select! {
            biased;
            got = &mut answer => match got {
                Ok(GroupReply::Done(outcome, written)) => return Ok((outcome, written)),
                Ok(GroupReply::Alone) | Err(_) => {
                    let mut slot = self.table.lock().await;
                    return self.commit_alone(&mut slot, staged).await;
                }
            },
            slot = self.table.lock() => slot,
        };
        match answer.try_recv() {
            Ok(GroupReply::Done(outcome, written)) => return Ok((outcome, written)),
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
        if group.len() > 1 && slot.is_none() {
            self.create_for_group(&mut slot, &group).await;
        }
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
            Ok(GroupReply::Done(outcome, written)) => Ok((outcome, written)),
            _ => self.commit_alone(&mut slot, staged).await,
        }
    }

    /// Loads the table before a group commits, creating it when it does not exist yet, with
    /// the columns all of `group` need: the first tick of a new table is then one entry like
    /// every other (without, each member would commit alone, the first one creating the table).
    /// Failing leaves the table unloaded: the members then commit alone and each reports the
    /// error on its own.
    async fn create_for_group(&self, slot: &mut Option<DeltaTable>, group: &[Pending]) {
        match self.refresh(slot).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                debug!(table = %self.location, "cannot load the table for a group: {e}");
                return;
            }
        }
        let mut schemas = group.iter().filter_map(|p| p.staged.data.schema.as_ref());
        let Some(first) = schemas.next() else {
            return;
        };
        let mut wanted = first.clone();
        for s in schemas {
            match schema::merge(&wanted, s) {
                Ok(merged) => wanted = merged,
                Err(_) => return,
            }
        }
        if let Err(e) = self.create(slot, &wanted).await {
            debug!(table = %self.location, "cannot create the table for a group: {e}");
            *slot = None;
        }
    }

    pub(super) async fn commit_alone(
        &self,
        slot: &mut Option<DeltaTable>,
        staged: &Staged<DeltaStaged>,
    ) -> Result<(CommitOutcome, Option<Written>)> {
        let delta = &staged.data;
        if let Some(changes) = &delta.changes {
            let outcome =
                upsert::commit(self, slot, staged, delta.schema.as_ref(), changes).await?;
            return Ok((outcome, None));
        }
        let (adds, written) = if delta.deferred.is_empty() {
            (delta.adds.clone(), None)
        } else {
            // Rows deferred to a group that did not form: into files of this flush's own.
            let schema = delta.schema.as_ref().expect("deferred rows have a schema");
            let adds = self.write_blocking(schema, deferred_rows(staged)).await?;
            let written = Written {
                files: adds.len(),
                bytes: adds.iter().map(|a| a.size.max(0) as u64).sum(),
            };
            (adds, Some(written))
        };
        let actions: Vec<Action> = adds.into_iter().map(Action::Add).collect();
        let outcome = self
            .commit_actions(slot, staged, delta.schema.as_ref(), actions, || {
                self.append_operation()
            })
            .await?;
        Ok((outcome, written))
    }

    /// Runs one commit attempt loop for `staged`'s actions, fenced on the partition's txn.
    pub(super) async fn commit_actions(
        &self,
        slot: &mut Option<DeltaTable>,
        staged: &Staged<DeltaStaged>,
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
            let result = self
                .commit_append(
                    slot,
                    all,
                    properties,
                    std::slice::from_ref(&app_id),
                    operation(),
                )
                .await;
            match result {
                Ok(version) => {
                    debug!(table = %self.location, %tp, version, "committed");
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

/// Sleeps before retrying a commit that lost a race: `base_ms` per attempt so far (at most 10),
/// plus as much again at random, so that racing writers spread out.
pub(super) async fn conflict_backoff(base_ms: u64, attempt: u32) {
    let backoff = base_ms * u64::from(attempt.min(10));
    let jitter = rand::random::<u64>() % (backoff + 1);
    tokio::time::sleep(Duration::from_millis(backoff + jitter)).await;
}

/// The rows `staged` deferred to its commit, chunk by chunk.
pub(super) fn deferred_rows(staged: &Staged<DeltaStaged>) -> Vec<writer::FlushRows> {
    staged
        .data
        .deferred
        .iter()
        .map(|chunk| writer::FlushRows {
            tp: staged.tp.clone(),
            start: staged.start,
            next: staged.next,
            chunk: chunk.clone(),
        })
        .collect()
}
