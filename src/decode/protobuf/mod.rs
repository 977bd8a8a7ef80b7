//! Confluent-framed Protobuf straight into Arrow: the magic byte, the schema id and the
//! message-index path, then the message, decoded field by field into column builders
//! ([`columns`]). Schemas come from the registry with their imports (references) and compile
//! in-process ([`schema_registry::protobuf`]).
//!
//! Schema evolution follows protobuf's own model, which needs no resolution step: data of any
//! version reads with a newer descriptor (fields are matched by number, unknown ones skipped,
//! missing ones defaulted). So the *reader* is the newest writer schema seen on the partition
//! whose message reads every other accepted writer's; records of every version become rows of
//! the reader's columns and share files. A newer schema that changes the output columns is
//! announced by [`ProtobufDecoder::prepare`] so the caller can commit first. A writer whose
//! message the reader cannot read (a field number reused with another wire type) has its records
//! rejected as `incompatible-schema`, naming the field.
//!
//! Invariants:
//! - Every emitted batch has the current reader's Arrow schema plus the metadata columns.
//! - A record that fails to decode never corrupts the batch in progress: the columns are rebuilt
//!   and the records of the current batch replayed before the error is returned with the record.

mod columns;
#[cfg(test)]
mod tests;
mod wire;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use prost_reflect::MessageDescriptor;
use schema_registry::protobuf::{compile, message_at, readable};
use schema_registry::{wire as framing, RegistryClient, SchemaId};
use sinks::TopicPartition;

use super::{DecodeError, MetaColumns, Record, Rejected};
use crate::config::MetadataConfig;
use columns::Row;

/// The message type records are decoded as, and its columns.
struct Reader {
    id: u32,
    message: MessageDescriptor,
    row: Row,
}

/// Decodes one partition's Confluent-framed Protobuf records into record batches.
pub struct ProtobufDecoder {
    tp: TopicPartition,
    registry: RegistryClient,
    /// Compiled writer schemas by id; `Err` says why one is unusable.
    schemas: HashMap<u32, Result<schema_registry::protobuf::Compiled, String>>,
    /// Writer messages accepted so far, by (schema id, message path).
    accepted: HashMap<(u32, Vec<i32>), MessageDescriptor>,
    /// Writers whose records are rejected: the error class, and why.
    incompatible: HashMap<(u32, Vec<i32>), (&'static str, String)>,
    reader: Option<Reader>,
    batch_size: usize,
    meta: MetaColumns,
    /// Records of the batch in progress, replayed after a failed record.
    pending: Vec<Record>,
}

impl std::fmt::Debug for ProtobufDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtobufDecoder")
            .field("tp", &self.tp)
            .field(
                "reader",
                &self.reader.as_ref().map(|r| (r.id, r.message.full_name())),
            )
            .finish()
    }
}

impl ProtobufDecoder {
    pub fn new(
        tp: TopicPartition,
        registry: RegistryClient,
        metadata: MetadataConfig,
        batch_size: usize,
    ) -> Self {
        let meta = MetaColumns::new(metadata, tp.topic.clone(), tp.partition);
        Self {
            tp,
            registry,
            schemas: HashMap::new(),
            accepted: HashMap::new(),
            incompatible: HashMap::new(),
            reader: None,
            batch_size: batch_size.max(1),
            meta,
            pending: Vec::new(),
        }
    }

    /// Rows decoded and not yet emitted.
    pub fn pending_rows(&self) -> usize {
        self.meta.rows()
    }

    fn error(
        &self,
        offset: i64,
        class: &'static str,
        schema_id: Option<u32>,
        reason: impl Into<String>,
    ) -> DecodeError {
        DecodeError::bad(&self.tp, offset, class, schema_id, reason)
    }

    /// Resolves the schema of `rec` (fetching it once) and tells whether decoding it will change
    /// the output schema (a newer writer that becomes the reader), so the caller can commit first.
    pub async fn prepare(&mut self, rec: &Record) -> Result<bool, DecodeError> {
        let Some(Ok((id, body))) = rec.payload.as_deref().map(framing::parse) else {
            return Ok(false);
        };
        let Ok((path, _)) = framing::parse_message_indexes(body) else {
            return Ok(false);
        };
        if !self.schemas.contains_key(&id.0) {
            self.fetch(id, rec.offset).await?;
        }
        let key = (id.0, path);
        if self.accepted.contains_key(&key) || self.incompatible.contains_key(&key) {
            return Ok(false);
        }
        Ok(self.reader.as_ref().is_some_and(|r| id.0 > r.id)
            && self.schemas.get(&id.0).is_some_and(Result::is_ok))
    }

