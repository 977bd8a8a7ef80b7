//! lakesink's sinks: turn Arrow record batches that carry Kafka offset ranges into committed,
//! reader-visible tables, exactly once.
//!
//! This crate never sees Kafka clients or schema registries. It speaks Arrow [`RecordBatch`]es
//! and source-agnostic positions ([`TopicPartition`], [`Offset`]): a *position* is the next
//! offset to read from a partition. Every sink keeps its own commit record as the single source
//! of truth for progress, and exposes three steps:
//!
//! 1. [`Sink::stage`] writes a flush so that readers cannot see it yet;
//! 2. [`Sink::commit`] makes it visible exactly once, fenced on the expected start position;
//! 3. [`Sink::recover`] reads the committed position back after any crash or rebalance, and
//!    finishes any commit that was interrupted half-way.
//!
//! Each sink stages its own data type ([`Sink::Data`]); the service holds sinks as
//! `Arc<dyn AnySink>`, whose [`StagedFlush`] carries the sink that staged it, so a flush can
//! only ever be committed by the sink (and kind) that staged it.
//!
//! [`RecordBatch`]: arrow::record_batch::RecordBatch

#![warn(missing_docs)]

pub mod crash;
pub mod databend;
pub mod delta;
pub mod encode;
pub mod error;
pub mod fence;
pub mod latency_store;
mod object_file;
pub mod packed;
pub mod parquet;
pub mod partition;
pub mod routed;
pub mod schema;
pub mod section;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod units;
pub mod upsert;

use std::fmt;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;

pub use error::{Error, Result};

/// A Kafka partition of a topic (or any partitioned, offset-addressed source).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic's name.
    pub topic: Arc<str>,
    /// The partition's number.
    pub partition: i32,
}

impl TopicPartition {
    /// Partition `partition` of `topic`.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// A Kafka offset. Positions (the next offset to read) use the same type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Offset(pub i64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One flush of one source partition: the rows read between two positions.
///
/// `start` is the position the writer resumed from (the end of the previous commit, or the
/// first offset it ever read), `next` is one past the last offset included. Offsets between them
/// that carry no row (compaction, transaction markers, filtered records) are still covered, so
/// commits form a gap-free chain of positions.
#[derive(Debug, Clone)]
pub struct Flush {
    /// The source partition.
    pub tp: TopicPartition,
    /// The position the flush starts at: the previous commit's `next`.
    pub start: Offset,
    /// One past the last offset included.
    pub next: Offset,
    /// The rows, in offset order, all of one schema; after those of `packed`.
    pub batches: Vec<RecordBatch>,
    /// The flush's first rows, packed while the writer was under memory pressure (see
    /// [`packed`]); of the same schema as `batches`. Read them with [`Flush::chunks`], or
    /// unpack the whole flush with [`Flush::unpacked`].
    pub packed: Vec<packed::Packed>,
    /// The source table was truncated just before `batches` (a Debezium `op: "t"`): an upsert
    /// sink empties the table in the same commit, before applying them. Append sinks never see
    /// it set.
    pub truncate: bool,
    /// Set when the flush was cut by the latency tick all partitions of the sink share (see
    /// [`Tick`]), or by a drain (a revocation or shutdown drains every partition at once);
    /// `None` for a flush cut by size, memory or catching up.
    pub tick: Option<Tick>,
}

/// The moment a latency flush was cut. The workers of one process cut their latency flushes on
/// one wall-clock grid (`max_latency` apart, at a phase of the process's own), so the flushes of
/// all partitions of a table that hold rows in this process are cut at the same moment, while
/// other members of the group cut at other moments of the period. A sink may
/// hold such a flush's commit until `gather_until` for the flushes of other partitions cut at
/// the same tick, to write their rows into shared files and commit them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// The tick, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Until when the commit may wait for other partitions' flushes of the same tick.
    pub gather_until: std::time::Instant,
}

impl Flush {
    /// Rows in all batches, packed or not.
    pub fn rows(&self) -> usize {
        self.packed.iter().map(|p| p.rows()).sum::<usize>()
            + self.batches.iter().map(|b| b.num_rows()).sum::<usize>()
    }

    /// The rows' schema, unless the flush holds none.
    pub fn schema(&self) -> Option<arrow::datatypes::SchemaRef> {
        match self.packed.first() {
            Some(p) => Some(p.schema().clone()),
            None => self.batches.first().map(|b| b.schema()),
        }
    }

    /// The rows in offset order: the packed chunks, then the batches.
    pub fn chunks(&self) -> Vec<packed::Chunk> {
        self.packed
            .iter()
            .cloned()
            .map(packed::Chunk::Packed)
            .chain(self.batches.iter().cloned().map(packed::Chunk::Batch))
            .collect()
    }

