//! The partition worker: decode, buffer, flush, stage, commit, for one (sink, partition).
//!
//! ```text
//!  WorkerMsg::Record ─► skip if already handled ─► decoder ─► buffer (one schema)
//!                                                           │ memory pressure: pack it
//!                                                           │ rows / bytes / latency /
//!                                                           │ memory pressure / caught up
//!                                                           ▼
//!             flush task: Sink::stage ─► Sink::commit(start = position) ─► Event::Committed
//!             (the worker decodes on)          │ Fenced at an earlier end
//!                                              ▼
//!                            drop buffer, Event::Resync, ignore input until Seeked
//! ```
//!
//! Invariants:
//! - At most one flush per worker is in flight. The next flush starts at its end, and only
//!   after it is settled, so commits form a gap-free chain. Records read meanwhile wait in the
//!   buffer; if the flush is fenced they are dropped and read again from the winner's end.
//! - A drain settles the flush in flight and the final flush before it is acknowledged: a
//!   revoked partition has no writer left in this process. The final flush is cut like a
//!   tick's (the partitions of a revocation or shutdown drain at the same moment), so a sink
//!   writes them into shared files too.
//! - The latency flush is cut at the first tick of a wall-clock grid (multiples of
//!   `max_latency` since the epoch) after the buffer's first record: never later than
//!   `max_latency`, and at the same moment as every other partition's, so a sink can write
//!   the flushes of one tick into shared files ([`sinks::Tick`]).
//!
//! Undecodable records wait in `dead_pending`; each flush writes them to the dead-letter topic
//! (one fenced transaction, see `kafka::dead_letter`) before its table commit, after the flush
//! before it has settled.
//!
//! Parts: this file the loop and the record path; `chain` the decode chain; `batcher` the
//! buffer and its flush triggers; `commit` the flush in flight; `rejects` the error policy and
//! dead letters.

mod batcher;
mod chain;
mod commit;
mod rejects;

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use sinks::{CommitOutcome, TopicPartition};

use super::{BufferBudget, Event, Progress, SinkRuntime, WorkerMsg};
use crate::metrics::SinkStats;
use std::collections::HashMap;

use crate::decode::debezium;
use crate::decode::key::KeyDecoder;
use crate::decode::{FormatDecoder, Record, Rejected};
use crate::pipeline::retry::{Attempts, Policy};
use crate::pipeline::tick::{gather_window, next_tick};
use chain::new_decoder;

/// Everything a worker needs.
pub struct WorkerCtx {
    pub sink_index: usize,
    /// Unique per worker in this process: tells a live worker's events from a drained one's.
    pub id: u64,
    pub runtime: Arc<SinkRuntime>,
    pub tp: TopicPartition,
    /// Committed position recovered from the sink, if any.
    pub position: Option<i64>,
    /// In catch-up mode: the partition's end offset at start; reaching it flushes at once.
    pub end_offset: Option<i64>,
    pub events: mpsc::UnboundedSender<Event>,
    pub budget: Arc<BufferBudget>,
    pub progress: Arc<Progress>,
    /// Rows per decoder batch (`kafka::decode_batch_rows`), at most `flush.max_rows`.
    pub decode_rows: usize,
    /// The commit gate on the topic's identity.
    pub identities: Arc<super::identity::TopicIdentities>,
}

