//! Arrow ⇄ Delta schemas: the Delta form of decoded data, additive schema merging, and
//! conforming record batches to the table's schema.
//!
//! Invariants:
//! - [`delta_schema`] is idempotent and its output round-trips through the Delta kernel schema
//!   unchanged, so comparing two normalized schemas compares what Delta stores.
//! - [`merge`] only ever adds (new nullable columns and nested fields, relaxed nullability) or
//!   keeps the table's wider type when data arrives narrower; anything else is an error naming
//!   the column, never a silent rewrite of existing data.
//! - [`conform`] produces arrays whose types equal the target exactly (missing nullable fields
//!   become nulls at every nesting level).

use std::sync::Arc;

use arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, ListArray, MapArray, RecordBatch, StructArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::engine::arrow_conversion::{TryIntoArrow, TryIntoKernel};
use deltalake::kernel::StructType;

/// Delta's form of an Arrow type: microsecond UTC timestamps, times of day as microseconds
/// (`long`, Delta has no TIME type), unsigned integers widened to the next signed type, and
/// large/view variants folded into their plain types.
pub fn delta_type(dt: &DataType) -> DataType {
    match dt {
        DataType::Timestamp(_, Some(_)) => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        }
        DataType::Timestamp(_, None) => DataType::Timestamp(TimeUnit::Microsecond, None),
        DataType::Time32(_) | DataType::Time64(_) => DataType::Int64,
        DataType::Date64 => DataType::Date32,
        DataType::UInt8 => DataType::Int16,
        DataType::UInt16 => DataType::Int32,
        DataType::UInt32 => DataType::Int64,
        DataType::UInt64 => DataType::Decimal128(20, 0),
        DataType::Float16 => DataType::Float32,
        DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
        DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            DataType::Binary
        }
        DataType::Dictionary(_, v) => delta_type(v),
        DataType::Decimal256(p, s) if *p <= 38 => DataType::Decimal128(*p, *s),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            DataType::List(delta_field(f))
        }
        DataType::Struct(fields) => DataType::Struct(fields.iter().map(delta_field).collect()),
        DataType::Map(entries, sorted) => DataType::Map(delta_field(entries), *sorted),
        other => other.clone(),
    }
}

fn delta_field(f: &FieldRef) -> FieldRef {
    Arc::new(Field::new(
        f.name(),
        delta_type(f.data_type()),
        f.is_nullable(),
    ))
}

/// The schema Delta stores for `schema`: [`delta_type`] on every column, then a round trip
/// through the kernel's schema so nested names (`element`, `key_value`) match what the table
/// reports back.
pub fn delta_schema(schema: &Schema) -> Result<SchemaRef, String> {
    let mapped = Schema::new(schema.fields().iter().map(delta_field).collect::<Vec<_>>());
    let kernel: StructType = (&mapped)
        .try_into_kernel()
        .map_err(|e| format!("Delta cannot store this schema: {e}"))?;
    let back: Schema = (&kernel)
        .try_into_arrow()
        .map_err(|e| format!("Delta cannot store this schema: {e}"))?;
    Ok(Arc::new(back))
}

/// The kernel form of a (normalized) Arrow schema, for table metadata.
pub fn kernel_schema(schema: &Schema) -> Result<StructType, String> {
    schema
        .try_into_kernel()
        .map_err(|e| format!("Delta cannot store this schema: {e}"))
}

/// Whether a column of type `from` can be written into a column of type `to` without loss.
fn fits(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let int_rank = |t: &DataType| match t {
        Int8 => Some(1),
        Int16 => Some(2),
        Int32 => Some(3),
        Int64 => Some(4),
        _ => None,
    };
    match (from, to) {
        (a, b) if a == b => true,
        (a, b) if int_rank(a).is_some() && int_rank(b).is_some() => int_rank(a) <= int_rank(b),
        (Float32, Float64) => true,
        (Int8 | Int16 | Int32, Float64) => true,
        (Decimal128(p1, s1), Decimal128(p2, s2)) => {
            s1 <= s2 && (*p1 as i16 - *s1 as i16) <= (*p2 as i16 - *s2 as i16)
        }
        (Date32, Timestamp(_, None)) => true,
        _ => false,
    }
}

/// Merges the columns of `data` into `table` (both normalized by [`delta_schema`]).
/// Returns the table's schema unchanged (same `Arc`) when nothing needs to change.
pub fn merge(table: &SchemaRef, data: &Schema) -> Result<SchemaRef, String> {
    let merged = merge_fields("", table.fields(), data.fields())?;
    if &merged == table.fields() {
        return Ok(table.clone());
    }
    Ok(Arc::new(Schema::new_with_metadata(
        merged,
        table.metadata().clone(),
    )))
}

