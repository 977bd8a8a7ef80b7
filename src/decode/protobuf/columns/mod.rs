//! A message type as Arrow columns, and the decoder that fills them straight from the wire.
//!
//! [`Row::new`] walks a message descriptor once and builds a tree of column builders that mirrors
//! it; [`Row::decode`] scans one message level (recording each field's last occurrence, or every
//! occurrence of a repeated field), then appends one value per column, recursing into nested
//! messages. No intermediate value tree is built.
//!
//! Mapping (all columns nullable, declaration order):
//! - `bool`, `int32`/`sint32`/`sfixed32`, `int64`/`sint64`/`sfixed64`, `float`, `double`,
//!   `string`, `bytes` as themselves; `uint32`/`fixed32` as int64 and `uint64`/`fixed64` as
//!   decimal(20, 0) (Delta and most readers have no unsigned types); enums as the value's name
//!   (an unknown number as its digits).
//! - Messages as structs (null when absent); `repeated` as lists (empty when absent); `map<K, V>`
//!   as maps; a `oneof` as one struct column named after it, one nullable field per case, only
//!   the case set last filled.
//! - Well-known types: `Timestamp` as timestamp(µs, UTC), `Duration` as int64 microseconds,
//!   wrappers (`Int64Value`, `StringValue`, …) as nullable scalars, `Struct`/`Value`/`ListValue`
//!   as JSON text, a message with no fields (`Empty`) as a boolean "present".
//! - Absent fields without presence (proto3 implicit) get the type's default (0, "", false, the
//!   enum's first value); fields with presence (proto3 `optional`, proto2, messages, oneof cases)
//!   are null.
//!
//! Invariant: after [`Row::decode`] returns `Ok`, every column holds exactly one more value; after
//! `Err`, the columns are inconsistent and the caller rebuilds them (the decoder replays the batch
//! in progress).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::builder::NullBufferBuilder;
use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Decimal128Builder, Float32Builder, Float64Builder,
    Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, TimeUnit};
use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};

use super::wire::{self, next_field, Raw};
use append::{append, append_null, finish};

mod append;

/// The scalar (leaf) kinds, with how their wire values convert.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scalar {
    Bool,
    I32,
    I64,
    U32,
    U64,
    S32,
    S64,
    Fx32,
    Fx64,
    SFx32,
    SFx64,
    F32,
    F64,
    Str,
    Bin,
}

/// A column being filled.
enum Col {
    Bool(BooleanBuilder, Scalar),
    I32(Int32Builder, Scalar),
    I64(Int64Builder, Scalar),
    Dec(Decimal128Builder, Scalar),
    F32(Float32Builder),
    F64(Float64Builder),
    Str(StringBuilder),
    Bin(BinaryBuilder),
    Enum(StringBuilder, Arc<Enum>),
    Timestamp(TimestampMicrosecondBuilder),
    Duration(Int64Builder),
    /// `Struct`, `Value` or `ListValue` as JSON.
    Json(StringBuilder, fn(&[u8]) -> Result<String, String>),
    /// A message without fields: present or null.
    Present(BooleanBuilder),
    /// A wrapper message (`Int64Value`, …): its field 1.
    Wrapper(Box<Col>),
    Struct(Box<Row>, NullBufferBuilder),
    List(Box<Col>, Vec<i32>, FieldRef),
    /// A map's entries: a `Row` of key and value.
    Map(Box<Row>, Vec<i32>, FieldRef),
}

struct Enum {
    /// Names of the values numbered 0..len (the usual, dense case), by number.
    dense: Vec<Option<String>>,
    /// Names of the others (negative or sparse numbers).
    sparse: HashMap<i32, String>,
    first: String,
}

impl Enum {
    fn name(&self, n: i32) -> Option<&str> {
        match usize::try_from(n).ok().and_then(|i| self.dense.get(i)) {
            Some(name) => name.as_deref(),
            None => self.sparse.get(&n).map(String::as_str),
        }
    }
}

/// Where a field's value goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    Column(usize),
    /// Case `case` of a oneof's struct column (see `Row::oneofs`).
    Case {
        case: usize,
    },
}

struct FieldPlan {
    name: String,
    number: u32,
    target: Target,
    repeated: bool,
    presence: bool,
    message: bool,
}

/// Field number → field index: a table for the usual small numbers, a map for sparse ones.
enum Numbers {
    /// Index + 1 by number (0: no such field).
    Dense(Vec<u16>),
    Sparse(HashMap<u32, usize>),
}

