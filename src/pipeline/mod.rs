//! The data path between the Kafka source and the sinks.
//!
//! One [`worker`] task per (sink, partition) decodes records, buffers Arrow batches, flushes on
//! rows / bytes / latency / global memory pressure, stages and commits through the sink, and
//! reports [`Event`]s back to the source thread (committed positions for the Kafka group offset
//! commit, fencing, fatal errors).
//!
//! Invariants:
//! - A worker's flush always starts at its current position (the recovered commit end, or the
//!   first offset it received), so sink commits form a gap-free chain per partition. A flush
//!   is staged and committed by its own task while the worker decodes on; the next one starts
//!   after it is settled.
//! - After a `Fenced` outcome the worker drops everything it holds, asks the source to seek to
//!   the winner's end, and ignores records until the source confirms the seek.
//! - Memory: per-partition queues are bounded; decoded data is accounted in one global
//!   [`BufferBudget`] until its flush is staged; going over it makes the writers holding the
//!   most data flush.

pub mod dead_letter;
pub mod identity;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use schema_registry::RegistryClient;
use sinks::{AnySink, Offset, TopicPartition};

use crate::config::ValidatedSink;
use crate::decode::Record;
use crate::metrics::{Health, SinkStats};

/// A configured sink, shared by its partition workers.
#[derive(Debug)]
pub struct SinkRuntime {
    pub config: ValidatedSink,
    pub sink: Arc<dyn AnySink>,
    pub registry: RegistryClient,
    /// Where undecodable records go when `errors = "dead-letter"`.
    pub dead_letters: Option<dead_letter::DeadLetters>,
}

/// What flows from the source thread into a partition worker.
#[derive(Debug)]
pub enum WorkerMsg {
    /// Consecutive records of the partition, in offset order.
    Records(Vec<Record>),
    /// The source sought to the position the worker asked for; records before this message
    /// were read before the seek.
    Seeked { position: Offset },
    /// Flush and commit what is buffered, then stop (revocation or shutdown).
    Drain(tokio::sync::oneshot::Sender<()>),
}

/// What a worker reports to the source thread.
#[derive(Debug)]
pub enum Event {
    Committed {
        sink: usize,
        tp: TopicPartition,
        next: Offset,
    },
    /// Another writer owns this range: this worker reads on from `position` (the source seeks
    /// back if it has delivered past it; it never moves the shared position forward).
    Resync {
        sink: usize,
        /// The worker asking ([`worker::WorkerCtx::id`]): a drained worker's late request is
        /// ignored.
        worker: u64,
        tp: TopicPartition,
        position: Offset,
    },
    /// The worker cannot continue; the process drains and exits with this error.
    Fatal { message: String },
    /// A topic was found with another id than its partitions were assigned with: deleted and
    /// created again under a running consumer (see [`identity`]).
    TopicRecreated {
        topic: String,
        recorded: String,
        current: String,
    },
}

/// The global budget for decoded data: buffered in partition writers, plus flushes still being
/// encoded and staged (their Arrow batches and Parquet output are alive until the stage ends),
/// plus staged flushes that keep their rows until their commit (a Delta upsert's changes).
///
/// Only writers holding at least the average buffer flush for memory, so pressure produces a
/// few larger files rather than one tiny file per partition. From three quarters of the limit
/// on, such writers flush a few at a time ([`EARLY_FLUSHES`] being encoded or staged at once),
/// so encoding keeps pace with decoding; over the limit, all of them flush. Flushing only at the
/// limit made every partition (all filling at the same rate) flush at once: the encoders queued
/// dozens of flushes while decoding waited for them, then sat idle while the buffers refilled.
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    /// Bytes buffered in writers.
    used: AtomicUsize,
    /// Bytes of flushes between their start and the end of their stage.
    in_flight: AtomicUsize,
    /// Writers holding at least one batch.
    holders: AtomicUsize,
    /// Flushes between their start and the end of their stage.
    flushing: AtomicUsize,
    /// How many flushes may be in flight before the limit is reached.
    early_flushes: usize,
}

/// Flushes in flight (encoding or staging) per core below the limit: enough to keep every
/// core's encoder busy while another flush uploads.
const EARLY_FLUSHES: usize = 2;

