//! A whole database in one sink (issue "A whole database in one sink"): one `topics_regex`
//! sink whose `table` is a template writes each topic to its own table, including topics
//! created while it runs, and a table named in `[sink.tables]`. Against Apache Kafka, the registry and moto (S3); each table is read
//! back with python `deltalake` and DuckDB and reconciled record by record.

mod common;

use std::time::Duration;

use common::*;

const PARTITIONS: i32 = 2;

/// The per-topic Delta table of `topic` under the template root `base` (customers have a
/// table named in `[sink.tables]`).
fn table_of(base: &Store, topic: &str) -> Store {
    let url = if topic.ends_with(".customers") {
        format!("{}/crm/customers", base.url)
    } else {
        format!("{}/{topic}", base.url)
    };
    Store {
        url,
        ..base.clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_regex_sink_writes_each_topic_to_its_own_delta_table() {
    let server = unique("db").replace('-', "_");
    let (registry_url, client) = registry().await;
    let base = Store::s3("cdc");
    let topics: Vec<String> = ["orders", "customers", "suppliers"]
        .iter()
        .map(|t| format!("{server}.shop.{t}"))
        .collect();
    // Two topics exist before the start; the third is created while lakesink runs.
    let mut produced = Vec::new();
    for (i, topic) in topics[..2].iter().enumerate() {
        create_topic(topic, PARTITIONS).await;
        let id = register_orders(&client, topic).await;
        let n = 300 + 100 * i as i64;
        produced.push(produce(topic, id, 0..n, PARTITIONS).await);
    }
    let group = unique("g");
    let cfg = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership}, "topic.metadata.refresh.interval.ms" = "1000" }}

[schema_registry]
url = "{registry_url}"

[pipeline]
drain_timeout = "20s"

[[sink]]
name = "shop"
kind = "delta"
topics_regex = '^{server}\.shop\..*'
table = "{base}/{{topic}}"
partition_by = ["day(ts)"]
storage = {opts}
flush = {{ max_rows = 200, max_latency = "1s" }}

[sink.tables."{server}.shop.customers"]
table = "{base}/crm/customers"
"#,
        kafka = kafka(),
        membership = group_properties(),
        base = base.url,
        opts = base.toml_options(),
    );
    let env = base.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cfg_path = scratch("cfg").join("lakesink.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut proc_ = Lakesink::start_args(
        &[
            "run",
            "--config",
            cfg_path.to_str().unwrap(),
            "--http-listen",
            &format!("127.0.0.1:{port}"),
        ],
        &env,
    );
    for (topic, produced) in topics.iter().zip(&produced) {
        let table = table_of(&base, topic);
        wait_delta(
            &table.delta_sink(&group),
            topic,
            produced,
            &mut proc_,
            Duration::from_secs(120),
        )
        .await;
    }
    // A table created while the sink runs: picked up by the regex subscription (metadata
    // refreshed every second here), its table created by its first flush.
    create_topic(&topics[2], PARTITIONS).await;
    let id = register_orders(&client, &topics[2]).await;
    produced.push(produce(&topics[2], id, 0..250, PARTITIONS).await);
    wait_delta(
        &table_of(&base, &topics[2]).delta_sink(&group),
        &topics[2],
        &produced[2],
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    // The metrics name each topic's table, the one created mid-run included.
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for topic in &topics {
        let line = format!(
            "lakesink_table_info{{sink=\"shop\",topic=\"{topic}\",table=\"{}\"}} 1",
            table_of(&base, topic).url
        );
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
    let log = proc_.stop();
    // `status` names each topic's own table, and no lag.
    let cfg_arg = cfg_path.to_str().unwrap();
    let out = lakesink_cli(&["status", "--json", "--config", cfg_arg], &env);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), topics.len() * PARTITIONS as usize, "{rows:?}");
    for r in &rows {
        let topic = r["topic"].as_str().unwrap();
        assert_eq!(r["table"], table_of(&base, topic).url.as_str(), "{r}");
        assert_eq!(r["lag"], 0, "{r}");
        // Delta: the time of the commit that carries the partition's txn.
        assert!(r["last_commit"].as_str().is_some(), "{r}");
    }
    // `maintain` finds each topic's table through the broker's topics, and compacts it.
    let stdout = lakesink_cli(&["maintain", "--config", cfg_arg], &env);
    let checked = lakesink_cli(&["check", "--config", cfg_arg], &env);
    assert!(
        checked.matches("ok    ").count() == 3 && !checked.contains("FAIL"),
        "check probes the templated sink's store: {checked}"
    );
    for topic in &topics {
        let table = table_of(&base, topic).url;
        assert!(
            stdout.contains(&format!("ok    shop: {table} purged")),
            "{table} not maintained:\n{stdout}"
        );
    }
    for (topic, produced) in topics.iter().zip(&produced) {
        let app_ids: Vec<String> = (0..PARTITIONS)
            .map(|p| format!("lakesink/{topic}/{p}"))
            .collect();
        let table = table_of(&base, topic).read_delta(&app_ids);
        assert_exactly_once(&table, produced);
        for (p, app) in app_ids.iter().enumerate() {
            let last = produced
                .keys()
                .filter(|(q, _)| *q == p as i32)
                .map(|(_, o)| *o)
                .max();
            assert_eq!(
                table["txn"][app].as_i64(),
                last,
                "{topic}: {}",
                table["txn"]
            );
        }
    }
    assert!(!log.contains("AKIA"), "a secret leaked into the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_regex_sink_without_a_per_topic_table_is_refused_at_start() {
    let cfg = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "g"

[[sink]]
name = "shop"
kind = "delta"
format = "json"
schema = {{ id = "long" }}
topics_regex = 'shop\..*'
table = "file:///tmp/lake/shop"
"#,
        kafka = kafka(),
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let status = proc_.child.wait().unwrap();
    let log = proc_.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("sink[0].table") && log.contains("{topic}"),
        "the error names the key and the fix: {log}"
    );
}
