//! The worker against a scripted sink (a unit test: the real sinks' fencing is proven in
//! `tests/fencing.rs` and `tests/chaos.rs`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use std::time::Duration;

use sinks::{CommitStats, Flush, Offset, Staged};

use super::batcher::shrink;
use super::*;
use crate::config::Config;

/// Stages only when the test opens the gate; commits return the scripted outcomes.
#[derive(Debug)]
struct Scripted {
    gate: tokio::sync::Semaphore,
    outcomes: Mutex<VecDeque<CommitOutcome>>,
    /// (start, next, rows) of every stage call.
    staged: Mutex<Vec<(i64, i64, usize)>>,
    /// The `id` column of every flush staged, in order, and how many chunks of them were packed.
    ids: Mutex<Vec<i64>>,
    packed_chunks: std::sync::atomic::AtomicUsize,
    /// Whether each flush staged was cut at a tick (or a drain).
    ticks: Mutex<Vec<bool>>,
}

impl Scripted {
    fn new() -> Arc<Self> {
        Arc::new(Scripted {
            gate: tokio::sync::Semaphore::new(0),
            outcomes: Mutex::default(),
            staged: Mutex::default(),
            ids: Mutex::default(),
            packed_chunks: Default::default(),
            ticks: Mutex::default(),
        })
    }
}

#[async_trait::async_trait]
impl sinks::Sink for Scripted {
    type Data = ();

