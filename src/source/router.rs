//! Routing polled records to the workers of their partition, and the partition state the
//! source keeps: workers, what was handed to them (`delivered`), committed positions.
//!
//! Invariants: every worker of a partition receives the same records in offset order, batched
//! ([`SEND_BATCH`]); a full worker queue blocks the poll thread (backpressure) rather than
//! dropping anything; the shared fetch position is never moved forward for one sink
//! ([`resync`]).

use super::*;

pub(super) struct WorkerHandle {
    pub(super) sink: usize,
    pub(super) id: u64,
    pub(super) tx: mpsc::Sender<WorkerMsg>,
    pub(super) join: tokio::task::JoinHandle<()>,
}

pub(super) struct PartitionState {
    pub(super) workers: Vec<WorkerHandle>,
    /// End offset at assignment (catch-up mode) and the start position.
    pub(super) end: Option<i64>,
    /// Committed position per sink index.
    pub(super) committed: BTreeMap<usize, i64>,
    /// One past the last offset handed to the workers (after a seek: the seek's position).
    /// Every worker of the partition has been sent everything below it, so a worker that must
    /// skip to a position at or past it needs no seek.
    pub(super) delivered: Option<i64>,
}

pub(super) struct Router {
    pub(super) rt: tokio::runtime::Handle,
    pub(super) sinks: Vec<Arc<SinkRuntime>>,
    pub(super) parts: HashMap<TopicPartition, PartitionState>,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) budget: Arc<BufferBudget>,
    pub(super) progress: Arc<Progress>,
    pub(super) queue: usize,
    pub(super) drain_timeout: Duration,
    pub(super) options: SourceOptions,
    pub(super) fatal: Option<String>,
    /// Where a sink with no position in its table starts.
    pub(super) start_at: StartAt,
    /// The id of the next worker started ([`WorkerCtx::id`]).
    pub(super) next_worker: u64,
    /// Records polled but not yet handed to their workers, in poll order per partition.
    /// Dispatched at the end of every poll burst and before any rebalance is handled, so a
    /// worker sees exactly the sequence it would see if every record were sent at once.
    pub(super) pending: Vec<Polled>,
    pub(super) pending_records: usize,
    /// Whether records keep their Kafka headers: only when some sink dead-letters, the one
    /// place they are written again.
    pub(super) keep_headers: bool,
    /// Where polled keys and payloads are copied: one allocation per [`ARENA_CHUNK`] shared by
    /// many records (each a `Bytes` slice of it) instead of one allocation per record, freed
    /// on another thread.
    pub(super) arena: bytes::BytesMut,
    /// Rows per decoder batch for the partitions being assigned (see [`decode_batch_rows`]).
    pub(super) decode_rows: usize,
    /// The topic id each (sink index, topic) was last verified against its table with (see
    /// `topic_ids`): not asked again while the broker reports the same id.
    pub(super) topic_ids: HashMap<(usize, String), String>,
    /// The commit gate on topic identity, told each assigned topic's id.
    pub(super) identities: Arc<crate::pipeline::identity::TopicIdentities>,
    /// Assigned partitions waiting for a table to answer, with when to ask again.
    pub(super) waiting: HashMap<TopicPartition, Instant>,
}

/// Records of one partition polled in the current burst.
pub(super) struct Polled {
    pub(super) tp: TopicPartition,
    /// The address of librdkafka's topic handle, to match records without reading the name.
    pub(super) rkt: usize,
    pub(super) records: Vec<Record>,
}

/// Records per message to a worker: one channel message and one wake-up per batch.
pub(super) const SEND_BATCH: usize = 256;
/// Records polled in one burst before they are dispatched.
pub(super) const POLL_BURST: usize = 4096;

impl Router {
    /// Queues a polled record for its partition's workers.
    pub(super) fn push(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let rec = Record {
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(|k| self.copy(k)),
            payload: m.payload().map(|p| self.copy(p)),
            // librdkafka parses headers on request, with an allocation per record even when
            // there are none: only dead letters carry them, so only read them for those.
            headers: if self.keep_headers {
                m.headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            },
        };
        // The topic handle identifies the topic without reading (and UTF-8 checking) its name:
        // librdkafka keeps one handle per topic while any of its partitions is assigned.
        let rkt = m.topic_ptr() as usize;
        let partition = m.partition();
        let i = match self
            .pending
            .iter()
            .rposition(|p| p.rkt == rkt && p.tp.partition == partition)
        {
            Some(i) => i,
            None => {
                self.pending.push(Polled {
                    tp: TopicPartition::new(m.topic(), partition),
                    rkt,
                    records: Vec::with_capacity(SEND_BATCH.min(64)),
                });
                self.pending.len() - 1
            }
        };
        self.pending[i].records.push(rec);
        self.pending_records += 1;
        if self.pending[i].records.len() >= SEND_BATCH {
            let p = self.pending.swap_remove(i);
            self.pending_records -= p.records.len();
            self.send(&p.tp, p.records);
        }
    }

    /// A copy of `data` in the arena.
    pub(super) fn copy(&mut self, data: &[u8]) -> bytes::Bytes {
        arena_copy(&mut self.arena, data)
    }

