//! `lakesink bench`: N Avro order events through the real pipeline (in-process Kafka -> local
//! Parquet), next to a plain librdkafka consume loop over the same topic in the same run.
//! Prints records/s, MB/s of input, CPU seconds and peak RSS.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use schema_registry::{RegistryClient, RegistryConfig};
use tokio_util::sync::CancellationToken;

use super::demo::{demo_config, produce_orders, TOPIC};
use crate::config::Config;
use crate::pipeline::Progress;
use crate::source::SourceOptions;
use crate::workload::ORDER_SCHEMA;

/// Peak resident set size of this process in bytes (VmHWM).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak RSS counter (Linux `clear_refs` 5), so a phase can be measured alone.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU seconds of this process.
pub fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn baseline_consume(bootstrap: &str, expected: u64) -> anyhow::Result<(Duration, u64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "lakesink-bench-baseline")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[TOPIC])?;
    let mut started = Instant::now();
    let (mut n, mut bytes) = (0u64, 0u64);
    while n < expected {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            if n == 0 {
                // Time from the first record: the group join is not throughput.
                started = Instant::now();
            }
            bytes += m.payload().map_or(0, |p| p.len()) as u64;
            n += 1;
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("baseline consumer read only {n} of {expected} records in 10 minutes");
        }
    }
    Ok((started.elapsed(), bytes))
}

pub async fn run(records: u64, partitions: i32, kind: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(kind, "parquet" | "delta"),
        "--kind must be parquet or delta, not `{kind}`"
    );
    let partitions = super::demo::partitions_for(records, partitions);
    let cluster = MockCluster::new(1).context("cannot start the in-process Kafka")?;
    cluster.create_topic(TOPIC, partitions, 1)?;
    let bootstrap = cluster.bootstrap_servers();
    let (addr, _registry) = schema_registry::server::spawn("127.0.0.1:0".parse()?, None).await?;
    let registry_url = format!("http://{addr}");
    let id = RegistryClient::new(RegistryConfig::new(&registry_url))?
        .register(&format!("{TOPIC}-value"), ORDER_SCHEMA)
        .await?;
    {
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_blocking(move || {
            produce_orders(&bootstrap, TOPIC, id, 0..records as i64, |_| {})
        })
        .await??;
    }
    let (base_time, input_bytes) = {
        let b = bootstrap.clone();
        tokio::task::spawn_blocking(move || baseline_consume(&b, records)).await??
    };

    let dir = tempfile::tempdir()?;
    let table = dir.path().join("orders");
    let text = demo_config(&bootstrap, &registry_url, &table, "lakesink-bench")
        .replace("kind = \"parquet\"", &format!("kind = \"{kind}\""));
    let cfg = Config::from_toml(&text)?.validate()?;
    let progress = Arc::new(Progress::default());
    reset_peak_rss();
    // Time from the first record in: the group join is not throughput.
    let first_record = {
        let progress = progress.clone();
        tokio::spawn(async move {
            while progress.records_in.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (Instant::now(), cpu_seconds().unwrap_or(0.0))
        })
    };
    super::run(
        cfg,
        SourceOptions {
            until_caught_up: true,
        },
        CancellationToken::new(),
        progress.clone(),
    )
    .await?;
    let (started, cpu0) = first_record.await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu0;
    let rows = progress.rows_committed.load(Ordering::Relaxed);
    let mb = input_bytes as f64 / 1e6;
    println!("lakesink bench: {records} Avro order lines, {partitions} partitions, in-process Kafka -> local {kind} table (day partitions)");
    println!(
        "  pipeline:  {rows} rows in {elapsed:.2} s from the first record = {:.0} records/s, {:.1} MB/s of input, {cpu:.2} CPU s ({:.2} cores)",
        rows as f64 / elapsed,
        mb / elapsed,
        cpu / elapsed
    );
    println!(
        "  output:    {} files, {:.1} MB of Parquet, {} commits",
        progress.files_committed.load(Ordering::Relaxed),
        progress.bytes_committed.load(Ordering::Relaxed) as f64 / 1e6,
        progress.commits.load(Ordering::Relaxed)
    );
    println!(
        "  peak RSS:  {:.1} MiB (pipeline phase)",
        peak_rss().unwrap_or(0) as f64 / (1 << 20) as f64
    );
    let bs = base_time.as_secs_f64();
    println!(
        "  baseline:  plain librdkafka consume loop {:.0} records/s ({mb:.1} MB in {bs:.2} s); pipeline/baseline = {:.2}",
        records as f64 / bs,
        (rows as f64 / elapsed) / (records as f64 / bs)
    );
    anyhow::ensure!(rows == records, "committed {rows} rows, expected {records}");
    drop(cluster);
    Ok(())
}
