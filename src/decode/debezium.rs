//! Debezium change events: the envelope (`before`, `after`, `source`, `op`, `ts_ms`) unwrapped to
//! the row image, with Debezium and Kafka Connect semantic types converted.
//!
//! Output columns: the row's fields (`after` for creates, updates and snapshot reads; `before`
//! for deletes; null for truncates), then `_op` (`c`, `u`, `d`, `r`, `t`), `_deleted`, `_source_ts` (UTC ms, when the
//! database made the change), the source position for ordering (`_source_lsn` for PostgreSQL,
//! `_source_file` / `_source_pos` for MySQL binlogs, `_source_db`, `_source_table`, whichever the
//! source block has), then the Kafka metadata columns.
//!
//! Semantic types (from the `connect.name` of the Avro type, which arrow-avro does not keep):
//! `io.debezium.time.Date` and Connect `Date` → Date32; `Time` → Time32(ms); `MicroTime` →
//! Time64(µs); `NanoTime` → Time64(ns); `Timestamp` and Connect `Timestamp` → Timestamp(ms);
//! `MicroTimestamp` → Timestamp(µs); `NanoTimestamp` → Timestamp(ns) (database-local wall time,
//! no zone); `ZonedTimestamp` (ISO-8601 string) → Timestamp(µs, +00:00); Connect `Decimal` (bytes
//! with a `scale` parameter) → Decimal128(precision or 38, scale).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    make_array, Array, ArrayRef, AsArray, BooleanArray, Decimal128Builder, StringArray,
};
use arrow::buffer::NullBuffer;
use arrow::compute::kernels::zip::zip;
use arrow::compute::{cast, cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

/// A semantic type found in the row schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Semantic {
    Date,
    TimeMillis,
    TimeMicros,
    TimeNanos,
    TimestampMillis,
    TimestampMicros,
    TimestampNanos,
    Zoned,
    Decimal { precision: u8, scale: i8 },
}

/// The semantic types of the row fields, by field name, from the envelope's Avro schema.
pub fn semantic_types(envelope_schema: &str) -> HashMap<String, Semantic> {
    let mut out = HashMap::new();
    let Ok(schema) = serde_json::from_str::<Value>(envelope_schema) else {
        return out;
    };
    let mut named = HashMap::new();
    collect_records(&schema, &mut named);
    let row = schema["fields"]
        .as_array()
        .and_then(|f| {
            f.iter()
                .find(|f| f["name"] == "after" || f["name"] == "before")
        })
        .map(|f| &f["type"]);
    let Some(row) = row.and_then(|t| record_of(t, &named)) else {
        return out;
    };
    for f in row["fields"].as_array().into_iter().flatten() {
        let Some(name) = f["name"].as_str() else {
            continue;
        };
        if let Some(sem) = semantic_of(&f["type"]) {
            out.insert(name.to_string(), sem);
        }
    }
    out
}

fn collect_records<'a>(v: &'a Value, out: &mut HashMap<String, &'a Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|b| collect_records(b, out)),
        Value::Object(o) => {
            if o.get("type").and_then(Value::as_str) == Some("record") {
                if let Some(n) = o.get("name").and_then(Value::as_str) {
                    out.insert(n.to_string(), v);
                    if let Some(ns) = o.get("namespace").and_then(Value::as_str) {
                        out.insert(format!("{ns}.{n}"), v);
                    }
                }
            }
            for f in o
                .get("fields")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                collect_records(&f["type"], out);
            }
            if let Some(t) = o.get("type").filter(|t| !t.is_string()) {
                collect_records(t, out);
            }
        }
        _ => {}
    }
}

fn record_of<'a>(t: &'a Value, named: &HashMap<String, &'a Value>) -> Option<&'a Value> {
    match t {
        Value::Array(branches) => branches.iter().find_map(|b| record_of(b, named)),
        Value::String(s) => named.get(s).copied(),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("record") => Some(t),
        _ => None,
    }
}

