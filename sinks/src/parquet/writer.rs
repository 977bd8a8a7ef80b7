//! Encoding a flush into Parquet files, one per output (Hive) partition, off the async threads.

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::config::{Compression, ParquetSinkConfig};
use crate::partition;
use crate::{Error, Flush, Result};

/// One staged file and where it is published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedFile {
    /// Path of the staged object, relative to the table root.
    pub staged: String,
    /// Final path, relative to the table root.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

/// An encoded file, not yet uploaded.
pub(crate) struct Encoded {
    pub hive_dir: String,
    pub rows: u64,
    pub data: Bytes,
}

/// The Parquet writer settings every lakesink table uses.
pub fn writer_properties(compression: Compression, row_group_rows: usize) -> WriterProperties {
    builder(compression, row_group_rows).build()
}

/// [`writer_properties`] for a file whose rows look like `sample`: dictionary encoding is
/// turned off for the flat columns where it cannot pay (see [`mostly_distinct`]).
///
/// parquet-rs keeps a column dictionary-encoded until its dictionary page passes 1 MiB, which
/// a flush of a few thousand rows never reaches: an `order_id` or an offset column would be
/// hashed value by value into a dictionary as large as the data, slower to write and larger to
/// read. (parquet-mr makes the same check after its first page.) Low-cardinality columns
/// (status, country, the topic) keep their dictionary.
pub fn writer_properties_for(
    compression: Compression,
    row_group_rows: usize,
    sample: &RecordBatch,
) -> WriterProperties {
    let mut b = builder(compression, row_group_rows);
    for (field, column) in sample.schema().fields().iter().zip(sample.columns()) {
        if mostly_distinct(column.as_ref()) {
            b = b.set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), false);
        }
    }
    b.build()
}

fn builder(compression: Compression, row_group_rows: usize) -> WriterPropertiesBuilder {
    WriterProperties::builder()
        .set_compression(match compression {
            Compression::None => PqCompression::UNCOMPRESSED,
            Compression::Snappy => PqCompression::SNAPPY,
            Compression::Zstd => PqCompression::ZSTD(ZstdLevel::default()),
            Compression::Lz4 => PqCompression::LZ4_RAW,
        })
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by(format!("lakesink {}", env!("CARGO_PKG_VERSION")))
}

/// Rows sampled per column to judge its cardinality.
const DICTIONARY_SAMPLE: usize = 1024;

/// Whether more than half of the first [`DICTIONARY_SAMPLE`] non-null values of a flat
/// fixed-width or string/binary column are distinct. Nested, boolean and dictionary columns
/// answer `false` (their default encoding stays).
fn mostly_distinct(column: &dyn arrow::array::Array) -> bool {
    use arrow::array::AsArray;
    use arrow::datatypes::DataType;
    let n = column.len().min(DICTIONARY_SAMPLE);
    if n < 64 {
        return false; // too few rows to judge, and too few for the choice to matter
    }
    // Hashes, sorted and deduplicated once at the end: cheaper than a hash set per value.
    let mut seen: Vec<u64> = Vec::with_capacity(n);
    let mut count = |v: &[u8]| seen.push(value_hash(v));
    let valid = |i: usize| column.is_valid(i);
    match column.data_type() {
        DataType::Utf8 => {
            let a = column.as_string::<i32>();
            (0..n)
                .filter(|&i| valid(i))
                .for_each(|i| count(a.value(i).as_bytes()));
        }
        DataType::LargeUtf8 => {
            let a = column.as_string::<i64>();
            (0..n)
                .filter(|&i| valid(i))
                .for_each(|i| count(a.value(i).as_bytes()));
        }
        DataType::Binary => {
            let a = column.as_binary::<i32>();
            (0..n).filter(|&i| valid(i)).for_each(|i| count(a.value(i)));
        }
        DataType::LargeBinary => {
            let a = column.as_binary::<i64>();
            (0..n).filter(|&i| valid(i)).for_each(|i| count(a.value(i)));
        }
        t if t.is_primitive() => {
            let Some(width) = t.primitive_width() else {
                return false;
            };
            let data = column.to_data();
            let Some(buffer) = data.buffers().first() else {
                return false;
            };
            let bytes = &buffer.as_slice()[data.offset() * width..];
            (0..n)
                .filter(|&i| valid(i))
                .for_each(|i| count(&bytes[i * width..(i + 1) * width]));
        }
        _ => return false,
    }
    let values = seen.len();
    seen.sort_unstable();
    seen.dedup();
    values >= 64 && seen.len() * 2 > values
}

