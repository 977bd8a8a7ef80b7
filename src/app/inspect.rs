//! The inspection commands: `lakesink check` (reaches the broker with the configured login,
//! the registry and every table, naming what failed and the key to fix) and `lakesink status`
//! (per sink and partition: the committed position read from the table, the broker's end
//! offset, the lag, and whether a lagging partition can be read at all). Both only read.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;

use super::{build_sinks, registry_client};
use crate::config::ValidatedConfig;
use crate::kafka;

/// One line of `lakesink check`.
#[derive(Debug)]
pub struct CheckResult {
    pub what: String,
    pub error: Option<String>,
}

/// Reaches the broker, the registry and every table location.
pub async fn check(cfg: &ValidatedConfig) -> Vec<CheckResult> {
    let mut out = Vec::new();
    // Kafka: the configured topics' metadata (authorization included) and the group's offsets.
    let kafka = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || check_kafka(&cfg))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    };
    out.push(match &kafka {
        Ok(s) => CheckResult {
            what: format!("kafka {} ({s})", cfg.bootstrap_servers),
            error: None,
        },
        Err(e) => CheckResult {
            what: format!("kafka {}", cfg.bootstrap_servers),
            error: Some(e.clone()),
        },
    });
    // Dead-letter topics: found, or the broker asked whether lakesink may create them.
    if kafka.is_ok() {
        match crate::kafka::dead_letter::ensure_topics(cfg, true).await {
            Ok(lines) => out.extend(
                lines
                    .into_iter()
                    .map(|what| CheckResult { what, error: None }),
            ),
            Err(e) => out.push(CheckResult {
                what: "dead-letter topics".into(),
                error: Some(e.to_string()),
            }),
        }
    }
    if let Some(r) = &cfg.registry {
        let res = match registry_client(cfg) {
            Ok(c) => c.check().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        out.push(CheckResult {
            what: format!("schema registry {}", r.url),
            error: res.err(),
        });
    }
    match build_sinks(cfg) {
        Ok(sinks) => {
            for s in sinks {
                let res = s.sink.check().await.map_err(|e| e.to_string());
                out.push(CheckResult {
                    what: format!("sink `{}` table {}", s.config.name, s.sink.location()),
                    error: res.err(),
                });
            }
        }
        Err(e) => out.push(CheckResult {
            what: "sinks".into(),
            error: Some(format!("{e:#}")),
        }),
    }
    out
}

/// `check`'s Kafka line: logs in, reads the metadata of every configured topic (a topic the
/// principal may not describe is named with the ACL it needs) and the group's committed offsets
/// (which needs the group ACL). A failed connection names librdkafka's cause (a rejected login,
/// an untrusted certificate) and the key to fix.
fn check_kafka(cfg: &ValidatedConfig) -> Result<String, String> {
    let auth = crate::kafka::auth::KafkaAuth::from_config(cfg);
    let consumer: BaseConsumer<crate::kafka::auth::AuthContext> = one_shot_client(cfg)
        .create_with_context(crate::kafka::auth::AuthContext(auth.clone()))
        .map_err(|e| format!("cannot create a consumer: {e}"))?;
    let cause = |e: rdkafka::error::KafkaError| with_cause(&consumer, &auth, e);
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| format!("cannot fetch metadata: {}", cause(e)))?;
    let brokers = md.brokers().len();
    let mut topics: Vec<String> = md.topics().iter().map(|t| t.name().to_string()).collect();
    let mut problems = Vec::new();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for s in &cfg.sinks {
        if let crate::config::TopicSelector::Names(names) = &s.topics {
            for n in names {
                if topics.contains(n) {
                    tpl.add_partition(n, 0);
                    continue;
                }
                // Not listed: absent, or hidden from this principal. Ask for it by name.
                let one = consumer
                    .fetch_metadata(Some(n), Duration::from_secs(10))
                    .map_err(|e| format!("cannot fetch metadata of topic `{n}`: {}", cause(e)))?;
                let found = one.topics().first();
                let denied = found.and_then(|t| t.error())
                    == Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED);
                match found {
                    _ if denied => problems.push(format!(
                        "topic `{n}` (sink `{}`): not authorized; the principal needs Describe \
                         and Read on it (and Write on the dead-letter topic)",
                        s.name
                    )),
                    Some(t) if t.error().is_some() || t.partitions().is_empty() => {
                        problems.push(format!("topic `{n}` (sink `{}`) not found", s.name))
                    }
                    None => problems.push(format!("topic `{n}` (sink `{}`) not found", s.name)),
                    _ => {
                        topics.push(n.clone());
                        tpl.add_partition(n, 0);
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if tpl.count() > 0 {
        // A group's coordinator can be moving or loading (a new cluster creates its offsets
        // topic on the first request): those answers are retried for a while.
        use rdkafka::types::RDKafkaErrorCode::{
            CoordinatorLoadInProgress, CoordinatorNotAvailable, NotCoordinator,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut res = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10));
        while let Err(e) = &res {
            let transient = matches!(
                e.rdkafka_error_code(),
                Some(NotCoordinator | CoordinatorLoadInProgress | CoordinatorNotAvailable)
            );
            if !transient || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            res = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10));
        }
        if let Err(e) = res {
            let e = cause(e);
            return Err(if e.contains("uthoriz") {
                format!(
                    "group `{}`: not authorized; the principal needs Read on the consumer group ({e})",
                    cfg.group_id
                )
            } else {
                format!(
                    "cannot read the committed offsets of group `{}`: {e}",
                    cfg.group_id
                )
            });
        }
    }
    Ok(format!("{brokers} brokers, {} topics", topics.len()))
}

