//! Protobuf topics end to end: records of every mapped type, produced by a third-party client
//! (confluent-kafka's ProtobufSerializer, registering two versions and their import as schema
//! references with our registry server), interleaved by version, with poison records between
//! them; lakesink writes Parquet, pyarrow reads every value back, and the poison records are in
//! the dead-letter topic exactly once.

mod common;

use std::time::Duration;

use common::*;
use prost::Message as _;

/// `tests/data/protobuf/orders.proto` (version 1) and version 2, which adds a field.
fn versions() -> (String, String) {
    let root = repo_root().join("tests/data/protobuf");
    let v1 = std::fs::read_to_string(root.join("orders.proto")).unwrap();
    let v2 = v1.replace(
        "optional string note = 28;",
        "optional string note = 28;\n  string channel = 29;",
    );
    assert_ne!(v1, v2);
    (v1, v2)
}

/// A FileDescriptorSet of `schema` and everything it imports, for the Python producer.
fn descriptor_set(schema: &str, path: &std::path::Path) {
    let common =
        std::fs::read_to_string(repo_root().join("tests/data/protobuf/common.proto")).unwrap();
    let c = schema_registry::protobuf::compile(schema, &[("shop/common.proto".into(), common)])
        .unwrap();
    let set = prost_types::FileDescriptorSet {
        file: c.pool.file_descriptor_protos().cloned().collect(),
    };
    std::fs::write(path, set.encode_to_vec()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_protobuf_type_from_confluents_serializer_lands_exactly() {
    let store = Store::local("protobuf");
    let topic = unique("pb");
    let dlq = unique("pb-dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let (registry_url, client) = registry().await;
    let dir = scratch("protobuf");
    let (v1, v2) = versions();
    descriptor_set(&v1, &dir.join("v1.desc"));
    descriptor_set(&v2, &dir.join("v2.desc"));
    let expected = dir.join("expected.json");
    let n: u64 = 200;
    let count = n.to_string();
    let (v1_desc, v2_desc) = (dir.join("v1.desc"), dir.join("v2.desc"));
    run_py(
        "protobuf_types.py",
        &[
            "produce".as_ref(),
            kafka().as_ref(),
            registry_url.as_ref(),
            topic.as_ref(),
            count.as_ref(),
            v1_desc.as_os_str(),
            v2_desc.as_os_str(),
            expected.as_os_str(),
        ],
        "(the Python producer)",
    );
    // The serializer registered two versions of the value subject, each referencing the import.
    let latest = client.latest(&format!("{topic}-value")).await.unwrap();
    assert_eq!(latest.version, 2);
    assert!(
        latest
            .references
            .iter()
            .any(|r| r.name == "shop/common.proto"),
        "{:?}",
        latest.references
    );

    let cfg = config_with(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        "[]",
        &format!("format = \"protobuf\"\nerrors = \"dead-letter\"\ndead_letter_topic = \"{dlq}\""),
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, n, &mut proc_, Duration::from_secs(120)).await;
    let log = proc_.stop();

    let table_dir = store.url.strip_prefix("file://").unwrap();
    let checked = run_py(
        "protobuf_types.py",
        &["check".as_ref(), table_dir.as_ref(), expected.as_os_str()],
        &format!("lakesink log:\n{log}"),
    );
    eprintln!("{checked}");

    let poison: Vec<i64> =
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&expected).unwrap()).unwrap()
            ["poison"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
    assert_eq!(poison.len(), 3);
    let dead = dead_letters(&dlq, |d| d.len() >= poison.len()).await;
    let got: Vec<i64> = dead.keys().map(|(_, _, offset)| *offset).collect();
    assert_eq!(got, poison, "each poison record dead-lettered: {dead:?}");
    assert!(dead.values().all(|n| *n == 1), "once each: {dead:?}");
}