    async fn fetch(&mut self, id: SchemaId, offset: i64) -> Result<(), DecodeError> {
        let schema = self
            .registry
            .schema(id)
            .await
            .map_err(|e| DecodeError::unresolved(&self.tp, offset, id, &e))?;
        let compiled = if schema.schema_type != "PROTOBUF" {
            Err(format!(
                "schema id {id} is {}, not PROTOBUF (is the sink's format right?)",
                schema.schema_type
            ))
        } else {
            compile(&schema.schema, &schema.imports)
                .map_err(|e| format!("schema id {id} does not compile: {e}"))
        };
        self.schemas.insert(id.0, compiled);
        Ok(())
    }

    /// Decodes one record; completed batches are appended to `out`. A record that cannot be
    /// decoded comes back in the error, and the batch in progress is intact.
    pub async fn push(
        &mut self,
        rec: Record,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), Box<Rejected>> {
        match self.push_inner(&rec, out).await {
            Ok(()) => {
                self.pending.push(rec);
                if self.meta.rows() >= self.batch_size {
                    if let Err(error) = self.emit(out) {
                        let record = self.pending.pop().expect("just pushed");
                        return Err(Box::new(Rejected { error, record }));
                    }
                }
                Ok(())
            }
            Err(error) => Err(Box::new(Rejected { error, record: rec })),
        }
    }

