//! Confluent-framed Avro straight into Arrow with arrow-avro, schemas resolved by id through the
//! registry client (cached forever, single flight).
//!
//! Schema evolution without small files: every writer schema seen on the partition is resolved
//! to one *reader* schema, the newest (highest id) writer schema that all the others resolve to
//! under Avro's resolution rules (new fields take their defaults, removed fields are skipped,
//! numeric promotions apply). Records of interleaving versions therefore produce one Arrow schema
//! and land in the same files; only a newer reader changes the output schema (a new nullable
//! column), and [`AvroDecoder::prepare`] tells the caller beforehand so it can commit first.
//!
//! Invariants:
//! - Every emitted batch has the current reader's Arrow schema plus the metadata columns.
//! - A record that fails to decode never corrupts the batch in progress: the decoder is rebuilt
//!   and the records of the current batch are replayed into it before the error is returned
//!   together with the record (for the dead-letter topic).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use schema_registry::{wire, RegistryClient, SchemaId};
use sinks::TopicPartition;

use super::{DecodeError, MetaColumns, Record, Rejected};
use crate::config::MetadataConfig;

/// Decodes one partition's Confluent-framed Avro records into record batches.
pub struct AvroDecoder {
    tp: TopicPartition,
    registry: RegistryClient,
    /// Writer schemas the current decoder was built with, by id.
    writers: BTreeMap<u32, String>,
    /// Ids that are known not to resolve to the reader, and why (their records are rejected).
    incompatible: HashMap<u32, String>,
    /// The reader schema id.
    reader: Option<u32>,
    decoder: Option<Decoder>,
    /// Schema id of the last decoded record (the decoder's active writer).
    last_id: Option<u32>,
    batch_size: usize,
    meta: MetaColumns,
    /// Records of the batch in progress, replayed after a failed record.
    pending: Vec<Record>,
}

