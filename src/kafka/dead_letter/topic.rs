//! Every sink's dead-letter topic exists before the first record is read: a missing one is
//! created at start-up, as Kafka Connect does, with `dead_letter_partitions` and
//! `dead_letter_replication_factor` (default: the broker's `num.partitions` and
//! `default.replication.factor`). Without it the first poison record would stop the sink.
//!
//! Invariants: an existing topic is never changed (its partition count is where each source
//! partition's dead letters go); a topic another member created meanwhile counts as created;
//! a principal that may not describe or create it stops the start with the ACL to grant; a
//! broker that does not answer only warns (the first dead letter tries again, and says why).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode as Code;
use tracing::{info, warn};

use crate::config::{ErrorPolicy, ValidatedConfig};
use crate::error::Error;
use crate::kafka::auth::{AuthContext, KafkaAuth};

const TIMEOUT: Duration = Duration::from_secs(15);

/// What a sink wants of its dead-letter topic if it must be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wanted {
    partitions: Option<i32>,
    replication_factor: Option<i32>,
}

/// Creates the dead-letter topics of `cfg`'s sinks that do not exist yet; with `validate_only`
/// (`lakesink check`) only asks the broker whether it would. Returns one line per topic saying
/// what was found or done.
pub async fn ensure_topics(
    cfg: &ValidatedConfig,
    validate_only: bool,
) -> Result<Vec<String>, Error> {
    let mut wanted: BTreeMap<String, (Wanted, String)> = BTreeMap::new();
    for s in &cfg.sinks {
        let (Some(topic), ErrorPolicy::DeadLetter) = (&s.dead_letter_topic, s.errors) else {
            continue;
        };
        let w = Wanted {
            partitions: s.dead_letter_partitions,
            replication_factor: s.dead_letter_replication_factor,
        };
        match wanted.get(topic) {
            Some((other, by)) if *other != w => {
                return Err(Error::DeadLetters(format!(
                    "sinks `{by}` and `{}` share the dead-letter topic `{topic}` with different \
                     dead_letter_partitions or dead_letter_replication_factor; give both the \
                     same values",
                    s.name
                )))
            }
            Some(_) => {}
            None => {
                wanted.insert(topic.clone(), (w, s.name.clone()));
            }
        }
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let client = super::client_config(cfg);
    let auth = KafkaAuth::from_config(cfg);
    let topics: Vec<String> = wanted.keys().cloned().collect();
    let (c, a) = (client.clone(), auth.clone());
    let found = tokio::task::spawn_blocking(move || partitions_of(c, a, &topics))
        .await
        .map_err(|e| Error::DeadLetters(format!("the dead-letter topic check panicked: {e}")))?;
    let found = match found {
        Ok(f) => f,
        Err(e) if validate_only => {
            return Err(Error::DeadLetters(format!(
                "cannot read the broker's metadata to check the dead-letter topics: {e}"
            )))
        }
        Err(e) => {
            warn!(
                "cannot read the broker's metadata to check the dead-letter topics ({e}); \
                 a missing one is reported when the first dead letter is written"
            );
            return Ok(Vec::new());
        }
    };
    let admin: AdminClient<AuthContext> = client
        .create_with_context(AuthContext(auth))
        .map_err(|e| Error::DeadLetters(format!("cannot create a Kafka admin client: {e}")))?;
    let mut report = Vec::new();
    for (topic, (w, sink)) in wanted {
        match found.get(&topic) {
            Some(Ok(n)) => {
                info!(%topic, partitions = n, "dead-letter topic found");
                report.push(format!("dead-letter topic `{topic}`: {n} partitions"));
            }
            Some(Err(Code::TopicAuthorizationFailed)) => {
                return Err(Error::DeadLetters(format!(
                    "sink `{sink}`: the principal may not describe the dead-letter topic \
                     `{topic}`; grant it `Describe` and `Write` on topic `{topic}` (and \
                     `Create`, for lakesink to create it)"
                )))
            }
            _ => report.push(create(&admin, &topic, w, &sink, validate_only).await?),
        }
    }
    Ok(report)
}

/// The partition count of each topic, or the broker's error for it (unknown, not authorized).
fn partitions_of(
    client: rdkafka::ClientConfig,
    auth: KafkaAuth,
    topics: &[String],
) -> Result<BTreeMap<String, Result<usize, Code>>, KafkaError> {
    let consumer: BaseConsumer<AuthContext> = client
        .clone()
        .set("allow.auto.create.topics", "false")
        .create_with_context(AuthContext(auth))?;
    let mut out = BTreeMap::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
        let r = match md.topics().first() {
            Some(t) => match t.error() {
                Some(e) => Err(Code::from(e)),
                None if t.partitions().is_empty() => Err(Code::UnknownTopicOrPartition),
                None => Ok(t.partitions().len()),
            },
            None => Err(Code::UnknownTopicOrPartition),
        };
        out.insert(topic.clone(), r);
    }
    Ok(out)
}

