//! Compaction of Parquet tables through the marker protocol: every row stays exactly once in
//! the directory a lister reads, through races between two compactors, crashes between the
//! record and its finish, writers fenced on a compacted marker, and files not yet published.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::tests::{flush, paths, table, visible};
use super::*;
use crate::{CommitOutcome, Offset, Sink, TopicPartition};

fn compacting(store: &Arc<InMemory>, writer: &str, auto: bool, min_files: usize) -> ParquetSink {
    ParquetSink::new(
        table(store.clone()),
        ParquetSinkConfig {
            writer_id: writer.into(),
            compact: ParquetCompact {
                min_files,
                target_file_size: 1 << 20,
                min_age: Duration::ZERO,
            },
            auto_compact: auto,
            ..Default::default()
        },
    )
}

/// Every value of column `v` in the files a directory lister sees, sorted.
async fn rows(store: &InMemory) -> Vec<i64> {
    let mut out = Vec::new();
    for p in visible(store).await {
        let bytes = store
            .get(&Path::from(p))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let v = batch
                .column_by_name("v")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            out.extend(v.iter().flatten());
        }
    }
    out.sort();
    out
}

/// Commits flushes of `orders`/0 cut at `bounds` (offsets `bounds[0]..bounds[last]`).
async fn commit_all(s: &ParquetSink, bounds: &[i64]) {
    for w in bounds.windows(2) {
        let staged = s.stage(flush(w[0], w[1])).await.unwrap();
        let (outcome, _) = s.commit(&staged).await.unwrap();
        assert!(matches!(outcome, CommitOutcome::Committed { .. }));
    }
}

#[tokio::test]
async fn compaction_merges_published_files_and_keeps_every_row_once() {
    let store = Arc::new(InMemory::new());
    let s = compacting(&store, "w1", false, 2);
    commit_all(&s, &[0, 10, 25, 40, 41, 60]).await;
    assert_eq!(visible(&store).await.len(), 5);
    let report = s.compact_table().await.unwrap();
    assert_eq!((report.files_compacted, report.files_written), (5, 1));
    assert_eq!(
        visible(&store).await,
        vec!["t/compacted-00000000000000000001-0.parquet"]
    );
    assert_eq!(rows(&store).await, (0..60).collect::<Vec<_>>());
    let record = s.last_compaction("").await.unwrap().unwrap();
    assert_eq!((record.seq, record.sources.len()), (1, 5));
    assert_eq!(record.outputs[0].rows, 60);
    // Positions are the markers' and unchanged; the writer goes on after the compaction.
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(60)));
    commit_all(&s, &[60, 70]).await;
    // A compaction's output is merged again by the next one, with the files since.
    let again = s.compact_table().await.unwrap();
    assert_eq!((again.files_compacted, again.files_written), (2, 1));
    // A fresh process starts listing the chain at its hint, the last finished record.
    let hint = store
        .get(&Path::from("t/_lakesink/compactions/_last.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&hint[..], br#"{"seq":2}"#);
    let fresh = compacting(&store, "w2", false, 2);
    assert_eq!(fresh.last_compaction("").await.unwrap().unwrap().seq, 2);
    assert_eq!(rows(&store).await, (0..70).collect::<Vec<_>>());
    assert!(!paths(&store).await.iter().any(|p| p.contains("staging")));
}

#[tokio::test]
async fn files_of_different_schemas_are_merged_apart() {
    let store = Arc::new(InMemory::new());
    let s = compacting(&store, "w1", false, 2);
    commit_all(&s, &[0, 5, 10]).await;
    let wide = |start: i64, next: i64| {
        let mut f = flush(start, next);
        let b = &f.batches[0];
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, false),
            Field::new("w", DataType::Int64, true),
        ]));
        f.batches = vec![RecordBatch::try_new(
            schema,
            vec![
                b.column(0).clone(),
                Arc::new(Int64Array::new_null(b.num_rows())),
            ],
        )
        .unwrap()];
        f
    };
    for (a, b) in [(10, 15), (15, 20)] {
        let staged = s.stage(wide(a, b)).await.unwrap();
        s.commit(&staged).await.unwrap();
    }
    let report = s.compact_table().await.unwrap();
    assert_eq!((report.files_compacted, report.files_written), (4, 2));
    assert_eq!(rows(&store).await, (0..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn of_two_compactions_of_one_directory_only_one_commits() {
    let store = Arc::new(InMemory::new());
    let first = compacting(&store, "first", false, 2);
    commit_all(&first, &[0, 10, 20, 30]).await;
    // `second` compacts the same files while `first` has staged its output, before its record.
    let second = Arc::new(compacting(&store, "second", false, 2));
    let once = Arc::new(AtomicBool::new(false));
    let hook = {
        let (second, once) = (second.clone(), once.clone());
        Arc::new(move |at: &'static str| {
            if at == "compaction_staged" && !once.swap(true, Ordering::SeqCst) {
                let second = second.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Runtime::new().unwrap();
                    let r = rt.block_on(second.compact_table()).unwrap();
                    assert_eq!(r.files_compacted, 3);
                })
                .join()
                .unwrap();
            }
        })
    };
    let first = compacting(&store, "first", false, 2).with_crash_hook(hook);
    let report = first.compact_table().await.unwrap();
    assert!(once.load(Ordering::SeqCst));
    assert_eq!((report.dropped, report.files_compacted), (1, 0));
    assert_eq!(rows(&store).await, (0..30).collect::<Vec<_>>());
    assert_eq!(visible(&store).await.len(), 1);
    // The loser's staged output is gone, and the winner's record is the chain's only one.
    assert!(!paths(&store).await.iter().any(|p| p.contains("staging")));
    let record = first.last_compaction("").await.unwrap().unwrap();
    assert_eq!((record.seq, record.writer.as_str()), (1, "second"));
}

