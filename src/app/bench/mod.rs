//! `lakesink bench`: a seeded order-line workload through the real pipeline, next to a plain
//! librdkafka consume loop over the same topic, in one run.
//!
//! Two processes, so the figures are the pipeline's own:
//! - the *feed* (`lakesink bench-feed`, a child process) hosts the in-process Kafka (librdkafka's
//!   mock cluster) or uses a real broker (`--broker`), produces the workload, times the plain
//!   consume loop (the ceiling), then keeps the cluster alive until its stdin closes;
//! - this process runs the pipeline (consumer group → decode → sink) until every partition is
//!   committed, and measures records/s, MB/s of input, CPU seconds and peak RSS of itself only
//!   (the workload held by the broker is not counted against lakesink).
//!
//! Workloads (`--format`): `avro` (Confluent-framed, the demo's schema: decimal, timestamp,
//! date, enum, nullable record, array, map; ~94 bytes), `json` (flat order lines, ~190 bytes,
//! declared schema), `debezium` (the same rows in Debezium JSON envelopes, ~330 bytes) and
//! `protobuf` (Confluent-framed, the same fields, `crate::app::workload::ORDER_PROTO`).
//! Every record is a pure function of its id (`crate::app::workload`).

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use arrow::record_batch::RecordBatch;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use schema_registry::{wire, RegistryClient, RegistryConfig, SchemaId};
use std::collections::HashMap;
use tokio_util::sync::CancellationToken;

use super::demo::demo_config;
use crate::app::workload::{order_schema, Order, ORDER_JSON_SCHEMA, ORDER_SCHEMA};
use crate::config::Config;
use crate::kafka::SourceOptions;
use crate::pipeline::Progress;

mod contention;
mod feed;
mod isolate;
mod measure;
mod members;
mod steady;
mod workload;

pub use contention::contention;
pub use feed::*;
pub use isolate::*;
pub use measure::*;
pub use steady::{steady_upsert, Load};
pub use workload::*;

