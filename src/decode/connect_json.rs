//! JSON records in Kafka Connect's envelope (`{"schema": ..., "payload": ...}`: JsonConverter
//! with `schemas.enable=true`, how Debezium runs on Connect by default), decoded with the schema
//! each record carries, so no table schema needs declaring and a source's `ALTER TABLE` reaches
//! the table.
//!
//! Conversion of Connect types: `int8`..`int64`, `float32`/`float64`, `boolean`, `string` as
//! they are; `bytes` (base64 in JSON) → Binary; `array` → List; `map` with string keys → Map;
//! `struct` → Struct. Logical types by schema name: Connect `Decimal` (base64 two's complement,
//! `scale` parameter) → Decimal128(`connect.decimal.precision` or 38, scale); Debezium's
//! `VariableScaleDecimal` (`{scale, value}`) → the exact decimal as a string; `Date` → Date32;
//! `Time` → Time32(ms), `MicroTime` → Time64(µs), `NanoTime` → Time64(ns); `Timestamp` →
//! Timestamp(ms), `MicroTimestamp` → Timestamp(µs), `NanoTimestamp` → Timestamp(ns) (no zone,
//! as the Avro path); `ZonedTimestamp` → Timestamp(µs, UTC); `Uuid`, `Json`, `Xml`, `Enum`,
//! `ZonedTime` stay strings. Every column is nullable.
//!
//! Invariant: a record is decoded with exactly the schema it carries. Records whose schema text
//! differs from the current one start a new decoder, and `prepare` reports a change of the
//! resulting table schema so what precedes it is committed under the old one. Comparing the
//! schema costs one `memcmp` per record: JsonConverter writes `schema` first, and its text is
//! compared with the current one byte for byte (another key order falls back to parsing).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use serde_json::Value;
use sinks::TopicPartition;

use super::connect_schema::{convert_schema, finish_batch, Converted};
use super::{DecodeError, JsonDecoder, Record, Rejected};
use crate::config::MetadataConfig;

/// The byte span of the `schema` value when it is the record's first key.
fn schema_span(payload: &[u8]) -> Option<std::ops::Range<usize>> {
    const HEAD: &[u8] = b"{\"schema\":";
    let start = HEAD.len();
    if !payload.starts_with(HEAD) {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in payload.iter().enumerate().skip(start) {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(start..i + 1);
                }
            }
            b',' if depth == 0 => return Some(start..i),
            _ => {}
        }
    }
    None
}

/// Decodes one partition's Connect-enveloped JSON records.
pub struct ConnectJsonDecoder {
    tp: TopicPartition,
    metadata: MetadataConfig,
    batch_size: usize,
    /// Converted schemas by their text (a topic's history holds few).
    schemas: HashMap<Vec<u8>, Result<Arc<Converted>, String>>,
    current: Option<Current>,
}

struct Current {
    text: Vec<u8>,
    converted: Arc<Converted>,
    /// Records of this schema not yet decoded (slices of the poll arena, cheap to hold).
    pending: Vec<Record>,
}

impl std::fmt::Debug for ConnectJsonDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectJsonDecoder")
            .field("tp", &self.tp)
            .finish()
    }
}

impl ConnectJsonDecoder {
    pub fn new(tp: TopicPartition, metadata: MetadataConfig, batch_size: usize) -> Self {
        Self {
            tp,
            metadata,
            batch_size: batch_size.max(1),
            schemas: HashMap::new(),
            current: None,
        }
    }

    pub fn pending_rows(&self) -> usize {
        self.current.as_ref().map_or(0, |c| c.pending.len())
    }

    /// The record's schema text: a slice of it when `schema` comes first, else re-serialised.
    fn schema_text(payload: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        if let Some(span) = schema_span(payload) {
            return Ok(std::borrow::Cow::Borrowed(&payload[span]));
        }
        let v: Value =
            serde_json::from_slice(payload).map_err(|e| format!("not valid JSON: {e}"))?;
        match v.get("schema") {
            Some(s) if v.get("payload").is_some() => {
                Ok(std::borrow::Cow::Owned(s.to_string().into_bytes()))
            }
            _ => Err(
                "not a Kafka Connect envelope ({\"schema\": ..., \"payload\": ...}); \
                 set value.converter.schemas.enable=true in Connect, or declare the table's \
                 `schema` and leave `json_envelope` out"
                    .into(),
            ),
        }
    }

    fn is_current(&self, payload: &[u8]) -> bool {
        self.current.as_ref().is_some_and(|c| {
            payload.starts_with(b"{\"schema\":")
                && payload.get(10..10 + c.text.len()) == Some(&c.text[..])
        })
    }

