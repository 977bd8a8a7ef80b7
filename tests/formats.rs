//! Every Avro type, produced by a third-party client (confluent-kafka's AvroSerializer with
//! fastavro, registering against our registry server), read back from the Parquet output by
//! pyarrow and DuckDB with exact values.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_avro_type_from_a_third_party_producer_lands_exactly() {
    let store = Store::local("types");
    let topic = unique("types");
    create_topic(&topic, 1).await;
    let (registry_url, _client) = registry().await;
    let expected = scratch("types").join("expected.json");
    let n = 300;
    let out = Command::new(python())
        .arg(py_script("produce_all_types.py"))
        .args([&kafka(), &registry_url, &topic, &n.to_string()])
        .arg(&expected)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the python producer failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let cfg = config_with(&topic, &unique("g"), &registry_url, &store, "[]", "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, n, &mut proc_, Duration::from_secs(120)).await;
    proc_.stop();

    let dir = store.url.strip_prefix("file://").unwrap();
    let out = Command::new(python())
        .arg(py_script("check_all_types.py"))
        .arg(dir)
        .arg(&expected)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "values differ:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
