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

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, ListArray, StringBuilder, StructArray,
};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use base64::Engine;
use serde_json::Value;
use sinks::TopicPartition;

use super::{DecodeError, JsonDecoder, Record, Rejected};
use crate::config::MetadataConfig;

/// How a decoded (physical) column becomes its table column.
#[derive(Debug, Clone, PartialEq)]
enum Conv {
    Keep,
    /// Same width, another type (`int32` days → Date32).
    Retype(DataType),
    /// ISO-8601 text → Timestamp(µs, UTC).
    Zoned,
    Base64,
    Decimal(u8, i8),
    /// `{scale, value}` → the decimal's text.
    VariableDecimal,
    Struct(Vec<Conv>),
    List(Box<Conv>),
}

/// A Connect schema converted: what arrow-json decodes, and how to finish each column.
#[derive(Debug, PartialEq)]
struct Converted {
    physical: SchemaRef,
    convs: Vec<Conv>,
    /// The table schema the batches come out with.
    output: SchemaRef,
}

/// Converts a Connect schema (a `struct` at the top) to Arrow.
fn convert_schema(schema: &Value) -> Result<Converted, String> {
    if schema["type"] != "struct" {
        return Err(format!(
            "the Connect schema is `{}`, not a struct",
            schema["type"]
        ));
    }
    let (physical, conv) = convert(schema, "")?;
    let (DataType::Struct(fields), Conv::Struct(convs)) = (physical, conv) else {
        unreachable!("a struct converts to a struct")
    };
    let output: Fields = fields
        .iter()
        .zip(&convs)
        .map(|(f, c)| Field::new(f.name(), output_type(f.data_type(), c), true))
        .collect();
    Ok(Converted {
        physical: Arc::new(Schema::new(fields)),
        convs,
        output: Arc::new(Schema::new(output)),
    })
}