    /// The flush with every row unpacked into `batches`, for sinks that need all rows at once.
    pub fn unpacked(self) -> Result<Flush> {
        if self.packed.is_empty() {
            return Ok(self);
        }
        let mut batches = Vec::with_capacity(self.batches.len() + self.packed.len());
        for p in &self.packed {
            batches.extend(p.unpack().map_err(|e| Error::Encode {
                tp: self.tp.clone(),
                start: self.start,
                next: self.next,
                source: Box::new(e),
            })?);
        }
        batches.extend(self.batches);
        Ok(Flush {
            batches,
            packed: Vec::new(),
            ..self
        })
    }
}

/// What a commit attempt achieved. Losing a race is an outcome, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// This writer's flush is now committed and visible.
    Committed {
        /// Where the writer reads on from.
        next: Offset,
    },
    /// An earlier attempt of this same writer already committed this flush (a retried request
    /// whose first response was lost); it is visible and the writer may continue.
    AlreadyCommitted {
        /// Where the writer reads on from.
        next: Offset,
    },
    /// Another writer committed a flush at this start position first. This writer must discard
    /// its flush and resume from `next`, the winner's end.
    Fenced {
        /// Where the writer reads on from.
        next: Offset,
    },
}

/// Summary of one committed flush, for progress reporting.
#[derive(Debug, Clone, Default)]
pub struct CommitStats {
    /// Data files the commit added.
    pub files: usize,
    /// Rows the commit added or changed.
    pub rows: u64,
    /// Bytes of data files the commit added.
    pub bytes: u64,
}

/// A flush written where readers cannot see it, ready to commit. `D` is what the sink that
/// staged it needs to commit it (its [`Sink::Data`]), so a flush is only ever committed by a
/// sink of the kind that staged it.
#[derive(Debug, Clone)]
pub struct Staged<D> {
    /// The source partition.
    pub tp: TopicPartition,
    /// The position the flush starts at (the fence key).
    pub start: Offset,
    /// One past the last offset included.
    pub next: Offset,
    /// Rows staged.
    pub rows: u64,
    /// The data's columns as `name: type`, recorded in the commit for humans and tools.
    pub columns: Vec<String>,
    /// What the sink that staged the flush needs to commit it.
    pub data: D,
}

/// A staged flush of any sink, committed by the sink that staged it (see [`AnySink`]).
pub struct StagedFlush {
    inner: Box<dyn ErasedStaged>,
}

impl fmt::Debug for StagedFlush {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (tp, start, next, rows) = self.inner.range();
        write!(f, "StagedFlush({tp} {start}..{next}, {rows} rows)")
    }
}

impl StagedFlush {
    /// Makes the flush visible, fenced on its start position (see [`Sink::commit`]).
    pub async fn commit(&self) -> Result<(CommitOutcome, CommitStats)> {
        self.inner.commit().await
    }

    /// Bytes of decoded data this staged flush keeps in memory until its commit (a Delta
    /// upsert's changes, which the commit applies; other flushes are already in their files).
    pub fn retained_bytes(&self) -> usize {
        self.inner.retained_bytes()
    }
}

#[async_trait::async_trait]
trait ErasedStaged: Send + Sync {
    fn range(&self) -> (&TopicPartition, Offset, Offset, u64);
    fn retained_bytes(&self) -> usize;
    async fn commit(&self) -> Result<(CommitOutcome, CommitStats)>;
}

struct Held<S: Sink> {
    sink: Arc<S>,
    staged: Staged<S::Data>,
}

#[async_trait::async_trait]
impl<S: Sink> ErasedStaged for Held<S> {
    fn range(&self) -> (&TopicPartition, Offset, Offset, u64) {
        let s = &self.staged;
        (&s.tp, s.start, s.next, s.rows)
    }
    fn retained_bytes(&self) -> usize {
        self.sink.retained_bytes(&self.staged)
    }
    async fn commit(&self) -> Result<(CommitOutcome, CommitStats)> {
        self.sink.commit(&self.staged).await
    }
}

/// What [`Sink::adopt_topic_id`] found in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicIdentity {
    /// Nothing was recorded for the topic: the given id is now.
    Recorded,
    /// The table records the given id already.
    Same,
    /// The table records another id: its positions count offsets of an earlier topic of the
    /// same name.
    Other(String),
}

/// A partition's committed position and when the commit that made it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastCommit {
    /// The next offset to read.
    pub next: Offset,
    /// When it was committed, in ms since the Unix epoch (`None` where the table does not
    /// say, or the commit is older than what is searched for it).
    pub at_ms: Option<i64>,
}

