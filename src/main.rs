//! The `lakesink` command line: parse arguments, set up logging, load and validate the config,
//! run a command, map the outcome to an exit code (0 ok, 1 runtime failure, 2 bad config).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use lakesink::config::{Config, ValidatedConfig};
use lakesink::source::SourceOptions;

#[derive(Parser)]
#[command(
    name = "lakesink",
    version,
    about = "Kafka topics into a data lake, exactly once"
)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Exit 0 once every assigned partition is committed up to the end offset it had at
        /// start (backfill).
        #[arg(long)]
        until_caught_up: bool,
        /// Serve /metrics, /healthz and /readyz on ADDR:PORT (overrides `[http] listen`).
        #[arg(long)]
        http_listen: Option<std::net::SocketAddr>,
    },
    /// Validate the config and reach the broker, the registry and every table.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Delta tables: compact small files, vacuum unreferenced ones and write a checkpoint
    /// (safe while the service runs).
    Maintain {
        #[arg(long, short)]
        config: PathBuf,
        /// Only the sink with this name.
        #[arg(long)]
        sink: Option<String>,
        /// Vacuum files unreferenced for longer than this, once, instead of
        /// `delta.vacuum_retention` (which cannot be below 1h). Only with every writer of the
        /// table stopped: files a running writer has written but not yet committed are
        /// unreferenced too.
        #[arg(long)]
        retention: Option<String>,
    },
    /// Per sink and partition: the committed position (read from the table), the broker's end
    /// offset and the lag.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the whole pipeline with an in-process Kafka and registry into a local table.
    Demo {
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        #[arg(long, default_value = "lakesink-demo")]
        dir: PathBuf,
    },
    /// Measure the pipeline (in-process Kafka -> local Parquet) against a plain consume loop.
    Bench {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Workload: avro (Confluent-framed), json (order lines, declared schema) or debezium.
        #[arg(long, default_value = "avro")]
        format: String,
        /// A real broker (bootstrap servers) instead of the in-process cluster.
        #[arg(long)]
        broker: Option<String>,
        /// Latency mode: produce at this many records/s while the pipeline runs, and report
        /// produce-to-committed latency instead of backlog throughput.
        #[arg(long)]
        rate: Option<u64>,
        /// flush.max_latency in latency mode.
        #[arg(long, default_value = "1s")]
        max_latency: String,
        /// Destination: parquet, delta (local tables) or databend (needs --databend).
        #[arg(long, default_value = "parquet")]
        kind: String,
        /// append, or upsert keyed by order_id (delta and databend).
        #[arg(long, default_value = "append")]
        mode: String,
        /// Databend URL for --kind databend: http://user:password@host:port
        #[arg(long, env = "LAKESINK_BENCH_DATABEND", hide_env_values = true)]
        databend: Option<String>,
        /// Spread the records over this many topics, each sunk into its own table.
        #[arg(long, default_value_t = 1)]
        tables: u32,
        /// Extra [pipeline] settings for the run (TOML), e.g. 'queue_records = 256'.
        #[arg(long)]
        pipeline: Option<String>,
        /// Measure only the decoder and the Parquet encoder, on one thread, from memory
        /// (records/s per core; avro or json).
        #[arg(long)]
        isolate: bool,
    },
    /// The benchmark's feed process (internal): hosts the cluster, produces, times a plain
    /// consumer, serves until stdin closes.
    #[command(hide = true)]
    BenchFeed {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        partitions: i32,
        #[arg(long)]
        records: u64,
        #[arg(long)]
        format: String,
        #[arg(long)]
        schema_id: u32,
        #[arg(long)]
        broker: Option<String>,
        #[arg(long)]
        rate: Option<u64>,
        #[arg(long, default_value_t = 1)]
        tables: u32,
        /// Partition by the order key (upserts) instead of by record id.
        #[arg(long)]
        keyed: bool,
    },
    /// Exit 0 if URL answers 200 (the container HEALTHCHECK; no curl in the image).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
    /// The schema registry server.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Serve a Confluent-compatible schema registry.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
        /// Directory the registry persists to.
        #[arg(long)]
        data: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<ValidatedConfig, ExitCode> {
    match Config::load(path).and_then(Config::validate) {
        Ok(c) => {
            tracing::info!("config {}:\n{}", path.display(), c.redacted());
            Ok(c)
        }
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            Err(ExitCode::from(2))
        }
    }
}

