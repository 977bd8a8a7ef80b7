//! The flush in flight: a flush handed to its own task (stage, then a fenced commit), settled
//! before the next one starts; advancing, resyncing after a fence, or giving up; and the one
//! retry loop a worker's sink calls go through.

use std::sync::Arc;

use tracing::{debug, info, warn};

use sinks::{CommitOutcome, Flush, Offset, StagedFlush, TopicPartition};

use super::{BufferBudget, Event, Progress, SinkRuntime};
use crate::metrics::SinkStats;
use crate::pipeline::retry::Policy;
use std::time::Duration;

use super::*;

impl Worker {
    /// Flushes the buffer and the decoder's pending rows as one commit covering
    /// `[position, last_offset + 1)`: settles the flush in flight first, then hands this one to
    /// its own task ([`InFlight`]) and returns; `position` moves to the flush's end at once.
    pub(super) async fn flush(&mut self) {
        self.flush_with(None).await
    }

    /// [`Self::flush`], for a flush cut at a latency `tick` when there is one.
    pub(super) async fn flush_with(&mut self, tick: Option<sinks::Tick>) {
        self.settle().await;
        if self.dead || self.resyncing {
            return;
        }
        let mut out = Vec::new();
        let mut rejected = Vec::new();
        if let Err(e) = self.decoder.finish(&mut out, &mut rejected) {
            self.fatal("decode", format!("sink `{}`: {e}", self.sink_name()));
            return;
        }
        // Rejected records are dead-lettered before the commit that covers them.
        for r in rejected {
            Box::pin(self.reject(r)).await;
            if self.dead {
                return;
            }
        }
        for b in out {
            Box::pin(self.buffer_batch(b)).await;
        }
        if self.dead {
            return;
        }
        if !self.dead_pending.is_empty() && !self.write_dead_letters().await {
            return;
        }
        self.due = None;
        let (Some(start), Some(last)) = (self.ctx.position, self.last_offset) else {
            return;
        };
        let next = last + 1;
        if next <= start {
            return;
        }
        let batches = std::mem::take(&mut self.buffer);
        let packed = std::mem::take(&mut self.packed);
        let truncate = std::mem::take(&mut self.truncate);
        let rows = self.buffered_rows;
        // The batches stay in the budget until they are staged.
        let bytes = std::mem::take(&mut self.buffered_bytes);
        if bytes > 0 {
            self.ctx.budget.start_flush(bytes);
        }
        self.release_buffer();
        let flush = Flush {
            tp: self.ctx.tp.clone(),
            start: Offset(start),
            next: Offset(next),
            batches,
            packed,
            truncate,
            tick,
        };
        let received_by = self.last_received.unwrap_or_else(std::time::Instant::now);
        let gate = self
            .ctx
            .identities
            .clone()
            .confirm(self.ctx.tp.topic.to_string(), received_by);
        let task = tokio::spawn(stage_and_commit(
            self.ctx.runtime.clone(),
            self.ctx.progress.clone(),
            self.stats.clone(),
            self.ctx.budget.clone(),
            flush,
            bytes,
            gate,
        ));
        self.in_flight = Some(InFlight {
            task,
            start,
            next,
            rows,
            oldest_ts_ms: self.oldest_ts_ms.take(),
            started: std::time::Instant::now(),
        });
        // The next flush starts where this one ends; `settled` corrects it if this one is fenced.
        self.ctx.position = Some(next);
    }

    /// Waits for the flush in flight, if any, and applies its outcome.
    pub(super) async fn settle(&mut self) {
        if let Some(mut f) = self.in_flight.take() {
            let result = (&mut f.task).await;
            self.settled(f, result);
        }
    }

