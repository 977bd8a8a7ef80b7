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

fn batch(ids: std::ops::Range<i64>, with_note: bool) -> RecordBatch {
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
        truncate: false,
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

async fn count(dir: &std::path::Path) -> i64 {
    let out = query(dir, "SELECT count(*) AS n FROM t").await;
    out[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

async fn scalar(dir: &std::path::Path, sql: &str) -> i64 {
    let out = query(dir, sql).await;
    out[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

async fn table_version(dir: &std::path::Path) -> u64 {
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
async fn commit_together(s: &Arc<DeltaSink>, flushes: Vec<Flush>) -> Vec<CommitOutcome> {
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

pub(super) fn upsert_config() -> DeltaSinkConfig {
    DeltaSinkConfig {
        upsert: Some(UpsertConfig {
            keys: vec!["id".into()],
            delete_column: Some("_deleted".into()),
            unchanged_column: Some("_unchanged".into()),
        }),
        ..Default::default()
    }
}

/// Changes of `ids` named `n<id>`, none of them deletes.
pub(super) fn inserts(ids: impl Iterator<Item = i64> + Clone) -> RecordBatch {
    let n = ids.clone().count();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("_deleted", DataType::Boolean, true),
        ])),
        vec![
            Arc::new(Int64Array::from_iter_values(ids.clone())),
            Arc::new(StringArray::from_iter_values(ids.map(|i| format!("n{i}")))),
            Arc::new(BooleanArray::from(vec![false; n])),
        ],
    )
    .unwrap()
}

async fn table_files(s: &DeltaSink) -> std::collections::BTreeSet<String> {
    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    let table = slot.unwrap();
    let files = table
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .map(|f| f.path().to_string())
        .collect();
    files
}

#[tokio::test]
async fn upserts_rewrite_only_the_files_that_hold_a_changed_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), upsert_config());
    // Three files: even ids 0..=98, odd ids 1..=99, and 1000..=1009.
    commit(&s, flush(0, 0, 50, vec![inserts((0..100).step_by(2))])).await;
    commit(&s, flush(0, 50, 100, vec![inserts((1..100).step_by(2))])).await;
    let two = table_files(&s).await;
    commit(&s, flush(0, 100, 110, vec![inserts(1000..1010)])).await;
    let before = table_files(&s).await;
    assert_eq!(before.len(), 3, "{before:?}");
    // The 1000s file is ruled out by its statistics in the log, so it is not even opened: take
    // it away while the upsert runs.
    let thousands = dir.path().join(before.difference(&two).next().unwrap());
    let aside = dir.path().join("aside.parquet");
    std::fs::rename(&thousands, &aside).unwrap();

    // Update 4 (with a new column), delete 10, insert 500: only the even file holds a changed
    // key; the odd file's range admits 4 and 10, so its keys are read.
    let changes = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("_deleted", DataType::Boolean, true),
            Field::new("note", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(Int64Array::from(vec![4, 10, 500])),
            Arc::new(StringArray::from(vec!["x", "n10", "n500"])),
            Arc::new(BooleanArray::from(vec![false, true, false])),
            Arc::new(StringArray::from(vec![Some("changed"), None, Some("new")])),
        ],
    )
    .unwrap();
    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    let table = slot.unwrap();
    let config = s.config.upsert.clone().unwrap();
    let app_id = s.app_id(&TopicPartition::new("orders", 0));
    let outcome = super::rewrite::upsert(
        &s,
        &config,
        &table,
        &[changes],
        &[TopicPartition::new("orders", 0)],
        &[(app_id, 112)],
        false,
    )
    .await;
    let super::rewrite::Outcome::Done(_, m) = outcome.unwrap() else {
        panic!("an unpartitioned table is upserted by copy-on-write");
    };
    std::fs::rename(&aside, &thousands).unwrap();
    assert_eq!(
        (
            m.num_target_files_skipped_during_scan,
            m.num_target_files_scanned,
            m.num_target_files_removed
        ),
        (1, 2, 1)
    );
    assert_eq!(
        (
            m.num_target_rows_updated,
            m.num_target_rows_deleted,
            m.num_target_rows_inserted,
            m.num_target_rows_copied
        ),
        (1, 1, 1, 48)
    );

    let after = table_files(&s).await;
    let kept: Vec<_> = before.intersection(&after).collect();
    assert_eq!(kept.len(), 2, "the odd and the 1000s files stay: {after:?}");
    let out = query(
        dir.path(),
        "SELECT count(*), count(note), sum(id), \
         max(CASE WHEN id = 4 THEN name || '/' || note END), \
         max(CASE WHEN id = 500 THEN note END), \
         count(CASE WHEN id = 10 THEN 1 END) FROM t",
    )
    .await;
    let row = arrow::util::display::ArrayFormatter::try_new(
        out[0].column(0).as_ref(),
        &Default::default(),
    )
    .unwrap()
    .value(0)
    .to_string();
    assert_eq!(row, "110");
    let cell = |c: usize| {
        let col = arrow::compute::cast(out[0].column(c), &DataType::Utf8).unwrap();
        col.as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .value(0)
            .to_string()
    };
    let ids: i64 = (0..100).sum::<i64>() + (1000..1010).sum::<i64>() - 10 + 500;
    assert_eq!(
        (cell(1), cell(2), cell(3), cell(4), cell(5)),
        (
            "2".to_string(),
            ids.to_string(),
            "x/changed".to_string(),
            "new".to_string(),
            "0".to_string()
        )
    );
    assert_eq!(
        s.recover(&TopicPartition::new("orders", 0)).await.unwrap(),
        Some(Offset(113))
    );
}

