//! The counters and histograms the pipeline updates and `telemetry` renders: a leaf, so the
//! pipeline reports without knowing how its figures are served.
//!
//! Invariant: nothing here is on the per-record hot path except relaxed atomic increments;
//! histograms are observed once per flush and commit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the flush and commit histograms: from a local commit (milliseconds)
/// to a contended object-store commit retried with backoff (tens of seconds).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Upper bounds (seconds) of the freshness histogram: at least `flush.max_latency` (60 s by
/// default, 1 s in latency-tuned sinks) and up to an hour of falling behind.
pub const FRESHNESS_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 900.0,
    1800.0, 3600.0,
];

/// A histogram over fixed buckets (upper bounds in seconds), chosen per metric.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the `+Inf` bucket.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Observations and their mean in seconds.
    pub fn summary(&self) -> (u64, f64) {
        let n: u64 = self.counts.iter().map(|c| c.load(Relaxed)).sum();
        let mean = self.sum_micros.load(Relaxed) as f64 / 1e6 / n.max(1) as f64;
        (n, mean)
    }

    /// (sum in seconds, count, per bucket (upper bound, observations in it), `+Inf` last).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().map(|c| c.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        (self.sum_micros.load(Relaxed) as f64 / 1e6, count, buckets)
    }
}

/// A counter by label value.
#[derive(Debug, Default)]
pub struct Labeled(std::sync::Mutex<BTreeMap<&'static str, u64>>);

impl Labeled {
    pub fn inc(&self, label: &'static str) {
        *self.0.lock().expect("counter").entry(label).or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().expect("counter").clone()
    }
}

/// Counters of one sink.
#[derive(Debug)]
pub struct SinkStats {
    pub records_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub rows_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub files_written: AtomicU64,
    /// Arrow bytes of buffered rows packed under memory pressure (`sinks::packed`).
    pub packed_bytes: AtomicU64,
    /// What those rows took once packed (compressed Arrow IPC).
    pub packed_size_bytes: AtomicU64,
    pub commits: AtomicU64,
    pub fenced: AtomicU64,
    /// The sink's `flush.max_latency`, for alerts on freshness relative to it.
    pub max_latency_ms: AtomicU64,
    /// Retried operations, by operation (`stage`, `commit`, `registry`, `dead-letter`).
    pub retries: Labeled,
    /// Fatal errors that stopped a partition writer, by class (`decode`, `storage`,
    /// `dead-letter`, `schema`, `internal`).
    pub errors: Labeled,
    pub flush_seconds: Histogram,
    pub commit_seconds: Histogram,
    /// Per commit: from the Kafka timestamp of the oldest record it covers to the commit, i.e.
    /// how stale the table can be (the worst record's produce-to-queryable latency).
    pub freshness_seconds: Histogram,
}

impl Default for SinkStats {
    fn default() -> Self {
        Self {
            records_in: AtomicU64::default(),
            bytes_in: AtomicU64::default(),
            rows_written: AtomicU64::default(),
            bytes_written: AtomicU64::default(),
            files_written: AtomicU64::default(),
            packed_bytes: AtomicU64::default(),
            packed_size_bytes: AtomicU64::default(),
            commits: AtomicU64::default(),
            fenced: AtomicU64::default(),
            max_latency_ms: AtomicU64::default(),
            retries: Labeled::default(),
            errors: Labeled::default(),
            flush_seconds: Histogram::new(LATENCY_BUCKETS),
            commit_seconds: Histogram::new(LATENCY_BUCKETS),
            freshness_seconds: Histogram::new(FRESHNESS_BUCKETS),
        }
    }
}

/// Process state for the probes.
#[derive(Debug, Default)]
pub struct Health {
    /// The consumer holds at least one partition.
    pub assigned: AtomicBool,
    /// Shutdown started: not ready any more.
    pub draining: AtomicBool,
}
