//! Shared files: appends cut at one latency tick are written into one file per table partition
//! and committed in one log entry, each still fenced on its own txn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use super::tests::{count, position, scalar, sink, table_version};
use super::*;
use crate::Tick;

/// Rows `ids`, each in region `eu` or `us` by parity.
fn regional(ids: std::ops::Range<i64>) -> RecordBatch {
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("region", DataType::Utf8, true),
    ]);
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(ids.clone())),
        Arc::new(StringArray::from_iter_values(ids.map(|i| {
            if i % 2 == 0 {
                "eu"
            } else {
                "us"
            }
        }))),
    ];
    RecordBatch::try_new(Arc::new(schema), cols).unwrap()
}

fn ticked(p: i32, start: i64, next: i64, rows: RecordBatch, tick: Option<Tick>) -> Flush {
    Flush {
        tp: TopicPartition::new("orders", p),
        start: Offset(start),
        next: Offset(next),
        batches: vec![rows],
        packed: Vec::new(),
        truncate: false,
        tick,
    }
}

fn by_region() -> DeltaSinkConfig {
    DeltaSinkConfig {
        partition_by: vec![PartitionSpec::Field("region".into())],
        ..DeltaSinkConfig::default()
    }
}

/// The data files log entry `version` adds.
fn adds_in(dir: &std::path::Path, version: u64) -> usize {
    let entry = dir.join(format!("_delta_log/{version:020}.json"));
    std::fs::read_to_string(entry)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("{\"add\""))
        .count()
}

/// Stages and commits `flushes` concurrently, each starting `stagger` after the one before:
/// the outcomes and the files each commit reported, in the order given.
async fn commit_staggered(
    s: &Arc<DeltaSink>,
    flushes: Vec<Flush>,
    stagger: Duration,
) -> Vec<(CommitOutcome, usize)> {
    let mut tasks = Vec::new();
    for (i, f) in flushes.into_iter().enumerate() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(stagger * i as u32).await;
            let staged = s.stage(f).await.unwrap();
            let (outcome, stats) = s.commit(&staged).await.unwrap();
            (outcome, stats.files)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn flushes_of_one_tick_share_one_file_per_table_partition() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(sink(dir.path(), by_region()));
    // Partition 0 is at 10.
    let (first, _) = commit_staggered(
        &s,
        vec![ticked(0, 0, 10, regional(0..10), None)],
        Duration::ZERO,
    )
    .await
    .remove(0);
    assert_eq!(first, CommitOutcome::Committed { next: Offset(10) });
    let before = table_version(dir.path()).await;

    // One tick: a zombie of partition 0 replaying an old range, and partitions 1 to 5, arriving
    // 40 ms apart, all within the tick's gather window.
    let tick = Tick {
        at_ms: 0,
        gather_until: Instant::now() + Duration::from_millis(600),
    };
    let mut flushes = vec![ticked(0, 0, 5, regional(1000..1005), Some(tick))];
    for p in 1..=5 {
        let base = i64::from(p) * 100;
        flushes.push(ticked(p, 0, 20, regional(base..base + 20), Some(tick)));
    }
    let outcomes = commit_staggered(&s, flushes, Duration::from_millis(40)).await;
    assert_eq!(outcomes[0].0, CommitOutcome::Fenced { next: Offset(10) });
    for (outcome, _) in &outcomes[1..] {
        assert_eq!(*outcome, CommitOutcome::Committed { next: Offset(20) });
    }
    assert_eq!(table_version(dir.path()).await, before + 1, "one log entry");
    assert_eq!(adds_in(dir.path(), before + 1), 2, "one file per region");
    let reported: usize = outcomes.iter().map(|(_, files)| files).sum();
    assert_eq!(reported, 2, "the shared files are counted once");
    // Every committed row once, and none of the fenced zombie's.
    assert_eq!(count(dir.path()).await, 10 + 5 * 20);
    assert_eq!(
        scalar(dir.path(), "SELECT count(*) FROM t WHERE id >= 1000").await,
        0
    );
    assert_eq!(
        scalar(dir.path(), "SELECT count(DISTINCT id) FROM t").await,
        110
    );
    assert_eq!(position(dir.path(), 0).await, Some(Offset(10)));
    for p in 1..=5 {
        assert_eq!(position(dir.path(), p).await, Some(Offset(20)));
    }
}

#[tokio::test]
async fn a_tick_flush_alone_or_with_shared_files_off_writes_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(sink(dir.path(), by_region()));
    let tick = || {
        Some(Tick {
            at_ms: 0,
            gather_until: Instant::now() + Duration::from_millis(50),
        })
    };
    // Alone at its tick (the first one also creates the table).
    for start in [0i64, 10] {
        let out = commit_staggered(
            &s,
            vec![ticked(
                0,
                start,
                start + 10,
                regional(start..start + 10),
                tick(),
            )],
            Duration::ZERO,
        )
        .await;
        assert_eq!(
            out[0],
            (
                CommitOutcome::Committed {
                    next: Offset(start + 10)
                },
                2
            )
        );
        assert_eq!(adds_in(dir.path(), table_version(dir.path()).await), 2);
    }
    // With shared files off, two partitions of one tick write a file each per region.
    let off = Arc::new(sink(
        dir.path(),
        DeltaSinkConfig {
            shared_files: false,
            ..by_region()
        },
    ));
    let out = commit_staggered(
        &off,
        vec![
            ticked(1, 0, 10, regional(100..110), tick()),
            ticked(2, 0, 10, regional(200..210), tick()),
        ],
        Duration::ZERO,
    )
    .await;
    assert_eq!(out.iter().map(|(_, f)| f).sum::<usize>(), 4);
    assert_eq!(count(dir.path()).await, 40);
}

