//! Merge-on-read upserts (`upsert = "deletion-vectors"`) and purging their deletion vectors, on
//! real Delta tables in a temporary directory (deltalake's scan applies the vectors).

use std::sync::Arc;

use arrow::array::{BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use super::tests::{commit, flush, position, query, sink};
use super::tests_rewrite::{inserts, upsert_config};
use super::*;

fn dv_config() -> DeltaSinkConfig {
    DeltaSinkConfig {
        upsert_strategy: UpsertStrategy::DeletionVectors,
        ..upsert_config()
    }
}

/// Updates of `updated` (named `u<id>`) and deletes of `deleted`.
fn changes(updated: &[i64], deleted: &[i64]) -> RecordBatch {
    let ids: Vec<i64> = updated.iter().chain(deleted).copied().collect();
    let names: Vec<Option<String>> = updated
        .iter()
        .map(|i| Some(format!("u{i}")))
        .chain(deleted.iter().map(|_| None))
        .collect();
    let flags: Vec<bool> = updated
        .iter()
        .map(|_| false)
        .chain(deleted.iter().map(|_| true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("_deleted", DataType::Boolean, true),
        ])),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(StringArray::from(names)),
            Arc::new(BooleanArray::from(flags)),
        ],
    )
    .unwrap()
}

/// The table's rows, `id → name`, read by deltalake's scan (which applies deletion vectors).
async fn rows(dir: &std::path::Path) -> std::collections::BTreeMap<i64, String> {
    let mut out = std::collections::BTreeMap::new();
    for b in query(dir, "SELECT id, name FROM t").await {
        let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let names = arrow::compute::cast(b.column(1), &DataType::Utf8).unwrap();
        let names = names.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..b.num_rows() {
            let previous = out.insert(ids.value(i), names.value(i).to_string());
            assert!(previous.is_none(), "key {} twice", ids.value(i));
        }
    }
    out
}

/// The live files and how many rows their deletion vectors mark.
async fn files(s: &DeltaSink) -> Vec<(String, i64)> {
    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    let table = slot.unwrap();
    let out = table
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .map(|f| {
            (
                f.path().to_string(),
                f.deletion_vector_descriptor().map_or(0, |d| d.cardinality),
            )
        })
        .collect();
    out
}

#[tokio::test]
async fn upserts_mark_rows_in_deletion_vectors_and_leave_the_files_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), dv_config());
    commit(&s, flush(0, 0, 100, vec![inserts(0..100)])).await;
    let first = files(&s).await;
    assert_eq!(first.len(), 1);

    // Update 10, delete 5, insert 3: the file stays, 15 of its rows are marked, and one new
    // file holds the 13 rows written.
    let updated: Vec<i64> = (0..10).chain(200..203).collect();
    commit(
        &s,
        flush(0, 100, 101, vec![changes(&updated, &[50, 51, 52, 53, 54])]),
    )
    .await;
    let second = files(&s).await;
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(second.contains(&(first[0].0.clone(), 15)), "{second:?}");
    let expected = |r: &std::collections::BTreeMap<i64, String>| {
        assert_eq!(r.len(), 100 - 5 + 3);
        assert_eq!(r[&3], "u3");
        assert_eq!(r[&20], "n20");
        assert_eq!(r[&201], "u201");
        assert!(!r.contains_key(&52));
    };
    expected(&rows(dir.path()).await);

    // Changes again: 3 and 4 now live in the new file, 52 was deleted (re-inserted now), 201
    // lives in the new file. The first file's marks stay as they were; the new file gets 3.
    commit(&s, flush(0, 101, 102, vec![changes(&[3, 52, 201], &[4])])).await;
    let third = files(&s).await;
    assert!(third.contains(&(first[0].0.clone(), 15)), "{third:?}");
    assert!(third.iter().any(|(_, marked)| *marked == 3), "{third:?}");
    let r = rows(dir.path()).await;
    assert_eq!(r.len(), 100 - 5 + 3 - 1 + 1);
    assert_eq!(
        (r[&3].as_str(), r[&52].as_str(), r[&201].as_str()),
        ("u3", "u52", "u201")
    );
    assert!(!r.contains_key(&4));
    assert_eq!(position(dir.path(), 0).await, Some(Offset(102)));

    // Purging: the second file's vector marks 3 of its 13 rows (over a fifth), the first's 15
    // of 100 (under): only the second is rewritten, and the table reads the same.
    let mut slot = None;
    s.refresh(&mut slot).await.unwrap();
    // A target of one byte: no file is small, only deletion vectors are purged.
    let (_, done) = s
        .rewrite_small_and_marked(slot.as_ref().unwrap(), 1)
        .await
        .unwrap();
    let purged = done.purged;
    assert_eq!(purged, 1);
    let purged_once = files(&s).await;
    assert!(
        purged_once.contains(&(first[0].0.clone(), 15)),
        "{purged_once:?}"
    );
    assert_eq!(
        purged_once.iter().filter(|(_, marked)| *marked > 0).count(),
        1,
        "{purged_once:?}"
    );
    assert_eq!(rows(dir.path()).await, r);
    // Five more deletes reach a fifth: the file is rewritten without its marked rows, and the
    // table reads the same.
    commit(
        &s,
        flush(0, 102, 103, vec![changes(&[], &[90, 91, 92, 93, 94])]),
    )
    .await;
    let before = rows(dir.path()).await;
    let mut slot = None;
    s.refresh(&mut slot).await.unwrap();
    // A target of one byte: no file is small, only deletion vectors are purged.
    let (_, done) = s
        .rewrite_small_and_marked(slot.as_ref().unwrap(), 1)
        .await
        .unwrap();
    let purged = done.purged;
    assert_eq!(purged, 1);
    let after = files(&s).await;
    assert!(!after.iter().any(|(p, _)| *p == first[0].0), "{after:?}");
    assert_eq!(rows(dir.path()).await, before);
    assert_eq!(position(dir.path(), 0).await, Some(Offset(103)));
}

