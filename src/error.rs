//! The service's errors: why a run stopped, with the topic, partition and offsets it concerns,
//! and the fix. `anyhow` is used only in the command layer (`app`, `cli`), which adds the
//! command's context; the Display of every variant is the whole message an operator reads.
//! Kafka's own errors are carried as text (`reason`): their types stay inside `kafka`.

use sinks::{Offset, TopicPartition};

/// Why the service stopped, or a component could not start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The Kafka client could not be created, or refused a call (`action` says which).
    #[error("{action}: {reason}")]
    Kafka { action: String, reason: String },
    /// A partition's fetch position could not be moved; restarting recovers from the table.
    #[error("cannot seek {tp} to {offset}{after}: {reason}{fix}",
            after = if *.after_fence { " after another writer committed that range" } else { "" },
            fix = if *.after_fence { "; restarting recovers from the table" } else { "" })]
    Seek {
        tp: TopicPartition,
        offset: Offset,
        after_fence: bool,
        reason: String,
    },
    /// A partition's log ends could not be read when a start position depended on them.
    #[error("cannot read the offsets of {tp}: {reason}")]
    Watermarks { tp: TopicPartition, reason: String },
    /// A partition worker stopped its sink (a sink call failed after its retries, records could
    /// neither be decoded nor dead-lettered, ...): `message` names the sink, the partition, the
    /// offsets and the fix.
    #[error("{message}")]
    Worker {
        sink: String,
        tp: TopicPartition,
        /// The error class counted in `lakesink_errors_total`.
        class: &'static str,
        message: String,
    },
    /// The dead-letter topic cannot be written or read (`message` names the topic and the
    /// fix).
    #[error("{0}")]
    DeadLetters(String),
    /// A catch-up run read everything it could, but some partitions were quarantined.
    #[error("caught up except for quarantined partitions, which were not read: {}",
            .0.join("; "))]
    Quarantined(Vec<String>),
}

impl Error {
    /// A Kafka client error, `action` saying what was tried.
    pub fn kafka(action: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Kafka {
            action: action.into(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_partition_the_offset_and_the_fix() {
        let tp = TopicPartition::new("orders", 3);
        let e = Error::Seek {
            tp: tp.clone(),
            offset: Offset(42),
            after_fence: true,
            reason: "timed out".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot seek orders/3 to 42 after another writer committed that range: timed out; \
             restarting recovers from the table"
        );
        let e = Error::Seek {
            tp,
            offset: Offset(7),
            after_fence: false,
            reason: "x".into(),
        };
        assert_eq!(e.to_string(), "cannot seek orders/3 to 7: x");
        assert_eq!(
            Error::Quarantined(vec!["a".into(), "b".into()]).to_string(),
            "caught up except for quarantined partitions, which were not read: a; b"
        );
    }
}
