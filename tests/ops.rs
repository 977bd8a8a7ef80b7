//! Operations: the metrics endpoint scraped during a run matches the reconciled row counts, the
//! probes answer, and `lakesink status` reports the committed offsets and zero lag after
//! catch-up.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use schema_registry::wire;

/// Produces orders `0..n` round-robin over `partitions`, in batches (lz4-compressed, as
/// producers in the field send them). Returns each partition's end offset.
async fn produce_batched(
    topic: &str,
    id: schema_registry::SchemaId,
    n: i64,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .unwrap();
    let schema = lakesink::app::workload::order_schema();
    let payloads: Vec<(i32, Vec<u8>)> = (0..n)
        .map(|i| {
            let order = lakesink::app::workload::Order::generate(i).encode(&schema);
            ((i % partitions as i64) as i32, wire::frame(id, &order))
        })
        .collect();
    let sends = payloads.iter().map(|(p, payload)| {
        producer.send(
            FutureRecord::<(), _>::to(topic)
                .partition(*p)
                .payload(payload),
            Duration::from_secs(10),
        )
    });
    let mut ends = BTreeMap::new();
    for d in futures::future::join_all(sends).await {
        let d = d.unwrap();
        let end = ends.entry(d.partition).or_insert(0);
        *end = (*end).max(d.offset + 1);
    }
    ends
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_probes_and_status_match_what_landed() {
    let store = Store::local("orders");
    let topic = unique("ops");
    create_topic(&topic, 2).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let n = 300i64;
    let per_partition = produce_batched(&topic, id, n, 2).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    let cfg_path = scratch("ops").join("lakesink.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let mut proc_ = Lakesink::start_args(
        &[
            "run",
            "--config",
            cfg_path.to_str().unwrap(),
            "--http-listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ],
        &[],
    );
    wait_rows(
        &store,
        &topic,
        n as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Lag comes from librdkafka statistics every 5 s: wait for it to settle at zero.
    let start = Instant::now();
    let text = loop {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let lags: Vec<f64> = (0..2)
            .filter_map(|p| {
                metric(
                    &text,
                    &format!("lakesink_consumer_lag{{topic=\"{topic}\",partition=\"{p}\"}}"),
                )
            })
            .collect();
        if lags.len() == 2 && lags.iter().all(|l| *l == 0.0) {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "lag never reached 0:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        metric(&text, "lakesink_rows_written_total{sink=\"orders\"}"),
        Some(n as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "lakesink_records_consumed_total{sink=\"orders\"}"),
        Some(n as f64),
        "{text}"
    );
    let commits = metric(&text, "lakesink_commits_total{sink=\"orders\"}").unwrap();
    assert_eq!(
        metric(&text, "lakesink_commit_seconds_count{sink=\"orders\"}"),
        Some(commits),
        "{text}"
    );
    assert!(commits >= 2.0, "{text}");
    // Every commit reports how stale the table was (records carry producer timestamps).
    assert_eq!(
        metric(&text, "lakesink_freshness_seconds_count{sink=\"orders\"}"),
        Some(commits),
        "{text}"
    );
    assert_eq!(metric(&text, "lakesink_ready"), Some(1.0));
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("lakesink_errors_total{")),
        "no fatal errors: {text}"
    );

    // `status`: committed offsets per partition and zero lag.
    let out = lakesink_cli(
        &["status", "--json", "--config", cfg_path.to_str().unwrap()],
        &[],
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        let p = r["partition"].as_i64().unwrap() as i32;
        assert_eq!(r["committed"], per_partition[&p], "{r}");
        assert_eq!(r["end"], per_partition[&p], "{r}");
        assert_eq!(r["lag"], 0, "{r}");
        let at = chrono::DateTime::parse_from_rfc3339(r["last_commit"].as_str().unwrap());
        let age = chrono::Utc::now().signed_duration_since(at.unwrap());
        assert!((0..300).contains(&age.num_seconds()), "{r}");
        assert!(r.get("quarantined").is_none(), "{r}");
    }
    let log = proc_.stop();
    // JSON logs: every line is a JSON object.
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}

/// SIGTERM mid-stream: readiness turns 503 while the process drains, it exits 0 within the
/// drain deadline, and after a restart every record is in the table exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_reports_not_ready_and_loses_nothing() {
    let store = Store::s3("orders");
    let topic = unique("term");
    create_topic(&topic, 3).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..3000, 3).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A long latency keeps data buffered, so the drain has real work to do.
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "")
        .replace("max_latency = \"1s\"", "max_latency = \"60s\"");
    let path = scratch("term").join("lakesink.toml");
    std::fs::write(&path, &cfg).unwrap();
    let args = [
        "run",
        "--config",
        path.to_str().unwrap(),
        "--http-listen",
        &format!("127.0.0.1:{port}"),
    ];
    let mut first = Lakesink::start_args(&args, &[]);
    wait_rows(&store, &topic, 800, &mut first, Duration::from_secs(120)).await;
    let url = format!("http://127.0.0.1:{port}/readyz");
    let http = reqwest::Client::new();
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    first.signal("TERM");
    let start = Instant::now();
    let mut saw_draining = false;
    let status = loop {
        if let Ok(r) = http.get(&url).send().await {
            saw_draining |= r.status() == 503;
        }
        if let Some(s) = first.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no exit within the drain deadline:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(status.success(), "{status}:\n{}", first.log());
    assert!(
        saw_draining,
        "readiness never reported 503 while draining:\n{}",
        first.log()
    );
    // What was buffered at SIGTERM was committed: at least everything consumed before.
    let committed = committed_rows(&store, &topic).await;
    assert!(committed > 800, "the drain committed nothing: {committed}");

    let mut second = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        produced.len() as u64,
        &mut second,
        Duration::from_secs(120),
    )
    .await;
    second.stop();
    assert_exactly_once(&store.read(), &produced);
}