#[tokio::test]
async fn a_copy_on_write_table_gains_the_feature_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    commit(
        &sink(dir.path(), upsert_config()),
        flush(0, 0, 50, vec![inserts(0..50)]),
    )
    .await;
    let s = sink(dir.path(), dv_config());
    let mut slot = None;
    s.refresh(&mut slot).await.unwrap();
    assert!(!mor::has_deletion_vectors(slot.as_ref().unwrap()));
    commit(&s, flush(0, 50, 51, vec![changes(&[1, 2], &[3])])).await;
    let mut slot = None;
    s.refresh(&mut slot).await.unwrap();
    assert!(mor::has_deletion_vectors(slot.as_ref().unwrap()));
    let r = rows(dir.path()).await;
    assert_eq!(r.len(), 49);
    assert_eq!(r[&1], "u1");
    // A copy-on-write sink on it now goes by deletion vectors too.
    let cow = sink(dir.path(), upsert_config());
    commit(&cow, flush(0, 51, 52, vec![changes(&[5], &[6])])).await;
    let r = rows(dir.path()).await;
    assert_eq!(r.len(), 48);
    assert_eq!(r[&5], "u5");
    assert!(files(&cow).await.iter().any(|(_, marked)| *marked > 0));
}

#[tokio::test]
async fn a_change_reads_only_the_key_pages_that_may_hold_it() {
    let dir = tempfile::tempdir().unwrap();
    // Row groups of 5,000 rows, each of about five key pages.
    let config = DeltaSinkConfig {
        row_groups: crate::encode::RowGroups::rows(5_000),
        ..dv_config()
    };
    let s = sink(dir.path(), config.clone());
    // Written in reverse: the file is sorted by key all the same.
    commit(&s, flush(0, 0, 1, vec![inserts((0..20_000).rev())])).await;
    let changed = [0, 1023, 1024, 4999, 5000, 12_345, 19_999];
    let c = changes(&changed, &[]);

    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    let table = slot.unwrap();
    let store = table.log_store().object_store(None);
    let state = table.snapshot().unwrap();
    let file = state.log_data().iter().next().unwrap();
    let keys =
        super::keys::Keys::new(config.upsert.as_ref().unwrap(), std::slice::from_ref(&c)).unwrap();
    let scan = super::probe::key_scan(&store, &file, &keys)
        .await
        .unwrap()
        .expect("the file holds changed keys");
    let read: u64 = scan.ranges.iter().map(|r| r.1).sum();
    // Seven keys in at most seven pages of about 1,024 rows (a key on a page's edge admits one).
    assert!(
        read <= 7 * 1_100,
        "read {read} rows of 20,000 for 7 keys: {:?}",
        scan.ranges
    );
    for id in changed {
        assert!(
            scan.ranges
                .iter()
                .any(|&(at, n)| (at..at + n).contains(&(id as u64))),
            "the row of key {id} (row {id} of the sorted file) is not among {:?}",
            scan.ranges
        );
    }

    // The marks land on those rows: every other row reads as before.
    commit(&s, flush(0, 1, 2, vec![c])).await;
    let got = rows(dir.path()).await;
    assert_eq!(got.len(), 20_000);
    for (id, name) in &got {
        let want = if changed.contains(id) {
            format!("u{id}")
        } else {
            format!("n{id}")
        };
        assert_eq!(name, &want, "key {id}");
    }
    assert_eq!(position(dir.path(), 0).await, Some(Offset(2)));
}

#[tokio::test]
async fn a_compaction_is_carried_over_the_rows_an_upsert_marked_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), dv_config());
    for (i, ids) in [0..10, 10..20, 20..30].into_iter().enumerate() {
        let i = i as i64;
        commit(&s, flush(0, i, i + 1, vec![inserts(ids)])).await;
    }
    // The first file already has a vector (row 3) when the compaction reads the table.
    commit(&s, flush(0, 3, 4, vec![changes(&[], &[3])])).await;
    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    let read = slot.unwrap();

    // Meanwhile an upsert marks rows of all three files: 7 (after the old mark: row 6 of the
    // compacted file), 15 and 25 (rows 14 and 24).
    commit(&s, flush(0, 4, 5, vec![changes(&[7, 15], &[25])])).await;
    let want = rows(dir.path()).await;
    assert_eq!(want.len(), 28);

    // The compaction of what it read commits on the newer state, the new marks carried over.
    let (_, done) = s
        .rewrite_small_and_marked(&read, 1 << 30)
        .await
        .expect("carried over the upsert's deletion vectors");
    assert_eq!((done.removed, done.written), (3, 1));
    assert_eq!(
        rows(dir.path()).await,
        want,
        "no row lost, none back from the dead"
    );
    let live = files(&s).await;
    assert_eq!(
        live.len(),
        2,
        "the compacted file and the upsert's: {live:?}"
    );
    assert!(live.iter().any(|(_, marked)| *marked == 3), "{live:?}");
    assert_eq!(position(dir.path(), 0).await, Some(Offset(5)));
}

