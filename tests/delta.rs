//! Delta Lake sink against real services: Apache Kafka, the registry, moto (S3), Azurite
//! (`az://` and `abfss://` in emulator mode), fake-gcs-server (`gs://`) and local disk. What lands is read back by python `deltalake`
//! and DuckDB (over deltalake's pyarrow dataset), including the txn versions.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sinks::{CommitOutcome, Flush, Offset, Sink, TopicPartition};

const PARTITIONS: i32 = 3;

fn delta_sink_config(extra: &str) -> String {
    format!("kind = \"delta\"\n{extra}")
}

fn app_ids(topic: &str, partitions: i32) -> Vec<String> {
    (0..partitions)
        .map(|p| format!("lakesink/{topic}/{p}"))
        .collect()
}

/// Checks the txn versions python deltalake reads: last offset of each partition.
fn assert_txns(table: &Value, topic: &str, produced: &Produced) {
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, o) in produced.keys() {
        let e = ends.entry(*p).or_default();
        *e = (*e).max(*o);
    }
    for (p, last) in ends {
        let app = format!("lakesink/{topic}/{p}");
        assert_eq!(
            table["txn"][&app].as_i64(),
            Some(last),
            "txn version of {app}: {}",
            table["txn"]
        );
    }
}

async fn delta_exactly_once(store: Store, n: i64) {
    let topic = unique("orders");
    create_topic(&topic, PARTITIONS).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..n, PARTITIONS).await;
    let group = unique("g");
    let cfg = config(
        &topic,
        &group,
        &registry_url,
        &store,
        &delta_sink_config(""),
    );
    let env = store.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut proc_ = Lakesink::start(&cfg, &env);
    let reader = store.delta_sink(&group);
    wait_delta(
        &reader,
        &topic,
        &produced,
        &mut proc_,
        Duration::from_secs(180),
    )
    .await;
    let log = proc_.stop();
    assert!(!log.contains(AZURITE_KEY), "a secret leaked into the log");
    let table = store.read_delta(&app_ids(&topic, PARTITIONS));
    assert_exactly_once(&table, &produced);
    assert_txns(&table, &topic, &produced);
    assert_eq!(table["partition_columns"], serde_json::json!(["day"]));
    let schema = &table["schema"];
    assert!(
        schema["cost"].as_str().unwrap().starts_with("decimal"),
        "decimals stay decimals: {schema}"
    );
    assert!(
        schema["ts"].as_str().unwrap().starts_with("timestamp"),
        "{schema}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_on_local_disk_exactly_once() {
    delta_exactly_once(Store::local("orders_delta"), 900).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_on_s3_exactly_once() {
    delta_exactly_once(Store::s3("orders_delta"), 900).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_on_azure_exactly_once() {
    delta_exactly_once(Store::azure("orders_delta"), 900).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_on_gcs_exactly_once() {
    delta_exactly_once(Store::gcs("orders_delta"), 900).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_on_abfss_emulator_exactly_once() {
    delta_exactly_once(Store::abfss("orders_delta"), 600).await;
}

/// A compatible schema version arrives mid-stream: the table gains the nullable column in the
/// commit that first carries it; earlier rows read null; python deltalake reads both.
/// Latency flushes of all partitions are cut at one tick and share their files
/// (`delta.shared_files`): 8 partitions streaming at once add a file per tick to the table, not
/// one per partition, and every record lands exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn latency_flushes_of_all_partitions_share_one_file_per_tick() {
    const P: i32 = 8;
    let store = Store::local("shared_files");
    let topic = unique("orders");
    create_topic(&topic, P).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let mut produced = produce(&topic, id, 0..80, P).await;
    let group = unique("g");
    // One table partition; flushes cut only by the latency tick (and the catch-up at start).
    let cfg = config_with(
        &topic,
        &group,
        &registry_url,
        &store,
        "[]",
        &delta_sink_config(""),
    )
    .replace(
        r#"max_rows = 400, max_latency = "1s""#,
        r#"max_rows = 100000, max_latency = "2s""#,
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let reader = store.delta_sink(&group);
    wait_delta(
        &reader,
        &topic,
        &produced,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    let before = store.read_delta(&[])["files"].as_u64().unwrap();
    // Streaming: 800 records over all partitions, produced within a tick or two.
    produced.extend(produce(&topic, id, 80..880, P).await);
    wait_delta(
        &reader,
        &topic,
        &produced,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    proc_.stop();
    let table = store.read_delta(&app_ids(&topic, P));
    // Every produced (partition, offset) once (the table is not partitioned by day, which
    // `assert_exactly_once` also checks).
    let landed: Vec<(i64, i64)> = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["p"].as_i64().unwrap(), r["o"].as_i64().unwrap()))
        .collect();
    let unique: std::collections::BTreeSet<(i64, i64)> = landed.iter().copied().collect();
    assert_eq!(landed.len(), unique.len(), "a record landed twice");
    let sent: std::collections::BTreeSet<(i64, i64)> =
        produced.keys().map(|(p, o)| (i64::from(*p), *o)).collect();
    assert_eq!(unique, sent);
    assert_txns(&table, &topic, &produced);
    let added = table["files"].as_u64().unwrap() - before;
    assert!(
        (1..=3).contains(&added),
        "{added} files for 8 partitions' streaming flushes (one per partition per tick would \
         be at least 8)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_gains_a_column_mid_stream() {
    let store = Store::local("evolve_delta");
    let topic = unique("evolve");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let (n, v2_from) = (600, 300);
    let produced = produce_evolving(&client, &topic, 0..n, v2_from).await;
    let group = unique("g");
    let cfg = config(
        &topic,
        &group,
        &registry_url,
        &store,
        &delta_sink_config(""),
    )
    .replace("max_rows = 400", "max_rows = 100");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let reader = store.delta_sink(&group);
    wait_delta(
        &reader,
        &topic,
        &produced,
        &mut proc_,
        Duration::from_secs(180),
    )
    .await;
    proc_.stop();
    let table = store.read_delta(&app_ids(&topic, 1));
    assert_exactly_once(&table, &produced);
    assert!(
        table["schema"]["coupon"]
            .as_str()
            .is_some_and(|t| t.contains("string")),
        "{}",
        table["schema"]
    );
    for r in table["rows"].as_array().unwrap() {
        let id = r["id"].as_i64().unwrap();
        let want = (id >= v2_from).then(|| coupon(id));
        assert_eq!(
            r["coupon"].as_str(),
            want.as_deref(),
            "coupon of order {id}"
        );
    }
    // Several commits before the change: the column was added to an existing table.
    assert!(
        table["version"].as_i64().unwrap() >= 4,
        "{}",
        table["version"]
    );
}

/// SIGKILL after the data files are written but before the commit: nothing of that flush is
/// visible, the restart commits everything exactly once, the orphans are never referenced and
/// `lakesink maintain` vacuums them, compacts, and checkpoints.
#[tokio::test(flavor = "multi_thread")]
async fn delta_crash_between_files_and_commit_then_maintain() {
    let store = Store::local("crash_delta");
    let topic = unique("crash");
    let n = 1500;
    create_topic(&topic, PARTITIONS).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..n, PARTITIONS).await;
    let group = unique("g");
    let cfg = config(
        &topic,
        &group,
        &registry_url,
        &store,
        // One file per Kafka partition per flush: small files for maintenance to compact.
        &delta_sink_config(
            "delta = { checkpoint_interval = 5, target_file_size = \"64MiB\", shared_files = false }",
        ),
    );
    let mut first = Lakesink::start(&cfg, &[("LAKESINK_TEST_CRASHPOINT", "after_stage:3")]);
    first.wait_for_line("CRASHPOINT after_stage", Duration::from_secs(120));
    first.kill9();
    let ids = app_ids(&topic, PARTITIONS);
    let before = store.read_delta(&ids);
    let rows = before["rows"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for r in rows {
        let key = (r["p"].as_i64().unwrap(), r["o"].as_i64().unwrap());
        assert!(seen.insert(key), "duplicate {key:?} after the kill");
    }
    assert!(
        before["stored_files"].as_u64().unwrap() > before["files"].as_u64().unwrap(),
        "the killed flush left unreferenced data files: {}",
        before
    );

    let mut second = Lakesink::start(&cfg, &[]);
    let reader = store.delta_sink(&group);
    wait_delta(
        &reader,
        &topic,
        &produced,
        &mut second,
        Duration::from_secs(180),
    )
    .await;
    second.stop();
    let after = store.read_delta(&ids);
    assert_exactly_once(&after, &produced);
    assert_txns(&after, &topic, &produced);
    let orphans = after["stored_files"].as_u64().unwrap() - after["files"].as_u64().unwrap();
    assert!(orphans > 0, "orphans are still there before maintenance");
    // A checkpoint every 5 commits: the commits of this run are as few as the flushes that
    // arrived together (one commit for several partitions), so whether the table reached
    // version 5 depends on timing; the cadence itself is the sinks' unit test's.
    let version = after["version"].as_u64().unwrap();
    assert!(
        version < 5 || after["checkpoints"].as_u64().unwrap() >= 1,
        "version {version} and no checkpoint, with one every 5 commits"
    );

    let dir = scratch("cfg");
    let path = dir.join("maintain.toml");
    std::fs::write(&path, &cfg).unwrap();
    let (stdout, logged) = lakesink_cli_logs(
        &[
            "maintain",
            "--config",
            path.to_str().unwrap(),
            "--retention",
            "0s",
        ],
        &[],
    );
    assert!(stdout.contains("ok    orders"), "{stdout}");
    // A maintenance that goes well warns of nothing (deltalake once warned of its upload
    // budget at every compaction writer).
    assert!(!logged.contains("WARN"), "{logged}");
    let maintained = store.read_delta(&ids);
    assert!(
        maintained["checkpoints"].as_u64().unwrap() >= 1,
        "maintain writes a checkpoint: {}",
        maintained["checkpoints"]
    );
    assert_exactly_once(&maintained, &produced);
    assert_txns(&maintained, &topic, &produced);
    assert_eq!(
        maintained["stored_files"], maintained["files"],
        "vacuum removed every unreferenced file"
    );
    assert!(
        maintained["files"].as_u64().unwrap() < after["files"].as_u64().unwrap(),
        "compaction merged small files: {} -> {}",
        after["files"],
        maintained["files"]
    );
    let history: Vec<&str> = maintained["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    assert!(history.contains(&"OPTIMIZE"), "{history:?}");
}

/// Two processes of one consumer group append to the same table at the same time.
#[tokio::test(flavor = "multi_thread")]
async fn two_members_append_to_one_delta_table() {
    let store = Store::s3("shared_delta");
    let topic = unique("shared");
    let partitions = 6;
    let n = 3000;
    create_topic(&topic, partitions).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let group = unique("g");
    let cfg = config(
        &topic,
        &group,
        &registry_url,
        &store,
        &delta_sink_config(""),
    );
    let mut a = Lakesink::start(&cfg, &[]);
    let mut b = Lakesink::start(&cfg, &[]);
    a.wait_for_line("assigned", Duration::from_secs(60));
    b.wait_for_line("assigned", Duration::from_secs(60));
    let produced = produce(&topic, id, 0..n, partitions).await;
    let reader = store.delta_sink(&group);
    wait_delta(&reader, &topic, &produced, &mut a, Duration::from_secs(180)).await;
    let log_a = a.stop();
    let log_b = b.stop();
    let table = store.read_delta(&app_ids(&topic, partitions));
    assert_exactly_once(&table, &produced);
    assert_txns(&table, &topic, &produced);
    for (name, log) in [("first", &log_a), ("second", &log_b)] {
        assert!(
            log.contains("committed") || log.contains("commit"),
            "the {name} member committed nothing:\n{log}"
        );
    }
}

fn id_batch(ids: std::ops::Range<i64>) -> arrow::record_batch::RecordBatch {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    arrow::record_batch::RecordBatch::try_new(
        std::sync::Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)])),
        vec![std::sync::Arc::new(Int64Array::from_iter_values(ids))],
    )
    .unwrap()
}

fn flush(p: i32, start: i64, next: i64) -> Flush {
    Flush {
        tp: TopicPartition::new("t", p),
        start: Offset(start),
        next: Offset(next),
        batches: vec![id_batch(start..next)],
        packed: Vec::new(),
        truncate: false,
        tick: None,
    }
}

/// Appends 6 commits per writer from 1, 2 and 4 concurrent writers (other partitions of one
/// table) and prints commits per second; every commit must succeed.
async fn commit_rates(store: &Store, group: &str, label: &str) {
    for writers in [1, 2, 4] {
        let commits_each = 6;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let s = store.delta_sink(group);
            let p = 100 * writers + w;
            tasks.push(tokio::spawn(async move {
                for i in 0..commits_each as i64 {
                    let staged = s.stage(flush(p, i * 10, i * 10 + 10)).await.unwrap();
                    let out = s.commit(&staged).await.unwrap().0;
                    assert_eq!(
                        out,
                        CommitOutcome::Committed {
                            next: Offset(i * 10 + 10)
                        }
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "delta on {label}: {writers} writer(s), {} commits in {secs:.2}s = {:.1} commits/s",
            writers * commits_each,
            (writers * commits_each) as f64 / secs
        );
    }
}

/// Commit rates on local disk, where the table store is not the bottleneck.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_commit_on_local_disk() {
    let store = Store::local("rates_delta");
    commit_rates(&store, "rates", "local disk").await;
    let table = store.read_delta(&[]);
    assert_eq!(
        table["duckdb"]["count"].as_u64(),
        Some((1 + 2 + 4) * 6 * 10)
    );
    // One commit per flush (plus the table's creation, when it is a commit of its own).
    assert!(table["version"].as_i64().unwrap() >= (1 + 2 + 4) * 6 - 1);
}

/// A zombie that lost its partition cannot commit over the new owner, on S3 with conditional
/// writes only (no lock service); concurrent writers of other partitions all succeed. Prints
/// commits per second for 1, 2 and 4 writers.
#[tokio::test(flavor = "multi_thread")]
async fn zombie_is_fenced_and_concurrent_writers_commit_on_s3() {
    let store = Store::s3("fence_delta");
    let group = "fence";
    let owner = store.delta_sink(group);
    let zombie = store.delta_sink(group);
    // The zombie staged its flush before it lost the partition ...
    let stale = zombie.stage(flush(0, 0, 5)).await.unwrap();
    // ... the new owner moved on ...
    for (s, e) in [(0, 10), (10, 20)] {
        let staged = owner.stage(flush(0, s, e)).await.unwrap();
        assert_eq!(
            owner.commit(&staged).await.unwrap().0,
            CommitOutcome::Committed { next: Offset(e) }
        );
    }
    // ... and the zombie's late commit is rejected with the owner's position.
    assert_eq!(
        zombie.commit(&stale).await.unwrap().0,
        CommitOutcome::Fenced { next: Offset(20) }
    );

    commit_rates(&store, group, "moto").await;
    let table = store.read_delta(&["lakesink/t/0".to_string()]);
    assert_eq!(table["txn"]["lakesink/t/0".to_string()].as_i64(), Some(19));
    // The zombie's 5 rows would make this 445.
    assert_eq!(
        table["duckdb"]["count"].as_u64(),
        Some(20 + (1 + 2 + 4) * 6 * 10)
    );
}

/// Debezium JSON changes (creates, updates, deletes with tombstones, a re-insert) upserted by
/// key: the table ends equal to the source's final state.
#[tokio::test(flavor = "multi_thread")]
async fn debezium_upsert_reaches_the_final_source_state() {
    let store = Store::local("customers_upsert");
    let topic = unique("dbserver1.inventory.customers");
    create_topic(&topic, 1).await;
    let name = |c: i64, v: &str| serde_json::json!({"id": c, "name": format!("customer {c} {v}")});
    let mut changes: Vec<Change> = Vec::new();
    for c in 1..=30 {
        changes.push(("c", c, name(c, "v0")));
    }
    for round in 1..=3 {
        for c in (round..=30).step_by(2) {
            changes.push(("u", c, name(c, &format!("v{round}"))));
        }
    }
    for c in (5..=30).step_by(5) {
        changes.push(("d", c, Value::Null));
    }
    changes.push(("c", 10, name(10, "reborn")));
    let (state, sent) = produce_changes(&topic, &changes).await;
    let state: BTreeMap<i64, String> = state
        .into_iter()
        .map(|(id, image)| (id, image["name"].as_str().unwrap().to_string()))
        .collect();
    let (registry_url, _client) = registry().await;
    let group = unique("g");
    let mut cfg = config_with(
        &topic,
        &group,
        &registry_url,
        &store,
        "[]",
        "kind = \"delta\"\nmode = \"upsert\"\nkey = [\"id\"]\nformat = \"debezium-json\"\nschema = { id = \"long\", name = \"string\" }",
    );
    // Small flushes, so changes of one key span several MERGE commits.
    cfg = cfg.replace("max_rows = 400", "max_rows = 17");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let reader = store.delta_sink(&group);
    let produced: Produced = (0..sent).map(|o| ((0, o), o)).collect();
    wait_delta(
        &reader,
        &topic,
        &produced,
        &mut proc_,
        Duration::from_secs(180),
    )
    .await;
    proc_.stop();
    let table = store.read_delta(&[format!("lakesink/{topic}/0")]);
    let got: BTreeMap<i64, String> = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(
                r["_deleted"],
                Value::Bool(false),
                "deleted rows are removed: {r}"
            );
            (
                r["id"].as_i64().unwrap(),
                r["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        table["rows"].as_array().unwrap().len(),
        got.len(),
        "one row per key"
    );
    assert_eq!(got, state);
    assert_eq!(
        table["txn"][format!("lakesink/{topic}/0")].as_i64(),
        Some(sent - 1)
    );
    let history: Vec<&str> = table["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    assert!(history.contains(&"MERGE"), "{history:?}");
}
