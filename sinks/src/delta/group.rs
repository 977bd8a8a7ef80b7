//! Group commit of appends: the flushes of other partitions waiting at the same moment share one
//! log entry, each fenced on its own txn first.

use std::sync::Arc;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, MetadataExt, Transaction};
use deltalake::DeltaTable;
use tracing::{debug, info, warn};

use crate::CommitOutcome;

use super::*;

impl DeltaSink {
    /// Commits `group` (distinct partitions, an existing table) in one log entry and answers
    /// every member. Members the group cannot carry, and all of them when it fails, are told to
    /// commit alone.
    pub(super) async fn commit_group(&self, slot: &mut Option<DeltaTable>, group: Vec<Pending>) {
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
                if let Some(wanted) = p.staged.data.schema.as_ref() {
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
                let delta = &p.staged.data;
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
}