fn merge_fields(prefix: &str, table: &Fields, data: &Fields) -> Result<Fields, String> {
    let mut out: Vec<FieldRef> = Vec::with_capacity(table.len().max(data.len()));
    for t in table.iter() {
        match data.iter().find(|d| d.name() == t.name()) {
            None => out.push(t.clone()),
            Some(d) => {
                let path = format!("{prefix}{}", t.name());
                let dt = merge_type(&path, t.data_type(), d.data_type())?;
                let nullable = t.is_nullable() || d.is_nullable();
                if &dt == t.data_type() && nullable == t.is_nullable() {
                    out.push(t.clone());
                } else {
                    out.push(Arc::new(
                        Field::new(t.name(), dt, nullable).with_metadata(t.metadata().clone()),
                    ));
                }
            }
        }
    }
    for d in data.iter() {
        if !table.iter().any(|t| t.name() == d.name()) {
            // Rows written before this column existed read it as null.
            out.push(Arc::new(d.as_ref().clone().with_nullable(true)));
        }
    }
    Ok(out.into())
}

fn merge_type(path: &str, table: &DataType, data: &DataType) -> Result<DataType, String> {
    match (table, data) {
        (t, d) if t == d => Ok(t.clone()),
        (DataType::Struct(t), DataType::Struct(d)) => {
            Ok(DataType::Struct(merge_fields(&format!("{path}."), t, d)?))
        }
        (DataType::List(t), DataType::List(d)) => {
            let item = merge_type(&format!("{path}[]"), t.data_type(), d.data_type())?;
            Ok(DataType::List(Arc::new(Field::new(
                t.name(),
                item,
                t.is_nullable() || d.is_nullable(),
            ))))
        }
        (DataType::Map(t, sorted), DataType::Map(d, _)) => {
            let entries = merge_type(&format!("{path}{{}}"), t.data_type(), d.data_type())?;
            Ok(DataType::Map(
                Arc::new(Field::new(t.name(), entries, t.is_nullable())),
                *sorted,
            ))
        }
        (t, d) if fits(d, t) => Ok(t.clone()),
        (t, d) if fits(t, d) => Err(format!(
            "column `{path}` is {t} in the table but {d} in the data: widening a column needs \
             Delta's typeWidening table feature, which lakesink does not enable; keep the \
             producer's type, or write to a new table"
        )),
        (t, d) => Err(format!(
            "column `{path}` is {t} in the table but {d} in the data: only additive changes \
             (new nullable columns or nested fields) are applied automatically"
        )),
    }
}

