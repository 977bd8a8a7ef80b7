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
