//! The commands: building the service from a validated config, running it with signal-driven
//! shutdown, checking every dependency, and the embedded demo and benchmark.

pub mod bars;
pub mod bench;
pub mod demo;
pub mod import;
mod inspect;
pub mod workload;

pub use inspect::{check, status, CheckResult, PartitionStatus};

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};

use schema_registry::{RegistryClient, RegistryConfig};
use sinks::databend::{DatabendSink, DatabendSinkConfig, DatabendTable};
use sinks::delta::{DeltaSink, DeltaSinkConfig};
use sinks::parquet::{ParquetSink, ParquetSinkConfig};
use sinks::store::TableStore;
use sinks::upsert::UpsertConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{SinkKind, ValidatedConfig};
use crate::decode::debezium::UNCHANGED_COLUMN;
use crate::decode::key::KEY_COLUMN;
use crate::kafka::{self, SourceOptions};
use crate::pipeline::{Progress, SinkRuntime};

/// A unique id for this writer process, recorded in commit markers.
pub fn writer_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "lakesink".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The registry client the config describes (a client to nowhere when there is none; a sink
/// that needs a registry is rejected by validation).
pub fn registry_client(cfg: &ValidatedConfig) -> anyhow::Result<RegistryClient> {
    let mut rc = RegistryConfig::new(
        cfg.registry
            .as_ref()
            .map_or("http://127.0.0.1:1", |r| r.url.as_str()),
    );
    if let Some(r) = &cfg.registry {
        rc.username = r.username.clone();
        rc.password = r.password.as_ref().map(|p| p.expose().to_string());
        rc.bearer_token = r.bearer_token.as_ref().map(|p| p.expose().to_string());
        rc.ca_file = r.ca_file.clone();
        rc.client_cert_file = r.client_cert_file.clone();
        rc.client_key_file = r.client_key_file.clone();
        rc.timeout = r.timeout;
    }
    RegistryClient::new(rc).context("cannot build the schema registry client")
}

/// `LAKESINK_TEST_CRASHPOINT=<point>:<n>`: at the n-th time the commit protocol reaches
/// `point` (`after_stage`, `after_marker`, `mid_publish`, `after_commit`), print
/// `CRASHPOINT <point>` and freeze so the crash-safety tests can SIGKILL the process exactly
/// there. `LAKESINK_TEST_CRASHPOINT_SINK=<name>` limits it to one sink;
/// `LAKESINK_TEST_CRASHPOINT_RELEASE=<file>` holds the commit only until that file exists (a
/// race set up on purpose). Test-only; unset in production.
fn crash_hook_from_env(sink: &str) -> Option<sinks::crash::CrashHook> {
    let spec = std::env::var("LAKESINK_TEST_CRASHPOINT").ok()?;
    if std::env::var("LAKESINK_TEST_CRASHPOINT_SINK").is_ok_and(|only| only != sink) {
        return None;
    }
    let release =
        std::env::var_os("LAKESINK_TEST_CRASHPOINT_RELEASE").map(std::path::PathBuf::from);
    let (point, n) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
    let point = point.to_string();
    let n: u64 = n.parse().unwrap_or(1);
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    Some(Arc::new(move |at: &'static str| {
        if at == point && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
            eprintln!("CRASHPOINT {at}");
            let hold = || loop {
                if release.as_ref().is_some_and(|f| f.exists()) {
                    eprintln!("CRASHPOINT {at} released");
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            // The hook runs inside a commit future: let the runtime move its other tasks.
            match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(hold),
                _ => hold(),
            }
        }
    }))
}