/// Casts and reshapes `batch` to exactly `target` (by column name; missing nullable columns are
/// filled with nulls).
pub fn conform_batch(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch, String> {
    if batch.schema().as_ref() == target.as_ref() {
        return Ok(batch.clone());
    }
    let mut columns = Vec::with_capacity(target.fields().len());
    for f in target.fields() {
        match batch.column_by_name(f.name()) {
            Some(c) => columns.push(conform(f.name(), c, f.data_type())?),
            None if f.is_nullable() => {
                columns.push(new_null_array(f.data_type(), batch.num_rows()))
            }
            None => {
                return Err(format!(
                    "column `{}` is required (not null) in the table but missing from the data",
                    f.name()
                ))
            }
        }
    }
    RecordBatch::try_new(target.clone(), columns).map_err(|e| e.to_string())
}

/// Casts one array to `target`, recursing into structs, lists and maps.
pub fn conform(path: &str, array: &ArrayRef, target: &DataType) -> Result<ArrayRef, String> {
    if array.data_type() == target {
        return Ok(array.clone());
    }
    let err = |e: arrow::error::ArrowError| {
        format!(
            "column `{path}`: cannot convert {} to {target}: {e}",
            array.data_type()
        )
    };
    match (array.data_type(), target) {
        (DataType::Struct(_), DataType::Struct(fields)) => {
            let s = array.as_struct();
            let mut children = Vec::with_capacity(fields.len());
            for f in fields.iter() {
                let child_path = format!("{path}.{}", f.name());
                match s.column_by_name(f.name()) {
                    Some(c) => children.push(conform(&child_path, c, f.data_type())?),
                    None if f.is_nullable() => {
                        children.push(new_null_array(f.data_type(), s.len()))
                    }
                    None => {
                        return Err(format!(
                        "field `{child_path}` is required in the table but missing from the data"
                    ))
                    }
                }
            }
            Ok(Arc::new(
                StructArray::try_new(fields.clone(), children, s.nulls().cloned()).map_err(err)?,
            ))
        }
        (DataType::List(_), DataType::List(item)) => {
            let l = array.as_list::<i32>();
            let values = conform(&format!("{path}[]"), l.values(), item.data_type())?;
            Ok(Arc::new(
                ListArray::try_new(
                    item.clone(),
                    l.offsets().clone(),
                    values,
                    l.nulls().cloned(),
                )
                .map_err(err)?,
            ))
        }
        (DataType::LargeList(_) | DataType::FixedSizeList(_, _), DataType::List(item)) => {
            let as_list = cast(
                array,
                &DataType::List(Arc::new(Field::new(
                    item.name(),
                    array_item_type(array.data_type()),
                    true,
                ))),
            )
            .map_err(err)?;
            conform(path, &as_list, target)
        }
        (DataType::Map(_, _), DataType::Map(entries, sorted)) => {
            let m = array.as_map();
            let entries_array: ArrayRef = Arc::new(m.entries().clone());
            let conformed = conform(&format!("{path}{{}}"), &entries_array, entries.data_type())?;
            Ok(Arc::new(
                MapArray::try_new(
                    entries.clone(),
                    m.offsets().clone(),
                    conformed.as_struct().clone(),
                    m.nulls().cloned(),
                    *sorted,
                )
                .map_err(err)?,
            ))
        }
        (DataType::Time32(_) | DataType::Time64(_), DataType::Int64) => {
            // Microseconds since midnight.
            let micros = cast(array, &DataType::Time64(TimeUnit::Microsecond)).map_err(err)?;
            cast(&micros, &DataType::Int64).map_err(err)
        }
        (DataType::Dictionary(_, v), _) => {
            let plain = cast(array, v).map_err(err)?;
            conform(path, &plain, target)
        }
        _ => cast(array, target).map_err(err),
    }
}

fn array_item_type(dt: &DataType) -> DataType {
    match dt {
        DataType::LargeList(f) | DataType::FixedSizeList(f, _) | DataType::List(f) => {
            f.data_type().clone()
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, StringArray, TimestampMillisecondArray};

    fn schema(fields: Vec<Field>) -> SchemaRef {
        delta_schema(&Schema::new(fields)).unwrap()
    }

    #[test]
    fn normalizes_to_what_delta_stores() {
        let s = schema(vec![
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
                false,
            ),
            Field::new(
                "t",
                DataType::Time32(arrow::datatypes::TimeUnit::Millisecond),
                true,
            ),
            Field::new("u", DataType::UInt32, true),
        ]);
        assert_eq!(
            s.field(0).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(s.field(1).data_type(), &DataType::Int64);
        assert_eq!(s.field(2).data_type(), &DataType::Int64);
        // Idempotent.
        assert_eq!(delta_schema(&s).unwrap(), s);
    }

    #[test]
    fn merges_additively_and_rejects_the_rest() {
        let table = schema(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(
                "customer",
                DataType::Struct(vec![Field::new("name", DataType::Utf8, true)].into()),
                true,
            ),
        ]);
        let data = schema(vec![
            Field::new("id", DataType::Int32, false),
            Field::new(
                "customer",
                DataType::Struct(
                    vec![
                        Field::new("name", DataType::Utf8, true),
                        Field::new("tier", DataType::Utf8, false),
                    ]
                    .into(),
                ),
                true,
            ),
            Field::new("note", DataType::Utf8, false),
        ]);
        let merged = merge(&table, &data).unwrap();
        assert_eq!(
            merged.field(0).data_type(),
            &DataType::Int64,
            "int fits in long"
        );
        let DataType::Struct(c) = merged.field(1).data_type() else {
            panic!()
        };
        assert_eq!(c.len(), 2);
        assert!(c[1].is_nullable(), "new nested fields are nullable");
        assert_eq!(merged.field(2).name(), "note");
        assert!(merged.field(2).is_nullable());
        // Nothing new: the same schema comes back.
        assert!(Arc::ptr_eq(&merge(&merged, &data).unwrap(), &merged));

        let wider = schema(vec![Field::new("id", DataType::Float64, false)]);
        let e = merge(&table, &wider).unwrap_err();
        assert!(e.contains("`id`") && e.contains("additive"), "{e}");
        let narrow_table = schema(vec![Field::new("id", DataType::Int32, false)]);
        let long = schema(vec![Field::new("id", DataType::Int64, false)]);
        let e = merge(&narrow_table, &long).unwrap_err();
        assert!(e.contains("typeWidening"), "{e}");
    }

    #[test]
    fn conforms_batches_with_casts_and_null_fill() {
        let target = schema(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("note", DataType::Utf8, true),
        ]);
        let src = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new(
                    "ts",
                    DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
                    true,
                ),
                Field::new("id", DataType::Int32, false),
            ])),
            vec![
                Arc::new(TimestampMillisecondArray::from(vec![1_000]).with_timezone("+00:00")),
                Arc::new(Int32Array::from(vec![7])),
            ],
        )
        .unwrap();
        let out = conform_batch(&src, &target).unwrap();
        assert_eq!(out.schema(), target);
        assert_eq!(
            out.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0),
            7
        );
        assert_eq!(
            out.column(1)
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(0),
            1_000_000
        );
        assert!(out.column(2).is_null(0));
        let missing = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("note", DataType::Utf8, true)])),
            vec![Arc::new(StringArray::from(vec!["x"]))],
        )
        .unwrap();
        let e = conform_batch(&missing, &target).unwrap_err();
        assert!(e.contains("`id`"), "{e}");
    }
}
