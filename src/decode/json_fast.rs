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

/// The deepest nesting accepted (in skipped values too); deeper records go to arrow-json.
pub const MAX_DEPTH: u32 = 64;

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
pub struct Plan {
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
    pub fn new(schema: &SchemaRef) -> Option<Plan> {
        Some(Plan {
            schema: schema.clone(),
            root: nodes(schema.fields())?,
        })
    }

    /// Decodes `records` (their payloads after any 5-byte Confluent framing) into one batch of
    /// the plan's schema, or `None` when any record needs arrow-json's judgement.
    pub fn decode(&mut self, records: &[Record]) -> Option<RecordBatch> {
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

/// One column's values while a batch is read.
enum Col {
    Bool(BooleanBuilder),
    I32(Vec<i32>, NullBufferBuilder),
    I64(Vec<i64>, NullBufferBuilder),
    F32(Vec<f32>, NullBufferBuilder),
    F64(Vec<f64>, NullBufferBuilder),
    I128(Vec<i128>, NullBufferBuilder),
    Utf8(StringBuilder),
    /// The children, the struct's nulls, and its fields' order in the last object.
    Struct(Vec<Col>, NullBufferBuilder, Vec<usize>),
}

impl Col {
    fn new(node: &Node, rows: usize) -> Col {
        let nulls = NullBufferBuilder::new(rows);
        match &node.kind {
            Kind::Bool => Col::Bool(BooleanBuilder::with_capacity(rows)),
            Kind::Int32 | Kind::Date32 => Col::I32(Vec::with_capacity(rows), nulls),
            Kind::Int64 | Kind::Timestamp(..) => Col::I64(Vec::with_capacity(rows), nulls),
            Kind::Float32 => Col::F32(Vec::with_capacity(rows), nulls),
            Kind::Float64 => Col::F64(Vec::with_capacity(rows), nulls),
            Kind::Decimal128(..) => Col::I128(Vec::with_capacity(rows), nulls),
            Kind::Utf8 => Col::Utf8(StringBuilder::with_capacity(rows, rows * node.text_per_row)),
            Kind::Struct(children) => Col::Struct(
                children.iter().map(|n| Col::new(n, rows)).collect(),
                nulls,
                Vec::new(),
            ),
        }
    }

    fn null(&mut self) {
        match self {
            Col::Bool(b) => b.append_null(),
            Col::Utf8(b) => b.append_null(),
            Col::I32(v, n) => {
                v.push(0);
                n.append_null()
            }
            Col::I64(v, n) => {
                v.push(0);
                n.append_null()
            }
            Col::F32(v, n) => {
                v.push(0.0);
                n.append_null()
            }
            Col::F64(v, n) => {
                v.push(0.0);
                n.append_null()
            }
            Col::I128(v, n) => {
                v.push(0);
                n.append_null()
            }
            Col::Struct(children, n, _) => {
                children.iter_mut().for_each(Col::null);
                n.append_null()
            }
        }
    }

    /// A JSON number, as text; `int` when it has neither fraction nor exponent.
    fn number(&mut self, kind: &Kind, text: &str, int: bool) -> Option<()> {
        match (self, kind) {
            (Col::I32(v, n), Kind::Int32 | Kind::Date32) if int => {
                v.push(text.parse().ok()?);
                n.append_non_null();
            }
            (Col::I64(v, n), Kind::Int64 | Kind::Timestamp(..)) if int => {
                v.push(text.parse().ok()?);
                n.append_non_null();
            }
            // Both std and arrow-json's lexical-core round correctly, so they agree; infinities
            // (out-of-range exponents) are left to arrow-json.
            (Col::F32(v, n), Kind::Float32) => {
                v.push(Some(text.parse::<f32>().ok()?).filter(|x| x.is_finite())?);
                n.append_non_null();
            }
            (Col::F64(v, n), Kind::Float64) => {
                v.push(Some(text.parse::<f64>().ok()?).filter(|x| x.is_finite())?);
                n.append_non_null();
            }
            (Col::I128(v, n), Kind::Decimal128(p, s)) => {
                v.push(decimal(text, *p, *s)?);
                n.append_non_null();
            }
            _ => return None,
        }
        Some(())
    }

    /// A JSON string, unescaped: arrow-json parses it with the column type's `arrow_cast` parser.
    fn string(&mut self, kind: &Kind, s: &str) -> Option<()> {
        match (self, kind) {
            (Col::Utf8(b), Kind::Utf8) => b.append_value(s),
            (Col::I32(v, n), Kind::Int32) => {
                v.push(Int32Type::parse(s)?);
                n.append_non_null();
            }
            (Col::I32(v, n), Kind::Date32) => {
                v.push(Date32Type::parse(s)?);
                n.append_non_null();
            }
            (Col::I64(v, n), Kind::Int64) => {
                v.push(Int64Type::parse(s)?);
                n.append_non_null();
            }
            (Col::F32(v, n), Kind::Float32) => {
                v.push(Float32Type::parse(s)?);
                n.append_non_null();
            }
            (Col::F64(v, n), Kind::Float64) => {
                v.push(Float64Type::parse(s)?);
                n.append_non_null();
            }
            (Col::I128(v, n), Kind::Decimal128(p, sc)) => {
                v.push(decimal(s, *p, *sc)?);
                n.append_non_null();
            }
            (Col::I64(v, n), Kind::Timestamp(unit, tz)) => {
                let t = string_to_datetime(tz, s).ok()?;
                v.push(match unit {
                    TimeUnit::Second => t.timestamp(),
                    TimeUnit::Millisecond => t.timestamp_millis(),
                    TimeUnit::Microsecond => t.timestamp_micros(),
                    TimeUnit::Nanosecond => t.timestamp_nanos_opt()?,
                });
                n.append_non_null();
            }
            _ => return None,
        }
        Some(())
    }

    fn boolean(&mut self, value: bool) -> Option<()> {
        match self {
            Col::Bool(b) => b.append_value(value),
            _ => return None,
        }
        Some(())
    }

    fn finish(self, node: &Node) -> Option<ArrayRef> {
        fn prim<T: ArrowPrimitiveType>(
            v: Vec<T::Native>,
            mut n: NullBufferBuilder,
        ) -> PrimitiveArray<T> {
            PrimitiveArray::<T>::new(v.into(), n.finish())
        }
        Some(match (self, &node.kind) {
            (Col::Bool(mut b), _) => Arc::new(b.finish()),
            (Col::Utf8(mut b), _) => Arc::new(b.finish()),
            (Col::I32(v, n), Kind::Int32) => Arc::new(prim::<Int32Type>(v, n)),
            (Col::I32(v, n), Kind::Date32) => Arc::new(prim::<Date32Type>(v, n)),
            (Col::I64(v, n), Kind::Int64) => Arc::new(prim::<Int64Type>(v, n)),
            (Col::I64(v, n), Kind::Timestamp(unit, _)) => {
                let tz = match &node.data_type {
                    DataType::Timestamp(_, tz) => tz.clone(),
                    _ => None,
                };
                match unit {
                    TimeUnit::Second => {
                        Arc::new(prim::<TimestampSecondType>(v, n).with_timezone_opt(tz))
                    }
                    TimeUnit::Millisecond => {
                        Arc::new(prim::<TimestampMillisecondType>(v, n).with_timezone_opt(tz))
                    }
                    TimeUnit::Microsecond => {
                        Arc::new(prim::<TimestampMicrosecondType>(v, n).with_timezone_opt(tz))
                    }
                    TimeUnit::Nanosecond => {
                        Arc::new(prim::<TimestampNanosecondType>(v, n).with_timezone_opt(tz))
                    }
                }
            }
            (Col::F32(v, n), _) => Arc::new(prim::<Float32Type>(v, n)),
            (Col::F64(v, n), _) => Arc::new(prim::<Float64Type>(v, n)),
            (Col::I128(v, mut n), Kind::Decimal128(p, s)) => Arc::new(
                Decimal128Array::new(v.into(), n.finish())
                    .with_precision_and_scale(*p, *s)
                    .ok()?,
            ),
            (Col::Struct(children, mut n, _), Kind::Struct(nodes)) => {
                let fields = match &node.data_type {
                    DataType::Struct(f) => f.clone(),
                    _ => return None,
                };
                let arrays = nodes
                    .iter()
                    .zip(children)
                    .map(|(n, c)| c.finish(n))
                    .collect::<Option<Vec<_>>>()?;
                let nulls: Option<NullBuffer> = n.finish();
                Arc::new(StructArray::try_new(fields, arrays, nulls).ok()?)
            }
            _ => return None,
        })
    }
}

/// `arrow_cast`'s decimal parser, for texts whose exponent has at most 3 digits: a longer one
/// overflows its 16-bit exponent (a panic in debug builds, a wrong value in release ones), so
/// those are left to arrow-json's judgement.
fn decimal(text: &str, precision: u8, scale: i8) -> Option<i128> {
    if let Some(e) = text.find(['e', 'E']) {
        let exp = text[e + 1..].trim_start_matches(['+', '-']);
        if exp.len() > 3 {
            return None;
        }
    }
    parse_decimal::<Decimal128Type>(text, precision, scale).ok()
}

/// Byte-slice equality for short field names, inline (a word at a time) rather than a call into
/// libc's `memcmp` per field.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut x, mut y) = (a.chunks_exact(8), b.chunks_exact(8));
    for (p, q) in (&mut x).zip(&mut y) {
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
        if word(p) != word(q) {
            return false;
        }
    }
    x.remainder().iter().zip(y.remainder()).all(|(p, q)| p == q)
}

/// The bytes that end a string's plain run: `"`, `\\` and the control characters.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// A cursor over one record's text (valid UTF-8, checked once).
struct Cur<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// After a member or element: `Some(true)` past the `close` byte, `Some(false)` past a comma
    /// (and the whitespace after it), `None` on anything else.
    #[inline]
    fn closed(&mut self, close: u8) -> Option<bool> {
        self.ws();
        let c = self.peek()?;
        self.i += 1;
        if c == close {
            return Some(true);
        }
        (c == b',').then(|| self.ws())?;
        Some(false)
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..]
            .starts_with(word)
            .then(|| self.i += word.len())
    }

    /// The members of an object whose `{` was just read, into `cols` (one per node).
    /// `order` is the fields' order in the previous object of this shape (an index per member,
    /// `usize::MAX` for one not in the schema), updated as members are found elsewhere.
    fn object(
        &mut self,
        nodes: &[Node],
        cols: &mut [Col],
        order: &mut Vec<usize>,
        scratch: &mut String,
        depth: u32,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut seen = 0u64;
        self.ws();
        if self.eat(b'}').is_none() {
            let mut member = 0;
            loop {
                self.eat(b'"')?;
                let key = self.key()?;
                self.ws();
                self.eat(b':')?;
                self.ws();
                // The field at this position in the previous object is tried first.
                let hint = order.get(member).copied().unwrap_or(usize::MAX);
                let found = if nodes.get(hint).is_some_and(|n| same(&n.name, key)) {
                    Some(hint)
                } else {
                    let k = nodes.iter().position(|n| same(&n.name, key));
                    match order.get_mut(member) {
                        Some(o) => *o = k.unwrap_or(usize::MAX),
                        None => order.push(k.unwrap_or(usize::MAX)),
                    }
                    k
                };
                member += 1;
                match found {
                    Some(k) => {
                        if seen & (1 << k) != 0 {
                            // arrow-json keeps the last; rare enough to leave to it.
                            return None;
                        }
                        seen |= 1 << k;
                        self.value(&nodes[k], &mut cols[k], scratch, depth)?;
                    }
                    None => self.skip(scratch, depth)?,
                }
                if self.closed(b'}')? {
                    break;
                }
            }
        }
        let all = if nodes.len() == 64 {
            u64::MAX
        } else {
            (1u64 << nodes.len()) - 1
        };
        if seen != all {
            for (k, (n, c)) in nodes.iter().zip(cols.iter_mut()).enumerate() {
                if seen & (1 << k) == 0 {
                    if !n.nullable {
                        return None;
                    }
                    c.null();
                }
            }
        }
        Some(())
    }

    fn value(
        &mut self,
        node: &Node,
        col: &mut Col,
        scratch: &mut String,
        depth: u32,
    ) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                let s = self.string(scratch)?;
                col.string(&node.kind, s)
            }
            b'-' | b'0'..=b'9' => {
                let (text, int) = self.number()?;
                col.number(&node.kind, text, int)
            }
            b'n' => {
                self.literal(b"null")?;
                if !node.nullable {
                    return None;
                }
                col.null();
                Some(())
            }
            b't' => {
                self.literal(b"true")?;
                col.boolean(true)
            }
            b'f' => {
                self.literal(b"false")?;
                col.boolean(false)
            }
            b'{' => match (col, &node.kind) {
                (Col::Struct(children, nulls, order), Kind::Struct(nodes)) => {
                    self.i += 1;
                    self.object(nodes, children, order, scratch, depth + 1)?;
                    nulls.append_non_null();
                    Some(())
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// An object key after its opening quote; keys with escapes are left to arrow-json.
    fn key(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        self.plain();
        self.eat(b'"')?;
        Some(&self.b[start..self.i - 1])
    }

    /// Moves past the plain bytes of a string: those that are not `"`, `\\` or a control
    /// character.
    /// Eight bytes at a time while eight remain (a word test per step), then byte by byte.
    #[inline]
    fn plain(&mut self) {
        const ONES: u64 = u64::from_le_bytes([0x01; 8]);
        const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
        while let Some(chunk) = self.b.get(self.i..self.i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            // The classic zero-byte tests: the lowest flagged byte is exact (higher ones may be
            // false positives, which do not matter). Bytes >= 0x80 are never flagged.
            let quote = w ^ (ONES * u64::from(b'"'));
            let backslash = w ^ (ONES * u64::from(b'\\'));
            let special = (w.wrapping_sub(ONES * 0x20)
                | quote.wrapping_sub(ONES)
                | backslash.wrapping_sub(ONES))
                & !w
                & HIGH;
            // `!w` above is exact for the control-character test; for `"` and `\\` the zero
            // test needs `!quote` / `!backslash`, which `!w` implies for bytes below 0x80.
            if special != 0 {
                let found = self.i + (special.trailing_zeros() / 8) as usize;
                // The word test is a filter; the table decides.
                match self.b[self.i..=found]
                    .iter()
                    .position(|&c| SPECIAL[c as usize])
                {
                    Some(k) => {
                        self.i += k;
                        return;
                    }
                    None => self.i = found + 1,
                }
                continue;
            }
            self.i += 8;
        }
        let rest = &self.b[self.i..];
        self.i += rest
            .iter()
            .position(|&c| SPECIAL[c as usize])
            .unwrap_or(rest.len());
    }

    /// A string after its opening quote, unescaped (into `scratch` when it has escapes).
    fn string<'s>(&mut self, scratch: &'s mut String) -> Option<&'s str>
    where
        'a: 's,
    {
        let start = self.i;
        self.plain();
        match self.peek()? {
            b'"' => {
                self.i += 1;
                return self.s.get(start..self.i - 1);
            }
            b'\\' => {}
            _ => return None,
        }
        scratch.clear();
        scratch.push_str(self.s.get(start..self.i)?);
        loop {
            match *self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(scratch.as_str());
                }
                b'\\' => {
                    self.i += 1;
                    let c = self.escape()?;
                    scratch.push(c);
                }
                0..=0x1f => return None,
                _ => {
                    let run = self.i;
                    self.plain();
                    scratch.push_str(self.s.get(run..self.i)?);
                }
            }
        }
    }

    /// An escape after its backslash, as arrow-json reads it: the JSON escapes, and `\u` with
    /// UTF-16 surrogate pairs.
    fn escape(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        Some(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let high = self.hex4()?;
                if let Some(c) = char::from_u32(high) {
                    return Some(c);
                }
                self.eat(b'\\')?;
                self.eat(b'u')?;
                let low = self.hex4()?;
                if !(0xD800..=0xDBFF).contains(&high) || !(0xDC00..=0xDFFF).contains(&low) {
                    return None;
                }
                char::from_u32((((high - 0xD800) << 10) | (low - 0xDC00)) + 0x1_0000)?
            }
            _ => return None,
        })
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.b.get(self.i..self.i + 4)?;
        let mut v = 0;
        for &d in digits {
            v = (v << 4) | char::from(d).to_digit(16)?;
        }
        self.i += 4;
        Some(v)
    }

    /// A number in strict JSON syntax: its text, and whether it is an integer.
    fn number(&mut self) -> Option<(&'a str, bool)> {
        let start = self.i;
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let mut int = true;
        if self.eat(b'.').is_some() {
            int = false;
            self.digits1()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            int = false;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits1()?;
        }
        Some((self.s.get(start..self.i)?, int))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn digits1(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }

    /// Reads past one value of a field not in the schema, checking it is valid JSON.
    fn skip(&mut self, scratch: &mut String, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string(scratch).map(drop)
            }
            b'-' | b'0'..=b'9' => self.number().map(drop),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'{' => {
                self.i += 1;
                self.ws();
                if self.eat(b'}').is_some() {
                    return Some(());
                }
                loop {
                    self.eat(b'"')?;
                    self.string(scratch)?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    self.skip(scratch, depth + 1)?;
                    if self.closed(b'}')? {
                        return Some(());
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.eat(b']').is_some() {
                    return Some(());
                }
                loop {
                    self.skip(scratch, depth + 1)?;
                    if self.closed(b']')? {
                        return Some(());
                    }
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};

    fn schema() -> SchemaRef {
        let ts = |u| DataType::Timestamp(u, Some("+00:00".into()));
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("qty", DataType::Int32, true),
            Field::new("price", DataType::Decimal128(12, 2), true),
            Field::new("ratio", DataType::Float64, true),
            Field::new("small", DataType::Float32, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("ok", DataType::Boolean, true),
            Field::new("day", DataType::Date32, true),
            Field::new("at", ts(TimeUnit::Microsecond), true),
            Field::new("at_ms", ts(TimeUnit::Millisecond), true),
            Field::new(
                "inner",
                DataType::Struct(
                    vec![
                        Field::new("a", DataType::Int64, true),
                        Field::new("b", DataType::Utf8, false),
                    ]
                    .into(),
                ),
                true,
            ),
            Field::new("req", DataType::Utf8, false),
        ]))
    }

    fn records(lines: &[&str]) -> Vec<Record> {
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| Record {
                offset: i as i64,
                timestamp_ms: None,
                key: None,
                payload: Some(bytes::Bytes::copy_from_slice(l.as_bytes())),
                headers: vec![],
            })
            .collect()
    }

    /// What arrow-json makes of the batch: `None` if it rejects any record.
    fn reference(schema: &SchemaRef, recs: &[Record]) -> Option<RecordBatch> {
        let mut d = super::super::json::build(schema, recs.len());
        for r in recs {
            super::super::json::decode_one(&mut d, r).ok()?;
        }
        d.flush().ok()?
    }

    const GOOD: &[&str] = &[
        r#"{"id": 1, "qty": 2, "price": "12.34", "ratio": 0.5, "small": 1.25, "name": "plain",
            "ok": true, "day": "2026-11-21", "at": "2026-11-21T10:00:00.123456Z",
            "at_ms": "2026-11-21T10:00:00.123Z", "inner": {"a": 7, "b": "x"}, "req": "r"}"#,
        // Fields in another order, some missing, unknown fields of every kind skipped.
        r#"{"req":"r2","extra":{"deep":[1,2,{"x":"y\"z"}],"n":null},"name":"esc \" \\ \/ \b\f\n\r\t",
            "id":-9223372036854775808,"list":[],"obj":{},"t":true,"f":false,"num":-1.5e-3}"#,
        // Numbers where strings are allowed and the reverse.
        r#"{"id": "42", "qty": "-7", "price": 5, "ratio": "2.5", "small": "-0.75", "day": 20000,
            "at": 1700000000000000, "at_ms": -5, "req": "", "ok": false, "inner": null}"#,
        // Unicode: raw, escaped, and a surrogate pair; exponents; a decimal with an exponent.
        r#"{"name": "caf\u00e9 \u20ac \ud83d\ude00 raw: ü €", "ratio": 1E+2, "small": 3e-1,
            "price": -0.5, "req": "\u0041", "inner": {"b": "only b"}}"#,
        // Timestamps with offsets and without a time zone; nulls everywhere nullable.
        r#"{"at": "2026-11-21 10:00:00+02:00", "at_ms": "2026-11-21T10:00:00", "day": null,
            "id": null, "qty": null, "price": null, "ratio": null, "small": null, "name": null,
            "ok": null, "inner": {"a": null, "b": "b"}, "req": "x"}"#,
        "  \n{\"req\":\"ws\"}\t\r\n ",
        r#"{"req": "zero", "id": 0, "qty": -0, "ratio": -0.0, "price": "0.00"}"#,
        r#"{"req": "rounded", "price": "12.345", "ratio": 5e-324}"#,
        r#"{"req": "prefix", "price": "9999999999.99", "qty": 2147483647, "ratio": 1.7976931348623157e308}"#,
    ];

    #[test]
    fn well_formed_batches_decode_as_arrow_json_decodes_them() {
        let schema = schema();
        let mut plan = Plan::new(&schema).expect("every type in the schema is supported");
        let recs = records(GOOD);
        let want = reference(&schema, &recs).expect("arrow-json accepts the good records");
        let got = plan
            .decode(&recs)
            .expect("the single-pass decoder accepts them too");
        assert_eq!(got, want);
        for (i, rec) in recs.iter().enumerate() {
            let one = std::slice::from_ref(rec);
            assert_eq!(plan.decode(one), reference(&schema, one), "record {i}");
        }
    }

    #[test]
    fn anything_questionable_is_left_to_arrow_json() {
        let schema = schema();
        let mut plan = Plan::new(&schema).unwrap();
        let odd = [
            // Not one JSON object.
            "",
            "   ",
            "null",
            "[1]",
            r#""s""#,
            r#"{"req":"a"}{"req":"b"}"#,
            r#"{"req":"a"} x"#,
            // Malformed.
            r#"{"req":"a""#,
            r#"{"req":"a",}"#,
            r#"{"req" "a"}"#,
            r#"{"req":"a" "id":1}"#,
            r#"{"req":"a","id":01}"#,
            r#"{"req":"a","id":1.}"#,
            r#"{"req":"a","id":-}"#,
            r#"{"req":"a","ratio":.5}"#,
            r#"{"req":"a","x":[1,]}"#,
            r#"{"req":"a","x":tru}"#,
            "{\"req\":\"a\tb\"}",
            r#"{"req":"\x"}"#,
            r#"{"req":"\u12"}"#,
            r#"{"req":"\ud83d"}"#,
            r#"{"req":"\ude00\ud83d"}"#,
            r#"{"req":"\ud83d\u0041"}"#,
            // Valid JSON that does not fit, or that arrow-json reads its own way.
            r#"{"id":1}"#,
            r#"{"req":null}"#,
            r#"{"req":1}"#,
            r#"{"req":"a","req":"b"}"#,
            r#"{"req":"a","id":1.5}"#,
            r#"{"req":"a","id":1e3}"#,
            r#"{"req":"a","id":9223372036854775808}"#,
            r#"{"req":"a","qty":2147483648}"#,
            r#"{"req":"a","id":"x"}"#,
            r#"{"req":"a","id":true}"#,
            r#"{"req":"a","ok":"true"}"#,
            r#"{"req":"a","ok":1}"#,
            r#"{"req":"a","name":5}"#,
            r#"{"req":"a","price":"1e99"}"#,
            r#"{"req":"a","ratio":1e999}"#,
            r#"{"req":"a","at":"yesterday"}"#,
            r#"{"req":"a","at":1.5}"#,
            r#"{"req":"a","day":"2026-13-01"}"#,
            r#"{"req":"a","inner":{"a":1}}"#,
            r#"{"req":"a","inner":[]}"#,
            r#"{"req":"a","inner":5}"#,
            r#"{"req":"a","\u0069d":1}"#,
        ];
        let good = records(&GOOD[..1]);
        let mut taken = 0;
        for (i, line) in odd.iter().enumerate() {
            let mut batch = good.clone();
            batch.extend(records(&[line]));
            let want = reference(&schema, &batch);
            if let Some(got) = plan.decode(&batch) {
                taken += 1;
                assert_eq!(Some(got), want, "case {i}: {line}");
            }
        }
        // Every case above is rejected by arrow-json or decoded in a way left to it.
        assert_eq!(taken, 0);
    }

    /// Random edits of well-formed records: whatever the single-pass decoder accepts, arrow-json
    /// accepts too and decodes to the same values.
    #[test]
    fn mutated_records_never_decode_differently() {
        use rand::{Rng, SeedableRng};
        let schema = schema();
        let mut plan = Plan::new(&schema).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261123);
        let alphabet = b"{}[],:\"\\/0123456789-+.eEnulltruefalse \t\nabu";
        let (mut accepted, mut total) = (0, 0);
        for _ in 0..20_000 {
            let mut line = GOOD[rng.random_range(0..GOOD.len())].as_bytes().to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..line.len());
                match rng.random_range(0..3) {
                    0 => {
                        line.remove(at);
                    }
                    1 => line.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                    _ => line[at] = alphabet[rng.random_range(0..alphabet.len())],
                }
            }
            let rec = Record {
                offset: 0,
                timestamp_ms: None,
                key: None,
                payload: Some(bytes::Bytes::from(line.clone())),
                headers: vec![],
            };
            let one = std::slice::from_ref(&rec);
            total += 1;
            if let Some(got) = plan.decode(one) {
                accepted += 1;
                assert_eq!(
                    Some(got),
                    reference(&schema, one),
                    "{}",
                    String::from_utf8_lossy(&line)
                );
            }
        }
        // Edits inside strings and whitespace keep many records valid: the comparison is real.
        assert!(accepted > total / 20, "{accepted} of {total} accepted");
    }

    /// A string column reserves what the previous batch needed (an eighth more), not a guess
    /// that doubles and copies its way up: capacity is what the memory budget counts.
    #[test]
    fn string_buffers_are_sized_from_the_previous_batch() {
        let schema = schema();
        let mut plan = Plan::new(&schema).unwrap();
        let name = "n".repeat(40);
        let lines: Vec<String> = (0..1024)
            .map(|i| format!(r#"{{"req":"r{i}","name":"{name}"}}"#))
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let recs = records(&lines);
        let values = |b: &RecordBatch| {
            let a = b.column_by_name("name").unwrap();
            let s = a
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            (s.values().len(), s.values().capacity())
        };
        // The first batch guesses 16 bytes a row and grows by doubling: 64 KiB for 40 KiB.
        let (len, first) = values(&plan.decode(&recs).unwrap());
        assert_eq!(len, 40 * 1024);
        assert!(first >= 64 << 10, "{first}");
        let (len, next) = values(&plan.decode(&recs).unwrap());
        assert_eq!(len, 40 * 1024);
        assert!(
            next >= len && next <= len * 9 / 8 + 1024 + 64,
            "{next} for {len}"
        );
        assert_eq!(plan.decode(&recs[..1]).unwrap().num_rows(), 1);
    }

    /// The word-at-a-time scan stops exactly where the byte-at-a-time one would, whatever the
    /// byte and its position in the word, next to multi-byte UTF-8.
    #[test]
    fn string_scan_stops_at_the_first_special_byte() {
        let mut specials: Vec<u8> = (0..0x20).collect();
        specials.extend([b'"', b'\\']);
        for fill in ["a", "é", "€", "\u{7f}"] {
            for at in 0..20 {
                for &c in &specials {
                    let mut text = fill.repeat(at).into_bytes();
                    let stop = text.len();
                    text.push(c);
                    text.extend_from_slice("z\"".repeat(9).as_bytes());
                    let s = String::from_utf8(text.clone()).unwrap();
                    let mut cur = Cur {
                        s: &s,
                        b: &text,
                        i: 0,
                    };
                    cur.plain();
                    assert_eq!(cur.i, stop, "{fill:?} x {at}, then {c:#x}");
                }
            }
            let s = fill.repeat(13);
            let mut cur = Cur {
                s: &s,
                b: s.as_bytes(),
                i: 0,
            };
            cur.plain();
            assert_eq!(cur.i, s.len(), "no special byte: to the end");
        }
        assert!(same(b"order_identifier", b"order_identifier"));
        assert!(!same(b"order_identifies", b"order_identifier"));
        assert!(!same(b"order_id", b"order_ix"));
        assert!(!same(b"id", b"idx"));
    }

    #[test]
    fn schemas_with_other_types_always_use_arrow_json() {
        let list = Arc::new(Schema::new(vec![Field::new(
            "l",
            DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
            true,
        )]));
        assert!(Plan::new(&list).is_none());
        let naive = Arc::new(Schema::new(vec![Field::new(
            "t",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            true,
        )]));
        assert!(Plan::new(&naive).is_none());
    }
}
