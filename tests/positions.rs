//! Where a partition resumes: always the table's own position, whatever happened to the group,
//! the log or the table in between (the exactly-once review's F4 and F5).

mod common;

use common::*;

/// F5: the Delta commit identity does not contain the consumer group. A run under group
/// `blue`, then one under group `green` (a rename, or a blue/green deployment) over the same
/// topic and table: every record once, not twice.
#[tokio::test(flavor = "multi_thread")]
async fn renaming_the_group_reingests_nothing() {
    let topic = unique("rename");
    create_topic(&topic, 3).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..600, 3).await;
    let delta = Store::local("orders_delta");
    for group in ["blue", "green"] {
        let cfg = config(
            &topic,
            &unique(group),
            &registry_url,
            &delta,
            "kind = \"delta\"",
        );
        catch_up(&cfg, &[]);
    }
    assert_exactly_once(&delta.read_delta(&[]), &produced);
}
