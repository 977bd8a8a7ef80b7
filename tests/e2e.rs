//! End to end against real services: Apache Kafka, the registry, moto (S3), Azurite (Azure
//! Blob), fake-gcs-server (GCS) and local disk; what lands is read back by pyarrow and DuckDB.

mod common;

use std::time::Duration;

use common::*;

const PARTITIONS: i32 = 3;

async fn sink_table_exactly_once(store: Store, n: i64) {
    let topic = unique("orders");
    create_topic(&topic, PARTITIONS).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..n, PARTITIONS).await;
    assert_eq!(produced.len() as i64, n);
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        n as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    let log = proc_.stop();
    assert!(
        !log.contains("AKIA") && !log.contains(AZURITE_KEY),
        "a secret leaked into the log"
    );
    let table = store.read();
    assert_exactly_once(&table, &produced);
    // Nothing staged is left once everything is published, and the markers account for every row.
    assert_eq!(committed_rows(&store, &topic).await, n as u64);
    let files = table["files"].as_array().unwrap();
    assert!(
        !files
            .iter()
            .any(|f| f.as_str().unwrap().contains("staging")),
        "staged files left behind: {files:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_exactly_once_with_every_avro_type() {
    sink_table_exactly_once(Store::s3("orders"), 1500).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_exactly_once_with_every_avro_type() {
    sink_table_exactly_once(Store::azure("orders"), 1500).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gcs_exactly_once_with_every_avro_type() {
    sink_table_exactly_once(Store::gcs("orders"), 1500).await;
}

/// Producers compress batches with gzip, snappy, lz4 or zstd; one topic holds batches of all
/// four (and uncompressed ones), and every record lands exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn batches_of_every_compression_codec_are_consumed() {
    let store = Store::local("orders");
    let topic = unique("codecs");
    create_topic(&topic, PARTITIONS).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let mut produced = Produced::new();
    for (i, codec) in ["none", "gzip", "snappy", "lz4", "zstd"].iter().enumerate() {
        let ids = (i as i64 * 300)..(i as i64 * 300 + 300);
        produced.extend(produce_compressed(&topic, id, ids, PARTITIONS, codec).await);
    }
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, 1500, &mut proc_, Duration::from_secs(120)).await;
    let log = proc_.stop();
    assert!(
        !log.contains("Decompression") && !log.contains("Not implemented"),
        "a codec was not decoded:\n{log}"
    );
    assert_exactly_once(&store.read(), &produced);
}

#[tokio::test(flavor = "multi_thread")]
async fn local_exactly_once_with_every_avro_type() {
    sink_table_exactly_once(Store::local("orders"), 1500).await;
}

