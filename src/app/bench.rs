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
//! declared schema) and `debezium` (the same rows in Debezium JSON envelopes, ~330 bytes).
//! Every record is a pure function of its id (`crate::workload`).

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
use crate::config::Config;
use crate::pipeline::Progress;
use crate::source::SourceOptions;
use crate::workload::{order_schema, Order, ORDER_JSON_SCHEMA, ORDER_SCHEMA};

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
    /// Extra `[pipeline]` settings (TOML lines), e.g. `max_buffer_bytes = "32MiB"`.
    pub pipeline: Option<String>,
}

/// The topics of a run over `tables` tables: `topic` itself for one.
pub fn topics(topic: &str, tables: u32) -> Vec<String> {
    match tables {
        0 | 1 => vec![topic.to_string()],
        n => (0..n).map(|i| format!("{topic}.t{i:02}")).collect(),
    }
}

/// Repeats the config's one `[[sink]]` section for every topic, each with its own name and
/// table (`orders_00`, ...).
fn per_table(text: &str, topic: &str, topics: &[String]) -> String {
    if topics.len() <= 1 {
        return text.to_string();
    }
    let at = text.find("[[sink]]").expect("a sink section");
    let (head, section) = text.split_at(at);
    let mut out = head.to_string();
    for (i, t) in topics.iter().enumerate() {
        let table_line = section
            .lines()
            .find(|l| l.starts_with("table = "))
            .expect("a table line");
        let at = table_line
            .rfind("orders")
            .expect("the table is named orders");
        let renamed = format!(
            "{}orders_{i:02}{}",
            &table_line[..at],
            &table_line[at + "orders".len()..]
        );
        out.push_str(
            &section
                .replace("name = \"orders\"", &format!("name = \"orders_{i:02}\""))
                .replace(
                    &format!("topics = [\"{topic}\"]"),
                    &format!("topics = [\"{t}\"]"),
                )
                .replace(table_line, &renamed),
        );
        out.push('\n');
    }
    out
}

/// The workload's value for order `id` in `format`.
fn payload(format: &str, id: i64, schema: &apache_avro::Schema, schema_id: SchemaId) -> Vec<u8> {
    let order = Order::generate(id);
    match format {
        "avro" => wire::frame(schema_id, &order.encode(schema)),
        "json" => order.json_line().into_bytes(),
        _ => {
            // Debezium JSON envelope (JSON converter without schemas); an order's first line
            // is a create, later lines of the same order id updates.
            let after = order.json_line();
            let op = if id % 3 == 0 { "c" } else { "u" };
            format!(
                r#"{{"before":null,"after":{after},"source":{{"connector":"mysql","db":"shop","table":"order_lines","ts_ms":{}}},"op":"{op}","ts_ms":{}}}"#,
                order.ts_ms, order.ts_ms
            )
            .into_bytes()
        }
    }
}

/// Bytes of one record of `format` (for sizing the in-process cluster's partitions).
fn record_bytes(format: &str) -> u64 {
    match format {
        "avro" => 100,
        "json" => 200,
        _ => 340,
    }
}

/// librdkafka's in-process cluster keeps at most 5 MiB and 100,000 records per partition and
/// silently drops older records, so larger runs are spread over more partitions.
pub fn partitions_for(records: u64, format: &str, at_least: i32) -> i32 {
    let per_partition = ((4 << 20) / record_bytes(format)).min(90_000);
    at_least.max(records.div_ceil(per_partition) as i32)
}