impl BufferBudget {
    pub fn new(limit: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Self {
            limit: limit as usize,
            used: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            holders: AtomicUsize::new(0),
            flushing: AtomicUsize::new(0),
            early_flushes: EARLY_FLUSHES * cores,
        }
    }
    /// A writer buffered `n` more bytes; `first` when its buffer was empty.
    pub fn add(&self, n: usize, first: bool) {
        self.used.fetch_add(n, Ordering::Relaxed);
        if first {
            self.holders.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// A writer dropped its buffer of `n` bytes (`n > 0`).
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
        self.holders.fetch_sub(1, Ordering::Relaxed);
    }
    /// A writer starts flushing its buffer of `n` bytes (`n > 0`): buffered becomes in flight.
    pub fn start_flush(&self, n: usize) {
        self.release(n);
        self.in_flight.fetch_add(n, Ordering::Relaxed);
        self.flushing.fetch_add(1, Ordering::Relaxed);
    }
    /// The flush of `n` bytes started by [`Self::start_flush`] is staged (or abandoned).
    pub fn staged(&self, n: usize) {
        self.in_flight.fetch_sub(n, Ordering::Relaxed);
        self.flushing.fetch_sub(1, Ordering::Relaxed);
    }
    /// A staged flush keeps `n` bytes of decoded data until its commit ends (`end_flush`).
    pub fn hold(&self, n: usize) {
        self.in_flight.fetch_add(n, Ordering::Relaxed);
    }
    /// The `n` bytes [`Self::hold`] kept are committed or abandoned.
    pub fn end_flush(&self, n: usize) {
        self.in_flight.fetch_sub(n, Ordering::Relaxed);
    }
    /// Buffered plus in flight.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed) + self.in_flight.load(Ordering::Relaxed)
    }
    pub fn over(&self) -> bool {
        self.used() > self.limit
    }
    /// Whether a writer holding `mine` bytes should flush now: holding at least the average
    /// buffer, and over the limit, or over three quarters of it with room among the flushes in
    /// flight.
    pub fn should_flush(&self, mine: usize) -> bool {
        let used = self.used();
        if mine == 0 || used <= self.limit / 4 * 3 {
            return false;
        }
        let holders = self.holders.load(Ordering::Relaxed).max(1);
        if mine.saturating_mul(holders) < self.used.load(Ordering::Relaxed) {
            return false;
        }
        used > self.limit || self.flushing.load(Ordering::Relaxed) < self.early_flushes
    }
}

#[cfg(test)]
mod tests {
    use super::BufferBudget;

    #[test]
    fn only_large_holders_flush_under_pressure() {
        let b = BufferBudget::new(100);
        b.add(10, true);
        b.add(60, true);
        assert!(!b.should_flush(60), "under three quarters nobody flushes");
        b.add(40, true);
        assert!(b.over());
        assert!(b.should_flush(60), "the largest holder flushes");
        assert!(b.should_flush(40), "so does one over the average");
        assert!(!b.should_flush(10), "small holders keep buffering");
        b.start_flush(60);
        assert!(b.over(), "a flush in flight still counts");
        b.staged(60);
        assert!(!b.over());
        b.release(10);
        b.release(40);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn below_the_limit_a_few_flushes_at_a_time() {
        let b = BufferBudget::new(100);
        for _ in 0..b.early_flushes {
            b.add(1, true);
            b.start_flush(1);
        }
        b.add(39, true);
        b.add(40, true);
        assert!(b.used() > 75 && !b.over());
        assert!(
            !b.should_flush(40),
            "above three quarters, a flush waits for room among those in flight"
        );
        b.staged(1);
        assert!(b.should_flush(40), "room: the largest holder flushes");
        b.start_flush(40);
        b.add(45, false);
        assert!(
            b.over() && b.should_flush(84),
            "over the limit, flushes start whatever is in flight"
        );
    }

    #[test]
    fn changes_waiting_for_their_commit_put_the_buffers_under_pressure() {
        let b = BufferBudget::new(100);
        b.add(60, true);
        b.start_flush(60);
        b.staged(60);
        // The staged upsert keeps its 60 bytes of changes until the commit.
        b.hold(60);
        b.add(50, true);
        assert!(
            b.over() && b.should_flush(50),
            "buffers flush while changes wait"
        );
        b.end_flush(60);
        assert!(!b.over());
    }
}

/// Counters for progress output, the demo and the benchmark.
#[derive(Debug, Default)]
pub struct Progress {
    /// The largest freshness lag of any commit (ms from the oldest record's Kafka timestamp to
    /// its commit), for the benchmark's latency mode.
    pub max_freshness_ms: AtomicU64,
    pub records_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub rows_committed: AtomicU64,
    pub files_committed: AtomicU64,
    pub bytes_committed: AtomicU64,
    pub commits: AtomicU64,
    pub tombstones: AtomicU64,
    /// Nanoseconds the poll thread spent blocked on a full worker queue (backpressure: a
    /// worker behind, usually because it is flushing). Summed once per blocked hand-off.
    pub backpressure_ns: AtomicU64,
    /// Nanoseconds the poll thread waited for records, with nothing fetched to hand on (the
    /// broker and librdkafka's fetches behind, or nothing produced). Summed once per burst.
    pub poll_idle_ns: AtomicU64,
    /// Rejected records per (sink, error class, what happened: `dead-letter` or `skip`).
    pub rejected: Mutex<BTreeMap<(String, &'static str, &'static str), u64>>,
    /// Committed position per (sink name, partition).
    pub positions: Mutex<BTreeMap<(String, TopicPartition), i64>>,
    /// Per-sink counters and histograms.
    pub sinks: Mutex<BTreeMap<String, Arc<SinkStats>>>,
    /// The broker's end offset per partition (from librdkafka statistics).
    pub high_watermarks: Mutex<BTreeMap<TopicPartition, i64>>,
    /// The global buffer budget, once the source has started.
    pub budget: Mutex<Option<Arc<BufferBudget>>>,
    pub health: Health,
    /// Catch-up mode: per partition, the start position and the end offset seen at assignment.
    pub catch_up: Mutex<BTreeMap<TopicPartition, (i64, i64)>>,
    /// Partitions the consumer cannot read (`source::stall`): the offset it is stuck at and the
    /// last consumer error seen.
    pub stalled: Mutex<BTreeMap<TopicPartition, (i64, String)>>,
    /// Partitions not consumed, by this member, until an operator acts (`source::positions`):
    /// (partition, sink name, or `*` for every sink of it) and why.
    pub quarantined: Mutex<BTreeMap<(TopicPartition, String), String>>,
    /// The last error the Kafka consumer reported (librdkafka's text, never a secret).
    pub consumer_error: Mutex<Option<String>>,
}

impl Progress {
    /// The counters of `sink` (created on first use).
    pub fn sink(&self, sink: &str) -> Arc<SinkStats> {
        self.sinks
            .lock()
            .expect("progress")
            .entry(sink.to_string())
            .or_default()
            .clone()
    }