fn convert(v: &Value, path: &str) -> Result<(DataType, Conv), String> {
    let ty = v["type"].as_str().unwrap_or_default();
    let name = v["name"].as_str().unwrap_or_default();
    let param = |k: &str| {
        v["parameters"][k]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
    };
    let physical = |t: DataType, c: Conv| Ok((t, c));
    match (ty, name) {
        ("bytes", "org.apache.kafka.connect.data.Decimal") => {
            let scale = param("scale").unwrap_or(0).clamp(0, 38) as i8;
            let precision = param("connect.decimal.precision")
                .unwrap_or(38)
                .clamp(1, 38) as u8;
            physical(
                DataType::Utf8,
                Conv::Decimal(precision.max(scale as u8), scale),
            )
        }
        ("struct", "io.debezium.data.VariableScaleDecimal") => physical(
            DataType::Struct(
                vec![
                    Field::new("scale", DataType::Int32, true),
                    Field::new("value", DataType::Utf8, true),
                ]
                .into(),
            ),
            Conv::VariableDecimal,
        ),
        ("int32", "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => {
            physical(DataType::Int32, Conv::Retype(DataType::Date32))
        }
        ("int32", "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time") => physical(
            DataType::Int32,
            Conv::Retype(DataType::Time32(TimeUnit::Millisecond)),
        ),
        ("int64", "io.debezium.time.MicroTime") => physical(
            DataType::Int64,
            Conv::Retype(DataType::Time64(TimeUnit::Microsecond)),
        ),
        ("int64", "io.debezium.time.NanoTime") => physical(
            DataType::Int64,
            Conv::Retype(DataType::Time64(TimeUnit::Nanosecond)),
        ),
        ("int64", "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => {
            physical(
                DataType::Int64,
                Conv::Retype(DataType::Timestamp(TimeUnit::Millisecond, None)),
            )
        }
        ("int64", "io.debezium.time.MicroTimestamp") => physical(
            DataType::Int64,
            Conv::Retype(DataType::Timestamp(TimeUnit::Microsecond, None)),
        ),
        ("int64", "io.debezium.time.NanoTimestamp") => physical(
            DataType::Int64,
            Conv::Retype(DataType::Timestamp(TimeUnit::Nanosecond, None)),
        ),
        ("string", "io.debezium.time.ZonedTimestamp") => physical(DataType::Utf8, Conv::Zoned),
        ("int8", _) => physical(DataType::Int8, Conv::Keep),
        ("int16", _) => physical(DataType::Int16, Conv::Keep),
        ("int32", _) => physical(DataType::Int32, Conv::Keep),
        ("int64", _) => physical(DataType::Int64, Conv::Keep),
        ("float32", _) => physical(DataType::Float32, Conv::Keep),
        ("float64", _) => physical(DataType::Float64, Conv::Keep),
        ("boolean", _) => physical(DataType::Boolean, Conv::Keep),
        ("string", _) => physical(DataType::Utf8, Conv::Keep),
        ("bytes", _) => physical(DataType::Utf8, Conv::Base64),
        ("array", _) => {
            let (item, conv) = convert(&v["items"], &format!("{path}[]"))?;
            physical(
                DataType::List(Arc::new(Field::new("item", item, true))),
                Conv::List(Box::new(conv)),
            )
        }
        ("map", _) if v["keys"]["type"] == "string" => {
            let (value, conv) = convert(&v["values"], &format!("{path}{{}}"))?;
            if conv != Conv::Keep {
                return Err(format!(
                    "`{path}`: a map of `{}` values is not supported",
                    v["values"]["name"].as_str().unwrap_or("logical")
                ));
            }
            let entries = Field::new(
                "entries",
                DataType::Struct(
                    vec![
                        Field::new("keys", DataType::Utf8, false),
                        Field::new("values", value, true),
                    ]
                    .into(),
                ),
                false,
            );
            physical(DataType::Map(Arc::new(entries), false), Conv::Keep)
        }
        ("struct", _) => {
            let mut fields = Vec::new();
            let mut convs = Vec::new();
            for f in v["fields"].as_array().into_iter().flatten() {
                let fname = f["field"]
                    .as_str()
                    .ok_or_else(|| format!("`{path}`: a struct field without a name"))?;
                let (t, c) = convert(f, &format!("{path}.{fname}"))?;
                fields.push(Field::new(fname, t, true));
                convs.push(c);
            }
            physical(DataType::Struct(fields.into()), Conv::Struct(convs))
        }
        (other, _) => Err(format!(
            "`{}`: the Connect type `{other}` is not supported",
            if path.is_empty() { "/" } else { path }
        )),
    }
}

fn output_type(physical: &DataType, conv: &Conv) -> DataType {
    match (conv, physical) {
        (Conv::Keep, t) => t.clone(),
        (Conv::Retype(t), _) => t.clone(),
        (Conv::Zoned, _) => DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
        (Conv::Base64, _) => DataType::Binary,
        (Conv::Decimal(p, s), _) => DataType::Decimal128(*p, *s),
        (Conv::VariableDecimal, _) => DataType::Utf8,
        (Conv::Struct(convs), DataType::Struct(fields)) => DataType::Struct(
            fields
                .iter()
                .zip(convs)
                .map(|(f, c)| Field::new(f.name(), output_type(f.data_type(), c), true))
                .collect(),
        ),
        (Conv::List(c), DataType::List(item)) => DataType::List(Arc::new(Field::new(
            "item",
            output_type(item.data_type(), c),
            true,
        ))),
        (_, t) => t.clone(),
    }
}