fn semantic_of(t: &Value) -> Option<Semantic> {
    match t {
        Value::Array(branches) => branches.iter().find_map(semantic_of),
        Value::Object(o) => {
            let name = o.get("connect.name").and_then(Value::as_str)?;
            Some(match name {
                "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => Semantic::Date,
                "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => {
                    Semantic::TimeMillis
                }
                "io.debezium.time.MicroTime" => Semantic::TimeMicros,
                "io.debezium.time.NanoTime" => Semantic::TimeNanos,
                "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
                    Semantic::TimestampMillis
                }
                "io.debezium.time.MicroTimestamp" => Semantic::TimestampMicros,
                "io.debezium.time.NanoTimestamp" => Semantic::TimestampNanos,
                "io.debezium.time.ZonedTimestamp" => Semantic::Zoned,
                "org.apache.kafka.connect.data.Decimal" => {
                    let params = o.get("connect.parameters");
                    let param = |k: &str| {
                        params
                            .and_then(|p| p.get(k))
                            .and_then(|v| {
                                v.as_str()
                                    .map(str::to_string)
                                    .or(v.as_u64().map(|n| n.to_string()))
                            })
                            .and_then(|s| s.parse::<i64>().ok())
                    };
                    let scale = param("scale")
                        .or(o.get("scale").and_then(Value::as_i64))
                        .unwrap_or(0);
                    let precision = param("connect.decimal.precision")
                        .or(o.get("precision").and_then(Value::as_i64))
                        .unwrap_or(38);
                    Semantic::Decimal {
                        precision: precision.clamp(1, 38) as u8,
                        scale: scale.clamp(0, 38) as i8,
                    }
                }
                _ => return None,
            })
        }
        _ => None,
    }
}

/// What Debezium sends for a value it does not have (`unavailable.value.placeholder`, its
/// default): a TOASTed column an UPDATE left alone, under PostgreSQL's default replica identity.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// The column of upsert rows naming the columns whose stored value they keep.
pub const UNCHANGED_COLUMN: &str = "_unchanged";

/// For upserts: the row columns holding [`UNAVAILABLE`] (as text, as bytes, or as a one-element
/// text array) are set null there and named in an [`UNCHANGED_COLUMN`] list (null when none),
/// so the sink keeps the stored value instead of writing the marker. `row_columns` are the
/// leading columns that are the row's own (as [`unwrap`] outputs them, before `_op`).
pub fn mark_unavailable(batch: RecordBatch) -> Result<RecordBatch, String> {
    use arrow::array::{ListBuilder, StringBuilder};
    let schema = batch.schema();
    let row_columns = schema.index_of("_op").unwrap_or(0);
    let n = batch.num_rows();
    let mut named: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut columns = batch.columns().to_vec();
    for (c, column) in columns.iter_mut().enumerate().take(row_columns) {
        let hits: Vec<usize> = match column.data_type() {
            DataType::Utf8 => {
                let a = column.as_string::<i32>();
                (0..n)
                    .filter(|&i| a.is_valid(i) && a.value(i) == UNAVAILABLE)
                    .collect()
            }
            DataType::Binary => {
                let a = column.as_binary::<i32>();
                (0..n)
                    .filter(|&i| a.is_valid(i) && a.value(i) == UNAVAILABLE.as_bytes())
                    .collect()
            }
            DataType::List(item) if item.data_type() == &DataType::Utf8 => {
                let a = column.as_list::<i32>();
                (0..n)
                    .filter(|&i| {
                        a.is_valid(i) && {
                            let v = a.value(i);
                            let v = v.as_string::<i32>();
                            v.len() == 1 && v.is_valid(0) && v.value(0) == UNAVAILABLE
                        }
                    })
                    .collect()
            }
            _ => continue,
        };
        if hits.is_empty() {
            continue;
        }
        let mut valid: Vec<bool> = (0..n).map(|i| column.is_valid(i)).collect();
        for &i in &hits {
            valid[i] = false;
            named[i].push(c);
        }
        let data = column
            .to_data()
            .into_builder()
            .nulls(Some(NullBuffer::from(valid)))
            .build()
            .map_err(|e| e.to_string())?;
        *column = make_array(data);
    }
    let mut list = ListBuilder::new(StringBuilder::new());
    for cols in &named {
        if cols.is_empty() {
            list.append_null();
            continue;
        }
        for &c in cols {
            list.values().append_value(schema.field(c).name());
        }
        list.append(true);
    }
    let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
    let at = schema.index_of("_deleted").map_or(fields.len(), |i| i + 1);
    let list = list.finish();
    fields.insert(
        at,
        Arc::new(Field::new(UNCHANGED_COLUMN, list.data_type().clone(), true)),
    );
    columns.insert(at, Arc::new(list));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}

