//! Stalled partitions: an assigned partition whose broker holds records beyond the consumer's
//! fetch position while, for `pipeline.stall_timeout`, the position does not move and nothing
//! waits in librdkafka's fetch queue. That is a partition the consumer cannot read (a record
//! batch it cannot decompress, a topic it may describe but not read, an offset it cannot
//! fetch): librdkafka logs and retries forever, so without this nothing would say so.
//!
//! Fed from librdkafka's statistics (every 5 s). Every answered fetch carries the partition's
//! high watermark, so an end still unknown after the timeout means no fetch was answered (a
//! topic the principal may describe but not read): that counts as records waiting.
//! Invariants: a partition is never reported
//! while records wait in its fetch queue (then lakesink is behind, not the source) or while its
//! position moves, and it is reported once per stall; the report ends when the position moves.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sinks::TopicPartition;

/// One partition as librdkafka's statistics show it.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// The next offset to fetch (negative when unknown).
    pub position: i64,
    /// The last offset a consumer may read up to: the high watermark, or the last stable offset
    /// below it (read_committed consumers stop there); `None` while no fetch was answered.
    pub readable_end: Option<i64>,
    /// Records fetched and waiting to be polled.
    pub queued: i64,
}

/// What changed for a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// No record fetched at `position` for `waited`, with records up to `readable_end`.
    Stalled {
        position: i64,
        readable_end: Option<i64>,
        waited: Duration,
    },
    /// A stalled partition moves again.
    Recovered { position: i64 },
}

#[derive(Debug)]
struct Watch {
    position: i64,
    since: Instant,
    stalled: bool,
}

/// Tracks every assigned partition's fetch progress.
#[derive(Debug)]
pub struct StallDetector {
    timeout: Duration,
    watches: HashMap<TopicPartition, Watch>,
}

impl StallDetector {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            watches: HashMap::new(),
        }
    }

    /// Records one observation of `tp` at `now`; returns what changed, if anything.
    pub fn observe(&mut self, tp: &TopicPartition, o: Observation, now: Instant) -> Option<Change> {
        let waiting =
            o.position >= 0 && o.queued == 0 && o.readable_end.is_none_or(|e| e > o.position);
        let w = self.watches.entry(tp.clone()).or_insert(Watch {
            position: o.position,
            since: now,
            stalled: false,
        });
        if !waiting || w.position != o.position {
            let recovered = w.stalled;
            *w = Watch {
                position: o.position,
                since: now,
                stalled: false,
            };
            return recovered.then_some(Change::Recovered {
                position: o.position,
            });
        }
        let waited = now.duration_since(w.since);
        if !w.stalled && waited >= self.timeout {
            w.stalled = true;
            return Some(Change::Stalled {
                position: o.position,
                readable_end: o.readable_end,
                waited,
            });
        }
        None
    }

    /// `tp` is no longer assigned here; returns whether it was stalled.
    pub fn forget(&mut self, tp: &TopicPartition) -> bool {
        self.watches.remove(tp).is_some_and(|w| w.stalled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(position: i64, readable_end: i64, queued: i64) -> Observation {
        Observation {
            position,
            readable_end: Some(readable_end),
            queued,
        }
    }

    #[test]
    fn a_position_that_does_not_move_below_the_end_is_a_stall_reported_once() {
        let tp = TopicPartition::new("t", 0);
        let mut d = StallDetector::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(d.observe(&tp, obs(10, 50, 0), t0), None);
        let s = Duration::from_secs;
        assert_eq!(d.observe(&tp, obs(10, 50, 0), t0 + s(30)), None);
        assert_eq!(
            d.observe(&tp, obs(10, 55, 0), t0 + s(60)),
            Some(Change::Stalled {
                position: 10,
                readable_end: Some(55),
                waited: s(60)
            })
        );
        assert_eq!(d.observe(&tp, obs(10, 55, 0), t0 + s(65)), None, "once");
        assert_eq!(
            d.observe(&tp, obs(11, 55, 0), t0 + s(70)),
            Some(Change::Recovered { position: 11 })
        );
        assert!(!d.forget(&tp));
    }

    #[test]
    fn caught_up_queued_or_moving_partitions_never_stall() {
        let tp = TopicPartition::new("t", 1);
        let mut d = StallDetector::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let s = Duration::from_secs;
        for i in 0..20 {
            // At the end: nothing to fetch.
            assert_eq!(d.observe(&tp, obs(50, 50, 0), t0 + s(i * 5)), None);
        }
        let tp2 = TopicPartition::new("t", 2);
        for i in 0..20 {
            // Records fetched and waiting: the pipeline is behind, not the source.
            assert_eq!(d.observe(&tp2, obs(10, 50, 800), t0 + s(i * 5)), None);
        }
        let tp3 = TopicPartition::new("t", 3);
        for i in 0..20 {
            // Moving slowly.
            assert_eq!(d.observe(&tp3, obs(i, 1000, 0), t0 + s(i as u64 * 5)), None);
        }
        let tp4 = TopicPartition::new("t", 4);
        d.observe(&tp4, obs(5, 9, 0), t0);
        assert!(d.observe(&tp4, obs(5, 9, 0), t0 + s(10)).is_some());
        assert!(d.forget(&tp4), "a revoked stalled partition says so");
    }

    #[test]
    fn an_end_no_fetch_ever_reported_is_a_stall() {
        let tp = TopicPartition::new("t", 5);
        let mut d = StallDetector::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let denied = Observation {
            position: 0,
            readable_end: None,
            queued: 0,
        };
        assert_eq!(d.observe(&tp, denied, t0), None);
        assert!(matches!(
            d.observe(&tp, denied, t0 + Duration::from_secs(10)),
            Some(Change::Stalled {
                readable_end: None,
                ..
            })
        ));
    }
}
