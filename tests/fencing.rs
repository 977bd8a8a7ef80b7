//! Fencing on real object stores: writers that commit flushes starting at the same offset race
//! on the conditional marker create; exactly one wins and the losers' files never become
//! visible (moto's and Azurite's `If-None-Match: *` are atomic).

mod common;

use std::sync::Arc;

use arrow::array::{Int32Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use common::*;
use sinks::parquet::{ParquetSink, ParquetSinkConfig};
use sinks::{CommitOutcome, Flush, Offset, Sink, TopicPartition};

const WRITERS: usize = 8;

fn flush(writer: &str, start: i64, next: i64) -> Flush {
    let schema = Arc::new(Schema::new(vec![
        Field::new("writer", DataType::Utf8, false),
        Field::new("_kafka_partition", DataType::Int32, false),
        Field::new("_kafka_offset", DataType::Int64, false),
    ]));
    let n = (next - start) as usize;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec![writer; n])),
            Arc::new(Int32Array::from(vec![0; n])),
            Arc::new(Int64Array::from_iter_values(start..next)),
        ],
    )
    .unwrap();
    Flush {
        tp: TopicPartition::new("fence", 0),
        start: Offset(start),
        next: Offset(next),
        batches: vec![batch],
        packed: Vec::new(),
        truncate: false,
        tick: None,
    }
}

async fn race(store: Store) {
    let writers: Vec<Arc<ParquetSink>> = (0..WRITERS)
        .map(|i| {
            Arc::new(ParquetSink::new(
                store.table_store(),
                ParquetSinkConfig {
                    writer_id: format!("w{i}"),
                    ..Default::default()
                },
            ))
        })
        .collect();
    // Every writer stages a different flush that starts at offset 0.
    let mut staged = Vec::new();
    for (i, w) in writers.iter().enumerate() {
        staged.push(
            w.stage(flush(&format!("w{i}"), 0, 10 + i as i64))
                .await
                .unwrap(),
        );
    }
    let results = futures::future::join_all(
        writers
            .iter()
            .zip(&staged)
            .map(|(w, s)| async move { w.commit(s).await.unwrap().0 }),
    )
    .await;
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, CommitOutcome::Committed { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one writer must win: {results:?}");
    let win = winners[0];
    let win_next = 10 + win as i64;
    for (i, r) in results.iter().enumerate() {
        if i != win {
            assert_eq!(
                r,
                &CommitOutcome::Fenced {
                    next: Offset(win_next)
                },
                "writer {i}"
            );
        }
    }
    // A stale writer that lost keeps being rejected at the same start.
    let loser = (win + 1) % WRITERS;
    assert!(matches!(
        writers[loser].commit(&staged[loser]).await.unwrap().0,
        CommitOutcome::Fenced { .. }
    ));
    // The recovered position is the winner's end; the next flush chains on.
    let tp = TopicPartition::new("fence", 0);
    assert_eq!(
        writers[loser].recover(&tp).await.unwrap(),
        Some(Offset(win_next))
    );

    // Independent readers see exactly the winner's rows.
    let table = store.read();
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len() as i64, win_next, "{table}");
    let who = format!("w{win}");
    for r in rows {
        assert_eq!(
            r["writer"].as_str(),
            Some(who.as_str()),
            "a loser's row is visible: {r}"
        );
    }
    let files = table["files"].as_array().unwrap();
    let staged_left: Vec<_> = files
        .iter()
        .filter(|f| f.as_str().unwrap().contains("staging"))
        .collect();
    assert!(
        staged_left.is_empty(),
        "losers' staged files were not cleaned up: {staged_left:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_winner_on_moto_s3() {
    race(Store::s3("fence")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_winner_on_azurite() {
    race(Store::azure("fence")).await;
}