/// One line of `lakesink status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    pub sink: String,
    pub topic: String,
    pub partition: i32,
    /// The next offset the sink will read (from the table's commit record), if any commit.
    pub committed: Option<i64>,
    /// The broker's end offset (high watermark).
    pub end: i64,
    pub lag: i64,
    /// When the last commit was written (RFC 3339, UTC), where the table records it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_commit: Option<String>,
    /// Where the topic's rows land (its own table, for a sink with a table per topic).
    pub table: String,
    /// Why a member would not consume this partition for this sink (its position cannot be
    /// read, or is beyond the end of the log), as `/readyz` would say once it is assigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    /// A partition with lag whose next record could not be fetched: why (see [`probe_reads`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// The broker's topics (a metadata request), for commands that find a templated sink's tables.
pub(super) async fn broker_topics(cfg: &ValidatedConfig) -> anyhow::Result<Vec<String>> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let auth = crate::kafka::auth::KafkaAuth::from_config(&cfg);
        let consumer: BaseConsumer<crate::kafka::auth::AuthContext> = one_shot_client(&cfg)
            .create_with_context(crate::kafka::auth::AuthContext(auth.clone()))
            .context("cannot create a Kafka client")?;
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot fetch the broker's metadata: {}",
                    with_cause(&consumer, &auth, e)
                )
            })?;
        let mut topics: Vec<String> = md.topics().iter().map(|t| t.name().to_string()).collect();
        topics.sort();
        Ok(topics)
    })
    .await?
}

/// Per sink and partition: the committed position read from the destination, the broker's end
/// offset and the lag between them.
pub async fn status(cfg: &ValidatedConfig) -> anyhow::Result<Vec<PartitionStatus>> {
    let sinks = build_sinks(cfg)?;
    let kafka_cfg = cfg.clone();
    let partitions =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, i32, i64, i64)>> {
            let auth = crate::kafka::auth::KafkaAuth::from_config(&kafka_cfg);
            let consumer: BaseConsumer<crate::kafka::auth::AuthContext> =
                one_shot_client(&kafka_cfg)
                    .create_with_context(crate::kafka::auth::AuthContext(auth.clone()))
                    .context("cannot create a Kafka client")?;
            let md = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot fetch the broker's metadata: {}",
                        with_cause(&consumer, &auth, e)
                    )
                })?;
            let mut out = Vec::new();
            for t in md.topics() {
                if !kafka_cfg.sinks.iter().any(|s| s.topics.matches(t.name())) {
                    continue;
                }
                for p in t.partitions() {
                    let (low, high) = consumer
                        .fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))
                        .with_context(|| {
                            format!("cannot read the offsets of {}/{}", t.name(), p.id())
                        })?;
                    out.push((t.name().to_string(), p.id(), low, high));
                }
            }
            Ok(out)
        })
        .await??;
    let mut out = Vec::new();
    for s in &sinks {
        for (topic, partition, low, high) in &partitions {
            if !s.config.topics.matches(topic) {
                continue;
            }
            let tp = sinks::TopicPartition::new(topic.as_str(), *partition);
            let (last, quarantined) = match s.sink.last_commit(&tp).await {
                Ok(l) => (l, None),
                Err(e) => (
                    None,
                    Some(format!(
                        "sink `{}` cannot read its position for {tp} from {}: {e}",
                        s.config.name,
                        s.sink.table_of(topic)
                    )),
                ),
            };
            let committed = last.map(|l| l.next.0);
            let quarantined = quarantined.or_else(|| {
                committed
                    .filter(|c| c > high)
                    .map(|c| crate::kafka::positions::beyond_end(&tp, c, *high))
            });
            out.push(PartitionStatus {
                sink: s.config.name.clone(),
                topic: topic.clone(),
                partition: *partition,
                committed,
                end: *high,
                lag: (high - committed.unwrap_or(*low)).max(0),
                last_commit: last.and_then(|l| l.at_ms).and_then(|ms| {
                    chrono::DateTime::from_timestamp_millis(ms)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                }),
                table: s.sink.table_of(topic),
                quarantined,
                unreadable: None,
            });
        }
    }
    // Partitions with lag: can their next record be fetched at all?
    let lagging: Vec<(String, i32, i64)> = out
        .iter()
        .filter(|r| r.lag > 0 && r.quarantined.is_none())
        .map(|r| (r.topic.clone(), r.partition, r.end - r.lag))
        .collect();
    if !lagging.is_empty() {
        let probe_cfg = cfg.clone();
        let unreadable =
            tokio::task::spawn_blocking(move || probe_reads(&probe_cfg, &lagging)).await?;
        for r in &mut out {
            r.unreadable = unreadable.get(&(r.topic.clone(), r.partition)).cloned();
        }
    }
    out.sort_by(|a, b| (&a.sink, &a.topic, a.partition).cmp(&(&b.sink, &b.topic, b.partition)));
    Ok(out)
}

