//! The messages between the source, the supervisor and the partition workers: records in,
//! events out. Positions are [`Offset`]s on every channel.

use sinks::{Offset, TopicPartition};

use crate::decode::Record;

/// What flows from the source thread into a partition worker.
#[derive(Debug)]
pub enum WorkerMsg {
    /// Consecutive records of the partition, in offset order.
    Records(Vec<Record>),
    /// The source sought to the position the worker asked for; records before this message
    /// were read before the seek.
    Seeked { position: Offset },
    /// Flush and commit what is buffered, then stop (revocation or shutdown).
    Drain(tokio::sync::oneshot::Sender<()>),
}

/// What a worker reports to the source thread.
#[derive(Debug)]
pub enum Event {
    Committed {
        sink: usize,
        tp: TopicPartition,
        next: Offset,
    },
    /// Another writer owns this range: this worker reads on from `position` (the source seeks
    /// back if it has delivered past it; it never moves the shared position forward).
    Resync {
        sink: usize,
        /// The worker asking ([`super::worker::WorkerCtx::id`]): a drained worker's late request is
        /// ignored.
        worker: u64,
        tp: TopicPartition,
        position: Offset,
    },
    /// The worker cannot continue; the process drains and exits with this error.
    Fatal(crate::error::Error),
    /// A topic was found with another id than its partitions were assigned with: deleted and
    /// created again under a running consumer (see [`super::identity`]).
    TopicRecreated {
        topic: String,
        recorded: String,
        current: String,
    },
}
