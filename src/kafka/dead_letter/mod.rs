//! The dead-letter topic: records a sink cannot decode, with their original key, value and
//! headers, plus headers that name the error.
//!
//! Headers added: `lakesink.error.class`, `lakesink.error.message`, `lakesink.group`,
//! `lakesink.sink`, `lakesink.source.topic`, `lakesink.source.partition`,
//! `lakesink.source.offset` and, when the framing could be read, `lakesink.schema.id`.
//!
//! # Exactly once (the default, `dead_letter_exactly_once = true`)
//! A worker collects its rejected records and writes them in one Kafka transaction just before
//! the table commit that covers them. Every (sink, source partition) has its own
//! `transactional.id` and its own dead-letter partition (a stable hash of sink, topic and
//! partition modulo the topic's partition count), so:
//! - opening a session (`init_transactions`) fences every earlier writer of that source
//!   partition, a zombie included: from then on, none of them can commit a dead letter, and
//!   their open transaction is resolved;
//! - the session then reads the tail of its dead-letter partition for the highest source offset
//!   already dead-lettered, `last`. It reads read_committed up to the log end offset taken after
//!   the fence, waiting for any transaction open below it to end: the last stable offset, where
//!   a read_committed reader stops, can sit below our own committed dead letters while another
//!   writer's transaction is open, and stopping there would write them again. Dead letters of one source partition
//!   are written in offset order and only above `last`, so the last one found is the highest;
//! - a rejected record at or below `last` is skipped: an earlier owner wrote it and crashed (or
//!   was fenced) before its table commit.
//!
//! The tail read is `read_committed`: the records of an aborted transaction (a writer killed
//! mid-transaction, a worker aborted by a drain timeout, a session dropped after an error) are
//! never counted as written, so they are written again. A session that fails other than by a
//! fence aborts its transaction explicitly before it is dropped, and a worker that stops before
//! its session finished opening cancels the opening (it never fences a later owner's session).
//!
//! Any error drops the session; the retry opens a new one, which reads `last` again. Except a
//! fence: a newer owner of the source partition opened its own session, and a new one here
//! would fence it in turn (the two would take turns failing). The worker then drops its buffer
//! and reads again from the table's committed position (`worker::yield_dead_letters`). Invariant:
//! every dead letter is committed before the table commit covering its offset (never lost), and
//! no two committed dead letters of a (sink, topic, partition) share a source offset (never
//! duplicated), whatever crashes, rebalances or zombies happen. It needs a broker with
//! transactions and, with ACLs, `Write` on the transactional ids `lakesink-dlq.<group>.*`.
//! Adding partitions to the dead-letter topic moves where a source partition's dead letters go:
//! do it with lakesink stopped and the old partitions drained.
//!
//! # At least once (`dead_letter_exactly_once = false`, brokers without transactions)
//! One idempotent producer (`acks=all`) writes the same records at the same point. After a crash
//! between the two commits, the range is read again and its records dead-lettered again;
//! consumers deduplicate on the `lakesink.source.*` headers.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, TopicPartitionList};
use sinks::TopicPartition;

use crate::config::ValidatedConfig;
use crate::decode::Rejected;
use crate::error::Error;
use crate::kafka::auth::{AuthContext, KafkaAuth};
use crate::pipeline::dead_letters::{DeadLetterTopic, DeadLetterWriter, WriteError, Written};

mod scan;
mod topic;

use scan::open_session;
pub use topic::ensure_topics;

const TIMEOUT: Duration = Duration::from_secs(60);
/// How long the tail read waits for open transactions below the end: longer than the
/// `transaction.timeout.ms` (60 s) after which Kafka aborts a dead writer's transaction.
const SCAN_TIMEOUT: Duration = Duration::from_secs(90);

/// The dead-letter topic of one sink.
#[derive(Clone)]
pub struct DeadLetters {
    pub topic: String,
    /// Client settings shared by every producer and reader (servers, security).
    client: ClientConfig,
    auth: KafkaAuth,
    group: String,
    /// `Some` in at-least-once mode: the one shared producer.
    shared: Option<Arc<FutureProducer<AuthContext>>>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .field("exactly_once", &self.shared.is_none())
            .finish()
    }
}

