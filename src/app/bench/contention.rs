//! `lakesink bench --contention`: commits of many members to one Delta table, simulated at
//! production size on one machine.
//!
//! Each member is what one `lakesink run` process holds for the table: one [`DeltaSink`] (its own
//! table handle, group commit and retry loop, unchanged) and its share of the Kafka partitions
//! (round robin, as the group's assignor gives them). At every tick of its latency grid
//! ([`crate::pipeline::tick`], the pipeline's own), a member cuts a flush of every partition it
//! holds and commits them, as the partition workers do; a member whose commit outlasts a period
//! misses the ticks in between, as a worker with a flush in flight does. The table lives in a
//! [`LatencyStore`]: requests take S3's latencies and a commit entry's conditional create is
//! decided as S3 decides it, so members race for log entries as they would on S3. The store's
//! own CPU cost is nil; what the members' code costs runs on this machine's cores.
//!
//! Reported per (`max_latency`, members): log entries per second against the one group commit
//! per member and tick the design calls for, lost races per entry, commit latency from the tick
//! to committed (p50, p99), the worst freshness (a record arriving just after a cut waits for
//! the next cut and its commit), missed ticks and failed commits, and the CPU it took.
//! `--aligned` puts every member on the epoch grid (the pipeline before it drew a phase per
//! process), to show what a phase per member changes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use sinks::delta::{DeltaSink, DeltaSinkConfig};
use sinks::latency_store::{Counts, Latencies, LatencyStore};
use sinks::{CommitOutcome, Flush, Offset, Sink as _, Tick, TopicPartition};

use super::*;
use crate::pipeline::tick::{gather_window, next_at};

/// One simulated configuration.
#[derive(Debug, Clone)]
pub(super) struct Sim {
    pub(super) members: u32,
    pub(super) partitions: u32,
    pub(super) max_latency: Duration,
    /// Periods simulated after the warm-up.
    pub(super) ticks: u32,
    /// Every member on the epoch grid instead of a phase of its own.
    pub(super) aligned: bool,
    /// Appends write their log entry themselves (`DeltaSinkConfig::direct_entries`).
    pub(super) direct: bool,
    /// Phases spread evenly over the period (member i at i / members) instead of drawn, for a
    /// test whose result must not depend on the draw.
    pub(super) even: bool,
    /// Rows per partition per flush.
    pub(super) rows: i64,
    pub(super) seed: u64,
}

/// What one configuration measured.
#[derive(Debug, Clone, Default)]
pub(super) struct SimReport {
    /// Member ticks cut (each should be one log entry).
    pub(super) cuts: u64,
    /// The store's counts over the measured periods.
    pub(super) store: Counts,
    /// Tick → every flush of the cut committed, per cut, in ms (sorted).
    pub(super) commit_ms: Vec<u64>,
    /// The longest a record waited: previous cut → committed, in ms.
    pub(super) freshness_max_ms: u64,
    /// Ticks members missed because a commit was still running.
    pub(super) missed: u64,
    /// Flushes whose commit failed (after the sink's own retries) or were fenced.
    pub(super) failed: u64,
    /// The simulated span, in seconds.
    pub(super) span_s: f64,
    /// CPU seconds the simulation used.
    pub(super) cpu_s: f64,
}

impl SimReport {
    fn quantile(&self, q: f64) -> u64 {
        if self.commit_ms.is_empty() {
            return 0;
        }
        let i = ((self.commit_ms.len() as f64 * q).ceil() as usize).clamp(1, self.commit_ms.len());
        self.commit_ms[i - 1]
    }

    /// Lost races per log entry written.
    pub(super) fn conflicts_per_entry(&self) -> f64 {
        self.store.log_conflicts as f64 / self.store.log_entries.max(1) as f64
    }

    /// `n` requests per log entry written.
    pub(super) fn per_entry(&self, n: u64) -> f64 {
        n as f64 / self.store.log_entries.max(1) as f64
    }

    pub(super) fn p50_ms(&self) -> u64 {
        self.quantile(0.50)
    }

