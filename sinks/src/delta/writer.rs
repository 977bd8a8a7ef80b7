//! Staging: a flush's batches in the table's form (partition columns added, schema merged and
//! conformed), written as data files the log does not reference yet.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use deltalake::kernel::scalars::ScalarExt;
use deltalake::kernel::Add;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use indexmap::IndexMap;

pub(super) use schema::conform_batch;

use crate::packed::Chunk;
use crate::partition::{self, PartitionSpec};
use crate::{Error, Flush, Result, TopicPartition};

use super::*;

/// A chunk of a flush's rows as read (no partition columns yet, not conformed), with the flush
/// it belongs to.
pub(super) struct FlushRows {
    pub(super) tp: TopicPartition,
    pub(super) start: crate::Offset,
    pub(super) next: crate::Offset,
    pub(super) chunk: Chunk,
}

impl FlushRows {
    /// `flush`'s rows, chunk by chunk.
    pub(super) fn of(flush: &Flush) -> Vec<FlushRows> {
        flush
            .chunks()
            .into_iter()
            .map(|chunk| FlushRows {
                tp: flush.tp.clone(),
                start: flush.start,
                next: flush.next,
                chunk,
            })
            .collect()
    }
}

impl DeltaSink {
    /// The Delta form of a flush's rows: derived partition columns added, conformed to the
    /// table schema merged with the data's. Packed rows must have been unpacked.
    pub(super) fn prepare(&self, flush: &Flush) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        debug_assert!(flush.packed.is_empty(), "prepare needs an unpacked flush");
        let mut batches = Vec::with_capacity(flush.batches.len());
        for b in &flush.batches {
            batches.push(with_partition_columns(
                b,
                &self.config.partition_by,
                &flush.tp,
            )?);
        }
        let target = self.merged_schema(batches.iter().map(|b| b.schema()), &flush.tp)?;
        let conformed = batches
            .iter()
            .map(|b| conform_batch(b, &target).map_err(|r| self.schema_err(&flush.tp, r)))
            .collect::<Result<Vec<_>>>()?;
        Ok((target, conformed))
    }

    /// The table schema an append of `flush` needs (the known schema merged with the rows'),
    /// without touching its rows: they are put in the table's form as they are written
    /// ([`Self::write_files`]). Fails as [`Self::prepare`] would.
    pub(super) fn append_schema(&self, flush: &Flush) -> Result<SchemaRef> {
        let mut sources: Vec<SchemaRef> = Vec::new();
        for chunk in flush.chunks() {
            let s = chunk.schema();
            if !sources.contains(&s) {
                sources.push(s);
            }
        }
        let mut forms = Vec::with_capacity(sources.len());
        for s in &sources {
            forms.push(with_partition_columns(
                &crate::packed::empty(s),
                &self.config.partition_by,
                &flush.tp,
            )?);
        }
        let target = self.merged_schema(forms.iter().map(|b| b.schema()), &flush.tp)?;
        for b in &forms {
            conform_batch(b, &target).map_err(|r| self.schema_err(&flush.tp, r))?;
        }
        Ok(target)
    }

    /// The known table schema merged with each of `schemas` (in their Delta form); empty when
    /// neither is known.
    fn merged_schema(
        &self,
        schemas: impl Iterator<Item = SchemaRef>,
        tp: &TopicPartition,
    ) -> Result<SchemaRef> {
        let known = self.known_schema.lock().expect("poisoned").clone();
        let mut target: Option<SchemaRef> = known;
        for s in schemas {
            let data = schema::delta_schema_for(&s, self.config.profile)
                .map_err(|r| self.schema_err(tp, r))?;
            target = Some(match target {
                None => data,
                Some(t) => schema::merge(&t, &data).map_err(|r| self.schema_err(tp, r))?,
            });
        }
        Ok(target.unwrap_or_else(|| Arc::new(Schema::empty())))
    }

    /// `schema` without the columns that are never stored (an upsert's unchanged-values list).
    pub(super) fn table_schema(&self, schema: &SchemaRef) -> SchemaRef {
        let unchanged = self
            .config
            .upsert
            .as_ref()
            .and_then(|u| u.unchanged_column.as_ref());
        match unchanged.and_then(|c| schema.index_of(c).ok()) {
            None => schema.clone(),
            Some(i) => {
                let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
                fields.remove(i);
                Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
            }
        }
    }

    /// [`Self::write_files`] on a blocking thread holding an encode permit: Parquet encoding is
    /// CPU-bound, and the async worker threads must stay free.
    pub(super) async fn write_blocking(
        &self,
        schema: &SchemaRef,
        rows: Vec<FlushRows>,
    ) -> Result<Vec<Add>> {
        let handle = tokio::runtime::Handle::current();
        let this = self.clone_for_io();
        let schema = schema.clone();
        crate::encode::encode_blocking(move || {
            handle.block_on(async move { this.write_files(&schema, rows).await })
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))?
    }

    /// Writes `rows` (each a chunk of a flush's rows as read) as
    /// data files, one per output partition: each chunk is unpacked in turn, given its derived
    /// partition columns and conformed to `schema` (the commit's table schema), so only one
    /// chunk is ever unpacked at a time.
    pub(super) async fn write_files(
        &self,
        schema: &SchemaRef,
        rows: Vec<FlushRows>,
    ) -> Result<Vec<Add>> {
        let partition_columns: Vec<String> = self.partition_columns();
        let mut writer: Option<RecordBatchWriter> = None;
        for FlushRows {
            tp,
            start,
            next,
            chunk,
        } in rows
        {
            let batches = chunk.batches().map_err(|e| Error::Encode {
                tp: tp.clone(),
                start,
                next,
                source: Box::new(e),
            })?;
            drop(chunk);
            for b in batches {
                let b = with_partition_columns(&b, &self.config.partition_by, &tp)?;
                let b = conform_batch(&b, schema).map_err(|r| self.schema_err(&tp, r))?;
                let w = match writer.as_mut() {
                    Some(w) => w,
                    // Writer properties follow the first batch's columns.
                    None => writer.insert(self.rows_writer(schema, &partition_columns, &b)?),
                };
                for (values, part) in split_by_partition(&b, &partition_columns, &tp)? {
                    write_rows(w, part, &values)
                        .await
                        .map_err(|e| self.err("write data file", e))?;
                }
            }
        }
        match writer {
            Some(mut w) => w.flush().await.map_err(|e| self.err("write data file", e)),
            None => Ok(Vec::new()),
        }
    }

    /// A writer of appended rows like `sample`.
    fn rows_writer(
        &self,
        schema: &SchemaRef,
        partition_columns: &[String],
        sample: &RecordBatch,
    ) -> Result<RecordBatchWriter> {
        Ok(RecordBatchWriter::try_new(
            self.url.as_str(),
            schema.clone(),
            Some(partition_columns.to_vec()),
            Some(self.options.clone()),
        )
        .map_err(|e| self.err("open writer", e))?
        .with_writer_properties(crate::encode::writer_properties_for(
            self.config.compression,
            self.config.row_groups,
            sample,
        )))
    }
}

