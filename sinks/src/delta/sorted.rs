//! Compaction's merge by key (see `purge`): the live rows of an upsert table's files, each
//! file already sorted by the key columns (every flush writes its rows sorted, see `mor`), are
//! merged into one run sorted by key, streaming, so the compacted file's key pages stay
//! narrow and a later upsert reads one page per changed key instead of one per file compacted.
//!
//! Invariants:
//! - Every live row of every source is emitted exactly once (a source that is not sorted, a
//!   file another engine wrote, only makes the run less sorted; nothing is lost or doubled).
//! - Rows of equal keys keep the order of their sources.
//! - Where each source's live rows land is recorded ([`Merge::positions`]): the `k`-th live row
//!   of a source is the `k`-th smallest of its positions, so deletion vectors given to the
//!   sources meanwhile can be carried to the new file (`rebase`).
//! - Memory: one row group's column chunks per source, the caller bounding the sources merged
//!   at once by their size ([`MERGE_BYTES`]); and one decoded batch per source, of a size that
//!   keeps the rows decoded at once about [`MERGE_ROWS`].

use std::sync::Arc;

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::{filter_record_batch, interleave_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};
use deltalake::kernel::LogicalFileView;
use deltalake::DeltaTableError;
use futures::StreamExt;
use object_store::ObjectStore;
use parquet::arrow::async_reader::ParquetRecordBatchStream;
use roaring::RoaringTreemap;

use super::probe::{batches, read_error, FileReader};
use super::rewrite::{conform, BATCH_ROWS};

/// At most this many bytes of files (their size in the log) are merged at once; a bin larger
/// than this becomes a few sorted runs, one after another in its file.
pub(super) const MERGE_BYTES: u64 = 32 << 20;

/// Rows decoded at once across the files merged (each file's batches are this over the files'
/// number, within 256 and [`BATCH_ROWS`]): many small files merged together do not all sit
/// decoded in memory.
const MERGE_ROWS: usize = 65_536;

/// One source of a merge: its live rows, a batch at a time.
struct Cursor {
    stream: ParquetRecordBatchStream<FileReader>,
    path: object_store::path::Path,
    /// Rows its deletion vector marks (not merged).
    deleted: RoaringTreemap,
    /// Rows of the file read so far.
    read: u64,
    batch: RecordBatch,
    keys: Rows,
    next: usize,
}

/// A streaming merge of files sorted by key into one sorted run.
pub(super) struct Merge {
    schema: SchemaRef,
    key_columns: Vec<usize>,
    converter: RowConverter,
    cursors: Vec<Cursor>,
    /// Sources with rows left, as a binary min-heap by (current key, source).
    heap: Vec<usize>,
    /// Per source, the rows of the run its live rows went to.
    positions: Vec<RoaringTreemap>,
    /// Rows emitted so far, counted from `first`.
    out: u64,
}

impl Merge {
    /// Opens `files` (each with the deletion vector read for it) to merge their live rows,
    /// conformed to `schema` (the data files' columns), by the columns `keys`; the run's first
    /// row is row `first` of the file it goes to. `None` when a key column is not in `schema`.
    pub(super) async fn open(
        store: &Arc<dyn ObjectStore>,
        files: Vec<(&LogicalFileView, RoaringTreemap)>,
        schema: &SchemaRef,
        keys: &[String],
        first: u64,
    ) -> Result<Option<Self>, DeltaTableError> {
        let Some(key_columns) = keys
            .iter()
            .map(|k| schema.index_of(k).ok())
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let converter = RowConverter::new(
            key_columns
                .iter()
                .map(|&c| SortField::new(schema.field(c).data_type().clone()))
                .collect(),
        )?;
        let mut merge = Self {
            schema: schema.clone(),
            key_columns,
            converter,
            cursors: Vec::with_capacity(files.len()),
            heap: Vec::with_capacity(files.len()),
            positions: vec![RoaringTreemap::new(); files.len()],
            out: first,
        };
        // Rows decoded at once stay about MERGE_ROWS however many files are merged.
        let rows = (MERGE_ROWS / files.len().max(1)).clamp(256, BATCH_ROWS);
        for (s, (file, deleted)) in files.into_iter().enumerate() {
            merge.cursors.push(Cursor {
                stream: batches(store, file, rows).await?,
                path: file.object_store_path(),
                deleted,
                read: 0,
                batch: RecordBatch::new_empty(schema.clone()),
                keys: merge.converter.empty_rows(0, 0),
                next: 0,
            });
            if merge.refill(s).await? {
                merge.push(s);
            }
        }
        Ok(Some(merge))
    }