    /// Converts the record's schema once; `true` when it changes the table schema.
    pub fn prepare(&mut self, rec: &Record) -> Result<bool, DecodeError> {
        let Some(payload) = rec.payload.as_deref() else {
            return Ok(false);
        };
        let payload = super::json::body(payload);
        if self.is_current(payload) {
            return Ok(false);
        }
        let Ok(text) = Self::schema_text(payload) else {
            return Ok(false); // `push` rejects it, naming why
        };
        let converted = self.converted(&text);
        Ok(match (converted, &self.current) {
            (Ok(new), Some(cur)) => new.output != cur.converted.output,
            _ => false,
        })
    }

    fn converted(&mut self, text: &[u8]) -> Result<Arc<Converted>, String> {
        if let Some(c) = self.schemas.get(text) {
            return c.clone();
        }
        if self.schemas.len() >= 256 {
            self.schemas.clear();
        }
        let converted = serde_json::from_slice::<Value>(text)
            .map_err(|e| format!("the Connect schema is not JSON: {e}"))
            .and_then(|v| convert_schema(&v))
            .map(Arc::new);
        self.schemas.insert(text.to_vec(), converted.clone());
        converted
    }

    fn error(&self, rec: &Record, class: &'static str, reason: String) -> DecodeError {
        DecodeError {
            tp: self.tp.clone(),
            offset: rec.offset,
            class,
            reason,
            schema_id: None,
            retryable: false,
        }
    }

    pub fn push(
        &mut self,
        rec: Record,
        out: &mut Vec<RecordBatch>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), Box<Rejected>> {
        let payload = super::json::body(rec.payload.as_deref().unwrap_or_default());
        if !self.is_current(payload) {
            let text = match Self::schema_text(payload) {
                Ok(t) => t.into_owned(),
                Err(e) => {
                    let error = self.error(&rec, "malformed", e);
                    return Err(Box::new(Rejected { error, record: rec }));
                }
            };
            let converted = match self.converted(&text) {
                Ok(c) => c,
                Err(e) => {
                    let error = self.error(&rec, "schema-type", e);
                    return Err(Box::new(Rejected { error, record: rec }));
                }
            };
            self.emit(out, rejected);
            self.current = Some(Current {
                text,
                converted,
                pending: Vec::new(),
            });
        }
        let c = self.current.as_mut().expect("a schema for the record");
        c.pending.push(rec);
        if c.pending.len() >= self.batch_size {
            self.emit(out, rejected);
        }
        Ok(())
    }

    pub fn finish(
        &mut self,
        out: &mut Vec<RecordBatch>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), DecodeError> {
        self.emit(out, rejected);
        Ok(())
    }

    /// Decodes the pending records of the current schema into one batch; a batch whose values
    /// fail a conversion (bad base64) is decoded again record by record, rejecting the bad ones.
    fn emit(&mut self, out: &mut Vec<RecordBatch>, rejected: &mut Vec<Rejected>) {
        let Some(c) = self.current.as_mut() else {
            return;
        };
        if c.pending.is_empty() {
            return;
        }
        let records = std::mem::take(&mut c.pending);
        let converted = c.converted.clone();
        let before = rejected.len();
        match self.decode(&converted, &records, rejected) {
            Ok(Some(b)) => out.push(b),
            Ok(None) => {}
            Err(_) => {
                rejected.truncate(before);
                let mut good = Vec::new();
                for rec in records {
                    let mut alone = Vec::new();
                    match self.decode(&converted, std::slice::from_ref(&rec), &mut alone) {
                        Ok(b) => good.extend(b),
                        Err(reason) => {
                            let error = self.error(&rec, "malformed", reason);
                            alone.clear();
                            alone.push(Rejected { error, record: rec });
                        }
                    }
                    rejected.extend(alone);
                }
                if let Some(first) = good.first() {
                    let schema = first.schema();
                    out.push(
                        arrow::compute::concat_batches(&schema, &good)
                            .expect("batches of one schema"),
                    );
                }
            }
        }
    }

    fn decode(
        &self,
        converted: &Converted,
        records: &[Record],
        rejected: &mut Vec<Rejected>,
    ) -> Result<Option<RecordBatch>, String> {
        let mut d = JsonDecoder::new(
            self.tp.clone(),
            converted.physical.clone(),
            false,
            true,
            self.metadata,
            records.len() + 1,
        );
        let mut batches = Vec::new();
        for r in records {
            d.push(r.clone(), &mut batches, rejected);
        }
        d.finish(&mut batches, rejected);
        let Some(b) = batches.pop() else {
            return Ok(None);
        };
        debug_assert!(batches.is_empty());
        finish_batch(converted, b).map(Some)
    }
}

#[cfg(test)]
#[path = "connect_json_tests.rs"]
mod tests;