/// The sink section of the bench config for `opts`: the demo's Parquet sink rewritten.
fn sink_config(base: String, opts: &Options, database: &str) -> anyhow::Result<String> {
    // Default flush settings: memory pressure, not the demo's row limit, decides file sizes.
    let flush_line = base
        .lines()
        .find(|l| l.starts_with("flush = "))
        .map(|l| format!("{l}\n"))
        .unwrap_or_default();
    let flush = match opts.rate {
        Some(_) => format!("flush = {{ max_latency = \"{}\" }}\n", opts.max_latency),
        None => String::new(),
    };
    let mut text = base
        .replace(&flush_line, &flush)
        .replace("kind = \"parquet\"", &format!("kind = \"{}\"", opts.kind));
    match opts.format.as_str() {
        "json" => {
            text = text.replace(
                "format = \"avro\"",
                &format!("format = \"json\"\nschema = {ORDER_JSON_SCHEMA}"),
            )
        }
        "debezium" => {
            text = text.replace(
                "format = \"avro\"",
                &format!("format = \"debezium-json\"\nschema = {ORDER_JSON_SCHEMA}"),
            )
        }
        _ => {}
    }
    if opts.kind == "databend" {
        let url = opts
            .databend
            .as_deref()
            .context("--kind databend needs --databend http://user:password@host:port")?;
        let table_line = text
            .lines()
            .find(|l| l.starts_with("table = "))
            .context("demo config has a table")?
            .to_string();
        text = text
            .replace(
                &table_line,
                &format!(
                    "table = \"orders\"\ndatabend = {{ url = \"{}/{database}\" }}",
                    url.trim_end_matches('/')
                ),
            )
            .replace("partition_by = [\"day(ts)\"]\n", "");
    }
    if opts.mode == "upsert" {
        text = text.replace(
            "\nkind = ",
            "\nmode = \"upsert\"\nkey = [\"order_id\"]\nkind = ",
        );
    }
    Ok(text)
}

/// What the feed reports once the workload is in the broker.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct FeedReport {
    bootstrap: String,
    records: u64,
    bytes: u64,
    baseline_secs: f64,
    /// CPU seconds of the feed process while the plain loop ran: the loop's threads and the
    /// in-process broker serving it.
    baseline_cpu_secs: f64,
}

/// What `lakesink bench-feed` produces.
#[derive(Debug)]
pub struct Feed {
    /// A real broker instead of the in-process cluster.
    pub broker: Option<String>,
    pub topics: Vec<String>,
    pub partitions: i32,
    pub records: u64,
    pub format: String,
    pub schema_id: u32,
    pub rate: Option<u64>,
    /// Partition by the order key, as a keyed CDC producer does (upserts): the three changes of
    /// an order land in one partition. Otherwise record `id` goes to partition `id % P`.
    pub keyed: bool,
}

/// `lakesink bench-feed`: the child process. Starts the in-process cluster unless a broker is
/// given, creates the topics, produces the workload (record `id` to topic `id % topics`), times
/// a plain consume loop over it, prints a [`FeedReport`] line, and serves until stdin closes.
pub fn feed(f: Feed) -> anyhow::Result<()> {
    let Feed {
        broker,
        topics,
        partitions,
        records,
        ref format,
        schema_id,
        rate,
        keyed,
    } = f;
    let cluster = match &broker {
        Some(_) => None,
        None => Some(MockCluster::new(1).context("cannot start the in-process Kafka")?),
    };
    let bootstrap = match (&broker, &cluster) {
        (Some(b), _) => b.clone(),
        (None, Some(c)) => {
            for t in &topics {
                c.create_topic(t, partitions, 1)?;
            }
            c.bootstrap_servers()
        }
        (None, None) => unreachable!("a cluster or a broker"),
    };
    if broker.is_some() {
        for t in &topics {
            create_topic(&bootstrap, t, partitions)?;
        }
    }
    let n_topics = topics.len() as i64;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        // Large message sets: the in-process cluster finds a fetch offset by scanning its
        // message sets linearly, so many small ones make the broker the bottleneck.
        .set("linger.ms", if rate.is_some() { "5" } else { "200" })
        .set("batch.size", "4000000")
        .set("batch.num.messages", "100000")
        .set("message.max.bytes", "8000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
        .context("cannot create the bench producer")?;
    let schema = order_schema();
    let schema_id = SchemaId(schema_id);
    let mut stdin = std::io::stdin().lock();
    if rate.is_some() {
        // Latency mode: report now, produce when the pipeline has joined (a `go` line).
        let report = FeedReport {
            bootstrap: bootstrap.clone(),
            records,
            bytes: 0,
            baseline_secs: 0.0,
            baseline_cpu_secs: 0.0,
        };
        println!("{}", serde_json::to_string(&report)?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdin, &mut line)?;
    }
    let paced_from = Instant::now();
    for id in 0..records as i64 {
        if let Some(rate) = rate {
            let due = paced_from + Duration::from_secs_f64(id as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                producer.poll(due - now);
            }
        }
        let value = payload(format, id, &schema, schema_id);
        let key = Order::generate(id).order_id;
        let topic = &topics[(id % n_topics) as usize];
        let p = if keyed {
            // The three changes of an order (`o-{id / 3}`) land in one partition.
            ((id / 3 / n_topics) % partitions as i64) as i32
        } else {
            ((id / n_topics) % partitions as i64) as i32
        };
        super::demo::send(
            &producer,
            BaseRecord::to(topic)
                .partition(p)
                .key(key.as_str())
                .payload(value.as_slice()),
        )?;
        if id % 10_000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("cannot flush the bench producer")?;
    drop(producer);
    if rate.is_some() {
        let mut rest = Vec::new();
        let _ = stdin.read_to_end(&mut rest);
        drop(cluster);
        return Ok(());
    }
    let (elapsed, cpu, bytes) = baseline_consume(&bootstrap, &topics, records)?;
    let report = FeedReport {
        bootstrap,
        records,
        bytes,
        baseline_secs: elapsed.as_secs_f64(),
        baseline_cpu_secs: cpu,
    };
    println!("{}", serde_json::to_string(&report)?);
    // Serve until the parent closes our stdin (or dies).
    let mut rest = Vec::new();
    let _ = stdin.read_to_end(&mut rest);
    drop(cluster);
    Ok(())
}

fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("cannot create topic {t}: {e}");
        }
    }
    Ok(())
}

