//! The metrics as Prometheus scrapes them, encoded by the `prometheus-client` crate at each
//! scrape from what the pipeline counts ([`Progress`], [`crate::metrics`]): OpenMetrics text, or
//! the Prometheus text format for scrapers that do not ask for OpenMetrics.
//!
//! Invariants: every name and label set here is what `deploy/` dashboards and alert rules query
//! (the deploy tests hold them to it); counters are declared without `_total`, which the
//! encoders add; a scrape reads atomics and takes each progress lock once, briefly.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::metrics::{Histogram, SinkStats};
use crate::pipeline::Progress;

/// OpenMetrics' content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics now, and their content type: OpenMetrics text, or the Prometheus text format.
pub fn render(p: &Arc<Progress>, openmetrics: bool) -> (&'static str, String) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition(p.clone())));
    let mut out = String::with_capacity(8192);
    let encoded = match openmetrics {
        true => prometheus_client::encoding::text::encode(&mut out, &registry),
        false => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
    };
    encoded.expect("encoding into a String cannot fail");
    let content_type = match openmetrics {
        true => OPENMETRICS,
        false => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
    };
    (content_type, out)
}

type Labels = Vec<(&'static str, String)>;

/// Encodes the pipeline's figures at each scrape.
#[derive(Debug)]
struct Exposition(Arc<Progress>);

fn counter<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        match labels.is_empty() {
            true => m.encode_counter::<NoLabelSet, V, f64>(&v, None)?,
            false => m
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, V, f64>(&v, None)?,
        }
    }
    Ok(())
}

fn gauge<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        match labels.is_empty() {
            true => m.encode_gauge(&v)?,
            false => m.encode_family(&labels)?.encode_gauge(&v)?,
        }
    }
    Ok(())
}

fn histogram<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, &'a Histogram)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        let (sum, count, buckets) = h.snapshot();
        m.encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