/// A 64-bit hash of a value, for counting distinct values in a sample (collisions only make
/// a column look less distinct, which keeps its dictionary: the safe side). A word at a time,
/// multiply-and-rotate (FxHash's step, with the length mixed in): it needs to spread values,
/// not resist attacks, and runs for a thousand values of every column of every flush.
fn value_hash(v: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let step = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
    let mut words = v.chunks_exact(8);
    let mut h = step(0, v.len() as u64);
    for w in &mut words {
        h = step(h, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = step(h, u64::from_le_bytes(tail));
    // A final avalanche, so values differing in a last byte differ in every bit.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Encodes `flush` into one Parquet file per output partition, in hive-key order (so the
/// result, and the staged names derived from it, are deterministic). CPU-bound: call from a
/// blocking thread.
pub(crate) fn encode(flush: &Flush, config: &ParquetSinkConfig) -> Result<Vec<Encoded>> {
    let encode_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Encode {
        tp: flush.tp.clone(),
        start: flush.start,
        next: flush.next,
        source: e,
    };
    let props = match flush.batches.first() {
        Some(sample) => writer_properties_for(config.compression, config.row_group_rows, sample),
        None => writer_properties(config.compression, config.row_group_rows),
    };
    let mut writers: BTreeMap<String, (ArrowWriter<Vec<u8>>, u64, arrow::datatypes::SchemaRef)> =
        BTreeMap::new();
    for batch in &flush.batches {
        for (dir, part) in partition::split(batch, &config.partition_by, &flush.tp)? {
            let entry = match writers.entry(dir) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let w = ArrowWriter::try_new(Vec::new(), part.schema(), Some(props.clone()))
                        .map_err(|e| encode_err(Box::new(e)))?;
                    v.insert((w, 0, part.schema()))
                }
            };
            write_part(&mut entry.0, &entry.2, &part).map_err(encode_err)?;
            entry.1 += part.num_rows() as u64;
        }
    }
    writers
        .into_iter()
        .map(|(hive_dir, (w, rows, _))| {
            let data = w.into_inner().map_err(|e| encode_err(Box::new(e)))?;
            Ok(Encoded {
                hive_dir,
                rows,
                data: Bytes::from(data),
            })
        })
        .collect()
}

fn write_part(
    w: &mut ArrowWriter<Vec<u8>>,
    schema: &arrow::datatypes::SchemaRef,
    part: &RecordBatch,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if part.schema() != *schema {
        return Err(format!(
            "schema changed inside one flush (writer has {} columns, batch has {}); \
             flushes must hold one schema",
            schema.fields().len(),
            part.schema().fields().len()
        )
        .into());
    }
    w.write(part)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray};
    use arrow::record_batch::RecordBatch;
    use parquet::arrow::ArrowWriter;
    use parquet::basic::Encoding;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use super::*;

    /// Unique columns are written without a dictionary, repetitive ones keep it, and the file
    /// reads back to the same rows.
    #[test]
    fn dictionary_only_where_values_repeat() {
        let n = 5000;
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("id", Arc::new(Int64Array::from_iter_values(0..n as i64))),
            (
                "order_id",
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("order-{i:08}")),
                )),
            ),
            (
                "status",
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| ["NEW", "PAID", "SHIPPED"][i % 3]),
                )),
            ),
            (
                "quantity",
                Arc::new(Int32Array::from_iter_values((0..n).map(|i| (i % 7) as i32))),
            ),
        ];
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let props = writer_properties_for(Compression::Snappy, 1 << 20, &batch);
        let mut w = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        let file = Bytes::from(w.into_inner().unwrap());
        let reader = SerializedFileReader::new(file.clone()).unwrap();
        let rg = reader.metadata().row_group(0);
        let dictionary = |i: usize| {
            rg.column(i)
                .encodings()
                .any(|e| matches!(e, Encoding::RLE_DICTIONARY | Encoding::PLAIN_DICTIONARY))
        };
        assert!(!dictionary(0), "unique id dictionary-encoded");
        assert!(!dictionary(1), "unique order_id dictionary-encoded");
        assert!(dictionary(2), "status lost its dictionary");
        assert!(dictionary(3), "quantity lost its dictionary");
        let back: Vec<RecordBatch> =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 8192)
                .unwrap()
                .collect::<std::result::Result<_, _>>()
                .unwrap();
        assert_eq!(back, vec![batch]);
    }

    #[test]
    fn small_or_nullable_samples_keep_the_default() {
        let few = Int64Array::from_iter_values(0..10);
        assert!(!mostly_distinct(&few));
        let nulls = Int64Array::from_iter((0..2000).map(|i| (i % 100 == 0).then_some(i)));
        assert!(
            !mostly_distinct(&nulls),
            "11 non-null values in the sample: too few to judge"
        );
    }
}
