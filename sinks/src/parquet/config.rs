//! Settings of a Parquet table sink, already validated by the service's config layer.

use crate::encode::Compression;
use crate::partition::PartitionSpec;

/// How a Parquet sink lays out and names what it writes.
#[derive(Debug, Clone)]
pub struct ParquetSinkConfig {
    /// Output partitioning, in path order.
    pub partition_by: Vec<PartitionSpec>,
    /// Compression of the data files.
    pub compression: Compression,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// Identifies this writer process in markers (tells our own retried commit from another
    /// writer's).
    pub writer_id: String,
    /// Write the recovery hint after this many commits of a partition.
    pub hint_every: u32,
}

impl Default for ParquetSinkConfig {
    fn default() -> Self {
        Self {
            partition_by: Vec::new(),
            compression: Compression::Snappy,
            row_group_rows: 1 << 20,
            writer_id: "lakesink".into(),
            hint_every: 1,
        }
    }
}