impl std::fmt::Debug for AvroDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroDecoder")
            .field("tp", &self.tp)
            .field("writers", &self.writers.keys().collect::<Vec<_>>())
            .field("reader", &self.reader)
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
            writers: BTreeMap::new(),
            incompatible: HashMap::new(),
            reader: None,
            decoder: None,
            last_id: None,
            batch_size: batch_size.max(1),
            meta,
            pending: Vec::new(),
        }
    }

    /// The reader schema (Avro JSON) and its id, once one is known.
    pub fn reader_schema(&self) -> Option<(u32, &str)> {
        let id = self.reader?;
        self.writers.get(&id).map(|s| (id, s.as_str()))
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
    /// the output schema (a newer reader schema), so the caller can commit what precedes it.
    pub async fn prepare(&mut self, rec: &Record) -> Result<bool, DecodeError> {
        let Some(Ok((id, _))) = rec.payload.as_deref().map(wire::parse) else {
            return Ok(false);
        };
        if self.writers.contains_key(&id.0) || self.incompatible.contains_key(&id.0) {
            return Ok(false);
        }
        self.fetch(id, rec.offset).await?;
        Ok(self.reader.is_some_and(|r| id.0 > r))
    }

    async fn fetch(&self, id: SchemaId, offset: i64) -> Result<String, DecodeError> {
        let schema = self
            .registry
            .schema(id)
            .await
            .map_err(|e| DecodeError::unresolved(&self.tp, offset, id, &e))?;
        if schema.schema_type != "AVRO" {
            return Err(self.error(
                offset,
                "schema-type",
                Some(id.0),
                format!("schema id {id} is {}, not AVRO", schema.schema_type),
            ));
        }
        Ok(schema.schema.clone())
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
        let (id, _) = wire::parse(payload)
            .map_err(|e| self.error(rec.offset, "wire-format", None, e.to_string()))?;
        if self.incompatible.contains_key(&id.0) {
            return Err(self.incompatible_error(rec.offset, id.0));
        }
        if !self.writers.contains_key(&id.0) {
            let schema = self.fetch(id, rec.offset).await?;
            self.learn(id.0, schema, rec.offset, out)?;
        }
        if self.decoder.as_ref().is_some_and(Decoder::batch_is_full) {
            self.emit(out, rec.offset)?;
        }
        if let Err(reason) = self.decode_one(payload, out, rec.offset) {
            // The decoder may hold half a row: rebuild it and replay the batch in progress.
            self.rebuild(self.reader, rec.offset)
                .and_then(|()| self.replay(out))
                .map_err(|e| {
                    self.error(
                        rec.offset,
                        "malformed",
                        Some(id.0),
                        format!("{reason}; then: {e}"),
                    )
                })?;
            return Err(self.error(rec.offset, "malformed", Some(id.0), reason));
        }
        self.meta
            .push(rec.offset, rec.timestamp_ms, rec.key.as_deref());
        self.last_id = Some(id.0);
        Ok(())
    }

    /// Feeds exactly one framed record to the decoder.
    fn decode_one(
        &mut self,
        payload: &[u8],
        out: &mut Vec<RecordBatch>,
        offset: i64,
    ) -> Result<(), String> {
        let id = wire::parse(payload).map(|(id, _)| id.0).unwrap_or_default();
        let mut pos = 0;
        loop {
            let decoder = self
                .decoder
                .as_mut()
                .expect("a decoder exists once a schema is known");
            let before = decoder.capacity();
            let n = decoder
                .decode(&payload[pos..])
                .map_err(|e| format!("invalid Avro for schema id {id}: {e}"))?;
            pos += n;
            let decoder = self.decoder.as_mut().expect("decoder");
            if pos == payload.len() && decoder.capacity() < before {
                return Ok(()); // exactly one row, every byte used
            }
            if pos < payload.len() && decoder.batch_is_full() {
                // A switch to another writer schema: arrow-avro ends the batch first.
                self.emit(out, offset).map_err(|e| e.reason)?;
                continue;
            }
            return Err(format!(
                "record does not match schema id {id}: {pos} of {} bytes form a row",
                payload.len()
            ));
        }
    }

    fn incompatible_error(&self, offset: i64, id: u32) -> DecodeError {
        self.error(
            offset,
            "incompatible-schema",
            Some(id),
            format!(
                "writer schema id {id} cannot be resolved to the reader schema id {} of subject \
                 `{}-value` (a type was narrowed, or a field without a default was added): {}; \
                 register a compatible version",
                self.reader.unwrap_or_default(),
                self.tp.topic,
                self.incompatible.get(&id).map_or("", String::as_str)
            ),
        )
    }

    /// Adds writer schema `id`: the newest schema becomes the reader when every known writer
    /// resolves to it; otherwise `id` must resolve to the current reader.
    fn learn(
        &mut self,
        id: u32,
        schema: String,
        offset: i64,
        out: &mut Vec<RecordBatch>,
    ) -> Result<(), DecodeError> {
        // Rows decoded so far are emitted first: the rebuilt decoder starts a new batch.
        self.emit(out, offset)?;
        self.pending.clear();
        self.writers.insert(id, schema);
        let newest = self.reader.is_none_or(|r| id > r);
        let mut why = Vec::new();
        if newest {
            match self.rebuild(Some(id), offset) {
                Ok(()) => {
                    self.reader = Some(id);
                    self.last_id = None;
                    return Ok(());
                }
                Err(e) => why.push(format!("as the new reader: {}", e.reason)),
            }
        }
        // Not the newest, or the newest cannot read the older writers: it may still resolve
        // to the current reader.
        if self.reader.is_some() {
            match self.rebuild(self.reader, offset) {
                Ok(()) => {
                    self.last_id = None;
                    return Ok(());
                }
                Err(e) => why.push(format!("against the current reader: {}", e.reason)),
            }
        }
        // `id` does not fit: forget it, restore the previous decoder, reject its records. Name
        // the field with the registry's resolution rules (arrow-avro's errors do not).
        let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
        if let (Some(reader), Some(new)) = (
            self.reader
                .and_then(|r| self.writers.get(&r))
                .and_then(|s| parse(s)),
            self.writers.get(&id).and_then(|s| parse(s)),
        ) {
            if let Err(e) = schema_registry::compat::can_read(&reader, &new) {
                why.insert(0, e);
            }
        }
        self.writers.remove(&id);
        self.incompatible.insert(id, why.join("; "));
        if self.reader.is_some() {
            self.rebuild(self.reader, offset)?;
        } else {
            self.decoder = None;
        }
        Err(self.incompatible_error(offset, id))
    }

    /// Builds a decoder over every known writer schema, resolved to `reader`.
    fn rebuild(&mut self, reader: Option<u32>, offset: i64) -> Result<(), DecodeError> {
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        for (id, s) in &self.writers {
            store
                .set(Fingerprint::Id(*id), AvroSchema::new(s.clone()))
                .map_err(|e| self.error(offset, "malformed", Some(*id), e.to_string()))?;
        }
        let Some(active) = self
            .last_id
            .or(reader)
            .or_else(|| self.writers.keys().next().copied())
        else {
            return Ok(());
        };
        let active = if self.writers.contains_key(&active) {
            active
        } else {
            *self.writers.keys().next().expect("a writer")
        };
        let mut builder = ReaderBuilder::new()
            .with_batch_size(self.batch_size)
            .with_writer_schema_store(store)
            .with_active_fingerprint(Fingerprint::Id(active));
        if let Some(r) = reader.and_then(|r| self.writers.get(&r)) {
            builder = builder.with_reader_schema(AvroSchema::new(r.clone()));
        }
        let decoder = builder.build_decoder().map_err(|e| {
            self.error(
                offset,
                "incompatible-schema",
                reader,
                format!(
                    "cannot read the known writer schemas {:?} as schema id {reader:?}: {e}",
                    self.writers.keys().collect::<Vec<_>>()
                ),
            )
        })?;
        self.decoder = Some(decoder);
        self.meta.finish();
        Ok(())
    }

    /// Re-decodes the batch in progress into a fresh decoder (after a failed record).
    fn replay(&mut self, out: &mut Vec<RecordBatch>) -> Result<(), DecodeError> {
        self.last_id = None;
        let pending = std::mem::take(&mut self.pending);
        for rec in &pending {
            let payload = rec.payload.as_deref().unwrap_or_default();
            if let Err(reason) = self.decode_one(payload, out, rec.offset) {
                return Err(self.error(
                    rec.offset,
                    "malformed",
                    None,
                    format!("replay failed: {reason}"),
                ));
            }
            self.meta
                .push(rec.offset, rec.timestamp_ms, rec.key.as_deref());
            self.last_id = wire::parse(payload).ok().map(|(id, _)| id.0);
        }
        self.pending = pending;
        Ok(())
    }

    /// Emits the rows decoded so far, if any.
    pub fn finish(&mut self, out: &mut Vec<RecordBatch>) -> Result<(), DecodeError> {
        self.emit(out, -1)
    }

    fn emit(&mut self, out: &mut Vec<RecordBatch>, offset: i64) -> Result<(), DecodeError> {
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(());
        };
        let batch = decoder.flush().map_err(|e| {
            self.error(
                offset,
                "malformed",
                None,
                format!("cannot build the Arrow batch: {e}"),
            )
        })?;
        let Some(batch) = batch else { return Ok(()) };
        self.pending.clear();
        let meta = self.meta.finish();
        if batch.num_rows() != meta.first().map_or(batch.num_rows(), |(_, a)| a.len()) {
            return Err(self.error(
                offset,
                "malformed",
                None,
                "internal: row count and metadata disagree",
            ));
        }
        // A field read through its default carries `avro.field.default`; the same field decoded
        // from a newer writer does not. Drop it so both give one schema.
        let mut fields: Vec<Arc<Field>> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| {
                if f.metadata().contains_key("avro.field.default") {
                    let mut md = f.metadata().clone();
                    md.remove("avro.field.default");
                    Arc::new(f.as_ref().clone().with_metadata(md))
                } else {
                    f.clone()
                }
            })
            .collect();
        let mut columns = batch.columns().to_vec();
        for (f, c) in fields.iter_mut().zip(columns.iter_mut()) {
            if let Some((field, col)) = uuid_as_string(f, c) {
                *f = field;
                *c = col;
            }
            let (field, col) = unions_as_structs(f, c).map_err(|e| {
                self.error(
                    offset,
                    "malformed",
                    None,
                    format!("field `{}`: {e}", f.name()),
                )
            })?;
            *f = field;
            *c = col;
        }
        for (f, a) in meta {
            fields.push(Arc::new(f));
            columns.push(a);
        }
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(schema, columns).map_err(|e| {
            self.error(
                offset,
                "malformed",
                None,
                format!("cannot add metadata columns: {e}"),
            )
        })?;
        out.push(batch);
        Ok(())
    }
}

