//! Settings of a Delta sink: [`DeltaSinkConfig`], what the sink is built with, and
//! [`DeltaSection`], the `[sink.delta]` section of the service's config as written, checked here
//! into [`DeltaSettings`].

use super::*;
use crate::section::SectionError;

/// How a Delta sink writes and commits.
#[derive(Debug, Clone)]
pub struct DeltaSinkConfig {
    /// Output partitioning; `day(col)` / `hour(col)` become `day` (date) / `hour` (string)
    /// partition columns of the table.
    pub partition_by: Vec<PartitionSpec>,
    /// Compression of the data files.
    pub compression: Compression,
    /// How large a Parquet row group grows.
    pub row_groups: RowGroups,
    /// Txn app ids are `<prefix>/<topic>/<partition>` (`lakesink/orders/3`): the table's own
    /// identity of a source partition, so renaming the consumer group or running a second
    /// deployment finds the same position (and two deployments fence each other).
    pub app_id_prefix: String,
    /// The prefix earlier lakesink versions used (`lakesink/<group>`), read when a partition has no
    /// position under `app_id_prefix` yet: a table written by them resumes where it was.
    pub legacy_app_id_prefix: Option<String>,
    /// Another writer's txn app id for a partition, `{partition}` (and `{topic}`) replaced:
    /// read when the partition has no position of lakesink's own (kafka-delta-ingest's
    /// `<app_id>-{partition}`), so lakesink continues that writer's table where it stopped.
    pub resume_app_id: Option<String>,
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
    /// The readers the table is written for.
    pub profile: ReaderProfile,
    /// Flushes cut at one latency tick write their rows into shared files (one per table
    /// partition for all the Kafka partitions committing together) instead of one set of files
    /// each. Appends only.
    pub shared_files: bool,
    /// Compaction in the background after commits (`None`: only `lakesink maintain`).
    pub auto_compact: Option<AutoCompact>,
    /// How upserts replace rows (`[sink.delta] upsert`).
    pub upsert_strategy: UpsertStrategy,
    /// Appends write their log entry themselves (see `entry`); `false` leaves it to deltalake's
    /// commit loop, for comparison (`lakesink bench --contention --commit deltalake`).
    pub direct_entries: bool,
}

/// How an upsert replaces the rows it changes (`[sink.delta] upsert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpsertStrategy {
    /// Rewrite every data file that holds a changed key without those rows: any Delta reader
    /// reads the table, and a flush costs what the files it touches weigh.
    #[default]
    CopyOnWrite,
    /// Merge on read: mark the replaced rows in deletion vectors and write only the changes, so
    /// a flush costs what it changes. Needs the `deletionVectors` table feature (reader 3,
    /// writer 7), which lakesink adds to the table; readers must apply deletion vectors.
    DeletionVectors,
}

/// Which readers a table is written for (`[sink.delta] profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReaderProfile {
    /// Every type as Delta has it: wall-clock times (Avro `local-timestamp-*`, Debezium
    /// `Timestamp` / `MicroTimestamp`) as `timestamp_ntz`, which needs the `timestampNtz` table
    /// feature (reader version 3, writer version 7). Spark 3.4+, DuckDB, python deltalake and
    /// Databend read it.
    #[default]
    Delta,
    /// What Power BI and Microsoft Fabric (SQL analytics endpoint, Direct Lake) read: no
    /// `timestamp_ntz` (a wall-clock time is stored as a `timestamp` whose UTC reading is the
    /// wall-clock reading), so tables stay at protocol 1/2 with no table features, and row
    /// groups of up to 8M rows (as many as a flush or a compaction writes into one file).
    Fabric,
}

/// Row groups of the Fabric profile: Direct Lake reads best from row groups of millions of rows.
pub const FABRIC_ROW_GROUP_ROWS: usize = 8 << 20;

impl Default for DeltaSinkConfig {
    fn default() -> Self {
        Self {
            partition_by: Vec::new(),
            compression: Compression::Snappy,
            row_groups: RowGroups::default(),
            app_id_prefix: "lakesink".into(),
            legacy_app_id_prefix: None,
            resume_app_id: None,
            table_properties: BTreeMap::new(),
            checkpoint_interval: 10,
            commit_attempts: 20,
            upsert: None,
            group_rows: 100_000,
            profile: ReaderProfile::Delta,
            shared_files: true,
            auto_compact: None,
            upsert_strategy: UpsertStrategy::CopyOnWrite,
            direct_entries: true,
        }
    }
}