    /// Loads source `s`'s next batch holding live rows; false when it has none left.
    async fn refill(&mut self, s: usize) -> Result<bool, DeltaTableError> {
        let c = &mut self.cursors[s];
        while let Some(batch) = c.stream.next().await {
            let batch = batch.map_err(read_error(&c.path))?;
            let rows = batch.num_rows() as u64;
            let live = live(batch, &c.deleted, c.read)?;
            c.read += rows;
            if live.num_rows() == 0 {
                continue;
            }
            let live = conform(&live, &self.schema)?;
            let columns: Vec<_> = self
                .key_columns
                .iter()
                .map(|&k| live.column(k).clone())
                .collect();
            c.keys = self.converter.convert_columns(&columns)?;
            c.batch = live;
            c.next = 0;
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether source `a`'s current row goes before source `b`'s.
    fn before(&self, a: usize, b: usize) -> bool {
        let (x, y) = (&self.cursors[a], &self.cursors[b]);
        (x.keys.row(x.next), a) < (y.keys.row(y.next), b)
    }

    fn push(&mut self, s: usize) {
        self.heap.push(s);
        let mut i = self.heap.len() - 1;
        while i > 0 {
            let parent = (i - 1) / 2;
            if !self.before(self.heap[i], self.heap[parent]) {
                break;
            }
            self.heap.swap(i, parent);
            i = parent;
        }
    }

    fn sift_down(&mut self) {
        let mut i = 0;
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < self.heap.len() && self.before(self.heap[l], self.heap[least]) {
                least = l;
            }
            if r < self.heap.len() && self.before(self.heap[r], self.heap[least]) {
                least = r;
            }
            if least == i {
                return;
            }
            self.heap.swap(i, least);
            i = least;
        }
    }

    /// The run's next rows, in key order (up to a batch); `None` when every source is merged.
    pub(super) async fn next(&mut self) -> Result<Option<RecordBatch>, DeltaTableError> {
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(BATCH_ROWS);
        let mut exhausted = None;
        while picks.len() < BATCH_ROWS {
            let Some(&s) = self.heap.first() else {
                break;
            };
            let c = &mut self.cursors[s];
            picks.push((s, c.next));
            self.positions[s].insert(self.out);
            self.out += 1;
            c.next += 1;
            if c.next == c.batch.num_rows() {
                // Its batch is still referenced by `picks`: emit them before replacing it.
                let last = self.heap.len() - 1;
                self.heap.swap(0, last);
                self.heap.pop();
                self.sift_down();
                exhausted = Some(s);
                break;
            }
            self.sift_down();
        }
        if picks.is_empty() {
            return Ok(None);
        }
        let batches: Vec<&RecordBatch> = self.cursors.iter().map(|c| &c.batch).collect();
        let rows = interleave_record_batch(&batches, &picks)?;
        if let Some(s) = exhausted {
            if self.refill(s).await? {
                self.push(s);
            }
        }
        Ok(Some(rows))
    }

    /// Per source (in the order given to [`Merge::open`]), the rows of the file its live rows
    /// went to, in order; and the rows emitted in all.
    pub(super) fn positions(self) -> (Vec<RoaringTreemap>, u64) {
        (self.positions, self.out)
    }
}

/// The rows of `batch` its file's deletion vector `deleted` does not mark, `batch` being the
/// file's rows from row `at` on.
pub(super) fn live(
    batch: RecordBatch,
    deleted: &RoaringTreemap,
    at: u64,
) -> Result<RecordBatch, DeltaTableError> {
    if deleted.is_empty() {
        return Ok(batch);
    }
    let rows = batch.num_rows() as u64;
    let keep = BooleanArray::from_iter((0..rows).map(|i| Some(!deleted.contains(at + i))));
    Ok(filter_record_batch(&batch, &keep)?)
}