/// General Avro unions (more than one non-null branch) become Arrow unions, which Parquet cannot
/// store. They are written as a struct with one nullable field per non-null branch, named by the
/// branch (`string`, `long`, a record's name, ...); exactly the active branch is set, and the
/// struct is null when the value is null. Applied recursively inside structs.
fn unions_as_structs(
    field: &Arc<Field>,
    col: &arrow::array::ArrayRef,
) -> Result<(Arc<Field>, arrow::array::ArrayRef), arrow::error::ArrowError> {
    use arrow::array::{Array, AsArray, StructArray, UInt32Array};
    use arrow::buffer::NullBuffer;
    use arrow::datatypes::DataType;
    match field.data_type() {
        DataType::Union(union_fields, _) => {
            let u = col.as_union();
            let type_ids = u.type_ids();
            let mut members: Vec<Arc<Field>> = Vec::new();
            let mut arrays = Vec::new();
            for (type_id, member) in union_fields.iter() {
                if member.data_type() == &DataType::Null {
                    continue;
                }
                let child = u.child(type_id);
                let idx: UInt32Array = (0..u.len())
                    .map(|i| (type_ids[i] == type_id).then(|| u.value_offset(i) as u32))
                    .collect();
                let taken = arrow::compute::take(child.as_ref(), &idx, None)?;
                let m = Arc::new(member.as_ref().clone().with_nullable(true));
                let (m, taken) = unions_as_structs(&m, &taken)?;
                members.push(m);
                arrays.push(taken);
            }
            let null_ids: Vec<i8> = union_fields
                .iter()
                .filter(|(_, f)| f.data_type() == &DataType::Null)
                .map(|(id, _)| id)
                .collect();
            let nulls = NullBuffer::from_iter(type_ids.iter().map(|t| !null_ids.contains(t)));
            let nulls = (nulls.null_count() > 0).then_some(nulls);
            if members.is_empty() {
                return Ok((field.clone(), col.clone()));
            }
            let arr = StructArray::try_new(members.clone().into(), arrays, nulls)?;
            let f = Field::new(field.name(), arr.data_type().clone(), true)
                .with_metadata(field.metadata().clone());
            Ok((Arc::new(f), Arc::new(arr)))
        }
        DataType::Struct(children) if children.iter().any(|c| has_union(c.data_type())) => {
            let s = col.as_struct();
            let mut fields = Vec::with_capacity(children.len());
            let mut arrays = Vec::with_capacity(children.len());
            for (c, a) in children.iter().zip(s.columns()) {
                let (f, a) = unions_as_structs(c, a)?;
                fields.push(f);
                arrays.push(a);
            }
            let arr = StructArray::try_new(fields.into(), arrays, s.nulls().cloned())?;
            let f = Field::new(field.name(), arr.data_type().clone(), field.is_nullable())
                .with_metadata(field.metadata().clone());
            Ok((Arc::new(f), Arc::new(arr)))
        }
        _ => Ok((field.clone(), col.clone())),
    }
}

