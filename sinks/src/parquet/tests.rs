//! Conformance tests of the Parquet commit protocol on an in-memory store (the same suite runs
//! against real S3/Azure servers in the service's integration tests).

use std::sync::Arc;

use arrow::array::Int64Array;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::*;
use crate::store::TableStore;
use crate::{CommitOutcome, Flush, Offset, Sink, TopicPartition};

fn table(store: Arc<InMemory>) -> TableStore {
    TableStore {
        store,
        root: Path::from("t"),
        location: "memory:///t".into(),
    }
}

fn sink(store: &Arc<InMemory>, writer: &str) -> ParquetSink {
    ParquetSink::new(
        table(store.clone()),
        ParquetSinkConfig {
            writer_id: writer.into(),
            ..Default::default()
        },
    )
}

fn flush(start: i64, next: i64) -> Flush {
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from_iter_values(start..next))],
    )
    .unwrap();
    Flush {
        tp: TopicPartition::new("orders", 0),
        start: Offset(start),
        next: Offset(next),
        batches: vec![batch],
    }
}

async fn paths(store: &InMemory) -> Vec<String> {
    let mut v: Vec<String> = store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    v.sort();
    v
}

async fn visible(store: &InMemory) -> Vec<String> {
    paths(store)
        .await
        .into_iter()
        .filter(|p| p.ends_with(".parquet") && !p.contains("/_lakesink/"))
        .collect()
}

#[tokio::test]
async fn stage_commit_recover() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w1");
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(s.recover(&tp).await.unwrap(), None);
    let staged = s.stage(flush(0, 10)).await.unwrap();
    assert!(
        visible(&store).await.is_empty(),
        "staged data must be invisible"
    );
    let (outcome, stats) = s.commit(&staged).await.unwrap();
    assert_eq!(outcome, CommitOutcome::Committed { next: Offset(10) });
    assert_eq!(stats.rows, 10);
    assert_eq!(
        visible(&store).await,
        vec!["t/orders+0+00000000000000000000.parquet"]
    );
    let staged = s.stage(flush(10, 25)).await.unwrap();
    s.commit(&staged).await.unwrap();
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(25)));
    // No staged leftovers once published.
    assert!(!paths(&store).await.iter().any(|p| p.contains("staging")));
}

#[tokio::test]
async fn retried_commit_is_already_committed() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w1");
    let staged = s.stage(flush(0, 5)).await.unwrap();
    s.commit(&staged).await.unwrap();
    let (outcome, _) = s.commit(&staged).await.unwrap();
    assert_eq!(outcome, CommitOutcome::AlreadyCommitted { next: Offset(5) });
    assert_eq!(visible(&store).await.len(), 1);
}

#[tokio::test]
async fn second_writer_at_same_start_is_fenced_and_invisible() {
    let store = Arc::new(InMemory::new());
    let a = sink(&store, "a");
    let b = sink(&store, "b");
    let sa = a.stage(flush(0, 5)).await.unwrap();
    let sb = b.stage(flush(0, 8)).await.unwrap();
    assert_eq!(
        a.commit(&sa).await.unwrap().0,
        CommitOutcome::Committed { next: Offset(5) }
    );
    assert_eq!(
        b.commit(&sb).await.unwrap().0,
        CommitOutcome::Fenced { next: Offset(5) }
    );
    // Only the winner's 5 rows are visible, the loser's staged files are gone.
    assert_eq!(visible(&store).await.len(), 1);
    assert!(!paths(&store).await.iter().any(|p| p.contains("staging")));
    let m = a
        .read_marker(&TopicPartition::new("orders", 0), Offset(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.writer.as_str(), m.rows), ("a", 5));
}

#[tokio::test]
async fn crash_after_marker_is_published_by_recovery() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w1");
    let staged = s.stage(flush(0, 5)).await.unwrap();
    // Simulate a crash right after the marker create: write the marker the way commit does,
    // but never publish.
    let marker = Marker {
        version: 1,
        writer: "w1".into(),
        topic: "orders".into(),
        partition: 0,
        start: 0,
        next: 5,
        rows: 5,
        files: staged.files.clone(),
        columns: vec![],
        committed_at_ms: 0,
    };
    let p = s.marker_path(&staged.tp, 0);
    store
        .put(&p, serde_json::to_vec(&marker).unwrap().into())
        .await
        .unwrap();
    assert!(visible(&store).await.is_empty());
    let restarted = sink(&store, "w2");
    assert_eq!(
        restarted.recover(&staged.tp).await.unwrap(),
        Some(Offset(5))
    );
    assert_eq!(visible(&store).await.len(), 1);
    assert!(!paths(&store).await.iter().any(|p| p.contains("staging")));
}

#[tokio::test]
async fn crash_before_marker_leaves_nothing_visible() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w1");
    s.stage(flush(0, 5)).await.unwrap();
    let restarted = sink(&store, "w2");
    assert_eq!(
        restarted
            .recover(&TopicPartition::new("orders", 0))
            .await
            .unwrap(),
        None
    );
    assert!(visible(&store).await.is_empty());
    // The restarted writer redoes the same flush and wins.
    let staged = restarted.stage(flush(0, 5)).await.unwrap();
    assert!(matches!(
        restarted.commit(&staged).await.unwrap().0,
        CommitOutcome::Committed { .. }
    ));
    assert_eq!(visible(&store).await.len(), 1);
}

#[tokio::test]
async fn recovery_uses_the_hint_and_still_finds_later_markers() {
    let store = Arc::new(InMemory::new());
    let s = ParquetSink::new(
        table(store.clone()),
        ParquetSinkConfig {
            writer_id: "w".into(),
            hint_every: 2,
            ..Default::default()
        },
    );
    let mut start = 0;
    for n in [3, 4, 5, 6, 7] {
        let staged = s.stage(flush(start, start + n)).await.unwrap();
        s.commit(&staged).await.unwrap();
        start += n;
    }
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(start)));
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(start)));
}
