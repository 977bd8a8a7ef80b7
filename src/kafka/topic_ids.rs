//! Kafka topic ids (KIP-516): the identity of a topic beyond its name.
//!
//! A topic deleted and created again under the same name gets a new id, and offsets that have
//! nothing to do with the old ones. Every table records the id of the topic its positions count
//! offsets of ([`sinks::AnySink::adopt_topic_id`], before the first commit of that topic), and
//! recovery compares it with the broker's: a different id stops the partition instead of
//! resuming the new topic at the old topic's position (which would skip its first records, or
//! read them as if they followed the old ones).
//!
//! The ids come from librdkafka's DescribeTopics (a Metadata request, Kafka 2.8 and later),
//! which rust-rdkafka does not wrap: this module is the one audited use of its C API.
//! A broker without topic ids (older Kafka, some Kafka-compatible services) answers with the
//! all-zero id or an unsupported-feature error: then there is no id to record or compare, and
//! only the log-end check of [`super::positions`] recognises a recreated topic.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaRespErr;
use sinks::{TopicIdentity, TopicPartition};
use tracing::{debug, info, warn};

use super::Router;
use crate::error::Error;
use crate::pipeline::retry::{retry, Attempts, Policy};
use crate::pipeline::supervisor::Failure;

/// How long DescribeTopics may take per attempt.
pub(super) const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of DescribeTopics before the partitions are read without the check.
const DESCRIBE: Policy = Policy {
    retries: 2,
    first: Duration::from_secs(1),
    max: Duration::from_secs(2),
    jitter: false,
};
/// Tables asked at once.
const ADOPTIONS_AT_ONCE: usize = 32;

/// The check's verdict per (sink index, topic) whose table disagrees or cannot answer; a pair
/// not in it may go on.
pub(super) type Verdicts = HashMap<(usize, String), Failure>;

impl Router {
    /// Reads the broker's id of every topic in `jobs` and has each sink's table adopt it
    /// ([`AnySink::adopt_topic_id`]): recorded when the table has none, compared when it has one.
    /// Pairs verified before against the same id are not asked again.
    pub(super) fn check_topic_ids(
        &mut self,
        jobs: &[(TopicPartition, usize)],
        deadline: tokio::time::Instant,
    ) -> Verdicts {
        use futures::StreamExt;
        let mut topics: Vec<String> = jobs.iter().map(|(tp, _)| tp.topic.to_string()).collect();
        topics.sort_unstable();
        topics.dedup();
        if topics.is_empty() || !self.options.topic_ids {
            return Verdicts::new();
        }
        let mut attempts = Attempts::new(DESCRIBE);
        let issued = std::time::Instant::now();
        let ids = loop {
            match self.sup.identities().describe(&topics) {
                Ok(ids) => break ids,
                Err(e) if attempts.left() => {
                    debug!("reading topic ids (attempt {}): {e}", attempts.made());
                    attempts.wait_blocking();
                }
                Err(e) => {
                    // Not a reason to stop reading: without ids, a recreated topic is still
                    // recognised when its log ends before the table's position.
                    warn!(
                        ?topics,
                        "cannot read the topics' ids to check them against the \
                           tables ({e}); these partitions are read without that check"
                    );
                    return Verdicts::new();
                }
            }
        };
        if ids.is_empty() {
            debug!(
                ?topics,
                "the broker reports no topic ids: nothing to record or compare"
            );
        }
        for (topic, id) in &ids {
            self.sup.identities().expect(topic, id, issued);
        }
        let mut asks = Vec::new();
        for (tp, i) in jobs {
            let sink = &self.sup.sinks()[*i].sink;
            let key = (*i, tp.topic.to_string());
            let Some(id) = ids.get(&*tp.topic) else {
                continue;
            };
            if self.topic_ids.get(&key) == Some(id) || asks.iter().any(|(k, _, _)| *k == key) {
                continue;
            }
            asks.push((key, sink.clone(), id.clone()));
        }
        let answers: Vec<_> = self.rt.block_on(
            futures::stream::iter(asks)
                .map(|(key, sink, id)| async move {
                    let r = tokio::time::timeout_at(
                        deadline,
                        retry(
                            Policy::RECOVERY,
                            || sink.adopt_topic_id(&key.1, &id),
                            sinks::Error::is_retryable,
                            |_, _| {},
                        ),
                    )
                    .await
                    .map(|r| r.map_err(|e| e.error));
                    (key, id, r)
                })
                .buffer_unordered(ADOPTIONS_AT_ONCE)
                .collect(),
        );
        let mut verdicts = Verdicts::new();
        for (key, id, answer) in answers {
            let sink = &self.sup.sinks()[key.0].config.name;
            match answer {
                Err(_) => {
                    verdicts.insert(key, Failure::Unready("no answer in time".into()));
                }
                Ok(Ok(TopicIdentity::Recorded)) => {
                    info!(sink = %sink, topic = %key.1, topic_id = %id,
                          "recorded the topic's id in the table: its positions count this topic's offsets");
                    self.topic_ids.insert(key, id);
                }
                Ok(Ok(TopicIdentity::Same)) => {
                    self.topic_ids.insert(key, id);
                }
                Ok(Ok(TopicIdentity::Other(recorded))) => {
                    self.topic_ids.remove(&key);
                    verdicts.insert(
                        key,
                        Failure::Recreated {
                            recorded,
                            current: id,
                        },
                    );
                }
                Ok(Err(e)) => {
                    verdicts.insert(key, Failure::Sink(Arc::new(e)));
                }
            }
        }
        verdicts
    }
}