/// One (sink, source partition)'s transactional writer: its fenced producer, its dead-letter
/// partition, and the highest source offset already there.
pub struct DeadLetterSession {
    producer: Arc<FutureProducer<AuthContext>>,
    partition: i32,
    last: Option<i64>,
}

impl Drop for DeadLetterSession {
    fn drop(&mut self) {
        // Dropping a producer flushes for up to 500 ms: keep that off the async workers.
        let producer = self.producer.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || drop(producer));
        }
    }
}

/// A session being opened in the background; dropping it cancels the opening if it has not
/// fenced yet, so a worker that stopped never fences a later owner's session.
pub struct Opening {
    task: tokio::task::JoinHandle<Result<DeadLetterSession, Error>>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl std::future::Future for Opening {
    type Output = Result<Result<DeadLetterSession, Error>, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.task).poll(cx)
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        self.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The settings every dead-letter client shares (servers, security): the consumer's, less
/// consumer-only ones (a producer would warn about them).
fn client_config(cfg: &ValidatedConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &cfg.bootstrap_servers);
    for (k, v) in &cfg.kafka_properties {
        if k.starts_with("enable.auto")
            || k == "auto.offset.reset"
            || k.starts_with("session.")
            || k.starts_with("heartbeat.")
            || k.starts_with("partition.assignment")
            || k.starts_with("max.poll")
            || k.starts_with("fetch.")
            || k.starts_with("isolation")
            || k.starts_with("group.")
        {
            continue;
        }
        client.set(k, v.expose());
    }
    client
}

impl DeadLetters {
    pub fn new(cfg: &ValidatedConfig, topic: &str, exactly_once: bool) -> Result<Self, Error> {
        let client = client_config(cfg);
        let auth = KafkaAuth::from_config(cfg);
        let shared = if exactly_once {
            None
        } else {
            let mut c = client.clone();
            c.set("enable.idempotence", "true")
                .set("acks", "all")
                .set("message.timeout.ms", "60000");
            Some(Arc::new(
                c.create_with_context(AuthContext(auth.clone()))
                    .map_err(|e| {
                        Error::DeadLetters(format!("cannot create the dead-letter producer: {e}"))
                    })?,
            ))
        };
        Ok(Self {
            topic: topic.to_string(),
            client,
            auth,
            group: cfg.group_id.clone(),
            shared,
        })
    }

    /// Writes `pending` (in offset order, all of `tp`) before the table commit that covers them.
    /// In exactly-once mode `session` is opened when `None`, and must be dropped (set to `None`)
    /// by the caller after an error.
    pub async fn write(
        &self,
        session: &mut Option<DeadLetterSession>,
        sink: &str,
        tp: &TopicPartition,
        pending: &[Rejected],
    ) -> Result<Written, WriteError> {
        let Some(shared) = &self.shared else {
            return self.write_exactly_once(session, sink, tp, pending).await;
        };
        let sends: Vec<_> = pending
            .iter()
            .map(|r| shared.send(self.record(sink, tp, r, None), TIMEOUT))
            .collect();
        let mut deliveries = Vec::with_capacity(sends.len());
        for (s, r) in sends.into_iter().zip(pending) {
            let d = s.await.map_err(|(e, _)| WriteError::from(self.failed(e)))?;
            deliveries.push((r.record.offset, d.partition, d.offset));
        }
        Ok(Written {
            sent: pending.len(),
            already: 0,
            deliveries,
        })
    }

    /// Opens `tp`'s session in the background: fences the partition's earlier writers at once
    /// (resolving a transaction a killed member left open, which would otherwise hold back
    /// every read_committed reader of its dead-letter partition), then reads `last`.
    pub fn open(&self, sink: &str, tp: &TopicPartition) -> Opening {
        let (client, auth) = (self.client.clone(), self.auth.clone());
        let (topic, group, sink, tp) = (
            self.topic.clone(),
            self.group.clone(),
            sink.to_string(),
            tp.clone(),
        );
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cancelled = cancel.clone();
        let task = tokio::task::spawn_blocking(move || {
            let opened = open_session(client, auth, &topic, &group, &sink, &tp, &cancelled);
            if let Err(e) = &opened {
                if !cancelled.load(std::sync::atomic::Ordering::SeqCst) {
                    // Said now, not only when the partition's first dead letter comes.
                    tracing::warn!(sink, %tp, "{e}; it is opened again for the first dead letter");
                }
            }
            opened
        });
        Opening { task, cancel }
    }

