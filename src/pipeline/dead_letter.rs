//! The dead-letter topic: records a sink cannot decode, with their original key, value and
//! headers, plus headers that name the error.
//!
//! Headers added: `lakesink.error.class`, `lakesink.error.message`, `lakesink.sink`,
//! `lakesink.source.topic`, `lakesink.source.partition`, `lakesink.source.offset` and, when the
//! framing could be read, `lakesink.schema.id`.
//!
//! Invariant: a dead letter is acknowledged by the broker (idempotent producer, `acks=all`)
//! before the commit that covers its offset, so it is never lost. After a crash between the two,
//! the range is read again and the record dead-lettered again: consumers of the dead-letter
//! topic deduplicate on (`lakesink.source.topic`, `.partition`, `.offset`).

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sinks::TopicPartition;

use crate::config::ValidatedConfig;
use crate::decode::{DecodeError, Record};

/// A producer to one dead-letter topic.
pub struct DeadLetters {
    producer: FutureProducer<crate::auth::AuthContext>,
    pub topic: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .finish()
    }
}

impl DeadLetters {
    pub fn new(cfg: &ValidatedConfig, topic: &str) -> Result<Self, String> {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &cfg.bootstrap_servers);
        for (k, v) in &cfg.kafka_properties {
            // Consumer-only settings would make the producer warn; pass the rest (security).
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
            c.set(k, v.expose());
        }
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "60000");
        let producer = c
            .create_with_context(crate::auth::AuthContext(
                crate::auth::KafkaAuth::from_config(cfg),
            ))
            .map_err(|e| format!("cannot create the dead-letter producer: {e}"))?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Sends `rec` with error headers; returns once the broker acknowledged it.
    pub async fn send(
        &self,
        sink: &str,
        tp: &TopicPartition,
        rec: &Record,
        err: &DecodeError,
    ) -> Result<(), String> {
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len() + 7);
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let partition = tp.partition.to_string();
        let offset = rec.offset.to_string();
        let schema_id = err.schema_id.map(|i| i.to_string());
        let mut add = |k: &str, v: &str| {
            headers = std::mem::replace(&mut headers, OwnedHeaders::new()).insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        };
        add("lakesink.error.class", err.class);
        add("lakesink.error.message", &err.reason);
        add("lakesink.sink", sink);
        add("lakesink.source.topic", &tp.topic);
        add("lakesink.source.partition", &partition);
        add("lakesink.source.offset", &offset);
        if let Some(id) = &schema_id {
            add("lakesink.schema.id", id);
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = rec.key.as_deref() {
            record = record.key(k);
        }
        if let Some(p) = rec.payload.as_deref() {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(60))
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                format!(
                    "cannot write to the dead-letter topic `{}`: {e}",
                    self.topic
                )
            })
    }
}