/// Rows per write into a data file's writer: parquet ends a row group at its byte bound
/// ([`crate::encode::RowGroups`]) only between writes, and takes a write into an empty group
/// whole, so a group can pass its bound by at most this many rows.
const WRITE_SLICE_ROWS: usize = 8192;

/// Writes `rows` (of the partition `values`) into `writer` a slice of at most
/// [`WRITE_SLICE_ROWS`] at a time.
pub(super) async fn write_rows(
    writer: &mut RecordBatchWriter,
    rows: RecordBatch,
    values: &PartitionValues,
) -> std::result::Result<(), deltalake::DeltaTableError> {
    let n = rows.num_rows();
    if n <= WRITE_SLICE_ROWS {
        writer
            .write_partition(rows, values, deltalake::writer::WriteMode::Default)
            .await?;
        return Ok(());
    }
    for at in (0..n).step_by(WRITE_SLICE_ROWS) {
        let slice = rows.slice(at, WRITE_SLICE_ROWS.min(n - at));
        writer
            .write_partition(slice, values, deltalake::writer::WriteMode::Default)
            .await?;
    }
    Ok(())
}

/// `batch` plus the derived partition columns (`day` as a date, `hour` as `YYYY-MM-DD-HH`).
pub(super) fn with_partition_columns(
    batch: &RecordBatch,
    specs: &[PartitionSpec],
    tp: &TopicPartition,
) -> Result<RecordBatch> {
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    for spec in specs {
        let value_err = |reason: String| Error::PartitionValue {
            spec: format!("{spec:?}"),
            tp: tp.clone(),
            reason,
        };
        if matches!(spec, PartitionSpec::Field(_)) {
            continue;
        }
        if batch.schema().field_with_name(spec.name()).is_ok() {
            return Err(value_err(format!(
                "the data already has a column `{}`; partition by it directly",
                spec.name()
            )));
        }
        let source = batch
            .column_by_name(spec.column())
            .ok_or_else(|| value_err(format!("no column `{}` in the data", spec.column())))?;
        let (dt, array) = partition::derived_column(spec, source).map_err(value_err)?;
        fields.push(Arc::new(Field::new(spec.name(), dt, true)));
        columns.push(array);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| {
        Error::PartitionValue {
            spec: "partition_by".into(),
            tp: tp.clone(),
            reason: e.to_string(),
        }
    })
}

