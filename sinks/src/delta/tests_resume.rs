//! Continuing another writer's table (`resume_app_id`, for kafka-delta-ingest): its txn
//! versions are a partition's position where lakesink has none of its own.

use super::tests::{batch, commit, count, flush, sink};
use super::*;

#[tokio::test]
async fn another_writers_txn_versions_are_the_position_where_lakesink_has_none() {
    let dir = tempfile::tempdir().unwrap();
    // kafka-delta-ingest's app ids are `<app_id>-<partition>`, its versions the last offset
    // written, as lakesink's; a writer under another prefix stands in for it.
    let other = sink(
        dir.path(),
        DeltaSinkConfig {
            app_id_prefix: "kdi".into(),
            ..Default::default()
        },
    );
    commit(&other, flush(0, 0, 42, vec![batch(0..42, false)])).await;
    let tp = TopicPartition::new("orders", 0);
    let plain = || sink(dir.path(), DeltaSinkConfig::default());
    assert_eq!(plain().recover(&tp).await.unwrap(), None);
    let resumed = || {
        sink(
            dir.path(),
            DeltaSinkConfig {
                resume_app_id: Some("kdi/{topic}/{partition}".into()),
                ..Default::default()
            },
        )
    };
    assert_eq!(resumed().recover(&tp).await.unwrap(), Some(Offset(42)));
    // What the other writer committed is not written again; what follows is, under
    // lakesink's own app id, which rules from then on.
    assert_eq!(
        commit(&resumed(), flush(0, 0, 42, vec![batch(0..42, false)])).await,
        CommitOutcome::AlreadyCommitted { next: Offset(42) }
    );
    assert_eq!(
        commit(&resumed(), flush(0, 42, 50, vec![batch(42..50, false)])).await,
        CommitOutcome::Committed { next: Offset(50) }
    );
    assert_eq!(plain().recover(&tp).await.unwrap(), Some(Offset(50)));
    assert_eq!(count(dir.path()).await, 50);
}

#[test]
fn a_resume_app_id_names_the_partition() {
    let section = DeltaSection {
        resume_app_id: Some("web_requests".into()),
        ..Default::default()
    };
    let e = section.validate().unwrap_err().to_string();
    assert!(
        e.contains("resume_app_id") && e.contains("{partition}"),
        "{e}"
    );
}
