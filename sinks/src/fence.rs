//! The fence rule, written once: what a sink that records each source partition's position in
//! the table (Delta's txn actions, Databend's ledger) decides before it commits a flush.
//!
//! The table holds, per source partition, the position its last commit ended at. A writer with
//! the flush `[start, next)` may commit only when that position is `start` (or none is recorded
//! yet, for the partition's first commit). The recorded position equal to `next` means this
//! flush is already in (an earlier attempt of the same commit whose answer was lost); any other
//! position means another writer moved the partition on first, and this one is fenced.
//!
//! Invariant: the decision and the commit it allows happen in one atomic step of the table (one
//! Delta log entry with the conflict checker, one Databend transaction), so two writers can
//! never both see `start` and both commit. Parquet decides by marker creation instead
//! (`If-None-Match`), the same rule in another form (see `parquet/committer.rs`).

use crate::{CommitOutcome, Offset};

/// `None` when the flush `[start, next)` may be committed on top of `recorded`; else what the
/// attempt already amounts to.
pub fn decide(recorded: Option<Offset>, start: Offset, next: Offset) -> Option<CommitOutcome> {
    match recorded {
        Some(pos) if pos == next && start != next => Some(CommitOutcome::AlreadyCommitted { next }),
        Some(pos) if pos != start => Some(CommitOutcome::Fenced { next: pos }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_on_top_of_its_own_start() {
        let o = Offset;
        assert_eq!(decide(None, o(0), o(10)), None, "a first commit");
        assert_eq!(decide(Some(o(10)), o(10), o(20)), None);
        assert_eq!(
            decide(Some(o(20)), o(10), o(20)),
            Some(CommitOutcome::AlreadyCommitted { next: o(20) }),
            "a retried commit whose answer was lost"
        );
        assert_eq!(
            decide(Some(o(15)), o(10), o(20)),
            Some(CommitOutcome::Fenced { next: o(15) }),
            "another writer moved on first"
        );
        assert_eq!(
            decide(Some(o(10)), o(10), o(10)),
            None,
            "an empty flush at the recorded position"
        );
        assert_eq!(
            decide(Some(o(30)), o(10), o(10)),
            Some(CommitOutcome::Fenced { next: o(30) })
        );
    }
}
