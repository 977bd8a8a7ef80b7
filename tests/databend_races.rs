//! Databend transactions that really overlap (the test server gives each transaction its own
//! engine session, and the engine's conflict detection decides at COMMIT, as a Databend server
//! does): two first commits of one partition, and many partitions committing at once from two
//! writers (two members). The exactly-once review's F3.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int32Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use common::databend::*;
use common::unique;
use sinks::databend::{DatabendSink, DatabendSinkConfig};
use sinks::{CommitOutcome, Flush, Offset, Sink, Staged, TopicPartition};

fn writer(database: &str) -> DatabendSink {
    DatabendSink::new(DatabendSinkConfig {
        client: client_config(database),
        // One sink name (the ledger's key) for every writer, as members of one group have.
        sink: "orders".into(),
        table: "orders".into(),
        upsert: None,
        tables: Default::default(),
        compression: Default::default(),
    })
    .unwrap()
}

fn flush(writer: i64, partition: i32, start: i64, next: i64) -> Flush {
    let schema = Arc::new(Schema::new(vec![
        Field::new("writer", DataType::Int64, false),
        Field::new("_kafka_partition", DataType::Int32, false),
        Field::new("_kafka_offset", DataType::Int64, false),
    ]));
    let n = (next - start) as usize;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![writer; n])),
            Arc::new(Int32Array::from(vec![partition; n])),
            Arc::new(Int64Array::from_iter_values(start..next)),
        ],
    )
    .unwrap();
    Flush {
        tp: TopicPartition::new("orders", partition),
        start: Offset(start),
        next: Offset(next),
        batches: vec![batch],
        packed: Vec::new(),
        truncate: false,
        tick: None,
    }
}

/// What the worker does: retries what the sink says is retryable.
async fn commit(
    s: &DatabendSink,
    staged: &Staged<sinks::databend::DatabendStaged>,
) -> CommitOutcome {
    let mut attempt = 0;
    loop {
        match s.commit(staged).await {
            Ok((o, _)) => return o,
            Err(e) if e.is_retryable() && attempt < 40 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 + rand::random::<u64>() % 80)).await;
            }
            Err(e) => panic!("commit of {}..{}: {e}", staged.start.0, staged.next.0),
        }
    }
}

async fn table_rows(database: &str, partition: i32) -> Vec<(i64, i64)> {
    let mut v: Vec<(i64, i64)> = rows(
        database,
        &format!("SELECT writer, _kafka_offset FROM \"{database}\".orders WHERE _kafka_partition = {partition}"),
    )
    .await
    .iter()
    .map(|r| {
        (
            r[0].as_deref().unwrap().parse().unwrap(),
            r[1].as_deref().unwrap().parse().unwrap(),
        )
    })
    .collect();
    v.sort_unstable();
    v
}

/// Two writers make the first commit of the same partitions at the same moment ([0, 10) and
/// [0, 15)): in each, exactly one wins, the other is fenced at the winner's end, the ledger
/// holds one row, and the table holds exactly the winner's rows.
#[tokio::test(flavor = "multi_thread")]
async fn two_first_commits_of_one_partition_race_and_one_wins() {
    let database = unique("race").replace('-', "_");
    let (a, b) = (writer(&database), writer(&database));
    for p in 0..4 {
        let sa = a.stage(flush(1, p, 0, 10)).await.unwrap();
        let sb = b.stage(flush(2, p, 0, 15)).await.unwrap();
        let (oa, ob) = tokio::join!(commit(&a, &sa), commit(&b, &sb));
        let (winner, next) = match (oa, ob) {
            (CommitOutcome::Committed { next }, CommitOutcome::Fenced { next: n }) if n == next => {
                (1, next.0)
            }
            (CommitOutcome::Fenced { next: n }, CommitOutcome::Committed { next }) if n == next => {
                (2, next.0)
            }
            other => panic!("partition {p}: exactly one writer must win: {other:?}"),
        };
        assert_eq!(
            table_rows(&database, p).await,
            (0..next).map(|o| (winner, o)).collect::<Vec<_>>(),
            "partition {p}: the winner's rows, once"
        );
        assert_eq!(
            rows(
                &database,
                &format!("SELECT next_offset FROM \"{database}\".lakesink_offsets WHERE \"partition\" = {p}")
            )
            .await,
            vec![vec![Some(next.to_string())]],
            "partition {p}: one ledger row"
        );
    }
}

/// Two writers (two members) commit eight partitions of one table at once, three flushes
/// each: transactions on one table conflict at COMMIT, and every one is retried until it lands.
#[tokio::test(flavor = "multi_thread")]
async fn many_partitions_committing_at_once_all_land_once() {
    let database = unique("many").replace('-', "_");
    let writers = [Arc::new(writer(&database)), Arc::new(writer(&database))];
    let mut tasks = Vec::new();
    for p in 0..8 {
        let w = writers[p as usize % 2].clone();
        tasks.push(tokio::spawn(async move {
            for (start, next) in [(0, 10), (10, 20), (20, 30)] {
                let staged = w.stage(flush(p as i64 % 2, p, start, next)).await.unwrap();
                assert_eq!(
                    commit(&w, &staged).await,
                    CommitOutcome::Committed { next: Offset(next) }
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for p in 0..8 {
        assert_eq!(
            table_rows(&database, p).await,
            (0..30).map(|o| (p as i64 % 2, o)).collect::<Vec<_>>()
        );
    }
    let positions = ledger(&database, "orders", "orders").await;
    assert_eq!(positions, (0..8).map(|p| (p, 30)).collect());
}
