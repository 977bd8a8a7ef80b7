//! Every use of the Kafka client (rdkafka): the consumer-group member that feeds the pipeline,
//! polled on a dedicated thread, and the dead-letter producer ([`dead_letter`]) and logins
//! ([`auth`]) beside it. Nothing outside this folder (and the commands in `app`) needs to read
//! Kafka code to understand the pipeline: the source hands records to the pipeline's
//! [`Supervisor`] and answers its events.
//!
//! - Rebalance callbacks run on the polling thread (inside `poll`). On assignment the
//!   supervisor recovers every sink's committed position (concurrently, one deadline),
//!   `positions` decides where the partition is read from, and the supervisor starts one worker
//!   per (sink, partition). On revocation the supervisor drains the partition's workers (flush
//!   and commit) before the callback returns: a revoked partition has no writer left in this
//!   process (a commit racing the next owner is still safe: the sink's fence decides).
//! - Records are copied into bounded per-worker queues (backpressure blocks the poll thread,
//!   librdkafka keeps heartbeating in its own threads).
//! - Group offsets are committed after sink commits, for lag dashboards only: the sink's commit
//!   record is the source of truth.
//!
//! Parts: `rebalance` (assignment and revocation), `positions` (where a partition is read from,
//! and what happens when the log and the table disagree), `router` (polled records to the
//! supervisor, seeks after a fence), `stall` (partitions that cannot be fetched), `topic_ids`
//! (KIP-516); this file holds the client configuration and the poll loop.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset as KOffset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use sinks::TopicPartition;

use crate::config::ValidatedConfig;
use crate::decode::Record;
use crate::error::Error;
use crate::pipeline::supervisor::{Failure, Limits, Recovered, Supervisor};
use crate::pipeline::{BufferBudget, Event, Progress, SinkRuntime};

pub mod auth;
pub mod dead_letter;
pub(crate) mod positions;
mod rebalance;
pub mod repeats;
mod router;
pub mod stall;
mod topic_ids;

use router::{resync, Router, POLL_BURST};

pub use positions::StartAt;

/// How the source runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceOptions {
    /// Stop once every assigned partition is committed up to the end offset it had when
    /// assigned.
    pub until_caught_up: bool,
    /// Record and check topic ids (see `topic_ids`). Off only for librdkafka's in-process mock
    /// cluster (`demo`, `bench`), which has no topic ids and no controller to ask.
    pub topic_ids: bool,
}

/// Builds the librdkafka client config from a validated config.
pub fn client_config(cfg: &ValidatedConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("group.id", &cfg.group_id)
        .set("enable.partition.eof", "false")
        // End offsets for the lag metric.
        .set("statistics.interval.ms", "5000")
        // librdkafka postpones a partition's next fetch by this much once its local queue is
        // over the thresholds below; its default (1 s) starves a pipeline that polls in bursts.
        .set("fetch.queue.backoff.ms", "10")
        // The pre-fetch queue counts against the 256 MiB lakesink aims for: 8 MiB, not 64 MiB.
        // librdkafka keeps an operation per queued message and the decompressed message sets
        // beside it, nearly 4x the limit in heap (60 MiB at 16 MiB, heaptrack); 8 MiB measured no
        // slower and pays for the 512 KiB mmap threshold in `main.rs`.
        .set("queued.max.messages.kbytes", "8192")
        // ... and at most 20,000 messages: small records reach the message limit first. The
        // operation librdkafka keeps per message is about 300 bytes, three times a 94-byte Avro
        // record, so 8 MiB of them queued took 27 MiB of operations plus 15 MiB of
        // decompressed sets (heaptrack, 20 tables). librdkafka's default is 100,000.
        .set("queued.min.messages", "20000")
        .set("fetch.max.bytes", fetch_max_bytes(cfg).to_string());
    for (k, v) in &cfg.kafka_properties {
        c.set(k, v.expose());
    }
    c
}

/// What one fetch response may hold: [`FETCH_MAX_BYTES`], or `message.max.bytes` when that is
/// set higher (librdkafka refuses a `fetch.max.bytes` below it).
///
/// A response is held whole until its last record is consumed, and librdkafka turns it into
/// one operation of about 300 bytes per record beside the decompressed batches: a response of
/// 16 MiB of LZ4-compressed 94-byte records took 74 MiB of operations and 38 MiB of batches at
/// the peak of a catch-up from a real broker (heaptrack), more than the queue limits above
/// allow, since a fetch in flight is never cut short.
fn fetch_max_bytes(cfg: &ValidatedConfig) -> u64 {
    let message_max = cfg
        .kafka_properties
        .get("message.max.bytes")
        .and_then(|v| v.expose().trim().parse::<u64>().ok())
        .unwrap_or(0);
    FETCH_MAX_BYTES.max(message_max)
}

