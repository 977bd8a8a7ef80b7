//! Settings of a Parquet table sink: the sink's own (`ParquetSinkConfig`, built by the service)
//! and the `[sink.parquet]` section of the service's config, checked here.

use std::time::Duration;

use crate::encode::{Compression, RowGroups};
use crate::partition::PartitionSpec;
use crate::section::SectionError;

/// How a Parquet sink lays out and names what it writes.
#[derive(Debug, Clone)]
pub struct ParquetSinkConfig {
    /// Output partitioning, in path order.
    pub partition_by: Vec<PartitionSpec>,
    /// Compression of the data files.
    pub compression: Compression,
    /// How large a Parquet row group grows.
    pub row_groups: RowGroups,
    /// Identifies this writer process in markers (tells our own retried commit from another
    /// writer's).
    pub writer_id: String,
    /// Write the recovery hint after this many commits of a partition.
    pub hint_every: u32,
    /// What compaction (background or `lakesink maintain`) merges.
    pub compact: ParquetCompact,
    /// Compact in the background after commits (`[sink.parquet] auto_compact`).
    pub auto_compact: bool,
}

impl Default for ParquetSinkConfig {
    fn default() -> Self {
        Self {
            partition_by: Vec::new(),
            compression: Compression::Snappy,
            row_groups: RowGroups::default(),
            writer_id: "lakesink".into(),
            hint_every: 1,
            compact: ParquetCompact::default(),
            auto_compact: false,
        }
    }
}

/// What a compaction of a Parquet table merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParquetCompact {
    /// Background compaction starts once a table partition gathered this many files smaller
    /// than `target_file_size` from this process's commits.
    pub min_files: usize,
    /// Files are merged towards this size; larger files are left alone.
    pub target_file_size: u64,
    /// A file is merged only once it has been published this long (and its marker's staged
    /// copies are gone); also the least time between two background compactions of a table.
    pub min_age: Duration,
}

impl Default for ParquetCompact {
    fn default() -> Self {
        Self {
            min_files: 16,
            target_file_size: 128 << 20,
            min_age: Duration::from_secs(60),
        }
    }
}

/// The shortest `compact_min_age`.
pub(super) const MIN_COMPACT_AGE: Duration = Duration::from_secs(1);

/// `[sink.parquet]` as written in the service's config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetSection {
    /// Compact small files in the background while the sink runs.
    pub auto_compact: bool,
    /// `auto_compact`: a table partition with this many files smaller than `target_file_size`
    /// is compacted.
    pub compact_min_files: usize,
    /// Compaction merges files smaller than this into files of about this size.
    pub target_file_size: String,
    /// A file is compacted only once it has been published this long; also the least time
    /// between two background compactions of a table by one process.
    pub compact_min_age: String,
}

impl Default for ParquetSection {
    fn default() -> Self {
        Self {
            auto_compact: false,
            compact_min_files: 16,
            target_file_size: "128MiB".into(),
            compact_min_age: "1m".into(),
        }
    }
}

/// `[sink.parquet]`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParquetSettings {
    /// Background compaction, when on.
    pub auto_compact: bool,
    /// What compaction merges.
    pub compact: ParquetCompact,
}

impl Default for ParquetSettings {
    fn default() -> Self {
        ParquetSection::default()
            .validate()
            .expect("the defaults are valid")
    }
}

impl ParquetSection {
    /// Checks the section.
    pub fn validate(&self) -> Result<ParquetSettings, SectionError> {
        let target_file_size = crate::units::parse_bytes(&self.target_file_size)
            .map_err(|e| SectionError::new("target_file_size", e))?;
        if target_file_size == 0 {
            return Err(SectionError::new("target_file_size", "must be above 0"));
        }
        if self.compact_min_files < 2 {
            return Err(SectionError::new(
                "compact_min_files",
                "must be at least 2 (compaction merges files)",
            ));
        }
        let min_age = crate::units::parse_duration(&self.compact_min_age)
            .map_err(|e| SectionError::new("compact_min_age", e))?;
        if min_age < MIN_COMPACT_AGE {
            return Err(SectionError::new(
                "compact_min_age",
                format!(
                    "`{}` is below the floor of 1s: a writer fenced on a file's marker may \
                     still be copying it when a compaction deletes it",
                    self.compact_min_age
                ),
            ));
        }
        Ok(ParquetSettings {
            auto_compact: self.auto_compact,
            compact: ParquetCompact {
                min_files: self.compact_min_files,
                target_file_size,
                min_age,
            },
        })
    }
}

impl ParquetSettings {
    /// The sink config with these settings applied.
    pub fn apply(&self, config: ParquetSinkConfig) -> ParquetSinkConfig {
        ParquetSinkConfig {
            compact: self.compact,
            auto_compact: self.auto_compact,
            ..config
        }
    }
}
