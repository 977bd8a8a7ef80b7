//! The supervisor: owns this member's partition workers, one task per (sink, partition), and
//! answers the source's assign / deliver / revoke calls.
//!
//! - **assign** = [`Supervisor::recover`] every sink of the partitions (concurrently, within one
//!   deadline), then [`Supervisor::start`] their workers at the positions the source settled on
//!   (the source reads the log's ends and decides what a position beyond them means).
//! - **deliver** = [`Supervisor::send`]: every worker of a partition receives the same records
//!   in offset order; a full worker queue blocks the caller (backpressure), nothing is dropped.
//!   A worker whose queue stays full for [`PAUSE_AFTER`] (a flush that waits on its table, a
//!   registry outage being retried) does not hold the poll thread: what it has not taken waits
//!   in its handle's `held` queue, in order, the source pauses the partition (so the consumer
//!   keeps polling and stays in its group, and a shutdown is heard), and
//!   [`Supervisor::deliver_held`] hands it on as the worker takes it, then says to resume.
//! - **revoke** = [`Supervisor::drain`]: each worker flushes and commits what it holds, within the
//!   drain timeout, and is gone before the call returns: a revoked partition has no writer left
//!   in this process (a commit racing the next owner is still safe: the sink's fence decides).
//! - **resync** after a fence = [`Supervisor::resync`] then [`Supervisor::seeked`]: the shared
//!   fetch position is never moved forward for one sink.
//!
//! The supervisor never talks to Kafka: the source (`kafka`) calls it from its poll thread,
//! which is why its calls block.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sinks::{Offset, TopicPartition};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::identity::TopicIdentities;
use super::retry::{retry, Policy};
use super::worker::{self, WorkerCtx};
use super::{BufferBudget, Event, Progress, SinkRuntime, WorkerMsg};

/// Records per message to a worker: one channel message and one wake-up per batch.
pub const SEND_BATCH: usize = 256;

/// How long a send waits on a full worker queue before the partition is paused instead.
pub const PAUSE_AFTER: Duration = Duration::from_secs(2);

/// Sink recoveries run at once during an assignment.
const RECOVERIES_AT_ONCE: usize = 32;

/// What recovery found per (partition, sink index).
pub type Recovered = HashMap<(TopicPartition, usize), Result<Option<Offset>, Failure>>;

/// Why a sink cannot start a partition.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The sink could not read its position (or record the topic's id).
    Sink(Arc<sinks::Error>),
    /// The table's positions count offsets of an earlier topic of the same name.
    Recreated { recorded: String, current: String },
    /// The table did not answer in time, or only with retryable errors: the partition waits
    /// and its tables are asked again.
    Unready(String),
}

/// How the supervisor runs its workers.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Records queued per worker before the source blocks.
    pub queue_records: usize,
    /// How long a revocation waits for the workers' last commits.
    pub drain_timeout: Duration,
}

struct WorkerHandle {
    sink: usize,
    id: u64,
    tx: mpsc::Sender<WorkerMsg>,
    join: tokio::task::JoinHandle<()>,
    /// Messages the worker's queue had no room for, in order: everything sent to the worker
    /// goes behind them until they are delivered.
    held: VecDeque<WorkerMsg>,
}

struct PartitionState {
    workers: Vec<WorkerHandle>,
    /// End offset at assignment (catch-up mode).
    end: Option<i64>,
    /// Committed position per sink index.
    committed: BTreeMap<usize, i64>,
    /// One past the last offset handed to the workers (after a seek: the seek's position).
    /// Every worker of the partition has been sent everything below it, so a worker that must
    /// skip to a position at or past it needs no seek.
    delivered: Option<i64>,
}

/// What the source does for a fenced worker's [`Event::Resync`].
#[derive(Debug, PartialEq, Eq)]
pub enum Resync {
    /// The request is stale (the partition or the worker is gone): nothing.
    Ignore,
    /// The worker skips to the position itself: no seek; confirm with [`Supervisor::seeked`].
    ReadOn,
    /// Seek the partition back to the position, then confirm with [`Supervisor::seeked`].
    SeekBack,
}

