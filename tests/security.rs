//! Security checks against real services: values from the data that become paths or SQL cannot
//! leave the table root or inject SQL, and configured secrets never reach the logs.
//!
//! - Hostile partition values (`../`, absolute paths, URL schemes, percent tricks, backslashes,
//!   `=`, empty, control characters) into a Parquet table and a Delta table on local disk:
//!   every file lands under the table root, and a Hive reader (pyarrow) / python deltalake
//!   reads every value back exactly.
//! - Hostile identifiers and values into Databend: a table name and a column name that try to
//!   close their quotes and drop a table, string values that try the same. The victim table
//!   survives and the names and values land literally.
//! - The chaos harness (tests/chaos.rs) scans every process log for the configured secrets.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::databend::{databend_url, ledger, rows};
use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const HOSTILE: &[&str] = &[
    "../../escaped",
    "..",
    ".",
    "/etc/passwd",
    "s3://other-bucket/stolen",
    "file:///tmp/stolen",
    "a/../../b",
    "%2e%2e%2fstolen",
    "..\\..\\windows",
    "x=y/z=w",
    "",
    "tab\there\nnewline",
    "__HIVE_DEFAULT_PARTITION__x",
    "é/ü",
];

/// Produces `{"id": i, "region": HOSTILE[i % n]}` for `n` records to partition 0.
async fn produce_hostile(topic: &str, n: i64) -> BTreeMap<i64, &'static str> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut want = BTreeMap::new();
    for i in 0..n {
        let region = HOSTILE[i as usize % HOSTILE.len()];
        let payload = json!({"id": i, "region": region}).to_string();
        producer
            .send(
                FutureRecord::<(), _>::to(topic)
                    .partition(0)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        want.insert(i, region);
    }
    want
}

/// Every file under `outer` is inside `root`.
fn assert_all_inside(outer: &Path, root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![outer.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                assert!(
                    p.starts_with(root),
                    "{} was written outside the table root {}",
                    p.display(),
                    root.display()
                );
                n += 1;
            }
        }
    }
    n
}

async fn hostile_partitions(kind: &str) {
    let outer = scratch("sec");
    let root = outer.join("inner").join("table");
    let store = Store {
        url: format!("file://{}", root.display()),
        options: BTreeMap::new(),
        endpoint: None,
    };
    let topic = unique("hostile");
    create_topic(&topic, 1).await;
    let n = 3 * HOSTILE.len() as i64;
    let want = produce_hostile(&topic, n).await;
    let (registry_url, _c) = registry().await;
    let group = unique("g");
    let cfg = config_with(
        &topic,
        &group,
        &registry_url,
        &store,
        r#"["region"]"#,
        &format!("kind = \"{kind}\"\nformat = \"json\"\nschema = {{ id = \"long\", region = \"string\" }}"),
    )
    .replace("max_rows = 400", "max_rows = 10");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let produced: Produced = (0..n).map(|o| ((0, o), o)).collect();
    if kind == "delta" {
        let reader = store.delta_sink(&group);
        wait_delta(
            &reader,
            &topic,
            &produced,
            &mut proc_,
            Duration::from_secs(120),
        )
        .await;
    } else {
        wait_rows(
            &store,
            &topic,
            n as u64,
            &mut proc_,
            Duration::from_secs(120),
        )
        .await;
    }
    proc_.stop();
    let files = assert_all_inside(&outer, &root);
    assert!(files > HOSTILE.len(), "only {files} files");

    let got: Vec<(i64, Option<String>)> = if kind == "delta" {
        store.read_delta(&[])["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_i64().unwrap(),
                    r["region"].as_str().map(str::to_string),
                )
            })
            .collect()
    } else {
        let out = Command::new(python())
            .arg(py_script("dump_table.py"))
            .arg(&root)
            .arg("--hive")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table: Value = serde_json::from_slice(&out.stdout).unwrap();
        table["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_i64().unwrap(),
                    r["region"].as_str().map(str::to_string),
                )
            })
            .collect()
    };
    assert_eq!(got.len(), want.len(), "rows read back");
    for (id, region) in got {
        let expected = want[&id];
        // Hive writes an empty string as its null partition; every other value is exact.
        let expected = (!expected.is_empty()).then(|| expected.to_string());
        assert_eq!(region, expected, "region of id {id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_partition_values_stay_inside_a_parquet_table() {
    hostile_partitions("parquet").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_partition_values_stay_inside_a_delta_table() {
    hostile_partitions("delta").await;
}

/// A table name and a column name that try to close their quotes and drop another table, and
/// values that try the same: the victim survives, everything lands literally.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_identifiers_and_values_cannot_inject_sql_into_databend() {
    let database = unique("sec");
    let admin = |sql: String| async move { rows("default", &sql).await };
    admin(format!("CREATE DATABASE IF NOT EXISTS \"{database}\"")).await;
    admin(format!("CREATE TABLE \"{database}\".victims (id INT)")).await;
    admin(format!("INSERT INTO \"{database}\".victims VALUES (1)")).await;
    let table = r#"t"; DROP TABLE victims; --"#;
    // Upper case too: a stage query resolves names case-insensitively, so the sink loads by
    // position (this test found that a quoted "orderId" could not be loaded by name).
    let column = r#"c"); DROP TABLE victims; --"#;
    let topic = unique("hostile");
    create_topic(&topic, 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let values = [
        "'; DROP TABLE victims; --",
        "\\'); DROP TABLE victims; --",
        "$$; DROP TABLE victims; $$",
        "plain",
    ];
    for (i, v) in values.iter().enumerate() {
        let payload = json!({"id": i, column: v}).to_string();
        producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
    let (registry_url, _c) = registry().await;
    let store = Store::local("unused");
    let column_toml = Value::String(column.into()).to_string();
    let cfg = config_with(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        "[]",
        &format!(
            "kind = \"databend\"\ndatabend = {{ url = \"{}/{database}\" }}\nformat = \"json\"\nschema = {{ id = \"long\", {column_toml} = \"string\" }}",
            databend_url()
        ),
    )
    .replace(
        &format!("table = \"{}\"", store.url),
        &format!("table = {}", Value::String(table.into())),
    )
    .replace(&format!("storage = {}\n", store.toml_options()), "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let start = Instant::now();
    while ledger(&database, "orders", &topic).await.get(&0) != Some(&(values.len() as i64)) {
        if let Some(s) = proc_.child.try_wait().unwrap() {
            panic!("lakesink exited ({s}):\n{}", proc_.log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not landed:\n{}",
            proc_.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = proc_.stop();
    assert!(
        !log.contains("databend-test-secret"),
        "the password leaked into the log"
    );
    let victims = admin(format!("SELECT id FROM \"{database}\".victims")).await;
    assert_eq!(
        victims,
        vec![vec![Some("1".to_string())]],
        "the victim table survives"
    );
    let quoted = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let got = admin(format!(
        "SELECT id, {} FROM \"{database}\".{} ORDER BY id",
        quoted(column),
        quoted(table)
    ))
    .await;
    let got: Vec<String> = got.into_iter().map(|r| r[1].clone().unwrap()).collect();
    assert_eq!(got, values, "values land literally");
}
