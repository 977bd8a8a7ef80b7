//! Appending one field's wire values to its column builder, and finishing builders into Arrow
//! arrays: the scalar conversions, packed runs, merged messages, well-known types, and the
//! null / default values of absent fields.

use std::sync::Arc;

use arrow::array::{ArrayRef, ListArray, MapArray, StructArray};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::DataType;

use super::super::wire::{self, next_field, Raw};
use super::{Col, FieldPlan, Scalar, Seen};

fn wrong_wire(f: &FieldPlan, raw: &Raw, want: &str) -> String {
    format!(
        "field {} (`{}`): {} value where the schema has a {want}",
        f.number,
        f.name,
        raw.wire_name()
    )
}

/// Appends field `f` as seen (`s`) to its column.
pub(super) fn append(col: &mut Col, f: &FieldPlan, s: &Seen, buf: &[u8]) -> Result<(), String> {
    match col {
        Col::List(item, offsets, _) => {
            for raw in &s.all {
                match raw {
                    Raw::Bytes(a, b) if packable(item) => {
                        let packed = &buf[*a..*b];
                        let mut p = 0;
                        while p < packed.len() {
                            let v = packed_next(item, packed, &mut p)?;
                            value(item, f, v, packed)?;
                        }
                    }
                    _ => value(item, f, *raw, buf)?,
                }
            }
            let n = item_count(item);
            offsets.push(i32::try_from(n).map_err(|_| "a list column exceeds 2^31 values")?);
        }
        Col::Map(entries, offsets, _) => {
            for raw in &s.all {
                let Raw::Bytes(a, b) = raw else {
                    return Err(wrong_wire(f, raw, "map entry"));
                };
                entries.decode(&buf[*a..*b])?;
            }
            let n = entries.cols.first().map_or(0, item_count);
            offsets.push(i32::try_from(n).map_err(|_| "a map column exceeds 2^31 entries")?);
        }
        _ if f.message && s.all.len() > 1 => {
            // A singular message seen twice merges: decode the concatenation.
            let mut merged = Vec::new();
            for raw in &s.all {
                if let Raw::Bytes(a, b) = raw {
                    merged.extend_from_slice(&buf[*a..*b]);
                }
            }
            let len = merged.len();
            value(col, f, Raw::Bytes(0, len), &merged)?;
        }
        _ => match s.last {
            Some(raw) => value(col, f, raw, buf)?,
            None if f.presence => append_null(col),
            None => append_default(col),
        },
    }
    Ok(())
}

/// Whether `col` holds a scalar protobuf may pack (numbers, booleans and enums).
fn packable(col: &Col) -> bool {
    matches!(
        col,
        Col::Bool(..)
            | Col::I32(..)
            | Col::I64(..)
            | Col::Dec(..)
            | Col::F32(_)
            | Col::F64(_)
            | Col::Enum(..)
    )
}

/// The next element of a packed run for `item`'s wire encoding.
fn packed_next(item: &Col, buf: &[u8], p: &mut usize) -> Result<Raw, String> {
    let scalar = match item {
        Col::Bool(_, s) | Col::I32(_, s) | Col::I64(_, s) | Col::Dec(_, s) => *s,
        Col::F32(_) => Scalar::F32,
        Col::F64(_) => Scalar::F64,
        _ => Scalar::I32, // enums: varints
    };
    let fixed = |n: usize, p: &mut usize| -> Result<u64, String> {
        let b = buf
            .get(*p..*p + n)
            .ok_or("a packed run ends inside a value")?;
        *p += n;
        Ok(b.iter().rev().fold(0u64, |v, x| v << 8 | u64::from(*x)))
    };
    Ok(match scalar {
        Scalar::Fx32 | Scalar::SFx32 | Scalar::F32 => Raw::Fixed32(fixed(4, p)? as u32),
        Scalar::Fx64 | Scalar::SFx64 | Scalar::F64 => Raw::Fixed64(fixed(8, p)?),
        _ => Raw::Varint(wire::varint(buf, p)?),
    })
}