/// `[sink.delta]` as written in the service's config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeltaSection {
    /// Write a checkpoint every N commits (`delta.checkpointInterval` of created tables).
    pub checkpoint_interval: u64,
    /// Table properties for tables lakesink creates (e.g. `"delta.logRetentionDuration"`).
    pub properties: BTreeMap<String, String>,
    /// Commit attempts before a commit that keeps losing races is retried by the pipeline.
    pub commit_attempts: u32,
    /// `lakesink maintain`: files older than this, no longer referenced, are vacuumed.
    pub vacuum_retention: String,
    /// `lakesink maintain`: compact files smaller than this into files of about this size.
    pub target_file_size: String,
    /// The readers the table is written for: `delta` (default) or `fabric` (Power BI and
    /// Microsoft Fabric: no `timestamp_ntz`, protocol 1/2, large row groups).
    pub profile: String,
    /// Appends: the flushes of all Kafka partitions cut at one latency tick share their data
    /// files (one per table partition per tick) instead of writing one set each.
    pub shared_files: bool,
    /// Compact small files in the background while the sink runs.
    pub auto_compact: bool,
    /// `auto_compact`: a table partition with this many files smaller than `target_file_size`
    /// is compacted.
    pub compact_min_files: usize,
    /// `mode = "upsert"`: `copy-on-write` (default) or `deletion-vectors` (merge on read).
    pub upsert: String,
    /// Another writer's txn app id whose versions are a partition's position where lakesink
    /// has none (kafka-delta-ingest: `<app_id>-{partition}`).
    pub resume_app_id: Option<String>,
    /// Rows per Parquet row group, at most (default: 1,048,576; 8,388,608 with the `fabric`
    /// profile). A writer holds its row group encoded until it ends.
    pub row_group_rows: Option<usize>,
    /// Encoded bytes per Parquet row group, at most (default: 16 MiB; rows alone with the
    /// `fabric` profile).
    pub row_group_bytes: Option<String>,
}

/// The fewest rows per row group a config may ask for: smaller groups only multiply footers.
const MIN_ROW_GROUP_ROWS: usize = 1024;

/// The fewest bytes per row group a config may ask for.
const MIN_ROW_GROUP_BYTES: usize = 1 << 20;

impl Default for DeltaSection {
    fn default() -> Self {
        Self {
            checkpoint_interval: 10,
            properties: BTreeMap::new(),
            commit_attempts: 20,
            vacuum_retention: "168h".into(),
            target_file_size: "128MiB".into(),
            profile: "delta".into(),
            shared_files: true,
            auto_compact: false,
            compact_min_files: 16,
            upsert: "copy-on-write".into(),
            resume_app_id: None,
            row_group_rows: None,
            row_group_bytes: None,
        }
    }
}

/// The shortest `vacuum_retention`: longer than any flush's stage-to-commit time, with room
/// for clock skew between the maintaining host and the store.
pub const MIN_VACUUM_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

/// `[sink.delta]`, checked.
#[derive(Debug, Clone)]
pub struct DeltaSettings {
    /// A checkpoint every N commits (at least 1).
    pub checkpoint_interval: u64,
    /// Table properties for tables lakesink creates.
    pub properties: BTreeMap<String, String>,
    /// Commit attempts before the pipeline retries (at least 1).
    pub commit_attempts: u32,
    /// `lakesink maintain`'s vacuum retention (at least [`MIN_VACUUM_RETENTION`]).
    pub vacuum_retention: std::time::Duration,
    /// `lakesink maintain`'s target file size in bytes.
    pub target_file_size: u64,
    /// The readers the table is written for.
    pub profile: ReaderProfile,
    /// Appends: flushes of one latency tick share their data files.
    pub shared_files: bool,
    /// Background compaction, when on.
    pub auto_compact: Option<AutoCompact>,
    /// How upserts replace rows.
    pub upsert_strategy: UpsertStrategy,
    /// See [`DeltaSection::resume_app_id`].
    pub resume_app_id: Option<String>,
    /// Rows per row group asked for; `None`: the profile's.
    pub row_group_rows: Option<usize>,
    /// Bytes per row group asked for; `None`: the profile's.
    pub row_group_bytes: Option<usize>,
}

