//! Schemaless JSON records decoded into a table schema declared in the config.
//!
//! A batch is decoded in one pass by [`super::json_fast`] when every record in it is one that
//! decoder converts exactly as arrow-json would (the common case: well-formed objects of the
//! declared types); otherwise by arrow-json, which also isolates the bad records.
//!
//! Coercions are arrow-json's: ISO-8601 / RFC 3339 strings to timestamps and dates, numbers and
//! numeric strings to decimals, numbers to floats; fields not in the declared schema are ignored,
//! missing fields are null. A value carrying the Confluent JSON Schema framing (magic byte 0 and
//! a 4-byte id) is decoded after the 5-byte header.
//!
//! Invariant: one bad record never costs the batch. Records are decoded in batches; if a batch
//! fails (arrow-json reports type errors per batch), it is decoded again record by record, the
//! records that fail are returned as rejected, and the others are emitted in order.
//!
//! Memory: a partition holds only its pending records (slices of the poll thread's arena) between
//! batches. arrow-json's tape, which takes about twice a record's bytes and keeps its capacity
//! for the decoder's life, is built when a batch is emitted and dropped after it. So the tapes of
//! many partitions do not stay resident side by side: with 82 partitions of Debezium envelopes
//! they held about 40 MiB while kept per partition.

use std::sync::Arc;

use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_json::reader::{Decoder, ReaderBuilder};
use sinks::TopicPartition;

use super::{DecodeError, MetaColumns, Record, Rejected};
#[cfg(test)]
use crate::config::parse_type;
use crate::config::MetadataConfig;

/// Decodes one partition's JSON records.
pub struct JsonDecoder {
    tp: TopicPartition,
    /// What arrow-json decodes (the row, the Debezium envelope, or either in a Connect envelope).
    schema: SchemaRef,
    connect_envelope: bool,
    batch_size: usize,
    meta: MetaColumns,
    /// Records not yet decoded, in offset order; decoded together when the batch is emitted.
    pending: Vec<Record>,
    /// The registry schema id the records carry, stamped on rejections.
    schema_id: Option<u32>,
    /// The single-pass decoder, when it knows every type in `schema` (see [`super::json_fast`]).
    fast: Option<super::json_fast::Plan>,
}

impl std::fmt::Debug for JsonDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonDecoder").field("tp", &self.tp).finish()
    }
}

pub(crate) fn body(payload: &[u8]) -> &[u8] {
    match payload {
        [0, _, _, _, _, rest @ ..] => rest,
        p => p,
    }
}

impl JsonDecoder {
    /// `row` is the declared table schema. With `debezium`, records are Debezium envelopes whose
    /// `before`/`after` have that shape; with `connect_envelope`, records are Kafka Connect's
    /// `{"schema": ..., "payload": ...}` and the payload is decoded.
    pub fn new(
        tp: TopicPartition,
        row: SchemaRef,
        debezium: bool,
        connect_envelope: bool,
        metadata: MetadataConfig,
        batch_size: usize,
    ) -> Self {
        let meta = MetaColumns::new(metadata, tp.topic.clone(), tp.partition);
        let batch_size = batch_size.max(1);
        let mut schema = row;
        if debezium {
            let row_type = DataType::Struct(schema.fields().clone());
            let source = DataType::Struct(
                vec![
                    Field::new("ts_ms", DataType::Int64, true),
                    Field::new("db", DataType::Utf8, true),
                    Field::new("table", DataType::Utf8, true),
                    Field::new("lsn", DataType::Int64, true),
                    Field::new("file", DataType::Utf8, true),
                    Field::new("pos", DataType::Int64, true),
                ]
                .into(),
            );
            schema = Arc::new(Schema::new(vec![
                Field::new("before", row_type.clone(), true),
                Field::new("after", row_type, true),
                Field::new("source", source, true),
                Field::new("op", DataType::Utf8, true),
                Field::new("ts_ms", DataType::Int64, true),
            ]));
        }
        if connect_envelope {
            schema = Arc::new(Schema::new(vec![Field::new(
                "payload",
                DataType::Struct(schema.fields().clone()),
                true,
            )]));
        }
        Self {
            tp,
            fast: super::json_fast::Plan::new(&schema),
            schema,
            connect_envelope,
            batch_size,
            meta,
            pending: Vec::new(),
            schema_id: None,
        }
    }

    /// Records decoded with the registry schema `id` (stamped on the ones rejected).
    pub fn with_schema_id(mut self, id: u32) -> Self {
        self.schema_id = Some(id);
        self
    }

