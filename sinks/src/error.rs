//! The sinks crate's error type. Context (table, partition, offsets, path) lives in struct
//! variants; [`Error::is_retryable`] is the one place that decides what a retry can fix.

use crate::{Offset, TopicPartition};

/// The sinks crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a sink call failed; [`Error::is_retryable`] says whether trying again can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The table's URL cannot be used.
    #[error("invalid table location `{location}`: {reason}")]
    Location {
        /// The table's location.
        location: String,
        /// Why.
        reason: String,
    },

    /// The object store failed (network, permissions, a missing bucket).
    #[error("object store error at `{path}` in table {table}: {source}")]
    Store {
        /// The table's location.
        table: String,
        /// The object's path.
        path: String,
        /// The underlying error.
        #[source]
        source: Box<object_store::Error>,
    },

    /// The flush could not be encoded as Parquet.
    #[error("cannot encode parquet for {tp} offsets {start}..{next}: {source}")]
    Encode {
        /// The source partition.
        tp: TopicPartition,
        /// The flush's start position.
        start: Offset,
        /// One past the flush's last offset.
        next: Offset,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A `partition_by` entry does not parse.
    #[error("invalid partition_by `{spec}`: {reason}")]
    PartitionSpec {
        /// The `partition_by` entry.
        spec: String,
        /// Why.
        reason: String,
    },

    /// A row's partition value cannot be computed.
    #[error("cannot compute partition `{spec}` for {tp}: {reason}")]
    PartitionValue {
        /// The `partition_by` entry.
        spec: String,
        /// The source partition.
        tp: TopicPartition,
        /// Why.
        reason: String,
    },

    /// A commit marker cannot be read: the table needs repair.
    #[error("corrupt commit marker `{path}` in table {table}: {reason}")]
    CorruptMarker {
        /// The table's location.
        table: String,
        /// The object's path.
        path: String,
        /// Why.
        reason: String,
    },

    /// The commit markers of a partition do not form a chain: the table needs repair.
    #[error("broken commit chain for {tp} in table {table}: {reason}")]
    Chain {
        /// The table's location.
        table: String,
        /// The source partition.
        tp: TopicPartition,
        /// Why.
        reason: String,
    },

    /// A Delta Lake operation failed.
    #[error("Delta table {table}: cannot {op}: {source}")]
    Delta {
        /// The table's location.
        table: String,
        /// What was attempted.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    /// The flush's columns do not fit the table's.
    #[error("schema of {tp} does not fit table {table}: {reason}")]
    Schema {
        /// The table's location.
        table: String,
        /// The source partition.
        tp: TopicPartition,
        /// Why.
        reason: String,
    },

    /// The warehouse (Databend) failed or refused a statement.
    #[error("{location}: cannot {op}: {reason}")]
    Warehouse {
        /// The table's location.
        location: String,
        /// What was attempted.
        op: &'static str,
        /// Whether the warehouse said a retry can succeed.
        retryable: bool,
        /// Why.
        reason: String,
    },

    /// The flush's changes cannot be applied by key.
    #[error("cannot upsert {tp}: {reason}")]
    Upsert {
        /// The source partition.
        tp: TopicPartition,
        /// Why.
        reason: String,
    },

    /// A compaction of a Parquet table partition cannot go on.
    #[error("compaction of `{dir}` in table {table}: {reason}")]
    Compaction {
        /// The table's location.
        table: String,
        /// The table partition (directory).
        dir: String,
        /// Why.
        reason: String,
    },

    /// A background task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Join(String),
}

impl Error {
    /// Whether retrying the same operation later can succeed (network, throttling, 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store { source, .. } => !matches!(
                **source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            Error::Delta { source, .. } => delta_retryable(source),
            Error::Warehouse { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

fn delta_retryable(e: &deltalake::DeltaTableError) -> bool {
    use deltalake::DeltaTableError as D;
    match e {
        D::ObjectStore { source } => !matches!(
            source,
            object_store::Error::NotFound { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
                | object_store::Error::NotImplemented { .. }
                | object_store::Error::UnknownConfigurationKey { .. }
        ),
        // Lost every quick retry of a busy table: a later attempt can win.
        D::Transaction { .. } | D::VersionAlreadyExists(_) => true,
        D::Io { .. } => true,
        // deltalake flattens store failures met inside a MERGE scan or a kernel log read into
        // text (`Generic`, `Parquet`, `Kernel` errors): a transport failure there is as
        // transient as anywhere else (the chaos harness's outages found it).
        other => transient_text(&other.to_string()),
    }
}

/// Whether an error's text says the store could not be reached or answered 5xx.
fn transient_text(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "error sending request",
        "error interacting with object store",
        "connection reset",
        "connection refused",
        "connection closed",
        "broken pipe",
        "timed out",
        "service unavailable",
        "internal server error",
        "slow down",
    ]
    .iter()
    .any(|m| t.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failures_inside_delta_errors_are_retryable() {
        let merge = deltalake::DeltaTableError::Generic(
            "Parquet error: Failed to fetch metadata for file t/part-0.parquet: Object Store error: \
             Generic S3 error: Error performing GET http://127.0.0.1:1/b/t/part-0.parquet - HTTP \
             error: error sending request"
                .into(),
        );
        assert!(delta_retryable(&merge));
        let schema =
            deltalake::DeltaTableError::Generic("Schema error: field `x` not found".into());
        assert!(!delta_retryable(&schema));
    }
}
