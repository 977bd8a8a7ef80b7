//! Packed rows: record batches kept compressed while they wait for their flush.
//!
//! A partition writer under memory pressure packs its buffer instead of flushing it early: the
//! batches become one Arrow IPC stream with zstd-compressed buffers, a fraction of their Arrow
//! size. The rows then still go out with the next
//! latency tick, in the files the tick's flushes share, instead of as a file of their own per
//! Kafka partition. Sinks read a flush's rows chunk by chunk ([`Chunk`]), unpacking one packed
//! chunk at a time, so a flush's rows are never all unpacked at once where the sink streams them
//! into its files (Delta and Parquet appends); sinks that need every row at once (upserts,
//! Databend loads) unpack the whole flush ([`crate::Flush::unpacked`]).
//!
//! Invariants: a [`Packed`] unpacks to exactly the batches it was made from (same schema,
//! metadata, rows and order); packing never drops or reorders a row.

use std::io::Cursor;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow::ipc::CompressionType;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;

/// Batches of one schema, compressed (an Arrow IPC stream with zstd buffers). Cloning is
/// cheap: the bytes are shared.
#[derive(Clone)]
pub struct Packed {
    schema: SchemaRef,
    rows: usize,
    bytes: Bytes,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("rows", &self.rows)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl Packed {
    /// Packs `batches`, which all have `schema`.
    pub fn pack(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Packed, ArrowError> {
        let options =
            IpcWriteOptions::default().try_with_compression(Some(CompressionType::ZSTD))?;
        let size: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
        let mut writer = StreamWriter::try_new_with_options(
            Vec::with_capacity(size / 4 + 1024),
            schema,
            options,
        )?;
        let mut rows = 0;
        for b in batches {
            if b.schema() != *schema {
                return Err(ArrowError::SchemaError(format!(
                    "cannot pack batches of different schemas: {:?} vs {:?}",
                    b.schema(),
                    schema
                )));
            }
            writer.write(b)?;
            rows += b.num_rows();
        }
        writer.finish()?;
        let mut bytes = writer.into_inner()?;
        bytes.shrink_to_fit();
        Ok(Packed {
            schema: schema.clone(),
            rows,
            bytes: Bytes::from(bytes),
        })
    }

    /// The batches' schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Rows packed.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Memory the packed rows hold.
    pub fn memory_size(&self) -> usize {
        self.bytes.len()
    }

    /// The batches, as they were packed.
    pub fn unpack(&self) -> Result<Vec<RecordBatch>, ArrowError> {
        let reader = StreamReader::try_new(Cursor::new(self.bytes.clone()), None)?;
        let mut out = Vec::new();
        for b in reader {
            // The stream's schema is the packed one; keep the very same `Arc` so batches
            // compare equal to (and are cheap to check against) the schema's other batches.
            let b = b?;
            out.push(b.with_schema(self.schema.clone())?);
        }
        Ok(out)
    }
}

/// Part of a flush's rows: batches as decoded, or packed.
#[derive(Debug, Clone)]
pub enum Chunk {
    /// A decoded batch.
    Batch(RecordBatch),
    /// Packed batches.
    Packed(Packed),
}

impl Chunk {
    /// The rows' schema.
    pub fn schema(&self) -> SchemaRef {
        match self {
            Chunk::Batch(b) => b.schema(),
            Chunk::Packed(p) => p.schema.clone(),
        }
    }

    /// Rows in the chunk.
    pub fn rows(&self) -> usize {
        match self {
            Chunk::Batch(b) => b.num_rows(),
            Chunk::Packed(p) => p.rows,
        }
    }

    /// Memory the chunk holds.
    pub fn memory_size(&self) -> usize {
        match self {
            Chunk::Batch(b) => b.get_array_memory_size(),
            Chunk::Packed(p) => p.memory_size(),
        }
    }

    /// The chunk's batches, unpacked when packed.
    pub fn batches(&self) -> Result<Vec<RecordBatch>, ArrowError> {
        match self {
            Chunk::Batch(b) => Ok(vec![b.clone()]),
            Chunk::Packed(p) => p.unpack(),
        }
    }
}

/// An empty batch of `schema` (to derive a chunk's schema after a transformation).
pub fn empty(schema: &SchemaRef) -> RecordBatch {
    RecordBatch::new_empty(Arc::clone(schema))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::collections::HashMap;

    fn batch(schema: &SchemaRef, from: i64, n: usize) -> RecordBatch {
        let ids: Vec<i64> = (from..from + n as i64).collect();
        let names: Vec<Option<String>> = ids
            .iter()
            .map(|i| (i % 7 != 0).then(|| format!("customer-{}", i % 100)))
            .collect();
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(names)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn unpacks_what_was_packed_in_a_fraction_of_the_memory() {
        let schema = Arc::new(Schema::new_with_metadata(
            vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
            ],
            HashMap::from([("lakesink.test".to_string(), "kept".to_string())]),
        ));
        let batches = vec![batch(&schema, 0, 10_000), batch(&schema, 10_000, 5_000)];
        let packed = Packed::pack(&schema, &batches).unwrap();
        assert_eq!(packed.rows(), 15_000);
        let arrow: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
        assert!(
            packed.memory_size() * 3 < arrow,
            "{} packed bytes for {arrow} Arrow bytes",
            packed.memory_size()
        );
        let back = packed.unpack().unwrap();
        assert_eq!(back, batches);
        assert!(Arc::ptr_eq(&back[0].schema(), &schema));
        let chunk = Chunk::Packed(packed);
        assert_eq!(chunk.rows(), 15_000);
        assert_eq!(chunk.batches().unwrap(), batches);
    }

    #[test]
    fn packs_enums_lists_and_structs() {
        use arrow::array::{ArrayRef, DictionaryArray, ListArray, StructArray};
        use arrow::datatypes::{Int32Type, Int64Type};
        let batch = |from: i32| {
            // Each batch with its own dictionary, as a decoder makes them.
            let statuses = match from {
                1 => vec!["NEW", "PAID", "NEW", "SHIPPED"],
                _ => vec!["CANCELLED", "CANCELLED", "RETURNED", "NEW"],
            };
            let status: DictionaryArray<Int32Type> = statuses.into_iter().collect();
            let lines = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
                Some(vec![Some(i64::from(from)), None]),
                None,
                Some(vec![]),
                Some(vec![Some(3)]),
            ]);
            let customer = StructArray::from(vec![(
                Arc::new(Field::new("id", DataType::Int32, true)),
                Arc::new(arrow::array::Int32Array::from(vec![from, 2, 3, 4])) as ArrayRef,
            )]);
            RecordBatch::try_from_iter([
                ("status", Arc::new(status) as ArrayRef),
                ("lines", Arc::new(lines) as ArrayRef),
                ("customer", Arc::new(customer) as ArrayRef),
            ])
            .unwrap()
        };
        let batches = vec![batch(1), batch(5)];
        let schema = batches[0].schema();
        let packed = Packed::pack(&schema, &batches).unwrap();
        assert_eq!(packed.unpack().unwrap(), batches);
    }

    #[test]
    fn refuses_batches_of_another_schema() {
        let a = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let b = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
        ]));
        let e = Packed::pack(&a, &[batch(&b, 1, 3)]).unwrap_err();
        assert!(e.to_string().contains("different schemas"), "{e}");
    }
}