/// A destination table with an exactly-once commit protocol.
///
/// Implementations must be safe to call from several writers (processes) at once: `commit` is
/// fenced on `staged.start`, so for a given start position exactly one writer ever wins.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + fmt::Debug + 'static {
    /// What a staged flush keeps for its commit (staged files, data files written, a stage
    /// file and its table).
    type Data: Send + Sync + fmt::Debug + 'static;

    /// The committed position of `tp` (the next offset to read), or `None` if nothing was ever
    /// committed. Finishes publishing any commit that was interrupted.
    async fn recover(&self, tp: &TopicPartition) -> Result<Option<Offset>>;

    /// The committed position of `tp`, read only (for status and lag; repairs nothing).
    async fn committed(&self, tp: &TopicPartition) -> Result<Option<Offset>>;

    /// [`Sink::committed`] with the time of the commit that made it, where the table records
    /// one (read only, for `status`).
    async fn last_commit(&self, tp: &TopicPartition) -> Result<Option<LastCommit>> {
        Ok(self
            .committed(tp)
            .await?
            .map(|next| LastCommit { next, at_ms: None }))
    }

    /// Encodes and writes a flush where readers cannot see it. Retrying is safe.
    async fn stage(&self, flush: Flush) -> Result<Staged<Self::Data>>;

    /// Makes a staged flush visible, fenced on its start position.
    async fn commit(&self, staged: &Staged<Self::Data>) -> Result<(CommitOutcome, CommitStats)>;

    /// Bytes of decoded data `staged` keeps in memory until its commit.
    fn retained_bytes(&self, _staged: &Staged<Self::Data>) -> usize {
        0
    }

    /// Records `topic_id` (Kafka's KIP-516 topic id) as the identity of `topic` in this table
    /// unless one is recorded already, and says how the recorded one compares. The table's
    /// positions for `topic` count offsets of the topic recorded here: a topic deleted and
    /// created again under the same name has a new id, and offsets unrelated to the old ones.
    /// Idempotent, and safe from several writers at once (the first record wins).
    async fn adopt_topic_id(&self, topic: &str, topic_id: &str) -> Result<TopicIdentity>;

    /// Checks that the table location is reachable and writable.
    async fn check(&self) -> Result<()>;

    /// At shutdown, after the last commit: lets background work on the table (a compaction)
    /// reach a point readers accept, waiting at most `within`, and starts none after.
    async fn settle(&self, _within: std::time::Duration) {}

    /// The table's location, for messages (never contains credentials).
    fn location(&self) -> &str;

    /// Where `topic`'s rows land, for `status` and messages (never contains credentials): the
    /// table's location, or for a sink with a table per topic, that topic's table.
    fn table_of(&self, _topic: &str) -> String {
        self.location().to_string()
    }
}

/// Any sink, as the service holds it (`Arc<dyn AnySink>`): [`Sink`] with its staged data
/// hidden in a [`StagedFlush`] that only the sink that staged it commits.
#[async_trait::async_trait]
pub trait AnySink: Send + Sync + fmt::Debug {
    /// See [`Sink::recover`].
    async fn recover(&self, tp: &TopicPartition) -> Result<Option<Offset>>;
    /// See [`Sink::committed`].
    async fn committed(&self, tp: &TopicPartition) -> Result<Option<Offset>>;
    /// See [`Sink::last_commit`].
    async fn last_commit(&self, tp: &TopicPartition) -> Result<Option<LastCommit>>;
    /// See [`Sink::stage`].
    async fn stage(self: Arc<Self>, flush: Flush) -> Result<StagedFlush>;
    /// See [`Sink::adopt_topic_id`].
    async fn adopt_topic_id(&self, topic: &str, topic_id: &str) -> Result<TopicIdentity>;
    /// See [`Sink::check`].
    async fn check(&self) -> Result<()>;
    /// See [`Sink::settle`].
    async fn settle(&self, within: std::time::Duration);
    /// See [`Sink::location`].
    fn location(&self) -> &str;
    /// See [`Sink::table_of`].
    fn table_of(&self, topic: &str) -> String;
}

#[async_trait::async_trait]
impl<S: Sink> AnySink for S {
    async fn recover(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        Sink::recover(self, tp).await
    }
    async fn committed(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        Sink::committed(self, tp).await
    }
    async fn last_commit(&self, tp: &TopicPartition) -> Result<Option<LastCommit>> {
        Sink::last_commit(self, tp).await
    }
    async fn stage(self: Arc<Self>, flush: Flush) -> Result<StagedFlush> {
        let staged = Sink::stage(&*self, flush).await?;
        Ok(StagedFlush {
            inner: Box::new(Held { sink: self, staged }),
        })
    }
    async fn adopt_topic_id(&self, topic: &str, topic_id: &str) -> Result<TopicIdentity> {
        Sink::adopt_topic_id(self, topic, topic_id).await
    }
    async fn check(&self) -> Result<()> {
        Sink::check(self).await
    }
    async fn settle(&self, within: std::time::Duration) {
        Sink::settle(self, within).await
    }
    fn location(&self) -> &str {
        Sink::location(self)
    }
    fn table_of(&self, topic: &str) -> String {
        Sink::table_of(self, topic)
    }
}
