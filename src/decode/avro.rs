//! Confluent-framed Avro straight into Arrow with arrow-avro, schemas resolved by id through the
//! registry client (cached forever, single flight).
//!
//! The arrow-avro `Decoder` is built from a `SchemaStore` of every writer schema seen so far on
//! this partition; an unseen id triggers one registry fetch, a flush of the rows decoded so far
//! and a rebuild with the new schema active. A flip between known ids is handled inside
//! arrow-avro (it ends the current batch first), so every emitted batch has a single schema.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use schema_registry::{wire, RegistryClient, SchemaId};
use sinks::TopicPartition;

use super::{DecodeError, MetaColumns, Record};
use crate::config::MetadataConfig;

/// Decodes one partition's Confluent-framed Avro records into record batches.
pub struct AvroDecoder {
    tp: TopicPartition,
    registry: RegistryClient,
    store: SchemaStore,
    known: HashSet<u32>,
    /// Schema id of the last decoded record.
    last_id: Option<u32>,
    decoder: Option<Decoder>,
    batch_size: usize,
    meta: MetaColumns,
}

impl std::fmt::Debug for AvroDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroDecoder")
            .field("tp", &self.tp)
            .field("known", &self.known)
            .finish()
    }
}

impl AvroDecoder {
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
            store: SchemaStore::new_with_type(FingerprintAlgorithm::Id),
            known: HashSet::new(),
            last_id: None,
            decoder: None,
            batch_size: batch_size.max(1),
            meta,
        }
    }

    /// Whether `payload` is written with another schema than the previous record.
    pub fn switches_schema(&self, payload: &[u8]) -> bool {
        match (wire::parse(payload), self.last_id) {
            (Ok((id, _)), Some(last)) => id.0 != last,
            _ => false,
        }
    }

    /// Rows decoded and not yet emitted.
    pub fn pending_rows(&self) -> usize {
        self.meta.rows()
    }

    fn error(&self, offset: i64, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            tp: self.tp.clone(),
            offset,
            reason: reason.into(),
            retryable: false,
        }
    }

    /// Decodes one record; completed batches are appended to `out`.
    pub async fn push(
        &mut self,
        rec: &Record,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DecodeError> {
        let payload = rec
            .payload
            .as_deref()
            .ok_or_else(|| self.error(rec.offset, "the record has no value (tombstone)"))?;
        let (id, _) = wire::parse(payload).map_err(|e| self.error(rec.offset, e.to_string()))?;
        if !self.known.contains(&id.0) {
            self.learn(id, rec.offset, out).await?;
        }
        let decoder = self
            .decoder
            .as_mut()
            .expect("decoder exists once a schema is known");
        if decoder.batch_is_full() {
            self.emit(out, rec.offset)?;
        }
        let mut pos = 0;
        loop {
            let decoder = self.decoder.as_mut().expect("decoder");
            let before = decoder.capacity();
            let n = decoder.decode(&payload[pos..]).map_err(|e| {
                self.error(rec.offset, format!("invalid Avro for schema id {id}: {e}"))
            })?;
            pos += n;
            let decoder = self.decoder.as_mut().expect("decoder");
            if pos == payload.len() && decoder.capacity() < before {
                break; // exactly one row, every byte used
            }
            if pos < payload.len() && decoder.batch_is_full() {
                // A switch to another known schema: arrow-avro ends the batch first.
                self.emit(out, rec.offset)?;
                continue;
            }
            // Truncated body or trailing bytes: the decoder state can no longer be trusted.
            self.decoder = None;
            self.last_id = None;
            self.known.clear();
            self.store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
            return Err(self.error(
                rec.offset,
                format!(
                    "record does not match schema id {id}: {} of {} bytes form a row",
                    pos,
                    payload.len()
                ),
            ));
        }
        self.meta
            .push(rec.offset, rec.timestamp_ms, rec.key.as_deref());
        self.last_id = Some(id.0);
        Ok(())
    }

    /// Emits the rows decoded so far, if any.
    pub fn finish(&mut self, out: &mut Vec<RecordBatch>) -> Result<(), DecodeError> {
        self.emit(out, -1)
    }

    async fn learn(
        &mut self,
        id: SchemaId,
        offset: i64,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DecodeError> {
        let schema = self.registry.schema(id).await.map_err(|e| DecodeError {
            tp: self.tp.clone(),
            offset,
            retryable: e.is_retryable(),
            reason: format!("cannot resolve schema id {id}: {e}"),
        })?;
        if schema.schema_type != "AVRO" {
            return Err(self.error(
                offset,
                format!("schema id {id} is {}, not AVRO", schema.schema_type),
            ));
        }
        self.emit(out, offset)?;
        let mut store = self.store.clone();
        store
            .set(
                Fingerprint::Id(id.0),
                AvroSchema::new(schema.schema.clone()),
            )
            .map_err(|e| self.error(offset, format!("schema id {id}: {e}")))?;
        let decoder = ReaderBuilder::new()
            .with_batch_size(self.batch_size)
            .with_writer_schema_store(store.clone())
            .with_active_fingerprint(Fingerprint::Id(id.0))
            .build_decoder()
            .map_err(|e| self.error(offset, format!("unsupported Avro schema id {id}: {e}")))?;
        self.store = store;
        self.known.insert(id.0);
        self.decoder = Some(decoder);
        Ok(())
    }

    fn emit(&mut self, out: &mut Vec<RecordBatch>, offset: i64) -> Result<(), DecodeError> {
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(());
        };
        let batch = decoder
            .flush()
            .map_err(|e| self.error(offset, format!("cannot build the Arrow batch: {e}")))?;
        let Some(batch) = batch else { return Ok(()) };
        let meta = self.meta.finish();
        if batch.num_rows() != meta.first().map_or(batch.num_rows(), |(_, a)| a.len()) {
            return Err(self.error(offset, "internal: row count and metadata disagree"));
        }
        let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
        let mut columns = batch.columns().to_vec();
        for (f, a) in meta {
            fields.push(Arc::new(f));
            columns.push(a);
        }
        let schema = Arc::new(Schema::new_with_metadata(
            fields,
            batch.schema().metadata().clone(),
        ));
        let batch = RecordBatch::try_new(schema, columns)
            .map_err(|e| self.error(offset, format!("cannot add metadata columns: {e}")))?;
        out.push(batch);
        Ok(())
    }
}
