//! SQL text for Databend: quoting, literals and the Arrow → Databend type mapping (DESIGN §5).
//!
//! Invariants: [`ident`] and [`literal`] are the only ways data or config text enters a
//! statement; an identifier can never end its quotes and a literal can never end its string.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// A quoted identifier: `"name"` with `"` doubled.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal: `'text'` with `\` and `'` escaped (Databend strings take backslash escapes).
pub fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("''"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The types Databend stores (and reads back from Parquet) for `schema`: times of day become
/// microseconds (`BIGINT`, Databend has no TIME), timestamps become microseconds, large and
/// view types fold into plain ones.
pub fn storable_schema(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                Arc::new(Field::new(
                    f.name(),
                    storable(f.data_type()),
                    f.is_nullable(),
                ))
            })
            .collect::<Vec<_>>(),
    ))
}

fn storable(dt: &DataType) -> DataType {
    match dt {
        DataType::Time32(_) | DataType::Time64(_) => DataType::Int64,
        DataType::Timestamp(_, tz) => {
            DataType::Timestamp(TimeUnit::Microsecond, tz.as_ref().map(|_| Arc::from("UTC")))
        }
        DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
        DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            DataType::Binary
        }
        DataType::Dictionary(_, v) => storable(v),
        DataType::Date64 => DataType::Date32,
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            DataType::List(Arc::new(Field::new(
                f.name(),
                storable(f.data_type()),
                f.is_nullable(),
            )))
        }
        DataType::Struct(fields) => DataType::Struct(
            fields
                .iter()
                .map(|f| {
                    Arc::new(Field::new(
                        f.name(),
                        storable(f.data_type()),
                        f.is_nullable(),
                    ))
                })
                .collect(),
        ),
        DataType::Map(entries, sorted) => DataType::Map(
            Arc::new(Field::new(
                entries.name(),
                storable(entries.data_type()),
                entries.is_nullable(),
            )),
            *sorted,
        ),
        other => other.clone(),
    }
}

/// The Databend type of an Arrow type.
pub fn sql_type(dt: &DataType) -> Result<String, String> {
    Ok(match dt {
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::UInt8 => "TINYINT UNSIGNED".into(),
        DataType::UInt16 => "SMALLINT UNSIGNED".into(),
        DataType::UInt32 => "INT UNSIGNED".into(),
        DataType::UInt64 => "BIGINT UNSIGNED".into(),
        DataType::Float32 => "FLOAT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("DECIMAL({p}, {s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR".into(),
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => "BINARY".into(),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Timestamp(_, _) => "TIMESTAMP".into(),
        DataType::Time32(_) | DataType::Time64(_) => "BIGINT".into(),
        DataType::Dictionary(_, v) => sql_type(v)?,
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            format!("ARRAY({})", nullable_type(f)?)
        }
        DataType::Struct(fields) => {
            let inner: Vec<String> = fields
                .iter()
                .map(|f| Ok(format!("{} {}", ident(f.name()), nullable_type(f)?)))
                .collect::<Result<_, String>>()?;
            format!("TUPLE({})", inner.join(", "))
        }
        DataType::Map(entries, _) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => {
                format!(
                    "MAP({}, {})",
                    sql_type(kv[0].data_type())?,
                    nullable_type(&kv[1])?
                )
            }
            other => return Err(format!("unsupported map entries {other}")),
        },
        other => return Err(format!("no Databend type for {other}")),
    })
}

fn nullable_type(f: &Field) -> Result<String, String> {
    let t = sql_type(f.data_type())?;
    Ok(if f.is_nullable() {
        format!("{t} NULL")
    } else {
        format!("{t} NOT NULL")
    })
}

/// `"name" TYPE NULL|NOT NULL`.
pub fn column_def(f: &Field) -> Result<String, String> {
    Ok(format!(
        "{} {}",
        ident(f.name()),
        nullable_type(f).map_err(|e| format!("column `{}`: {e}", f.name()))?
    ))
}

/// `batch` with its last column (a list of names, null for none) as a list that is never null
/// and holds no null: Databend's `contains` takes no nullable array.
pub fn required_last_list(batch: &RecordBatch) -> Result<RecordBatch, String> {
    use arrow::array::{Array, AsArray, ListBuilder, StringBuilder};
    let last = batch.num_columns() - 1;
    let list = batch.column(last).as_list::<i32>();
    let mut out = ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Utf8,
        false,
    )));
    for i in 0..list.len() {
        if list.is_valid(i) {
            let v = list.value(i);
            for name in v.as_string::<i32>().iter().flatten() {
                out.values().append_value(name);
            }
        }
        out.append(true);
    }
    let out = out.finish();
    let schema = batch.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[last] = Field::new(schema.field(last).name(), out.data_type().clone(), false);
    let mut columns = batch.columns().to_vec();
    columns[last] = Arc::new(out);
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_cannot_be_escaped() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(ident("select"), "\"select\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(
            literal("a\\'; DROP TABLE t; --"),
            "'a\\\\''; DROP TABLE t; --'"
        );
    }

    #[test]
    fn maps_types_exactly() {
        assert_eq!(
            sql_type(&DataType::Decimal128(12, 2)).unwrap(),
            "DECIMAL(12, 2)"
        );
        assert_eq!(
            sql_type(&DataType::Time64(TimeUnit::Microsecond)).unwrap(),
            "BIGINT"
        );
        let m = DataType::Map(
            Arc::new(Field::new(
                "entries",
                DataType::Struct(
                    vec![
                        Field::new("key", DataType::Utf8, false),
                        Field::new("value", DataType::Int64, true),
                    ]
                    .into(),
                ),
                false,
            )),
            false,
        );
        assert_eq!(sql_type(&m).unwrap(), "MAP(VARCHAR, BIGINT NULL)");
        let s = DataType::Struct(vec![Field::new("city", DataType::Utf8, true)].into());
        assert_eq!(sql_type(&s).unwrap(), "TUPLE(\"city\" VARCHAR NULL)");
    }
}