/// See [`fetch_max_bytes`]: 2 MiB (librdkafka's default is 50 MiB).
const FETCH_MAX_BYTES: u64 = 2 << 20;

/// Rows decoded per batch, shared by every partition this process holds: each partition's
/// decoder keeps one batch (Avro in Arrow builders; JSON as its pending records, parsed when the
/// batch is emitted), so with many partitions the batches shrink, down to 256 rows, to keep those
/// buffers within the same memory as 48 partitions at 1,024 rows. Fixed per partition when it is
/// assigned.
pub fn decode_batch_rows(partitions: usize) -> usize {
    const ROWS_PER_PROCESS: usize = 48 * 1024;
    (ROWS_PER_PROCESS / partitions.max(1)).clamp(256, 1024)
}

/// Bytes per arena allocation; a record larger than this gets a chunk of its own size.
const ARENA_CHUNK: usize = 256 * 1024;

/// A copy of `data` in `arena`, which moves to a fresh [`ARENA_CHUNK`] when full: one
/// allocation per chunk shared by many records (each a `Bytes` slice of it), freed when the
/// last of them is dropped.
pub fn arena_copy(arena: &mut bytes::BytesMut, data: &[u8]) -> bytes::Bytes {
    if arena.capacity() - arena.len() < data.len() {
        // The filled part was split off already; the old chunk lives on in its slices.
        *arena = bytes::BytesMut::with_capacity(ARENA_CHUNK.max(data.len()));
    }
    arena.extend_from_slice(data);
    arena.split().freeze()
}

/// The consumer context: bridges rebalances to recovery and workers, and signs tokens.
pub struct LakeContext {
    router: Mutex<Router>,
    auth: crate::kafka::auth::KafkaAuth,
    stalls: Mutex<stall::StallDetector>,
    /// Fetch offsets librdkafka reset (out of range), for the poll loop to resolve.
    resets: Mutex<Vec<(TopicPartition, i64)>>,
}

impl ClientContext for LakeContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.auth.oauth_token()
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "OFFSET" {
            if let Some(reset) = positions::parse_offset_reset(log_message) {
                self.resets.lock().expect("resets").push(reset);
            }
        }
        crate::kafka::auth::forward_log(&self.auth, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.auth.record_error(&error, reason);
        let progress = self.router.lock().expect("router").progress.clone();
        progress.note_consumer_error(format!("{error}: {reason}"));
        if let Some(held) = repeats::admit(reason) {
            warn!(target: "librdkafka", error = %error, "{reason}{}", repeats::suffix(held));
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        // The broker's end offsets, for the lag metric, and each assigned partition's fetch
        // progress, for stalls.
        let router = self.router.lock().expect("router");
        let progress = router.progress.clone();
        let now = Instant::now();
        let mut stalls = self.stalls.lock().expect("stalls");
        let mut highs = progress.high_watermarks.lock().expect("progress");
        let mut lows = progress.low_watermarks.lock().expect("progress");
        for (topic, t) in &statistics.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || !part.desired {
                    continue;
                }
                let tp = TopicPartition::new(topic.as_str(), *p);
                if part.hi_offset >= 0 {
                    highs.insert(tp.clone(), part.hi_offset);
                }
                if part.lo_offset >= 0 {
                    lows.insert(tp.clone(), part.lo_offset);
                }
                if !router.sup.holds(&tp) || router.backpressured.contains(&tp) {
                    // Paused by lakesink while its writers catch up: not a stall.
                    continue;
                }
                let readable_end = match (part.hi_offset, part.ls_offset) {
                    (hi, _) if hi < 0 => None,
                    (hi, ls) if ls >= 0 => Some(hi.min(ls)),
                    (hi, _) => Some(hi),
                };
                let position = [part.next_offset, part.app_offset, part.committed_offset]
                    .into_iter()
                    .find(|o| *o >= 0)
                    .unwrap_or(-1);
                let seen = stall::Observation {
                    position,
                    readable_end,
                    queued: part.fetchq_cnt,
                };
                match stalls.observe(&tp, seen, now) {
                    Some(stall::Change::Stalled {
                        position,
                        readable_end,
                        waited,
                    }) => {
                        let cause = progress
                            .consumer_error()
                            .unwrap_or_else(|| "no error reported by the client".into());
                        let end = match readable_end {
                            Some(e) => format!("the broker holds records up to offset {e}"),
                            None => "no fetch of it was answered".to_string(),
                        };
                        error!(
                            topic = %tp.topic,
                            partition = tp.partition,
                            offset = position,
                            "partition {tp} cannot be consumed: no record fetched at offset \
                             {position} for {}s while {end} (last consumer error: {cause}); \
                             check the principal's Read ACL on the topic and that this build \
                             reads the topic's compression codec",
                            waited.as_secs()
                        );
                        progress.set_stalled(&tp, Some((position, cause)));
                    }
                    Some(stall::Change::Recovered { position }) => {
                        info!(topic = %tp.topic, partition = tp.partition, offset = position, "partition {tp} is consumed again");
                        progress.set_stalled(&tp, None);
                    }
                    None => {}
                }
            }
        }
    }
}