    /// The decoded record (the Connect payload when records carry the envelope).
    fn payload(&self, batch: RecordBatch) -> RecordBatch {
        use arrow::array::{Array, AsArray};
        if !self.connect_envelope {
            return batch;
        }
        let payload = batch.column(0).as_struct();
        // A null payload (`"payload": null`) is a row of nulls.
        let columns = payload
            .columns()
            .iter()
            .map(|c| super::debezium::with_parent_nulls(c, payload.nulls()))
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(payload.fields().clone())), columns)
            .expect("the payload's own columns")
    }

    pub fn schema_id(&self) -> Option<u32> {
        self.schema_id
    }

    pub fn pending_rows(&self) -> usize {
        self.pending.len()
    }

    fn error(&self, rec: &Record, class: &'static str, reason: String) -> DecodeError {
        DecodeError {
            tp: self.tp.clone(),
            offset: rec.offset,
            class,
            reason,
            schema_id: self.schema_id,
            retryable: false,
        }
    }

    /// Adds one record; when a batch is full, emits it first. Records that are not exactly one
    /// JSON object, or that do not fit the schema, come back in `rejected` when their batch is
    /// emitted.
    pub fn push(&mut self, rec: Record, out: &mut Vec<RecordBatch>, rejected: &mut Vec<Rejected>) {
        if self.pending.len() >= self.batch_size {
            self.emit(out, rejected);
        }
        self.pending.push(rec);
    }

    /// Emits what is buffered.
    pub fn finish(&mut self, out: &mut Vec<RecordBatch>, rejected: &mut Vec<Rejected>) {
        self.emit(out, rejected);
    }

    /// Decodes the pending records into one batch. The single-pass decoder takes the batch when
    /// every record is one it converts exactly as arrow-json would; otherwise arrow-json decodes
    /// it, rejecting the malformed records on the way, and a batch with type errors is decoded
    /// again record by record ([`Self::isolate`]).
    fn emit(&mut self, out: &mut Vec<RecordBatch>, rejected: &mut Vec<Rejected>) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        if let Some(batch) = self.fast.as_mut().and_then(|f| f.decode(&pending)) {
            for rec in &pending {
                self.meta
                    .push(rec.offset, rec.timestamp_ms, rec.key.as_deref());
            }
            let batch = self.payload(batch);
            out.push(with_meta(batch, self.meta.finish()));
            pending.clear();
            self.pending = pending;
            return;
        }
        let mut decoder = build(&self.schema, pending.len());
        let mut kept = 0;
        for i in 0..pending.len() {
            if let Err(reason) = decode_one(&mut decoder, &pending[i]) {
                let rec = pending[i].clone();
                let error = self.error(&rec, "malformed", reason);
                rejected.push(Rejected { error, record: rec });
                // The tape may hold part of the bad record: rebuild it from the kept ones.
                decoder = build(&self.schema, pending.len());
                for p in &pending[..kept] {
                    let _ = decoder.decode(body(p.payload.as_deref().unwrap_or_default()));
                }
                continue;
            }
            pending.swap(kept, i);
            kept += 1;
        }
        pending.truncate(kept);
        match decoder.flush() {
            Ok(Some(batch)) => {
                for rec in &pending {
                    self.meta
                        .push(rec.offset, rec.timestamp_ms, rec.key.as_deref());
                }
                let batch = self.payload(batch);
                out.push(with_meta(batch, self.meta.finish()));
            }
            Ok(None) => {}
            Err(_) => {
                drop(decoder);
                self.isolate(&pending, out, rejected);
            }
        }
        // The buffer's allocation is reused for the next batch.
        pending.clear();
        self.pending = pending;
    }

    /// Decodes `records` one by one: the failing ones are rejected.
    fn isolate(
        &mut self,
        records: &[Record],
        out: &mut Vec<RecordBatch>,
        rejected: &mut Vec<Rejected>,
    ) {
        let mut good = Vec::with_capacity(records.len());
        for rec in records {
            let mut probe = build(&self.schema, 1);
            let result = probe
                .decode(body(rec.payload.as_deref().unwrap_or_default()))
                .and_then(|_| probe.flush());
            match result {
                Ok(Some(b)) => {
                    self.meta
                        .push(rec.offset, rec.timestamp_ms, rec.key.as_deref());
                    good.push(b);
                }
                Ok(None) => {}
                Err(e) => {
                    let error = self.error(
                        rec,
                        "type-mismatch",
                        format!("does not fit the table schema: {e}"),
                    );
                    rejected.push(Rejected {
                        error,
                        record: rec.clone(),
                    });
                }
            }
        }
        if good.is_empty() {
            self.meta.finish();
            return;
        }
        let batch = concat_batches(&self.schema, &good).expect("batches of one schema");
        let batch = self.payload(batch);
        let meta = self.meta.finish();
        out.push(with_meta(batch, meta));
    }
}

/// Feeds one record to `decoder`: `Err` says why it is not exactly one JSON value.
pub(super) fn decode_one(decoder: &mut Decoder, rec: &Record) -> Result<(), String> {
    let payload = body(rec.payload.as_deref().unwrap_or_default());
    let before = decoder.len();
    match decoder.decode(payload) {
        Err(e) => Err(format!("not valid JSON: {e}")),
        Ok(n) if n < payload.len() => Err("more than one JSON value in the record".into()),
        Ok(_) if decoder.has_partial_record() => Err("truncated JSON".into()),
        Ok(_) if decoder.len() > before + 1 => Err(format!(
            "more than one JSON value in the record (found {})",
            decoder.len() - before
        )),
        Ok(_) if decoder.len() == before => Err("no JSON value in the record".into()),
        Ok(_) => Ok(()),
    }
}