    /// Hands every queued record to its workers.
    pub(super) fn dispatch_pending(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            self.send(&p.tp, p.records);
        }
        self.pending_records = 0;
    }

    /// Sends `recs` to every worker of `tp` (none if it is no longer assigned). Blocks while a
    /// worker's queue is full: backpressure.
    pub(super) fn send(&mut self, tp: &TopicPartition, recs: Vec<Record>) {
        let Some(state) = self.parts.get_mut(tp) else {
            return;
        };
        if let Some(last) = recs.last() {
            state.delivered = Some(last.offset + 1);
        }
        let n = state.workers.len();
        let mut recs = Some(recs);
        for (i, w) in state.workers.iter().enumerate() {
            let batch = if i + 1 == n {
                recs.take().expect("records")
            } else {
                recs.clone().expect("records")
            };
            match w.tx.try_send(WorkerMsg::Records(batch)) {
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    let blocked = std::time::Instant::now();
                    let _ = w.tx.blocking_send(msg);
                    self.progress.backpressure_ns.fetch_add(
                        blocked.elapsed().as_nanos() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Flushes, commits and stops the workers of `tps`, within the drain timeout.
    pub(super) fn drain(&mut self, tps: &[TopicPartition]) {
        let mut acks = Vec::new();
        for tp in tps {
            if let Some(state) = self.parts.remove(tp) {
                for w in state.workers {
                    let (ack_tx, ack_rx) = oneshot::channel();
                    let tx = w.tx.clone();
                    acks.push((ack_rx, w.join, tp.clone(), w.sink));
                    let _ = self
                        .rt
                        .block_on(async move { tx.send(WorkerMsg::Drain(ack_tx)).await });
                }
            }
        }
        let deadline = self.drain_timeout;
        self.rt.block_on(async move {
            let until = tokio::time::Instant::now() + deadline;
            for (ack, join, tp, sink) in acks {
                match tokio::time::timeout_at(until, ack).await {
                    Ok(_) => {
                        let _ = join.await;
                    }
                    Err(_) => {
                        warn!(%tp, sink, "writer did not finish within the drain timeout; \
                               abandoning its uncommitted data (it is read again by the next owner)");
                        join.abort();
                    }
                }
            }
        });
    }

    pub(super) fn caught_up(&self) -> bool {
        !self.parts.is_empty()
            && self.parts.values().all(|s| {
                let Some(end) = s.end else { return false };
                s.workers
                    .iter()
                    .all(|w| s.committed.get(&w.sink).is_some_and(|p| *p >= end))
            })
    }
}

/// A worker of `sink` was fenced and must read on from `position`, the winner's end.
///
/// There is one fetch position per partition, shared by every sink of the topic, so it is
/// never moved forward for one sink: that would skip records the other sinks have not read.
/// At or past what was delivered, the worker needs no seek (it skips up to `position` itself);
/// before it, the source seeks back, and the other sinks skip what they already have. A request
/// of a worker that was drained meanwhile (the partition revoked, perhaps assigned again) is
/// ignored: its writer is gone. The worker ignores input until it hears `Seeked`; a failed seek
/// must never be reported as done (records before the old position would be skipped), so it is
/// retried, then stops the process: a restart recovers from the table.
pub(super) fn resync(
    consumer: &BaseConsumer<LakeContext>,
    router: &mut Router,
    sink: usize,
    worker: u64,
    tp: &TopicPartition,
    position: sinks::Offset,
) {
    let position = position.0;
    let Some(state) = router.parts.get(tp) else {
        return; // revoked meanwhile: the next owner recovers
    };
    if !state.workers.iter().any(|w| w.id == worker) {
        debug!(%tp, sink, worker, "a drained worker's resync ignored");
        return;
    }
    let name = &router.sinks[sink].config.name;
    let delivered = state.delivered;
    if delivered.is_none_or(|d| position >= d) {
        info!(sink = %name, %tp, position, delivered = ?delivered,
              "reading on from {position} after another writer's commit; the consumer stays where it is (other sinks of the topic read from it)");
    } else {
        info!(sink = %name, %tp, position, delivered = ?delivered,
              "seeking {tp} back to {position} after another writer's commit (the other sinks of the topic skip what they have)");
        let mut sought = Err(rdkafka::error::KafkaError::Seek("not tried".into()));
        for attempt in 0..5 {
            sought = consumer.seek(
                &tp.topic,
                tp.partition,
                KOffset::Offset(position),
                Duration::from_secs(10),
            );
            if sought.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200 << attempt));
        }
        if let Err(e) = sought {
            router.fatal.get_or_insert(format!(
                "cannot seek {tp} to {position} after another writer committed that range: {e}; \
                 restarting recovers from the table"
            ));
            return;
        }
    }
    let Some(state) = router.parts.get_mut(tp) else {
        return;
    };
    if delivered.is_some_and(|d| position < d) {
        state.delivered = Some(position);
    }
    for w in state.workers.iter().filter(|w| w.id == worker) {
        // Blocking: the worker drains its queue while resyncing.
        let _ = w.tx.blocking_send(WorkerMsg::Seeked {
            position: sinks::Offset(position),
        });
    }
}