/// The ceiling: a plain consume loop that touches every payload and does nothing else. Returns
/// its time and this process's CPU seconds from the first record, and the payload bytes.
fn baseline_consume(
    bootstrap: &str,
    topics: &[String],
    expected: u64,
) -> anyhow::Result<(Duration, f64, u64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{}-baseline", topics[0]))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    let mut started = Instant::now();
    let mut cpu_at_start = 0.0;
    let (mut n, mut bytes) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(600);
    while n < expected {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            if n == 0 {
                // Time from the first record: the group join is not throughput.
                started = Instant::now();
                cpu_at_start = process_cpu_precise();
            }
            bytes += m.payload().map_or(0, |p| p.len()) as u64;
            n += 1;
        }
        if Instant::now() > deadline {
            bail!("baseline consumer read only {n} of {expected} records in 10 minutes");
        }
    }
    let cpu = process_cpu_precise() - cpu_at_start;
    Ok((started.elapsed(), cpu, bytes))
}

/// CPU seconds of this process's live threads, to the nanosecond (`/proc/self/stat` counts
/// 10 ms ticks). Threads that exit between two readings are not counted.
fn process_cpu_precise() -> f64 {
    thread_cpu_table().values().map(|(_, ns)| *ns).sum::<u64>() as f64 / 1e9
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
        matches!(format.as_str(), "avro" | "json" | "debezium"),
        "--format must be avro, json or debezium, not `{format}`"
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
        let id = registry
            .register(&format!("{t}-value"), ORDER_SCHEMA)
            .await?;
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
    let text = per_table(
        &sink_config(
            demo_config(&report.bootstrap, &registry_url, &table, "lakesink-bench")
                .replace("demo.orders", &topic),
            &opts,
            &database,
        )?,
        &topic,
        &all_topics,
    );
    let text = match &opts.pipeline {
        Some(extra) => text.replacen("[[sink]]", &format!("[pipeline]\n{extra}\n\n[[sink]]"), 1),
        None => text,
    };
    let cfg = Config::from_toml(&text)?.validate()?;
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
                s.encode_start = sinks::ENCODE_CPU_NS.load(Ordering::Relaxed);
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
    if kind == "delta" && mode == "upsert" && all_topics.len() == 1 {
        // An upsert's files are written by its commit, which replaces files: count what the
        // table references at the end.
        let url = url::Url::from_directory_path(&table)
            .map_err(|()| anyhow::anyhow!("{} is not an absolute path", table.display()))?;
        let (n, b) = sinks::delta::live_files(url.as_str())
            .await
            .context("listing the upserted table's files")?;
        (files, out_bytes, what) = (n as u64, b, " in the table at the end");
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
        sinks::ENCODE_WAIT_NS.load(Ordering::Relaxed) as f64 / 1e9
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
    if mode == "append" && matches!(format.as_str(), "avro" | "json") {
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
    if kind == "delta" && mode == "upsert" && all_topics.len() == 1 {
        check_upserted(&table, records).await?;
    }
    Ok(())
}

/// Reads back the upserted table: one row per order (`order_id = "o-{id / 3}"`), each the order's
/// last change (the largest `id`).
async fn check_upserted(table: &std::path::Path, records: u64) -> anyhow::Result<()> {
    let url = url::Url::from_directory_path(table)
        .map_err(|()| anyhow::anyhow!("{} is not an absolute path", table.display()))?;
    let out = sinks::delta::query(
        url.as_str(),
        "SELECT count(*), count(DISTINCT order_id), sum(id) FROM t",
    )
    .await
    .context("reading back the upserted table")?;
    let value = |c: usize| -> anyhow::Result<i64> {
        let v = arrow::compute::cast(out[0].column(c), &arrow::datatypes::DataType::Int64)?;
        Ok(v.as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .context("an Int64 column")?
            .value(0))
    };
    let (rows, orders, ids) = (value(0)?, value(1)?, value(2)?);
    let want_orders = records.div_ceil(3) as i64;
    let want_ids: i64 = (0..want_orders)
        .map(|k| (3 * k + 2).min(records as i64 - 1))
        .sum();
    anyhow::ensure!(
        (rows, orders, ids) == (want_orders, want_orders, want_ids),
        "the upserted table has {rows} rows of {orders} orders with ids summing to {ids}; \
         expected {want_orders} rows, one per order, summing to {want_ids}"
    );
    println!("  check:     {rows} rows, one per order, each its last change (read back)");
    Ok(())
}

/// Where the pipeline process's CPU went, by thread, plus the feed process (the broker).
#[derive(Default)]
struct CpuSplit {
    start: HashMap<u32, (String, u64)>,
    last: HashMap<u32, (String, u64)>,
    feed_start: Option<f64>,
    feed_last: Option<f64>,
    encode_start: u64,
}

impl CpuSplit {
    /// CPU nanoseconds of the tokio, librdkafka, poll and other threads.
    fn by_kind(&self) -> (u64, u64, u64, u64) {
        let (mut tokio, mut rdkafka, mut poll, mut other) = (0u64, 0u64, 0u64, 0u64);
        for (tid, (name, ns)) in &self.last {
            let used = ns.saturating_sub(self.start.get(tid).map_or(0, |s| s.1));
            match name.as_str() {
                n if n.starts_with("rdk:") => rdkafka += used,
                "lakesink-source" => poll += used,
                n if n.starts_with("tokio") => tokio += used,
                _ => other += used,
            }
        }
        (tokio, rdkafka, poll, other)
    }

    /// CPU nanoseconds spent consuming: the poll thread and librdkafka's threads.
    fn consume_ns(&self) -> u64 {
        let (_, rdkafka, poll, _) = self.by_kind();
        rdkafka + poll
    }

    fn report(&self, rows: u64, elapsed: f64) -> String {
        let (tokio, rdkafka, poll, other) = self.by_kind();
        let encode = sinks::ENCODE_CPU_NS
            .load(Ordering::Relaxed)
            .saturating_sub(self.encode_start);
        let us = |ns: u64| ns as f64 / 1e3 / rows.max(1) as f64;
        let feed = match (self.feed_start, self.feed_last) {
            (Some(a), Some(b)) => format!(
                "; the feed process (the broker) {:.2} CPU s = {:.2} cores",
                b - a,
                (b - a) / elapsed
            ),
            _ => String::new(),
        };
        format!(
            "  cpu/row:   {:.2} us in all: decode and pipeline {:.2}, Parquet encode {:.2}, librdkafka threads {:.2}, poll thread {:.2}, other {:.2}{feed}",
            us(tokio + rdkafka + poll + other),
            us(tokio.saturating_sub(encode)),
            us(encode),
            us(rdkafka),
            us(poll),
            us(other)
        )
    }
}

/// Commit files (`<version>.json`) in every `_delta_log` under `root`, table creation included.
fn delta_log_entries(root: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        if e.file_name() == "_delta_log" {
            n += std::fs::read_dir(&path)
                .map(|d| {
                    d.flatten()
                        .filter(|f| {
                            let name = f.file_name();
                            let name = name.to_string_lossy();
                            name.ends_with(".json") && name.as_bytes()[0].is_ascii_digit()
                        })
                        .count()
                })
                .unwrap_or(0);
        } else {
            n += delta_log_entries(&path);
        }
    }
    n
}

/// CPU nanoseconds of every live thread of this process: tid -> (name, ns).
fn thread_cpu_table() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        out.insert(tid, (name.trim().to_string(), ns));
    }
    out
}