    /// Applies the outcome of a finished flush task: the position moves on (and the source
    /// hears of it), or the worker re-reads from a fencing winner's end, or stops.
    pub(super) fn settled(
        &mut self,
        f: InFlight,
        result: Result<FlushResult, tokio::task::JoinError>,
    ) {
        let tp = self.ctx.tp.clone();
        let (start, flushed) = (f.start, f.next);
        let outcome = match result {
            Ok(Ok(o)) => o,
            Ok(Err(FlushError::Sink(what, attempts, e))) => {
                return self.give_up(start, flushed, (what, attempts, e))
            }
            Ok(Err(FlushError::Recreated(why))) => return self.discard(start, flushed, why),
            Err(e) => {
                let name = self.sink_name().to_string();
                return self.fatal(
                    "internal",
                    format!(
                        "sink `{name}` {tp} offsets {start}..{flushed}: the flush task failed: \
                         {e}. Nothing of this range was committed unless its commit record \
                         says so; it is read again after a restart"
                    ),
                );
            }
        };
        if self.dead {
            // Stopped meanwhile: the outcome still tells the source what is committed.
            if let CommitOutcome::Committed { next } | CommitOutcome::AlreadyCommitted { next } =
                outcome
            {
                self.advance(next.0);
            }
            return;
        }
        match outcome {
            CommitOutcome::Committed { next } | CommitOutcome::AlreadyCommitted { next } => {
                self.observe_freshness(f.oldest_ts_ms);
                debug!(sink = self.sink_name(), %tp, start, next = next.0, rows = f.rows,
                       ms = f.started.elapsed().as_millis() as u64, "committed");
                self.advance(next.0);
            }
            CommitOutcome::Fenced { next: winner }
                if winner.0 >= flushed && self.last_offset.is_none_or(|l| l < flushed) =>
            {
                // The winner covered at least what we read, and nothing was read since:
                // continue after it.
                info!(sink = self.sink_name(), %tp, start, winner_next = winner.0,
                      "another writer committed this range first; continuing after it");
                self.last_offset = Some(winner.0 - 1);
                self.advance(winner.0);
            }
            CommitOutcome::Fenced { next: winner } => {
                // Records read since this flush started may overlap the winner's range, or
                // follow a gap: drop them and read again from the winner's end.
                warn!(sink = self.sink_name(), %tp, start, winner_next = winner.0,
                      "fenced by another writer; re-reading from its end");
                self.release();
                self.oldest_ts_ms = None;
                self.due = None;
                self.resync(tp, winner.0);
            }
        }
    }

