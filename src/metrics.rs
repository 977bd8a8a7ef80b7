//! The counters and histograms the pipeline updates and `telemetry` renders: a leaf, so the
//! pipeline reports without knowing how its figures are served.
//!
//! Invariant: nothing here is on the per-record hot path except relaxed atomic increments;
//! histograms are observed once per flush and commit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; 11],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Observations and their mean in seconds.
    pub fn summary(&self) -> (u64, f64) {
        let n: u64 = self.counts.iter().map(|c| c.load(Relaxed)).sum();
        let mean = self.sum_micros.load(Relaxed) as f64 / 1e6 / n.max(1) as f64;
        (n, mean)
    }

    /// Writes the histogram in the Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
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
#[derive(Debug, Default)]
pub struct SinkStats {
    pub records_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub rows_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub files_written: AtomicU64,
    pub commits: AtomicU64,
    pub fenced: AtomicU64,
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

/// Process state for the probes.
#[derive(Debug, Default)]
pub struct Health {
    /// The consumer holds at least one partition.
    pub assigned: AtomicBool,
    /// Shutdown started: not ready any more.
    pub draining: AtomicBool,
}
