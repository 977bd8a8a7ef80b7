//! The partition worker: decode, buffer, flush, stage, commit, for one (sink, partition).
//!
//! ```text
//!  WorkerMsg::Record ─► skip if already handled ─► decoder ─► buffer (one schema)
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
//!   revoked partition has no writer left in this process.
//!
//! Undecodable records wait in `dead_pending`; each flush writes them to the dead-letter topic
//! (one fenced transaction, see `dead_letter`) before its table commit, after the flush before
//! it has settled.

use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use sinks::{CommitOutcome, Flush, Offset, Staged, TopicPartition};

use super::{BufferBudget, Event, Progress, SinkRuntime, WorkerMsg};
use crate::telemetry::SinkStats;
use std::collections::HashMap;

use crate::config::{ErrorPolicy, Format};
use crate::decode::debezium;
use crate::decode::key::KeyDecoder;
use crate::decode::{AvroDecoder, FormatDecoder, JsonDecoder, Record, Rejected};

/// Everything a worker needs.
pub struct WorkerCtx {
    pub sink_index: usize,
    pub runtime: Arc<SinkRuntime>,
    pub tp: TopicPartition,
    /// Committed position recovered from the sink, if any.
    pub position: Option<i64>,
    /// In catch-up mode: the partition's end offset at start; reaching it flushes at once.
    pub end_offset: Option<i64>,
    pub events: mpsc::UnboundedSender<Event>,
    pub budget: Arc<BufferBudget>,
    pub progress: Arc<Progress>,
    /// Rows per decoder batch (`source::decode_batch_rows`), at most `flush.max_rows`.
    pub decode_rows: usize,
}

const RETRY_ATTEMPTS: u32 = 12;

struct Worker {
    ctx: WorkerCtx,
    decoder: FormatDecoder,
    buffer: Vec<RecordBatch>,
    buffered_rows: usize,
    buffered_bytes: usize,
    first_at: Option<Instant>,
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
    /// This partition's fenced dead-letter writer, opened when the worker starts.
    dead_session: Option<super::dead_letter::Session>,
    dead_opening: Option<tokio::task::JoinHandle<Result<super::dead_letter::Session, String>>>,
    /// The flush being staged and committed by its own task while this worker decodes on: at
    /// most one, settled before the next flush starts (see [`InFlight`]).
    in_flight: Option<InFlight>,
}

