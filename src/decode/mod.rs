//! Decoders: Kafka record values to Arrow, one decoder per source partition: Confluent-framed
//! Avro, JSON (declared columns, registry JSON Schemas, or Connect's envelope) and
//! Confluent-framed Protobuf.
//!
//! A decoder is push-based (like arrow-avro's): [`Record`]s go in one at a time, complete
//! [`RecordBatch`]es come out when its internal batch fills or the writer schema changes, and
//! [`AvroDecoder::finish`] drains what is left. Every output row carries the Kafka metadata
//! columns the sink asked for.
//!
//! Invariant: a record either becomes exactly one row or yields a [`DecodeError`] naming its
//! topic, partition and offset; nothing is skipped silently (null values, i.e. tombstones, are
//! counted and logged by the caller).

mod avro;
pub mod connect_json;
mod connect_schema;
pub mod debezium;
pub mod json;
mod json_fast;
pub mod json_schema;
pub mod key;
mod meta;
mod protobuf;

pub use avro::AvroDecoder;
pub use json::JsonDecoder;
pub use meta::MetaColumns;
pub use protobuf::ProtobufDecoder;

use sinks::TopicPartition;

/// A Kafka record as it enters a decoder.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: i64,
    /// Milliseconds since the epoch, when the broker or producer set one.
    pub timestamp_ms: Option<i64>,
    /// Key and payload are slices of the poll thread's arena (see `kafka`), not owned copies.
    pub key: Option<bytes::Bytes>,
    pub payload: Option<bytes::Bytes>,
    /// Kafka headers, kept for the dead-letter topic.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A record that cannot be decoded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot decode {tp} offset {offset}: {reason}")]
pub struct DecodeError {
    pub tp: TopicPartition,
    pub offset: i64,
    /// A short, stable class for metrics and dead-letter headers: `wire-format`,
    /// `unknown-schema`, `schema-type`, `malformed`, `incompatible-schema`, `registry`.
    pub class: &'static str,
    pub reason: String,
    /// The writer schema id, when the framing could be read.
    pub schema_id: Option<u32>,
    /// Whether retrying can help (registry unreachable), as opposed to bad data.
    pub retryable: bool,
}

impl DecodeError {
    /// Record `offset` of `tp` is bad data (never retryable).
    pub fn bad(
        tp: &TopicPartition,
        offset: i64,
        class: &'static str,
        schema_id: Option<u32>,
        reason: impl Into<String>,
    ) -> DecodeError {
        DecodeError {
            tp: tp.clone(),
            offset,
            class,
            reason: reason.into(),
            schema_id,
            retryable: false,
        }
    }

    /// Schema `id` of record `offset` could not be fetched: `registry` (retryable) when the
    /// registry is unreachable, `unknown-schema` when it has no such schema.
    pub fn unresolved(
        tp: &TopicPartition,
        offset: i64,
        id: schema_registry::SchemaId,
        e: &schema_registry::Error,
    ) -> DecodeError {
        let retryable = e.is_retryable();
        DecodeError {
            tp: tp.clone(),
            offset,
            class: if retryable {
                "registry"
            } else {
                "unknown-schema"
            },
            reason: format!("cannot resolve schema id {id}: {e}"),
            schema_id: Some(id.0),
            retryable,
        }
    }
}

/// A record the decoder gave back, with why.
#[derive(Debug)]
pub struct Rejected {
    pub error: DecodeError,
    pub record: Record,
}

/// The decoder of a sink's format.
#[derive(Debug)]
pub enum FormatDecoder {
    Avro(Box<AvroDecoder>),
    Json(Box<JsonDecoder>),
    /// JSON with JSON Schemas from the registry.
    RegistryJson(Box<json_schema::RegistryJsonDecoder>),
    /// JSON in Kafka Connect's envelope, with the schema each record carries.
    ConnectJson(Box<connect_json::ConnectJsonDecoder>),
    Protobuf(Box<ProtobufDecoder>),
}

impl FormatDecoder {
    /// Resolves what `rec` needs before decoding; `true` when the output schema will change.
    pub async fn prepare(&mut self, rec: &Record) -> Result<bool, DecodeError> {
        match self {
            FormatDecoder::Avro(d) => d.prepare(rec).await,
            FormatDecoder::Json(_) => Ok(false),
            FormatDecoder::RegistryJson(d) => d.prepare(rec).await,
            FormatDecoder::ConnectJson(d) => d.prepare(rec),
            FormatDecoder::Protobuf(d) => d.prepare(rec).await,
        }
    }

    /// Decodes one record into `out`. `Err` is this record, rejected now; records rejected
    /// later (JSON type errors surface per batch) are appended to `rejected`.
    pub async fn push(
        &mut self,
        rec: Record,
        out: &mut Vec<arrow::record_batch::RecordBatch>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), Box<Rejected>> {
        match self {
            FormatDecoder::Avro(d) => d.push(rec, out).await,
            FormatDecoder::Json(d) => {
                d.push(rec, out, rejected);
                Ok(())
            }
            FormatDecoder::RegistryJson(d) => d.push(rec, out, rejected).await,
            FormatDecoder::ConnectJson(d) => d.push(rec, out, rejected),
            FormatDecoder::Protobuf(d) => d.push(rec, out).await,
        }
    }

    /// Emits everything buffered.
    pub fn finish(
        &mut self,
        out: &mut Vec<arrow::record_batch::RecordBatch>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), DecodeError> {
        match self {
            FormatDecoder::Avro(d) => d.finish(out),
            FormatDecoder::Json(d) => {
                d.finish(out, rejected);
                Ok(())
            }
            FormatDecoder::RegistryJson(d) => {
                d.finish(out, rejected);
                Ok(())
            }
            FormatDecoder::ConnectJson(d) => d.finish(out, rejected),
            FormatDecoder::Protobuf(d) => d.finish(out),
        }
    }

    pub fn pending_rows(&self) -> usize {
        match self {
            FormatDecoder::Avro(d) => d.pending_rows(),
            FormatDecoder::Json(d) => d.pending_rows(),
            FormatDecoder::RegistryJson(d) => d.pending_rows(),
            FormatDecoder::ConnectJson(d) => d.pending_rows(),
            FormatDecoder::Protobuf(d) => d.pending_rows(),
        }
    }

    /// The Avro reader schema and its id (Avro formats only).
    pub fn reader_schema(&self) -> Option<(u32, &str)> {
        match self {
            FormatDecoder::Avro(d) => d.reader_schema(),
            FormatDecoder::Json(_)
            | FormatDecoder::RegistryJson(_)
            | FormatDecoder::ConnectJson(_)
            | FormatDecoder::Protobuf(_) => None,
        }
    }
}
