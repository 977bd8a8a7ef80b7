//! Group commit of appends: the flushes of other partitions waiting at the same moment share one
//! log entry, each fenced on its own txn first.
//!
//! Flushes cut at a latency tick arrive with their rows unwritten ([`DeltaStaged::deferred`]):
//! the group writes the rows of all of them into one set of files, one per table partition, so
//! the files a table gets per tick do not grow with the number of Kafka partitions. Those files
//! hold exactly the carried members' rows: when a retry carries fewer members (one was fenced
//! meanwhile), the files are written again without it, and the first set stays unreferenced.

use std::sync::Arc;

use deltalake::kernel::transaction::CommitProperties;
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
        // The shared files written for the deferred members carried (by id), if any yet.
        let mut shared: Option<(Vec<u64>, Vec<deltalake::kernel::Add>)> = None;
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
            let deferred: Vec<u64> = carried
                .iter()
                .filter(|p| !p.staged.data.deferred.is_empty())
                .map(|p| p.id)
                .collect();
            if deferred.is_empty() {
                shared = None;
            } else if shared.as_ref().is_none_or(|(ids, _)| *ids != deferred) {
                match self.write_shared(&carried, &merged).await {
                    Ok(adds) => shared = Some((deferred, adds)),
                    Err(e) => {
                        warn!(table = %self.location, flushes = carried.len(),
                            "could not write the group's shared files, committing alone: {e}");
                        break carried;
                    }
                }
            }
            let written = shared.as_ref().map(|(_, adds)| Written {
                files: adds.len(),
                bytes: adds.iter().map(|a| a.size.max(0) as u64).sum(),
            });
            if let Some((_, adds)) = &shared {
                all.extend(adds.iter().cloned().map(Action::Add));
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
            let app_ids: Vec<String> = carried.iter().map(|p| self.app_id(&p.staged.tp)).collect();
            let result = self
                .commit_append(slot, all, properties, &app_ids, self.append_operation())
                .await;
            match result {
                Ok(version) => {
                    debug!(table = %self.location, version, flushes = carried.len(),
                        "committed a group");
                    let mut written = written;
                    for p in carried {
                        let next = p.staged.next;
                        // The shared files are counted once, with the first deferred member.
                        let mine = if p.staged.data.deferred.is_empty() {
                            None
                        } else {
                            written.take().or(Some(Written::default()))
                        };
                        let _ = p
                            .reply
                            .send(GroupReply::Done(CommitOutcome::Committed { next }, mine));
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
                        let _ = p.reply.send(GroupReply::Done(outcome, None));
                    }
                    None => carried.push(p),
                },
                Err(_) => unread.push(p),
            }
        }
        (carried, unread)
    }

    /// Writes the deferred rows of `carried` into shared files, one per table partition (rolled
    /// at the writer's target size), conformed to `schema` (the commit's table schema).
    async fn write_shared(
        &self,
        carried: &[Pending],
        schema: &SchemaRef,
    ) -> crate::Result<Vec<deltalake::kernel::Add>> {
        let rows = carried
            .iter()
            .flat_map(|p| committer::deferred_rows(&p.staged))
            .collect();
        self.write_blocking(schema, rows).await
    }
}