/// The partition workers of this member.
pub struct Supervisor {
    rt: tokio::runtime::Handle,
    sinks: Vec<Arc<SinkRuntime>>,
    parts: HashMap<TopicPartition, PartitionState>,
    events: mpsc::UnboundedSender<Event>,
    budget: Arc<BufferBudget>,
    progress: Arc<Progress>,
    limits: Limits,
    identities: Arc<TopicIdentities>,
    /// The id of the next worker started ([`WorkerCtx::id`]).
    next_worker: u64,
    /// Partitions with messages held for a worker ([`Supervisor::deliver_held`] looks at these
    /// only: it runs after every poll burst).
    backlogged: HashSet<TopicPartition>,
}

impl Supervisor {
    pub fn new(
        rt: tokio::runtime::Handle,
        sinks: Vec<Arc<SinkRuntime>>,
        events: mpsc::UnboundedSender<Event>,
        budget: Arc<BufferBudget>,
        progress: Arc<Progress>,
        limits: Limits,
        identities: Arc<TopicIdentities>,
    ) -> Self {
        Self {
            rt,
            sinks,
            parts: HashMap::new(),
            events,
            budget,
            progress,
            limits,
            identities,
            next_worker: 0,
            backlogged: HashSet::new(),
        }
    }

    pub fn sinks(&self) -> &[Arc<SinkRuntime>] {
        &self.sinks
    }

    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    pub fn identities(&self) -> &Arc<TopicIdentities> {
        &self.identities
    }

    /// Whether `tp` has workers here.
    pub fn holds(&self, tp: &TopicPartition) -> bool {
        self.parts.contains_key(tp)
    }

    /// The partitions with workers here.
    pub fn held(&self) -> Vec<TopicPartition> {
        self.parts.keys().cloned().collect()
    }

    /// The sink indexes with a worker on `tp`.
    pub fn sinks_of(&self, tp: &TopicPartition) -> Vec<usize> {
        self.parts
            .get(tp)
            .map(|s| s.workers.iter().map(|w| w.sink).collect())
            .unwrap_or_default()
    }

    /// One past the last offset handed to the workers of `tp`.
    pub fn delivered(&self, tp: &TopicPartition) -> Option<i64> {
        self.parts.get(tp).and_then(|s| s.delivered)
    }

    /// Every (partition, sink index) of `tps` (not held yet) that some sink reads.
    pub fn jobs(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, usize)> {
        let mut jobs = Vec::new();
        let mut skipped = std::collections::BTreeSet::new();
        for tp in tps.iter().filter(|tp| !self.parts.contains_key(*tp)) {
            for (i, s) in self.sinks.iter().enumerate() {
                if s.config.topics.matches(&tp.topic) {
                    jobs.push((tp.clone(), i));
                } else if let Some(why) = s.config.topics.skipped_by_rule(&tp.topic) {
                    skipped.insert((s.config.name.clone(), tp.topic.to_string(), why));
                }
            }
        }
        for (sink, topic, why) in skipped {
            info!(sink = %sink, topic = %topic, "topic skipped by rule: {why}");
        }
        jobs
    }

    /// Recovers the position of every job's sink, concurrently (the rebalance callback waits
    /// for it: one at a time, a large assignment on a slow store would outlast
    /// `max.poll.interval.ms` and the member would be expelled), within one deadline. A job
    /// with a verdict already (`failed`, by (sink index, topic)) is not asked. A retryable error
    /// is retried with backoff until the deadline.
    pub fn recover(
        &self,
        jobs: Vec<(TopicPartition, usize)>,
        failed: &HashMap<(usize, String), Failure>,
        deadline: tokio::time::Instant,
        within: Duration,
    ) -> Recovered {
        self.rt.block_on(
            futures::stream::iter(jobs)
                .map(|(tp, i)| {
                    let verdict = failed.get(&(i, tp.topic.to_string())).cloned();
                    let sink = self.sinks[i].sink.clone();
                    async move {
                        let result = match verdict {
                            Some(failure) => Err(failure),
                            None => match tokio::time::timeout_at(
                                deadline,
                                retry(
                                    Policy::RECOVERY,
                                    || sink.recover(&tp),
                                    sinks::Error::is_retryable,
                                    |_, _| {},
                                ),
                            )
                            .await
                            {
                                Ok(r) => r.map_err(|e| Failure::Sink(Arc::new(e.error))),
                                Err(_) => Err(Failure::Unready(format!(
                                    "no answer within {}s",
                                    within.as_secs()
                                ))),
                            },
                        };
                        ((tp, i), result)
                    }
                })
                .buffer_unordered(RECOVERIES_AT_ONCE)
                .collect::<HashMap<_, _>>(),
        )
    }

