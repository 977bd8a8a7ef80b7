//! Kafka Connect schemas (as JsonConverter writes them with `schemas.enable=true`) converted to
//! Arrow: what arrow-json decodes for a schema, and how each decoded column becomes its table
//! column (logical types: decimals, dates, times, timestamps, base64 bytes). The mapping is
//! listed in [`super::connect_json`]'s docs.
//!
//! Invariant: a converted batch has exactly the `output` schema of its [`Converted`].

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, ListArray, StringBuilder, StructArray,
};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use base64::Engine;
use serde_json::Value;

/// How a decoded (physical) column becomes its table column.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Conv {
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
pub(super) struct Converted {
    pub(super) physical: SchemaRef,
    pub(super) convs: Vec<Conv>,
    /// The table schema the batches come out with.
    pub(super) output: SchemaRef,
}

/// Converts a Connect schema (a `struct` at the top) to Arrow.
pub(super) fn convert_schema(schema: &Value) -> Result<Converted, String> {
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

pub(super) fn decimal_text(unscaled: i128, scale: i32) -> String {
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

/// Applies the logical conversions to a decoded batch (metadata columns pass through).
pub(super) fn finish_batch(converted: &Converted, b: RecordBatch) -> Result<RecordBatch, String> {
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
