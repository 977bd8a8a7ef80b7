//! Purging deletion vectors (part of compaction): a data file whose deletion vector marks at
//! least [`PURGE_FRACTION`] of its rows is rewritten without them, so readers stop reading rows
//! only to drop them, and merge-on-read tables do not grow without bound.
//!
//! Invariants:
//! - The rewrite holds exactly the file's live rows (its rows minus its deletion vector), in its
//!   partition; the commit removes the file with the deletion vector it read and adds the new
//!   file, with `dataChange = false` and no txn action, as an OPTIMIZE.
//! - A concurrent upsert that marked the same file (a remove of that path) conflicts with the
//!   purge, which is then dropped: the rows it deleted meanwhile are never brought back.

use std::sync::Arc;

use arrow::array::BooleanArray;
use arrow::compute::filter_record_batch;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, LogicalFileView};
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter, WriteMode};
use deltalake::{DeltaTable, DeltaTableError};
use futures::StreamExt;

use super::probe::{read_error, reader};
use super::rewrite::{conform, partition_values, BATCH_ROWS};
use super::DeltaSink;

/// The share of a file's rows its deletion vector must mark for the file to be purged.
pub(super) const PURGE_FRACTION: f64 = 0.2;

/// Whether `file`'s deletion vector marks at least [`PURGE_FRACTION`] of its rows.
pub(super) fn worth_purging(file: &LogicalFileView) -> bool {
    match (file.deletion_vector_descriptor(), file.num_records()) {
        (Some(dv), Some(rows)) if rows > 0 => dv.cardinality as f64 >= PURGE_FRACTION * rows as f64,
        (Some(_), None) => true,
        _ => false,
    }
}

impl DeltaSink {
    /// Rewrites the files worth purging without their deleted rows and commits that; returns
    /// the table after it and the files purged (none: `table` as it was).
    pub(super) async fn purge(
        &self,
        table: &DeltaTable,
    ) -> Result<(DeltaTable, usize), DeltaTableError> {
        let state = table.snapshot()?;
        let files: Vec<LogicalFileView> = state.log_data().iter().filter(worth_purging).collect();
        if files.is_empty() {
            return Ok((table.clone(), 0));
        }
        let partition_columns: Vec<String> = state.metadata().partition_columns().to_vec();
        let schema = state.snapshot().arrow_schema();
        let file_schema = Arc::new(arrow::datatypes::Schema::new(
            schema
                .fields()
                .iter()
                .filter(|f| !partition_columns.contains(f.name()))
                .cloned()
                .collect::<Vec<_>>(),
        ));
        let store = table.log_store().object_store(None);
        let root = table.log_store().root_url().clone();
        let mut writer = RecordBatchWriter::try_new(
            self.url.as_str(),
            schema.clone(),
            Some(partition_columns.clone()),
            Some(self.options.clone()),
        )?
        .with_writer_properties(crate::encode::writer_properties(
            self.config.compression,
            self.config.row_group_rows,
        ));
        let mut actions = Vec::new();
        for file in &files {
            let dv = file
                .deletion_vector_descriptor()
                .expect("only files with a deletion vector are purged");
            let deleted = super::dv::read(store.as_ref(), &root, &dv).await?;
            let values = partition_values(file, &partition_columns)?;
            let path = file.object_store_path();
            let mut stream = reader(&store, file)
                .await?
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(read_error(&path))?;
            let mut at = 0u64;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(read_error(&path))?;
                let keep = BooleanArray::from_iter(
                    (0..batch.num_rows() as u64).map(|i| Some(!deleted.contains(at + i))),
                );
                at += batch.num_rows() as u64;
                let kept = filter_record_batch(&batch, &keep)?;
                if kept.num_rows() > 0 {
                    writer
                        .write_partition(conform(&kept, &file_schema)?, &values, WriteMode::Default)
                        .await?;
                }
            }
            actions.push(Action::Remove(file.remove_action(false)));
        }
        for mut add in writer.flush().await? {
            add.data_change = false;
            actions.push(Action::Add(add));
        }
        let done =
            CommitBuilder::from(CommitProperties::default().with_cleanup_expired_logs(Some(false)))
                .with_actions(actions)
                .build(
                    Some(state),
                    table.log_store(),
                    DeltaOperation::Optimize {
                        predicate: None,
                        target_size: 0,
                    },
                )
                .await?;
        let mut table = table.clone();
        table.state = Some(done.snapshot);
        Ok((table, files.len()))
    }
}