    /// Starts one worker per (sink index, position) of `tp`. `end`: the partition's end offset
    /// at assignment, in catch-up mode; `start`: the earliest position the source reads from.
    pub fn start(
        &mut self,
        tp: &TopicPartition,
        positions: &[(usize, Option<i64>)],
        end: Option<i64>,
        start: Option<i64>,
        decode_rows: usize,
    ) {
        let mut state = PartitionState {
            workers: Vec::new(),
            end,
            committed: BTreeMap::new(),
            delivered: start,
        };
        for (i, pos) in positions {
            let (tx, rx) = mpsc::channel(self.limits.queue_records.div_ceil(SEND_BATCH).max(2));
            if let Some(p) = pos {
                state.committed.insert(*i, *p);
            }
            self.next_worker += 1;
            let id = self.next_worker;
            let ctx = WorkerCtx {
                sink_index: *i,
                id,
                runtime: self.sinks[*i].clone(),
                tp: tp.clone(),
                position: *pos,
                end_offset: end,
                events: self.events.clone(),
                budget: self.budget.clone(),
                progress: self.progress.clone(),
                decode_rows,
                identities: self.identities.clone(),
            };
            let join = self.rt.spawn(worker::run(ctx, rx));
            state.workers.push(WorkerHandle {
                sink: *i,
                id,
                tx,
                join,
                held: VecDeque::new(),
            });
        }
        self.parts.insert(tp.clone(), state);
    }