fn zigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// Appends one wire value to a value column.
fn value(col: &mut Col, f: &FieldPlan, raw: Raw, buf: &[u8]) -> Result<(), String> {
    let bytes = |want: &str| match raw {
        Raw::Bytes(a, b) => Ok(&buf[a..b]),
        _ => Err(wrong_wire(f, &raw, want)),
    };
    match col {
        Col::Bool(b, _) => b.append_value(varint_of(f, raw)? != 0),
        Col::I32(b, s) => b.append_value(match (*s, raw) {
            (Scalar::SFx32, Raw::Fixed32(v)) => v as i32,
            (Scalar::S32, Raw::Varint(v)) => zigzag(v) as i32,
            (Scalar::I32, Raw::Varint(v)) => v as i32,
            _ => return Err(wrong_wire(f, &raw, "32-bit integer")),
        }),
        Col::I64(b, s) => b.append_value(match (*s, raw) {
            (Scalar::SFx64, Raw::Fixed64(v)) => v as i64,
            (Scalar::Fx32, Raw::Fixed32(v)) => i64::from(v),
            (Scalar::S64, Raw::Varint(v)) => zigzag(v),
            (Scalar::U32, Raw::Varint(v)) => i64::from(v as u32),
            (Scalar::I64, Raw::Varint(v)) => v as i64,
            _ => return Err(wrong_wire(f, &raw, "64-bit integer")),
        }),
        Col::Dec(b, _) => match raw {
            Raw::Varint(v) | Raw::Fixed64(v) => b.append_value(i128::from(v)),
            _ => return Err(wrong_wire(f, &raw, "unsigned 64-bit integer")),
        },
        Col::F32(b) => match raw {
            Raw::Fixed32(v) => b.append_value(f32::from_bits(v)),
            _ => return Err(wrong_wire(f, &raw, "float")),
        },
        Col::F64(b) => match raw {
            Raw::Fixed64(v) => b.append_value(f64::from_bits(v)),
            _ => return Err(wrong_wire(f, &raw, "double")),
        },
        Col::Str(b) => b.append_value(
            wire::utf8(bytes("string")?).map_err(|e| format!("field `{}`: {e}", f.name))?,
        ),
        Col::Bin(b) => b.append_value(bytes("bytes")?),
        Col::Enum(b, e) => {
            let n = varint_of(f, raw)? as i32;
            match e.name(n) {
                Some(name) => b.append_value(name),
                None => b.append_value(n.to_string()),
            }
        }
        Col::Timestamp(b) => {
            let (s, n) = seconds_nanos(bytes("google.protobuf.Timestamp")?)?;
            b.append_value(s.saturating_mul(1_000_000).saturating_add(n / 1000));
        }
        Col::Duration(b) => {
            let (s, n) = seconds_nanos(bytes("google.protobuf.Duration")?)?;
            b.append_value(s.saturating_mul(1_000_000).saturating_add(n / 1000));
        }
        Col::Json(b, render) => b.append_value(render(bytes("message")?)?),
        Col::Present(b) => {
            bytes("message")?;
            b.append_value(true);
        }
        Col::Wrapper(inner) => {
            let m = bytes("wrapper message")?;
            let (mut pos, mut last) = (0, None);
            while pos < m.len() {
                if let (1, Some(r)) = next_field(m, &mut pos)? {
                    last = Some(r);
                }
            }
            match last {
                Some(r) => value(inner, f, r, m)?,
                None => append_default(inner),
            }
        }
        Col::Struct(row, nulls) => {
            row.decode(bytes("message")?)?;
            nulls.append_non_null();
        }
        Col::List(..) | Col::Map(..) => unreachable!("lists are appended whole"),
    }
    Ok(())
}

fn varint_of(f: &FieldPlan, raw: Raw) -> Result<u64, String> {
    match raw {
        Raw::Varint(v) => Ok(v),
        _ => Err(wrong_wire(f, &raw, "varint")),
    }
}

/// `seconds` (1) and `nanos` (2) of a Timestamp or Duration.
fn seconds_nanos(m: &[u8]) -> Result<(i64, i64), String> {
    let (mut s, mut n, mut pos) = (0i64, 0i64, 0);
    while pos < m.len() {
        match next_field(m, &mut pos)? {
            (1, Some(Raw::Varint(v))) => s = v as i64,
            (2, Some(Raw::Varint(v))) => n = i64::from(v as i32),
            _ => {}
        }
    }
    Ok((s, n))
}

