//! Settings of a Parquet table sink, already validated by the service's config layer.

use crate::partition::PartitionSpec;

/// Parquet column compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    None,
    #[default]
    Snappy,
    Zstd,
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

/// How a Parquet sink lays out and names what it writes.
#[derive(Debug, Clone)]
pub struct ParquetSinkConfig {
    /// Output partitioning, in path order.
    pub partition_by: Vec<PartitionSpec>,
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
