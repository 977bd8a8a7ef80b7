//! The dead-letter stage's interface: where a sink's undecodable records go, and what a write
//! reports. The pipeline decides when (each flush writes its rejected records before the
//! table commit that covers them, see `worker::rejects`); the Kafka implementation
//! (`kafka::dead_letter`) decides how (one fenced transaction per (sink, source partition)).
//!
//! Contract of an implementation: a write that returns `Ok` has every record of `pending`
//! durably in the dead-letter topic, now or from an earlier owner (`Written::already`); a
//! write that fails has committed none of the records it reports as not written, and the next
//! write starts a new session; `WriteError::fenced` means a newer owner of the source
//! partition writes its dead letters now, and this writer must not open another session.

use sinks::TopicPartition;

use crate::decode::Rejected;

/// What one write did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Committed to the dead-letter topic now.
    pub sent: usize,
    /// Already there, from an earlier owner of the partition: skipped. They are the first
    /// `already` records of the (offset-ordered) input.
    pub already: usize,
    /// Where each record sent now landed: (source offset, dead-letter partition, its offset).
    pub deliveries: Vec<(i64, i32, i64)>,
}

/// Why a dead-letter write failed.
#[derive(Debug)]
pub struct WriteError {
    pub message: String,
    /// The session was fenced: a newer owner of the source partition opened its own. This
    /// worker must not open another (it would fence the owner in turn), but re-read from the
    /// table's position.
    pub fenced: bool,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<crate::error::Error> for WriteError {
    fn from(e: crate::error::Error) -> Self {
        e.to_string().into()
    }
}

impl From<String> for WriteError {
    fn from(message: String) -> Self {
        Self {
            message,
            fenced: false,
        }
    }
}

/// The dead-letter topic of one sink.
pub trait DeadLetterTopic: Send + Sync + std::fmt::Debug {
    /// The topic's name, for logs.
    fn topic(&self) -> &str;
    /// The writer of one (sink, source partition), owned by its worker. In exactly-once mode it
    /// starts opening its session at once, fencing the partition's earlier writers.
    fn writer(&self, sink: &str, tp: &TopicPartition) -> Box<dyn DeadLetterWriter>;
}

/// One (sink, source partition)'s dead-letter writer.
#[async_trait::async_trait]
pub trait DeadLetterWriter: Send {
    /// Writes `pending` (in offset order, all of the writer's partition) before the table
    /// commit that covers them.
    async fn write(&mut self, pending: &[Rejected]) -> Result<Written, WriteError>;
}