#[tokio::test]
async fn the_first_tick_of_a_new_table_is_one_entry() {
    // No table yet: the tick's group creates it, with the columns every member needs, and
    // commits all of them in the entry after the creation, into one file per region.
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(sink(dir.path(), by_region()));
    let tick = Tick {
        at_ms: 0,
        gather_until: Instant::now() + Duration::from_millis(400),
    };
    let mut flushes: Vec<Flush> = (0..4)
        .map(|p| {
            let base = i64::from(p) * 100;
            ticked(p, 0, 10, regional(base..base + 10), Some(tick))
        })
        .collect();
    // One member carries a column the others lack.
    let wide = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("region", DataType::Utf8, true),
        Field::new("note", DataType::Utf8, true),
    ]);
    flushes[2].batches = vec![RecordBatch::try_new(
        Arc::new(wide),
        vec![
            Arc::new(Int64Array::from_iter_values(200..210)),
            Arc::new(StringArray::from_iter_values((200..210).map(|i| {
                if i % 2 == 0 {
                    "eu"
                } else {
                    "us"
                }
            }))),
            Arc::new(StringArray::from_iter_values(
                (200..210).map(|i| format!("n{i}")),
            )),
        ],
    )
    .unwrap()];
    let outcomes = commit_staggered(&s, flushes, Duration::from_millis(30)).await;
    for (outcome, _) in &outcomes {
        assert_eq!(*outcome, CommitOutcome::Committed { next: Offset(10) });
    }
    assert_eq!(
        table_version(dir.path()).await,
        1,
        "the creation, then one entry"
    );
    assert_eq!(adds_in(dir.path(), 1), 2, "one file per region");
    assert_eq!(count(dir.path()).await, 40);
    assert_eq!(scalar(dir.path(), "SELECT count(note) FROM t").await, 10);
    for p in 0..4 {
        assert_eq!(position(dir.path(), p).await, Some(Offset(10)));
    }
}

#[tokio::test]
async fn the_first_tick_of_a_new_upsert_table_is_one_merge() {
    let dir = tempfile::tempdir().unwrap();
    let config = DeltaSinkConfig {
        upsert: Some(crate::upsert::UpsertConfig {
            keys: vec!["id".into()],
            keys_from: None,
            delete_column: None,
            unchanged_column: None,
        }),
        ..by_region()
    };
    let s = Arc::new(sink(dir.path(), config));
    let tick = Tick {
        at_ms: 0,
        gather_until: Instant::now() + Duration::from_millis(300),
    };
    let flushes = (0..3)
        .map(|p| {
            let base = i64::from(p) * 100;
            ticked(p, 0, 10, regional(base..base + 10), Some(tick))
        })
        .collect();
    let outcomes = commit_staggered(&s, flushes, Duration::from_millis(20)).await;
    for (outcome, _) in &outcomes {
        assert_eq!(*outcome, CommitOutcome::Committed { next: Offset(10) });
    }
    assert_eq!(
        table_version(dir.path()).await,
        1,
        "the creation, then one merge"
    );
    assert_eq!(count(dir.path()).await, 30);
}

#[tokio::test]
async fn row_groups_follow_the_configured_rows() {
    let dir = tempfile::tempdir().unwrap();
    let s = sectioned(
        dir.path(),
        DeltaSection {
            row_group_rows: Some(1024),
            ..Default::default()
        },
    );
    super::tests::commit(&s, super::tests::flush(0, 0, 1, vec![regional(0..3000)])).await;
    let mut groups = Vec::new();
    for entry in walk(dir.path()) {
        let file = std::fs::File::open(&entry).unwrap();
        let reader = parquet::file::serialized_reader::SerializedFileReader::new(file).unwrap();
        use parquet::file::reader::FileReader as _;
        groups.push(reader.metadata().num_row_groups());
    }
    // 3,000 rows in one file: row groups of at most 1,024 rows.
    assert_eq!(groups, vec![3], "row groups per data file");
}

/// A sink at `dir` with the `[sink.delta]` settings of `section`.
fn sectioned(dir: &std::path::Path, section: DeltaSection) -> DeltaSink {
    sink(
        dir,
        section
            .validate()
            .unwrap()
            .apply(DeltaSinkConfig::default()),
    )
}

/// The Parquet data files under `dir`, in path order.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn row_groups_end_at_the_configured_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let s = sectioned(
        dir.path(),
        DeltaSection {
            row_group_bytes: Some("1MiB".into()),
            ..Default::default()
        },
    );
    // 100,000 rows with 32 hex digits that neither a dictionary nor snappy shrink: ~4 MB.
    let n = 100_000i64;
    let mix = |i: i64| (i as u64 ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("region", DataType::Utf8, true),
    ]);
    let rows = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(Int64Array::from_iter_values(0..n)),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("{:016x}{:016x}", mix(i), mix(i + n))),
            )),
        ],
    )
    .unwrap();
    super::tests::commit(&s, super::tests::flush(0, 0, n, vec![rows])).await;
    let files = walk(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(
        std::fs::File::open(&files[0]).unwrap(),
    )
    .unwrap();
    use parquet::file::reader::FileReader as _;
    let meta = reader.metadata();
    let sizes: Vec<i64> = meta
        .row_groups()
        .iter()
        .map(|g| g.compressed_size())
        .collect();
    assert!(sizes.len() >= 3, "row groups of at most ~1 MiB: {sizes:?}");
    // A group passes its bound by at most the first slice written into it (8,192 rows, about
    // 330 KB here); parquet splits the writes after it by the rows' average size.
    assert!(
        sizes.iter().all(|&b| b <= (1 << 20) + (256 << 10)),
        "{sizes:?}"
    );
    let rows: i64 = meta.row_groups().iter().map(|g| g.num_rows()).sum();
    assert_eq!(rows, n);
}
