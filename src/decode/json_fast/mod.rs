//! A single-pass JSON decoder for declared schemas: each record's object is parsed straight into
//! the columns' values, without arrow-json's intermediate tape.
//!
//! It exists for speed. arrow-json first builds a tape of the whole batch (every token, every
//! string copied), then walks it once per column, finding each field by comparing names. Here a
//! record is read once, fields are matched against the one expected next (producers write their
//! fields in the same order every time), and values are converted as they are met.
//!
//! Invariant: **never more lenient than arrow-json, and identical where it accepts.** A batch is
//! accepted only if every record is exactly one JSON object (strict JSON: no control characters in
//! strings, no trailing commas, no leading zeros, at most [`MAX_DEPTH`] levels) whose values this
//! decoder converts exactly as arrow-json does, using the same `arrow_cast` parsers for decimals,
//! timestamps, dates and numeric strings. Anything else (a record that is not one object, a
//! duplicate field, a null in a non-nullable field, an integer column given a fraction, a type
//! this decoder does not know) makes [`Plan::decode`] return `None`, and the caller decodes the
//! batch with arrow-json, which also names the records it rejects. So a bad record costs its
//! batch a second decode, never a different result.

use std::sync::Arc;

use arrow::array::builder::NullBufferBuilder;
use arrow::array::{
    ArrayRef, ArrowPrimitiveType, BooleanBuilder, Decimal128Array, PrimitiveArray, StringBuilder,
    StructArray,
};
use arrow::buffer::NullBuffer;
use arrow::compute::kernels::cast_utils::{parse_decimal, string_to_datetime, Parser};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Fields, Float32Type, Float64Type, Int32Type, Int64Type,
    SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};
use arrow::record_batch::RecordBatch;

use super::Record;

mod column;
mod cursor;

use column::*;
use cursor::*;

/// The deepest nesting accepted (in skipped values too); deeper records go to arrow-json.
pub(super) const MAX_DEPTH: u32 = 64;

/// What a column holds, and how JSON values convert into it.
#[derive(Debug, Clone)]
enum Kind {
    Bool,
    Int32,
    Int64,
    Float32,
    Float64,
    Utf8,
    Date32,
    Timestamp(TimeUnit, arrow::array::timezone::Tz),
    Decimal128(u8, i8),
    Struct(Vec<Node>),
}

#[derive(Debug, Clone)]
struct Node {
    name: Box<[u8]>,
    nullable: bool,
    data_type: DataType,
    kind: Kind,
    /// For a string column: bytes per row to reserve, learnt from the previous batch (so its
    /// values buffer is allocated once, not grown by doubling and copying).
    text_per_row: usize,
}

/// The decoding plan of one schema; `None` from [`Plan::new`] when the schema holds a type this
/// decoder does not convert (those schemas always use arrow-json).
#[derive(Debug, Clone)]
pub(super) struct Plan {
    schema: SchemaRef,
    root: Vec<Node>,
}

fn node(name: &str, nullable: bool, data_type: &DataType) -> Option<Node> {
    let kind = match data_type {
        DataType::Boolean => Kind::Bool,
        DataType::Int32 => Kind::Int32,
        DataType::Int64 => Kind::Int64,
        DataType::Float32 => Kind::Float32,
        DataType::Float64 => Kind::Float64,
        DataType::Utf8 => Kind::Utf8,
        DataType::Date32 => Kind::Date32,
        // Without a time zone arrow-json reads strings as UTC through chrono's `Utc`; declared
        // timestamps always carry one, so only that case is taken here.
        DataType::Timestamp(unit, Some(tz)) => Kind::Timestamp(*unit, tz.parse().ok()?),
        DataType::Decimal128(p, s) => Kind::Decimal128(*p, *s),
        DataType::Struct(fields) => Kind::Struct(nodes(fields)?),
        _ => return None,
    };
    Some(Node {
        name: name.as_bytes().into(),
        nullable,
        data_type: data_type.clone(),
        kind,
        text_per_row: 16,
    })
}

fn nodes(fields: &Fields) -> Option<Vec<Node>> {
    // Fields seen are tracked in a u64 per object.
    if fields.len() > 64 {
        return None;
    }
    fields
        .iter()
        .map(|f| node(f.name(), f.is_nullable(), f.data_type()))
        .collect()
}

impl Plan {
    pub(super) fn new(schema: &SchemaRef) -> Option<Plan> {
        Some(Plan {
            schema: schema.clone(),
            root: nodes(schema.fields())?,
        })
    }

    /// Decodes `records` (their payloads after any 5-byte Confluent framing) into one batch of
    /// the plan's schema, or `None` when any record needs arrow-json's judgement.
    pub(super) fn decode(&mut self, records: &[Record]) -> Option<RecordBatch> {
        let rows = records.len();
        let mut cols: Vec<Col> = self.root.iter().map(|n| Col::new(n, rows)).collect();
        let mut scratch = String::new();
        let mut order = Vec::new();
        for rec in records {
            let payload = super::json::body(rec.payload.as_deref()?);
            let text = std::str::from_utf8(payload).ok()?;
            let mut cur = Cur {
                s: text,
                b: payload,
                i: 0,
            };
            cur.ws();
            cur.eat(b'{')?;
            cur.object(&self.root, &mut cols, &mut order, &mut scratch, 1)?;
            cur.ws();
            if cur.i != payload.len() {
                return None;
            }
        }
        learn_text_sizes(&mut self.root, &cols, rows);
        let columns = self
            .root
            .iter()
            .zip(cols)
            .map(|(n, c)| c.finish(n))
            .collect::<Option<Vec<_>>>()?;
        RecordBatch::try_new(self.schema.clone(), columns).ok()
    }
}

/// Remembers each string column's bytes per row in this batch, an eighth more for the next.
fn learn_text_sizes(nodes: &mut [Node], cols: &[Col], rows: usize) {
    for (node, col) in nodes.iter_mut().zip(cols) {
        match (col, &mut node.kind) {
            (Col::Utf8(b), _) if rows > 0 => {
                node.text_per_row = (b.values_slice().len() * 9 / 8).div_ceil(rows).max(1);
            }
            (Col::Struct(children, ..), Kind::Struct(child_nodes)) => {
                learn_text_sizes(child_nodes, children, rows)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
