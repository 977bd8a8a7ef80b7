//! Observability: per-sink counters and latency histograms, consumer lag, readiness, and the
//! HTTP listener that serves them (`/metrics` in Prometheus text format, `/healthz`, `/readyz`).
//!
//! Invariant: nothing here is on the per-record hot path except relaxed atomic increments;
//! histograms are observed once per flush and commit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::metrics::SinkStats;
use crate::pipeline::Progress;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric in the Prometheus text exposition format.
pub fn render(p: &Progress) -> String {
    let mut out = String::with_capacity(4096);
    let sinks = p.sink_stats();
    let counter = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&SinkStats) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (sink, s) in &sinks {
            let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", esc(sink), get(s));
        }
    };
    counter(
        &mut out,
        "lakesink_records_consumed_total",
        "Kafka records read by the sink.",
        &|s| s.records_in.load(Relaxed),
    );
    counter(
        &mut out,
        "lakesink_bytes_consumed_total",
        "Bytes of Kafka record values read by the sink.",
        &|s| s.bytes_in.load(Relaxed),
    );
    counter(
        &mut out,
        "lakesink_rows_written_total",
        "Rows committed to the sink's table.",
        &|s| s.rows_written.load(Relaxed),
    );
    counter(
        &mut out,
        "lakesink_bytes_written_total",
        "Bytes of data files committed.",
        &|s| s.bytes_written.load(Relaxed),
    );
    counter(
        &mut out,
        "lakesink_files_written_total",
        "Data files committed.",
        &|s| s.files_written.load(Relaxed),
    );
    counter(
        &mut out,
        "lakesink_commits_total",
        "Commits that made data visible.",
        &|s| s.commits.load(Relaxed),
    );
    counter(
        &mut out,
        "lakesink_fenced_total",
        "Commits lost to another writer of the same range (rebalances, zombies).",
        &|s| s.fenced.load(Relaxed),
    );
    for (name, help, label, pick) in [
        (
            "lakesink_retries_total",
            "Retried operations, by operation.",
            "operation",
            0,
        ),
        (
            "lakesink_errors_total",
            "Fatal errors that stopped a partition writer, by class.",
            "class",
            1,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (sink, s) in &sinks {
            let l = if pick == 0 { &s.retries } else { &s.errors };
            for (k, n) in l.snapshot() {
                let _ = writeln!(out, "{name}{{sink=\"{}\",{label}=\"{k}\"}} {n}", esc(sink));
            }
        }
    }
    for (name, help, pick) in [
        (
            "lakesink_flush_seconds",
            "Time to encode and stage a flush.",
            0,
        ),
        (
            "lakesink_commit_seconds",
            "Time to commit and publish a flush.",
            1,
        ),
        (
            "lakesink_freshness_seconds",
            "Per commit, from the Kafka timestamp of the oldest record it covers to the commit.",
            2,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (sink, s) in &sinks {
            let h = match pick {
                0 => &s.flush_seconds,
                1 => &s.commit_seconds,
                _ => &s.freshness_seconds,
            };
            h.render(&mut out, name, &format!("sink=\"{}\"", esc(sink)));
        }
    }
    let _ = writeln!(out, "# HELP lakesink_dead_letters_total Records sent to the dead-letter topic, by reason.\n# TYPE lakesink_dead_letters_total counter");
    let rejected = p.rejected.lock().expect("progress").clone();
    for ((sink, class, what), n) in &rejected {
        if *what == "dead-letter" {
            let _ = writeln!(
                out,
                "lakesink_dead_letters_total{{sink=\"{}\",reason=\"{class}\"}} {n}",
                esc(sink)
            );
        }
    }
    let _ = writeln!(out, "# HELP lakesink_skipped_total Records skipped, by reason: undecodable ones under errors = \"skip\" (their error class), and by rule: Debezium records that are not row changes (not-a-row-change), truncates in append tables (truncate); and records the topic's retention deleted before they were read (retention).\n# TYPE lakesink_skipped_total counter");
    for ((sink, class, what), n) in &rejected {
        if *what == "skip" {
            let _ = writeln!(
                out,
                "lakesink_skipped_total{{sink=\"{}\",reason=\"{class}\"}} {n}",
                esc(sink)
            );
        }
    }
    let _ = writeln!(out, "# HELP lakesink_tombstones_total Null-value records (no row in append tables).\n# TYPE lakesink_tombstones_total counter\nlakesink_tombstones_total {}", p.tombstones.load(Relaxed));
    let _ = writeln!(out, "# HELP lakesink_backpressure_seconds_total Time the Kafka poll thread waited on a full worker queue (a worker behind, usually flushing).\n# TYPE lakesink_backpressure_seconds_total counter\nlakesink_backpressure_seconds_total {}", p.backpressure_ns.load(Relaxed) as f64 / 1e9);
    let _ = writeln!(out, "# HELP lakesink_poll_idle_seconds_total Time the Kafka poll thread waited for records with none fetched (the source, not lakesink, is behind; or nothing is produced).\n# TYPE lakesink_poll_idle_seconds_total counter\nlakesink_poll_idle_seconds_total {}", p.poll_idle_ns.load(Relaxed) as f64 / 1e9);
    let _ = writeln!(out, "# HELP lakesink_table_info The table each topic's rows land in, per sink (1 per table; a sink with a table per topic adds one as each new topic is read).\n# TYPE lakesink_table_info gauge");
    for ((sink, topic), table) in p.tables.lock().expect("progress").iter() {
        let _ = writeln!(
            out,
            "lakesink_table_info{{sink=\"{}\",topic=\"{}\",table=\"{}\"}} 1",
            esc(sink),
            esc(topic),
            esc(table)
        );
    }
    let _ = writeln!(out, "# HELP lakesink_buffer_bytes Decoded data buffered and not yet flushed.\n# TYPE lakesink_buffer_bytes gauge\nlakesink_buffer_bytes {}", p.buffer_bytes());
    // Lag: the broker's end offset minus the committed position (the minimum over sinks).
    let _ = writeln!(out, "# HELP lakesink_consumer_lag Records between the committed position and the partition's end.\n# TYPE lakesink_consumer_lag gauge");
    let highs = p.high_watermarks.lock().expect("progress").clone();
    let mut committed: BTreeMap<_, i64> = BTreeMap::new();
    for ((_, tp), pos) in p.committed_positions() {
        let e = committed.entry(tp).or_insert(pos);
        *e = (*e).min(pos);
    }
    for (tp, high) in &highs {
        let pos = committed.get(tp).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "lakesink_consumer_lag{{topic=\"{}\",partition=\"{}\"}} {}",
            esc(&tp.topic),
            tp.partition,
            (high - pos).max(0)
        );
    }
    let stalled = p.stalled.lock().expect("progress").clone();
    let _ = writeln!(out, "# HELP lakesink_partition_stalled Partitions the consumer cannot read: records beyond the fetch position and none fetched for pipeline.stall_timeout (1 while stalled; /readyz names the offset and the cause).\n# TYPE lakesink_partition_stalled gauge");
    for tp in stalled.keys() {
        let _ = writeln!(
            out,
            "lakesink_partition_stalled{{topic=\"{}\",partition=\"{}\"}} 1",
            esc(&tp.topic),
            tp.partition
        );
    }
    let _ = writeln!(out, "# HELP lakesink_stalled_partitions How many assigned partitions are stalled.\n# TYPE lakesink_stalled_partitions gauge\nlakesink_stalled_partitions {}", stalled.len());
    let quarantined = p.quarantined.lock().expect("progress").clone();
    let _ = writeln!(out, "# HELP lakesink_partition_quarantined Partitions (of one sink, or sink=\"*\": of every sink) not consumed: until an operator acts (a recreated topic, a position beyond the end of the log, a broken commit chain) or until its table answers (retried); 1 while so, /readyz and the log say why and what to do.\n# TYPE lakesink_partition_quarantined gauge");
    for (tp, sink) in quarantined.keys() {
        let _ = writeln!(
            out,
            "lakesink_partition_quarantined{{sink=\"{}\",topic=\"{}\",partition=\"{}\"}} 1",
            esc(sink),
            esc(&tp.topic),
            tp.partition
        );
    }
    let _ = writeln!(out, "# HELP lakesink_quarantined_partitions How many (sink, partition) pairs are quarantined.\n# TYPE lakesink_quarantined_partitions gauge\nlakesink_quarantined_partitions {}", quarantined.len());
    let _ = writeln!(out, "# HELP lakesink_ready Whether the process holds partitions and is not draining.\n# TYPE lakesink_ready gauge\nlakesink_ready {}", u8::from(p.ready()));
    out
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` in the background.
pub async fn serve(addr: SocketAddr, progress: Arc<Progress>) -> std::io::Result<SocketAddr> {
    let metrics = progress.clone();
    let ready = progress.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let p = metrics.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        render(&p),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let p = ready.clone();
                async move {
                    let stalled = p.stalled.lock().expect("progress").clone();
                    let quarantined = p.quarantined.lock().expect("progress").clone();
                    if p.ready() {
                        (StatusCode::OK, "ready\n".to_string())
                    } else if p.health.draining.load(Relaxed) {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string())
                    } else if !stalled.is_empty() {
                        let lines: Vec<String> = stalled
                            .iter()
                            .map(|(tp, (offset, cause))| {
                                format!("partition {tp} stalled at offset {offset}: {cause}\n")
                            })
                            .collect();
                        (StatusCode::SERVICE_UNAVAILABLE, lines.concat())
                    } else if !quarantined.is_empty() {
                        let lines: Vec<String> = quarantined
                            .iter()
                            .map(|((tp, sink), why)| {
                                format!("partition {tp} quarantined (sink {sink}): {why}\n")
                            })
                            .collect();
                        (StatusCode::SERVICE_UNAVAILABLE, lines.concat())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no partitions assigned\n".to_string(),
                        )
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn probes_and_metrics_over_http() {
        let p = Arc::new(Progress::default());
        p.sink("orders").rows_written.fetch_add(42, Relaxed);
        p.tables.lock().unwrap().insert(
            ("orders".into(), "shop.public.orders".into()),
            "s3://lake/cdc/public/orders".into(),
        );
        p.sink("orders")
            .commit_seconds
            .observe(Duration::from_millis(30));
        let addr = serve("127.0.0.1:0".parse().unwrap(), p.clone())
            .await
            .unwrap();
        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            async move {
                let r = reqwest::get(url).await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(get("/healthz").await.0, 200);
        assert_eq!(get("/readyz").await.0, 503, "no partitions yet");
        p.health.assigned.store(true, Relaxed);
        assert_eq!(get("/readyz").await.0, 200);
        p.health.draining.store(true, Relaxed);
        let (code, body) = get("/readyz").await;
        assert_eq!((code, body.as_str()), (503, "draining\n"));
        let (_, m) = get("/metrics").await;
        assert!(
            m.contains("lakesink_rows_written_total{sink=\"orders\"} 42"),
            "{m}"
        );
        assert!(
            m.contains("lakesink_commit_seconds_bucket{sink=\"orders\",le=\"0.05\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("lakesink_commit_seconds_count{sink=\"orders\"} 1"),
            "{m}"
        );
        assert!(
            m.contains(
                "lakesink_table_info{sink=\"orders\",topic=\"shop.public.orders\",table=\"s3://lake/cdc/public/orders\"} 1"
            ),
            "{m}"
        );
    }
}
