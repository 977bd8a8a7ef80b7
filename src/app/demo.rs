//! `lakesink demo`: the whole pipeline with no external service. An in-process Kafka
//! (librdkafka's mock cluster) and an in-process schema registry; order events produced in
//! Avro; the real pipeline sinks them into a Hive-partitioned Parquet table on local disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use schema_registry::{wire, RegistryClient, RegistryConfig};
use tokio_util::sync::CancellationToken;

use crate::app::workload::{order_schema, Order, ORDER_SCHEMA};
use crate::config::Config;
use crate::kafka::SourceOptions;
use crate::pipeline::Progress;

pub const TOPIC: &str = "demo.orders";

/// librdkafka's in-process cluster keeps about 5 MiB per partition and silently drops older
/// records (retention), so the demo and the benchmark spread larger runs over more partitions.
pub fn partitions_for(records: u64, at_least: i32) -> i32 {
    at_least.max(records.div_ceil(40_000) as i32)
}

/// Produces `n` order events to `topic` (keys are order ids), Confluent-framed with `id`.
pub fn produce_orders(
    bootstrap: &str,
    topic: &str,
    schema_id: schema_registry::SchemaId,
    ids: std::ops::Range<i64>,
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .context("cannot create the demo producer")?;
    let schema = order_schema();
    let mut sent = 0u64;
    for id in ids {
        let order = Order::generate(id);
        let payload = wire::frame(schema_id, &order.encode(&schema));
        send(
            &producer,
            BaseRecord::to(topic)
                .key(order.order_id.as_str())
                .payload(payload.as_slice()),
        )?;
        sent += 1;
        if sent.is_multiple_of(10_000) {
            producer.poll(Duration::ZERO);
            on_progress(sent);
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("cannot flush the demo producer")?;
    if !sent.is_multiple_of(10_000) {
        on_progress(sent);
    }
    Ok(())
}

/// Sends `record`, waiting (and serving delivery reports) while the producer's queue is full.
pub fn send(producer: &BaseProducer, mut record: BaseRecord<'_, str, [u8]>) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                r,
            )) => {
                record = r;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, r)) => bail!("cannot produce to {}: {e}", r.topic),
        }
    }
}

/// A progress reporter: a bar on a terminal, periodic lines otherwise.
pub struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
    label: String,
    done: bool,
}

impl Reporter {
    pub fn new(label: &str, total: u64) -> Self {
        let bar = super::bars::bar(
            total,
            "{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
        );
        if let Some(b) = &bar {
            b.set_message(label.to_string());
        }
        Self {
            bar,
            last_line: Instant::now(),
            label: label.to_string(),
            done: false,
        }
    }

    pub fn set(&mut self, pos: u64, total: u64) {
        match &self.bar {
            Some(b) => b.set_position(pos),
            None => {
                if self.last_line.elapsed() >= Duration::from_secs(2) || pos >= total && !self.done
                {
                    self.done = pos >= total;
                    eprintln!("{}: {pos}/{total}", self.label);
                    self.last_line = Instant::now();
                }
            }
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish();
        }
    }
}

/// The demo's sink configuration.
pub fn demo_config(bootstrap: &str, registry: &str, table: &Path, group: &str) -> String {
    format!(
        r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"

[schema_registry]
url = "{registry}"

[[sink]]
name = "orders"
topics = ["{TOPIC}"]
format = "avro"
kind = "parquet"
table = "file://{table}"
partition_by = ["day(ts)"]
flush = {{ max_rows = 50000, max_bytes = "64MiB", max_latency = "5s" }}
"#,
        table = table.display()
    )
}