/// The all-zero id: "this broker has no topic ids".
const ZERO_ID: &str = "AAAAAAAAAAAAAAAAAAAAAA";

/// Each topic's id (base64, as Kafka's tools print it), for the topics that exist and have one.
/// `Ok(empty)` when the broker has no topic ids at all.
pub(super) fn describe<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topics: &[&str],
    timeout: Duration,
) -> Result<HashMap<String, String>, Error> {
    if topics.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<CString> = topics
        .iter()
        .map(|t| {
            CString::new(*t).map_err(|_| {
                Error::kafka(
                    "DescribeTopics",
                    format!("topic name {t:?} contains a NUL byte"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let mut ptrs: Vec<*const std::os::raw::c_char> = names.iter().map(|c| c.as_ptr()).collect();
    let rk = consumer.client().native_ptr();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: every pointer handed to librdkafka is valid for the call (the names outlive the
    // collection, which copies them); every object created here is destroyed on every path
    // below; strings librdkafka returns are copied before the event that owns them is destroyed.
    #[allow(unsafe_code)]
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let collection = rd::rd_kafka_TopicCollection_of_topic_names(ptrs.as_mut_ptr(), ptrs.len());
        rd::rd_kafka_DescribeTopics(rk, collection, options, queue);
        // The request times out on its own; the extra second lets its result arrive.
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1000));
        let result = read_result(event);
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_TopicCollection_destroy(collection);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_queue_destroy(queue);
        result
    }
}

/// Reads a DescribeTopics result event (not destroyed here).
#[allow(unsafe_code)]
unsafe fn read_result(event: *mut rd::rd_kafka_event_t) -> Result<HashMap<String, String>, Error> {
    if event.is_null() {
        return Err(Error::kafka("DescribeTopics", "no answer in time"));
    }
    let code = rd::rd_kafka_event_error(event);
    if code == RDKafkaRespErr::RD_KAFKA_RESP_ERR__UNSUPPORTED_FEATURE {
        return Ok(HashMap::new());
    }
    if code != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        let why = rd::rd_kafka_event_error_string(event);
        let why = if why.is_null() {
            format!("{code:?}")
        } else {
            CStr::from_ptr(why).to_string_lossy().into_owned()
        };
        return Err(Error::kafka("DescribeTopics failed", why));
    }
    let result = rd::rd_kafka_event_DescribeTopics_result(event);
    if result.is_null() {
        return Err(Error::kafka(
            "DescribeTopics",
            "answered with another event",
        ));
    }
    let mut count = 0usize;
    let descriptions = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
    let mut ids = HashMap::new();
    for i in 0..count {
        let d = *descriptions.add(i);
        let error = rd::rd_kafka_TopicDescription_error(d);
        if !error.is_null()
            && rd::rd_kafka_error_code(error) != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            // A topic that does not exist (yet, or any more) has no id to compare.
            continue;
        }
        let name = CStr::from_ptr(rd::rd_kafka_TopicDescription_name(d))
            .to_string_lossy()
            .into_owned();
        let uuid = rd::rd_kafka_TopicDescription_topic_id(d);
        if uuid.is_null() {
            continue;
        }
        let id = CStr::from_ptr(rd::rd_kafka_Uuid_base64str(uuid))
            .to_string_lossy()
            .into_owned();
        if id != ZERO_ID && !id.is_empty() {
            ids.insert(name, id);
        }
    }
    Ok(ids)
}