/// Splits `batch` by the values of its partition columns (kept in the batches; the writer
/// strips them from the files).
pub(super) fn split_by_partition(
    batch: &RecordBatch,
    columns: &[String],
    tp: &TopicPartition,
) -> Result<Vec<(PartitionValues, RecordBatch)>> {
    if columns.is_empty() || batch.num_rows() == 0 {
        return Ok(vec![(IndexMap::new(), batch.clone())]);
    }
    partition_rows(batch, columns, tp)?
        .into_iter()
        .map(|(values, rows)| {
            let part = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                take_record_batch(batch, &UInt32Array::from(rows)).map_err(|e| {
                    Error::PartitionValue {
                        spec: columns.join(","),
                        tp: tp.clone(),
                        reason: e.to_string(),
                    }
                })?
            };
            Ok((values, part))
        })
        .collect()
}

/// The rows of `batch` in each partition, by the values of its partition columns (one group
/// of every row when there are none), in the order of [`partition_key`].
pub(super) fn partition_rows(
    batch: &RecordBatch,
    columns: &[String],
    tp: &TopicPartition,
) -> Result<Vec<(PartitionValues, Vec<u32>)>> {
    let err = |reason: String| Error::PartitionValue {
        spec: columns.join(","),
        tp: tp.clone(),
        reason,
    };
    let arrays: Vec<&ArrayRef> = columns
        .iter()
        .map(|c| {
            batch
                .column_by_name(c)
                .ok_or_else(|| err(format!("no column `{c}`")))
        })
        .collect::<Result<_>>()?;
    let values_of = |row: usize| -> Result<PartitionValues> {
        let mut v = IndexMap::new();
        for (name, a) in columns.iter().zip(&arrays) {
            let scalar = delta_kernel::expressions::Scalar::from_array(a.as_ref(), row)
                .ok_or_else(|| {
                    err(format!(
                        "column `{name}` of type {} cannot partition a Delta table",
                        a.data_type()
                    ))
                })?;
            v.insert(name.clone(), scalar);
        }
        Ok(v)
    };
    // Group on the row-encoded values, then serialize each group's values once.
    let owned: Vec<ArrayRef> = arrays.iter().map(|a| (*a).clone()).collect();
    let mut groups: BTreeMap<String, (PartitionValues, Vec<u32>)> = BTreeMap::new();
    for rows in partition::group_rows(&owned, batch.num_rows()).map_err(err)? {
        let values = values_of(rows[0] as usize)?;
        match groups.entry(partition_key(&values)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((values, rows));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                // Distinct row encodings that serialize alike (a float's -0 and 0).
                let all = &mut o.get_mut().1;
                all.extend(rows);
                all.sort_unstable();
            }
        }
    }
    Ok(groups.into_values().collect())
}

/// A partition's identity: its values as the log writes them, in partition column order.
pub(super) fn partition_key(values: &PartitionValues) -> String {
    let mut key = String::new();
    for v in values.values() {
        match v {
            // Apart from the string "null", which `serialize` gives it too.
            delta_kernel::expressions::Scalar::Null(_) => key.push('\u{2}'),
            v => key.push_str(&v.serialize()),
        }
        key.push('\u{1}');
    }
    key
}

impl super::DeltaSink {
    /// A writer of new data files for an upsert table (copy-on-write rewrites, deletion-vector
    /// upserts, compaction): the sink's compression and row groups, no dictionary for the
    /// columns mostly distinct in `sample` (an order id, an offset), the key columns `keys` in
    /// small indexed pages (`encode::writer_properties_keyed`), files of up to `target` bytes
    /// (`None`: deltalake's default, the table's target file size).
    pub(super) fn keyed_writer(
        &self,
        schema: SchemaRef,
        partition_columns: &[String],
        sample: Option<&RecordBatch>,
        keys: &[String],
        target: Option<u64>,
    ) -> Result<RecordBatchWriter, deltalake::DeltaTableError> {
        let writer = RecordBatchWriter::try_new(
            self.url.as_str(),
            schema,
            Some(partition_columns.to_vec()),
            Some(self.options.clone()),
        )?
        .with_writer_properties(crate::encode::writer_properties_keyed(
            self.config.compression,
            self.config.row_groups,
            sample,
            keys,
        ));
        Ok(match target {
            Some(bytes) => writer.with_target_file_size(bytes),
            None => writer,
        })
    }
}