/// With `LAKESINK_BENCH_TIMELINE=path`: every 10 ms from the first record, one line of where the
/// pipeline is (records in, rows committed, buffered MiB) and of what each kind of thread did
/// since the last line (CPU ms of tokio, librdkafka, poll and other threads; encode CPU ms; ms
/// the poll thread waited on full queues and for records). For finding stalls, not for figures:
/// the sampling costs CPU of its own.
async fn write_timeline(path: std::path::PathBuf, progress: Arc<Progress>) {
    use std::fmt::Write as _;
    while progress.records_in.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let kinds = |t: &HashMap<u32, (String, u64)>| {
        let split = CpuSplit {
            last: t.clone(),
            ..CpuSplit::default()
        };
        split.by_kind()
    };
    let counters = |p: &Progress| {
        (
            p.backpressure_ns.load(Ordering::Relaxed),
            p.poll_idle_ns.load(Ordering::Relaxed),
            sinks::ENCODE_CPU_NS.load(Ordering::Relaxed),
        )
    };
    let mut out = String::from("ms records_in rows_committed buffered_mib tokio_ms rdkafka_ms poll_ms other_ms encode_ms backpressure_ms poll_idle_ms\n");
    let (mut last_cpu, mut last) = (kinds(&thread_cpu_table()), counters(&progress));
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (cpu, now) = (kinds(&thread_cpu_table()), counters(&progress));
        let ms = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{} {} {} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1}",
            started.elapsed().as_millis(),
            progress.records_in.load(Ordering::Relaxed),
            progress.rows_committed.load(Ordering::Relaxed),
            progress.buffer_bytes() as f64 / (1 << 20) as f64,
            ms(cpu.0, last_cpu.0),
            ms(cpu.1, last_cpu.1),
            ms(cpu.2, last_cpu.2),
            ms(cpu.3, last_cpu.3),
            ms(now.2, last.2),
            ms(now.0, last.0),
            ms(now.1, last.1),
        );
        (last_cpu, last) = (cpu, now);
        let _ = std::fs::write(&path, &out);
    }
}