impl Numbers {
    fn new(fields: &[FieldPlan]) -> Numbers {
        let max = fields.iter().map(|f| f.number).max().unwrap_or(0);
        if max <= 1024 && fields.len() < usize::from(u16::MAX) {
            let mut table = vec![0u16; max as usize + 1];
            for (i, f) in fields.iter().enumerate() {
                table[f.number as usize] = i as u16 + 1;
            }
            Numbers::Dense(table)
        } else {
            Numbers::Sparse(
                fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (f.number, i))
                    .collect(),
            )
        }
    }

    fn get(&self, number: u32) -> Option<usize> {
        match self {
            Numbers::Dense(t) => match t.get(number as usize) {
                Some(&i) if i > 0 => Some(usize::from(i) - 1),
                _ => None,
            },
            Numbers::Sparse(m) => m.get(&number).copied(),
        }
    }
}

/// What one message level saw of one field.
#[derive(Default)]
struct Seen {
    last: Option<Raw>,
    /// Every occurrence (repeated fields; singular messages, which merge).
    all: Vec<Raw>,
    /// Where the last occurrence started (which oneof case came last).
    at: usize,
}

/// The columns of one message type: a table's row, a struct column, or a map entry.
pub(super) struct Row {
    fields: Vec<FieldPlan>,
    /// Field number → index into `fields`.
    by_number: Numbers,
    cols: Vec<Col>,
    /// The Arrow fields of `cols`.
    arrow: Fields,
    /// Per oneof column: the indexes of its case fields.
    oneofs: Vec<(usize, Vec<usize>)>,
    seen: Vec<Seen>,
}

fn scalar_of(kind: &Kind) -> Option<Scalar> {
    Some(match kind {
        Kind::Bool => Scalar::Bool,
        Kind::Int32 => Scalar::I32,
        Kind::Int64 => Scalar::I64,
        Kind::Uint32 => Scalar::U32,
        Kind::Uint64 => Scalar::U64,
        Kind::Sint32 => Scalar::S32,
        Kind::Sint64 => Scalar::S64,
        Kind::Fixed32 => Scalar::Fx32,
        Kind::Fixed64 => Scalar::Fx64,
        Kind::Sfixed32 => Scalar::SFx32,
        Kind::Sfixed64 => Scalar::SFx64,
        Kind::Float => Scalar::F32,
        Kind::Double => Scalar::F64,
        Kind::String => Scalar::Str,
        Kind::Bytes => Scalar::Bin,
        Kind::Enum(_) | Kind::Message(_) => return None,
    })
}

fn scalar_col(s: Scalar) -> (Col, DataType) {
    match s {
        Scalar::Bool => (Col::Bool(BooleanBuilder::new(), s), DataType::Boolean),
        Scalar::I32 | Scalar::S32 | Scalar::SFx32 => {
            (Col::I32(Int32Builder::new(), s), DataType::Int32)
        }
        Scalar::I64 | Scalar::S64 | Scalar::SFx64 | Scalar::U32 | Scalar::Fx32 => {
            (Col::I64(Int64Builder::new(), s), DataType::Int64)
        }
        Scalar::U64 | Scalar::Fx64 => (
            Col::Dec(
                Decimal128Builder::new()
                    .with_precision_and_scale(20, 0)
                    .expect("valid decimal"),
                s,
            ),
            DataType::Decimal128(20, 0),
        ),
        Scalar::F32 => (Col::F32(Float32Builder::new()), DataType::Float32),
        Scalar::F64 => (Col::F64(Float64Builder::new()), DataType::Float64),
        Scalar::Str => (Col::Str(StringBuilder::new()), DataType::Utf8),
        Scalar::Bin => (Col::Bin(BinaryBuilder::new()), DataType::Binary),
    }
}

/// The column of one value of `kind` (not counting `repeated`).
fn value_col(kind: &Kind, stack: &mut Vec<String>) -> Result<(Col, DataType), String> {
    if let Some(s) = scalar_of(kind) {
        return Ok(scalar_col(s));
    }
    match kind {
        Kind::Enum(e) => {
            let mut dense = Vec::new();
            let mut sparse = HashMap::new();
            for v in e.values() {
                match usize::try_from(v.number()).ok().filter(|n| *n < 1024) {
                    Some(n) => {
                        if dense.len() <= n {
                            dense.resize(n + 1, None);
                        }
                        dense[n] = Some(v.name().to_string());
                    }
                    None => {
                        sparse.insert(v.number(), v.name().to_string());
                    }
                }
            }
            let first = e.default_value().name().to_string();
            let names = Enum {
                dense,
                sparse,
                first,
            };
            Ok((
                Col::Enum(StringBuilder::new(), Arc::new(names)),
                DataType::Utf8,
            ))
        }
        Kind::Message(m) => message_col(m, stack),
        _ => unreachable!("scalars handled above"),
    }
}

