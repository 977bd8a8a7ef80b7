//! `lakesink maintain` for Delta tables: purging deletion vectors, compaction, checkpoint and
//! vacuum on demand.

use std::time::Duration;

use crate::{Error, Result};

use super::*;

/// What `lakesink maintain` did to one table.
#[derive(Debug, Clone, Default)]
pub struct MaintainReport {
    /// The table's version before (`None`: no table).
    pub version_before: Option<u64>,
    /// The table's version after.
    pub version_after: Option<u64>,
    /// Files whose deletion vectors were purged (rewritten without their deleted rows).
    pub files_purged: usize,
    /// Small files rewritten into larger ones.
    pub files_compacted: u64,
    /// Files the compaction wrote.
    pub files_written: u64,
    /// Unreferenced files deleted past the retention.
    pub files_vacuumed: usize,
    /// Whether a checkpoint was written.
    pub checkpoint: bool,
}

impl DeltaSink {
    /// Purges deletion vectors that mark a fifth of their file (see `purge`), compacts small
    /// files (OPTIMIZE, bin-packing towards `target_file_size`), removes data
    /// files unreferenced for longer than `retention` (VACUUM FULL: tombstoned files and orphans
    /// of crashed flushes), and writes a checkpoint. Safe while writers run: compaction only
    /// rewrites data, never txn positions, and conflicts like any other commit.
    pub async fn maintain(
        &self,
        target_file_size: u64,
        retention: Duration,
    ) -> Result<MaintainReport> {
        let mut slot = self.table.lock().await;
        if !self.refresh(&mut slot).await? {
            return Ok(MaintainReport::default());
        }
        // Writers commit meanwhile: a compaction that finds the table changed under it is done
        // again on the new state, a few times.
        let mut attempt = 0;
        let (table, mut report) = loop {
            attempt += 1;
            let table = slot.take().expect("table loaded");
            match self
                .compact_table(table, target_file_size, Some(retention))
                .await
            {
                Err(Error::Delta { source, .. }) if is_conflict(&source) && attempt < 10 => {
                    conflict_backoff(200, attempt).await;
                    self.refresh(&mut slot).await?;
                }
                other => break other?,
            }
        };
        deltalake::checkpoints::create_checkpoint(&table, None)
            .await
            .map_err(|e| self.err("checkpoint", e))?;
        report.checkpoint = true;
        report.version_after = table.version();
        *slot = Some(table);
        Ok(report)
    }
}

impl DeltaSink {
    /// What `maintain` and background compaction do to `table`: purge deletion vectors that
    /// mark a fifth of their file and compact small files towards `target_file_size` (see
    /// `purge`), and with a `vacuum` retention remove data files unreferenced for longer
    /// (VACUUM FULL: tombstoned files and orphans of crashed flushes).
    pub(super) async fn compact_table(
        &self,
        table: DeltaTable,
        target_file_size: u64,
        vacuum: Option<Duration>,
    ) -> Result<(DeltaTable, MaintainReport)> {
        let mut report = MaintainReport {
            version_before: table.version(),
            ..Default::default()
        };
        let (mut table, done) = self
            .rewrite_small_and_marked(&table, target_file_size.max(1))
            .await
            .map_err(|e| self.err("compact", e))?;
        report.files_purged = done.purged;
        report.files_compacted = done.removed as u64;
        report.files_written = done.written as u64;
        if let Some(retention) = vacuum {
            let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
            let (vacuumed, done) = table
                .vacuum()
                .with_retention_period(retention)
                .with_enforce_retention_duration(false)
                .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
                .await
                .map_err(|e| self.err("vacuum", e))?;
            report.files_vacuumed = done.files_deleted.len();
            table = vacuumed;
        }
        report.version_after = table.version();
        Ok((table, report))
    }
}