pub async fn run(records: u64, dir: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let table = dir.join("orders");
    if table.exists() {
        bail!(
            "{} already exists; remove it or pass another --dir (the demo always starts from an \
             empty table)",
            table.display()
        );
    }
    println!(
        "lakesink demo: {records} Avro order events -> {}",
        table.display()
    );
    let cluster = MockCluster::new(1).context("cannot start the in-process Kafka")?;
    let partitions = partitions_for(records, 3);
    cluster
        .create_topic(TOPIC, partitions, 1)
        .context("cannot create the demo topic")?;
    let bootstrap = cluster.bootstrap_servers();
    let (addr, _registry) = schema_registry::server::spawn("127.0.0.1:0".parse()?, None).await?;
    let registry_url = format!("http://{addr}");
    let client = RegistryClient::new(RegistryConfig::new(&registry_url))?;
    let schema_id = client
        .register(&format!("{TOPIC}-value"), ORDER_SCHEMA)
        .await?;
    println!("  kafka (in-process) {bootstrap}, topic {TOPIC} with {partitions} partitions");
    println!("  schema registry (in-process) {registry_url}, schema id {schema_id}");

    let started = Instant::now();
    {
        let bootstrap = bootstrap.clone();
        let mut rep = Reporter::new("produce", records);
        tokio::task::spawn_blocking(move || {
            let r = produce_orders(&bootstrap, TOPIC, schema_id, 0..records as i64, |n| {
                rep.set(n, records)
            });
            rep.finish();
            r
        })
        .await??;
    }
    println!("  produced {records} records in {:.1?}", started.elapsed());

    let cfg = Config::from_toml(&demo_config(
        &bootstrap,
        &registry_url,
        &table,
        "lakesink-demo",
    ))?
    .validate()?;
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    super::cancel_on_signals(cancel.clone());
    let sink_started = Instant::now();
    let result = super::run(
        cfg,
        SourceOptions {
            until_caught_up: true,
            topic_ids: false,
        },
        cancel,
        progress.clone(),
    )
    .await;
    result?;
    let total = sink_started.elapsed();
    let rows = progress.rows_committed.load(Ordering::Relaxed);
    anyhow::ensure!(
        rows == records,
        "committed {rows} rows but produced {records}; the in-process Kafka dropped records \
         (it keeps about 5 MiB per partition)"
    );
    // Throughput from the first record in: joining the group and recovering the positions is
    // a fixed cost of every start, not the pipeline's speed.
    let first = progress.first_record.get().copied().unwrap_or(sink_started);
    let pipeline = first.elapsed();
    let start_up = first.saturating_duration_since(sink_started);
    println!();
    println!(
        "sunk {rows} rows in {pipeline:.2?} from the first record ({:.0} rows/s): {} files, \
         {:.1} MiB of Parquet, {} commits",
        rows as f64 / pipeline.as_secs_f64(),
        progress.files_committed.load(Ordering::Relaxed),
        progress.bytes_committed.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        progress.commits.load(Ordering::Relaxed),
    );
    println!(
        "  before it, joining the consumer group and reading the table's positions took \
         {start_up:.2?} ({total:.2?} in all)"
    );
    println!("committed positions (next offset to read):");
    for ((sink, tp), next) in progress.committed_positions() {
        println!("  {sink}: {tp} -> {next}");
    }
    print_sample(&table)?;
    let query = format!(
        "SELECT day, status, count(*) AS lines, round(sum(cost), 2) AS revenue \
         FROM read_parquet('{}/*/*.parquet', hive_partitioning = true, union_by_name = true) \
         GROUP BY ALL ORDER BY ALL",
        table.display()
    );
    println!();
    println!("query it with DuckDB from Python (pip install duckdb):");
    println!("  python3 -c \"import duckdb; duckdb.sql(\\\"{query}\\\").show()\"");
    println!("or with the duckdb command-line tool (https://duckdb.org/docs/installation):");
    println!("  duckdb -c \"{query}\"");
    println!(
        "commit markers are in {}/_lakesink/commits/",
        table.display()
    );
    drop(cluster);
    Ok(())
}

/// Prints the first rows of one published file.
fn print_sample(table: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    collect_parquet(table, &mut files)?;
    files.sort();
    let Some(first) = files.first() else {
        bail!("no Parquet file was published under {}", table.display());
    };
    let file = std::fs::File::open(first)?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?
        .with_batch_size(3)
        .build()?;
    let batch = reader.into_iter().next().transpose()?;
    println!(
        "{} files under {}; first rows of {}:",
        files.len(),
        table.display(),
        first.strip_prefix(table).unwrap_or(first).display()
    );
    if let Some(b) = batch {
        let cols: Vec<usize> = [
            "id",
            "product",
            "quantity",
            "cost",
            "ts",
            "status",
            "address",
            "_kafka_partition",
            "_kafka_offset",
        ]
        .iter()
        .filter_map(|c| b.schema().index_of(c).ok())
        .collect();
        println!(
            "{}",
            arrow::util::pretty::pretty_format_batches(&[b.project(&cols)?])?
        );
    }
    Ok(())
}

fn collect_parquet(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('_') || name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_parquet(&path, out)?;
        } else if name.ends_with(".parquet") {
            out.push(path);
        }
    }
    Ok(())
}
