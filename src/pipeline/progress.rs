//! What the pipeline and the source report for progress output, `/readyz`, `status`, the
//! metrics, the demo and the benchmark.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use sinks::TopicPartition;

use super::BufferBudget;
use crate::metrics::{Health, SinkStats};

/// Counters for progress output, the demo and the benchmark.
#[derive(Debug, Default)]
pub struct Progress {
    /// The largest freshness lag of any commit (ms from the oldest record's Kafka timestamp to
    /// its commit), for the benchmark's latency mode.
    pub max_freshness_ms: AtomicU64,
    /// When the first record reached a worker (after the group join and the position
    /// recovery): the demo's and the benchmark's throughput clock starts here.
    pub first_record: std::sync::OnceLock<std::time::Instant>,
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
    /// The table each (sink name, topic) read here writes to (`lakesink_table_info`).
    pub tables: Mutex<BTreeMap<(String, String), String>>,
    /// Per-sink counters and histograms.
    pub sinks: Mutex<BTreeMap<String, Arc<SinkStats>>>,
    /// The broker's end offset per partition (from librdkafka statistics).
    pub high_watermarks: Mutex<BTreeMap<TopicPartition, i64>>,
    /// The log start offset per partition (from librdkafka statistics): where the lag of a
    /// partition no table has a position for counts from.
    pub low_watermarks: Mutex<BTreeMap<TopicPartition, i64>>,
    /// The global buffer budget, once the source has started.
    pub budget: Mutex<Option<Arc<BufferBudget>>>,
    pub health: Health,
    /// Catch-up mode: per partition, the start position and the end offset seen at assignment.
    pub catch_up: Mutex<BTreeMap<TopicPartition, (i64, i64)>>,
    /// Partitions the consumer cannot read (`kafka::stall`): the offset it is stuck at and the
    /// last consumer error seen.
    pub stalled: Mutex<BTreeMap<TopicPartition, (i64, String)>>,
    /// Partitions not consumed, by this member, until an operator acts (`kafka::positions`):
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

    /// The budget's flushes in flight: (staging, committing, bytes they hold, writers holding
    /// a buffer).
    pub fn flushes(&self) -> (usize, usize, usize, usize) {
        self.budget
            .lock()
            .expect("progress")
            .as_ref()
            .map_or((0, 0, 0, 0), |b| {
                let (staging, committing, holders) = b.flushes();
                (staging, committing, b.in_flight(), holders)
            })
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
