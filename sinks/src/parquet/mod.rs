//! Plain Parquet tables (Hive-partitioned) on any object store, exactly once.
//!
//! Commit protocol (one flush = the rows of one source partition between two positions):
//!
//! ```text
//!  stage ─► <table>/_lakesink/staging/<topic>/<p>/<start>-<next>-<rand>-<i>.parquet.staged (invisible)
//!    │
//!  commit ─► PUT If-None-Match:* <table>/_lakesink/commits/<topic>/<p>/<start>.json   (the fence)
//!    │        AlreadyExists ⇒ another writer owns this start: Fenced, resume at its end
//!    ▼
//!  publish ─► copy each staged file to <table>/<hive dirs>/<topic>+<p>+<start>.parquet,
//!             then delete the staged copy (idempotent; redone by recovery)
//!    │
//!  hint ─► <table>/_lakesink/checkpoints/<topic>/<p>.json (where recovery may start listing)
//! ```
//!
//! Invariants:
//! - For a given (topic, partition, start) at most one marker can ever exist: the conditional
//!   create is atomic on S3, Azure, GCS and local disks.
//! - Markers of a partition form a chain: each starts where the previous one ended, so
//!   [`Sink::recover`](crate::Sink::recover) resumes at the end of the last marker.
//! - A marker is *published* once none of its staged files remain; recovery republishes any
//!   marker whose staged files still exist, so a crash during publishing loses nothing.
//! - Readers never see uncommitted data: everything unpublished lives under `_lakesink/`
//!   (ignored by Spark, pyarrow and Hive) and staged files do not end in `.parquet`.
//! - Staged names are unique per stage call (a random part): a zombie and the owner that stage
//!   the same range never overwrite each other's bytes; the marker records the exact names.
//! - A writer fenced at a start publishes the winner's marker before it goes on after it: the
//!   winner may have died between its marker and its publish, and the loser's next hint moves
//!   recovery past that marker.
//! - A hole between two markers stops the partition ([`crate::Error::Chain`]): records are never
//!   skipped because a marker went missing.
//! - [`Sink::check`](crate::Sink::check) refuses a store that ignores conditional creates.

mod auto;
mod committer;
mod compact;
mod config;
mod merge;
pub(crate) mod writer;

pub use committer::{Marker, MarkerFile, ParquetSink};
pub use compact::{CompactReport, CompactedFile, Compaction};
pub use config::{ParquetCompact, ParquetSection, ParquetSettings, ParquetSinkConfig};
pub use writer::StagedFile;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_compact;
#[cfg(test)]
mod tests_races;