    /// Whether dead letters are written in fenced transactions.
    pub fn exactly_once(&self) -> bool {
        self.shared.is_none()
    }

    async fn write_exactly_once(
        &self,
        session: &mut Option<DeadLetterSession>,
        sink: &str,
        tp: &TopicPartition,
        pending: &[Rejected],
    ) -> Result<Written, WriteError> {
        if session.is_none() {
            let opened = self
                .open(sink, tp)
                .await
                .map_err(|e| format!("internal: {e}"))??;
            *session = Some(opened);
        }
        let s = session.as_mut().expect("opened above");
        // In source-offset order (the caller sorts): the scan of the next session relies on
        // the last dead letter of a partition being its highest.
        let todo: Vec<&Rejected> = pending
            .iter()
            .filter(|r| s.last.is_none_or(|last| r.record.offset > last))
            .collect();
        let already = pending.len() - todo.len();
        if todo.is_empty() {
            return Ok(Written {
                already,
                ..Written::default()
            });
        }
        let p = s.producer.clone();
        blocking(move || p.begin_transaction())
            .await
            .map_err(|e| self.failed_in(s, e))?;
        let sent = async {
            let sends: Vec<_> = todo
                .iter()
                .map(|r| {
                    s.producer
                        .send(self.record(sink, tp, r, Some(s.partition)), TIMEOUT)
                })
                .collect();
            let mut deliveries = Vec::with_capacity(sends.len());
            for (send, r) in sends.into_iter().zip(&todo) {
                let d = send.await.map_err(|(e, _)| self.failed_in(s, e))?;
                deliveries.push((r.record.offset, d.partition, d.offset));
            }
            let p = s.producer.clone();
            blocking(move || p.commit_transaction(TIMEOUT))
                .await
                .map_err(|e| self.failed_in(s, e))?;
            Ok::<_, WriteError>(deliveries)
        }
        .await;
        let deliveries = match sent {
            Ok(d) => d,
            Err(e) => {
                if !e.fenced {
                    // Resolve it now rather than leave it open until the next session's fence
                    // (it would hold back every read_committed reader of the partition).
                    let p = s.producer.clone();
                    if let Err(a) = blocking(move || p.abort_transaction(TIMEOUT)).await {
                        tracing::debug!(%tp, "cannot abort the failed dead-letter transaction: {a}");
                    }
                }
                return Err(e);
            }
        };
        s.last = todo.iter().map(|r| r.record.offset).max().or(s.last);
        Ok(Written {
            sent: todo.len(),
            already,
            deliveries,
        })
    }

    /// A failure of `session`, fenced when its producer is (librdkafka reports a fence as the
    /// producer's fatal error; the failed call itself may only say that its queue was purged).
    fn failed_in(&self, session: &DeadLetterSession, e: KafkaError) -> WriteError {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let is_fence = |c: Code| matches!(c, Code::Fenced | Code::ProducerFenced);
        let fenced = e.rdkafka_error_code().is_some_and(is_fence)
            || session
                .producer
                .client()
                .fatal_error()
                .is_some_and(|(c, _)| is_fence(c));
        WriteError {
            message: self.failed(e),
            fenced,
        }
    }

    fn failed(&self, e: KafkaError) -> String {
        format!(
            "cannot write to the dead-letter topic `{}`: {e}",
            self.topic
        )
    }

    /// The dead letter of `r`: its key, value and headers, plus the error headers.
    fn record<'a>(
        &'a self,
        sink: &str,
        tp: &TopicPartition,
        r: &'a Rejected,
        partition: Option<i32>,
    ) -> FutureRecord<'a, [u8], [u8]> {
        let (rec, err) = (&r.record, &r.error);
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len() + 7);
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let schema_id = err.schema_id.map(|i| i.to_string());
        let fields = [
            ("lakesink.error.class", Some(err.class.to_string())),
            ("lakesink.error.message", Some(err.reason.clone())),
            ("lakesink.group", Some(self.group.clone())),
            ("lakesink.sink", Some(sink.to_string())),
            ("lakesink.source.topic", Some(tp.topic.to_string())),
            ("lakesink.source.partition", Some(tp.partition.to_string())),
            ("lakesink.source.offset", Some(rec.offset.to_string())),
            ("lakesink.schema.id", schema_id),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = rec.key.as_deref() {
            record = record.key(k);
        }
        if let Some(p) = rec.payload.as_deref() {
            record = record.payload(p);
        }
        record
    }
}

