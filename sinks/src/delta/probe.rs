//! Reading a data file for an upsert's rewrite (see `rewrite`): its footer, the key columns of
//! the row groups its statistics do not rule out, and whether it holds a changed key.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::row::Row;
use deltalake::kernel::LogicalFileView;
use deltalake::DeltaTableError;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryFutureExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use super::rewrite::*;

/// What a file's footer and key columns tell about it.
pub(super) enum Probe {
    /// No row group's statistics admit a change: the data was not read.
    Pruned,
    /// Its key columns hold no changed key.
    Clean,
    /// It holds a changed key: file number `.0` is rewritten.
    Dirty(usize),
}

/// A data file of the table, read by ranges; its size is known from the log, so the footer is
/// one ranged read.
pub(super) struct FileReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
}

pub(super) fn parquet_err(e: object_store::Error) -> parquet::errors::ParquetError {
    parquet::errors::ParquetError::External(Box::new(e))
}

impl AsyncFileReader for FileReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        self.store
            .get_range(&self.path, range)
            .map_err(parquet_err)
            .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<bytes::Bytes>>> {
        async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(parquet_err)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

pub(super) async fn reader(
    store: &Arc<dyn ObjectStore>,
    file: &LogicalFileView,
) -> Result<ParquetRecordBatchStreamBuilder<FileReader>, DeltaTableError> {
    let path = file.object_store_path();
    let reader = FileReader {
        store: store.clone(),
        path: path.clone(),
        size: file.size() as u64,
    };
    ParquetRecordBatchStreamBuilder::new(reader)
        .await
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
    index: &HashMap<Row<'_>, bool>,
) -> Result<Probe, DeltaTableError> {
    if !keys.admitted_by_log_stats(file) {
        return Ok(Probe::Pruned);
    }
    let builder = reader(store, file).await?;
    let arrow_schema = builder.schema().clone();
    let row_groups = builder.metadata().row_groups();
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
    let groups: Vec<usize> = (0..admitted.len()).filter(|&g| admitted[g]).collect();
    if groups.is_empty() {
        return Ok(Probe::Pruned);
    }
    let Ok(roots) = keys
        .columns
        .iter()
        .map(|k| arrow_schema.index_of(k))
        .collect::<Result<Vec<usize>, _>>()
    else {
        // Written before a key column existed: its keys are null there, and no change's is.
        return Ok(Probe::Clean);
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let path = file.object_store_path();
    let mut stream = builder
        .with_projection(mask)
        .with_row_groups(groups)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(read_error(&path))?;
    while let Some(batch) = stream.next().await {
        let rows = keys.rows_of(&batch.map_err(read_error(&path))?)?;
        if rows.iter().any(|r| index.contains_key(&r)) {
            return Ok(Probe::Dirty(n));
        }
    }
    Ok(Probe::Clean)
}
