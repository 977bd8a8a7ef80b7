//! Scale-out: two lakesink processes in one consumer group share a topic's partitions; members
//! join and leave mid-stream (rebalances hand partitions over after a drain), and every record
//! still lands exactly once, under the classic group protocol and KIP-848's.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn members_joining_and_leaving_keep_exactly_once() {
    members_join_and_leave("classic").await;
}

/// The same under KIP-848's consumer group protocol: the broker assigns incrementally.
#[tokio::test(flavor = "multi_thread")]
async fn members_joining_and_leaving_keep_exactly_once_kip848() {
    members_join_and_leave("consumer").await;
}

async fn members_join_and_leave(protocol: &str) {
    let store = Store::s3("orders");
    let topic = unique("scale");
    let partitions = 6;
    create_topic(&topic, partitions).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "")
        .replace(&group_properties(), &group_properties_for(protocol));

    let mut produced = produce(&topic, id, 0..1200, partitions).await;
    let mut a = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, 600, &mut a, Duration::from_secs(120)).await;

    // A second member joins: the group rebalances and the partitions are split.
    let mut b = Lakesink::start(&cfg, &[]);
    b.wait_for_line("assigned", Duration::from_secs(60));
    produced.extend(produce(&topic, id, 1200..2400, partitions).await);
    wait_rows(&store, &topic, 1800, &mut b, Duration::from_secs(120)).await;

    // The first member leaves: its partitions are drained, committed and handed to the second.
    let log_a = a.stop();
    assert!(log_a.contains("revoked"), "{log_a}");
    produced.extend(produce(&topic, id, 2400..3000, partitions).await);
    wait_rows(&store, &topic, 3000, &mut b, Duration::from_secs(120)).await;
    let log_b = b.stop();
    assert!(
        log_b.matches("assigned").count() >= 2,
        "the second member should have been assigned twice:\n{log_b}"
    );
    assert_exactly_once(&store.read(), &produced);
}