impl DeadLetterTopic for DeadLetters {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn writer(&self, sink: &str, tp: &TopicPartition) -> Box<dyn DeadLetterWriter> {
        Box::new(PartitionWriter {
            opening: self.exactly_once().then(|| self.open(sink, tp)),
            topic: self.clone(),
            sink: sink.to_string(),
            tp: tp.clone(),
            session: None,
        })
    }
}

/// The dead-letter writer of one (sink, source partition): its session, opened when the
/// writer is made (exactly once) and dropped after any error, so the next write opens a new
/// one, which reads again what is already there.
struct PartitionWriter {
    topic: DeadLetters,
    sink: String,
    tp: TopicPartition,
    session: Option<DeadLetterSession>,
    opening: Option<Opening>,
}

#[async_trait::async_trait]
impl DeadLetterWriter for PartitionWriter {
    async fn write(&mut self, pending: &[Rejected]) -> Result<Written, WriteError> {
        if let Some(opening) = self.opening.take() {
            match opening.await {
                Ok(Ok(s)) => self.session = Some(s),
                // Logged when it failed.
                Ok(Err(e)) => tracing::debug!(sink = %self.sink, tp = %self.tp, "{e}; retrying"),
                Err(e) => tracing::warn!(sink = %self.sink, tp = %self.tp, "internal: {e}"),
            }
        }
        let written = self
            .topic
            .write(&mut self.session, &self.sink, &self.tp, pending)
            .await;
        if written.is_err() {
            self.session = None;
        }
        written
    }
}

async fn blocking<F>(f: F) -> Result<(), KafkaError>
where
    F: FnOnce() -> Result<(), KafkaError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// The `transactional.id` of a (sink, source partition): one writer at a time, fleet-wide.
/// Each part has `%` and `.` escaped (`%25`, `%2E`), so two (group, sink, topic) never share an
/// id (`g.a`/`b` and `g`/`a.b` would, joined plainly); names without them are unchanged.
pub fn transactional_id(group: &str, sink: &str, tp: &TopicPartition) -> String {
    let esc = |s: &str| s.replace('%', "%25").replace('.', "%2E");
    format!(
        "lakesink-dlq.{}.{}.{}.{}",
        esc(group),
        esc(sink),
        esc(&tp.topic),
        tp.partition
    )
}

/// The dead-letter partition of a (sink, source partition): FNV-1a, stable across builds.
pub fn dead_letter_partition(sink: &str, tp: &TopicPartition, partitions: usize) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let key = format!("{sink}\0{}\0{}", tp.topic, tp.partition);
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % partitions.max(1) as u64) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_partition_is_stable_and_in_range() {
        let tp = TopicPartition::new("orders", 3);
        // Pinned: the mapping must not change between releases (the scan relies on it).
        assert_eq!(dead_letter_partition("orders", &tp, 1), 0);
        assert_eq!(dead_letter_partition("orders", &tp, 12), 4);
        assert_eq!(dead_letter_partition("orders", &tp, 7), 0);
        let spread: std::collections::BTreeSet<i32> = (0..48)
            .map(|i| dead_letter_partition("orders", &TopicPartition::new("orders", i), 6))
            .collect();
        assert_eq!(spread.len(), 6, "48 source partitions spread over all 6");
    }

    #[test]
    fn transactional_ids_name_group_sink_and_partition() {
        let tp = TopicPartition::new("orders", 3);
        assert_eq!(
            transactional_id("g1", "lake", &tp),
            "lakesink-dlq.g1.lake.orders.3"
        );
        // Dots in the parts cannot make two pairs share an id.
        let a = transactional_id("g.a", "b", &tp);
        let b = transactional_id("g", "a.b", &tp);
        assert_ne!(a, b);
        assert_eq!(a, "lakesink-dlq.g%2Ea.b.orders.3");
    }
}