    async fn push_inner(
        &mut self,
        rec: &Record,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DecodeError> {
        let payload = rec.payload.as_deref().ok_or_else(|| {
            self.error(
                rec.offset,
                "wire-format",
                None,
                "the record has no value (tombstone)",
            )
        })?;
        let (id, body) = framing::parse(payload)
            .map_err(|e| self.error(rec.offset, "wire-format", None, e.to_string()))?;
        let (path, message) = framing::parse_message_indexes(body)
            .map_err(|e| self.error(rec.offset, "wire-format", Some(id.0), e.to_string()))?;
        if !self.schemas.contains_key(&id.0) {
            self.fetch(id, rec.offset).await?;
        }
        let key = (id.0, path);
        if !self.accepted.contains_key(&key) {
            self.learn(&key, rec.offset, out)?;
        }
        let reader = self
            .reader
            .as_mut()
            .expect("a reader once a writer is accepted");
        if let Err(reason) = reader.row.decode(message) {
            let reason = format!(
                "invalid Protobuf for message `{}` of schema id {}: {reason}",
                reader.message.full_name(),
                id.0
            );
            self.replay(rec.offset)?;
            return Err(self.error(rec.offset, "malformed", Some(id.0), reason));
        }
        self.meta
            .push(rec.offset, rec.timestamp_ms, rec.key.as_deref());
        Ok(())
    }

    /// Accepts writer message `key` (schema id, message path), making it the reader when it is
    /// the newest and reads every accepted writer; otherwise the reader must read it.
    fn learn(
        &mut self,
        key: &(u32, Vec<i32>),
        offset: i64,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DecodeError> {
        let id = key.0;
        if let Some((class, why)) = self.incompatible.get(key) {
            return Err(self.error(offset, class, Some(id), why.clone()));
        }
        let file = match &self.schemas[&id] {
            Ok(c) => c.file.clone(),
            Err(e) => return Err(self.error(offset, "schema-type", Some(id), e.clone())),
        };
        let message = message_at(&file, &key.1)
            .map_err(|e| self.error(offset, "wire-format", Some(id), e))?;
        let reads_all = |m: &MessageDescriptor| {
            self.accepted
                .values()
                .try_for_each(|w| readable(m, w).map_err(|e| e.to_string()))
        };
        let newest = self.reader.as_ref().is_none_or(|r| id > r.id);
        let same_type = self
            .reader
            .as_ref()
            .is_none_or(|r| r.message.full_name() == message.full_name());
        let why = if !same_type {
            format!(
                "schema id {id} message `{}` is another message type than the rows so far \
                 (`{}` of schema id {}); one sink table takes one message type",
                message.full_name(),
                self.reader.as_ref().map_or("", |r| r.message.full_name()),
                self.reader.as_ref().map_or(0, |r| r.id),
            )
        } else if newest {
            match reads_all(&message) {
                Ok(()) => {
                    let row = match Row::new(&message) {
                        Ok(row) => row,
                        Err(e) => {
                            let why = format!("schema id {id}: {e}");
                            self.incompatible
                                .insert(key.clone(), ("schema-type", why.clone()));
                            return Err(self.error(offset, "schema-type", Some(id), why));
                        }
                    };
                    // Rows of the previous reader are emitted first: the new columns start a batch.
                    self.emit(out)?;
                    self.reader = Some(Reader {
                        id,
                        message: message.clone(),
                        row,
                    });
                    self.accepted.insert(key.clone(), message);
                    return Ok(());
                }
                Err(e) => match self.reader.as_ref().map(|r| readable(&r.message, &message)) {
                    Some(Ok(())) => {
                        self.accepted.insert(key.clone(), message);
                        return Ok(());
                    }
                    _ => format!("schema id {id} cannot read an earlier writer: {e}"),
                },
            }
        } else {
            let r = self.reader.as_ref().expect("not newest: a reader exists");
            match readable(&r.message, &message) {
                Ok(()) => {
                    self.accepted.insert(key.clone(), message);
                    return Ok(());
                }
                Err(e) => format!("the reader schema id {} cannot read it: {e}", r.id),
            }
        };
        let why = format!(
            "writer schema id {id} does not fit the rows of subject `{}-value`: {why}; register \
             a compatible version",
            self.tp.topic
        );
        self.incompatible
            .insert(key.clone(), ("incompatible-schema", why.clone()));
        Err(self.error(offset, "incompatible-schema", Some(id), why))
    }

    /// Rebuilds the columns and re-decodes the batch in progress (after a failed record).
    fn replay(&mut self, offset: i64) -> Result<(), DecodeError> {
        let message = self.reader.as_ref().expect("a reader").message.clone();
        let row = Row::new(&message).map_err(|e| self.error(offset, "schema-type", None, e))?;
        self.reader.as_mut().expect("a reader").row = row;
        self.meta.finish();
        let pending = std::mem::take(&mut self.pending);
        for rec in &pending {
            let message = rec
                .payload
                .as_deref()
                .and_then(|p| framing::parse(p).ok())
                .and_then(|(_, body)| framing::parse_message_indexes(body).ok())
                .map(|(_, m)| m)
                .unwrap_or_default();
            let reader = self.reader.as_mut().expect("a reader");
            if let Err(e) = reader.row.decode(message) {
                return Err(self.error(
                    rec.offset,
                    "malformed",
                    None,
                    format!("replay failed: {e}"),
                ));
            }
            self.meta
                .push(rec.offset, rec.timestamp_ms, rec.key.as_deref());
        }
        self.pending = pending;
        Ok(())
    }

    /// Emits the rows decoded so far, if any.
    pub fn finish(&mut self, out: &mut Vec<RecordBatch>) -> Result<(), DecodeError> {
        self.emit(out)
    }

    fn emit(&mut self, out: &mut Vec<RecordBatch>) -> Result<(), DecodeError> {
        if self.meta.rows() == 0 {
            return Ok(());
        }
        let Some(reader) = self.reader.as_mut() else {
            return Ok(());
        };
        let id = reader.id;
        let columns = reader.row.finish();
        let mut fields: Vec<Arc<arrow::datatypes::Field>> =
            reader.row.fields().iter().cloned().collect();
        self.pending.clear();
        let meta = self.meta.finish();
        let mut columns = columns.map_err(|e| {
            self.error(
                -1,
                "malformed",
                Some(id),
                format!("cannot build the Arrow batch: {e}"),
            )
        })?;
        for (f, c) in meta {
            fields.push(Arc::new(f));
            columns.push(c);
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| {
            self.error(
                -1,
                "malformed",
                Some(id),
                format!("cannot build the Arrow batch: {e}"),
            )
        })?;
        out.push(batch);
        Ok(())
    }
}
