//! Delta protocol tests on real Delta tables in a temporary directory (deltalake reads back what
//! we wrote; the Python `deltalake` reader checks the same tables in `tests/delta.rs`).

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::array::{BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::DeltaTableBuilder;

use super::*;
use crate::upsert::UpsertConfig;

pub(super) fn sink(dir: &std::path::Path, config: DeltaSinkConfig) -> DeltaSink {
    let url = Url::from_directory_path(dir).unwrap();
    DeltaSink::new(url.as_str(), Vec::<(String, String)>::new(), config).unwrap()
}

pub(super) fn batch(ids: std::ops::Range<i64>, with_note: bool) -> RecordBatch {
    let mut fields = vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(ids.clone())),
        Arc::new(StringArray::from_iter_values(
            ids.clone().map(|i| format!("n{i}")),
        )),
    ];
    if with_note {
        fields.push(Field::new("note", DataType::Utf8, true));
        cols.push(Arc::new(StringArray::from_iter_values(
            ids.map(|i| format!("note{i}")),
        )));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

pub(super) fn flush(p: i32, start: i64, next: i64, batches: Vec<RecordBatch>) -> Flush {
    Flush {
        tp: TopicPartition::new("orders", p),
        start: Offset(start),
        next: Offset(next),
        batches,
        packed: Vec::new(),
        truncate: false,
        tick: None,
    }
}

pub(super) async fn commit(s: &DeltaSink, f: Flush) -> CommitOutcome {
    let staged = s.stage(f).await.unwrap();
    s.commit(&staged).await.unwrap().0
}

pub(super) async fn query(dir: &std::path::Path, sql: &str) -> Vec<RecordBatch> {
    let url = Url::from_directory_path(dir).unwrap();
    let mut table = DeltaTableBuilder::from_url(url).unwrap().build().unwrap();
    table.load().await.unwrap();
    let ctx = SessionContext::new();
    ctx.register_table("t", table.table_provider().await.unwrap())
        .unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

pub(super) async fn count(dir: &std::path::Path) -> i64 {
    let out = query(dir, "SELECT count(*) AS n FROM t").await;
    out[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

pub(super) async fn scalar(dir: &std::path::Path, sql: &str) -> i64 {
    let out = query(dir, sql).await;
    out[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

pub(super) async fn table_version(dir: &std::path::Path) -> u64 {
    let url = Url::from_directory_path(dir).unwrap();
    let mut t = DeltaTableBuilder::from_url(url).unwrap().build().unwrap();
    t.load().await.unwrap();
    t.version().unwrap()
}

/// The committed position of partition `p`, read by a fresh sink.
pub(super) async fn position(dir: &std::path::Path, p: i32) -> Option<Offset> {
    sink(dir, DeltaSinkConfig::default())
        .recover(&TopicPartition::new("orders", p))
        .await
        .unwrap()
}

/// Stages `flushes`, holds the table until all of them wait for it, then lets one lead: the
/// outcomes, in the order given.
pub(super) async fn commit_together(s: &Arc<DeltaSink>, flushes: Vec<Flush>) -> Vec<CommitOutcome> {
    let mut staged = Vec::new();
    for f in flushes {
        staged.push(s.stage(f).await.unwrap());
    }
    let n = staged.len();
    let guard = s.table.lock().await;
    let mut tasks = Vec::new();
    for st in staged {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.commit(&st).await.unwrap().0 }));
    }
    while s.pending.lock().unwrap().len() < n {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(guard);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn appends_record_positions_and_fence_zombies() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), DeltaSinkConfig::default());
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(s.recover(&tp).await.unwrap(), None);
    assert_eq!(
        commit(&s, flush(0, 0, 10, vec![batch(0..10, false)])).await,
        CommitOutcome::Committed { next: Offset(10) }
    );
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(10)));

    // A zombie that still believes it owns the partition from offset 0 is fenced, and told
    // where the owner got to; its data never becomes visible.
    let zombie = sink(dir.path(), DeltaSinkConfig::default());
    assert_eq!(
        commit(&zombie, flush(0, 0, 5, vec![batch(100..105, false)])).await,
        CommitOutcome::Fenced { next: Offset(10) }
    );
    // The owner continues; a retried commit of its own last flush is recognised.
    let staged = s
        .stage(flush(0, 10, 20, vec![batch(10..20, false)]))
        .await
        .unwrap();
    assert_eq!(
        s.commit(&staged).await.unwrap().0,
        CommitOutcome::Committed { next: Offset(20) }
    );
    assert_eq!(
        s.commit(&staged).await.unwrap().0,
        CommitOutcome::AlreadyCommitted { next: Offset(20) }
    );
    assert_eq!(count(dir.path()).await, 20);
    // Another partition's position is independent.
    assert_eq!(
        s.recover(&TopicPartition::new("orders", 1)).await.unwrap(),
        None
    );
}