#[tokio::test]
async fn partitioned_upserts_move_a_key_whose_partition_changed() {
    let dir = tempfile::tempdir().unwrap();
    let config = DeltaSinkConfig {
        partition_by: vec![PartitionSpec::parse("name").unwrap()],
        ..upsert_config()
    };
    let s = sink(dir.path(), config);
    commit(&s, flush(0, 0, 3, vec![inserts(0..3)])).await;
    assert_eq!(table_files(&s).await.len(), 3, "one file per name");
    // Delete 0, move 1 from partition n1 to n2; 2 stays.
    let changes = RecordBatch::try_new(
        inserts(0..2).schema(),
        vec![
            Arc::new(Int64Array::from(vec![0, 1])),
            Arc::new(StringArray::from(vec!["n0", "n2"])),
            Arc::new(BooleanArray::from(vec![true, false])),
        ],
    )
    .unwrap();
    commit(&s, flush(0, 3, 5, vec![changes])).await;
    let out = query(
        dir.path(),
        "SELECT id, name, count(*) OVER () FROM t ORDER BY id",
    )
    .await;
    let rows: Vec<String> = out
        .iter()
        .flat_map(|b| {
            let ids = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            let names = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
            use arrow::array::AsArray;
            let (ids, names) = (
                ids.as_string::<i32>().clone(),
                names.as_string::<i32>().clone(),
            );
            (0..b.num_rows())
                .map(move |i| format!("{}={}", ids.value(i), names.value(i)))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(rows, vec!["1=n2", "2=n2"]);
    let files = table_files(&s).await;
    assert!(
        files.iter().all(|f| f.starts_with("name=n2/")),
        "partitions n0 and n1 are empty now: {files:?}"
    );
}

/// Changes of `ids` with the given names (null and the string "null" among them).
fn named(ids: Vec<i64>, names: Vec<Option<&str>>) -> RecordBatch {
    let n = ids.len();
    RecordBatch::try_new(
        inserts(0..0).schema(),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(StringArray::from(names)),
            Arc::new(BooleanArray::from(vec![false; n])),
        ],
    )
    .unwrap()
}

#[tokio::test]
async fn an_upsert_writes_each_partition_once_with_its_rewritten_rows_and_changes() {
    let dir = tempfile::tempdir().unwrap();
    let config = DeltaSinkConfig {
        partition_by: vec![PartitionSpec::parse("name").unwrap()],
        ..upsert_config()
    };
    let s = sink(dir.path(), config);
    let first = named(
        vec![0, 1, 2, 3, 4, 5],
        vec![Some("a"), Some("a"), Some("b"), None, Some("null"), None],
    );
    commit(&s, flush(0, 0, 6, vec![first])).await;
    assert_eq!(table_files(&s).await.len(), 4);
    // Two batches of one flush: an update and an insert in `a`, an update in the null partition,
    // an insert in the string "null" partition (whose file is untouched), a new partition `c`.
    let changes = vec![
        named(vec![0, 7], vec![Some("a"), Some("null")]),
        named(vec![6, 3, 8], vec![Some("a"), None, Some("c")]),
    ];
    commit(&s, flush(0, 6, 11, changes)).await;
    let out = query(
        dir.path(),
        "SELECT id, coalesce(name, '<null>') FROM t ORDER BY id",
    )
    .await;
    let rows: Vec<String> = out
        .iter()
        .flat_map(|b| {
            use arrow::array::AsArray;
            let ids = b
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .clone();
            let names = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
            let names = names.as_string::<i32>().clone();
            (0..b.num_rows())
                .map(move |i| format!("{}={}", ids.value(i), names.value(i)))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        rows,
        vec!["0=a", "1=a", "2=b", "3=<null>", "4=null", "5=<null>", "6=a", "7=null", "8=c"]
    );
    let files = table_files(&s).await;
    let count = |dir: &str| files.iter().filter(|f| f.starts_with(dir)).count();
    // `a` and the null partition: their rewritten rows and their changes in one file each.
    assert_eq!(count("name=a/"), 1, "{files:?}");
    assert_eq!(count("name=__HIVE_DEFAULT_PARTITION__/"), 1, "{files:?}");
    assert_eq!(count("name=b/"), 1, "{files:?}");
    assert_eq!(count("name=c/"), 1, "{files:?}");
    // The untouched file of "null" and the insert's new one.
    assert_eq!(count("name=null/"), 2, "{files:?}");
    assert_eq!(files.len(), 6, "{files:?}");
}

#[tokio::test]
async fn tables_partitioned_by_a_key_are_upserted_by_deltalakes_merge() {
    let dir = tempfile::tempdir().unwrap();
    let config = DeltaSinkConfig {
        partition_by: vec![PartitionSpec::parse("id").unwrap()],
        ..upsert_config()
    };
    let s = sink(dir.path(), config);
    commit(&s, flush(0, 0, 3, vec![inserts(0..3)])).await;
    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    let table = slot.unwrap();
    let config = s.config.upsert.clone().unwrap();
    let outcome = super::rewrite::upsert(
        &s,
        &config,
        &table,
        &[inserts(1..2)],
        &[TopicPartition::new("orders", 0)],
        &[],
        false,
    )
    .await;
    assert!(matches!(
        outcome.unwrap(),
        super::rewrite::Outcome::Unsupported("a key column partitions the table")
    ));
    // The sink's commit still applies the changes, through deltalake's MERGE.
    let mut update = inserts(1..3);
    update = RecordBatch::try_new(
        update.schema(),
        vec![
            update.column(0).clone(),
            update.column(1).clone(),
            Arc::new(BooleanArray::from(vec![true, false])),
        ],
    )
    .unwrap();
    commit(&s, flush(0, 3, 5, vec![update])).await;
    let out = query(dir.path(), "SELECT count(*), sum(id) FROM t").await;
    let value = |c: usize| {
        let v = arrow::compute::cast(out[0].column(c), &DataType::Int64).unwrap();
        v.as_any().downcast_ref::<Int64Array>().unwrap().value(0)
    };
    assert_eq!((value(0), value(1)), (2, 2), "ids 0 and 2 are left");
}

#[tokio::test]
async fn files_written_before_the_key_column_existed_are_left_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let names = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("name", DataType::Utf8, true)])),
        vec![Arc::new(StringArray::from(vec!["old"]))],
    )
    .unwrap();
    commit(
        &sink(dir.path(), DeltaSinkConfig::default()),
        flush(1, 0, 1, vec![names]),
    )
    .await;
    let before = table_files(&sink(dir.path(), upsert_config())).await;
    let s = sink(dir.path(), upsert_config());
    commit(&s, flush(0, 0, 2, vec![inserts(0..2)])).await;
    commit(&s, flush(0, 2, 3, vec![inserts(1..2)])).await;
    let after = table_files(&s).await;
    assert!(after.is_superset(&before), "the keyless file stays");
    let out = query(dir.path(), "SELECT count(*), count(id), sum(id) FROM t").await;
    let value = |c: usize| {
        let v = arrow::compute::cast(out[0].column(c), &DataType::Int64).unwrap();
        v.as_any().downcast_ref::<Int64Array>().unwrap().value(0)
    };
    assert_eq!((value(0), value(1), value(2)), (3, 2, 1));
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