/// Runs the consumer until `cancel` fires, a fatal error happens or (in catch-up mode) every
/// partition is committed to its end. Blocking: call from a dedicated thread.
pub fn run(
    cfg: &ValidatedConfig,
    sinks: Vec<Arc<SinkRuntime>>,
    progress: Arc<Progress>,
    rt: tokio::runtime::Handle,
    cancel: CancellationToken,
    options: SourceOptions,
) -> Result<(), Error> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Topic ids are looked up on a client of their own: on the consumer's connection a lookup
    // queued behind the broker's long-polled Fetch (`fetch.wait.max.ms`, 500 ms), every time.
    let lookups: BaseConsumer<crate::kafka::auth::AuthContext> = client_config(cfg)
        .remove("group.id")
        .create_with_context(crate::kafka::auth::AuthContext(
            crate::kafka::auth::KafkaAuth::from_config(cfg),
        ))
        .map_err(|e| Error::kafka("cannot create the Kafka client for topic ids", e))?;
    let identities =
        crate::pipeline::identity::TopicIdentities::new(Box::new(move |topics: &[String]| {
            // Serves a due token refresh (OAUTHBEARER logins) before the request needs it.
            let _ = lookups.poll(Duration::ZERO);
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            topic_ids::describe(&lookups, &names, topic_ids::DESCRIBE_TIMEOUT)
        }));
    identities.report_to(events_tx.clone());
    let budget = Arc::new(BufferBudget::new(cfg.max_buffer_bytes).packing(cfg.pack_buffers));
    *progress.budget.lock().expect("progress") = Some(budget.clone());
    let sup = Supervisor::new(
        rt.clone(),
        sinks.clone(),
        events_tx,
        budget,
        progress.clone(),
        Limits {
            queue_records: cfg.queue_records,
            drain_timeout: cfg.drain_timeout,
        },
        identities,
    );
    let router = Router {
        rt: rt.clone(),
        sup,
        progress: progress.clone(),
        options,
        fatal: None,
        start_at: StartAt::from_config(cfg),
        start_from: positions::GroupOffsets::from_config(cfg)?,
        pending: Vec::new(),
        pending_records: 0,
        keep_headers: sinks
            .iter()
            .any(|s| s.config.errors == crate::config::ErrorPolicy::DeadLetter),
        arena: bytes::BytesMut::new(),
        decode_rows: decode_batch_rows(1),
        topic_ids: HashMap::new(),
        waiting: HashMap::new(),
        to_pause: Vec::new(),
        backpressured: HashSet::new(),
    };
    // Every start position is explicit (see `positions`), so librdkafka resets only a fetch
    // offset found out of range, always to the log start, and says so in a warning that
    // `positions` resolves against the table's position.
    let consumer: BaseConsumer<LakeContext> = client_config(cfg)
        .set("auto.offset.reset", "earliest")
        .create_with_context(LakeContext {
            router: Mutex::new(router),
            auth: crate::kafka::auth::KafkaAuth::from_config(cfg),
            stalls: Mutex::new(stall::StallDetector::new(cfg.stall_timeout)),
            resets: Mutex::new(Vec::new()),
        })
        .map_err(|e| Error::kafka("cannot create the Kafka consumer", e))?;
    let mut subscriptions: Vec<String> = sinks
        .iter()
        .flat_map(|s| s.config.topics.subscriptions())
        .collect();
    subscriptions.sort();
    subscriptions.dedup();
    let subs: Vec<&str> = subscriptions.iter().map(String::as_str).collect();
    consumer
        .subscribe(&subs)
        .map_err(|e| Error::kafka(format!("cannot subscribe to {subs:?}"), e))?;
    info!(topics = ?subs, group = %cfg.group_id, "consuming");

    let mut to_commit: HashMap<TopicPartition, i64> = HashMap::new();
    let mut positions: HashMap<TopicPartition, BTreeMap<usize, i64>> = HashMap::new();
    let mut last_commit = Instant::now();
    let mut warned_errors: HashMap<String, Instant> = HashMap::new();
    let result = loop {
        // Events from workers.
        while let Ok(ev) = events.try_recv() {
            let mut router = consumer.context().router.lock().expect("router");
            match ev {
                Event::Committed { sink, tp, next } => {
                    router.sup.committed(sink, &tp, next);
                    note_commit(&mut positions, &mut to_commit, &sinks, sink, tp, next.0);
                }
                Event::Resync {
                    sink,
                    worker,
                    tp,
                    position,
                } => resync(&consumer, &mut router, sink, worker, &tp, position),
                Event::TopicRecreated {
                    topic,
                    recorded,
                    current,
                } => router.topic_recreated(&consumer, &topic, &recorded, &current),
                Event::Fatal(e) => {
                    router.fatal.get_or_insert(e);
                }
            }
        }
        {
            let router = consumer.context().router.lock().expect("router");
            if let Some(f) = &router.fatal {
                break Err(f.clone());
            }
            if options.until_caught_up {
                let quarantined = router
                    .progress
                    .quarantined
                    .lock()
                    .expect("progress")
                    .clone();
                if !quarantined.is_empty()
                    && (router.sup.held().is_empty() || router.sup.caught_up())
                {
                    break Err(Error::Quarantined(
                        quarantined
                            .iter()
                            .map(|((tp, sink), why)| format!("{tp} (sink {sink}): {why}"))
                            .collect(),
                    ));
                }
                if router.sup.caught_up() {
                    info!("caught up: every assigned partition is committed up to the end offset it had at start");
                    break Ok(());
                }
            }
        }
        if cancel.is_cancelled() {
            break Ok(());
        }
        if !to_commit.is_empty() && last_commit.elapsed() >= Duration::from_secs(1) {
            commit_group_offsets(&consumer, &mut to_commit, CommitMode::Async);
            last_commit = Instant::now();
        }
        // A burst: wait for the first record, then take what is already fetched without
        // waiting, then hand the records to the workers in per-partition batches. The wait is
        // short because this thread also serves the workers' events (commits, seeks after a
        // fence, the caught-up check): 100 ms here cost a catch-up run up to 100 ms after its
        // last commit. Idle, that is 100 wake-ups a second of a few microseconds each.
        let mut wait = Duration::from_millis(10);
        let waiting = Instant::now();
        loop {
            let polled = consumer.poll(wait);
            if !wait.is_zero() {
                progress.poll_idle_ns.fetch_add(
                    waiting.elapsed().as_nanos() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            match polled {
                None => break,
                Some(Ok(m)) => {
                    let mut router = consumer.context().router.lock().expect("router");
                    router.push(&m);
                    // A worker's event (a commit, a resync after a fence) ends the burst: it is
                    // answered before more records are handed out.
                    if router.pending_records >= POLL_BURST || !events.is_empty() {
                        break;
                    }
                    wait = Duration::ZERO;
                }
                Some(Err(e)) => {
                    progress.note_consumer_error(e.to_string());
                    warn_kafka(&mut warned_errors, e);
                    break;
                }
            }
        }
        let mut router = consumer.context().router.lock().expect("router");
        router.dispatch_pending();
        router.relieve(&consumer);
        router.retry_waiting(&consumer);
        // Fetch offsets librdkafka found out of range (see `positions`): resolved against the
        // log's watermarks; one that cannot be checked now is checked after the next burst.
        let resets = std::mem::take(&mut *consumer.context().resets.lock().expect("resets"));
        for (tp, at) in resets {
            if !router.offset_reset(&consumer, &tp, at) {
                consumer
                    .context()
                    .resets
                    .lock()
                    .expect("resets")
                    .push((tp, at));
            }
        }
    };
    // Drain: flush and commit every writer, then commit group offsets once more.
    progress
        .health
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    {
        let mut router = consumer.context().router.lock().expect("router");
        let tps = router.sup.held();
        router.sup.drain(&tps);
    }
    while let Ok(ev) = events.try_recv() {
        if let Event::Committed { sink, tp, next } = ev {
            note_commit(&mut positions, &mut to_commit, &sinks, sink, tp, next.0);
        }
    }
    commit_group_offsets(&consumer, &mut to_commit, CommitMode::Sync);
    consumer.unsubscribe();
    // Leave the group here, serving the consumer's queue every 5 ms until it is closed:
    // rust-rdkafka's drop does the same in 100 ms steps, which cost every stop (and every
    // catch-up run) about 100 ms.
    if consumer.close_queue().is_ok() {
        let until = Instant::now() + Duration::from_secs(10);
        while !consumer.closed() && Instant::now() < until {
            let _ = consumer.poll(Duration::from_millis(5));
        }
    }
    result
}

/// Logs a Kafka error, each distinct one at most every 30 s.
fn warn_kafka(warned: &mut HashMap<String, Instant>, e: rdkafka::error::KafkaError) {
    let key = e.to_string();
    let now = Instant::now();
    if warned
        .get(&key)
        .is_none_or(|t| now.duration_since(*t) > Duration::from_secs(30))
    {
        warn!("kafka: {e}");
        warned.insert(key, now);
    }
}

/// Records a sink commit; the group offset of a partition is the minimum over its sinks, known
/// once every sink of the topic has committed.
fn note_commit(
    positions: &mut HashMap<TopicPartition, BTreeMap<usize, i64>>,
    to_commit: &mut HashMap<TopicPartition, i64>,
    sinks: &[Arc<SinkRuntime>],
    sink: usize,
    tp: TopicPartition,
    next: i64,
) {
    let per_sink = positions.entry(tp.clone()).or_default();
    per_sink.insert(sink, next);
    let readers = sinks
        .iter()
        .filter(|s| s.config.topics.matches(&tp.topic))
        .count();
    if per_sink.len() == readers {
        if let Some(min) = per_sink.values().min() {
            to_commit.insert(tp, *min);
        }
    }
}

fn commit_group_offsets(
    consumer: &BaseConsumer<LakeContext>,
    to_commit: &mut HashMap<TopicPartition, i64>,
    mode: CommitMode,
) {
    if to_commit.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, off) in to_commit.drain() {
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, KOffset::Offset(off));
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        debug!("group offset commit failed (informational only): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::decode_batch_rows;

    fn config(properties: &str) -> crate::config::ValidatedConfig {
        let text = format!(
            r#"
[kafka]
bootstrap_servers = "127.0.0.1:9"
group_id = "g"
properties = {{ {properties} }}

[schema_registry]
url = "http://127.0.0.1:9"

[[sink]]
name = "o"
topics = ["t"]
table = "file:///tmp/o"
"#
        );
        crate::config::Config::from_toml(&text)
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn a_fetch_holds_two_mib_unless_a_message_may_be_larger() {
        use rdkafka::consumer::BaseConsumer;
        let small = super::client_config(&config(""));
        assert_eq!(small.get("fetch.max.bytes"), Some("2097152"));
        small
            .create::<BaseConsumer>()
            .expect("librdkafka accepts it");
        // librdkafka refuses a fetch.max.bytes below message.max.bytes.
        let large = super::client_config(&config("\"message.max.bytes\" = 10000000"));
        assert_eq!(large.get("fetch.max.bytes"), Some("10000000"));
        large
            .create::<BaseConsumer>()
            .expect("librdkafka accepts it");
        // The operator's own value wins.
        let own = super::client_config(&config("\"fetch.max.bytes\" = 52428800"));
        assert_eq!(own.get("fetch.max.bytes"), Some("52428800"));
    }

    #[test]
    fn decode_batches_shrink_with_the_partitions_held() {
        assert_eq!(decode_batch_rows(0), 1024);
        assert_eq!(decode_batch_rows(1), 1024);
        assert_eq!(decode_batch_rows(48), 1024);
        assert_eq!(decode_batch_rows(64), 768);
        assert_eq!(decode_batch_rows(120), 409);
        assert_eq!(decode_batch_rows(1000), 256);
    }
}
