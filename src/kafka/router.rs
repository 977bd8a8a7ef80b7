//! Routing polled records to the supervisor's workers, and the state the source keeps beside
//! it: records polled but not yet handed on, the topic ids verified, partitions waiting for a
//! table, and the first fatal error.
//!
//! Invariants: every worker of a partition receives the same records in offset order, batched
//! ([`SEND_BATCH`]); a full worker queue blocks the poll thread (backpressure) rather than
//! dropping anything, for at most the supervisor's `PAUSE_AFTER`: then the partition is
//! paused until its worker has taken what is held for it ([`Router::relieve`]), so the poll
//! thread keeps polling (the member stays in its group; a shutdown is heard); the shared fetch
//! position is never moved forward for one sink ([`resync`]).

use super::*;
use crate::pipeline::retry::{Attempts, Policy};
use crate::pipeline::supervisor::{Resync, Supervisor, PAUSE_AFTER, SEND_BATCH};

pub(super) struct Router {
    pub(super) rt: tokio::runtime::Handle,
    /// The partition workers.
    pub(super) sup: Supervisor,
    pub(super) progress: Arc<Progress>,
    pub(super) options: SourceOptions,
    pub(super) fatal: Option<Error>,
    /// Where a sink with no position in its table starts.
    pub(super) start_at: StartAt,
    /// `kafka.start_from_group`: the group whose committed offsets come before `start_at`.
    pub(super) start_from: Option<positions::GroupOffsets>,
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
    /// Assigned partitions waiting for a table to answer, with when to ask again.
    pub(super) waiting: HashMap<TopicPartition, Instant>,
    /// Partitions with records held for a worker that did not take them: to pause.
    pub(super) to_pause: Vec<TopicPartition>,
    /// Partitions paused until their workers take what is held for them.
    pub(super) backpressured: HashSet<TopicPartition>,
}

/// Records of one partition polled in the current burst.
pub(super) struct Polled {
    pub(super) tp: TopicPartition,
    /// The address of librdkafka's topic handle, to match records without reading the name.
    pub(super) rkt: usize,
    pub(super) records: Vec<Record>,
}

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

    /// Sends `recs` to the workers of `tp`; blocks while a worker's queue is full.
    pub(super) fn send(&mut self, tp: &TopicPartition, recs: Vec<Record>) {
        if self.sup.send(tp, recs) && !self.backpressured.contains(tp) {
            self.to_pause.push(tp.clone());
        }
    }

    /// Pauses the partitions whose workers stopped taking records, hands on what is held as
    /// the workers take it, and resumes the partitions whose workers have taken it all.
    pub(super) fn relieve(&mut self, consumer: &BaseConsumer<LakeContext>) {
        for tp in std::mem::take(&mut self.to_pause) {
            if !self.backpressured.insert(tp.clone()) {
                continue;
            }
            warn!(%tp, "the writers of {tp} have taken no records for {}s (a flush waiting for \
                   its table, or the schema registry being retried); {tp} is paused until they \
                   do, and the consumer keeps polling", PAUSE_AFTER.as_secs());
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&tp.topic, tp.partition);
            if let Err(e) = consumer.pause(&tpl) {
                warn!(%tp, "cannot pause {tp}: {e}");
            }
        }
        for tp in self.sup.deliver_held() {
            if self.backpressured.remove(&tp) {
                info!(%tp, "the writers of {tp} take records again; resuming it");
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&tp.topic, tp.partition);
                if let Err(e) = consumer.resume(&tpl) {
                    warn!(%tp, "cannot resume {tp}: {e}");
                }
            }
        }
    }

    /// Forgets `tps` (revoked) as paused for backpressure, resuming them so that a later
    /// assignment of them starts unpaused.
    pub(super) fn forget_backpressure(
        &mut self,
        consumer: &BaseConsumer<LakeContext>,
        tps: &[TopicPartition],
    ) {
        self.to_pause.retain(|tp| !tps.contains(tp));
        for tp in tps {
            if self.backpressured.remove(tp) {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&tp.topic, tp.partition);
                let _ = consumer.resume(&tpl);
            }
        }
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
    match router.sup.resync(sink, worker, tp, position) {
        Resync::Ignore => return,
        Resync::ReadOn => {}
        Resync::SeekBack => {
            let mut attempts = Attempts::new(Policy::SEEK);
            let sought = loop {
                match consumer.seek(
                    &tp.topic,
                    tp.partition,
                    KOffset::Offset(position.0),
                    Duration::from_secs(10),
                ) {
                    Err(_) if attempts.left() => attempts.wait_blocking(),
                    other => break other,
                }
            };
            if let Err(e) = sought {
                router.fatal.get_or_insert(Error::Seek {
                    tp: tp.clone(),
                    offset: position,
                    after_fence: true,
                    reason: e.to_string(),
                });
                return;
            }
        }
    }
    router.sup.seeked(worker, tp, position);
}