    async fn recover(&self, _: &TopicPartition) -> sinks::Result<Option<Offset>> {
        Ok(None)
    }
    async fn committed(&self, _: &TopicPartition) -> sinks::Result<Option<Offset>> {
        Ok(None)
    }
    async fn adopt_topic_id(&self, _: &str, _: &str) -> sinks::Result<sinks::TopicIdentity> {
        Ok(sinks::TopicIdentity::Recorded)
    }
    async fn stage(&self, flush: Flush) -> sinks::Result<Staged<()>> {
        self.gate.acquire().await.expect("open").forget();
        let rows = flush.rows();
        self.packed_chunks.fetch_add(flush.packed.len(), Relaxed);
        self.ticks.lock().unwrap().push(flush.tick.is_some());
        let unpacked = flush.clone().unpacked()?;
        for b in &unpacked.batches {
            let ids = b.column_by_name("id").expect("an id column");
            let ids = ids
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .expect("ids");
            self.ids.lock().unwrap().extend(ids.values().iter());
        }
        self.staged
            .lock()
            .unwrap()
            .push((flush.start.0, flush.next.0, rows));
        Ok(Staged {
            tp: flush.tp,
            start: flush.start,
            next: flush.next,
            rows: rows as u64,
            columns: Vec::new(),
            data: (),
        })
    }
    async fn commit(&self, staged: &Staged<()>) -> sinks::Result<(CommitOutcome, CommitStats)> {
        // Past the scripted outcomes, every commit succeeds.
        let outcome = self
            .outcomes
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(CommitOutcome::Committed { next: staged.next });
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

/// A worker's context for the first sink of `config` writing to `sink`, with a budget of
/// `budget` bytes; its events and progress.
fn worker_ctx(
    config: &crate::config::ValidatedConfig,
    sink: &Arc<Scripted>,
    budget: u64,
) -> (WorkerCtx, mpsc::UnboundedReceiver<Event>, Arc<Progress>) {
    let runtime = Arc::new(SinkRuntime {
        config: config.sinks[0].clone(),
        sink: sink.clone(),
        registry: schema_registry::RegistryClient::new(schema_registry::RegistryConfig::new(
            "http://127.0.0.1:9",
        ))
        .unwrap(),
        dead_letters: None,
    });
    let (events_tx, events) = mpsc::unbounded_channel();
    let progress = Arc::new(Progress::default());
    let ctx = WorkerCtx {
        id: 1,
        sink_index: 0,
        runtime,
        tp: TopicPartition::new("t", 0),
        position: None,
        end_offset: None,
        events: events_tx,
        budget: Arc::new(BufferBudget::new(budget)),
        progress: progress.clone(),
        decode_rows: 1024,
        identities: crate::pipeline::identity::TopicIdentities::none(),
    };
    (ctx, events, progress)
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
    let sink = Scripted::new();
    sink.outcomes.lock().unwrap().extend([
        // Another writer committed [0, 5) first.
        CommitOutcome::Fenced { next: Offset(5) },
        CommitOutcome::Committed { next: Offset(7) },
    ]);
    let (ctx, mut events, progress) = worker_ctx(&config, &sink, 1 << 30);
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
        Event::Resync { position, .. } => assert_eq!(position, Offset(5)),
        other => panic!("expected a resync to 5, got {other:?}"),
    }
    // Records read before the seek is confirmed are stale.
    tx.send(records(3..5)).await.unwrap();
    tx.send(WorkerMsg::Seeked {
        position: Offset(5),
    })
    .await
    .unwrap();
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

/// A JSON sink of `{id, note}` rows with the default flush settings.
fn notes_config() -> crate::config::ValidatedConfig {
    Config::from_toml(
        r#"
[kafka]
bootstrap_servers = "127.0.0.1:9"
group_id = "g"

[[sink]]
name = "t"
topics = ["t"]
format = "json"
schema = { id = "long", note = "string" }
kind = "parquet"
table = "file:///nonexistent/t"
"#,
    )
    .unwrap()
    .validate()
    .unwrap()
}

/// `{id, note}` records at `offsets`, each note ending in its offset.
fn noted(offsets: std::ops::Range<i64>, note: &str) -> WorkerMsg {
    WorkerMsg::Records(
        offsets
            .map(|o| Record {
                offset: o,
                timestamp_ms: None,
                key: None,
                payload: Some(bytes::Bytes::from(format!(
                    r#"{{"id":{o},"note":"{note}{o}"}}"#
                ))),
                headers: Vec::new(),
            })
            .collect(),
    )
}

/// 40,000 rows through a writer with a 1 MiB budget (about 4,000 of these rows), its
/// partition's end reported at `high`, or (`None`) just past the records sent so far, as when
/// they are produced while it reads: what it packed, and the flushes it staged.
async fn under_pressure(high: Option<i64>) -> (u64, Arc<Scripted>) {
    let config = notes_config();
    let sink = Scripted::new();
    sink.gate.add_permits(1_000);
    let (ctx, _events, progress) = worker_ctx(&config, &sink, 1 << 20);
    progress
        .high_watermarks
        .lock()
        .unwrap()
        .insert(TopicPartition::new("t", 0), high.unwrap_or(0));
    let budget = ctx.budget.clone();
    let (tx, rx) = mpsc::channel(4);
    let worker = tokio::spawn(run(ctx, rx));
    let note = "an order line's description, repeated as such notes are ".repeat(4);
    for from in (0..40_000).step_by(1_000) {
        if high.is_none() {
            let end = from + 1_000;
            progress
                .high_watermarks
                .lock()
                .unwrap()
                .insert(TopicPartition::new("t", 0), end);
        }
        tx.send(noted(from..from + 1_000, &note)).await.unwrap();
    }
    until("every record is read", || {
        progress.records_in.load(Relaxed) == 40_000
    })
    .await;
    let packed = progress.sink("t").packed_bytes.load(Relaxed);
    let size = progress.sink("t").packed_size_bytes.load(Relaxed);
    assert!(
        (packed == 0) == (size == 0) && size <= packed,
        "packed {packed} Arrow bytes into {size}"
    );
    assert!(budget.used() <= 2 << 20, "{} bytes held", budget.used());
    let (ack, acked) = tokio::sync::oneshot::channel();
    tx.send(WorkerMsg::Drain(ack)).await.unwrap();
    acked.await.unwrap();
    worker.await.unwrap();
    let staged = sink.staged.lock().unwrap().clone();
    assert_eq!(staged.iter().map(|s| s.2).sum::<usize>(), 40_000);
    assert_eq!(*sink.ids.lock().unwrap(), (0..40_000).collect::<Vec<i64>>());
    assert_eq!(budget.used(), 0, "everything released");
    (packed, sink)
}

/// Under memory pressure a writer near its log end packs its buffer instead of flushing it:
/// the rows wait for the next flush (here the drain) at a fraction of their memory, and that
/// flush carries every row once, in offset order.
#[tokio::test]
async fn memory_pressure_packs_the_buffer_instead_of_flushing_it() {
    let (packed, sink) = under_pressure(None).await;
    assert!(packed > 4 << 20, "{packed} bytes packed");
    assert!(
        sink.packed_chunks.load(Relaxed) > 0,
        "a flush carried packed rows"
    );
    let staged = sink.staged.lock().unwrap().clone();
    // About 10 MB of Arrow through a 1 MiB budget: 13 flushes for memory without packing.
    assert!(staged.len() <= 3, "{} flushes: {staged:?}", staged.len());
    assert_eq!(
        sink.ticks.lock().unwrap().last(),
        Some(&true),
        "the drain's flush is cut like a tick's, to share files"
    );
}

/// A writer far behind its log end (catching up) flushes for memory without packing: size
/// flushes come anyway, and packing would only cost CPU.
#[tokio::test]
async fn a_writer_catching_up_flushes_without_packing() {
    let (packed, sink) = under_pressure(Some(10_000_000)).await;
    assert_eq!(packed, 0);
    assert!(sink.staged.lock().unwrap().len() > 3);
}

/// A writer whose records stopped arriving still flushes when other writers fill the budget:
/// pressure wakes it, and it holds more than the average.
#[tokio::test]
async fn an_idle_writer_flushes_when_others_fill_the_budget() {
    let config = notes_config();
    let sink = Scripted::new();
    sink.gate.add_permits(1_000);
    let limit: usize = 4 << 20;
    let (ctx, _events, progress) = worker_ctx(&config, &sink, limit as u64);
    // Far from its log end (catching up), so it flushes rather than packs.
    progress
        .high_watermarks
        .lock()
        .unwrap()
        .insert(TopicPartition::new("t", 0), 10_000_000);
    let budget = ctx.budget.clone();
    let (tx, rx) = mpsc::channel(4);
    let worker = tokio::spawn(run(ctx, rx));
    let note = "an order line's description ".repeat(4);
    // Batches of 1,024 rows (the decoder's) until the writer holds over half the budget.
    let mut sent = 0;
    while budget.used() <= limit / 2 {
        tx.send(noted(sent..sent + 1_024, &note)).await.unwrap();
        sent += 1_024;
        until("the batch is read", || {
            progress.records_in.load(Relaxed) == sent as u64
        })
        .await;
    }
    let mine = budget.used();
    assert!(
        mine < limit / 4 * 3,
        "{mine} bytes: a batch is expected to be well under a quarter of the budget"
    );
    assert!(
        sink.staged.lock().unwrap().is_empty(),
        "nothing flushed yet"
    );
    // Another writer, holding less than this one, takes the budget past its limit. This one
    // gets no record: only pressure can make it flush.
    budget.add(limit + 1 - mine, true);
    until("the idle writer flushes", || {
        !sink.staged.lock().unwrap().is_empty()
    })
    .await;
    let n = sent as usize;
    assert_eq!(*sink.staged.lock().unwrap(), vec![(0, sent, n)]);
    drop(tx);
    worker.await.unwrap();
}