/// What a flush task returns: its commit's outcome, or what failed after its retries.
type FlushResult = Result<CommitOutcome, (&'static str, u32, sinks::Error)>;

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

/// Dead letters waiting for a flush are written at most this many (or bytes) at a time.
const DEAD_PENDING_MAX: usize = 2_000;
const DEAD_PENDING_MAX_BYTES: usize = 16 << 20;

/// Runs a worker until it is drained or its input closes.
pub async fn run(ctx: WorkerCtx, mut rx: mpsc::Receiver<WorkerMsg>) {
    let decoder = new_decoder(&ctx);
    let mut w = Worker {
        ctx,
        decoder,
        buffer: Vec::new(),
        buffered_rows: 0,
        buffered_bytes: 0,
        first_at: None,
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
        dead_session: None,
        dead_opening: None,
        in_flight: None,
    };
    if let Some(dlq) = w
        .ctx
        .runtime
        .dead_letters
        .as_ref()
        .filter(|d| d.exactly_once())
    {
        // Fences the partition's earlier dead-letter writers now, not at the first dead letter.
        w.dead_opening = Some(dlq.open(&w.ctx.runtime.config.name, &w.ctx.tp));
    }
    w.keys = w
        .ctx
        .runtime
        .config
        .key_format
        .clone()
        .map(|f| KeyDecoder::new(f, w.ctx.tp.clone(), w.ctx.runtime.registry.clone()));
    w.stats = w.ctx.progress.sink(&w.ctx.runtime.config.name);
    let latency = w.ctx.runtime.config.flush.max_latency;
    loop {
        let deadline = w.first_at.map(|t| t + latency);
        tokio::select! {
            biased;
            settled = in_flight(&mut w.in_flight) => {
                let f = w.in_flight.take().expect("a flush was in flight");
                w.settled(f, settled);
            }
            _ = sleep_until(deadline), if deadline.is_some() && !w.dead => {
                w.flush().await;
            }
            msg = rx.recv() => match msg {
                None => break,
                Some(WorkerMsg::Drain(ack)) => {
                    // Nothing of this partition may still be writing once the drain is acked.
                    w.settle().await;
                    if !w.dead && !w.resyncing {
                        w.flush().await;
                        w.settle().await;
                    }
                    w.release();
                    let _ = ack.send(());
                    return;
                }
                Some(WorkerMsg::Seeked { position }) => {
                    if w.resyncing {
                        w.resyncing = false;
                        w.ctx.position = Some(position);
                        w.last_offset = None;
                    }
                }
                Some(WorkerMsg::Records(recs)) => {
                    for rec in recs {
                        if w.dead || w.resyncing {
                            break;
                        }
                        w.handle(rec).await;
                    }
                    w.publish_in();
                }
            }
        }
    }
    w.settle().await;
    w.release();
}

/// Frees the unused capacity of a batch much shorter than the decoder's batches. The
/// decoders allocate for a full batch; one cut short (by a schema version flip, a latency
/// flush or a flush for rows) would otherwise hold, and count in the budget, a full batch's
/// memory: interleaved Avro versions made one batch per record, about 40 KB each, and 400
/// rows counted as 16 MB. Full batches are kept as they are (nothing to free).
fn shrink(batch: RecordBatch, decode_rows: usize) -> RecordBatch {
    if batch.num_rows().saturating_mul(4) >= decode_rows {
        return batch;
    }
    let (schema, mut columns, rows) = batch.into_parts();
    for c in &mut columns {
        arrow::array::Array::shrink_to_fit(c);
    }
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
    RecordBatch::try_new_with_options(schema, columns, &options)
        .expect("the same columns, schema and row count")
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

fn new_decoder(ctx: &WorkerCtx) -> FormatDecoder {
    let batch = ctx
        .runtime
        .config
        .flush
        .max_rows
        .clamp(1, ctx.decode_rows.max(1));
    let mut config = ctx.runtime.config.clone();
    if config.key_format.is_some() {
        // Raw keys ride along as `_kafka_key` until they are decoded into `_key`.
        config.metadata.key = true;
    }
    let config = &config;
    match (&config.format, &config.json_schema) {
        (Format::Json | Format::DebeziumJson, Some(schema)) => {
            FormatDecoder::Json(Box::new(JsonDecoder::new(
                ctx.tp.clone(),
                schema.clone(),
                config.format == Format::DebeziumJson,
                config.connect_envelope,
                config.metadata,
                batch,
            )))
        }
        (Format::Json | Format::DebeziumJson, None) if config.connect_envelope => {
            FormatDecoder::ConnectJson(Box::new(
                crate::decode::connect_json::ConnectJsonDecoder::new(
                    ctx.tp.clone(),
                    config.metadata,
                    batch,
                ),
            ))
        }
        (Format::Json, None) => FormatDecoder::RegistryJson(Box::new(
            crate::decode::json_schema::RegistryJsonDecoder::new(
                ctx.tp.clone(),
                ctx.runtime.registry.clone(),
                config.metadata,
                batch,
            ),
        )),
        _ => FormatDecoder::Avro(Box::new(AvroDecoder::new(
            ctx.tp.clone(),
            ctx.runtime.registry.clone(),
            config.metadata,
            batch,
        ))),
    }
}

impl Worker {
    fn sink_name(&self) -> &str {
        &self.ctx.runtime.config.name
    }

    fn release(&mut self) {
        if self.buffered_bytes > 0 {
            self.ctx.budget.release(self.buffered_bytes);
        }
        self.buffered_bytes = 0;
        self.buffered_rows = 0;
        self.buffer.clear();
        self.truncate = false;
        self.dead_pending.clear();
        self.dead_pending_bytes = 0;
        self.dead_session = None;
        self.dead_opening = None;
    }

    fn fatal(&mut self, class: &'static str, message: String) {
        self.stats.errors.inc(class);
        error!(sink = self.sink_name(), tp = %self.ctx.tp, "{message}");
        self.dead = true;
        self.release();
        let _ = self.ctx.events.send(Event::Fatal { message });
    }

    /// Publishes the input counted since the last call: once per batch, not per record (the
    /// counters are shared by every worker).
    fn publish_in(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let (n, bytes) = std::mem::take(&mut self.counted_in);
        if n > 0 {
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
        if self.first_at.is_none() {
            self.first_at = Some(Instant::now());
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
                let mut attempt = 0;
                let checked = loop {
                    match keys.check(rec.key.as_deref(), offset).await {
                        Err(e) if e.retryable && attempt < RETRY_ATTEMPTS => {
                            attempt += 1;
                            self.stats.retries.inc("registry");
                            tokio::time::sleep(backoff(attempt)).await;
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
            let mut attempt = 0;
            let new_schema = loop {
                match self.decoder.prepare(&rec).await {
                    Ok(changes) => break changes,
                    Err(e) if e.retryable && attempt < RETRY_ATTEMPTS => {
                        attempt += 1;
                        self.stats.retries.inc("registry");
                        warn!(sink = self.sink_name(), error = %e, attempt, "retrying");
                        tokio::time::sleep(backoff(attempt)).await;
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
            let mut attempt = 0;
            let mut rec = rec;
            loop {
                match self.decoder.push(rec, &mut out, &mut rejected).await {
                    Ok(()) => break,
                    Err(rejected) if rejected.error.retryable && attempt < RETRY_ATTEMPTS => {
                        attempt += 1;
                        self.stats.retries.inc("registry");
                        warn!(sink = self.sink_name(), error = %rejected.error, attempt, "retrying");
                        tokio::time::sleep(backoff(attempt)).await;
                        rec = rejected.record;
                    }
                    Err(rejected) if rejected.error.retryable => {
                        // Transient (registry unreachable) is never dead-lettered.
                        self.fatal(
                            "registry",
                            format!(
                                "sink `{}`: {} (still failing after {attempt} retries); stopping \
                                 rather than dead-lettering a good record",
                                self.sink_name(),
                                rejected.error
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
        let flush = &self.ctx.runtime.config.flush;
        // Crossing the end offset seen at start flushes once; records past it (produced since,
        // or a broker whose watermark lags) follow the normal flush rules, never one file each.
        let caught_up = self
            .ctx
            .end_offset
            .is_some_and(|end| offset + 1 >= end && previous.is_none_or(|last| last + 1 < end));
        if self.buffered_rows + self.decoder.pending_rows() >= flush.max_rows
            || self.buffered_bytes as u64 >= flush.max_bytes
            || self.ctx.budget.should_flush(self.buffered_bytes)
            || self.dead_pending.len() >= DEAD_PENDING_MAX
            || self.dead_pending_bytes >= DEAD_PENDING_MAX_BYTES
            || caught_up
        {
            self.flush().await;
        }
    }

    /// Applies the sink's error policy to a record that cannot be decoded.
    async fn reject(&mut self, rejected: Rejected) {
        let Rejected { error, record } = rejected;
        let sink = self.sink_name().to_string();
        let what = match self.ctx.runtime.config.errors {
            ErrorPolicy::Fail => {
                self.fatal(
                    "decode",
                    format!(
                    "sink `{sink}`: {error}. The sink stopped so that nothing is skipped (errors = \
                     \"fail\"); fix the producer or the schema registry, or set errors = \
                     \"dead-letter\" with a dead_letter_topic, and restart"
                ),
                );
                return;
            }
            ErrorPolicy::Skip => {
                warn!(sink = %sink, tp = %self.ctx.tp, offset = error.offset, class = error.class,
                      "skipping a record that cannot be decoded (errors = \"skip\"): {}", error.reason);
                "skip"
            }
            ErrorPolicy::DeadLetter => {
                // Written by the next flush, before the commit that covers it. An owned copy:
                // the payload would otherwise pin the poll thread's arena until then.
                let mut record = record;
                record.key = record.key.map(|k| bytes::Bytes::copy_from_slice(&k));
                record.payload = record.payload.map(|p| bytes::Bytes::copy_from_slice(&p));
                self.dead_pending_bytes += record.payload.as_ref().map_or(0, |p| p.len()) + 256;
                self.dead_pending.push(Rejected { error, record });
                return;
            }
        };
        *self
            .ctx
            .progress
            .rejected
            .lock()
            .expect("progress")
            .entry((sink, error.class, what))
            .or_default() += 1;
    }

    /// Writes the pending dead letters (exactly once unless configured otherwise); retries with
    /// a new session, which re-reads what is already there, and stops the sink when it cannot.
    /// Returns whether the flush may go on to its table commit: not when the sink stopped, nor
    /// when the session was fenced (see [`Self::yield_dead_letters`]).
    async fn write_dead_letters(&mut self) -> bool {
        let pending = std::mem::take(&mut self.dead_pending);
        self.dead_pending_bytes = 0;
        let runtime = self.ctx.runtime.clone();
        let dlq = runtime
            .dead_letters
            .as_ref()
            .expect("validation requires a dead_letter_topic");
        let sink = self.sink_name().to_string();
        if let Some(opening) = self.dead_opening.take() {
            match opening.await {
                Ok(Ok(s)) => self.dead_session = Some(s),
                Ok(Err(e)) => warn!(sink = %sink, tp = %self.ctx.tp, "{e}; retrying"),
                Err(e) => warn!(sink = %sink, tp = %self.ctx.tp, "internal: {e}"),
            }
        }
        let mut attempt = 0;
        let written = loop {
            match dlq
                .write(&mut self.dead_session, &sink, &self.ctx.tp, &pending)
                .await
            {
                Ok(w) => break w,
                Err(e) if e.fenced => {
                    self.dead_session = None;
                    self.yield_dead_letters(&e.message).await;
                    return false;
                }
                Err(e) => {
                    self.dead_session = None;
                    if attempt >= RETRY_ATTEMPTS {
                        let (first, last) = (
                            pending[0].record.offset,
                            pending[pending.len() - 1].record.offset,
                        );
                        self.fatal(
                            "dead-letter",
                            format!(
                                "sink `{sink}` {}: {} records at offsets {first}..={last} cannot \
                                 be decoded, and they cannot be dead-lettered: {e}. Nothing of \
                                 this range was committed; it is read again after a restart",
                                self.ctx.tp,
                                pending.len()
                            ),
                        );
                        return false;
                    }
                    attempt += 1;
                    self.stats.retries.inc("dead-letter");
                    warn!(sink = %sink, tp = %self.ctx.tp, attempt, "{e}; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        };
        let (skipped, sent) = pending.split_at(written.already);
        for r in sent {
            let e = &r.error;
            warn!(sink = %sink, tp = %self.ctx.tp, offset = e.offset, class = e.class,
                  topic = %dlq.topic, "dead-lettered: {}", e.reason);
        }
        if !skipped.is_empty() {
            info!(sink = %sink, tp = %self.ctx.tp, records = skipped.len(),
                  "already in the dead-letter topic from an earlier owner of the partition; \
                   not written again");
        }
        let mut rejected = self.ctx.progress.rejected.lock().expect("progress");
        for r in sent {
            *rejected
                .entry((sink.clone(), r.error.class, "dead-letter"))
                .or_default() += 1;
        }
        true
    }

    /// The dead-letter session was fenced: another member owns this partition now (this one
    /// was revoked or paused and has not heard yet), or will own it. Opening a new session
    /// would fence that owner in turn, and the two would take turns failing. So this worker
    /// drops what it buffered and reads again from the table's committed position, opening a
    /// session only when it next has dead letters; a revoked worker simply drains empty.
    async fn yield_dead_letters(&mut self, reason: &str) {
        let tp = self.ctx.tp.clone();
        let sink = self.ctx.runtime.sink.clone();
        let mut attempt = 0;
        let position = loop {
            match sink.recover(&tp).await {
                Ok(p) => break p,
                Err(e) if attempt < RETRY_ATTEMPTS => {
                    attempt += 1;
                    warn!(sink = self.sink_name(), %tp, attempt, "cannot read the committed position: {e}; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => {
                    let name = self.sink_name().to_string();
                    self.fatal(
                        "storage",
                        format!("sink `{name}` {tp}: cannot read the committed position after a dead-letter fence: {e}"),
                    );
                    return;
                }
            }
        };
        let position = position.map(|p| p.0).or(self.ctx.position).unwrap_or(0);
        warn!(sink = self.sink_name(), %tp, position,
              "another member took over this partition's dead letters ({reason}); dropping the \
               buffer and re-reading from the table's position");
        self.release();
        self.oldest_ts_ms = None;
        self.first_at = None;
        self.resync(tp, position);
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
            tp,
            position,
        });
    }

    /// Format-specific reshaping of a decoded batch (Debezium envelopes to row images).
    async fn transform(&mut self, batch: RecordBatch) -> Result<Option<RecordBatch>, String> {
        let Some(batch) = self.unwrap_envelope(batch)? else {
            return Ok(None);
        };
        let batch = self.truncates(batch)?;
        let Some(keys) = self.keys.as_mut() else {
            return Ok(Some(batch));
        };
        let schema = batch.schema();
        let raw = schema
            .index_of("_kafka_key")
            .map_err(|_| "internal: the raw key column is missing")?;
        let decoded = keys
            .decode(arrow::array::AsArray::as_binary::<i32>(batch.column(raw)))
            .await
            .map_err(|e| format!("cannot decode keys: {e}"))?;
        let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
        let mut columns = batch.columns().to_vec();
        if !self.ctx.runtime.config.metadata.key {
            fields.remove(raw);
            columns.remove(raw);
        }
        fields.push(Arc::new(arrow::datatypes::Field::new(
            "_key",
            decoded.data_type().clone(),
            true,
        )));
        columns.push(decoded);
        RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// Counts records skipped by rule (not undecodable: nothing goes to the dead-letter topic).
    fn count_skipped(&self, reason: &'static str, n: usize) {
        *self
            .ctx
            .progress
            .rejected
            .lock()
            .expect("progress")
            .entry((self.sink_name().to_string(), reason, "skip"))
            .or_default() += n as u64;
    }

    /// Debezium envelopes to row images. Records that are not row changes (heartbeats,
    /// logical-decoding messages `op: "m"`, schema-change events) are skipped and counted;
    /// `None` when none is left.
    fn unwrap_envelope(&mut self, batch: RecordBatch) -> Result<Option<RecordBatch>, String> {
        if !matches!(
            self.ctx.runtime.config.format,
            Format::DebeziumJson | Format::DebeziumAvro
        ) {
            return Ok(Some(batch));
        }
        let (batch, skipped) = debezium::row_changes(batch)?;
        if skipped > 0 {
            self.count_skipped("not-a-row-change", skipped);
            debug!(sink = self.sink_name(), tp = %self.ctx.tp, skipped,
                   "Debezium records that are not row changes (heartbeats, messages) skipped");
        }
        let Some(batch) = batch else { return Ok(None) };
        let upsert = self.ctx.runtime.config.upsert_keys.is_some();
        let finish = |rows: RecordBatch| match upsert {
            true => debezium::mark_unavailable(rows).map(Some),
            false => Ok(Some(rows)),
        };
        if self.ctx.runtime.config.format == Format::DebeziumJson {
            return finish(debezium::unwrap(&batch, &HashMap::new())?);
        }
        let (id, schema) = self
            .decoder
            .reader_schema()
            .ok_or("no reader schema for a decoded batch")?;
        if self
            .semantics
            .as_ref()
            .is_none_or(|(known, _)| *known != id)
        {
            self.semantics = Some((id, debezium::semantic_types(schema)));
        }
        let semantics = &self.semantics.as_ref().expect("just set").1;
        finish(debezium::unwrap(&batch, semantics)?)
    }

    /// Applies the source TRUNCATEs (`_op = "t"`) in `batch`: an upsert table drops what was
    /// buffered before the last one and empties the table in the next commit; an append table
    /// keeps its history and skips them, counted.
    fn truncates(&mut self, batch: RecordBatch) -> Result<RecordBatch, String> {
        let Some(ops) = batch.column_by_name("_op") else {
            return Ok(batch);
        };
        use arrow::array::{Array, AsArray};
        let ops = ops.as_string::<i32>();
        let Some(last) = (0..ops.len())
            .rev()
            .find(|&i| ops.is_valid(i) && ops.value(i) == "t")
        else {
            return Ok(batch);
        };
        if self.ctx.runtime.config.upsert_keys.is_none() {
            let keep: arrow::array::BooleanArray =
                ops.iter().map(|o| Some(o != Some("t"))).collect();
            let n = keep.false_count();
            self.count_skipped("truncate", n);
            info!(sink = self.sink_name(), tp = %self.ctx.tp, truncates = n,
                  "source TRUNCATE skipped: an append table keeps every change it was sent");
            return arrow::compute::filter_record_batch(&batch, &keep).map_err(|e| e.to_string());
        }
        let earlier = self.buffered_rows + last;
        info!(sink = self.sink_name(), tp = %self.ctx.tp, dropped = earlier,
              "source TRUNCATE: the next commit empties the table, then applies what follows it");
        self.ctx.budget.release(self.buffered_bytes);
        self.buffered_bytes = 0;
        self.buffered_rows = 0;
        self.buffer.clear();
        self.truncate = true;
        // What follows the truncate; kept even when empty, so the flush has the schema.
        Ok(batch.slice(last + 1, batch.num_rows() - last - 1))
    }

    async fn buffer_batch(&mut self, batch: RecordBatch) {
        let batch = match self.transform(batch).await {
            Ok(None) => return,
            Ok(Some(b)) => b,
            Err(e) => {
                self.fatal(
                    "schema",
                    format!(
                        "sink `{}` {}: cannot unwrap Debezium envelopes: {e}",
                        self.sink_name(),
                        self.ctx.tp
                    ),
                );
                return;
            }
        };
        if let Some(first) = self.buffer.first() {
            if first.schema() != batch.schema() {
                // `handle` flushes before a record with another schema, so this cannot happen;
                // refuse rather than write a file with mixed schemas.
                self.fatal(
                    "internal",
                    format!(
                        "sink `{}` {}: internal error: a batch with a different schema reached a \
                     non-empty buffer: {:?} vs {:?}",
                        self.sink_name(),
                        self.ctx.tp,
                        first.schema(),
                        batch.schema()
                    ),
                );
                return;
            }
        }
        let batch = shrink(batch, self.ctx.decode_rows);
        let size = batch.get_array_memory_size();
        if size == 0 {
            self.buffered_rows += batch.num_rows();
            self.buffer.push(batch);
            return;
        }
        self.buffered_rows += batch.num_rows();
        self.ctx.budget.add(size, self.buffered_bytes == 0);
        self.buffered_bytes += size;
        self.buffer.push(batch);
    }

    /// Flushes the buffer and the decoder's pending rows as one commit covering
    /// `[position, last_offset + 1)`: settles the flush in flight first, then hands this one to
    /// its own task ([`InFlight`]) and returns; `position` moves to the flush's end at once.
    async fn flush(&mut self) {
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
        self.first_at = None;
        let (Some(start), Some(last)) = (self.ctx.position, self.last_offset) else {
            return;
        };
        let next = last + 1;
        if next <= start {
            return;
        }
        let batches = std::mem::take(&mut self.buffer);
        let truncate = std::mem::take(&mut self.truncate);
        let rows = self.buffered_rows;
        // The batches stay in the budget until they are staged.
        let bytes = std::mem::take(&mut self.buffered_bytes);
        if bytes > 0 {
            self.ctx.budget.start_flush(bytes);
        }
        self.release();
        let flush = Flush {
            tp: self.ctx.tp.clone(),
            start: Offset(start),
            next: Offset(next),
            batches,
            truncate,
        };
        let task = tokio::spawn(stage_and_commit(
            self.ctx.runtime.clone(),
            self.ctx.progress.clone(),
            self.stats.clone(),
            self.ctx.budget.clone(),
            flush,
            bytes,
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
    async fn settle(&mut self) {
        if let Some(mut f) = self.in_flight.take() {
            let result = (&mut f.task).await;
            self.settled(f, result);
        }
    }

    /// Applies the outcome of a finished flush task: the position moves on (and the source
    /// hears of it), or the worker re-reads from a fencing winner's end, or stops.
    fn settled(&mut self, f: InFlight, result: Result<FlushResult, tokio::task::JoinError>) {
        let tp = self.ctx.tp.clone();
        let (start, flushed) = (f.start, f.next);
        let outcome = match result {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return self.give_up(start, flushed, e),
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
                self.first_at = None;
                self.resync(tp, winner.0);
            }
        }
    }

    /// Records how stale the table was just before this commit.
    fn observe_freshness(&mut self, oldest: Option<i64>) {
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

    fn advance(&mut self, next: i64) {
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

    fn give_up(
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
async fn stage_and_commit(
    runtime: Arc<SinkRuntime>,
    progress: Arc<Progress>,
    stats: Arc<SinkStats>,
    budget: Arc<BufferBudget>,
    flush: Flush,
    bytes: usize,
) -> FlushResult {
    let (name, tp) = (runtime.config.name.clone(), flush.tp.clone());
    let started = std::time::Instant::now();
    let sink = runtime.sink.clone();
    let staged = retry(&name, &tp, &stats, "stage", || sink.stage(flush.clone())).await;
    drop(flush);
    if bytes > 0 {
        budget.staged(bytes);
    }
    let staged = staged?;
    stats.flush_seconds.observe(started.elapsed());
    // What the staged flush still holds (an upsert's changes) counts until its commit, so
    // flushes waiting for their table cannot grow memory past the budget.
    let retained = staged.retained_bytes();
    budget.hold(retained);
    let committing = std::time::Instant::now();
    let outcome = retry(&name, &tp, &stats, "commit", || {
        commit(&runtime, &progress, &stats, &staged)
    })
    .await;
    drop(staged);
    budget.end_flush(retained);
    let outcome = outcome?;
    stats.commit_seconds.observe(committing.elapsed());
    Ok(outcome)
}

/// Commits a staged flush and counts it.
async fn commit(
    runtime: &SinkRuntime,
    progress: &Progress,
    sink_stats: &SinkStats,
    staged: &Staged,
) -> sinks::Result<CommitOutcome> {
    use std::sync::atomic::Ordering::Relaxed;
    let (outcome, stats) = runtime.sink.commit(staged).await?;
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

/// Runs `op` until it succeeds, retrying retryable errors with backoff.
async fn retry<T, F, Fut>(
    sink: &str,
    tp: &TopicPartition,
    stats: &SinkStats,
    what: &'static str,
    mut op: F,
) -> Result<T, (&'static str, u32, sinks::Error)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sinks::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && attempt < RETRY_ATTEMPTS => {
                attempt += 1;
                stats.retries.inc(what);
                warn!(sink, %tp, attempt, error = %e, "{what} failed; retrying");
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) => return Err((what, attempt + 1, e)),
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << attempt.min(8)).min(30_000);
    let jitter = rand::random::<u64>() % (ms / 4 + 1);
    Duration::from_millis(ms + jitter)
}

#[cfg(test)]
mod tests {
    //! The worker against a scripted sink (a unit test: the real sinks' fencing is proven in
    //! `tests/fencing.rs` and `tests/chaos.rs`).

    use std::collections::VecDeque;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Mutex;

    use sinks::{CommitStats, Staged};

    use super::*;
    use crate::config::Config;

    /// Stages only when the test opens the gate; commits return the scripted outcomes.
    #[derive(Debug)]
    struct Scripted {
        gate: tokio::sync::Semaphore,
        outcomes: Mutex<VecDeque<CommitOutcome>>,
        /// (start, next, rows) of every stage call.
        staged: Mutex<Vec<(i64, i64, usize)>>,
    }

    #[async_trait::async_trait]
    impl sinks::Sink for Scripted {
        async fn recover(&self, _: &TopicPartition) -> sinks::Result<Option<Offset>> {
            Ok(None)
        }
        async fn committed(&self, _: &TopicPartition) -> sinks::Result<Option<Offset>> {
            Ok(None)
        }
        async fn stage(&self, flush: Flush) -> sinks::Result<Staged> {
            self.gate.acquire().await.expect("open").forget();
            let rows = flush.rows();
            self.staged
                .lock()
                .unwrap()
                .push((flush.start.0, flush.next.0, rows));
            Ok(Staged {
                tp: flush.tp,
                start: flush.start,
                next: flush.next,
                rows: rows as u64,
                files: Vec::new(),
                delta: None,
                databend: None,
                columns: Vec::new(),
            })
        }
        async fn commit(&self, _: &Staged) -> sinks::Result<(CommitOutcome, CommitStats)> {
            let outcome = self.outcomes.lock().unwrap().pop_front().expect("scripted");
            Ok((outcome, CommitStats::default()))
        }
        async fn check(&self) -> sinks::Result<()> {
            Ok(())
        }
        fn location(&self) -> &str {
            "scripted"
        }
    }

    fn records(offsets: std::ops::Range<i64>) -> WorkerMsg {
        WorkerMsg::Records(
            offsets
                .map(|o| Record {
                    offset: o,
                    timestamp_ms: None,
                    key: None,
                    payload: Some(bytes::Bytes::from(format!(r#"{{"id":{o}}}"#))),
                    headers: Vec::new(),
                })
                .collect(),
        )
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_fenced_flush_in_flight_drops_what_was_read_since_and_reads_from_the_winner() {
        let config = Config::from_toml(
            r#"
[kafka]
bootstrap_servers = "127.0.0.1:9"
group_id = "g"

[[sink]]
name = "t"
topics = ["t"]
format = "json"
schema = { id = "long" }
kind = "parquet"
table = "file:///nonexistent/t"
flush = { max_rows = 2 }
"#,
        )
        .unwrap()
        .validate()
        .unwrap();
        let sink = Arc::new(Scripted {
            gate: tokio::sync::Semaphore::new(0),
            outcomes: Mutex::default(),
            staged: Mutex::default(),
        });
        sink.outcomes.lock().unwrap().extend([
            // Another writer committed [0, 5) first.
            CommitOutcome::Fenced { next: Offset(5) },
            CommitOutcome::Committed { next: Offset(7) },
        ]);
        let runtime = Arc::new(SinkRuntime {
            config: config.sinks[0].clone(),
            sink: sink.clone(),
            registry: schema_registry::RegistryClient::new(schema_registry::RegistryConfig::new(
                "http://127.0.0.1:9",
            ))
            .unwrap(),
            dead_letters: None,
        });
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let progress = Arc::new(Progress::default());
        let tp = TopicPartition::new("t", 0);
        let ctx = WorkerCtx {
            sink_index: 0,
            runtime,
            tp: tp.clone(),
            position: None,
            end_offset: None,
            events: events_tx,
            budget: Arc::new(BufferBudget::new(1 << 30)),
            progress: progress.clone(),
            decode_rows: 1024,
        };
        let (tx, rx) = mpsc::channel(4);
        let worker = tokio::spawn(run(ctx, rx));

        // Offsets 0 and 1 fill a flush, whose stage waits; the worker reads offset 2 meanwhile.
        tx.send(records(0..2)).await.unwrap();
        until("the first flush is staging", || {
            sink.gate.available_permits() == 0
        })
        .await;
        tx.send(records(2..3)).await.unwrap();
        until("offset 2 is read while the flush is in flight", || {
            progress.records_in.load(Relaxed) == 3
        })
        .await;
        assert!(sink.staged.lock().unwrap().is_empty(), "still staging");

        // The flush is fenced at 5: offset 2 is dropped and the worker asks to read from 5.
        sink.gate.add_permits(1);
        match events.recv().await.unwrap() {
            Event::Resync { position, .. } => assert_eq!(position, 5),
            other => panic!("expected a resync to 5, got {other:?}"),
        }
        // Records read before the seek is confirmed are stale.
        tx.send(records(3..5)).await.unwrap();
        tx.send(WorkerMsg::Seeked { position: 5 }).await.unwrap();
        sink.gate.add_permits(1);
        tx.send(records(5..7)).await.unwrap();
        match events.recv().await.unwrap() {
            Event::Committed { next, .. } => assert_eq!(next, Offset(7)),
            other => panic!("expected a commit up to 7, got {other:?}"),
        }
        assert_eq!(*sink.staged.lock().unwrap(), vec![(0, 2, 2), (5, 7, 2)]);

        let (ack, acked) = tokio::sync::oneshot::channel();
        tx.send(WorkerMsg::Drain(ack)).await.unwrap();
        acked.await.unwrap();
        worker.await.unwrap();
        assert!(events.try_recv().is_err(), "nothing after the drain");
    }

    /// A short batch from a decoder that allocated for a full one gives its spare capacity back
    /// (and so stops counting it in the budget); a full batch is left alone.
    #[test]
    fn short_batches_give_back_the_capacity_of_a_full_one() {
        use arrow::array::{ArrayRef, Int64Builder, StringBuilder, StructArray};
        use arrow::datatypes::{DataType, Field};
        let batch = |rows: usize, capacity: usize| {
            let mut ids = Int64Builder::with_capacity(capacity);
            let mut names = StringBuilder::with_capacity(capacity, capacity * 32);
            for i in 0..rows {
                ids.append_value(i as i64);
                names.append_value(format!("order-{i}"));
            }
            let names: ArrayRef = Arc::new(names.finish());
            let nested = StructArray::from(vec![(
                Arc::new(Field::new("name", DataType::Utf8, false)),
                names,
            )]);
            RecordBatch::try_from_iter([
                ("id", Arc::new(ids.finish()) as ArrayRef),
                ("nested", Arc::new(nested) as ArrayRef),
            ])
            .unwrap()
        };
        let short = batch(3, 1024);
        let before = short.get_array_memory_size();
        let shrunk = shrink(short, 1024);
        assert_eq!(shrunk, batch(3, 1024), "the same rows");
        let after = shrunk.get_array_memory_size();
        assert!(
            after * 20 < before,
            "3 rows keep {after} of a 1,024-row batch's {before} bytes"
        );
        let full = batch(1024, 1024);
        let size = full.get_array_memory_size();
        assert_eq!(shrink(full, 1024).get_array_memory_size(), size);
    }
}