impl DeltaSection {
    /// Checks the section.
    pub fn validate(&self) -> std::result::Result<DeltaSettings, SectionError> {
        if self.checkpoint_interval == 0 {
            return Err(SectionError::new(
                "checkpoint_interval",
                "must be at least 1",
            ));
        }
        if self.commit_attempts == 0 {
            return Err(SectionError::new("commit_attempts", "must be at least 1"));
        }
        let vacuum_retention = crate::units::parse_duration(&self.vacuum_retention)
            .map_err(|e| SectionError::new("vacuum_retention", e))?;
        if vacuum_retention < MIN_VACUUM_RETENTION {
            return Err(SectionError::new(
                "vacuum_retention",
                format!(
                    "`{}` is below the floor of 1h: the data files a running writer has \
                     written but not committed yet are unreferenced too, and would be \
                     deleted (a clock ahead of the store's counts against it). With every \
                     writer of the table stopped, `lakesink maintain --retention 0s` applies \
                     a shorter one once",
                    self.vacuum_retention
                ),
            ));
        }
        let target_file_size = crate::units::parse_bytes(&self.target_file_size)
            .map_err(|e| SectionError::new("target_file_size", e))?;
        if self.compact_min_files < 2 {
            return Err(SectionError::new(
                "compact_min_files",
                "must be at least 2 (compaction merges files)",
            ));
        }
        let profile = match self.profile.to_ascii_lowercase().as_str() {
            "delta" => ReaderProfile::Delta,
            "fabric" | "powerbi" | "power-bi" => ReaderProfile::Fabric,
            other => {
                return Err(SectionError::new(
                    "profile",
                    format!(
                        "`{other}` is not a reader profile: `delta` (every Delta type) or \
                         `fabric` (what Power BI and Microsoft Fabric read)"
                    ),
                ))
            }
        };
        let upsert_strategy = match self.upsert.to_ascii_lowercase().as_str() {
            "copy-on-write" | "cow" => UpsertStrategy::CopyOnWrite,
            "deletion-vectors" | "merge-on-read" => UpsertStrategy::DeletionVectors,
            other => {
                return Err(SectionError::new(
                    "upsert",
                    format!(
                        "`{other}` is not an upsert strategy: `copy-on-write` (rewrite the files \
                         that hold a changed key; every reader) or `deletion-vectors` (mark \
                         replaced rows; readers of the deletionVectors feature)"
                    ),
                ))
            }
        };
        if let Some(id) = &self.resume_app_id {
            if !id.contains("{partition}") {
                return Err(SectionError::new(
                    "resume_app_id",
                    format!(
                        "`{id}` has no `{{partition}}`: each Kafka partition has its own txn app \
                         id (kafka-delta-ingest's are `<app_id>-{{partition}}`)"
                    ),
                ));
            }
        }
        if let Some(n) = self.row_group_rows.filter(|&n| n < MIN_ROW_GROUP_ROWS) {
            return Err(SectionError::new(
                "row_group_rows",
                format!(
                    "{n} is below {MIN_ROW_GROUP_ROWS}: row groups that small make readers \
                     read a footer entry per few rows; the default is 1048576"
                ),
            ));
        }
        let row_group_bytes = match &self.row_group_bytes {
            None => None,
            Some(size) => {
                let n = crate::units::parse_bytes(size)
                    .map_err(|e| SectionError::new("row_group_bytes", e))?;
                if (n as usize) < MIN_ROW_GROUP_BYTES {
                    return Err(SectionError::new(
                        "row_group_bytes",
                        format!(
                            "`{size}` is below 1MiB: row groups that small make readers read a \
                             footer entry per few pages; the default is 16MiB"
                        ),
                    ));
                }
                Some(n as usize)
            }
        };
        Ok(DeltaSettings {
            resume_app_id: self.resume_app_id.clone(),
            row_group_rows: self.row_group_rows,
            row_group_bytes,
            checkpoint_interval: self.checkpoint_interval,
            properties: self.properties.clone(),
            commit_attempts: self.commit_attempts,
            vacuum_retention,
            target_file_size,
            profile,
            shared_files: self.shared_files,
            auto_compact: self.auto_compact.then_some(AutoCompact {
                min_files: self.compact_min_files,
                target_file_size,
                vacuum_retention,
            }),
            upsert_strategy,
        })
    }
}

impl DeltaSettings {
    /// The sink config with these settings applied.
    pub fn apply(&self, config: DeltaSinkConfig) -> DeltaSinkConfig {
        DeltaSinkConfig {
            table_properties: self.properties.clone(),
            checkpoint_interval: self.checkpoint_interval,
            commit_attempts: self.commit_attempts,
            profile: self.profile,
            shared_files: self.shared_files,
            auto_compact: self.auto_compact,
            upsert_strategy: self.upsert_strategy,
            resume_app_id: self.resume_app_id.clone(),
            row_groups: RowGroups {
                rows: match (self.row_group_rows, self.profile) {
                    (Some(n), _) => n,
                    (None, ReaderProfile::Fabric) => {
                        FABRIC_ROW_GROUP_ROWS.max(config.row_groups.rows)
                    }
                    (None, ReaderProfile::Delta) => config.row_groups.rows,
                },
                bytes: match (self.row_group_bytes, self.profile) {
                    (Some(n), _) => Some(n),
                    (None, ReaderProfile::Fabric) => None,
                    (None, ReaderProfile::Delta) => config.row_groups.bytes,
                },
            },
            ..config
        }
    }
}