struct Worker {
    ctx: WorkerCtx,
    decoder: FormatDecoder,
    buffer: Vec<RecordBatch>,
    /// The buffer's first rows, packed under memory pressure (see `batcher`), before `buffer`.
    packed: Vec<sinks::packed::Packed>,
    buffered_rows: usize,
    /// What the buffer holds in the budget: `buffer`'s batches plus `packed`'s bytes.
    buffered_bytes: usize,
    /// The part of `buffered_bytes` that is packed.
    packed_bytes: usize,
    /// When the buffer's latency flush is due: the first latency tick after its first record,
    /// and that tick in ms since the epoch (see [`next_tick`]).
    due: Option<(Instant, u64)>,
    /// Highest offset handled since `position` (rows, tombstones).
    last_offset: Option<i64>,
    /// Waiting for the source to confirm a seek; input is stale until then.
    resyncing: bool,
    /// A fatal error happened: ignore input until drained.
    dead: bool,
    /// This sink's counters.
    stats: Arc<SinkStats>,
    /// Decodes keys into `_key`, when the sink asks for it.
    keys: Option<KeyDecoder>,
    /// Debezium semantic types of the current reader schema (by reader id).
    semantics: Option<(u32, HashMap<String, debezium::Semantic>)>,
    /// Records and payload bytes handled since the counters were last published.
    counted_in: (u64, u64),
    /// The oldest Kafka timestamp (ms) among the records the next commit covers.
    oldest_ts_ms: Option<i64>,
    /// Rejected records waiting for the next flush to write them to the dead-letter topic
    /// (before the table commit), and their payload bytes.
    dead_pending: Vec<Rejected>,
    dead_pending_bytes: usize,
    /// A source TRUNCATE was read since the last flush (upserts): the next commit empties the
    /// table before applying what followed it.
    truncate: bool,
    /// This partition's dead-letter writer: made when the worker starts (fencing the
    /// partition's earlier writers then, not at the first dead letter) and again after a fence.
    dead_writer: Option<Box<dyn super::dead_letters::DeadLetterWriter>>,
    /// The flush being staged and committed by its own task while this worker decodes on: at
    /// most one, settled before the next flush starts (see [`InFlight`]).
    in_flight: Option<InFlight>,
    /// When the last records arrived: a flush's records were all fetched before it.
    last_received: Option<std::time::Instant>,
}

/// What a flush task returns: its commit's outcome, or why it was not committed.
type FlushResult = Result<CommitOutcome, FlushError>;

/// Why a flush task did not commit.
enum FlushError {
    /// A sink call failed after its retries: (what, attempts, the last error).
    Sink(&'static str, u32, sinks::Error),
    /// The topic was recreated under the worker: its records are discarded (see
    /// [`super::identity`]).
    Recreated(String),
}

/// A flush handed to its own task: stage, then commit `[start, next)`.
///
/// The worker decodes the records after `next` meanwhile, so a partition keeps taking records
/// (and the poll thread is not held up by its full queue) while its file is encoded, uploaded and
/// committed. Commits still form a chain: the next flush of the partition starts at `next` and
/// starts only after this one is settled, so it is staged and committed after this commit.
struct InFlight {
    task: tokio::task::JoinHandle<FlushResult>,
    start: i64,
    next: i64,
    rows: usize,
    /// The oldest Kafka timestamp among the flush's records, for the freshness histogram.
    oldest_ts_ms: Option<i64>,
    started: std::time::Instant,
}

/// Runs a worker until it is drained or its input closes.
pub async fn run(ctx: WorkerCtx, mut rx: mpsc::Receiver<WorkerMsg>) {
    let decoder = new_decoder(&ctx);
    let mut w = Worker {
        ctx,
        decoder,
        buffer: Vec::new(),
        packed: Vec::new(),
        buffered_rows: 0,
        buffered_bytes: 0,
        packed_bytes: 0,
        due: None,
        last_offset: None,
        resyncing: false,
        dead: false,
        semantics: None,
        truncate: false,
        counted_in: (0, 0),
        oldest_ts_ms: None,
        stats: Arc::new(SinkStats::default()),
        keys: None,
        dead_pending: Vec::new(),
        dead_pending_bytes: 0,
        dead_writer: None,
        in_flight: None,
        last_received: None,
    };
    if let Some(dlq) = &w.ctx.runtime.dead_letters {
        w.dead_writer = Some(dlq.writer(&w.ctx.runtime.config.name, &w.ctx.tp));
    }
    w.keys = w.ctx.runtime.config.key_format.clone().map(|f| {
        let d = KeyDecoder::new(f, w.ctx.tp.clone(), w.ctx.runtime.registry.clone());
        let config = &w.ctx.runtime.config;
        let json_values = matches!(
            config.format,
            crate::config::Format::Json | crate::config::Format::DebeziumJson
        );
        match config.keys_from_message {
            true => d.require_keys(json_values),
            false => d,
        }
    });
    w.stats = w.ctx.progress.sink(&w.ctx.runtime.config.name);
    w.ctx
        .progress
        .tables
        .lock()
        .expect("progress")
        .entry((
            w.ctx.runtime.config.name.clone(),
            w.ctx.tp.topic.to_string(),
        ))
        .or_insert_with(|| w.ctx.runtime.sink.table_of(&w.ctx.tp.topic));
    let latency = w.ctx.runtime.config.flush.max_latency;
    let budget = w.ctx.budget.clone();
    loop {
        let deadline = w.due.map(|(at, _)| at);
        tokio::select! {
            biased;
            settled = in_flight(&mut w.in_flight) => {
                let f = w.in_flight.take().expect("a flush was in flight");
                w.settled(f, settled);
            }
            _ = sleep_until(deadline), if deadline.is_some() && !w.dead => {
                let (at, at_ms) = w.due.expect("a deadline was set");
                w.flush_with(Some(sinks::Tick {
                    at_ms,
                    gather_until: (at + gather_window(latency)).into_std(),
                }))
                .await;
            }
            msg = rx.recv() => match msg {
                None => break,
                Some(WorkerMsg::Drain(ack)) => {
                    // Nothing of this partition may still be writing once the drain is acked.
                    w.settle().await;
                    if !w.dead && !w.resyncing {
                        // Every partition of a revocation or a shutdown drains at once: their
                        // last flushes share files like a tick's.
                        let now = std::time::Instant::now();
                        w.flush_with(Some(sinks::Tick {
                            at_ms: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as u64),
                            gather_until: now + gather_window(latency),
                        }))
                        .await;
                        w.settle().await;
                    }
                    w.release();
                    let _ = ack.send(());
                    return;
                }
                Some(WorkerMsg::Seeked { position }) => {
                    if w.resyncing {
                        w.resyncing = false;
                        w.ctx.position = Some(position.0);
                        w.last_offset = None;
                    }
                }
                Some(WorkerMsg::Records(recs)) => {
                    w.last_received = Some(std::time::Instant::now());
                    for rec in recs {
                        if w.dead || w.resyncing {
                            break;
                        }
                        w.handle(rec).await;
                    }
                    w.publish_in();
                }
            },
            // Memory is short and no record of this partition is arriving: the buffer flushes
            // (or packs) here as it would on its next record, or the budget would wait for it.
            _ = budget.pressed(), if w.buffered_bytes > 0 && !w.dead && !w.resyncing => {
                w.pack_if_pressed();
                if w.ctx.budget.should_flush(w.buffered_bytes) {
                    w.flush().await;
                }
            }
        }
    }
    w.settle().await;
    w.release();
}