/// A table written by an earlier version (app ids `lakesink/<group>/<topic>/<p>`) resumes where
/// it was, and its next commit moves the position to the group-free app id.
#[tokio::test]
async fn a_table_of_the_group_keyed_app_ids_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let old = sink(
        dir.path(),
        DeltaSinkConfig {
            app_id_prefix: "lakesink/blue".into(),
            ..Default::default()
        },
    );
    let tp = TopicPartition::new("orders", 0);
    commit(&old, flush(0, 0, 10, vec![batch(0..10, false)])).await;
    let new = || {
        sink(
            dir.path(),
            DeltaSinkConfig {
                legacy_app_id_prefix: Some("lakesink/blue".into()),
                ..Default::default()
            },
        )
    };
    assert_eq!(new().recover(&tp).await.unwrap(), Some(Offset(10)));
    assert_eq!(
        commit(&new(), flush(0, 0, 10, vec![batch(0..10, false)])).await,
        CommitOutcome::AlreadyCommitted { next: Offset(10) }
    );
    assert_eq!(
        commit(&new(), flush(0, 10, 20, vec![batch(10..20, false)])).await,
        CommitOutcome::Committed { next: Offset(20) }
    );
    // Another group's deployment (no legacy id of its own) reads the same position.
    assert_eq!(
        sink(dir.path(), DeltaSinkConfig::default())
            .recover(&tp)
            .await
            .unwrap(),
        Some(Offset(20))
    );
    assert_eq!(count(dir.path()).await, 20);
}

#[tokio::test]
async fn concurrent_writers_of_different_partitions_all_commit() {
    let dir = tempfile::tempdir().unwrap();
    // Create the table first so the race is about appends, not creation.
    let first = sink(dir.path(), DeltaSinkConfig::default());
    commit(&first, flush(9, 0, 1, vec![batch(0..1, false)])).await;
    let mut tasks = Vec::new();
    for p in 0..4 {
        let s = Arc::new(sink(dir.path(), DeltaSinkConfig::default()));
        tasks.push(tokio::spawn(async move {
            for i in 0..5i64 {
                let out = commit(
                    &s,
                    flush(
                        p,
                        i * 10,
                        i * 10 + 10,
                        vec![batch(i * 10..i * 10 + 10, false)],
                    ),
                )
                .await;
                assert_eq!(
                    out,
                    CommitOutcome::Committed {
                        next: Offset(i * 10 + 10)
                    }
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(dir.path()).await, 1 + 4 * 50);
    for p in 0..4 {
        assert_eq!(
            first
                .recover(&TopicPartition::new("orders", p))
                .await
                .unwrap(),
            Some(Offset(50))
        );
    }
}

#[tokio::test]
async fn evolves_the_schema_in_the_data_commit_and_partitions_by_day() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), DeltaSinkConfig::default());
    commit(&s, flush(0, 0, 3, vec![batch(0..3, false)])).await;
    let versions_before = {
        let mut t = s.builder().unwrap().build().unwrap();
        t.load().await.unwrap();
        t.version().unwrap()
    };
    commit(&s, flush(0, 3, 6, vec![batch(3..6, true)])).await;
    let mut t = s.builder().unwrap().build().unwrap();
    t.load().await.unwrap();
    assert_eq!(
        t.version().unwrap(),
        versions_before + 1,
        "one commit for data + schema"
    );
    let schema = t.snapshot().unwrap().snapshot().arrow_schema();
    assert!(schema.field_with_name("note").unwrap().is_nullable());
    let out = query(dir.path(), "SELECT count(note) AS n FROM t").await;
    assert_eq!(
        out[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0),
        3
    );

    // A type change that is not additive is refused with the column named.
    let bad = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(vec!["x"]))],
    )
    .unwrap();
    let e = s.stage(flush(0, 6, 7, vec![bad])).await.unwrap_err();
    assert!(e.to_string().contains("`id`"), "{e}");
}