    /// Records how stale the table was just before this commit.
    pub(super) fn observe_freshness(&mut self, oldest: Option<i64>) {
        let Some(oldest) = oldest else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let lag = (now - oldest).max(0) as u64;
        self.stats
            .freshness_seconds
            .observe(Duration::from_millis(lag));
        self.ctx
            .progress
            .max_freshness_ms
            .fetch_max(lag, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn advance(&mut self, next: i64) {
        self.ctx.position = Some(next);
        self.ctx
            .progress
            .positions
            .lock()
            .expect("progress")
            .insert((self.sink_name().to_string(), self.ctx.tp.clone()), next);
        let _ = self.ctx.events.send(Event::Committed {
            sink: self.ctx.sink_index,
            tp: self.ctx.tp.clone(),
            next: Offset(next),
        });
    }

    /// The topic was recreated: the flush is not committed and the worker takes no more
    /// records; the source quarantines the partition (it was told by the gate).
    pub(super) fn discard(&mut self, start: i64, next: i64, why: String) {
        warn!(sink = self.sink_name(), tp = %self.ctx.tp, start, next, "{why}; offsets {start}..{next} discarded");
        self.dead = true;
        self.release();
    }

    pub(super) fn give_up(
        &mut self,
        start: i64,
        next: i64,
        (what, attempts, e): (&'static str, u32, sinks::Error),
    ) {
        let range = format!("offsets {start}..{next}");
        self.fatal(
            "storage",
            format!(
            "sink `{}` {} {range}: {what} failed after {attempts} attempts: {e}. Nothing of this \
             range was committed; it is read again after a restart",
            self.sink_name(),
            self.ctx.tp,
        ),
        );
    }
}

/// A flush's task: stages it, releases its batches from the budget, and commits it, each with
/// retries. Runs beside its worker (see [`InFlight`]).
pub(super) async fn stage_and_commit(
    runtime: Arc<SinkRuntime>,
    progress: Arc<Progress>,
    stats: Arc<SinkStats>,
    budget: Arc<BufferBudget>,
    flush: Flush,
    bytes: usize,
    gate: impl std::future::Future<Output = Result<(), crate::pipeline::identity::Recreated>>
        + Send
        + 'static,
) -> FlushResult {
    let (name, tp) = (runtime.config.name.clone(), flush.tp.clone());
    let started = std::time::Instant::now();
    let sink = runtime.sink.clone();
    // The topic's identity is looked up while the flush is staged.
    let gate = tokio::spawn(gate);
    let staged = retry(&name, &tp, &stats, "stage", || {
        sink.clone().stage(flush.clone())
    })
    .await;
    drop(flush);
    if bytes > 0 {
        budget.staged(bytes);
    }
    let staged = staged?;
    match gate.await {
        Ok(Ok(())) => {}
        Ok(Err(recreated)) => return Err(FlushError::Recreated(recreated.to_string())),
        Err(e) => {
            return Err(FlushError::Recreated(format!(
                "the topic identity check failed: {e}"
            )))
        }
    }
    stats.flush_seconds.observe(started.elapsed());
    // What the staged flush still holds (an upsert's changes) counts until its commit, so
    // flushes waiting for their table cannot grow memory past the budget.
    let retained = staged.retained_bytes();
    budget.hold(retained);
    let committing = std::time::Instant::now();
    let outcome = retry(&name, &tp, &stats, "commit", || {
        commit(&progress, &stats, &staged)
    })
    .await;
    drop(staged);
    budget.end_flush(retained);
    let outcome = outcome?;
    stats.commit_seconds.observe(committing.elapsed());
    Ok(outcome)
}

/// Commits a staged flush and counts it.
pub(super) async fn commit(
    progress: &Progress,
    sink_stats: &SinkStats,
    staged: &StagedFlush,
) -> sinks::Result<CommitOutcome> {
    use std::sync::atomic::Ordering::Relaxed;
    let (outcome, stats) = staged.commit().await?;
    match outcome {
        CommitOutcome::Committed { .. } => {
            let p = progress;
            p.rows_committed.fetch_add(stats.rows, Relaxed);
            p.files_committed.fetch_add(stats.files as u64, Relaxed);
            p.bytes_committed.fetch_add(stats.bytes, Relaxed);
            p.commits.fetch_add(1, Relaxed);
            sink_stats.rows_written.fetch_add(stats.rows, Relaxed);
            sink_stats
                .files_written
                .fetch_add(stats.files as u64, Relaxed);
            sink_stats.bytes_written.fetch_add(stats.bytes, Relaxed);
            sink_stats.commits.fetch_add(1, Relaxed);
        }
        CommitOutcome::Fenced { .. } => {
            sink_stats.fenced.fetch_add(1, Relaxed);
        }
        CommitOutcome::AlreadyCommitted { .. } => {}
    }
    Ok(outcome)
}

/// Runs the sink call `op` until it succeeds, retrying retryable errors ([`Policy::WORKER`]).
pub(super) async fn retry<T, F, Fut>(
    sink: &str,
    tp: &TopicPartition,
    stats: &SinkStats,
    what: &'static str,
    mut op: F,
) -> Result<T, FlushError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sinks::Result<T>>,
{
    crate::pipeline::retry::retry(
        Policy::WORKER,
        &mut op,
        sinks::Error::is_retryable,
        |attempt, e| {
            stats.retries.inc(what);
            warn!(sink, %tp, attempt, error = %e, "{what} failed; retrying");
        },
    )
    .await
    .map_err(|g| FlushError::Sink(what, g.attempts, g.error))
}
