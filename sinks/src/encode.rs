//! Parquet encoding settings every lakesink table writes with (Parquet files, Delta data files,
//! Databend staged files): the compression codec, row groups, and the dictionary choice per
//! column.
//!
//! Invariant: every file any sink writes goes through [`writer_properties`],
//! [`writer_properties_for`] or [`writer_properties_keyed`], so tables of every kind share one set of settings, and is
//! encoded inside [`encode_blocking`], which bounds encoders to one per core and counts what
//! they cost ([`totals`]).

use arrow::record_batch::RecordBatch;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::{WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;

/// Parquet column compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// No compression.
    None,
    /// Snappy (the default): fast, and every reader has it.
    #[default]
    Snappy,
    /// Zstandard: smaller files for a little more CPU.
    Zstd,
    /// LZ4 (raw).
    Lz4,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" | "uncompressed" => Compression::None,
            "snappy" => Compression::Snappy,
            "zstd" => Compression::Zstd,
            "lz4" => Compression::Lz4,
            _ => {
                return Err(format!(
                    "unknown compression `{s}`; use none, snappy, zstd or lz4"
                ))
            }
        })
    }
}

/// Rows per row group, at most, unless a sink asks otherwise.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 1 << 20;

/// Encoded bytes per row group, at most, unless a sink asks otherwise: Spark, DuckDB and
/// pyarrow read groups of this size at full speed, and a writer holds its open group in
/// memory (about three times its encoded size while it closes: its pages, the file buffer
/// they are copied into, the upload), so wide rows must not make a 1M-row group of hundreds
/// of MB.
pub const DEFAULT_ROW_GROUP_BYTES: usize = 16 << 20;

/// How large a Parquet row group grows: it ends at whichever bound it reaches first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGroups {
    /// Rows, at most.
    pub rows: usize,
    /// Encoded bytes, at most (parquet's estimate, checked as batches are written); `None`:
    /// rows alone bound the group.
    pub bytes: Option<usize>,
}

impl Default for RowGroups {
    fn default() -> Self {
        Self {
            rows: DEFAULT_ROW_GROUP_ROWS,
            bytes: Some(DEFAULT_ROW_GROUP_BYTES),
        }
    }
}

impl RowGroups {
    /// Groups of up to `rows` rows and the default bytes.
    pub fn rows(rows: usize) -> Self {
        Self {
            rows,
            ..Self::default()
        }
    }
}

/// The Parquet writer settings every lakesink table uses.
pub fn writer_properties(compression: Compression, row_groups: RowGroups) -> WriterProperties {
    builder(compression, row_groups).build()
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
    row_groups: RowGroups,
    sample: &RecordBatch,
) -> WriterProperties {
    let mut b = builder(compression, row_groups);
    for (field, column) in sample.schema().fields().iter().zip(sample.columns()) {
        if mostly_distinct(column.as_ref()) {
            b = b.set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), false);
        }
    }
    b.build()
}

/// Bytes per data page of an upsert table's key columns: about a thousand 8-byte keys (the
/// writer checks a page's size every 1,024 values), against the 1 MiB of other columns. An
/// upsert reads the key columns of the pages whose min/max admit a changed key, so the pages
/// bound what a change reads; the page index grows by one entry per page (tens of KB per
/// million rows).
pub const KEY_PAGE_BYTES: usize = 8 * 1024;

/// [`writer_properties_for`] for an upsert table with key columns `keys`: their data pages are
/// small ([`KEY_PAGE_BYTES`]) and indexed (every file's page index holds each page's min and
/// max), so a change's key is looked up by page, not by row group.
pub fn writer_properties_keyed(
    compression: Compression,
    row_groups: RowGroups,
    sample: Option<&RecordBatch>,
    keys: &[String],
) -> WriterProperties {
    let mut b = builder(compression, row_groups);
    if let Some(sample) = sample {
        for (field, column) in sample.schema().fields().iter().zip(sample.columns()) {
            if mostly_distinct(column.as_ref()) {
                b = b.set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), false);
            }
        }
    }
    for k in keys {
        b = b
            .set_column_dictionary_enabled(ColumnPath::from(k.as_str()), false)
            .set_column_data_page_size_limit(ColumnPath::from(k.as_str()), KEY_PAGE_BYTES);
    }
    b.build()
}

fn builder(compression: Compression, row_groups: RowGroups) -> WriterPropertiesBuilder {
    WriterProperties::builder()
        .set_compression(match compression {
            Compression::None => PqCompression::UNCOMPRESSED,
            Compression::Snappy => PqCompression::SNAPPY,
            Compression::Zstd => PqCompression::ZSTD(ZstdLevel::default()),
            Compression::Lz4 => PqCompression::LZ4_RAW,
        })
        .set_max_row_group_row_count(Some(row_groups.rows.max(1)))
        .set_max_row_group_bytes(row_groups.bytes.filter(|&b| b > 0))
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

/// Runs CPU-bound encoding (Parquet) on the blocking pool, at most one encode per core at a
/// time across every sink: the cores are saturated either way, and fewer concurrent encoders
/// hold fewer Arrow inputs and Parquet outputs in memory at once (peak RSS).
pub async fn encode_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, tokio::task::JoinError> {
    static PERMITS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
        tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
        )
    });
    let waiting = std::time::Instant::now();
    let _permit = PERMITS
        .acquire()
        .await
        .expect("the encode semaphore is never closed");
    ENCODE_WAIT_NS.fetch_add(
        waiting.elapsed().as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    tokio::task::spawn_blocking(move || {
        let start = thread_cpu_ns();
        let out = f();
        ENCODE_CPU_NS.fetch_add(
            thread_cpu_ns().saturating_sub(start),
            std::sync::atomic::Ordering::Relaxed,
        );
        out
    })
    .await
}

/// Nanoseconds flushes spent waiting for an encode permit, summed over flushes (they wait
/// concurrently). One atomic add per encode.
static ENCODE_WAIT_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// CPU nanoseconds spent inside [`encode_blocking`] by this process. One atomic add per encode,
/// never per row.
static ENCODE_CPU_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// CPU nanoseconds the calling thread has run (Linux `/proc/thread-self/schedstat`; 0 where
/// that does not exist). A few microseconds per call: per encode, not per row.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What encoding has cost this process so far: the metrics hook a benchmark or a profiler
/// reads (differences between two readings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeTotals {
    /// CPU nanoseconds spent encoding, on every thread.
    pub cpu_ns: u64,
    /// Nanoseconds flushes waited for an encoder, summed over flushes.
    pub wait_ns: u64,
}

/// The encode totals so far (see [`EncodeTotals`]).
pub fn totals() -> EncodeTotals {
    use std::sync::atomic::Ordering::Relaxed;
    EncodeTotals {
        cpu_ns: ENCODE_CPU_NS.load(Relaxed),
        wait_ns: ENCODE_WAIT_NS.load(Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray};
    use arrow::record_batch::RecordBatch;
    use parquet::arrow::ArrowWriter;
    use parquet::basic::Encoding;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use bytes::Bytes;

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
        let props = writer_properties_for(Compression::Snappy, RowGroups::default(), &batch);
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