#[tokio::test]
async fn upserts_keep_the_last_change_and_apply_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let config = DeltaSinkConfig {
        upsert: Some(UpsertConfig {
            keys: vec!["id".into()],
            keys_from: None,
            delete_column: Some("_deleted".into()),
            unchanged_column: Some("_unchanged".into()),
        }),
        ..Default::default()
    };
    let s = sink(dir.path(), config);
    let changes = |ids: Vec<i64>, names: Vec<&str>, deleted: Vec<bool>| {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
                Field::new("_deleted", DataType::Boolean, false),
            ])),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(names)),
                Arc::new(BooleanArray::from(deleted)),
            ],
        )
        .unwrap()
    };
    commit(
        &s,
        flush(
            0,
            0,
            4,
            vec![changes(
                vec![1, 2, 3, 1],
                vec!["a", "b", "c", "a2"],
                vec![false; 4],
            )],
        ),
    )
    .await;
    commit(
        &s,
        flush(
            0,
            4,
            7,
            vec![changes(
                vec![2, 3, 4],
                vec!["b", "c2", "d"],
                vec![true, false, false],
            )],
        ),
    )
    .await;
    let out = query(dir.path(), "SELECT id, name FROM t ORDER BY id").await;
    let rows: Vec<(i64, String)> = out
        .iter()
        .flat_map(|b| {
            let ids = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone();
            let names = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
            let names = names
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            (0..b.num_rows())
                .map(move |i| (ids.value(i), names.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        rows,
        vec![(1, "a2".into()), (3, "c2".into()), (4, "d".into())]
    );
    assert_eq!(
        s.recover(&TopicPartition::new("orders", 0)).await.unwrap(),
        Some(Offset(7))
    );
}

#[tokio::test]
async fn expired_log_entries_go_when_a_checkpoint_is_written() {
    let log_json = |dir: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("_delta_log"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json") && !n.starts_with('_'))
            .collect();
        v.sort();
        v
    };
    let dir = tempfile::tempdir().unwrap();
    let config = DeltaSinkConfig {
        checkpoint_interval: 3,
        table_properties: [(
            "delta.logRetentionDuration".to_string(),
            "interval 0 seconds".to_string(),
        )]
        .into(),
        ..DeltaSinkConfig::default()
    };
    let s = sink(dir.path(), config);
    // Version 0 creates the table, version 1 holds the data: no checkpoint yet, nothing may go.
    commit(&s, flush(0, 0, 1, vec![batch(0..1, false)])).await;
    assert_eq!(log_json(dir.path()).len(), 2, "{:?}", log_json(dir.path()));
    // Version 2 writes the checkpoint (every 3 commits): the entries before it are past the
    // (zero) retention and go.
    commit(&s, flush(0, 1, 2, vec![batch(1..2, false)])).await;
    assert!(dir
        .path()
        .join(format!("_delta_log/{:020}.checkpoint.parquet", 2))
        .exists());
    assert_eq!(log_json(dir.path()), vec![format!("{:020}.json", 2)]);
    commit(&s, flush(0, 2, 3, vec![batch(2..3, false)])).await;
    // The table still reads whole from the checkpoint, and the position is intact.
    commit(&s, flush(0, 3, 4, vec![batch(3..4, false)])).await;
    assert_eq!(count(dir.path()).await, 4);
    assert_eq!(position(dir.path(), 0).await, Some(Offset(4)));
}

#[tokio::test]
async fn waiting_appends_commit_as_one_group_and_each_is_fenced_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(sink(dir.path(), DeltaSinkConfig::default()));
    commit(&s, flush(0, 0, 10, vec![batch(0..10, false)])).await;
    let before = table_version(dir.path()).await;
    // A zombie's flush of partition 0 from an old position, two new partitions, one of which
    // adds a column.
    let outcomes = commit_together(
        &s,
        vec![
            flush(0, 0, 5, vec![batch(100..105, false)]),
            flush(1, 0, 10, vec![batch(10..20, false)]),
            flush(2, 0, 10, vec![batch(20..30, true)]),
        ],
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            CommitOutcome::Fenced { next: Offset(10) },
            CommitOutcome::Committed { next: Offset(10) },
            CommitOutcome::Committed { next: Offset(10) },
        ]
    );
    assert_eq!(table_version(dir.path()).await, before + 1, "one log entry");
    assert_eq!(count(dir.path()).await, 30);
    assert_eq!(
        scalar(dir.path(), "SELECT count(note) AS n FROM t").await,
        10
    );
    for p in 0..3 {
        assert_eq!(position(dir.path(), p).await, Some(Offset(10)));
    }
}