/// glibc's malloc now serves librdkafka and the other C code only (Rust's allocations go to
/// jemalloc, below); these two settings were measured when it served everything.
///
/// At most two glibc malloc arenas per core (unless `MALLOC_ARENA_MAX` says otherwise; glibc's
/// default is eight per core). Freed Arrow and Parquet buffers stay in the arena of the thread
/// that freed them. Measured on 2 cores, 1M JSON records, medians of 3 alternating runs:
/// 48 partitions 241 MiB (4 arenas) vs 263 MiB (16), 398k vs 425k records/s within the noise;
/// 2 arenas went to 226 MiB but cost ~10 % throughput. Set before the runtime starts threads.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(2 * cores).unwrap_or(i32::MAX).max(2);
        // SAFETY: mallopt only adjusts allocator parameters; no other thread is running yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Allocations of 512 KiB and more get their own mapping, returned to the system when freed
/// (unless `MALLOC_MMAP_THRESHOLD_` says otherwise). glibc's default threshold starts at
/// 128 KiB but rises with every such block freed, up to 32 MiB; after that, Arrow's and
/// Parquet's large buffers come from the arenas, whose freed memory fragments and stays
/// resident. A fixed 128 KiB kept one partition at 211–215 MiB instead of 259–286 MiB, but
/// doubled the page faults (5–15 % more CPU). 512 KiB, with the smaller librdkafka pre-fetch
/// queue (`source::client_config`), keeps every measured Parquet case under 256 MiB with 40 %
/// fewer page faults than 128 KiB (docs/perf-notes.md). Trimming the arenas instead cost more.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only adjusts allocator parameters; no other thread is running yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
        }
    }
}

/// Rust's allocations go to jemalloc. Against glibc's malloc (alternated runs, 1M records,
/// docs/perf-notes.md): 20 Delta tables used 6.7–8.4 CPU s instead of 7.9–9.4 at the same or lower
/// peak RSS, and JSON on 48 partitions 3.5–4.3 CPU s instead of 4.3–4.7. librdkafka, a C
/// library, still uses glibc's malloc, which the two `mallopt` settings above still shape.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (before `main`); `_RJEM_MALLOC_CONF` in the
/// environment overrides them. Two arenas, as many as the 2 cores lakesink is sized for (with
/// one arena per CPU, a pod limited to 2 CPUs of a 64-CPU node would get 64); a background
/// thread hands freed pages back after 500 ms, so memory freed after a burst (a Delta
/// commit's log replay, a MERGE) does not stay resident. Returning them at once instead cost
/// 40 % more CPU; keeping jemalloc's 10 s default measured 297–395 MiB on 20 Delta tables.
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &[u8; 69] =
    b"narenas:2,background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    limit_malloc_arenas();
    fix_mmap_threshold();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(run());
            // Blocking tasks still running are abandoned, not awaited: a dead-letter session
            // waiting for another writer's open transaction (up to 90 s) must not hold the exit
            // after the drain. Nothing they do is needed once the pipeline has returned: a dead
            // letter is committed before the table commit that covers it, and an open
            // transaction of this process is aborted by the broker.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter when `LAKESINK_LOG` is unset. lakesink's own events at info; its libraries
/// at warn. The Delta kernel and deltalake log several info events per commit, some of them
/// spans that print the whole table snapshot (every log file it lists): 3.9 MB of text for 1M
/// records into 20 tables. The kernel's snapshot builder also logs an ERROR for every probe of
/// a table that does not exist yet, which is how lakesink finds out it must create it.
const DEFAULT_LOG_FILTER: &str =
    "info,librdkafka=warn,buoyant_kernel=warn,buoyant_kernel::snapshot::builder=off,deltalake_core=warn";

/// What rust-rdkafka logs, as an ERROR, when a consumer that has already left its group is
/// dropped.
const DOUBLE_CLOSE: &str = "Failed to close consumer queue on drop";