/// Opens one sink's table with the commit protocol of its kind; a Parquet or Delta `table`
/// with placeholders opens one table per topic (`sinks::routed`).
pub fn open_sink(
    cfg: &ValidatedConfig,
    s: &crate::config::ValidatedSink,
    writer: &str,
) -> anyhow::Result<Arc<dyn sinks::AnySink>> {
    let template = sinks::routed::TableTemplate::parse(&s.table)
        .map_err(|e| anyhow!("sink `{}`: table: {e}", s.name))?;
    let per_topic = template.is_per_topic() && s.kind != SinkKind::Databend;
    let shown = sinks::store::redact_url(&s.table);
    Ok(match s.kind {
        SinkKind::Parquet if per_topic => {
            let (s, writer) = (s.clone(), writer.to_string());
            let fixed = s.fixed_tables();
            let mut routed = sinks::routed::Routed::new(
                template,
                shown,
                Box::new(move |topic: &str, location: &str| {
                    open_parquet(&s.for_topic(topic), &writer, location)
                }),
            );
            for (topic, location) in fixed {
                routed = routed.with_location(&topic, &location);
            }
            Arc::new(routed)
        }
        SinkKind::Delta if per_topic => {
            let (s, cfg) = (s.clone(), cfg.clone());
            let fixed = s.fixed_tables();
            let mut routed = sinks::routed::Routed::new(
                template,
                shown,
                Box::new(move |topic: &str, location: &str| {
                    open_delta(&cfg, &s.for_topic(topic), location)
                }),
            );
            for (topic, location) in fixed {
                routed = routed.with_location(&topic, &location);
            }
            Arc::new(routed)
        }
        SinkKind::Parquet => Arc::new(
            open_parquet(s, writer, &s.table)
                .with_context(|| format!("sink `{}`: cannot open table", s.name))?,
        ),
        SinkKind::Delta => Arc::new(
            open_delta(cfg, s, &s.table)
                .with_context(|| format!("sink `{}`: cannot open table", s.name))?,
        ),
        SinkKind::Databend => {
            let d = s
                .databend
                .as_ref()
                .ok_or_else(|| anyhow!("sink `{}`: no databend connection", s.name))?;
            let mut sink = DatabendSink::new(DatabendSinkConfig {
                client: d.clone(),
                sink: s.name.clone(),
                table: s.table.clone(),
                upsert: s.upsert_keys.as_ref().map(|keys| UpsertConfig {
                    keys: keys.clone(),
                    keys_from: s.keys_from_message.then(|| KEY_COLUMN.into()),
                    delete_column: Some("_deleted".into()),
                    unchanged_column: Some(UNCHANGED_COLUMN.into()),
                }),
                tables: s
                    .tables
                    .iter()
                    .map(|(topic, t)| {
                        let table = DatabendTable {
                            table: t.table.clone(),
                            keys: t.upsert_keys.clone(),
                        };
                        (topic.clone(), table)
                    })
                    .collect(),
                compression: s.compression,
            })
            .with_context(|| format!("sink `{}`: cannot connect to Databend", s.name))?;
            if let Some(hook) = crash_hook_from_env(&s.name) {
                sink = sink.with_crash_hook(hook);
            }
            Arc::new(sink)
        }
    })
}

fn storage(s: &crate::config::ValidatedSink) -> Vec<(String, String)> {
    s.storage
        .iter()
        .map(|(k, v)| (k.clone(), v.expose().to_string()))
        .collect()
}

/// A Delta table's storage options: an S3 table without keys signs with the AWS SDK's default
/// chain, which deltalake otherwise only loads for AWS's own endpoints (not for a custom
/// `endpoint`: MinIO, R2, moto).
fn delta_storage(s: &crate::config::ValidatedSink, location: &str) -> Vec<(String, String)> {
    let mut storage = storage(s);
    if location.starts_with("s3") && crate::aws::s3::provider_for(&storage).is_some() {
        storage.push(("AWS_FORCE_CREDENTIAL_LOAD".into(), "true".into()));
    }
    storage
}

/// The Parquet table at `location` (the sink's table, or one topic's under a template).
fn open_parquet(
    s: &crate::config::ValidatedSink,
    writer: &str,
    location: &str,
) -> sinks::Result<ParquetSink> {
    let storage = storage(s);
    // S3 without keys: the AWS SDK's default chain, as MSK IAM and deltalake use.
    let aws = location
        .starts_with("s3")
        .then(|| crate::aws::s3::provider_for(&storage))
        .flatten();
    let mut sink = ParquetSink::new(
        TableStore::open_with(location, storage, aws)?,
        s.parquet.apply(ParquetSinkConfig {
            partition_by: s.partition_by.clone(),
            compression: s.compression,
            writer_id: writer.to_string(),
            ..Default::default()
        }),
    );
    if let Some(hook) = crash_hook_from_env(&s.name) {
        sink = sink.with_crash_hook(hook);
    }
    Ok(sink)
}

