//! The sink contract as scenarios every sink runs (`#[cfg(test)]` in each sink's unit tests on
//! local storage, Databend's on its test server; `feature = "testing"` for
//! `tests/conformance.rs` on the S3, Azure and GCS servers and the Databend test server).
//!
//! A scenario takes a factory of writers (`make(i)`: writer `i` of one table; distinct writer
//! identities where the sink has them) and a partition of its own, and asserts what the
//! [`Sink`] docs promise:
//! - [`commit_then_recover`]: a committed flush is the recovered and the committed position;
//! - [`a_retried_commit_is_already_committed`]: committing the same staged flush twice is
//!   harmless and says so;
//! - [`the_same_start_is_fenced`]: two writers with flushes from one start: exactly one wins,
//!   the other is told the winner's end, and the position is the winner's;
//! - [`an_empty_flush_advances`]: a flush without rows (filtered records, tombstones) still
//!   moves the position, so commits stay a gap-free chain;
//! - [`a_zombie_behind_the_owner_is_fenced`]: a writer that resumed from an old position is
//!   fenced by the commits made since.

use std::future::Future;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use crate::{CommitOutcome, Flush, Offset, Sink, TopicPartition};

/// A flush of `[start, next)` with one row per offset (`id` = offset), or none when `rows` is
/// false.
pub fn flush(tp: &TopicPartition, start: i64, next: i64, rows: bool) -> Flush {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]));
    let ids: Vec<i64> = if rows {
        (start..next).collect()
    } else {
        Vec::new()
    };
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|i| format!("n{i}")),
            )),
        ],
    )
    .expect("a valid batch");
    Flush {
        tp: tp.clone(),
        start: Offset(start),
        next: Offset(next),
        batches: if rows { vec![batch] } else { Vec::new() },
        packed: Vec::new(),
        truncate: false,
        tick: None,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as i64
}

async fn commit<S: Sink>(sink: &S, f: Flush) -> CommitOutcome {
    let staged = sink.stage(f).await.expect("stage");
    sink.commit(&staged).await.expect("commit").0
}

/// A committed flush is the position `recover` and `committed` report.
pub async fn commit_then_recover<S: Sink>(sink: &S, tp: &TopicPartition) {
    assert_eq!(sink.committed(tp).await.expect("committed"), None);
    assert_eq!(sink.last_commit(tp).await.expect("last commit"), None);
    let before = now_ms();
    assert_eq!(
        commit(sink, flush(tp, 0, 10, true)).await,
        CommitOutcome::Committed { next: Offset(10) }
    );
    // The commit's time, as the table records it (clocks of one machine: 5 s of slack for
    // second-granular stores).
    let last = sink
        .last_commit(tp)
        .await
        .expect("last commit")
        .expect("a commit");
    assert_eq!(last.next, Offset(10));
    let at = last.at_ms.expect("the table records when it was committed");
    assert!(
        (before - 5_000..=now_ms() + 5_000).contains(&at),
        "committed at {at}, between {before} and {}",
        now_ms()
    );
    assert_eq!(sink.recover(tp).await.expect("recover"), Some(Offset(10)));
    assert_eq!(
        sink.committed(tp).await.expect("committed"),
        Some(Offset(10))
    );
}

/// The same staged flush committed twice: the second attempt is `AlreadyCommitted`.
pub async fn a_retried_commit_is_already_committed<S: Sink>(sink: &S, tp: &TopicPartition) {
    let staged = sink.stage(flush(tp, 0, 10, true)).await.expect("stage");
    let first = sink.commit(&staged).await.expect("commit").0;
    assert_eq!(first, CommitOutcome::Committed { next: Offset(10) });
    let again = sink.commit(&staged).await.expect("commit again").0;
    assert_eq!(again, CommitOutcome::AlreadyCommitted { next: Offset(10) });
    assert_eq!(
        sink.committed(tp).await.expect("committed"),
        Some(Offset(10))
    );
}

