//! Arrow ⇄ Delta schemas: the Delta form of decoded data and the kernel's form of a table
//! schema. Merging and conforming are the crate's ([`crate::schema`]).
//!
//! Invariant: [`delta_schema`] is idempotent and its output round-trips through the Delta kernel
//! schema unchanged, so comparing two normalized schemas compares what Delta stores.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::engine::arrow_conversion::{TryIntoArrow, TryIntoKernel};
use deltalake::kernel::StructType;

use super::ReaderProfile;

pub use crate::schema::{conform_batch, merge};

/// Delta's form of an Arrow type: microsecond UTC timestamps, times of day as microseconds
/// (`long`, Delta has no TIME type), unsigned integers widened to the next signed type, and
/// large/view variants folded into their plain types. Wall-clock timestamps stay
/// `timestamp_ntz`, except for [`ReaderProfile::Fabric`]: a UTC `timestamp` of the same reading.
pub(super) fn delta_type(dt: &DataType, profile: ReaderProfile) -> DataType {
    match dt {
        DataType::Timestamp(_, Some(_)) => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        }
        DataType::Timestamp(_, None) if profile == ReaderProfile::Fabric => {
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
        DataType::Dictionary(_, v) => delta_type(v, profile),
        DataType::Decimal256(p, s) if *p <= 38 => DataType::Decimal128(*p, *s),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            DataType::List(delta_field(f, profile))
        }
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(|f| delta_field(f, profile)).collect())
        }
        DataType::Map(entries, sorted) => DataType::Map(delta_field(entries, profile), *sorted),
        other => other.clone(),
    }
}

fn delta_field(f: &FieldRef, profile: ReaderProfile) -> FieldRef {
    Arc::new(Field::new(
        f.name(),
        delta_type(f.data_type(), profile),
        f.is_nullable(),
    ))
}

/// The schema Delta stores for `schema`: [`delta_type`] on every column, then a round trip
/// through the kernel's schema so nested names (`element`, `key_value`) match what the table
/// reports back.
pub fn delta_schema(schema: &Schema) -> Result<SchemaRef, String> {
    delta_schema_for(schema, ReaderProfile::Delta)
}

/// [`delta_schema`] for the readers of `profile`.
pub fn delta_schema_for(schema: &Schema, profile: ReaderProfile) -> Result<SchemaRef, String> {
    let mapped = Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| delta_field(f, profile))
            .collect::<Vec<_>>(),
    );
    let kernel: StructType = (&mapped)
        .try_into_kernel()
        .map_err(|e| format!("Delta cannot store this schema: {e}"))?;
    let back: Schema = (&kernel)
        .try_into_arrow()
        .map_err(|e| format!("Delta cannot store this schema: {e}"))?;
    Ok(Arc::new(back))
}

/// The kernel form of a (normalized) Arrow schema, for table metadata.
pub(super) fn kernel_schema(schema: &Schema) -> Result<StructType, String> {
    schema
        .try_into_kernel()
        .map_err(|e| format!("Delta cannot store this schema: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Array, AsArray, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    };

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
