//! The command line: the arguments, logging, and each command's run (exit codes: 0 ok,
//! 1 runtime failure, 2 bad config).

mod logging;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use lakesink::config::{Config, ValidatedConfig};
use lakesink::kafka::SourceOptions;

#[derive(Parser)]
#[command(
    name = "lakesink",
    version,
    about = "Kafka topics into a data lake, exactly once"
)]
pub(crate) struct Cli {
    /// Log format on stderr: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

// Parsed once at start-up: the size of the largest variant (`bench`) costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Print the lakesink TOML equivalent to a Kafka Connect sink's config (the Connect REST
    /// API's JSON, or a .properties file: Confluent's S3, GCS and ADLS Gen2 sinks,
    /// databend-kafka-connect) or to a kafka-delta-ingest command line. Keys it cannot map are
    /// listed in the output with the reason; secrets become `${ENV}` references.
    ImportConnect {
        /// The connector's config file.
        file: PathBuf,
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
        /// Workload: avro (Confluent-framed), json (order lines, declared schema), debezium
        /// (Debezium JSON envelopes) or protobuf (Confluent-framed).
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
        /// With --tables: one topics_regex sink with a table template for all the topics (a
        /// whole database in one sink) instead of one sink per topic.
        #[arg(long)]
        one_sink: bool,
        /// Extra [pipeline] settings for the run (TOML), e.g. 'queue_records = 256'.
        #[arg(long)]
        pipeline: Option<String>,
        /// Extra settings of every sink (TOML), e.g. 'delta = { shared_files = false }'.
        #[arg(long)]
        sink: Option<String>,
        /// Measure only the decoder and the Parquet encoder, on one thread, from memory
        /// (records/s per core; avro or json).
        #[arg(long)]
        isolate: bool,
        /// Scale-out: run each of these member counts in turn (comma-separated, e.g. 1,2,4), as
        /// separate `lakesink run` processes in one group over the produced topic, each into a
        /// fresh table. Needs --broker and --kind delta.
        #[arg(long, value_delimiter = ',')]
        members: Vec<u32>,
        /// With --members: hold each member to this many cores (a cgroup CPU quota; needs
        /// root), e.g. 0.25 so that 4 members use one core and the broker the other.
        #[arg(long)]
        member_cpus: Option<f64>,
        /// Measure upserts on a table that is already large, at the Delta sink: --records
        /// changes of random keys, in flushes of --flush-rows, onto a table of --table-rows.
        #[arg(long)]
        steady_upsert: bool,
        /// With --steady-upsert: rows in the table before the changes; a comma-separated list
        /// runs each size in turn (e.g. 50000,5000000).
        #[arg(long, value_delimiter = ',', default_value = "5000000")]
        table_rows: Vec<u64>,
        /// With --steady-upsert: how upserts replace rows, `copy-on-write` and/or
        /// `deletion-vectors` (comma-separated: each in turn).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "copy-on-write,deletion-vectors"
        )]
        upsert: Vec<String>,
        /// With --steady-upsert: changes per flush (one MERGE commit each).
        #[arg(long, default_value_t = 500)]
        flush_rows: u64,
        /// With --steady-upsert: the order the table's keys are loaded in, `key` (a snapshot
        /// read in key order: files of disjoint key ranges) or `random` (a stream of random
        /// keys: every file spans them all).
        #[arg(long, default_value = "key")]
        load_order: String,
        /// With --steady-upsert: rows per load flush (one file each); default: a quarter of
        /// the table, at most 1M.
        #[arg(long)]
        load_flush_rows: Option<u64>,
        /// With --steady-upsert: compact the loaded table (as `lakesink maintain` does) before
        /// the changes.
        #[arg(long)]
        compact_first: bool,
        /// Simulate commit contention on one Delta table: --members members (e.g. 10,50,100)
        /// sharing --partitions partitions commit at each --max-latency (e.g. 1s,10s,60s) to a
        /// store with S3's latencies. No broker.
        #[arg(long)]
        contention: bool,
        /// With --contention: latency periods simulated per configuration.
        #[arg(long, default_value_t = 5)]
        ticks: u32,
        /// With --contention: every member on the epoch grid instead of a phase of its own.
        #[arg(long)]
        aligned: bool,
        /// With --contention: how appends write their log entry, `direct` and/or `deltalake`
        /// (its commit loop), comma-separated: each in turn.
        #[arg(long, default_value = "direct")]
        commit: String,
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

