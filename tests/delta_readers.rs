//! What Delta readers other than lakesink accept of its tables: the reader profiles
//! (`[sink.delta] profile`), checked in the table's log and with python deltalake.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::Value;
use sinks::{Flush, Offset, Sink, TopicPartition};

/// `[sink.delta] profile = "fabric"`: a wall-clock column (Avro `local-timestamp-*`, Debezium
/// `Timestamp`) is stored as a UTC `timestamp` with the same reading, so the table needs no
/// `timestampNtz` feature and stays at protocol 1/2, which Power BI and Fabric's SQL analytics
/// endpoint read; the default profile keeps `timestamp_ntz` (reader 3, writer 7). Checked in
/// the table's log and with python deltalake.
#[tokio::test(flavor = "multi_thread")]
async fn the_fabric_profile_writes_what_power_bi_and_fabric_read() {
    use sinks::delta::{DeltaSink, DeltaSinkConfig, ReaderProfile, FABRIC_ROW_GROUP_ROWS};
    // 2026-01-02T03:04:05 on the wall clock, and an instant.
    let (wall, instant) = (1_767_323_045_000i64, 1_767_323_045_123i64);
    for profile in [ReaderProfile::Delta, ReaderProfile::Fabric] {
        let store = Store::local(&format!("profile_{profile:?}"));
        let sink = DeltaSink::new(
            &store.url,
            store.options.clone(),
            DeltaSinkConfig {
                profile,
                row_group_rows: match profile {
                    ReaderProfile::Fabric => FABRIC_ROW_GROUP_ROWS,
                    ReaderProfile::Delta => 1 << 20,
                },
                ..Default::default()
            },
        )
        .unwrap();
        let tp = TopicPartition::new("profile", 0);
        let staged = sink
            .stage(Flush {
                tp: tp.clone(),
                start: Offset(0),
                next: Offset(1),
                batches: wall_clock_rows(1, wall, instant),
                truncate: false,
            })
            .await
            .unwrap();
        sink.commit(&staged).await.unwrap();

        // The log: the newest protocol and schema.
        let dir = std::path::PathBuf::from(store.url.strip_prefix("file://").unwrap());
        let mut logs: Vec<_> = std::fs::read_dir(dir.join("_delta_log"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        logs.sort();
        let (mut protocol, mut fields) = (Value::Null, Value::Null);
        for log in logs {
            for line in std::fs::read_to_string(log).unwrap().lines() {
                let action: Value = serde_json::from_str(line).unwrap();
                if let Some(p) = action.get("protocol") {
                    protocol = p.clone();
                }
                if let Some(m) = action.get("metaData") {
                    let s: Value =
                        serde_json::from_str(m["schemaString"].as_str().unwrap()).unwrap();
                    fields = s["fields"].clone();
                }
            }
        }
        let type_of = |name: &str| {
            fields
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == name)
                .map(|f| f["type"].as_str().unwrap().to_string())
                .unwrap()
        };
        let features =
            protocol["readerFeatures"].to_string() + &protocol["writerFeatures"].to_string();
        match profile {
            ReaderProfile::Fabric => {
                assert_eq!(type_of("local"), "timestamp", "{fields}");
                assert_eq!(protocol["minReaderVersion"], 1, "{protocol}");
                assert_eq!(protocol["minWriterVersion"], 2, "{protocol}");
                assert!(!features.contains("timestampNtz"), "{protocol}");
            }
            ReaderProfile::Delta => {
                assert_eq!(type_of("local"), "timestamp_ntz", "{fields}");
                assert!(features.contains("timestampNtz"), "{protocol}");
            }
        }
        assert_eq!(type_of("at"), "timestamp", "{fields}");

        // An independent reader sees the same readings.
        let table = store.read_delta(&[]);
        let row = &table["rows"][0];
        assert_eq!(row["local"], wall, "{profile:?}: {table}");
        assert_eq!(row["at"], instant, "{profile:?}: {table}");
        let local_type = table["schema"]["local"].as_str().unwrap().to_string();
        assert_eq!(
            local_type.contains("tz="),
            profile == ReaderProfile::Fabric,
            "{profile:?}: {local_type}"
        );
        if profile == ReaderProfile::Delta {
            // A table created under `delta` keeps its timestamp_ntz column: a `fabric` writer
            // is refused at its first flush, naming the column.
            let fabric = DeltaSink::new(
                &store.url,
                store.options.clone(),
                DeltaSinkConfig {
                    profile: ReaderProfile::Fabric,
                    ..Default::default()
                },
            )
            .unwrap();
            let again = Flush {
                tp: tp.clone(),
                start: Offset(1),
                next: Offset(2),
                batches: wall_clock_rows(2, wall, instant),
                truncate: false,
            };
            let e = match fabric.stage(again).await {
                Ok(staged) => fabric.commit(&staged).await.map(|_| ()).unwrap_err(),
                Err(e) => e,
            };
            assert!(e.to_string().contains("local"), "{e}");
        }
    }
}

/// One row `id` with a wall-clock time and an instant.
fn wall_clock_rows(id: i64, wall: i64, instant: i64) -> Vec<arrow::array::RecordBatch> {
    use arrow::array::{Int64Array, RecordBatch, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(
            "local",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            true,
        ),
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]));
    vec![RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![id])),
            Arc::new(TimestampMillisecondArray::from(vec![wall])),
            Arc::new(TimestampMillisecondArray::from(vec![instant]).with_timezone("UTC")),
        ],
    )
    .unwrap()]
}