/// User + system CPU seconds of another process.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
}

/// CPU seconds of the calling thread, to the nanosecond (schedstat).
fn thread_cpu_seconds() -> f64 {
    sinks::thread_cpu_ns() as f64 / 1e9
}

/// `lakesink bench --isolate`: the decoder and the Parquet encoder alone, on one thread, from
/// records already in memory (no Kafka, no partitioning, no object store; keys and payloads in
/// arena chunks, as the poll thread leaves them). Decodes `records`
/// order lines of `format` with the pipeline's decoder (batches of 1024 rows, metadata
/// columns) and encodes every batch into one Parquet file in memory with the sinks' writer
/// settings; prints records/s per core for each step and both.
pub async fn isolate(records: u64, format: &str) -> anyhow::Result<()> {
    let m = measure_alone(records, format).await?;
    let per = |secs: f64| records as f64 / secs.max(1e-9);
    println!(
        "lakesink bench --isolate: {records} {format} order lines ({:.0} bytes each) decoded and encoded on one thread, from memory",
        m.bytes_in as f64 / records as f64
    );
    println!(
        "  decode:    {:.2} CPU s ({:.2} s) = {:.0} records/s per core",
        m.decode_cpu,
        m.decode_wall,
        per(m.decode_cpu)
    );
    println!(
        "  encode:    {:.2} CPU s ({:.2} s) = {:.0} records/s per core, {:.1} MB of Parquet",
        m.encode_cpu,
        m.encode_wall,
        per(m.encode_cpu),
        m.file_bytes as f64 / 1e6
    );
    println!(
        "  both:      {:.0} records/s per core",
        per(m.decode_cpu + m.encode_cpu)
    );
    let batches = m.batches;
    tokio::task::spawn_blocking(move || encode_breakdown(&batches, records)).await??;
    Ok(())
}