/// Loads and validates the config (exit code 2 when invalid). The service logs what it
/// runs with at INFO; the one-shot commands (`check`, `status`, `maintain`) at DEBUG.
fn load(path: &std::path::Path, service: bool) -> Result<ValidatedConfig, ExitCode> {
    match Config::load(path).and_then(Config::validate) {
        Ok(c) if service => {
            tracing::info!("config {}:\n{}", path.display(), c.redacted());
            Ok(c)
        }
        Ok(c) => {
            tracing::debug!("config {}:\n{}", path.display(), c.redacted());
            Ok(c)
        }
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            Err(ExitCode::from(2))
        }
    }
}

/// Parses the arguments, sets up logging and runs the command.
pub(crate) async fn run() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Run {
            config,
            until_caught_up,
            http_listen,
        } => {
            let cancel = CancellationToken::new();
            lakesink::app::cancel_on_signals(cancel.clone());
            let mut cfg = match load(&config, true) {
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
            let cfg = match load(&config, false) {
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
            let cfg = match load(&config, false) {
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
            let cfg = match load(&config, false) {
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
                    status::print_status(&rows);
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
        Command::ImportConnect { file } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            let name = file.file_name().map_or_else(
                || file.display().to_string(),
                |n| n.to_string_lossy().into(),
            );
            match lakesink::app::import::translate(&text, &name) {
                Ok(draft) => {
                    print!("{}", draft.render());
                    if !draft.unmapped.is_empty() {
                        eprintln!(
                            "{} key(s) not mapped: each is listed with the reason at the top \
                             of the output",
                            draft.unmapped.len()
                        );
                    }
                    return ExitCode::SUCCESS;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        Command::Bench {
            records,
            steady_upsert: true,
            table_rows,
            flush_rows,
            upsert,
            load_order,
            load_flush_rows,
            compact_first,
            ..
        } => {
            let random = match load_order.as_str() {
                "key" => false,
                "random" => true,
                other => {
                    eprintln!("error: --load-order: `{other}` is not `key` or `random`");
                    return ExitCode::from(2);
                }
            };
            let load = lakesink::app::bench::Load {
                random,
                flush_rows: load_flush_rows,
                compact: compact_first,
            };
            let mut strategies = Vec::new();
            for name in &upsert {
                strategies.push(match name.as_str() {
                    "copy-on-write" => sinks::delta::UpsertStrategy::CopyOnWrite,
                    "deletion-vectors" => sinks::delta::UpsertStrategy::DeletionVectors,
                    other => {
                        eprintln!(
                            "error: --upsert: `{other}` is not `copy-on-write` or `deletion-vectors`"
                        );
                        return ExitCode::from(2);
                    }
                });
            }
            lakesink::app::bench::steady_upsert(&table_rows, records, flush_rows, &strategies, load)
                .await
        }
        Command::Bench {
            contention: true,
            members,
            partitions,
            max_latency,
            ticks,
            aligned,
            commit,
            ..
        } => {
            let mut direct = Vec::new();
            for style in commit.split(',') {
                match style.trim() {
                    "direct" => direct.push(true),
                    "deltalake" => direct.push(false),
                    other => {
                        eprintln!("error: --commit: `{other}` is not `direct` or `deltalake`");
                        return ExitCode::from(2);
                    }
                }
            }
            let mut latencies = Vec::new();
            for text in max_latency.split(',') {
                match sinks::units::parse_duration(text.trim()) {
                    Ok(d) if !d.is_zero() => latencies.push(d),
                    _ => {
                        eprintln!("error: --max-latency: `{text}` is not a duration such as 10s");
                        return ExitCode::from(2);
                    }
                }
            }
            let members = if members.is_empty() {
                vec![10, 50, 100]
            } else {
                members
            };
            if members.contains(&0) || partitions < 1 {
                eprintln!("error: --members and --partitions must be at least 1");
                return ExitCode::from(2);
            }
            lakesink::app::bench::contention(
                &members,
                partitions as u32,
                &latencies,
                ticks,
                aligned,
                &direct,
            )
            .await
        }
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
            one_sink,
            pipeline,
            sink,
            members,
            member_cpus,
            isolate: false,
            ..
        } => {
            lakesink::app::bench::run(lakesink::app::bench::Options {
                members,
                member_cpus,
                tables,
                one_sink,
                pipeline,
                sink,
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