    pub(super) fn p99_ms(&self) -> u64 {
        self.quantile(0.99)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn flush(tp: &TopicPartition, start: i64, rows: i64, tick: Option<Tick>) -> Flush {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]));
    let ids: Vec<i64> = (start..start + rows).collect();
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|i| format!("row {i}")),
            )),
        ],
    )
    .expect("a valid batch");
    Flush {
        tp: tp.clone(),
        start: Offset(start),
        next: Offset(start + rows),
        batches: vec![batch],
        packed: Vec::new(),
        truncate: false,
        tick,
    }
}

/// Runs one configuration on a fresh simulated store.
pub(super) async fn simulate(sim: &Sim) -> anyhow::Result<SimReport> {
    let store = LatencyStore::new(Latencies::s3(), sim.seed);
    let name = format!("contention{}", rand::random::<u32>());
    let url = LatencyStore::register(&name, store.clone());
    let table = url.join("table").context("table URL")?.to_string();
    let topic = "orders";
    let open = || {
        DeltaSink::new(
            &table,
            Vec::<(String, String)>::new(),
            DeltaSinkConfig {
                direct_entries: sim.direct,
                ..DeltaSinkConfig::default()
            },
        )
    };
    // The table exists before the members start, as in a steady state.
    let creator = open()?;
    let staged = creator
        .stage(flush(&TopicPartition::new("setup", 0), 0, 1, None))
        .await?;
    creator.commit(&staged).await?;

    let period = sim.max_latency;
    let period_ms = period.as_millis() as u64;
    // Each member starts as on assignment: the table loaded and each position read.
    let starts = (0..sim.members).map(|m| {
        let sink = open().map(Arc::new);
        let (aligned, even, members) = (sim.aligned, sim.even, sim.members);
        async move {
            let sink = sink?;
            let parts: Vec<TopicPartition> = (0..sim.partitions)
                .filter(|p| p % sim.members == m)
                .map(|p| TopicPartition::new(topic, p as i32))
                .collect();
            for tp in &parts {
                sink.recover(tp).await?;
            }
            let phase = match (aligned, even) {
                (true, _) => 0.0,
                (false, true) => f64::from(m) / f64::from(members),
                (false, false) => rand::random::<f64>(),
            };
            anyhow::Ok((sink, parts, phase))
        }
    });
    let members = futures::future::try_join_all(starts).await?;
    let before = store.counts();
    let cpu_before = measure::process_cpu_precise();
    let start_ms = now_ms() + 200;
    let end_ms = start_ms + period_ms * u64::from(sim.ticks);
    let report = Arc::new(Mutex::new(SimReport::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for (sink, parts, phase) in members {
        let report = report.clone();
        let rows = sim.rows;
        tasks.spawn(async move {
            let mut next = vec![0i64; parts.len()];
            let mut previous_cut = start_ms;
            let mut at_ms = next_at(start_ms, period_ms, phase);
            while at_ms < end_ms {
                tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now_ms()))).await;
                let tick = Tick {
                    at_ms,
                    gather_until: std::time::Instant::now() + gather_window(period),
                };
                let commits = parts.iter().zip(&next).map(|(tp, &start)| {
                    let sink = sink.clone();
                    async move {
                        let staged = sink.stage(flush(tp, start, rows, Some(tick))).await?;
                        sink.commit(&staged).await
                    }
                });
                let outcomes = futures::future::join_all(commits).await;
                let done = now_ms();
                let mut r = report.lock().expect("poisoned");
                for (outcome, position) in outcomes.into_iter().zip(next.iter_mut()) {
                    match outcome {
                        Ok((CommitOutcome::Committed { next }, _)) => *position = next.0,
                        _ => r.failed += 1,
                    }
                }
                r.cuts += 1;
                r.commit_ms.push(done.saturating_sub(at_ms));
                r.freshness_max_ms = r.freshness_max_ms.max(done.saturating_sub(previous_cut));
                previous_cut = at_ms;
                let following = next_at(done.max(at_ms), period_ms, phase);
                r.missed += (following - at_ms) / period_ms - 1;
                at_ms = following;
            }
            parts.into_iter().zip(next).collect::<Vec<_>>()
        });
    }
    let mut positions = Vec::new();
    while let Some(done) = tasks.join_next().await {
        positions.extend(done.context("a simulated member panicked")?);
    }
    let (ended, after, cpu_after) = (now_ms(), store.counts(), measure::process_cpu_precise());
    // Exactly once: the table's position of every partition is where its member got to.
    let reader = open()?;
    for (tp, next) in positions {
        let recorded = reader.committed(&tp).await?.map_or(0, |o| o.0);
        anyhow::ensure!(
            recorded == next,
            "{tp}: the table records {recorded}, the member committed up to {next}"
        );
    }
    let mut report = std::mem::take(&mut *report.lock().expect("poisoned"));
    report.store = Counts {
        puts: after.puts - before.puts,
        gets: after.gets - before.gets,
        heads: after.heads - before.heads,
        lists: after.lists - before.lists,
        deletes: after.deletes - before.deletes,
        log_entries: after.log_entries - before.log_entries,
        log_conflicts: after.log_conflicts - before.log_conflicts,
    };
    report.commit_ms.sort_unstable();
    report.span_s = (ended - start_ms) as f64 / 1000.0;
    report.cpu_s = cpu_after - cpu_before;
    Ok(report)
}