/// The Delta table at `location` (the sink's table, or one topic's under a template).
fn open_delta(
    cfg: &ValidatedConfig,
    s: &crate::config::ValidatedSink,
    location: &str,
) -> sinks::Result<DeltaSink> {
    let mut sink = DeltaSink::new(location, delta_storage(s, location), delta_config(cfg, s))?;
    if let Some(hook) = crash_hook_from_env(&s.name) {
        sink = sink.with_crash_hook(hook);
    }
    Ok(sink)
}

/// The Delta sink settings of `s`.
pub fn delta_config(cfg: &ValidatedConfig, s: &crate::config::ValidatedSink) -> DeltaSinkConfig {
    s.delta.apply(DeltaSinkConfig {
        partition_by: s.partition_by.clone(),
        compression: s.compression,
        app_id_prefix: "lakesink".into(),
        legacy_app_id_prefix: Some(format!("lakesink/{}", cfg.group_id)),
        upsert: s.upsert_keys.as_ref().map(|keys| UpsertConfig {
            keys: keys.clone(),
            keys_from: s.keys_from_message.then(|| KEY_COLUMN.into()),
            delete_column: Some("_deleted".into()),
            unchanged_column: Some(UNCHANGED_COLUMN.into()),
        }),
        group_rows: s.flush.max_rows,
        ..Default::default()
    })
}

/// `lakesink maintain`: compaction, vacuum and a checkpoint for every Delta sink, compaction for
/// every Parquet sink (or `only`);
/// `retention` replaces `delta.vacuum_retention` for this run (writers stopped).
pub async fn maintain(
    cfg: &ValidatedConfig,
    only: Option<&str>,
    retention: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let mut seen = false;
    for s in &cfg.sinks {
        if only.is_some_and(|n| n != s.name) {
            continue;
        }
        seen = true;
        if s.kind == SinkKind::Databend {
            println!("skip  {}: {:?} tables need no maintenance", s.name, s.kind);
            continue;
        }
        let template = sinks::routed::TableTemplate::parse(&s.table)
            .map_err(|e| anyhow!("sink `{}`: table: {e}", s.name))?;
        if !template.is_per_topic() {
            maintain_table(cfg, s, &s.table, retention).await?;
            continue;
        }
        // One table per topic: the broker's topics this sink reads say which tables exist.
        let topics = inspect::broker_topics(cfg).await?;
        let mut any = false;
        for topic in topics.iter().filter(|t| s.topics.matches(t)) {
            let location = match s.tables.get(topic.as_str()).and_then(|t| t.table.clone()) {
                Some(l) => l,
                None => match template.resolve(topic) {
                    Ok(l) => l,
                    Err(why) => {
                        println!("skip  {}: {why}", s.name);
                        continue;
                    }
                },
            };
            any = true;
            maintain_table(cfg, &s.for_topic(topic), &location, retention).await?;
        }
        if !any {
            println!("skip  {}: no topic of the broker matches this sink", s.name);
        }
    }
    if let Some(name) = only.filter(|_| !seen) {
        return Err(anyhow!("no sink named `{name}` in the config"));
    }
    Ok(())
}