/// Drops rust-rdkafka's [`DOUBLE_CLOSE`] ERROR. The source leaves the group itself, polling every
/// 5 ms (the consumer's drop polls in 100 ms steps, which cost every stop about 100 ms); the
/// drop then closes the consumer a second time, fails with "broker handle destroyed", and logs
/// that at ERROR on every clean stop. Only that message is dropped: the same module's other
/// events (an invalid rebalance, an ignored event) still pass.
struct QuietDoubleClose;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QuietDoubleClose {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if *event.metadata().level() != tracing::Level::ERROR {
            return true;
        }
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}").starts_with(DOUBLE_CLOSE);
                }
            }
        }
        let mut m = Message(false);
        event.record(&mut m);
        !m.0
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAKESINK_LOG")
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let logs = tracing_subscriber::registry()
        .with(filter)
        .with(QuietDoubleClose);
    match cli.log_format {
        // Colours only on a terminal (and without NO_COLOR): log files, `kubectl logs` and
        // collectors get plain text.
        LogFormat::Text => logs
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(
                        std::io::IsTerminal::is_terminal(&std::io::stderr())
                            && std::env::var_os("NO_COLOR").is_none(),
                    )
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Json => logs
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    let result = match cli.command {
        Command::Run {
            config,
            until_caught_up,
            http_listen,
        } => {
            let cancel = CancellationToken::new();
            lakesink::app::cancel_on_signals(cancel.clone());
            let mut cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if http_listen.is_some() {
                cfg.http_listen = http_listen;
            }
            lakesink::app::run(
                cfg,
                SourceOptions {
                    until_caught_up,
                    topic_ids: true,
                },
                cancel,
                Default::default(),
            )
            .await
        }
        Command::Maintain {
            config,
            sink,
            retention,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let retention = match retention
                .as_deref()
                .map(lakesink::config::parse_duration)
                .transpose()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: --retention: {e}");
                    return ExitCode::from(2);
                }
            };
            lakesink::app::maintain(&cfg, sink.as_deref(), retention).await
        }
        Command::Check { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let results = lakesink::app::check(&cfg).await;
            let mut failed = false;
            for r in &results {
                match &r.error {
                    None => println!("ok    {}", r.what),
                    Some(e) => {
                        failed = true;
                        println!("FAIL  {}: {e}", r.what);
                    }
                }
            }
            if failed {
                return ExitCode::FAILURE;
            }
            Ok(())
        }
        Command::Status { config, json } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match lakesink::app::status(&cfg).await {
                Ok(rows) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&rows).expect("status serializes")
                    );
                    Ok(())
                }
                Ok(rows) => {
                    println!(
                        "{:<16} {:<32} {:>9} {:>14} {:>14} {:>10}",
                        "SINK", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"
                    );
                    let unreadable: Vec<String> = rows
                        .iter()
                        .filter_map(|r| {
                            r.unreadable.as_ref().map(|why| {
                                format!(
                                    "sink `{}`: {}/{} cannot be read: {why}",
                                    r.sink, r.topic, r.partition
                                )
                            })
                        })
                        .collect();
                    for r in rows {
                        println!(
                            "{:<16} {:<32} {:>9} {:>14} {:>14} {:>10}",
                            r.sink,
                            r.topic,
                            r.partition,
                            r.committed.map_or("-".to_string(), |c| c.to_string()),
                            r.end,
                            r.lag
                        );
                    }
                    for u in &unreadable {
                        println!("{u}");
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Command::Healthcheck { url } => {
            let ok = async {
                let r = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(3))
                    .build()?
                    .get(&url)
                    .send()
                    .await?;
                Ok::<_, reqwest::Error>(r.status().is_success())
            }
            .await;
            return match ok {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) | Err(_) => {
                    eprintln!("unhealthy: {url}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Demo { records, dir } => lakesink::app::demo::run(records, dir).await,
        Command::Bench {
            records,
            format,
            isolate: true,
            ..
        } => lakesink::app::bench::isolate(records, &format).await,
        Command::Bench {
            records,
            partitions,
            format,
            broker,
            rate,
            max_latency,
            kind,
            mode,
            databend,
            tables,
            pipeline,
            isolate: false,
        } => {
            lakesink::app::bench::run(lakesink::app::bench::Options {
                tables,
                pipeline,
                records,
                partitions,
                format,
                kind,
                mode,
                databend,
                broker,
                rate,
                max_latency,
            })
            .await
        }
        Command::BenchFeed {
            topic,
            partitions,
            records,
            format,
            schema_id,
            broker,
            rate,
            tables,
            keyed,
        } => tokio::task::spawn_blocking(move || {
            lakesink::app::bench::feed(lakesink::app::bench::Feed {
                broker,
                topics: lakesink::app::bench::topics(&topic, tables),
                partitions,
                records,
                format,
                schema_id,
                rate,
                keyed,
            })
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r),
        Command::Registry {
            command: RegistryCommand::Serve { listen, data },
        } => {
            async {
                let (addr, task) = schema_registry::server::spawn(listen, Some(data)).await?;
                tracing::info!("schema registry listening on http://{addr}");
                task.await??;
                Ok(())
            }
            .await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