pub(super) fn build(schema: &SchemaRef, batch_size: usize) -> Decoder {
    ReaderBuilder::new(schema.clone())
        .with_batch_size(batch_size.max(1) * 2)
        .build_decoder()
        .expect("a declared schema of supported types builds a decoder")
}

fn with_meta(batch: RecordBatch, meta: Vec<(Field, arrow::array::ArrayRef)>) -> RecordBatch {
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    let mut columns = batch.columns().to_vec();
    for (f, a) in meta {
        fields.push(Arc::new(f));
        columns.push(a);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .expect("metadata columns match the rows")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64, json: &str) -> Record {
        Record {
            offset,
            timestamp_ms: None,
            key: None,
            payload: Some(bytes::Bytes::copy_from_slice(json.as_bytes())),
            headers: vec![],
        }
    }

    #[test]
    fn bad_records_are_isolated_and_the_rest_kept_in_order() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("price", parse_type("decimal(10,2)").unwrap(), true),
            Field::new("at", parse_type("timestamp").unwrap(), true),
        ]));
        let mut d = JsonDecoder::new(
            TopicPartition::new("t", 0),
            schema,
            false,
            false,
            MetadataConfig::default(),
            100,
        );
        let (mut out, mut rejected) = (Vec::new(), Vec::new());
        for (offset, json) in [
            (
                0,
                r#"{"id": 1, "price": "12.34", "at": "2026-11-21T10:00:00Z"}"#,
            ),
            (1, r#"{"id": 2,"#),
            (2, r#"{"id": "not a number"}"#),
            (3, r#"{"id": 4, "price": 5, "extra": true}"#),
            (4, r#"{"id": 5}{"id": 6}"#),
            (5, "  "),
        ] {
            d.push(rec(offset, json), &mut out, &mut rejected);
        }
        assert!(
            out.is_empty() && rejected.is_empty(),
            "nothing is decoded before the batch is emitted"
        );
        d.finish(&mut out, &mut rejected);
        let why: Vec<(i64, &str, &str)> = rejected
            .iter()
            .map(|r| {
                (
                    r.record.offset,
                    r.error.class,
                    r.error.reason.split(':').next().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            why,
            vec![
                (1, "malformed", "truncated JSON"),
                (
                    4,
                    "malformed",
                    "more than one JSON value in the record (found 2)"
                ),
                (5, "malformed", "no JSON value in the record"),
                (2, "type-mismatch", "does not fit the table schema"),
            ]
        );
        assert!(d.pending.is_empty() && d.pending.capacity() >= 6);
        let b = &out[0];
        assert_eq!(b.num_rows(), 2);
        let offsets = b.column_by_name("_kafka_offset").unwrap();
        let offsets = offsets
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        assert_eq!(
            offsets.values().to_vec(),
            vec![0, 3],
            "good records keep their order"
        );
        let ids = arrow::util::pretty::pretty_format_batches(&[b.project(&[0, 1, 2]).unwrap()])
            .unwrap()
            .to_string();
        assert!(
            ids.contains("12.34") && ids.contains("5.00") && ids.contains("2026-11-21T10:00:00"),
            "{ids}"
        );
    }

    /// The bench's order lines, plain and in Debezium envelopes, take the single-pass decoder,
    /// and it decodes them as arrow-json does.
    #[test]
    fn order_lines_take_the_single_pass_decoder() {
        use crate::app::workload::{Order, ORDER_JSON_SCHEMA};
        let cols: toml::Table = toml::from_str(&format!("s = {ORDER_JSON_SCHEMA}")).unwrap();
        let fields: Vec<Field> = cols["s"]
            .as_table()
            .unwrap()
            .iter()
            .map(|(n, t)| Field::new(n, parse_type(t.as_str().unwrap()).unwrap(), true))
            .collect();
        let row = Arc::new(Schema::new(fields));
        for debezium in [false, true] {
            let mut d = JsonDecoder::new(
                TopicPartition::new("t", 0),
                row.clone(),
                debezium,
                false,
                MetadataConfig::default(),
                500,
            );
            let recs: Vec<Record> = (0..500)
                .map(|id| {
                    let line = Order::generate(id).json_line();
                    let line = if debezium {
                        format!(
                            r#"{{"before":null,"after":{line},"source":{{"connector":"mysql","db":"shop","table":"t","ts_ms":{id}}},"op":"c","ts_ms":{id}}}"#
                        )
                    } else {
                        line
                    };
                    rec(id, &line)
                })
                .collect();
            let fast = d.fast.as_mut().expect("the order schema is supported");
            let got = fast.decode(&recs).expect("order lines are well-formed");
            let mut reference = build(&d.schema, recs.len());
            for r in &recs {
                decode_one(&mut reference, r).unwrap();
            }
            assert_eq!(
                Some(got),
                reference.flush().unwrap(),
                "debezium: {debezium}"
            );
        }
    }

    #[test]
    fn declared_types_parse() {
        assert_eq!(
            parse_type("decimal(60, 6)").unwrap(),
            DataType::Decimal256(60, 6)
        );
        assert!(parse_type("decimal(5,9)").is_err());
        assert!(parse_type("varchar").is_err());
    }
}