/// The `id` column of data file `path` (relative to the table `dir`), in file order.
fn file_ids(dir: &std::path::Path, path: &str) -> Vec<i64> {
    let file = std::fs::File::open(dir.join(path)).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let c = b.column_by_name("id").unwrap();
        ids.extend(c.as_any().downcast_ref::<Int64Array>().unwrap().values());
    }
    ids
}

/// Three flushes of interleaved keys below `end` (0, 3, 6, ...; 1, 4, 7, ...; 2, 5, 8, ...),
/// each file sorted on its own.
async fn interleaved(s: &DeltaSink, end: i64) {
    for start in 0..3i64 {
        let ids = (start..end).step_by(3);
        commit(s, flush(0, start, start + 1, vec![inserts(ids)])).await;
    }
}

#[tokio::test]
async fn compaction_merges_an_upsert_tables_files_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), dv_config());
    interleaved(&s, 30).await;
    // Marks in two of the files (4 updated, 8 deleted) and a fourth file holding `u4`.
    commit(&s, flush(0, 3, 4, vec![changes(&[4], &[8])])).await;
    let want = rows(dir.path()).await;
    assert_eq!(want.len(), 29);

    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    let (_, done) = s
        .rewrite_small_and_marked(&slot.unwrap(), 1 << 30)
        .await
        .unwrap();
    assert_eq!((done.removed, done.written), (4, 1));
    assert_eq!(
        rows(dir.path()).await,
        want,
        "the same rows after compaction"
    );
    let live = files(&s).await;
    assert_eq!(live.len(), 1, "{live:?}");
    // One run in key order, not the four files one after another.
    let ids = file_ids(dir.path(), &live[0].0);
    let sorted: Vec<i64> = (0..30).filter(|&i| i != 8).collect();
    assert_eq!(ids, sorted);
}

#[tokio::test]
async fn a_merged_compaction_is_carried_over_the_rows_an_upsert_marked_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), dv_config());
    interleaved(&s, 30).await;
    // The second file (1, 4, 7, ...) has a vector (row 1: key 4) when the compaction reads.
    commit(&s, flush(0, 3, 4, vec![changes(&[], &[4])])).await;
    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    let read = slot.unwrap();

    // Meanwhile an upsert marks keys of all three files: in the merged run 0, 1, 2, 3, 5, 6,
    // 7, ... key 7 is row 6, key 13 row 12 and key 20 row 19.
    commit(&s, flush(0, 4, 5, vec![changes(&[7, 13], &[20])])).await;
    let want = rows(dir.path()).await;
    assert_eq!(want.len(), 28);

    let (_, done) = s
        .rewrite_small_and_marked(&read, 1 << 30)
        .await
        .expect("carried over the upsert's deletion vectors");
    assert_eq!((done.removed, done.written), (3, 1));
    assert_eq!(
        rows(dir.path()).await,
        want,
        "no row lost, none back from the dead"
    );
    let live = files(&s).await;
    assert_eq!(
        live.len(),
        2,
        "the compacted file and the upsert's: {live:?}"
    );
    let (merged, marked) = live
        .iter()
        .find(|(_, marked)| *marked > 0)
        .expect("the compacted file carries the marks");
    assert_eq!(*marked, 3);
    let ids = file_ids(dir.path(), merged);
    assert_eq!(ids, (0..30).filter(|&i| i != 4).collect::<Vec<i64>>());
}

#[tokio::test]
async fn a_merge_reads_each_file_a_batch_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), dv_config());
    // 20,000 rows per file: each file is merged in several batches.
    interleaved(&s, 60_000).await;
    commit(
        &s,
        flush(0, 3, 4, vec![changes(&[9_000, 30_001], &[45_002])]),
    )
    .await;
    let want = rows(dir.path()).await;
    assert_eq!(want.len(), 59_999);
    let mut slot = None;
    assert!(s.refresh(&mut slot).await.unwrap());
    s.rewrite_small_and_marked(&slot.unwrap(), 1 << 30)
        .await
        .unwrap();
    assert_eq!(rows(dir.path()).await, want);
    let live = files(&s).await;
    assert_eq!(live.len(), 1, "{live:?}");
    let ids = file_ids(dir.path(), &live[0].0);
    assert_eq!(
        ids,
        (0..60_000).filter(|&i| i != 45_002).collect::<Vec<i64>>()
    );
}
