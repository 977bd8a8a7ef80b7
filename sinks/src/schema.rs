//! Arrow table schemas as every sink evolves them: additive merging, and conforming record
//! batches to a table's schema (Delta and Databend tables both evolve this way).
//!
//! Invariants:
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

/// Merges the columns of `data` into `table` (both in the form the table stores, e.g. Delta's
/// `delta_schema`).
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
