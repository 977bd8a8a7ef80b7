//! The column builders: one per declared column, converting JSON values as arrow-json does.

use super::*;

/// One column's values while a batch is read.
pub(super) enum Col {
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
    pub(super) fn new(node: &Node, rows: usize) -> Col {
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

    pub(super) fn null(&mut self) {
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
    pub(super) fn number(&mut self, kind: &Kind, text: &str, int: bool) -> Option<()> {
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
    pub(super) fn string(&mut self, kind: &Kind, s: &str) -> Option<()> {
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

    pub(super) fn boolean(&mut self, value: bool) -> Option<()> {
        match self {
            Col::Bool(b) => b.append_value(value),
            _ => return None,
        }
        Some(())
    }

    pub(super) fn finish(self, node: &Node) -> Option<ArrayRef> {
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
pub(super) fn decimal(text: &str, precision: u8, scale: i8) -> Option<i128> {
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
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
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