fn message_col(m: &MessageDescriptor, stack: &mut Vec<String>) -> Result<(Col, DataType), String> {
    let name = m.full_name();
    let wrapped = |k: Kind| -> (Col, DataType) {
        let s = scalar_of(&k).expect("wrapper of a scalar");
        let (c, t) = scalar_col(s);
        (Col::Wrapper(Box::new(c)), t)
    };
    Ok(match name {
        "google.protobuf.Timestamp" => (
            Col::Timestamp(TimestampMicrosecondBuilder::new().with_timezone("UTC")),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ),
        "google.protobuf.Duration" => (Col::Duration(Int64Builder::new()), DataType::Int64),
        "google.protobuf.Struct" => (
            Col::Json(StringBuilder::new(), wire::struct_json),
            DataType::Utf8,
        ),
        "google.protobuf.Value" => (
            Col::Json(StringBuilder::new(), wire::value_json),
            DataType::Utf8,
        ),
        "google.protobuf.ListValue" => (
            Col::Json(StringBuilder::new(), wire::list_json),
            DataType::Utf8,
        ),
        "google.protobuf.DoubleValue" => wrapped(Kind::Double),
        "google.protobuf.FloatValue" => wrapped(Kind::Float),
        "google.protobuf.Int64Value" => wrapped(Kind::Int64),
        "google.protobuf.UInt64Value" => wrapped(Kind::Uint64),
        "google.protobuf.Int32Value" => wrapped(Kind::Int32),
        "google.protobuf.UInt32Value" => wrapped(Kind::Uint32),
        "google.protobuf.BoolValue" => wrapped(Kind::Bool),
        "google.protobuf.StringValue" => wrapped(Kind::String),
        "google.protobuf.BytesValue" => wrapped(Kind::Bytes),
        _ if m.fields().next().is_none() => {
            (Col::Present(BooleanBuilder::new()), DataType::Boolean)
        }
        _ => {
            if stack.iter().any(|s| s == name) {
                return Err(format!(
                    "message `{name}` contains itself ({} -> {name}); a recursive message \
                     cannot be a column",
                    stack.join(" -> ")
                ));
            }
            stack.push(name.to_string());
            let row = Row::build(m, stack)?;
            stack.pop();
            let fields = row.arrow.clone();
            (
                Col::Struct(Box::new(row), NullBufferBuilder::new(0)),
                DataType::Struct(fields),
            )
        }
    })
}

fn field_col(f: &FieldDescriptor, stack: &mut Vec<String>) -> Result<(Col, DataType), String> {
    if f.is_map() {
        let Kind::Message(entry) = f.kind() else {
            unreachable!("map fields are messages")
        };
        let row = Row::build(&entry, stack)?;
        let fields = Fields::from(vec![
            row.arrow[0].as_ref().clone().with_nullable(false),
            row.arrow[1].as_ref().clone(),
        ]);
        let entries = Arc::new(Field::new("entries", DataType::Struct(fields), false));
        let t = DataType::Map(entries.clone(), false);
        return Ok((Col::Map(Box::new(row), vec![0], entries), t));
    }
    let (col, t) = value_col(&f.kind(), stack)?;
    if f.is_list() {
        let item = Arc::new(Field::new("item", t, true));
        let t = DataType::List(item.clone());
        return Ok((Col::List(Box::new(col), vec![0], item), t));
    }
    Ok((col, t))
}

impl Row {
    /// The columns of message `m`, or why it cannot be columns (a recursive message).
    pub(super) fn new(m: &MessageDescriptor) -> Result<Row, String> {
        Row::build(m, &mut vec![m.full_name().to_string()])
    }