/// What `lakesink bench` runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub records: u64,
    pub partitions: i32,
    /// `avro`, `json` or `debezium`.
    pub format: String,
    /// `parquet`, `delta` or `databend`.
    pub kind: String,
    /// `append`, or `upsert` keyed by `order_id` (delta and databend).
    pub mode: String,
    /// The Databend endpoint for `kind = databend` (`http://user:password@host:port`).
    pub databend: Option<String>,
    /// A real broker's bootstrap servers instead of the in-process cluster.
    pub broker: Option<String>,
    /// Latency mode: produce at this many records/s while the pipeline runs (instead of a
    /// backlog), with `flush.max_latency = max_latency`, and report freshness.
    pub rate: Option<u64>,
    pub max_latency: String,
    /// Topics, each sunk into its own table (`orders` with one, `orders_00`.. with more).
    pub tables: u32,
    /// With several tables: one `topics_regex` sink whose table template gives each topic its
    /// own table (a whole database in one sink), instead of one sink per topic.
    pub one_sink: bool,
    /// Extra `[pipeline]` settings (TOML lines), e.g. `max_buffer_bytes = "32MiB"`.
    pub pipeline: Option<String>,
    /// Extra settings of every sink (TOML lines), e.g. `delta = { shared_files = false }`.
    pub sink: Option<String>,
    /// Scale-out mode: for each count in turn, that many member processes in one group (see
    /// [`members`]); empty for the in-process pipeline.
    pub members: Vec<u32>,
    /// With `members`: each member's CPU share in cores (a cgroup quota).
    pub member_cpus: Option<f64>,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let Options {
        records,
        ref format,
        ref kind,
        ref mode,
        ..
    } = opts;
    anyhow::ensure!(
        matches!(format.as_str(), "avro" | "json" | "debezium" | "protobuf"),
        "--format must be avro, json, debezium or protobuf, not `{format}`"
    );
    anyhow::ensure!(
        matches!(kind.as_str(), "parquet" | "delta" | "databend"),
        "--kind must be parquet, delta or databend, not `{kind}`"
    );
    anyhow::ensure!(
        mode == "append" || (mode == "upsert" && kind != "parquet"),
        "--mode must be append, or upsert with --kind delta or databend"
    );
    let partitions = match opts.broker {
        Some(_) => opts.partitions,
        None => partitions_for(
            records.div_ceil(u64::from(opts.tables.max(1))),
            format,
            opts.partitions,
        ),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let topic = format!("bench.orders.{format}.{stamp}");
    let (addr, _registry) = schema_registry::server::spawn("127.0.0.1:0".parse()?, None).await?;
    let registry_url = format!("http://{addr}");
    let all_topics = topics(&topic, opts.tables);
    let registry = RegistryClient::new(RegistryConfig::new(&registry_url))?;
    let mut schema_id = None;
    for t in &all_topics {
        let id = register_order_schema(&registry, &format!("{t}-value"), format).await?;
        schema_id.get_or_insert(id);
    }
    let schema_id = schema_id.context("at least one topic")?;

    eprintln!("bench: producing {records} {format} records to {partitions} partitions ...");
    let mut feed_args = vec![
        "bench-feed".to_string(),
        "--topic".into(),
        topic.clone(),
        "--partitions".into(),
        partitions.to_string(),
        "--records".into(),
        records.to_string(),
        "--format".into(),
        format.clone(),
        "--schema-id".into(),
        schema_id.0.to_string(),
    ];
    if let Some(b) = &opts.broker {
        feed_args.extend(["--broker".into(), b.clone()]);
    }
    if let Some(r) = opts.rate {
        feed_args.extend(["--rate".into(), r.to_string()]);
    }
    feed_args.extend(["--tables".into(), opts.tables.max(1).to_string()]);
    if mode == "upsert" {
        feed_args.push("--keyed".into());
    }
    let mut child = Command::new(std::env::current_exe()?)
        .args(&feed_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the bench feed process")?;
    let mut stdin = child.stdin.take();
    let mut stdout = BufReader::new(child.stdout.take().context("feed stdout")?);
    let report: FeedReport = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("bench feed said `{line}`"))
    })
    .await??;

    let dir = tempfile::tempdir()?;
    let table = dir.path().join("orders");
    // A fresh database per run: the ledger and the table start empty.
    let database = format!("lakesink_bench_{stamp}");
    let sink = sink_config(
        // A group of its own: bench runs sharing a broker never rebalance each other.
        demo_config(
            &report.bootstrap,
            &registry_url,
            &table,
            &format!("lakesink-bench-{stamp}"),
        )
        .replace("demo.orders", &topic),
        &opts,
        &database,
    )?;
    let text = match opts.one_sink && all_topics.len() > 1 {
        true => one_sink(&sink, &topic),
        false => per_table(&sink, &topic, &all_topics),
    };
    let text = match &opts.sink {
        Some(extra) => text.replace("[[sink]]", &format!("[[sink]]\n{extra}")),
        None => text,
    };
    let text = match &opts.pipeline {
        Some(extra) => text.replacen("[[sink]]", &format!("[pipeline]\n{extra}\n\n[[sink]]"), 1),
        None => text,
    };
    let cfg = Config::from_toml(&text)?.validate()?;
    if !opts.members.is_empty() {
        let result = members::scale_out(&opts, &text, records, dir.path()).await;
        drop(stdin);
        let _ = child.wait();
        return result;
    }
    let progress = Arc::new(Progress::default());
    reset_peak_rss();
    let rss_before = peak_rss().unwrap_or(0);
    // Time from the first record in: the group join is not throughput.
    let first_record = {
        let progress = progress.clone();
        tokio::spawn(async move {
            while progress.records_in.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let idle = progress.poll_idle_ns.load(Ordering::Relaxed);
            (Instant::now(), cpu_seconds().unwrap_or(0.0), idle)
        })
    };
    // When every record has been handed to a worker and decoded (the rest is the final flush),
    // and how long the poll thread had waited for records by then.
    let all_in = {
        let progress = progress.clone();
        tokio::spawn(async move {
            while progress.records_in.load(Ordering::Relaxed) < records {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (
                Instant::now(),
                progress.poll_idle_ns.load(Ordering::Relaxed),
            )
        })
    };
    // When every partition is committed up to its end (catch-up runs); the rest is shutdown.
    let all_committed = {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                let (done, total) = progress.catch_up_progress();
                if total > 0 && done >= total {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Per-thread CPU from the first record on, sampled while the threads live (librdkafka's
    // exit with the consumer, before the report): every 50 ms, every 2 ms once all is in.
    let split = Arc::new(std::sync::Mutex::new(CpuSplit::default()));
    let sampler = {
        let (progress, split, feed_pid) = (progress.clone(), split.clone(), child.id());
        tokio::spawn(async move {
            while progress.records_in.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            {
                let mut s = split.lock().expect("split");
                s.start = thread_cpu_table();
                s.feed_start = process_cpu_seconds(feed_pid);
                s.encode_start = sinks::encode::totals().cpu_ns;
            }
            loop {
                let (table, feed) = (thread_cpu_table(), process_cpu_seconds(feed_pid));
                {
                    let mut s = split.lock().expect("split");
                    s.last.extend(table);
                    s.feed_last = feed.or(s.feed_last);
                }
                // Once all is committed the consumer's threads exit within milliseconds: sample
                // them often enough that a short run still sees their CPU.
                let (done, total) = progress.catch_up_progress();
                let step = if total > 0 && done >= total { 2 } else { 50 };
                tokio::time::sleep(Duration::from_millis(step)).await;
            }
        })
    };
    let timeline = std::env::var_os("LAKESINK_BENCH_TIMELINE").map(|path| {
        let progress = progress.clone();
        tokio::spawn(async move { write_timeline(path.into(), progress).await })
    });
    let cancel = CancellationToken::new();
    let mut producing = None;
    if opts.rate.is_some() {
        // Start producing once the group has assigned the partitions; stop when all is in.
        let (progress, cancel) = (progress.clone(), cancel.clone());
        let mut go = stdin.take().context("feed stdin")?;
        producing = Some(tokio::spawn(async move {
            while !progress.health.assigned.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = std::io::Write::write_all(&mut go, b"go\n");
            while progress.rows_committed.load(Ordering::Relaxed) < records {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cancel.cancel();
            // Returned, not dropped: the cluster must outlive the pipeline's shutdown (its
            // final offset commit and group leave).
            go
        }));
    }
    let result = super::run(
        cfg,
        SourceOptions {
            until_caught_up: opts.rate.is_none(),
            topic_ids: opts.broker.is_some(),
        },
        cancel,
        progress.clone(),
    )
    .await;
    // The pipeline is done; the feed process's exit below is not its time.
    let ended = Instant::now();
    if let Some(p) = producing {
        drop(p.await?);
    }
    sampler.abort();
    if let Some(t) = timeline {
        t.abort();
    }
    drop(stdin);
    let _ = child.wait();
    result?;
    let (started, cpu0, idle0) = first_record.await?;
    let elapsed = ended.duration_since(started).as_secs_f64();
    let (consumed, idle1) = all_in.await?;
    let consumed = consumed.duration_since(started).as_secs_f64();
    let fetch_wait = idle1.saturating_sub(idle0) as f64 / 1e9;
    all_committed.abort();
    let committed = all_committed
        .await
        .ok()
        .map(|t| t.duration_since(started).as_secs_f64());
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu0;
    let rows = progress.rows_committed.load(Ordering::Relaxed);
    // In latency mode the feed does not time a plain loop; count the input here.
    let input_bytes = match report.bytes {
        0 => progress.bytes_in.load(Ordering::Relaxed),
        b => b,
    };
    let mb = input_bytes as f64 / 1e6;
    let dest = match kind.as_str() {
        "databend" => format!("Databend table {database}.orders"),
        _ => format!("local {kind} table (day partitions)"),
    };
    let broker = match &opts.broker {
        Some(b) => format!("broker {b}"),
        None => "in-process Kafka (a separate process)".into(),
    };
    println!(
        "lakesink bench: {records} {format} order lines ({:.0} bytes each), {} topic(s) x {partitions} partitions, {broker} -> {dest}, {mode}",
        input_bytes as f64 / records as f64,
        all_topics.len()
    );
    println!(
        "  pipeline:  {rows} rows in {elapsed:.2} s from the first record = {:.0} records/s, {:.1} MB/s of input, {cpu:.2} CPU s ({:.2} cores)",
        rows as f64 / elapsed,
        mb / elapsed,
        cpu / elapsed
    );
    match committed {
        Some(committed) => println!(
            "  phases:    every record decoded after {consumed:.2} s; the last commit {:.2} s \
             later; stopped {:.2} s after it (the caught-up check, the drain, leaving the group)",
            committed - consumed,
            elapsed - committed
        ),
        None => println!(
            "  phases:    every record decoded after {consumed:.2} s; the last commit and the \
             shutdown {:.2} s later",
            elapsed - consumed
        ),
    }
    let (mut files, mut out_bytes) = (
        progress.files_committed.load(Ordering::Relaxed),
        progress.bytes_committed.load(Ordering::Relaxed),
    );
    let mut what = "";
    // The Delta tables of the run.
    let tables: Vec<std::path::PathBuf> = match all_topics.len() {
        1 => vec![table.clone()],
        _ => std::fs::read_dir(dir.path())?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("_delta_log").is_dir())
            .collect(),
    };
    if kind == "delta" && mode == "upsert" {
        // An upsert's files are written by its commit, which replaces files: count what the
        // tables reference at the end.
        (files, out_bytes, what) = (0, 0, " in the tables at the end");
        for t in &tables {
            let url = url::Url::from_directory_path(t)
                .map_err(|()| anyhow::anyhow!("{} is not an absolute path", t.display()))?;
            let (n, b) = sinks::delta::live_files(url.as_str())
                .await
                .context("listing the upserted table's files")?;
            files += n as u64;
            out_bytes += b;
        }
    }
    if kind == "parquet" {
        // What a directory lister reads at the end: the flushes' files, less what background
        // compaction (`[sink.parquet] auto_compact`) merged.
        let (n, bytes, largest) = measure::listed_parquet(dir.path());
        println!(
            "  listed:    {n} Parquet files in the table directories at the end, {:.1} MB ({:.1} MB per file, the largest {:.1} MB)",
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / n.max(1) as f64,
            largest as f64 / 1e6
        );
    }
    let log_entries = match kind.as_str() {
        "delta" => format!(" in {} Delta log entries", delta_log_entries(dir.path())),
        _ => String::new(),
    };
    println!(
        "  output:    {files} files, {:.1} MB of Parquet ({:.1} MB per file){what}, {} commits{log_entries}",
        out_bytes as f64 / 1e6,
        out_bytes as f64 / 1e6 / files.max(1) as f64,
        progress.commits.load(Ordering::Relaxed)
    );
    println!(
        "  peak RSS:  {:.1} MiB (the pipeline process, pipeline phase; {:.1} MiB before it)",
        peak_rss().unwrap_or(0) as f64 / (1 << 20) as f64,
        rss_before as f64 / (1 << 20) as f64
    );
    println!("  allocator: {}", allocator());
    println!("{}", split.lock().expect("split").report(rows, elapsed));
    println!(
        "  stalls:    the poll thread waited {:.2} s on full worker queues (backpressure) and, \
         until every record was read, {fetch_wait:.2} s for records to be fetched; flushes \
         waited {:.2} s for an encode permit (summed over flushes)",
        progress.backpressure_ns.load(Ordering::Relaxed) as f64 / 1e9,
        sinks::encode::totals().wait_ns as f64 / 1e9
    );
    if let Some(rate) = opts.rate {
        let stats = progress.sink("orders");
        let (count, mean) = stats.freshness_seconds.summary();
        println!(
            "  latency:   produced at {rate} records/s with max_latency = {}: {count} commits; produce-to-committed of the oldest record per commit: mean {:.2} s, max {:.2} s",
            opts.max_latency,
            mean,
            progress.max_freshness_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        // Files a table gets in steady streaming: a Parquet table one per Kafka partition per
        // table partition per flush; a Delta table one per table partition per latency tick
        // (`delta.shared_files`).
        let written = table_partitions(&tables)?;
        println!(
            "  files:     {files} files committed in {elapsed:.1} s into {written} table \
             partition(s) from {partitions} Kafka partitions: {:.0} files per table partition \
             per hour at {rate} records/s",
            files as f64 / written.max(1) as f64 * 3600.0 / elapsed
        );
        let (arrow_bytes, packed_size) = (
            stats.packed_bytes.load(Ordering::Relaxed) as f64,
            stats.packed_size_bytes.load(Ordering::Relaxed) as f64,
        );
        println!(
            "  packed:    {:.1} MB of buffered Arrow packed under memory pressure to wait for \
             the tick, into {:.1} MB ({:.1}x smaller)",
            arrow_bytes / 1e6,
            packed_size / 1e6,
            arrow_bytes / packed_size.max(1.0)
        );
        return Ok(());
    }
    let bs = report.baseline_secs;
    println!(
        "  baseline:  plain librdkafka consume loop {:.0} records/s ({mb:.1} MB in {bs:.2} s, \
         {:.2} us CPU per record with the broker serving it); pipeline/baseline = {:.2}",
        records as f64 / bs,
        report.baseline_cpu_secs * 1e6 / records as f64,
        (rows as f64 / elapsed) / (records as f64 / bs)
    );
    // Upserts keep one row per key and Debezium tombstones none; appends every record.
    if mode == "append" {
        anyhow::ensure!(rows == records, "committed {rows} rows, expected {records}");
    }
    if mode == "append" && matches!(format.as_str(), "avro" | "json" | "protobuf") {
        // The same records decoded and encoded alone on one core: with the cheaper consumer's
        // CPU, the least CPU a record can cost on this machine today.
        let sample = records.min(200_000);
        let alone = measure_alone(sample, format).await?;
        let us = |secs: f64, n: u64| secs * 1e6 / n.max(1) as f64;
        let (plain_loop, ours, decode, encode) = (
            us(report.baseline_cpu_secs, records),
            us(split.lock().expect("split").consume_ns() as f64 / 1e9, rows),
            us(alone.decode_cpu, sample),
            us(alone.encode_cpu, sample),
        );
        // Consuming costs at least what the cheaper of the two consumers spent.
        let consume = plain_loop.min(ours);
        let floor = consume + decode + encode;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let spent = us(cpu, rows);
        println!(
            "  floor:     consume {consume:.2} + decode alone {decode:.2} + encode alone \
             {encode:.2} = {floor:.2} us CPU per record: at most {:.0} records/s on {cores} \
             cores; this run spent {spent:.2} us per record ({:.2}x the floor). Consume is the \
             cheaper of the plain loop ({plain_loop:.2}, with the broker serving it) and this \
             run's poll and librdkafka threads ({ours:.2})",
            cores as f64 * 1e6 / floor,
            spent / floor
        );
    }
    if kind == "delta" && mode == "upsert" {
        check_upserted(&tables, records).await?;
    }
    Ok(())
}

/// The table partitions (directories holding data files, outside `_`-prefixed metadata and
/// staging directories) of `tables`.
fn table_partitions(tables: &[std::path::PathBuf]) -> anyhow::Result<usize> {
    fn walk(
        dir: &std::path::Path,
        out: &mut std::collections::HashSet<std::path::PathBuf>,
    ) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('_') {
                continue;
            }
            if entry.file_type()?.is_dir() {
                walk(&entry.path(), out)?;
            } else if name.to_string_lossy().ends_with(".parquet") {
                out.insert(dir.to_path_buf());
            }
        }
        Ok(())
    }
    let mut dirs = std::collections::HashSet::new();
    for t in tables {
        walk(t, &mut dirs)?;
    }
    Ok(dirs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sink_section_per_table_and_a_valid_config() {
        let base = demo_config(
            "127.0.0.1:9092",
            "http://127.0.0.1:8081",
            std::path::Path::new("/tmp/b/orders"),
            "g",
        )
        .replace("demo.orders", "bench.t");
        let names = topics("bench.t", 3);
        assert_eq!(names, ["bench.t.t00", "bench.t.t01", "bench.t.t02"]);
        assert_eq!(topics("bench.t", 1), ["bench.t"]);
        let text = per_table(&base, "bench.t", &names);
        let cfg = Config::from_toml(&text).unwrap().validate().unwrap();
        assert_eq!(cfg.sinks.len(), 3);
        for (i, s) in cfg.sinks.iter().enumerate() {
            assert_eq!(s.name, format!("orders_{i:02}"));
            assert!(s.topics.matches(&names[i]));
            assert!(!s.topics.matches(&names[(i + 1) % 3]));
        }
        assert!(text.contains("file:///tmp/b/orders_02"), "{text}");
        assert_eq!(per_table(&base, "bench.t", &topics("bench.t", 1)), base);
    }
}
