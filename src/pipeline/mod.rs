//! The data path between the Kafka source (`kafka`) and the sinks, and THE end-to-end
//! protocol that makes it exactly once.
//!
//! ```text
//!  ── per flush, in one partition worker ([`worker`]) ───────────────────────────────────────
//!  records ─► decode chain ─► buffer ──(rows | bytes | max_latency | budget | caught up)──┐
//!             │ undecodable                                                               │
//!             ▼                                                                           ▼
//!        dead_pending ─► 1. DEAD LETTERS: one fenced Kafka transaction  ([`dead_letters`])
//!                        2. STAGE: Sink::stage, files written, invisible
//!                        3. GATE: a topic-id lookup issued after the last record  ([`identity`])
//!                        4. FENCED COMMIT: Sink::commit(start = position, next)
//!                              Committed / AlreadyCommitted ─► 5. ADVANCE position = next
//!                              Fenced { at }  ─► drop the buffer, Resync(at) ─► source seeks
//!                        6. GROUP OFFSET: Event::Committed ─► the source commits the minimum
//!                           over the partition's sinks to the consumer group (for lag only)
//!  ── rebalance, on the source's poll thread ([`supervisor`]) ──────────────────────────────
//!  revoke:  drain every worker of the partitions (steps 1–6, within drain_timeout) ─► unassign
//!  assign:  topic ids adopted ─► recover each sink's position from its table (concurrently,
//!           one deadline) ─► the source decides the start (log ends, auto.offset.reset)
//!           ─► workers started ─► assign at the lowest position (the others skip what they have)
//! ```
//!
//! Invariants:
//! - The table's commit record is the only truth about what a sink has; the group offset is
//!   informational. A dead letter is committed before the table commit that covers its offset.
//! - A worker's flush always starts at its current position (the recovered commit end, or the
//!   first offset it received), so sink commits form a gap-free chain per partition. At most
//!   one flush per worker is in flight; the next starts after it is settled.
//! - After a `Fenced` outcome the worker drops everything it holds, asks the source to seek to
//!   the winner's end, and ignores records until the source confirms the seek; the shared
//!   fetch position is never moved forward for one sink.
//! - Memory: per-partition queues are bounded; decoded data is accounted in one global
//!   [`BufferBudget`] until its flush is staged; going over it makes the writers holding the
//!   most data flush.
//!
//! Stages: [`messages`] (what flows between source, supervisor and workers), [`supervisor`]
//! (owns the workers; assign, deliver, revoke, resync), [`worker`] (the partition loop; its
//! `chain` decodes, `batcher` buffers and says when to flush, `commit` drives the in-flight
//! flush, `rejects` the dead letters),
//! [`budget`], [`dead_letters`] (the dead-letter stage's interface), [`identity`] (the
//! topic-id gate), [`retry`] (the one retry loop), [`progress`] (what is reported), [`tick`]
//! (the latency grid: when flushes are cut).

pub mod budget;
pub mod dead_letters;
pub mod identity;
pub mod messages;
pub mod progress;
pub mod retry;
pub mod supervisor;
pub mod tick;
pub mod worker;

use std::sync::Arc;

use schema_registry::RegistryClient;
use sinks::AnySink;

use crate::config::ValidatedSink;

pub use budget::BufferBudget;
pub use messages::{Event, WorkerMsg};
pub use progress::Progress;

/// A configured sink, shared by its partition workers.
#[derive(Debug)]
pub struct SinkRuntime {
    pub config: ValidatedSink,
    pub sink: Arc<dyn AnySink>,
    pub registry: RegistryClient,
    /// Where undecodable records go when `errors = "dead-letter"`.
    pub dead_letters: Option<Arc<dyn dead_letters::DeadLetterTopic>>,
}
