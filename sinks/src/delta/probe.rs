//! Reading a data file for an upsert (see `rewrite` and `mor`): its footer, the key columns of
//! the row groups its statistics do not rule out, and whether it holds a changed key (for a
//! rewrite) or which of its rows do (for deletion vectors: their indexes in the file, counted
//! over every row group, the ones skipped included).
//!
//! Invariant: a row is skipped only when the statistics of the log, its row group or its pages
//! rule every change out, and the position given for a matched row is its index in the file
//! (the n-th row streamed is the n-th row of the selected ranges, in file order).

use std::sync::Arc;

use arrow::array::{Array, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use deltalake::kernel::LogicalFileView;
use deltalake::DeltaTableError;
use futures::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, RowSelection};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};

use super::rewrite::*;
pub(super) use crate::object_file::ObjectFile as FileReader;

/// What a file's footer and key columns tell about it.
pub(super) enum Probe {
    /// No row group's statistics admit a change: the data was not read.
    Pruned,
    /// Its key columns hold no changed key.
    Clean,
    /// It holds a changed key: file number `.0` is rewritten.
    Dirty(usize),
}

/// A reader of `file`; with `page_index`, its footer's page index is read too (one more ranged
/// read), for pruning by page.
pub(super) async fn reader(
    store: &Arc<dyn ObjectStore>,
    file: &LogicalFileView,
    page_index: bool,
) -> Result<ParquetRecordBatchStreamBuilder<FileReader>, DeltaTableError> {
    let path = file.object_store_path();
    let reader = FileReader::new(store.clone(), path.clone(), file.size() as u64);
    // Optional: a file written without a page index (by another engine) is read by row groups.
    let options = ArrowReaderOptions::new().with_page_index_policy(if page_index {
        PageIndexPolicy::Optional
    } else {
        PageIndexPolicy::Skip
    });
    ParquetRecordBatchStreamBuilder::new_with_options(reader, options)
        .await
        .map_err(read_error(&path))
}

/// `file`'s rows, a batch of `rows` at a time.
pub(super) async fn batches(
    store: &Arc<dyn ObjectStore>,
    file: &LogicalFileView,
    rows: usize,
) -> Result<parquet::arrow::async_reader::ParquetRecordBatchStream<FileReader>, DeltaTableError> {
    let path = file.object_store_path();
    reader(store, file, false)
        .await?
        .with_batch_size(rows)
        .build()
        .map_err(read_error(&path))
}

/// An error reading data file `path`, named.
pub(super) fn read_error(
    path: &Path,
) -> impl Fn(parquet::errors::ParquetError) -> DeltaTableError + '_ {
    move |e| DeltaTableError::Generic(format!("reading data file {path}: {e}"))
}

/// Reads file number `n`'s footer and, where its statistics admit a change, its key columns.
pub(super) async fn probe(
    store: &Arc<dyn ObjectStore>,
    file: &LogicalFileView,
    n: usize,
    keys: &Keys,
    index: &ChangeIndex<'_>,
) -> Result<Probe, DeltaTableError> {
    let Some(mut scan) = key_scan(store, file, keys).await? else {
        return Ok(Probe::Pruned);
    };
    let Some(stream) = scan.stream.as_mut() else {
        return Ok(Probe::Clean);
    };
    let path = file.object_store_path();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(read_error(&path))?;
        if !matches(keys, index, &batch)?.is_empty() {
            return Ok(Probe::Dirty(n));
        }
    }
    Ok(Probe::Clean)
}