#[tokio::test]
async fn a_compaction_interrupted_after_its_record_is_finished_by_the_next_writer() {
    let store = Arc::new(InMemory::new());
    let s = compacting(&store, "w1", false, 2);
    commit_all(&s, &[0, 10, 20, 30]).await;
    let killed = compacting(&store, "w1", false, 2).with_crash_hook(Arc::new(|at| {
        if at == "mid_compaction" {
            panic!("killed between the outputs and the sources");
        }
    }));
    let died = tokio::spawn(async move { killed.compact_table().await }).await;
    assert!(died.is_err(), "the compaction must have been killed");
    // A lister sees the rows twice until someone finishes the record.
    assert_eq!(rows(&store).await.len(), 60);
    // A restarted writer finishes it when it recovers a partition, before any commit.
    let restarted = compacting(&store, "w2", false, 100);
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(restarted.recover(&tp).await.unwrap(), Some(Offset(30)));
    assert_eq!(rows(&store).await, (0..30).collect::<Vec<_>>());
    assert!(
        !paths(&store).await.iter().any(|p| p.contains("_open")),
        "the intent is gone once finished"
    );
    // The next compaction goes on from the finished record.
    commit_all(&restarted, &[30, 35]).await;
    let report = restarted.compact_table().await.unwrap();
    assert_eq!(report.files_compacted, 2);
    assert_eq!(rows(&store).await, (0..35).collect::<Vec<_>>());
}

#[tokio::test]
async fn files_whose_marker_is_not_fully_published_are_not_taken() {
    let store = Arc::new(InMemory::new());
    let s = compacting(&store, "w1", false, 2);
    commit_all(&s, &[0, 10, 20, 30]).await;
    // Offsets 10..20 look interrupted mid-publish: their staged copy is back, so a recovery
    // would publish the file again after a compaction deleted it.
    let tp = TopicPartition::new("orders", 0);
    let marker = s.read_marker(&tp, Offset(10)).await.unwrap().unwrap();
    let root = Path::from("t");
    let f = &marker.files[0];
    store
        .copy(
            &Path::from(format!("{root}/{}", f.path)),
            &Path::from(format!("{root}/{}", f.staged)),
        )
        .await
        .unwrap();
    let report = s.compact_table().await.unwrap();
    assert_eq!(report.files_compacted, 2);
    assert!(visible(&store)
        .await
        .contains(&format!("{root}/{}", f.path)));
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(30)));
    assert_eq!(rows(&store).await, (0..30).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_writer_fenced_on_a_compacted_marker_goes_on_after_it() {
    let store = Arc::new(InMemory::new());
    let a = compacting(&store, "a", false, 2);
    commit_all(&a, &[0, 5, 10]).await;
    a.compact_table().await.unwrap();
    // A zombie that read from 0 commits late: fenced by a's marker, whose file a compaction
    // took; publishing the winner must not call the chain broken.
    let zombie = compacting(&store, "zombie", false, 2);
    let staged = zombie.stage(flush(0, 8)).await.unwrap();
    let (outcome, _) = zombie.commit(&staged).await.unwrap();
    assert_eq!(outcome, CommitOutcome::Fenced { next: Offset(5) });
    assert_eq!(rows(&store).await, (0..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn auto_compact_merges_in_the_background_once_enough_files_gathered() {
    let store = Arc::new(InMemory::new());
    let s = compacting(&store, "w1", true, 4);
    commit_all(&s, &[0, 1, 2, 3]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        visible(&store).await.len(),
        3,
        "3 files are below min_files"
    );
    commit_all(&s, &[3, 4]).await;
    for _ in 0..200 {
        if visible(&store).await.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(visible(&store).await.len(), 1);
    assert_eq!(rows(&store).await, (0..4).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_settled_sink_starts_no_compaction() {
    let store = Arc::new(InMemory::new());
    let s = compacting(&store, "w1", true, 2);
    s.settle(Duration::from_secs(1)).await;
    commit_all(&s, &[0, 1, 2, 3]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(visible(&store).await.len(), 3);
}

#[tokio::test]
async fn a_member_that_recovered_before_another_was_killed_finishes_its_compaction() {
    let store = Arc::new(InMemory::new());
    let tp = TopicPartition::new("orders", 0);
    let member = compacting(&store, "member", true, 100);
    assert_eq!(member.recover(&tp).await.unwrap(), None);
    let s = compacting(&store, "w1", false, 2);
    commit_all(&s, &[0, 10, 20, 30]).await;
    let killed = compacting(&store, "w1", false, 2).with_crash_hook(Arc::new(|at| {
        if at == "mid_compaction" {
            panic!("killed between the outputs and the sources");
        }
    }));
    assert!(tokio::spawn(async move { killed.compact_table().await })
        .await
        .is_err());
    assert_eq!(rows(&store).await.len(), 60);
    // The member recovered before the kill; it finishes the open compaction at shutdown.
    member.settle(Duration::from_secs(5)).await;
    assert_eq!(rows(&store).await, (0..30).collect::<Vec<_>>());
}