/// How long `status` waits for the first record of each lagging partition.
const PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// Fetches from each `(topic, partition, offset)` without joining the group: the partitions no
/// record arrived from within [`PROBE_TIMEOUT`], with the consumer's last error (a partition
/// the principal may not read, a batch this build cannot decompress).
fn probe_reads(
    cfg: &ValidatedConfig,
    parts: &[(String, i32, i64)],
) -> BTreeMap<(String, i32), String> {
    let auth = crate::kafka::auth::KafkaAuth::from_config(cfg);
    let mut client = one_shot_client(cfg);
    client
        .set(
            "group.id",
            format!("lakesink-status-probe.{}", cfg.group_id),
        )
        .set("enable.auto.commit", "false");
    let mut missing: BTreeMap<(String, i32), String> = parts
        .iter()
        .map(|(t, p, o)| {
            (
                (t.clone(), *p),
                format!("no record could be read from offset {o} within {PROBE_TIMEOUT:?}"),
            )
        })
        .collect();
    let consumer: BaseConsumer<crate::kafka::auth::AuthContext> =
        match client.create_with_context(crate::kafka::auth::AuthContext(auth.clone())) {
            Ok(c) => c,
            Err(e) => {
                for v in missing.values_mut() {
                    *v = format!("cannot create a Kafka client to probe it: {e}");
                }
                return missing;
            }
        };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (t, p, o) in parts {
        let _ = tpl.add_partition_offset(t, *p, rdkafka::Offset::Offset(*o));
    }
    if let Err(e) = consumer.assign(&tpl) {
        for v in missing.values_mut() {
            *v = format!("cannot assign it to probe it: {e}");
        }
        return missing;
    }
    let mut last_error: Option<String> = None;
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                missing.remove(&(m.topic().to_string(), m.partition()));
            }
            Some(Err(e)) => last_error = Some(e.to_string()),
            None => {}
        }
    }
    let cause = auth.explain_last_error().or(last_error);
    for v in missing.values_mut() {
        if let Some(c) = &cause {
            v.push_str(&format!(" (last consumer error: {c})"));
        }
    }
    missing
}

/// The consumer settings for a one-shot command's client: the service's, without the
/// statistics it asks for every 5 s (for the lag metric).
fn one_shot_client(cfg: &ValidatedConfig) -> rdkafka::ClientConfig {
    let mut c = kafka::client_config(cfg);
    c.remove("statistics.interval.ms");
    c
}

/// `e` with the cause of a failed request of `consumer` (a rejected login, a failed TLS
/// handshake) and what to do about it. librdkafka queues its log lines (rust-rdkafka sets
/// `log.queue`) and the cause is one of them: the queue is served a moment for it.
fn with_cause(
    consumer: &BaseConsumer<crate::kafka::auth::AuthContext>,
    auth: &crate::kafka::auth::KafkaAuth,
    e: rdkafka::error::KafkaError,
) -> String {
    let mut c = auth.explain_last_error();
    for _ in 0..20 {
        if c.is_some() {
            break;
        }
        let _ = consumer.poll(Duration::from_millis(100));
        c = auth.explain_last_error();
    }
    match c {
        Some(c) => format!("{e}: {c}"),
        None => e.to_string(),
    }
}