/// Two writers stage flushes from one start; the first commit wins, the second is fenced at
/// the winner's end.
pub async fn the_same_start_is_fenced<S: Sink>(a: &S, b: &S, tp: &TopicPartition) {
    let sa = a.stage(flush(tp, 0, 10, true)).await.expect("stage a");
    let sb = b.stage(flush(tp, 0, 7, true)).await.expect("stage b");
    assert_eq!(
        a.commit(&sa).await.expect("commit a").0,
        CommitOutcome::Committed { next: Offset(10) }
    );
    assert_eq!(
        b.commit(&sb).await.expect("commit b").0,
        CommitOutcome::Fenced { next: Offset(10) }
    );
    assert_eq!(b.recover(tp).await.expect("recover"), Some(Offset(10)));
}

/// A flush without rows moves the position too.
pub async fn an_empty_flush_advances<S: Sink>(sink: &S, tp: &TopicPartition) {
    commit(sink, flush(tp, 0, 10, true)).await;
    let outcome = commit(sink, flush(tp, 10, 15, false)).await;
    assert_eq!(outcome, CommitOutcome::Committed { next: Offset(15) });
    assert_eq!(sink.recover(tp).await.expect("recover"), Some(Offset(15)));
    assert_eq!(
        commit(sink, flush(tp, 15, 20, true)).await,
        CommitOutcome::Committed { next: Offset(20) }
    );
}

/// A writer that resumed from position 0 while the owner committed up to 20 is fenced, and
/// learns where the owner got to.
pub async fn a_zombie_behind_the_owner_is_fenced<S: Sink>(
    owner: &S,
    zombie: &S,
    tp: &TopicPartition,
) {
    commit(owner, flush(tp, 0, 10, true)).await;
    commit(owner, flush(tp, 10, 20, true)).await;
    let outcome = commit(zombie, flush(tp, 0, 5, true)).await;
    assert!(
        matches!(outcome, CommitOutcome::Fenced { next } if next >= Offset(10)),
        "a zombie at 0 after the owner reached 20: {outcome:?}"
    );
    let outcome = commit(zombie, flush(tp, 10, 12, true)).await;
    assert!(
        matches!(outcome, CommitOutcome::Fenced { next: Offset(20) }),
        "a zombie at 10 after the owner reached 20: {outcome:?}"
    );
    assert_eq!(owner.recover(tp).await.expect("recover"), Some(Offset(20)));
}

/// Runs every scenario; `make(i)` opens writer `i` of one table (each scenario uses its own
/// partition of `topic`, so one table serves them all).
pub async fn all<S, F, Fut>(topic: &str, make: F)
where
    S: Sink + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = S>,
{
    let tp = |p: i32| TopicPartition::new(topic, p);
    let (w0, w1) = (make(0).await, make(1).await);
    commit_then_recover(&w0, &tp(0)).await;
    a_retried_commit_is_already_committed(&w0, &tp(1)).await;
    the_same_start_is_fenced(&w0, &w1, &tp(2)).await;
    an_empty_flush_advances(&w0, &tp(3)).await;
    a_zombie_behind_the_owner_is_fenced(&w0, &w1, &tp(4)).await;
}

/// The Databend test server's connection for `database`, from `LAKESINK_TEST_DATABEND`
/// (`bash scripts/test.sh` starts the server; so does `scripts/services.sh start DIR`, whose
/// `DIR/env` exports the variable). Panics, naming the fix, when it is not set.
pub fn databend_server(database: &str) -> crate::databend::client::ClientConfig {
    let url = std::env::var("LAKESINK_TEST_DATABEND").expect(
        "LAKESINK_TEST_DATABEND names the Databend test server: run `bash scripts/test.sh`, or \
         `bash scripts/services.sh start DIR` and `source DIR/env`",
    );
    crate::databend::DatabendSection {
        url,
        user: None,
        password: None,
        database: Some(database.into()),
        warehouse: None,
        timeout: "60s".into(),
    }
    .validate()
    .unwrap_or_else(|e| panic!("LAKESINK_TEST_DATABEND: {e}"))
}

/// A Databend writer of the contract's table in `database`: every writer shares one sink name
/// (the ledger's key), as two members of one deployment would.
pub fn databend_writer(database: &str) -> crate::databend::DatabendSink {
    crate::databend::DatabendSink::new(crate::databend::DatabendSinkConfig {
        client: databend_server(database),
        sink: "contract".into(),
        table: "contract".into(),
        upsert: None,
        tables: Default::default(),
        compression: Default::default(),
    })
    .unwrap_or_else(|e| panic!("a Databend writer: {e}"))
}