fn sink(name: &str) -> Labels {
    vec![("sink", name.to_string())]
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let p = &self.0;
        let sinks = p.sink_stats();
        let per_sink = |get: fn(&SinkStats) -> u64| {
            sinks
                .iter()
                .map(move |(n, s)| (sink(n), get(s)))
                .collect::<Vec<_>>()
        };
        let e = &mut enc;
        counter(
            e,
            "lakesink_records_consumed",
            "Kafka records read by the sink.",
            per_sink(|s| s.records_in.load(Relaxed)),
        )?;
        counter(
            e,
            "lakesink_bytes_consumed",
            "Bytes of Kafka record values read by the sink.",
            per_sink(|s| s.bytes_in.load(Relaxed)),
        )?;
        counter(
            e,
            "lakesink_rows_written",
            "Rows committed to the sink's table.",
            per_sink(|s| s.rows_written.load(Relaxed)),
        )?;
        counter(
            e,
            "lakesink_bytes_written",
            "Bytes of data files committed.",
            per_sink(|s| s.bytes_written.load(Relaxed)),
        )?;
        counter(
            e,
            "lakesink_files_written",
            "Data files committed.",
            per_sink(|s| s.files_written.load(Relaxed)),
        )?;
        counter(
            e,
            "lakesink_packed_bytes",
            "Bytes of buffered rows packed under memory pressure to wait for the latency tick.",
            per_sink(|s| s.packed_bytes.load(Relaxed)),
        )?;
        counter(
            e,
            "lakesink_packed_size_bytes",
            "Bytes those packed rows took once packed (zstd-compressed Arrow IPC).",
            per_sink(|s| s.packed_size_bytes.load(Relaxed)),
        )?;
        counter(
            e,
            "lakesink_commits",
            "Commits that made data visible.",
            per_sink(|s| s.commits.load(Relaxed)),
        )?;
        counter(
            e,
            "lakesink_fenced",
            "Commits lost to another writer of the same range (rebalances, zombies).",
            per_sink(|s| s.fenced.load(Relaxed)),
        )?;
        let labeled = |pick: fn(&SinkStats) -> &crate::metrics::Labeled, label: &'static str| {
            sinks
                .iter()
                .flat_map(|(n, s)| {
                    pick(s).snapshot().into_iter().map(move |(k, v)| {
                        (vec![("sink", n.to_string()), (label, k.to_string())], v)
                    })
                })
                .collect::<Vec<_>>()
        };
        counter(
            e,
            "lakesink_retries",
            "Retried operations, by operation.",
            labeled(|s| &s.retries, "operation"),
        )?;
        counter(
            e,
            "lakesink_errors",
            "Fatal errors that stopped a partition writer, by class.",
            labeled(|s| &s.errors, "class"),
        )?;
        histogram(
            e,
            "lakesink_flush_seconds",
            "Time to encode and stage a flush.",
            sinks.iter().map(|(n, s)| (sink(n), &s.flush_seconds)),
        )?;
        histogram(
            e,
            "lakesink_commit_seconds",
            "Time to commit and publish a flush.",
            sinks.iter().map(|(n, s)| (sink(n), &s.commit_seconds)),
        )?;
        histogram(
            e,
            "lakesink_freshness_seconds",
            "Per commit, from the Kafka timestamp of the oldest record it covers to the commit \
             (buckets up to an hour; at least flush.max_latency in steady state).",
            sinks.iter().map(|(n, s)| (sink(n), &s.freshness_seconds)),
        )?;
        gauge(
            e,
            "lakesink_max_latency_seconds",
            "The sink's flush.max_latency: freshness stays near it while the sink keeps up.",
            sinks
                .iter()
                .map(|(n, s)| (sink(n), s.max_latency_ms.load(Relaxed) as f64 / 1e3)),
        )?;
        let rejected = p.rejected.lock().expect("progress").clone();
        let by_reason = |what: &str| {
            rejected
                .iter()
                .filter(|((_, _, w), _)| *w == what)
                .map(|((s, class, _), n)| {
                    (vec![("sink", s.clone()), ("reason", class.to_string())], *n)
                })
                .collect::<Vec<_>>()
        };
        counter(
            e,
            "lakesink_dead_letters",
            "Records sent to the dead-letter topic, by reason.",
            by_reason("dead-letter"),
        )?;
        counter(
            e,
            "lakesink_skipped",
            "Records skipped, by reason: undecodable ones under errors = \"skip\" (their error \
             class), and by rule: Debezium records that are not row changes \
             (not-a-row-change), truncates in append tables (truncate); and records the \
             topic's retention deleted before they were read (retention).",
            by_reason("skip"),
        )?;
        counter(
            e,
            "lakesink_tombstones",
            "Null-value records (no row in append tables).",
            [(Labels::new(), p.tombstones.load(Relaxed))],
        )?;
        counter(
            e,
            "lakesink_backpressure_seconds",
            "Time the Kafka poll thread waited on a full worker queue (a worker behind, usually \
             flushing).",
            [(Labels::new(), p.backpressure_ns.load(Relaxed) as f64 / 1e9)],
        )?;
        counter(
            e,
            "lakesink_poll_idle_seconds",
            "Time the Kafka poll thread waited for records with none fetched (the source, not \
             lakesink, is behind; or nothing is produced).",
            [(Labels::new(), p.poll_idle_ns.load(Relaxed) as f64 / 1e9)],
        )?;
        let tables = p.tables.lock().expect("progress").clone();
        gauge(
            e,
            "lakesink_table_info",
            "The table each topic's rows land in, per sink (1 per table; a sink with a table per \
             topic adds one as each new topic is read).",
            tables.into_iter().map(|((s, topic), table)| {
                (vec![("sink", s), ("topic", topic), ("table", table)], 1i64)
            }),
        )?;
        gauge(
            e,
            "lakesink_buffer_bytes",
            "Decoded data buffered and not yet flushed.",
            [(Labels::new(), p.buffer_bytes() as i64)],
        )?;
        // Lag: the broker's end offset minus the committed position (the minimum over sinks).
        let highs = p.high_watermarks.lock().expect("progress").clone();
        let lows = p.low_watermarks.lock().expect("progress").clone();
        let mut committed: BTreeMap<_, i64> = BTreeMap::new();
        for ((_, tp), pos) in p.committed_positions() {
            let e = committed.entry(tp).or_insert(pos);
            *e = (*e).min(pos);
        }
        let partition = |tp: &sinks::TopicPartition| -> Labels {
            vec![
                ("topic", tp.topic.to_string()),
                ("partition", tp.partition.to_string()),
            ]
        };
        gauge(
            e,
            "lakesink_consumer_lag",
            "Records between the committed position (the table's, recovered at assignment, then \
             this member's commits; the log start where no table has one) and the partition's \
             end.",
            highs.iter().map(|(tp, high)| {
                let pos = committed
                    .get(tp)
                    .or_else(|| lows.get(tp))
                    .copied()
                    .unwrap_or(0);
                (partition(tp), (high - pos).max(0))
            }),
        )?;
        let stalled = p.stalled.lock().expect("progress").clone();
        gauge(
            e,
            "lakesink_partition_stalled",
            "Partitions the consumer cannot read: records beyond the fetch position and none \
             fetched for pipeline.stall_timeout (1 while stalled; /readyz names the offset and \
             the cause).",
            stalled.keys().map(|tp| (partition(tp), 1i64)),
        )?;
        gauge(
            e,
            "lakesink_stalled_partitions",
            "How many assigned partitions are stalled.",
            [(Labels::new(), stalled.len() as i64)],
        )?;
        let quarantined = p.quarantined.lock().expect("progress").clone();
        gauge(
            e,
            "lakesink_partition_quarantined",
            "Partitions (of one sink, or sink=\"*\": of every sink) not consumed: until an \
             operator acts (a recreated topic, a position beyond the end of the log, a broken \
             commit chain) or until its table answers (retried); 1 while so, /readyz and the \
             log say why and what to do.",
            quarantined.keys().map(|(tp, s)| {
                let mut l = sink(s);
                l.extend(partition(tp));
                (l, 1i64)
            }),
        )?;
        gauge(
            e,
            "lakesink_quarantined_partitions",
            "How many (sink, partition) pairs are quarantined.",
            [(Labels::new(), quarantined.len() as i64)],
        )?;
        gauge(
            e,
            "lakesink_ready",
            "Whether the process holds partitions and is not draining.",
            [(Labels::new(), i64::from(p.ready()))],
        )?;
        Ok(())
    }
}