#[tokio::test]
async fn waiting_upserts_merge_as_one_group_unless_their_keys_meet() {
    let dir = tempfile::tempdir().unwrap();
    let config = DeltaSinkConfig {
        upsert: Some(UpsertConfig {
            keys: vec!["id".into()],
            keys_from: None,
            delete_column: None,
            unchanged_column: None,
        }),
        ..DeltaSinkConfig::default()
    };
    let s = Arc::new(sink(dir.path(), config));
    commit(&s, flush(0, 0, 10, vec![batch(0..10, false)])).await;
    // A zombie of partition 0, and partitions 1 and 2 updating 5..10 and inserting 10..20.
    let before = table_version(dir.path()).await;
    let out = commit_together(
        &s,
        vec![
            flush(0, 0, 5, vec![batch(0..5, false)]),
            flush(1, 0, 5, vec![batch(5..10, false)]),
            flush(2, 0, 10, vec![batch(10..20, false)]),
        ],
    )
    .await;
    assert_eq!(
        out,
        vec![
            CommitOutcome::Fenced { next: Offset(10) },
            CommitOutcome::Committed { next: Offset(5) },
            CommitOutcome::Committed { next: Offset(10) },
        ]
    );
    assert_eq!(table_version(dir.path()).await, before + 1, "one MERGE");
    assert_eq!(count(dir.path()).await, 20);
    // The same key changed in two partitions: no single MERGE may apply both; each merges alone.
    let before = table_version(dir.path()).await;
    let out = commit_together(
        &s,
        vec![
            flush(1, 5, 6, vec![batch(3..4, false)]),
            flush(2, 10, 11, vec![batch(3..4, false)]),
        ],
    )
    .await;
    assert!(out
        .iter()
        .all(|o| matches!(o, CommitOutcome::Committed { .. })));
    assert_eq!(table_version(dir.path()).await, before + 2, "two MERGEs");
    assert_eq!(count(dir.path()).await, 20);
    for (p, next) in [(0, 10), (1, 6), (2, 11)] {
        assert_eq!(position(dir.path(), p).await, Some(Offset(next)));
    }
}

/// The hash join's build side (held in memory whole) in a MERGE-shaped plan: a full join of a
/// source with a target whose statistics say it is the smaller side.
async fn build_side(state: deltalake::datafusion::execution::context::SessionState) -> String {
    use deltalake::datafusion::physical_plan::joins::HashJoinExec;
    use deltalake::datafusion::physical_plan::ExecutionPlan;
    use deltalake::datafusion::prelude::{col, JoinType};
    let ctx = SessionContext::new_with_state(state);
    let rows = |name: &str, n: i64| {
        let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    };
    let source = ctx.read_batch(rows("source_id", 10_000)).unwrap();
    let target = ctx.read_batch(rows("target_id", 10)).unwrap();
    let plan = source
        .join(
            target,
            JoinType::Full,
            &[],
            &[],
            Some(col("source_id").eq(col("target_id"))),
        )
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    fn find(p: &Arc<dyn ExecutionPlan>) -> Option<String> {
        if let Some(j) = p.downcast_ref::<HashJoinExec>() {
            return Some(j.left().schema().field(0).name().clone());
        }
        p.children().into_iter().find_map(find)
    }
    find(&plan).expect("a hash join")
}

#[tokio::test]
async fn merges_keep_the_changes_on_the_build_side_however_large_the_table() {
    let merge = upsert::merge_session().unwrap();
    assert_eq!(
        build_side(merge.as_ref().clone()).await,
        "source_id",
        "the MERGE session builds on the changes"
    );
    // DataFusion's default picks the side its statistics call smaller: here the target, which
    // in a MERGE is every row of the files the changes touch.
    assert_eq!(build_side(SessionContext::new().state()).await, "target_id");
}

#[tokio::test]
async fn runs_the_sink_contract() {
    let dir = tempfile::tempdir().unwrap();
    crate::testing::all("contract", |_| {
        let s = sink(dir.path(), DeltaSinkConfig::default());
        async move { s }
    })
    .await;
}