/// `lakesink bench --contention`: every (max_latency, members) pair in turn, one table row each.
pub async fn contention(
    members: &[u32],
    partitions: u32,
    latencies: &[Duration],
    ticks: u32,
    aligned: bool,
    direct: &[bool],
) -> anyhow::Result<()> {
    println!(
        "bench: commit contention, {partitions} partitions on one Delta table, S3 latencies, \
         {} grid",
        if aligned {
            "aligned (epoch)"
        } else {
            "phase per member"
        }
    );
    println!(
        "| commit | max_latency | members | entries/s wanted | entries/s | lost races per entry | \
         requests per entry (LIST / GET / PUT) | commit p50 / p99 | worst freshness | \
         missed ticks | failed | CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &latency in latencies {
        for (&m, &direct) in members
            .iter()
            .flat_map(|m| direct.iter().map(move |d| (m, d)))
        {
            let sim = Sim {
                members: m,
                partitions,
                max_latency: latency,
                ticks,
                aligned,
                direct,
                even: false,
                rows: 10,
                seed: 42,
            };
            let r = simulate(&sim).await?;
            println!(
                "| {} | {}s | {m} | {:.1} | {:.1} | {:.2} | {:.0} / {:.0} / {:.0} | {:.2} s / {:.2} s | \
                 {:.1} s | {} | {} | {:.0} % |",
                if direct { "direct" } else { "deltalake" },
                latency.as_secs_f64(),
                f64::from(m) / latency.as_secs_f64(),
                r.store.log_entries as f64 / r.span_s,
                r.conflicts_per_entry(),
                r.per_entry(r.store.lists),
                r.per_entry(r.store.gets),
                r.per_entry(r.store.puts),
                r.p50_ms() as f64 / 1000.0,
                r.p99_ms() as f64 / 1000.0,
                r.freshness_max_ms as f64 / 1000.0,
                r.missed,
                r.failed,
                100.0 * r.cpu_s / r.span_s,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulation sees a conflict storm where there is one: 8 members on the epoch grid
    /// race for every entry of a 4 s tick and lose several races per entry; the same members
    /// with a phase each (spread evenly here, so that the draw does not decide the result)
    /// mostly do not meet. Both commit every flush exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aligned_members_storm_and_phases_do_not() {
        let sim = |aligned| Sim {
            members: 8,
            partitions: 32,
            max_latency: Duration::from_secs(4),
            ticks: 3,
            aligned,
            direct: true,
            even: true,
            rows: 2,
            seed: 7,
        };
        let storm = simulate(&sim(true)).await.unwrap();
        let spread = simulate(&sim(false)).await.unwrap();
        eprintln!("aligned: {storm:?}\nspread: {spread:?}");
        for r in [&storm, &spread] {
            assert_eq!(r.failed, 0, "{r:?}");
            assert!(
                r.store.log_entries >= r.cuts,
                "one entry per member and tick at least"
            );
        }
        assert!(
            storm.conflicts_per_entry() >= 2.0,
            "8 members on one grid: {:.2} lost races per entry ({:?})",
            storm.conflicts_per_entry(),
            storm.store
        );
        assert!(
            spread.conflicts_per_entry() < storm.conflicts_per_entry() / 3.0,
            "phases: {:.2} lost races per entry against {:.2} aligned",
            spread.conflicts_per_entry(),
            storm.conflicts_per_entry()
        );
        assert!(spread.p99_ms() < storm.p99_ms(), "{spread:?} {storm:?}");
    }
}