/// The in-flight flush's result, when there is one; pending otherwise.
async fn in_flight(f: &mut Option<InFlight>) -> Result<FlushResult, tokio::task::JoinError> {
    match f {
        Some(f) => (&mut f.task).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Worker {
    fn sink_name(&self) -> &str {
        &self.ctx.runtime.config.name
    }

    /// Drops what the worker holds for the partition: its buffer and its dead-letter writer
    /// (when another member may own the partition next, or the worker stops).
    fn release(&mut self) {
        self.release_buffer();
        self.dead_writer = None;
    }

    /// Drops the buffer (it was handed to a flush, or is read again) and keeps the dead-letter
    /// writer: its session (fenced producer, highest dead-lettered offset) serves the next
    /// flushes, and an opening still under way goes on.
    fn release_buffer(&mut self) {
        if self.buffered_bytes > 0 {
            self.ctx.budget.release(self.buffered_bytes);
        }
        self.buffered_bytes = 0;
        self.packed_bytes = 0;
        self.buffered_rows = 0;
        self.buffer.clear();
        self.packed.clear();
        self.truncate = false;
        self.dead_pending.clear();
        self.dead_pending_bytes = 0;
    }

    fn fatal(&mut self, class: &'static str, message: String) {
        self.stats.errors.inc(class);
        error!(sink = self.sink_name(), tp = %self.ctx.tp, "{message}");
        self.dead = true;
        self.release();
        let _ = self
            .ctx
            .events
            .send(Event::Fatal(crate::error::Error::Worker {
                sink: self.sink_name().to_string(),
                tp: self.ctx.tp.clone(),
                class,
                message,
            }));
    }

    /// Publishes the input counted since the last call: once per batch, not per record (the
    /// counters are shared by every worker).
    fn publish_in(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let (n, bytes) = std::mem::take(&mut self.counted_in);
        if n > 0 {
            self.ctx
                .progress
                .first_record
                .get_or_init(std::time::Instant::now);
            self.ctx.progress.records_in.fetch_add(n, Relaxed);
            self.ctx.progress.bytes_in.fetch_add(bytes, Relaxed);
            self.stats.records_in.fetch_add(n, Relaxed);
            self.stats.bytes_in.fetch_add(bytes, Relaxed);
        }
    }

    async fn handle(&mut self, rec: Record) {
        let next_expected = match (self.ctx.position, self.last_offset) {
            (_, Some(last)) => last + 1,
            (Some(p), None) => p,
            (None, None) => rec.offset,
        };
        let offset = rec.offset;
        if rec.offset < next_expected {
            return; // already handled (a seek for another sink of this topic re-delivers)
        }
        if self.ctx.position.is_none() {
            self.ctx.position = Some(rec.offset);
        }
        if let Some(ts) = rec.timestamp_ms.filter(|t| *t > 0) {
            self.oldest_ts_ms = Some(self.oldest_ts_ms.map_or(ts, |o| o.min(ts)));
        }
        self.counted_in.0 += 1;
        self.counted_in.1 += rec.payload.as_ref().map_or(0, |p| p.len()) as u64;
        if self.due.is_none() {
            self.due = Some(next_tick(self.ctx.runtime.config.flush.max_latency));
        }
        if rec.payload.is_none() {
            // A tombstone carries no row in an append table; its offset is still covered by the
            // next commit.
            self.ctx
                .progress
                .tombstones
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            debug!(sink = self.sink_name(), tp = %self.ctx.tp, offset = rec.offset,
                   "tombstone (null value) skipped in append mode");
        } else {
            if let Some(keys) = self.keys.as_mut() {
                let mut attempts = Attempts::new(Policy::WORKER);
                let checked = loop {
                    match keys
                        .check(rec.key.as_deref(), rec.payload.as_deref(), offset)
                        .await
                    {
                        Err(e) if e.retryable && attempts.left() => {
                            self.stats.retries.inc("registry");
                            attempts.wait().await;
                        }
                        other => break other,
                    }
                };
                if let Err(error) = checked {
                    self.reject(Rejected { error, record: rec }).await;
                    if !self.dead {
                        self.last_offset = Some(offset);
                    }
                    return;
                }
            }
            // Resolve the schema first: a newer reader schema changes the output schema, so
            // what precedes this record is committed under the old one.
            let mut attempts = Attempts::new(Policy::WORKER);
            let new_schema = loop {
                match self.decoder.prepare(&rec).await {
                    Ok(changes) => break changes,
                    Err(e) if e.retryable && attempts.left() => {
                        self.stats.retries.inc("registry");
                        warn!(sink = self.sink_name(), error = %e, attempt = attempts.made(), "retrying");
                        attempts.wait().await;
                    }
                    // Not retryable: `push` reports it with the record.
                    Err(_) => break false,
                }
            };
            if new_schema && self.buffered_rows + self.decoder.pending_rows() > 0 {
                self.flush().await;
                if self.dead || self.resyncing {
                    return;
                }
            }
            let mut out = Vec::new();
            let mut rejected = Vec::new();
            let mut attempts = Attempts::new(Policy::WORKER);
            let mut rec = rec;
            loop {
                match self.decoder.push(rec, &mut out, &mut rejected).await {
                    Ok(()) => break,
                    Err(rejected) if rejected.error.retryable && attempts.left() => {
                        self.stats.retries.inc("registry");
                        warn!(sink = self.sink_name(), error = %rejected.error, attempt = attempts.made(), "retrying");
                        attempts.wait().await;
                        rec = rejected.record;
                    }
                    Err(rejected) if rejected.error.retryable => {
                        // Transient (registry unreachable) is never dead-lettered.
                        self.fatal(
                            "registry",
                            format!(
                                "sink `{}`: {} (still failing after {} retries); stopping \
                                 rather than dead-lettering a good record",
                                self.sink_name(),
                                rejected.error,
                                attempts.retried()
                            ),
                        );
                        return;
                    }
                    Err(rejected) => {
                        self.reject(*rejected).await;
                        break;
                    }
                }
            }
            for r in rejected {
                self.reject(r).await;
            }
            for b in out {
                self.buffer_batch(b).await;
            }
            if self.dead {
                return;
            }
        }
        let previous = self.last_offset.replace(offset);
        self.pack_if_pressed();
        if self.flush_due(offset, previous) {
            self.flush().await;
        }
    }

    /// Reads the partition again from `position`: a fresh decoder, input ignored until the
    /// source confirms the seek.
    fn resync(&mut self, tp: TopicPartition, position: i64) {
        self.ctx.position = Some(position);
        self.last_offset = None;
        self.decoder = new_decoder(&self.ctx);
        self.resyncing = true;
        let _ = self.ctx.events.send(Event::Resync {
            sink: self.ctx.sink_index,
            worker: self.ctx.id,
            tp,
            position: sinks::Offset(position),
        });
    }
}

#[cfg(test)]
mod tests;