/// `--until-caught-up` exits 0 on its own once every partition is committed to the end offset
/// it saw at start.
#[tokio::test(flavor = "multi_thread")]
async fn until_caught_up_exits_when_done() {
    let store = Store::local("orders");
    let topic = unique("backfill");
    create_topic(&topic, 2).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    produce_batched(&topic, id, 200, 2).await;
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    let path = scratch("backfill").join("lakesink.toml");
    std::fs::write(&path, &cfg).unwrap();
    let mut proc_ = Lakesink::start_args(
        &[
            "run",
            "--until-caught-up",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = proc_.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "still running:\n{}",
            proc_.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(status.success(), "{status}:\n{}", proc_.log());
    assert_eq!(committed_rows(&store, &topic).await, 200);
    assert!(proc_.log().contains("caught up"), "{}", proc_.log());
}

/// A restart onto tables that are up to date: until this member commits anything, the lag
/// metric counts from the tables' positions (0), not from offset 0 (every record of the log,
/// which would fire a lag alert on every deployment).
#[tokio::test(flavor = "multi_thread")]
async fn lag_after_a_restart_counts_from_the_tables_positions() {
    let store = Store::local("orders");
    let topic = unique("lag-restart");
    create_topic(&topic, 2).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    produce(&topic, id, 0..600, 2).await;
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    catch_up(&cfg, &[]);
    assert_eq!(committed_rows(&store, &topic).await, 600);

    let (proc_, base) = Lakesink::start_serving(&cfg, &[]);
    // The lag gauge appears with the first client statistics (every 5 s).
    let url = format!("{base}/metrics");
    let start = Instant::now();
    let text = loop {
        if let Ok(r) = reqwest::get(&url).await {
            let text = r.text().await.unwrap();
            if (0..2).all(|p| {
                text.contains(&format!(
                    "lakesink_consumer_lag{{topic=\"{topic}\",partition=\"{p}\"}}"
                ))
            }) {
                break text;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no lag gauge: {}",
            proc_.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    proc_.stop();
    for p in 0..2 {
        let lag = metric(
            &text,
            &format!("lakesink_consumer_lag{{topic=\"{topic}\",partition=\"{p}\"}}"),
        );
        assert_eq!(lag, Some(0.0), "partition {p}:\n{text}");
    }
}
