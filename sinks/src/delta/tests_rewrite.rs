//! Upserts by copy-on-write (`rewrite.rs`) on real Delta tables in a temporary directory: only
//! the files holding a changed key are rewritten, partitions are written once, keys move between
//! partitions, and tables this path cannot rewrite exactly take deltalake's MERGE.

use std::sync::Arc;

use arrow::array::{BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use super::tests::{commit, flush, query, sink};
use super::*;
use crate::upsert::UpsertConfig;

pub(super) fn upsert_config() -> DeltaSinkConfig {
    DeltaSinkConfig {
        upsert: Some(UpsertConfig {
            keys: vec!["id".into()],
            keys_from: None,
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

/// Two writers (two members) upsert one table at once, on key ranges that overlap, with a key
/// column whose name needs quoting in SQL (`orderId`). The loser's read predicate is parsed by
/// deltalake's conflict checker against the winner's commit; it must parse, and the loser must
/// land after a retry (the exactly-once review's F10).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_upserts_on_a_camel_case_key_both_land() {
    let dir = tempfile::tempdir().unwrap();
    let config = || DeltaSinkConfig {
        upsert: Some(UpsertConfig {
            keys: vec!["orderId".into()],
            keys_from: None,
            delete_column: Some("_deleted".into()),
            unchanged_column: None,
        }),
        ..Default::default()
    };
    let changes = |ids: std::ops::Range<i64>, tag: &str| {
        let n = ids.clone().count();
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("orderId", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
                Field::new("_deleted", DataType::Boolean, true),
            ])),
            vec![
                Arc::new(Int64Array::from_iter_values(ids.clone())),
                Arc::new(StringArray::from_iter_values(
                    ids.map(|i| format!("{tag}{i}")),
                )),
                Arc::new(BooleanArray::from(vec![false; n])),
            ],
        )
        .unwrap()
    };
    let a = Arc::new(sink(dir.path(), config()));
    let b = Arc::new(sink(dir.path(), config()));
    assert_eq!(
        commit(&a, flush(0, 0, 100, vec![changes(0..100, "first")])).await,
        CommitOutcome::Committed { next: Offset(100) }
    );
    for round in 0..3i64 {
        // Both read the table before either commits: the second to commit meets the first's
        // commit in the conflict checker.
        let sa = a
            .stage(flush(
                0,
                100 + 50 * round,
                150 + 50 * round,
                vec![changes(0..50, "a")],
            ))
            .await
            .unwrap();
        let sb = b
            .stage(flush(
                1,
                50 * round,
                50 * round + 50,
                vec![changes(25..75, "b")],
            ))
            .await
            .unwrap();
        let retrying = |s: Arc<DeltaSink>, staged: crate::Staged<super::DeltaStaged>| async move {
            let mut attempt = 0;
            loop {
                match s.commit(&staged).await {
                    Ok((o, _)) => return o,
                    Err(e) if e.is_retryable() && attempt < 20 => attempt += 1,
                    Err(e) => panic!("round {round}: {e}"),
                }
            }
        };
        let (oa, ob) = tokio::join!(
            tokio::spawn(retrying(a.clone(), sa)),
            tokio::spawn(retrying(b.clone(), sb))
        );
        assert!(matches!(oa.unwrap(), CommitOutcome::Committed { .. }));
        assert!(matches!(ob.unwrap(), CommitOutcome::Committed { .. }));
    }
    let out = query(
        dir.path(),
        "SELECT count(*) AS n, count(DISTINCT \"orderId\") AS k FROM t",
    )
    .await;
    let n = out[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    let k = out[0]
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!((n, k), (100, 100), "one row per key");
}

/// The read predicate a copy-on-write upsert records for deltalake's conflict checker quotes a
/// key column whose name needs it, and parses back to the same column (F10 of the review: an
/// unquoted `orderId` would be read as `orderid` only when a concurrent winner exists).
#[test]
fn the_read_predicate_of_a_camel_case_key_parses_back() {
    let config = UpsertConfig {
        keys: vec!["orderId".into()],
        keys_from: None,
        delete_column: None,
        unchanged_column: None,
    };
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "orderId",
            DataType::Int64,
            false,
        )])),
        vec![Arc::new(Int64Array::from(vec![7, 3, 42]))],
    )
    .unwrap();
    let keys = super::rewrite::Keys::new(&config, std::slice::from_ref(&batch)).unwrap();
    let deltalake::protocol::DeltaOperation::Merge { predicate, .. } =
        super::rewrite::operation(&config, &keys, false)
    else {
        panic!("an upsert is a MERGE");
    };
    let predicate = predicate.expect("a key range");
    assert_eq!(predicate, "\"orderId\" BETWEEN 3 AND 42");
    let schema =
        deltalake::datafusion::common::DFSchema::try_from(batch.schema().as_ref().clone()).unwrap();
    let session = deltalake::datafusion::prelude::SessionContext::new();
    let parsed = deltalake::delta_datafusion::expr::parse_predicate_expression(
        &schema,
        &predicate,
        &session.state(),
    )
    .unwrap();
    assert!(parsed.to_string().contains("orderId"), "{parsed}");
}
