//! Background compaction (`auto_compact`): it starts by itself once a partition gathers small
//! files, never blocks or loses an append committed meanwhile, and keeps every position.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::tests::{batch, commit, count, flush, position, scalar, sink};
use super::*;

fn compacting() -> DeltaSinkConfig {
    DeltaSinkConfig {
        auto_compact: Some(AutoCompact {
            min_files: 4,
            target_file_size: 128 << 20,
            vacuum_retention: Duration::from_secs(3600),
        }),
        ..DeltaSinkConfig::default()
    }
}

async fn live_files(dir: &std::path::Path) -> usize {
    let url = Url::from_directory_path(dir).unwrap();
    super::live_files(url.as_str()).await.unwrap().0
}

async fn wait_idle(s: &DeltaSink) {
    for _ in 0..600 {
        if !s.compactor.running.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the background compaction did not finish in 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_compacted_in_the_background_while_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(sink(dir.path(), compacting()));
    // Three small files: below the threshold, nothing starts.
    for i in 0..3 {
        commit(
            &s,
            flush(
                0,
                i * 10,
                i * 10 + 10,
                vec![batch(i * 10..i * 10 + 10, false)],
            ),
        )
        .await;
    }
    wait_idle(&s).await;
    assert_eq!(live_files(dir.path()).await, 3);
    assert!(s.compactor.last.lock().unwrap().is_none(), "not started");

    // The fourth starts it; appends of another partition go on while it runs.
    commit(&s, flush(0, 30, 40, vec![batch(30..40, false)])).await;
    assert!(
        s.compactor.last.lock().unwrap().is_some(),
        "a compaction started after the commit that made four small files"
    );
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                let base = 1000 + i * 5;
                commit(
                    &s,
                    flush(1, i * 5, i * 5 + 5, vec![batch(base..base + 5, false)]),
                )
                .await;
            }
        })
    };
    writer.await.unwrap();
    wait_idle(&s).await;

    // Every row once, every position kept, and the four files became one.
    assert_eq!(count(dir.path()).await, 40 + 100);
    assert_eq!(
        scalar(dir.path(), "SELECT count(DISTINCT id) FROM t").await,
        140
    );
    assert_eq!(position(dir.path(), 0).await, Some(Offset(40)));
    assert_eq!(position(dir.path(), 1).await, Some(Offset(100)));
    let log = std::fs::read_dir(dir.path().join("_delta_log"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .any(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .contains("\"operation\":\"OPTIMIZE\"")
        });
    assert!(log, "an OPTIMIZE commit is in the log");
    assert!(
        live_files(dir.path()).await < 4 + 20,
        "the compaction removed small files"
    );
}

#[tokio::test]
async fn compaction_is_off_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), DeltaSinkConfig::default());
    for i in 0..6 {
        commit(
            &s,
            flush(
                0,
                i * 10,
                i * 10 + 10,
                vec![batch(i * 10..i * 10 + 10, false)],
            ),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(live_files(dir.path()).await, 6);
}

/// Two compactions of the same files at once (two members, or `maintain` beside a member):
/// deltalake's conflict checker lets two removes with `dataChange = false` of one file both
/// commit, which would keep both rewrites, every row twice. The second must be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compactions_of_the_same_files_never_double_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), DeltaSinkConfig::default());
    for i in 0..6 {
        commit(
            &s,
            flush(
                0,
                i * 10,
                i * 10 + 10,
                vec![batch(i * 10..i * 10 + 10, false)],
            ),
        )
        .await;
    }
    let auto = compacting().auto_compact.unwrap();
    // Both read the table before either commits.
    let (a, b) = (
        Arc::new(sink(dir.path(), compacting())),
        Arc::new(sink(dir.path(), compacting())),
    );
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let run = |s: Arc<DeltaSink>| {
        let barrier = barrier.clone();
        tokio::spawn(async move {
            let mut table = s.builder().unwrap().build().unwrap();
            table.load().await.unwrap();
            barrier.wait().await;
            s.compact_table(table, auto.target_file_size, None)
                .await
                .map(|(_, r)| r.files_compacted)
        })
    };
    let (ra, rb) = (run(a), run(b));
    let outcomes = [ra.await.unwrap(), rb.await.unwrap()];
    assert_eq!(count(dir.path()).await, 60, "{outcomes:?}");
    assert_eq!(
        scalar(dir.path(), "SELECT count(DISTINCT id) FROM t").await,
        60
    );
    assert!(
        outcomes.iter().any(|o| matches!(o, Ok(n) if *n > 0)),
        "one of them compacted: {outcomes:?}"
    );
}