/// SIGKILL at a point of the commit protocol, check that nothing uncommitted is visible, then
/// restart and check exactly once.
async fn crash_at(point: &str) {
    let store = Store::s3("orders");
    let topic = unique("crash");
    let n = 2000;
    create_topic(&topic, PARTITIONS).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..n, PARTITIONS).await;
    let group = unique("g");
    let cfg = config(&topic, &group, &registry_url, &store, "");

    let mut first = Lakesink::start(&cfg, &[("LAKESINK_TEST_CRASHPOINT", &format!("{point}:3"))]);
    first.wait_for_line(&format!("CRASHPOINT {point}"), Duration::from_secs(120));
    first.kill9();

    // After the kill: no duplicates, nothing that was never produced, nothing staged visible.
    let table = store.read();
    let rows = table["rows"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for r in rows {
        let key = (r["p"].as_i64().unwrap() as i32, r["o"].as_i64().unwrap());
        assert!(
            produced.contains_key(&key),
            "visible row {key:?} was never produced"
        );
        assert!(
            seen.insert(key),
            "duplicate visible row {key:?} after kill at {point}"
        );
    }
    let committed = committed_rows(&store, &topic).await;
    assert!(
        (rows.len() as u64) <= committed,
        "{} rows visible but only {committed} committed after kill at {point}",
        rows.len()
    );
    if point != "mid_publish" {
        // Every committed marker but one in flight is fully published.
        assert!(
            rows.len() as u64 >= committed.saturating_sub(400 * 3),
            "{} visible of {committed}",
            rows.len()
        );
    }

    let mut second = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        n as u64,
        &mut second,
        Duration::from_secs(120),
    )
    .await;
    second.stop();
    assert_exactly_once(&store.read(), &produced);
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_staging_loses_and_duplicates_nothing() {
    crash_at("after_stage").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_marker_is_published_on_restart() {
    crash_at("after_marker").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_during_publishing_is_finished_on_restart() {
    crash_at("mid_publish").await;
}

/// Background compaction of a Parquet table on S3 (moto), SIGKILLed between publishing its
/// merged file and deleting the files it merged: the restart finishes it, and pyarrow and
/// DuckDB read every record exactly once, from fewer files than the flushes wrote.
#[tokio::test(flavor = "multi_thread")]
async fn parquet_compaction_killed_mid_way_is_finished_on_restart() {
    let store = Store::s3("orders");
    let topic = unique("compact");
    let n = 2400;
    create_topic(&topic, PARTITIONS).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let group = unique("g");
    let cfg = config(
        &topic,
        &group,
        &registry_url,
        &store,
        "parquet = { auto_compact = true, compact_min_files = 4, compact_min_age = \"1s\" }",
    );
    let mut first = Lakesink::start(&cfg, &[("LAKESINK_TEST_CRASHPOINT", "mid_compaction:1")]);
    // Flushes of 400 rows over 4 days: the first half is committed in about 3 files per day,
    // which age past `compact_min_age` before the second half's commits start a compaction.
    let mut produced = produce(&topic, id, 0..n / 2, PARTITIONS).await;
    wait_rows(
        &store,
        &topic,
        n as u64 / 2,
        &mut first,
        Duration::from_secs(120),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    produced.extend(produce(&topic, id, n / 2..n, PARTITIONS).await);
    first.wait_for_line("CRASHPOINT mid_compaction", Duration::from_secs(120));
    first.kill9();
    // Killed with the merged file published and its sources not deleted yet: a directory
    // lister sees those rows twice until the compaction is finished.
    let killed = store.read();
    assert!(
        killed["rows"].as_array().unwrap().len() > committed_rows(&store, &topic).await as usize,
        "the kill left the merged file beside its sources"
    );

    // Every record was committed before the kill: the restart finishes the compaction when it
    // recovers its partitions, with nothing more to consume.
    let mut second = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        n as u64,
        &mut second,
        Duration::from_secs(120),
    )
    .await;
    let t = store.table_store();
    let open = t.path(["_lakesink", "compactions", "_open"]);
    let started = std::time::Instant::now();
    loop {
        use futures::TryStreamExt;
        let left: Vec<_> = t.store.list(Some(&open)).try_collect().await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the interrupted compaction is still open after 60s:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    second.stop();
    let table = store.read();
    assert_exactly_once(&table, &produced);
    let files: Vec<&str> = table["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    assert!(
        files.iter().any(|f| f.contains("compacted-")),
        "no merged file: {files:?}"
    );
}

/// `/metrics`' value of `name` (a sink counter of the sink `orders`), 0 when not served yet.
async fn sink_counter(base: &str, name: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("{base}/metrics")).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    let series = format!("{name}{{sink=\"orders\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Produces `ids` in 8 parts a quarter second apart: a stream the writers keep up with (near
/// the log end, where they pack under memory pressure), not a backlog.
async fn streamed(
    topic: &str,
    id: schema_registry::SchemaId,
    ids: std::ops::Range<i64>,
    p: i32,
) -> Produced {
    let step = (ids.end - ids.start) / 8;
    let mut out = Produced::new();
    for part in 0..8 {
        let from = ids.start + part * step;
        let to = if part == 7 { ids.end } else { from + step };
        out.extend(produce(topic, id, from..to, p).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    out
}

/// Streaming into a Delta table with a memory budget smaller than a tick's rows: the writers
/// pack their buffers instead of flushing them, so the rows still go into the tick's shared
/// files (a file per table partition per tick, not one per Kafka partition per memory flush).
/// A SIGKILL while rows are packed loses nothing that was committed and the restart reads the
/// rest again: python deltalake and DuckDB read every record exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn packed_buffers_wait_for_the_tick_and_survive_a_kill() {
    const P: i32 = 4;
    let n = 40_000;
    let store = Store::local("packed");
    let topic = unique("packed");
    create_topic(&topic, P).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let group = unique("g");
    let cfg = config(&topic, &group, &registry_url, &store, "kind = \"delta\"")
        .replace(
            r#"max_rows = 400, max_latency = "1s""#,
            r#"max_rows = 1000000, max_latency = "10s""#,
        )
        .replace(
            "drain_timeout = \"20s\"",
            "drain_timeout = \"20s\"\nmax_buffer_bytes = \"8MiB\"",
        );
    let reader = store.delta_sink(&group);
    // On the epoch grid, so that `just_after_latency_tick` knows the process's ticks.
    let (mut first, base) = Lakesink::start_serving(&cfg, &[("LAKESINK_TICK_PHASE", "0")]);
    // Writers pack only near their log end, which they know from the consumer's end-offset
    // reports (every 5 s): stream once the first report is in.
    let started = std::time::Instant::now();
    loop {
        let text = match reqwest::get(format!("{base}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains(&format!("lakesink_consumer_lag{{topic=\"{topic}\"")) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no end offsets reported:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Records produced just after a tick reach the writers before the next one.
    just_after_latency_tick(Duration::from_secs(10)).await;
    let mut produced = streamed(&topic, id, 0..n, P).await;
    wait_delta(
        &reader,
        &topic,
        &produced,
        &mut first,
        Duration::from_secs(180),
    )
    .await;
    let packed = sink_counter(&base, "lakesink_packed_bytes_total").await;
    assert!(packed > 0.0, "nothing was packed:\n{}", first.log());
    let table = store.read_delta(&[]);
    let days = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["day"].as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let files = table["files"].as_u64().unwrap();
    // One tick's group: a file per table partition (memory flushes would each add a file per
    // table partition of their own).
    assert!(
        files < 2 * days,
        "{files} files in {days} table partitions for {n} rows read within one tick"
    );

    // Killed while rows wait packed: they are not committed, and are read again.
    produced.extend(streamed(&topic, id, n..2 * n, P).await);
    let started = std::time::Instant::now();
    while sink_counter(&base, "lakesink_packed_bytes_total").await <= packed {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing more was packed:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill9();
    let mut second = Lakesink::start(&cfg, &[]);
    wait_delta(
        &reader,
        &topic,
        &produced,
        &mut second,
        Duration::from_secs(180),
    )
    .await;
    second.stop();
    let ids: Vec<String> = (0..P).map(|p| format!("lakesink/{topic}/{p}")).collect();
    assert_exactly_once(&store.read_delta(&ids), &produced);
}