fn has_union(dt: &arrow::datatypes::DataType) -> bool {
    use arrow::datatypes::DataType;
    match dt {
        DataType::Union(_, _) => true,
        DataType::Struct(c) => c.iter().any(|f| has_union(f.data_type())),
        _ => false,
    }
}

/// arrow-avro reads Avro `uuid` as 16 raw bytes; BI tools and SQL engines expect the canonical
/// string, so top-level uuid columns become `Utf8` (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
fn uuid_as_string(
    field: &Arc<Field>,
    col: &arrow::array::ArrayRef,
) -> Option<(Arc<Field>, arrow::array::ArrayRef)> {
    use arrow::array::{Array, AsArray, StringBuilder};
    use arrow::datatypes::DataType;
    use std::fmt::Write as _;
    if field.data_type() != &DataType::FixedSizeBinary(16)
        || field.metadata().get("logicalType").map(String::as_str) != Some("uuid")
    {
        return None;
    }
    let bytes = col.as_fixed_size_binary();
    let mut out = StringBuilder::with_capacity(bytes.len(), bytes.len() * 36);
    let mut s = String::with_capacity(36);
    for i in 0..bytes.len() {
        if bytes.is_null(i) {
            out.append_null();
            continue;
        }
        s.clear();
        for (j, b) in bytes.value(i).iter().enumerate() {
            if matches!(j, 4 | 6 | 8 | 10) {
                s.push('-');
            }
            let _ = write!(s, "{b:02x}");
        }
        out.append_value(&s);
    }
    let f = Field::new(field.name(), DataType::Utf8, field.is_nullable())
        .with_metadata(field.metadata().clone());
    Some((Arc::new(f), Arc::new(out.finish())))
}