/// Finishes one decoded column.
fn apply(name: &str, col: &ArrayRef, conv: &Conv) -> Result<ArrayRef, String> {
    Ok(match conv {
        Conv::Keep => col.clone(),
        Conv::Retype(t) => arrow::array::make_array(
            col.to_data()
                .into_builder()
                .data_type(t.clone())
                .build()
                .map_err(|e| format!("field `{name}`: {e}"))?,
        ),
        Conv::Zoned => cast_with_options(
            col,
            &DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            &CastOptions {
                safe: false,
                ..Default::default()
            },
        )
        .map_err(|e| format!("field `{name}`: not an ISO-8601 timestamp: {e}"))?,
        Conv::Base64 => Arc::new(base64_column(name, col)?),
        Conv::Decimal(p, s) => {
            let bytes = base64_column(name, col)?;
            super::debezium::decimal_from_bytes(name, &bytes, *p, *s)?
        }
        Conv::VariableDecimal => {
            let s = col.as_struct();
            let scale = s.column(0).as_primitive::<arrow::datatypes::Int32Type>();
            let value = base64_column(name, s.column(1))?;
            let mut out = StringBuilder::new();
            for i in 0..s.len() {
                if s.is_null(i) || value.is_null(i) {
                    out.append_null();
                    continue;
                }
                let bytes = value.value(i);
                if bytes.len() > 16 {
                    return Err(format!("field `{name}`: a decimal wider than 128 bits"));
                }
                out.append_value(decimal_text(be_i128(bytes), scale.value(i)));
            }
            Arc::new(out.finish())
        }
        Conv::Struct(convs) => {
            let s = col.as_struct();
            let mut fields = Vec::with_capacity(convs.len());
            let mut columns = Vec::with_capacity(convs.len());
            for ((f, c), conv) in s.fields().iter().zip(s.columns()).zip(convs) {
                let c = apply(&format!("{name}.{}", f.name()), c, conv)?;
                fields.push(Field::new(f.name(), c.data_type().clone(), true));
                columns.push(c);
            }
            Arc::new(
                StructArray::try_new(fields.into(), columns, s.nulls().cloned())
                    .map_err(|e| format!("field `{name}`: {e}"))?,
            )
        }
        Conv::List(conv) => {
            let l = col.as_list::<i32>();
            let values = apply(&format!("{name}[]"), l.values(), conv)?;
            let field = Arc::new(Field::new("item", values.data_type().clone(), true));
            Arc::new(
                ListArray::try_new(field, l.offsets().clone(), values, l.nulls().cloned())
                    .map_err(|e| format!("field `{name}`: {e}"))?,
            )
        }
    })
}

fn base64_column(name: &str, col: &ArrayRef) -> Result<arrow::array::BinaryArray, String> {
    let text = col.as_string::<i32>();
    let mut out = BinaryBuilder::with_capacity(text.len(), text.value_data().len());
    let mut buf = Vec::new();
    for v in text.iter() {
        match v {
            None => out.append_null(),
            Some(t) => {
                buf.clear();
                base64::engine::general_purpose::STANDARD
                    .decode_vec(t, &mut buf)
                    .map_err(|e| format!("field `{name}`: not base64: {e}"))?;
                out.append_value(&buf);
            }
        }
    }
    Ok(out.finish())
}

fn be_i128(bytes: &[u8]) -> i128 {
    let fill = if bytes.first().is_some_and(|x| x & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut buf = [fill; 16];
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    i128::from_be_bytes(buf)
}

fn decimal_text(unscaled: i128, scale: i32) -> String {
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    if scale <= 0 {
        return format!(
            "{sign}{digits}{}",
            "0".repeat(scale.unsigned_abs() as usize)
        );
    }
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

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

/// Applies the logical conversions to a decoded batch (metadata columns pass through).
fn finish_batch(converted: &Converted, b: RecordBatch) -> Result<RecordBatch, String> {
    let mut fields = Vec::with_capacity(b.num_columns());
    let mut columns = Vec::with_capacity(b.num_columns());
    for (i, (f, c)) in b.schema().fields().iter().zip(b.columns()).enumerate() {
        match converted.convs.get(i) {
            Some(conv) => {
                let c = apply(f.name(), c, conv)?;
                fields.push(Field::new(f.name(), c.data_type().clone(), true));
                columns.push(c);
            }
            None => {
                fields.push(f.as_ref().clone());
                columns.push(c.clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}

#[cfg(test)]
#[path = "connect_json_tests.rs"]
mod tests;