/// Whether any of `files` holds one of the changes' keys (a winner's new files, for `entry`).
pub(super) async fn any_holds(
    store: &Arc<dyn ObjectStore>,
    files: &[LogicalFileView],
    keys: &Keys,
    index: &ChangeIndex<'_>,
) -> Result<bool, DeltaTableError> {
    for (n, f) in files.iter().enumerate() {
        if matches!(probe(store, f, n, keys, index).await?, Probe::Dirty(_)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The rows of `batch` (their indexes in it) whose key is among the changes, each with whether
/// its change deletes it. With one integer key column, the rows are first tested against the
/// changes' set of integers, and only the candidates are converted to rows.
fn matches(
    keys: &Keys,
    index: &ChangeIndex<'_>,
    batch: &RecordBatch,
) -> Result<Vec<(usize, bool)>, DeltaTableError> {
    let mut out = Vec::new();
    match keys.candidates(batch)? {
        Some(candidates) if candidates.is_empty() => {}
        Some(candidates) => {
            let picked = take_record_batch(batch, &UInt32Array::from(candidates.clone()))?;
            for (r, i) in keys.rows_of(&picked)?.iter().zip(candidates) {
                if let Some(deletes) = index.get(r) {
                    out.push((i as usize, deletes));
                }
            }
        }
        None => {
            for (i, r) in keys.rows_of(batch)?.iter().enumerate() {
                if let Some(deletes) = index.get(r) {
                    out.push((i, deletes));
                }
            }
        }
    }
    Ok(out)
}

/// The rows of `file` (their indexes in the file) whose key is among the changes, each with
/// whether its change deletes it; `None` when the file's statistics rule every change out.
pub(super) async fn matching_rows(
    store: &Arc<dyn ObjectStore>,
    file: &LogicalFileView,
    keys: &Keys,
    index: &ChangeIndex<'_>,
) -> Result<Option<Vec<(u64, bool)>>, DeltaTableError> {
    let Some(mut scan) = key_scan(store, file, keys).await? else {
        return Ok(None);
    };
    let mut matched = Vec::new();
    let Some(stream) = scan.stream.as_mut() else {
        return Ok(Some(matched));
    };
    let path = file.object_store_path();
    // Rows stream in file order through the selected ranges: the k-th row streamed is the
    // k-th row of those ranges. `starts[j]` is the streamed index of range j's first row.
    let starts: Vec<u64> = scan
        .ranges
        .iter()
        .scan(0u64, |acc, &(_, rows)| {
            let at = *acc;
            *acc += rows;
            Some(at)
        })
        .collect();
    let total: u64 = scan.ranges.iter().map(|r| r.1).sum();
    let mut streamed = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(read_error(&path))?;
        for (i, deletes) in matches(keys, index, &batch)? {
            let k = streamed + i as u64;
            if k >= total {
                return Err(DeltaTableError::Generic(format!(
                    "reading data file {path}: more rows than its selected ranges hold"
                )));
            }
            let j = starts.partition_point(|&s| s <= k) - 1;
            matched.push((scan.ranges[j].0 + (k - starts[j]), deletes));
        }
        streamed += batch.num_rows() as u64;
    }
    Ok(Some(matched))
}

/// A stream of the key columns of a file's row groups that its statistics do not rule out.
pub(super) struct KeyScan {
    /// `None`: the file has no key column (written before the key existed): no row matches.
    pub(super) stream: Option<parquet::arrow::async_reader::ParquetRecordBatchStream<FileReader>>,
    /// The admitted row groups as (first row in the file, rows), in file order.
    pub(super) ranges: Vec<(u64, u64)>,
}

/// Opens `file`'s key columns for the row groups, and within them the pages, whose statistics
/// admit a change; `None` when the log's, the footer's or the page index's statistics rule every
/// change out.
pub(super) async fn key_scan(
    store: &Arc<dyn ObjectStore>,
    file: &LogicalFileView,
    keys: &Keys,
) -> Result<Option<KeyScan>, DeltaTableError> {
    if !keys.admitted_by_log_stats(file) {
        return Ok(None);
    }
    let builder = reader(store, file, true).await?;
    let arrow_schema = builder.schema().clone();
    let metadata = builder.metadata().clone();
    let row_groups = metadata.row_groups();
    let mut admitted: Vec<bool> = vec![true; row_groups.len()];
    for (c, column) in keys.columns.iter().enumerate() {
        let Ok(stats) =
            StatisticsConverter::try_new(column, &arrow_schema, builder.parquet_schema())
        else {
            continue;
        };
        let (Ok(mins), Ok(maxes)) = (
            stats.row_group_mins(row_groups.iter()),
            stats.row_group_maxes(row_groups.iter()),
        ) else {
            continue;
        };
        if let Some(admits) = keys.admitted_by(c, &mins, &maxes) {
            for (a, b) in admitted.iter_mut().zip(admits) {
                *a &= b;
            }
        }
    }
    let groups: Vec<usize> = (0..row_groups.len()).filter(|&g| admitted[g]).collect();
    if groups.is_empty() {
        return Ok(None);
    }
    // The admitted groups' rows, end to end: the coordinates of a row selection.
    let group_rows: Vec<u64> = groups
        .iter()
        .map(|&g| row_groups[g].num_rows().max(0) as u64)
        .collect();
    let total: u64 = group_rows.iter().sum();
    let mut selected = std::iter::once(0..total).collect::<Vec<_>>();
    for (c, column) in keys.columns.iter().enumerate() {
        if let Some(pages) = admitted_pages(keys, c, column, &builder, &metadata, &groups) {
            selected = intersect(&selected, &pages);
        }
    }
    if selected.is_empty() {
        return Ok(None);
    }
    // The selected rows as (first row in the file, rows), in file order.
    let mut starts = Vec::with_capacity(groups.len());
    let (mut in_file, mut in_selection) = (0u64, 0u64);
    for (g, rg) in row_groups.iter().enumerate() {
        if admitted[g] {
            starts.push((in_selection, in_file, rg.num_rows().max(0) as u64));
            in_selection += rg.num_rows().max(0) as u64;
        }
        in_file += rg.num_rows().max(0) as u64;
    }
    let mut ranges = Vec::new();
    for r in &selected {
        for &(sel, file_at, rows) in &starts {
            let (lo, hi) = (r.start.max(sel), r.end.min(sel + rows));
            if lo < hi {
                ranges.push((file_at + (lo - sel), hi - lo));
            }
        }
    }
    let Ok(roots) = keys
        .columns
        .iter()
        .map(|k| arrow_schema.index_of(k))
        .collect::<Result<Vec<usize>, _>>()
    else {
        // Written before a key column existed: its keys are null there, and no change's is.
        return Ok(Some(KeyScan {
            stream: None,
            ranges,
        }));
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let path = file.object_store_path();
    let mut builder = builder
        .with_projection(mask)
        .with_row_groups(groups)
        .with_batch_size(BATCH_ROWS);
    if selected.len() != 1 || selected[0] != (0..total) {
        let ranges = selected.iter().map(|r| r.start as usize..r.end as usize);
        builder = builder.with_row_selection(RowSelection::from_consecutive_ranges(
            ranges,
            total as usize,
        ));
    }
    let stream = builder.build().map_err(read_error(&path))?;
    Ok(Some(KeyScan {
        stream: Some(stream),
        ranges,
    }))
}

/// The rows of the admitted row groups `groups` (end to end) whose pages of key column `c`
/// admit a change, as sorted ranges; `None` when the file has no page index for the column.
/// Upsert tables write their key columns in small pages (see `encode::writer_properties_keyed`)
/// and their new files sorted by key, so a change admits one page per file that holds its key.
fn admitted_pages(
    keys: &Keys,
    c: usize,
    column: &str,
    builder: &ParquetRecordBatchStreamBuilder<FileReader>,
    metadata: &ParquetMetaData,
    groups: &[usize],
) -> Option<Vec<std::ops::Range<u64>>> {
    let (index, offsets) = (metadata.column_index()?, metadata.offset_index()?);
    let stats =
        StatisticsConverter::try_new(column, builder.schema(), builder.parquet_schema()).ok()?;
    let mins = stats.data_page_mins(index, offsets, groups).ok()?;
    let maxes = stats.data_page_maxes(index, offsets, groups).ok()?;
    let counts = stats
        .data_page_row_counts(offsets, metadata.row_groups(), groups)
        .ok()??;
    if counts.len() != mins.len() || counts.null_count() > 0 {
        return None;
    }
    let admits = keys.admitted_by(c, &mins, &maxes)?;
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    let mut at = 0u64;
    for (admit, rows) in admits.into_iter().zip(counts.values().iter()) {
        if admit {
            match out.last_mut() {
                Some(last) if last.end == at => last.end = at + rows,
                _ => out.push(at..at + rows),
            }
        }
        at += rows;
    }
    Some(out)
}

/// The rows in both `a` and `b` (sorted, disjoint ranges).
fn intersect(a: &[std::ops::Range<u64>], b: &[std::ops::Range<u64>]) -> Vec<std::ops::Range<u64>> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (lo, hi) = (a[i].start.max(b[j].start), a[i].end.min(b[j].end));
        if lo < hi {
            out.push(lo..hi);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}
