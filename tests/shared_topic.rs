//! One topic read by two sinks: what happens to one sink (a fence, a forward jump to another
//! writer's end) never costs the other sink a record. The consumer's fetch position is shared by
//! every sink of the topic, so a skip for one sink must not move it for the others.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::Int64Array;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use common::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sinks::parquet::{ParquetSink, ParquetSinkConfig};
use sinks::{Flush, Offset, Sink, TopicPartition};

async fn produce_ids(topic: &str, ids: std::ops::Range<i64>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let futs = ids.map(|i| {
        let producer = producer.clone();
        let payload = format!("{{\"id\": {i}}}");
        async move {
            let d = producer
                .send(
                    FutureRecord::<(), _>::to(topic)
                        .partition(0)
                        .payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
            assert_eq!(
                d.offset, i,
                "one producer, one partition: offsets are the ids"
            );
        }
    });
    futures::future::join_all(futs).await;
}

fn parquet(store: &Store, writer: &str) -> ParquetSink {
    ParquetSink::new(
        store.table_store(),
        ParquetSinkConfig {
            writer_id: writer.into(),
            ..Default::default()
        },
    )
}

async fn wait_committed(store: &Store, tp: &TopicPartition, at_least: i64, proc_: &Lakesink) {
    let sink = parquet(store, "reader");
    let start = Instant::now();
    loop {
        let c = sink.committed(tp).await.unwrap().map_or(0, |o| o.0);
        if c >= at_least {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{} committed only up to {c}, not {at_least}:\n{}",
            store.url,
            proc_.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// F1 of the exactly-once review: sink `a` is fenced by a writer that committed further than
/// the consumer has handed out, while sink `b` of the same topic is behind that point. Sink `b`
/// must still get every record.
#[tokio::test(flavor = "multi_thread")]
async fn a_fence_in_one_sink_never_skips_records_of_another() {
    let topic = unique("shared");
    create_topic(&topic, 1).await;
    produce_ids(&topic, 0..1000).await;
    let (a, b) = (Store::local("a"), Store::local("b"));
    let release = scratch("release").join("go");
    let sink = |name: &str, store: &Store, rows: usize, latency: &str| {
        format!(
            r#"
[[sink]]
name = "{name}"
topics = ["{topic}"]
table = "{url}"
format = "json"
schema = {{ id = "long" }}
flush = {{ max_rows = {rows}, max_latency = "{latency}" }}
"#,
            url = store.url
        )
    };
    let cfg = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership}, "queued.max.messages.kbytes" = "1", "max.partition.fetch.bytes" = "2048" }}

[pipeline]
queue_records = 512
{a}{b}"#,
        kafka = kafka(),
        group = unique("g"),
        membership = group_properties(),
        a = sink("a", &a, 500, "60s"),
        b = sink("b", &b, 100, "1s"),
    );
    // Sink a's first commit ([0, 500)) waits after staging until `release` exists; meanwhile it
    // reads [500, 1000) and sink b commits all of [0, 1000).
    let mut proc_ = Lakesink::start(
        &cfg,
        &[
            ("LAKESINK_TEST_CRASHPOINT", "after_stage:1"),
            ("LAKESINK_TEST_CRASHPOINT_SINK", "a"),
            (
                "LAKESINK_TEST_CRASHPOINT_RELEASE",
                release.to_str().unwrap(),
            ),
        ],
    );
    proc_.wait_for_line("CRASHPOINT after_stage", Duration::from_secs(60));
    let tp = TopicPartition::new(topic.as_str(), 0);
    wait_committed(&b, &tp, 1000, &proc_).await;

    // Another writer (a zombie of sink a) commits a's [0, 8000).
    let zombie = parquet(&a, "zombie");
    let ids = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    let batch =
        RecordBatch::try_new(ids, vec![Arc::new(Int64Array::from_iter_values(0..8000))]).unwrap();
    let staged = zombie
        .stage(Flush {
            tp: tp.clone(),
            start: Offset(0),
            next: Offset(8000),
            batches: vec![batch],
            packed: Vec::new(),
            truncate: false,
            tick: None,
        })
        .await
        .unwrap();
    zombie.commit(&staged).await.unwrap();

    // More records arrive while sink a is held: its queue fills, so the consumer hands sink b
    // only part of them; it fetches little at a time, so most are not even fetched.
    produce_ids(&topic, 1000..9000).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Sink a's commit at 0 is fenced at 8000, with [500, 1000) read since: it must skip to 8000,
    // and sink b must still read everything before 8000.
    std::fs::write(&release, b"").unwrap();
    proc_.wait_for_line("fenced by another writer", Duration::from_secs(30));
    wait_committed(&b, &tp, 9000, &proc_).await;
    wait_committed(&a, &tp, 9000, &proc_).await;
    proc_.stop();

    let offsets: Vec<i64> = b.dump()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["_kafka_offset"].as_i64().unwrap())
        .collect();
    let mut sorted = offsets.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..9000).collect::<Vec<_>>(),
        "sink b holds every offset exactly once ({} rows)",
        offsets.len()
    );
    // Sink a: the zombie's [0, 8000), then its own from 8000.
    let a_rows: Vec<i64> = parquet(&a, "reader")
        .read_marker(&tp, Offset(8000))
        .await
        .unwrap()
        .map(|m| vec![m.start, m.next, m.rows as i64])
        .unwrap_or_default();
    assert_eq!(
        a_rows,
        vec![8000, 8500, 500],
        "sink a goes on at the winner's end"
    );
}