/// Where the Parquet encode's time goes: the same batches encoded again under writer settings
/// that do less work (down to parquet-rs's least: plain encoding, no statistics, no
/// compression), then one column at a time with the sinks' settings. On the calling thread.
fn encode_breakdown(batches: &[RecordBatch], records: u64) -> anyhow::Result<()> {
    use parquet::file::properties::EnabledStatistics;
    use sinks::encode::{writer_properties, writer_properties_for, Compression};
    let Some(first) = batches.first() else {
        return Ok(());
    };
    let us = |cpu: f64| cpu * 1e6 / records as f64;
    let rows = 1 << 20;
    let settings = [
        (
            "the sinks' (snappy, dictionary where it pays, page statistics)",
            writer_properties_for(Compression::Snappy, rows, first),
        ),
        (
            "uncompressed",
            writer_properties_for(Compression::None, rows, first),
        ),
        (
            "uncompressed, column-chunk statistics only",
            writer_properties_for(Compression::None, rows, first)
                .into_builder()
                .set_statistics_enabled(EnabledStatistics::Chunk)
                .build(),
        ),
        (
            "uncompressed, no statistics, no dictionary (parquet-rs's least work)",
            writer_properties(Compression::None, rows)
                .into_builder()
                .set_statistics_enabled(EnabledStatistics::None)
                .set_dictionary_enabled(false)
                .build(),
        ),
    ];
    println!("  encode again, by writer setting:");
    for (name, props) in settings {
        let (cpu, bytes) = encode_cpu(batches, props)?;
        println!(
            "    {:.2} CPU s = {:.3} µs per record, {:.1} MB: {name}",
            cpu,
            us(cpu),
            bytes as f64 / 1e6
        );
    }
    println!("  encode again, one column at a time (the sinks' settings):");
    let schema = first.schema();
    let mut total = 0.0;
    for (i, field) in schema.fields().iter().enumerate() {
        let column: Vec<RecordBatch> = batches
            .iter()
            .map(|b| b.project(&[i]))
            .collect::<Result<_, _>>()?;
        let props = writer_properties_for(Compression::Snappy, rows, &column[0]);
        let (cpu, _) = encode_cpu(&column, props)?;
        total += cpu;
        println!(
            "    {:.3} µs per record: {} ({})",
            us(cpu),
            field.name(),
            field.data_type()
        );
    }
    println!("    {:.3} µs per record: all columns, summed", us(total));
    Ok(())
}

/// Encodes `batches` into one Parquet file in memory; the thread's CPU seconds and the size.
fn encode_cpu(
    batches: &[RecordBatch],
    props: parquet::file::properties::WriterProperties,
) -> anyhow::Result<(f64, usize)> {
    let cpu = thread_cpu_seconds();
    let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), batches[0].schema(), Some(props))?;
    for b in batches {
        w.write(b)?;
    }
    let file = w.into_inner()?;
    Ok((thread_cpu_seconds() - cpu, file.len()))
}

/// What [`measure_alone`] measured.
struct Alone {
    decode_wall: f64,
    decode_cpu: f64,
    encode_wall: f64,
    encode_cpu: f64,
    bytes_in: usize,
    file_bytes: usize,
    /// The decoded batches, for [`encode_breakdown`].
    batches: Vec<RecordBatch>,
}