    /// Sends `recs` to every worker of `tp` (none if it is no longer held). Blocks while a
    /// worker's queue is full, for at most [`PAUSE_AFTER`]: then the rest waits in the worker's
    /// `held` queue. Returns whether anything of `tp` is held (the source pauses `tp`).
    pub fn send(&mut self, tp: &TopicPartition, recs: Vec<crate::decode::Record>) -> bool {
        let Some(state) = self.parts.get_mut(tp) else {
            return false;
        };
        if let Some(last) = recs.last() {
            state.delivered = Some(last.offset + 1);
        }
        let n = state.workers.len();
        let mut recs = Some(recs);
        let mut held = false;
        for (i, w) in state.workers.iter_mut().enumerate() {
            let batch = if i + 1 == n {
                recs.take().expect("records")
            } else {
                recs.clone().expect("records")
            };
            let msg = WorkerMsg::Records(batch);
            if !w.held.is_empty() {
                w.held.push_back(msg);
                held = true;
                continue;
            }
            match w.tx.try_send(msg) {
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    let blocked = std::time::Instant::now();
                    let tx = w.tx.clone();
                    let permit = self.rt.block_on(async move {
                        tokio::time::timeout(PAUSE_AFTER, tx.reserve_owned()).await
                    });
                    self.progress.backpressure_ns.fetch_add(
                        blocked.elapsed().as_nanos() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    match permit {
                        Ok(Ok(permit)) => {
                            permit.send(msg);
                        }
                        // The worker is gone: nothing to deliver.
                        Ok(Err(_)) => {}
                        Err(_) => {
                            w.held.push_back(msg);
                            held = true;
                        }
                    }
                }
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        if held {
            self.backlogged.insert(tp.clone());
        }
        held
    }

    /// Hands held messages on as far as the workers' queues take them, without blocking.
    /// Returns the partitions that had messages held and have none now (to resume).
    pub fn deliver_held(&mut self) -> Vec<TopicPartition> {
        if self.backlogged.is_empty() {
            return Vec::new();
        }
        let mut done = Vec::new();
        for tp in std::mem::take(&mut self.backlogged) {
            let Some(state) = self.parts.get_mut(&tp) else {
                continue; // drained meanwhile
            };
            for w in &mut state.workers {
                while let Some(msg) = w.held.pop_front() {
                    match w.tx.try_send(msg) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(msg)) => {
                            w.held.push_front(msg);
                            break;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => w.held.clear(),
                    }
                }
            }
            if state.workers.iter().all(|w| w.held.is_empty()) {
                done.push(tp);
            } else {
                self.backlogged.insert(tp);
            }
        }
        done
    }

    /// Flushes, commits and stops the workers of `tps`, within the drain timeout: each worker
    /// is sent what is held for it, then the drain request, then waited for; one that has not
    /// taken them or answered by the deadline (stuck retrying its table or the registry) is
    /// aborted, and what it had not committed is read again by the partition's next owner.
    pub fn drain(&mut self, tps: &[TopicPartition]) {
        let until = tokio::time::Instant::now() + self.limits.drain_timeout;
        let mut drains = Vec::new();
        for tp in tps {
            self.backlogged.remove(tp);
            if let Some(state) = self.parts.remove(tp) {
                for w in state.workers {
                    let (ack_tx, ack_rx) = oneshot::channel();
                    let WorkerHandle {
                        sink,
                        tx,
                        join,
                        held,
                        ..
                    } = w;
                    let tp = tp.clone();
                    drains.push(async move {
                        let finished = tokio::time::timeout_at(until, async move {
                            for msg in held {
                                tx.send(msg).await.ok()?;
                            }
                            tx.send(WorkerMsg::Drain(ack_tx)).await.ok()?;
                            ack_rx.await.ok()
                        })
                        .await;
                        match finished {
                            Ok(_) => {
                                let _ = join.await;
                            }
                            Err(_) => {
                                warn!(%tp, sink, "writer did not finish within the drain timeout; \
                                       abandoning its uncommitted data (it is read again by the next owner)");
                                join.abort();
                            }
                        }
                    });
                }
            }
        }
        self.rt.block_on(futures::future::join_all(drains));
    }

    /// A worker of `sink` committed `tp` up to `next`.
    pub fn committed(&mut self, sink: usize, tp: &TopicPartition, next: Offset) {
        if let Some(state) = self.parts.get_mut(tp) {
            state.committed.insert(sink, next.0);
        }
    }

    /// Whether every held partition is committed by every sink up to its end at assignment
    /// (catch-up mode).
    pub fn caught_up(&self) -> bool {
        !self.parts.is_empty()
            && self.parts.values().all(|s| {
                let Some(end) = s.end else { return false };
                s.workers
                    .iter()
                    .all(|w| s.committed.get(&w.sink).is_some_and(|p| *p >= end))
            })
    }

    /// A worker of `sink` was fenced and must read on from `position`, the winner's end.
    ///
    /// There is one fetch position per partition, shared by every sink of the topic, so it is
    /// never moved forward for one sink: that would skip records the other sinks have not
    /// read. At or past what was delivered, the worker needs no seek (it skips up to
    /// `position` itself); before it, the source seeks back, and the other sinks skip what they
    /// already have. A request of a worker that was drained meanwhile (the partition revoked,
    /// perhaps assigned again) is ignored: its writer is gone.
    pub fn resync(
        &self,
        sink: usize,
        worker: u64,
        tp: &TopicPartition,
        position: Offset,
    ) -> Resync {
        let Some(state) = self.parts.get(tp) else {
            return Resync::Ignore; // revoked meanwhile: the next owner recovers
        };
        if !state.workers.iter().any(|w| w.id == worker) {
            debug!(%tp, sink, worker, "a drained worker's resync ignored");
            return Resync::Ignore;
        }
        let name = &self.sinks[sink].config.name;
        let (position, delivered) = (position.0, state.delivered);
        if delivered.is_none_or(|d| position >= d) {
            info!(sink = %name, %tp, position, delivered = ?delivered,
                  "reading on from {position} after another writer's commit; the consumer stays where it is (other sinks of the topic read from it)");
            Resync::ReadOn
        } else {
            info!(sink = %name, %tp, position, delivered = ?delivered,
                  "seeking {tp} back to {position} after another writer's commit (the other sinks of the topic skip what they have)");
            Resync::SeekBack
        }
    }

    /// The source is at `position` for `worker` (after [`Self::resync`]): the worker, which
    /// ignores input until it hears this, reads on. Never called for a seek that failed
    /// (records before the old position would be skipped).
    pub fn seeked(&mut self, worker: u64, tp: &TopicPartition, position: Offset) {
        let Some(state) = self.parts.get_mut(tp) else {
            return;
        };
        if state.delivered.is_some_and(|d| position.0 < d) {
            state.delivered = Some(position.0);
        }
        for w in state.workers.iter_mut().filter(|w| w.id == worker) {
            if !w.held.is_empty() {
                // (`tp` is in `backlogged` already: it has messages held.)
                // Behind what is held for it (from before the seek, which it ignores).
                w.held.push_back(WorkerMsg::Seeked { position });
                continue;
            }
            // Blocking: the worker drains its queue while resyncing.
            let _ = w.tx.blocking_send(WorkerMsg::Seeked { position });
        }
    }
}