    fn build(m: &MessageDescriptor, stack: &mut Vec<String>) -> Result<Row, String> {
        let mut fields = Vec::new();
        let mut cols = Vec::new();
        let mut arrow: Vec<Field> = Vec::new();
        let mut oneofs: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut oneof_col: HashMap<String, usize> = HashMap::new();
        for f in m.fields() {
            let (col, t) = field_col(&f, stack)?;
            let real_oneof = f.containing_oneof().filter(|o| !o.is_synthetic());
            let target = match real_oneof {
                None => {
                    cols.push(col);
                    arrow.push(Field::new(f.name(), t, true));
                    Target::Column(cols.len() - 1)
                }
                Some(o) => {
                    let at = *oneof_col.entry(o.name().to_string()).or_insert_with(|| {
                        cols.push(Col::Struct(
                            Box::new(Row::empty()),
                            NullBufferBuilder::new(0),
                        ));
                        arrow.push(Field::new(
                            o.name(),
                            DataType::Struct(Fields::empty()),
                            true,
                        ));
                        oneofs.push((cols.len() - 1, Vec::new()));
                        cols.len() - 1
                    });
                    let Col::Struct(row, _) = &mut cols[at] else {
                        unreachable!()
                    };
                    row.cols.push(col);
                    let mut case_fields: Vec<FieldRef> = row.arrow.iter().cloned().collect();
                    case_fields.push(Arc::new(Field::new(f.name(), t, true)));
                    row.arrow = case_fields.into();
                    arrow[at] = Field::new(o.name(), DataType::Struct(row.arrow.clone()), true);
                    let case = row.cols.len() - 1;
                    oneofs
                        .iter_mut()
                        .find(|(c, _)| *c == at)
                        .expect("oneof registered")
                        .1
                        .push(fields.len());
                    Target::Case { case }
                }
            };
            fields.push(FieldPlan {
                name: f.name().to_string(),
                number: f.number(),
                target,
                repeated: f.is_list() || f.is_map(),
                presence: f.supports_presence(),
                message: matches!(f.kind(), Kind::Message(_)) && !f.is_map(),
            });
        }
        let by_number = Numbers::new(&fields);
        let seen = fields.iter().map(|_| Seen::default()).collect();
        Ok(Row {
            fields,
            by_number,
            cols,
            arrow: arrow.into(),
            oneofs,
            seen,
        })
    }

    fn empty() -> Row {
        Row {
            fields: Vec::new(),
            by_number: Numbers::Sparse(HashMap::new()),
            cols: Vec::new(),
            arrow: Fields::empty(),
            oneofs: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// The Arrow fields of the columns.
    pub(super) fn fields(&self) -> &Fields {
        &self.arrow
    }

    /// Decodes one message at `buf` into one more value per column.
    pub(super) fn decode(&mut self, buf: &[u8]) -> Result<(), String> {
        for s in &mut self.seen {
            s.last = None;
            s.all.clear();
        }
        let mut pos = 0;
        while pos < buf.len() {
            let at = pos;
            let (number, raw) = next_field(buf, &mut pos)?;
            let (Some(raw), Some(i)) = (raw, self.by_number.get(number)) else {
                continue; // unknown field (a newer writer's), or a group
            };
            let (f, s) = (&self.fields[i], &mut self.seen[i]);
            if f.repeated || f.message {
                s.all.push(raw);
            }
            s.last = Some(raw);
            s.at = at;
        }
        for i in 0..self.fields.len() {
            if let Target::Column(c) = self.fields[i].target {
                append(&mut self.cols[c], &self.fields[i], &self.seen[i], buf)?;
            }
        }
        for (col, cases) in &self.oneofs {
            let winner = cases
                .iter()
                .filter(|i| self.seen[**i].last.is_some())
                .max_by_key(|i| self.seen[**i].at)
                .copied();
            let Col::Struct(row, nulls) = &mut self.cols[*col] else {
                unreachable!("a oneof is a struct")
            };
            nulls.append(winner.is_some());
            for i in cases {
                let Target::Case { case, .. } = self.fields[*i].target else {
                    unreachable!()
                };
                if Some(*i) == winner {
                    append(&mut row.cols[case], &self.fields[*i], &self.seen[*i], buf)?;
                } else {
                    append_null(&mut row.cols[case]);
                }
            }
        }
        Ok(())
    }

    /// A null (absent) value in every column.
    fn append_nulls(&mut self) {
        for c in &mut self.cols {
            append_null(c);
        }
    }

    /// The columns filled since the last call.
    pub(super) fn finish(&mut self) -> Result<Vec<ArrayRef>, String> {
        self.cols.iter_mut().map(finish).collect()
    }
}