/// Decodes and then encodes `records` order lines on one thread, from memory (see [`isolate`]).
async fn measure_alone(records: u64, format: &str) -> anyhow::Result<Alone> {
    use crate::decode::{AvroDecoder, FormatDecoder, JsonDecoder, Record};
    anyhow::ensure!(
        matches!(format, "avro" | "json"),
        "--isolate measures --format avro or json, not `{format}`"
    );
    let (addr, _registry) = schema_registry::server::spawn("127.0.0.1:0".parse()?, None).await?;
    let registry_url = format!("http://{addr}");
    let topic = "bench.isolate";
    let client = RegistryClient::new(RegistryConfig::new(&registry_url))?;
    let schema_id = client
        .register(&format!("{topic}-value"), ORDER_SCHEMA)
        .await?;
    let opts = Options {
        records,
        partitions: 1,
        format: format.to_string(),
        kind: "parquet".into(),
        mode: "append".into(),
        databend: None,
        broker: None,
        rate: None,
        max_latency: "1s".into(),
        tables: 1,
        pipeline: None,
    };
    let text = sink_config(
        demo_config(
            "127.0.0.1:9",
            &registry_url,
            std::path::Path::new("/tmp/unused"),
            "g",
        )
        .replace("demo.orders", topic),
        &opts,
        "",
    )?;
    let cfg = Config::from_toml(&text)?.validate()?;
    let sink = cfg.sinks[0].clone();
    let schema = order_schema();
    // Keys and payloads share arena chunks, as the pipeline's poll thread copies them.
    let mut arena = bytes::BytesMut::new();
    let input: Vec<Record> = (0..records as i64)
        .map(|id| Record {
            offset: id,
            timestamp_ms: Some(Order::generate(id).ts_ms),
            key: Some(crate::source::arena_copy(
                &mut arena,
                Order::generate(id).order_id.as_bytes(),
            )),
            payload: Some(crate::source::arena_copy(
                &mut arena,
                &payload(format, id, &schema, schema_id),
            )),
            headers: Vec::new(),
        })
        .collect();
    let bytes_in: usize = input
        .iter()
        .map(|r| r.payload.as_ref().map_or(0, |p| p.len()))
        .sum();
    let format = format.to_string();
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, Alone)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let tp = sinks::TopicPartition::new(topic, 0);
            let mut decoder = match format.as_str() {
                "avro" => {
                    FormatDecoder::Avro(Box::new(AvroDecoder::new(tp, client, sink.metadata, 1024)))
                }
                _ => FormatDecoder::Json(Box::new(JsonDecoder::new(
                    tp,
                    sink.json_schema.clone().context("a declared JSON schema")?,
                    false,
                    false,
                    sink.metadata,
                    1024,
                ))),
            };
            decoder
                .prepare(&input[0])
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (mut out, mut rejected) = (Vec::new(), Vec::new());
            let (wall, cpu) = (Instant::now(), thread_cpu_seconds());
            for rec in input {
                decoder
                    .push(rec, &mut out, &mut rejected)
                    .await
                    .map_err(|r| anyhow::anyhow!("{}", r.error))?;
            }
            decoder
                .finish(&mut out, &mut rejected)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(rejected.is_empty(), "{} records rejected", rejected.len());
            let (decode_wall, decode_cpu) =
                (wall.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
            let (wall, cpu) = (Instant::now(), thread_cpu_seconds());
            let props = sinks::encode::writer_properties_for(
                sinks::encode::Compression::Snappy,
                1 << 20,
                &out[0],
            );
            let mut w =
                parquet::arrow::ArrowWriter::try_new(Vec::new(), out[0].schema(), Some(props))?;
            let mut rows = 0;
            for b in &out {
                rows += b.num_rows();
                w.write(b)?;
            }
            let file = w.into_inner()?;
            let (encode_wall, encode_cpu) =
                (wall.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
            let alone = Alone {
                decode_wall,
                decode_cpu,
                encode_wall,
                encode_cpu,
                bytes_in,
                file_bytes: file.len(),
                batches: out,
            };
            Ok((rows, alone))
        })
    })
    .await??;
    let (rows, alone) = report;
    anyhow::ensure!(rows as u64 == records, "decoded {rows} rows of {records}");
    Ok(alone)
}

/// jemalloc's options as it runs them (the `lakesink` binary's defaults, or
/// `_RJEM_MALLOC_CONF`), so every bench result says which allocator policy it measured.
fn allocator() -> String {
    use tikv_jemalloc_ctl::opt;
    let arenas = opt::narenas::read().map_or("?".into(), |n| n.to_string());
    let background = opt::background_thread::read().unwrap_or(false);
    format!(
        "jemalloc, {arenas} arenas, background purging {} (librdkafka: glibc malloc)",
        if background { "on" } else { "off" }
    )
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