    pub fn sink_stats(&self) -> Vec<(String, Arc<SinkStats>)> {
        self.sinks
            .lock()
            .expect("progress")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn buffer_bytes(&self) -> usize {
        self.budget
            .lock()
            .expect("progress")
            .as_ref()
            .map_or(0, |b| b.used())
    }

    /// Catch-up progress: (records committed since start, records to commit in all).
    pub fn catch_up_progress(&self) -> (u64, u64) {
        let ranges = self.catch_up.lock().expect("progress").clone();
        let mut committed: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for ((_, tp), pos) in self.committed_positions() {
            let e = committed.entry(tp).or_insert(pos);
            *e = (*e).min(pos);
        }
        let (mut done, mut total) = (0u64, 0u64);
        for (tp, (start, end)) in ranges {
            total += (end - start).max(0) as u64;
            let at = committed
                .get(&tp)
                .copied()
                .unwrap_or(start)
                .clamp(start, end.max(start));
            done += (at - start) as u64;
        }
        (done, total)
    }

    /// Assigned partitions, not draining, and none of them stalled or quarantined.
    pub fn ready(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.health.assigned.load(Relaxed)
            && !self.health.draining.load(Relaxed)
            && self.stalled.lock().expect("progress").is_empty()
            && self.quarantined.lock().expect("progress").is_empty()
    }

    /// Stops consuming `tp` for `sink` (`None`: every sink of it) until an operator acts.
    pub fn quarantine(&self, tp: &TopicPartition, sink: Option<&str>, why: String) {
        self.quarantined
            .lock()
            .expect("progress")
            .insert((tp.clone(), sink.unwrap_or("*").to_string()), why);
    }

    /// Forgets the quarantines of `tp` (revoked: its next owner decides again).
    pub fn release_quarantine(&self, tp: &TopicPartition) {
        self.quarantined
            .lock()
            .expect("progress")
            .retain(|(t, _), _| t != tp);
    }

    /// Records the consumer's latest error.
    pub fn note_consumer_error(&self, e: String) {
        *self.consumer_error.lock().expect("progress") = Some(e);
    }

    pub fn consumer_error(&self) -> Option<String> {
        self.consumer_error.lock().expect("progress").clone()
    }

    /// Marks `tp` stalled at an offset with a cause, or (`None`) consumed again.
    pub fn set_stalled(&self, tp: &TopicPartition, stall: Option<(i64, String)>) {
        let mut s = self.stalled.lock().expect("progress");
        match stall {
            Some(v) => {
                s.insert(tp.clone(), v);
            }
            None => {
                s.remove(tp);
            }
        }
    }

    pub fn committed_positions(&self) -> BTreeMap<(String, TopicPartition), i64> {
        self.positions.lock().expect("progress").clone()
    }
}
