//! Settings of a Delta sink, already validated by the service's config layer.

use super::*;

/// How a Delta sink writes and commits.
#[derive(Debug, Clone)]
pub struct DeltaSinkConfig {
    /// Output partitioning; `day(col)` / `hour(col)` become `day` (date) / `hour` (string)
    /// partition columns of the table.
    pub partition_by: Vec<PartitionSpec>,
    /// Compression of the data files.
    pub compression: Compression,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// Txn app ids are `<prefix>/<topic>/<partition>` (`lakesink/orders/3`): the table's own
    /// identity of a source partition, so renaming the consumer group or running a second
    /// deployment finds the same position (and two deployments fence each other).
    pub app_id_prefix: String,
    /// The prefix earlier lakesink versions used (`lakesink/<group>`), read when a partition has no
    /// position under `app_id_prefix` yet: a table written by them resumes where it was.
    pub legacy_app_id_prefix: Option<String>,
    /// Table properties set when lakesink creates the table (`delta.*` keys and free-form ones).
    pub table_properties: BTreeMap<String, String>,
    /// `delta.checkpointInterval` for tables lakesink creates: a checkpoint every N commits.
    pub checkpoint_interval: u64,
    /// Commit attempts before a commit that keeps losing races fails (retryable).
    pub commit_attempts: u32,
    /// `mode = "upsert"`: merge on these key columns instead of appending.
    pub upsert: Option<crate::upsert::UpsertConfig>,
    /// Upserts: the most change rows one grouped MERGE carries (the flush size, so a group
    /// never joins more than one full flush would).
    pub group_rows: usize,
}

impl Default for DeltaSinkConfig {
    fn default() -> Self {
        Self {
            partition_by: Vec::new(),
            compression: Compression::Snappy,
            row_group_rows: 1 << 20,
            app_id_prefix: "lakesink".into(),
            legacy_app_id_prefix: None,
            table_properties: BTreeMap::new(),
            checkpoint_interval: 10,
            commit_attempts: 20,
            upsert: None,
            group_rows: 100_000,
        }
    }
}