/// Compacts, vacuums and checkpoints the Delta table at `location` of sink `s`, or compacts
/// the Parquet table there, and prints what it did (a table not created yet is skipped).
async fn maintain_table(
    cfg: &ValidatedConfig,
    s: &crate::config::ValidatedSink,
    location: &str,
    retention: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    if s.kind == SinkKind::Parquet {
        let sink = open_parquet(s, &writer_id(), location)
            .with_context(|| format!("sink `{}`: cannot open table", s.name))?;
        let started = std::time::Instant::now();
        let r = sink
            .compact_table()
            .await
            .with_context(|| format!("sink `{}`: compaction of {location} failed", s.name))?;
        println!(
            "ok    {}: {} compacted {} files into {} in {} table partitions ({} lost to another writer's compaction) ({:.1}s)",
            s.name,
            sinks::Sink::location(&sink),
            r.files_compacted,
            r.files_written,
            r.dirs,
            r.dropped,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let sink = DeltaSink::new(location, delta_storage(s, location), delta_config(cfg, s))
        .with_context(|| format!("sink `{}`: cannot open table", s.name))?;
    let shown = sinks::Sink::location(&sink).to_string();
    let started = std::time::Instant::now();
    let r = sink
        .maintain(
            s.delta.target_file_size,
            retention.unwrap_or(s.delta.vacuum_retention),
        )
        .await
        .with_context(|| format!("sink `{}`: maintenance of {shown} failed", s.name))?;
    if r.version_before.is_none() {
        println!("skip  {}: {shown} has no table yet", s.name);
        return Ok(());
    }
    println!(
        "ok    {}: {shown} purged deletion vectors of {} files, compacted {} files into {}, vacuumed {} files, checkpoint at version {} ({:.1}s)",
        s.name,
        r.files_purged,
        r.files_compacted,
        r.files_written,
        r.files_vacuumed,
        r.version_after.map_or("-".into(), |v| v.to_string()),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Opens every sink's table.
pub fn build_sinks(cfg: &ValidatedConfig) -> anyhow::Result<Vec<Arc<SinkRuntime>>> {
    let registry = registry_client(cfg)?;
    let writer = writer_id();
    cfg.sinks
        .iter()
        .map(|s| {
            let sink = open_sink(cfg, s, &writer)?;
            let dead_letters = match (&s.dead_letter_topic, s.errors) {
                (Some(topic), crate::config::ErrorPolicy::DeadLetter) => {
                    let topic: Arc<dyn crate::pipeline::dead_letters::DeadLetterTopic> = Arc::new(
                        crate::kafka::dead_letter::DeadLetters::new(
                            cfg,
                            topic,
                            s.dead_letter_exactly_once,
                        )
                        .map_err(|e| anyhow!("sink `{}`: {e}", s.name))?,
                    );
                    Some(topic)
                }
                _ => None,
            };
            Ok(Arc::new(SinkRuntime {
                config: s.clone(),
                sink,
                registry: registry.clone(),
                dead_letters,
            }))
        })
        .collect()
}

/// Checks every table at start-up. A store that ignores conditional creates (which every fence
/// of the Parquet and Delta protocols is) stops the start; an unreachable one only warns, since
/// its partitions wait for it (recovery retries). Each check may take [`START_CHECK_WITHIN`]:
/// object_store retries a refused connection for minutes.
async fn refuse_unsafe_stores(sinks: &[Arc<SinkRuntime>]) -> anyhow::Result<()> {
    for s in sinks {
        match tokio::time::timeout(START_CHECK_WITHIN, s.sink.check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e @ sinks::Error::Location { .. })) => {
                return Err(anyhow!("sink `{}`: {e}", s.config.name));
            }
            Ok(Err(e)) => warn!(sink = %s.config.name, "the table is not reachable yet: {e}"),
            Err(_) => warn!(
                sink = %s.config.name,
                "the table did not answer within {}s; its partitions wait for it",
                START_CHECK_WITHIN.as_secs()
            ),
        }
    }
    Ok(())
}

const START_CHECK_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the service until `cancel` fires (or, in catch-up mode, until caught up). Returns the
/// progress counters; a fatal pipeline error is an `Err` naming sink, partition and offsets.
pub async fn run(
    cfg: ValidatedConfig,
    options: SourceOptions,
    cancel: CancellationToken,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    crate::pipeline::tick::pinned_phase().map_err(anyhow::Error::msg)?;
    let sinks = build_sinks(&cfg)?;
    refuse_unsafe_stores(&sinks).await?;
    kafka::dead_letter::ensure_topics(&cfg, false).await?;
    for s in &cfg.sinks {
        let max_latency = s.flush.max_latency.as_millis() as u64;
        progress
            .sink(&s.name)
            .max_latency_ms
            .store(max_latency, std::sync::atomic::Ordering::Relaxed);
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        group = %cfg.group_id,
        sinks = sinks.len(),
        "lakesink started"
    );
    if let Some(addr) = cfg.http_listen {
        let bound = crate::telemetry::serve(addr, progress.clone())
            .await
            .with_context(|| format!("cannot listen on {addr} for /metrics and the probes"))?;
        info!("serving /metrics, /healthz and /readyz on http://{bound}");
    }
    let reported = CancellationToken::new();
    let reporter = options.until_caught_up.then(|| {
        let progress = progress.clone();
        let stop = reported.clone();
        tokio::spawn(async move { report_catch_up(progress, stop).await })
    });
    let rt = tokio::runtime::Handle::current();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread_cancel = cancel.clone();
    // A compaction stops before its commit when asked, and needs a few requests after it.
    let (held, settle_within) = (
        sinks.clone(),
        cfg.drain_timeout.max(Duration::from_secs(30)),
    );
    std::thread::Builder::new()
        .name("lakesink-source".into())
        .spawn(move || {
            let r = kafka::run(&cfg, sinks, progress, rt, thread_cancel, options);
            let _ = done_tx.send(r);
        })
        .context("cannot start the source thread")?;
    let result = done_rx
        .await
        .map_err(|_| anyhow!("the source thread panicked"))?;
    // The last commits are done: background work on the tables (a Parquet compaction between
    // its record and its last delete) ends before the process does.
    for s in &held {
        s.sink.settle(settle_within).await;
    }
    reported.cancel();
    if let Some(r) = reporter {
        let _ = r.await;
    }
    result.map_err(|e| anyhow!(e))
}

/// Catch-up progress: a bar with records/s, records left and an ETA on a terminal; a log line
/// every 10 s otherwise. Ends when caught up, or when `stop` fires (with the bar drawn at the
/// last position, not left where the previous tick saw it).
async fn report_catch_up(progress: Arc<Progress>, stop: CancellationToken) {
    let bar = bars::bar(
        0,
        "catch-up [{bar:40}] {pos}/{len} records ({per_sec}, {msg}, eta {eta})",
    );
    if let Some(b) = &bar {
        // Drawn from the start: joining the group and recovering positions take seconds.
        b.set_message("joining the consumer group");
        b.enable_steady_tick(Duration::from_millis(200));
    }
    let started = std::time::Instant::now();
    let mut last_line = started;
    loop {
        let tick = Duration::from_millis(if bar.is_some() { 200 } else { 1000 });
        let stopping = tokio::select! {
            _ = tokio::time::sleep(tick) => false,
            _ = stop.cancelled() => true,
        };
        let (done, total) = progress.catch_up_progress();
        if stopping {
            if let Some(b) = &bar {
                b.set_position(done);
                b.set_message(format!("{} left", total.saturating_sub(done)));
                b.finish();
            }
            return;
        }
        if total == 0 {
            continue;
        }
        let left = total.saturating_sub(done);
        match &bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
                b.set_message(format!("{left} left"));
            }
            None if last_line.elapsed() >= Duration::from_secs(10) => {
                last_line = std::time::Instant::now();
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let rate = done as f64 / secs;
                let eta = if rate > 0.0 {
                    left as f64 / rate
                } else {
                    f64::INFINITY
                };
                info!(
                    done,
                    total,
                    left,
                    records_per_s = rate as u64,
                    eta_s = eta.round(),
                    "catching up"
                );
            }
            None => {}
        }
        if done >= total {
            if let Some(b) = &bar {
                b.finish();
            }
            info!(records = total, "caught up");
            break;
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM; a second signal exits at once.
///
/// The handlers are registered before this returns (not in the spawned task), so a SIGTERM that
/// arrives right after start-up drains instead of killing the process with the default action.
pub fn cancel_on_signals(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
        match s.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = next(&mut int) => {}
            _ = next(&mut term) => {}
        }
        info!("shutdown requested: flushing, committing, then exiting");
        token.cancel();
        tokio::select! {
            _ = next(&mut int) => {}
            _ = next(&mut term) => {}
        }
        warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
}