/// The row changes of a batch of Debezium envelopes (`op` create, update, delete, read or
/// truncate), and how many records were not row changes: heartbeats and schema-change events
/// (no `op`), logical-decoding messages (`op: "m"`). `None` when no row change is left.
pub fn row_changes(batch: RecordBatch) -> Result<(Option<RecordBatch>, usize), String> {
    let n = batch.num_rows();
    let has_row =
        batch.column_by_name("after").is_some() || batch.column_by_name("before").is_some();
    let Some(op) = batch.column_by_name("op").filter(|_| has_row) else {
        return Ok((None, n));
    };
    let op = cast(op, &DataType::Utf8).map_err(|e| e.to_string())?;
    let keep: BooleanArray = op
        .as_string::<i32>()
        .iter()
        .map(|o| Some(matches!(o, Some("c" | "u" | "d" | "r" | "t"))))
        .collect();
    let skipped = keep.false_count();
    Ok(match skipped {
        0 => (Some(batch), 0),
        _ if skipped == n => (None, n),
        _ => (
            Some(arrow::compute::filter_record_batch(&batch, &keep).map_err(|e| e.to_string())?),
            skipped,
        ),
    })
}

/// Unwraps a batch of Debezium envelopes (as arrow-avro decodes them) into row images.
pub fn unwrap(
    batch: &RecordBatch,
    semantics: &HashMap<String, Semantic>,
) -> Result<RecordBatch, String> {
    let col = |n: &str| batch.column_by_name(n);
    let op = col("op").ok_or("not a Debezium envelope: no `op` field")?;
    let op = cast(op, &DataType::Utf8).map_err(|e| e.to_string())?;
    let op = op.as_string::<i32>();
    let after = col("after").and_then(|a| a.as_struct_opt().cloned());
    let before = col("before").and_then(|a| a.as_struct_opt().cloned());
    let row_type = after
        .as_ref()
        .or(before.as_ref())
        .ok_or("not a Debezium envelope: no `before`/`after` record")?;
    let deleted: BooleanArray = op.iter().map(|o| Some(o == Some("d"))).collect();
    let deletes = deleted.true_count();

    let mut fields: Vec<Arc<Field>> = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (i, f) in row_type.fields().iter().enumerate() {
        let pick = |s: &arrow::array::StructArray| with_parent_nulls(s.column(i), s.nulls());
        // Deletes take the `before` image, the rest `after`; a batch without deletes (or of
        // deletes only) takes one side as it is, without copying it.
        let value = match (&after, &before) {
            (Some(a), Some(b)) if 0 < deletes && deletes < deleted.len() => {
                zip(&deleted, &pick(b), &pick(a)).map_err(|e| e.to_string())?
            }
            (Some(a), Some(_)) if deletes == 0 => pick(a),
            (Some(a), None) => pick(a),
            (_, Some(b)) => pick(b),
            (None, None) => unreachable!(),
        };
        let (field, value) = convert(f.name(), value, semantics.get(f.name()))?;
        fields.push(Arc::new(field));
        columns.push(value);
    }
    fields.push(Arc::new(Field::new("_op", DataType::Utf8, true)));
    columns.push(Arc::new(StringArray::from_iter(op.iter())));
    fields.push(Arc::new(Field::new("_deleted", DataType::Boolean, false)));
    columns.push(Arc::new(deleted));
    if let Some(source) = col("source").and_then(|s| s.as_struct_opt()) {
        if let Some(ts) = source.column_by_name("ts_ms") {
            let ms = cast(ts, &DataType::Int64).map_err(|e| e.to_string())?;
            let ms = ms.as_primitive::<Int64Type>();
            fields.push(Arc::new(Field::new(
                "_source_ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                true,
            )));
            columns.push(Arc::new(
                ms.reinterpret_cast::<arrow::datatypes::TimestampMillisecondType>()
                    .with_timezone("UTC"),
            ));
        }
        for name in ["db", "table", "lsn", "file", "pos", "row"] {
            if let Some(c) = source.column_by_name(name) {
                let c = with_parent_nulls(c, source.nulls());
                fields.push(Arc::new(Field::new(
                    format!("_source_{name}"),
                    c.data_type().clone(),
                    true,
                )));
                columns.push(c);
            }
        }
    }
    // Debezium's transaction block (`provide.transaction.metadata=true`).
    if let Some(tx) = col("transaction").and_then(|s| s.as_struct_opt()) {
        for (name, out) in [
            ("id", "_transaction_id"),
            ("total_order", "_transaction_total_order"),
            ("data_collection_order", "_transaction_collection_order"),
        ] {
            if let Some(c) = tx.column_by_name(name) {
                let c = with_parent_nulls(c, tx.nulls());
                fields.push(Arc::new(Field::new(out, c.data_type().clone(), true)));
                columns.push(c);
            }
        }
    }
    // Kafka metadata columns pass through.
    for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
        if f.name().starts_with("_kafka_") {
            fields.push(f.clone());
            columns.push(c.clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}

/// A struct child with the struct's own nulls applied (a null `after` has null fields).
pub(super) fn with_parent_nulls(child: &ArrayRef, parent: Option<&NullBuffer>) -> ArrayRef {
    let Some(parent) = parent else {
        return child.clone();
    };
    let nulls = NullBuffer::union(Some(parent), child.nulls());
    let data = child.to_data().into_builder().nulls(nulls).build();
    match data {
        Ok(d) => make_array(d),
        Err(_) => child.clone(),
    }
}

fn convert(name: &str, col: ArrayRef, sem: Option<&Semantic>) -> Result<(Field, ArrayRef), String> {
    let retype = |dt: DataType, col: &ArrayRef| -> Result<ArrayRef, String> {
        // Same physical width: reinterpret the buffers.
        make_array(
            col.to_data()
                .into_builder()
                .data_type(dt)
                .build()
                .map_err(|e| e.to_string())?,
        )
        .pipe(Ok)
    };
    let out: ArrayRef = match (sem, col.data_type()) {
        (Some(Semantic::Date), DataType::Int32) => retype(DataType::Date32, &col)?,
        (Some(Semantic::TimeMillis), DataType::Int32) => {
            retype(DataType::Time32(TimeUnit::Millisecond), &col)?
        }
        (Some(Semantic::TimeMicros), DataType::Int64) => {
            retype(DataType::Time64(TimeUnit::Microsecond), &col)?
        }
        (Some(Semantic::TimeNanos), DataType::Int64) => {
            retype(DataType::Time64(TimeUnit::Nanosecond), &col)?
        }
        (Some(Semantic::TimestampMillis), DataType::Int64) => {
            retype(DataType::Timestamp(TimeUnit::Millisecond, None), &col)?
        }
        (Some(Semantic::TimestampMicros), DataType::Int64) => {
            retype(DataType::Timestamp(TimeUnit::Microsecond, None), &col)?
        }
        (Some(Semantic::TimestampNanos), DataType::Int64) => {
            retype(DataType::Timestamp(TimeUnit::Nanosecond, None), &col)?
        }
        (Some(Semantic::Zoned), DataType::Utf8) => cast_with_options(
            &col,
            &DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            &CastOptions {
                safe: false,
                ..Default::default()
            },
        )
        .map_err(|e| format!("field `{name}`: not an ISO-8601 timestamp: {e}"))?,
        (Some(Semantic::Decimal { precision, scale }), DataType::Binary) => {
            decimal_from_bytes(name, col.as_binary::<i32>(), *precision, *scale)?
        }
        _ => col,
    };
    Ok((Field::new(name, out.data_type().clone(), true), out))
}

/// Big-endian two's complement bytes (Connect's `Decimal`) to Decimal128(`precision`, `scale`).
pub(super) fn decimal_from_bytes(
    name: &str,
    bin: &arrow::array::BinaryArray,
    precision: u8,
    scale: i8,
) -> Result<ArrayRef, String> {
    let mut b = Decimal128Builder::with_capacity(bin.len());
    for v in bin.iter() {
        match v {
            None => b.append_null(),
            Some(bytes) if bytes.len() <= 16 => {
                let fill = if bytes.first().is_some_and(|x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut buf = [fill; 16];
                buf[16 - bytes.len()..].copy_from_slice(bytes);
                b.append_value(i128::from_be_bytes(buf));
            }
            Some(bytes) => {
                return Err(format!(
                    "field `{name}`: a {}-byte decimal does not fit 38 digits",
                    bytes.len()
                ))
            }
        }
    }
    Ok(Arc::new(
        b.finish()
            .with_precision_and_scale(precision, scale)
            .map_err(|e| format!("field `{name}`: {e}"))?,
    ))
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

#[cfg(test)]
#[path = "debezium_tests.rs"]
mod tests;