async fn create(
    admin: &AdminClient<AuthContext>,
    topic: &str,
    w: Wanted,
    sink: &str,
    validate_only: bool,
) -> Result<String, Error> {
    let partitions = w.partitions.unwrap_or(-1);
    let replication = w.replication_factor.unwrap_or(-1);
    let shown = |v: i32| {
        if v < 0 {
            "the broker's default".to_string()
        } else {
            v.to_string()
        }
    };
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    let opts = AdminOptions::new()
        .request_timeout(Some(TIMEOUT))
        .operation_timeout(Some(TIMEOUT))
        .validate_only(validate_only);
    let done = format!(
        "dead-letter topic `{topic}`: {} (partitions: {}, replication factor: {})",
        if validate_only {
            "missing; lakesink creates it at start-up"
        } else {
            "created"
        },
        shown(partitions),
        shown(replication)
    );
    let result = admin.create_topics([&new], &opts).await;
    let code = match result {
        Ok(mut r) => match r.pop() {
            Some(Ok(_)) if validate_only => return Ok(done),
            Some(Ok(_)) => {
                info!(
                    %topic,
                    sink,
                    partitions = %shown(partitions),
                    replication_factor = %shown(replication),
                    "created the dead-letter topic"
                );
                return Ok(done);
            }
            Some(Err((_, code))) => code,
            None => Code::Unknown,
        },
        Err(e) if validate_only => {
            return Err(Error::DeadLetters(format!(
                "cannot ask the broker about creating the dead-letter topic `{topic}`: {e}"
            )))
        }
        Err(e) => {
            let why = format!(
                "cannot create the dead-letter topic `{topic}` ({e}); a missing one is reported \
                 when the first dead letter is written"
            );
            warn!(%topic, sink, "{why}");
            return Ok(why);
        }
    };
    match code {
        // Another member (or an operator) created it meanwhile.
        Code::TopicAlreadyExists => Ok(format!("dead-letter topic `{topic}`: exists")),
        Code::TopicAuthorizationFailed | Code::ClusterAuthorizationFailed => {
            Err(Error::DeadLetters(format!(
                "sink `{sink}`: the dead-letter topic `{topic}` does not exist and the principal \
                 may not create it; grant it `Create` on topic `{topic}` (or on the cluster), or \
                 create the topic yourself (any number of partitions) and grant `Describe` and \
                 `Write` on it"
            )))
        }
        Code::InvalidReplicationFactor | Code::InvalidPartitions | Code::PolicyViolation => {
            Err(Error::DeadLetters(format!(
                "sink `{sink}`: the broker refused to create the dead-letter topic `{topic}` \
                 with {} partitions and replication factor {}: {code}; set \
                 dead_letter_partitions / dead_letter_replication_factor to values the cluster \
                 accepts, or create the topic yourself",
                shown(partitions),
                shown(replication)
            )))
        }
        other => Err(Error::DeadLetters(format!(
            "sink `{sink}`: cannot create the dead-letter topic `{topic}`: {other}; create it \
             yourself (any number of partitions)"
        ))),
    }
}