pub(super) fn append_null(col: &mut Col) {
    match col {
        Col::Bool(b, _) | Col::Present(b) => b.append_null(),
        Col::I32(b, _) => b.append_null(),
        Col::I64(b, _) | Col::Duration(b) => b.append_null(),
        Col::Dec(b, _) => b.append_null(),
        Col::F32(b) => b.append_null(),
        Col::F64(b) => b.append_null(),
        Col::Str(b) | Col::Enum(b, _) | Col::Json(b, _) => b.append_null(),
        Col::Bin(b) => b.append_null(),
        Col::Timestamp(b) => b.append_null(),
        Col::Wrapper(inner) => append_null(inner),
        Col::Struct(row, nulls) => {
            row.append_nulls();
            nulls.append_null();
        }
        // Absent repeated fields and maps are empty, never null.
        Col::List(item, offsets, _) => offsets.push(item_count(item) as i32),
        Col::Map(entries, offsets, _) => {
            offsets.push(entries.cols.first().map_or(0, item_count) as i32)
        }
    }
}

/// Proto3's value of an absent field without presence.
fn append_default(col: &mut Col) {
    match col {
        Col::Bool(b, _) => b.append_value(false),
        Col::I32(b, _) => b.append_value(0),
        Col::I64(b, _) | Col::Duration(b) => b.append_value(0),
        Col::Dec(b, _) => b.append_value(0),
        Col::F32(b) => b.append_value(0.0),
        Col::F64(b) => b.append_value(0.0),
        Col::Str(b) => b.append_value(""),
        Col::Bin(b) => b.append_value(b""),
        Col::Enum(b, e) => b.append_value(&e.first),
        Col::Wrapper(inner) => append_default(inner),
        _ => append_null(col),
    }
}

/// Values appended to a list's item column so far (its next offset).
pub(super) fn item_count(col: &Col) -> usize {
    use arrow::array::ArrayBuilder;
    match col {
        Col::Bool(b, _) | Col::Present(b) => b.len(),
        Col::I32(b, _) => b.len(),
        Col::I64(b, _) | Col::Duration(b) => b.len(),
        Col::Dec(b, _) => b.len(),
        Col::F32(b) => b.len(),
        Col::F64(b) => b.len(),
        Col::Str(b) | Col::Enum(b, _) | Col::Json(b, _) => b.len(),
        Col::Bin(b) => b.len(),
        Col::Timestamp(b) => b.len(),
        Col::Wrapper(inner) => item_count(inner),
        Col::Struct(_, nulls) => nulls.len(),
        Col::List(_, offsets, _) | Col::Map(_, offsets, _) => offsets.len() - 1,
    }
}

pub(super) fn finish(col: &mut Col) -> Result<ArrayRef, String> {
    Ok(match col {
        Col::Bool(b, _) | Col::Present(b) => Arc::new(b.finish()),
        Col::I32(b, _) => Arc::new(b.finish()),
        Col::I64(b, _) | Col::Duration(b) => Arc::new(b.finish()),
        Col::Dec(b, _) => Arc::new(b.finish()),
        Col::F32(b) => Arc::new(b.finish()),
        Col::F64(b) => Arc::new(b.finish()),
        Col::Str(b) | Col::Enum(b, _) | Col::Json(b, _) => Arc::new(b.finish()),
        Col::Bin(b) => Arc::new(b.finish()),
        Col::Timestamp(b) => Arc::new(b.finish()),
        Col::Wrapper(inner) => finish(inner)?,
        Col::Struct(row, nulls) => {
            let len = nulls.len();
            let columns = row.finish()?;
            let nulls = nulls.finish();
            if columns.is_empty() {
                Arc::new(StructArray::new_empty_fields(len, nulls))
            } else {
                Arc::new(
                    StructArray::try_new(row.arrow.clone(), columns, nulls)
                        .map_err(|e| e.to_string())?,
                )
            }
        }
        Col::List(item, offsets, field) => {
            let values = finish(item)?;
            let offs = OffsetBuffer::new(ScalarBuffer::from(std::mem::replace(offsets, vec![0])));
            Arc::new(
                ListArray::try_new(field.clone(), offs, values, None).map_err(|e| e.to_string())?,
            )
        }
        Col::Map(entries, offsets, field) => {
            let DataType::Struct(fields) = field.data_type() else {
                unreachable!("map entries are structs")
            };
            let columns = entries.finish()?;
            let entries =
                StructArray::try_new(fields.clone(), columns, None).map_err(|e| e.to_string())?;
            let offs = OffsetBuffer::new(ScalarBuffer::from(std::mem::replace(offsets, vec![0])));
            Arc::new(
                MapArray::try_new(field.clone(), offs, entries, None, false)
                    .map_err(|e| e.to_string())?,
            )
        }
    })
}
