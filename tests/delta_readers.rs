//! What Delta readers other than lakesink accept of its tables: the reader profiles
//! (`[sink.delta] profile`) and the upsert strategies (`[sink.delta] upsert`), checked in the
//! table's log and with python deltalake and DuckDB.

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
                row_groups: match profile {
                    ReaderProfile::Fabric => sinks::encode::RowGroups {
                        rows: FABRIC_ROW_GROUP_ROWS,
                        bytes: None,
                    },
                    ReaderProfile::Delta => Default::default(),
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
                packed: Vec::new(),
                truncate: false,
                tick: None,
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
                packed: Vec::new(),
                truncate: false,
                tick: None,
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

/// One upsert flush: rows `id` → `name`, and the ids it deletes.
type Changes = (Vec<(i64, String)>, Vec<i64>);

/// Rows `id` → `name`, deletes for `deleted`, as one upsert flush's batch.
fn changes(upserts: &[(i64, String)], deleted: &[i64]) -> Vec<arrow::array::RecordBatch> {
    use arrow::array::{BooleanArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("_deleted", DataType::Boolean, true),
    ]));
    let ids = upserts
        .iter()
        .map(|(i, _)| *i)
        .chain(deleted.iter().copied());
    let names = upserts
        .iter()
        .map(|(_, n)| Some(n.clone()))
        .chain(deleted.iter().map(|_| None));
    let flags = upserts
        .iter()
        .map(|_| Some(false))
        .chain(deleted.iter().map(|_| Some(true)));
    vec![RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(ids)),
            Arc::new(StringArray::from_iter(names)),
            Arc::new(BooleanArray::from_iter(flags)),
        ],
    )
    .unwrap()]
}

/// `[sink.delta] upsert = "deletion-vectors"`: upserts mark replaced and deleted rows in
/// deletion vectors instead of rewriting files, and independent readers that apply deletion
/// vectors (python deltalake's scan, DuckDB over it) read exactly what copy-on-write gives. The
/// first flush is written by a copy-on-write sink, so the deletion-vector sink adds the feature
/// to an existing table; a last flush by a copy-on-write sink on that table still goes by
/// deletion vectors (rewriting a file with one would bring its deleted rows back). A reader
/// that cannot apply them (deltalake's pyarrow dataset) refuses the table, naming the feature.
#[tokio::test(flavor = "multi_thread")]
async fn deletion_vector_upserts_read_back_like_copy_on_write() {
    use sinks::delta::{DeltaSink, DeltaSinkConfig, UpsertStrategy};
    use sinks::upsert::UpsertConfig;
    use std::collections::BTreeMap;
    let config = |strategy| DeltaSinkConfig {
        upsert: Some(UpsertConfig {
            keys: vec!["id".into()],
            keys_from: None,
            delete_column: Some("_deleted".into()),
            unchanged_column: None,
        }),
        upsert_strategy: strategy,
        ..Default::default()
    };
    // Four flushes: inserts; updates, deletes and inserts; updates that re-insert deleted keys
    // and deletes; updates again.
    let v = |round: u32, i: i64| format!("v{round}-{i}");
    let flushes: Vec<Changes> = vec![
        ((0..2000).map(|i| (i, v(0, i))).collect(), vec![]),
        (
            (0..2000)
                .step_by(3)
                .map(|i| (i, v(1, i)))
                .chain((2000..2100).map(|i| (i, v(1, i))))
                .collect(),
            (1..2000).step_by(7).filter(|i| i % 3 != 0).collect(),
        ),
        (
            (0..2100).step_by(5).map(|i| (i, v(2, i))).collect(),
            (2000..2010).collect(),
        ),
        (
            (0..2100).step_by(11).map(|i| (i, v(3, i))).collect(),
            vec![],
        ),
    ];
    let mut expected: BTreeMap<i64, String> = BTreeMap::new();
    for (upserts, deleted) in &flushes {
        for (i, n) in upserts {
            expected.insert(*i, n.clone());
        }
        for i in deleted {
            expected.remove(i);
        }
    }
    let mut results = Vec::new();
    for strategy in [UpsertStrategy::CopyOnWrite, UpsertStrategy::DeletionVectors] {
        let store = Store::local(&format!("upsert_{strategy:?}"));
        let tp = TopicPartition::new("customers", 0);
        let mut start = 0;
        for (n, (upserts, deleted)) in flushes.iter().enumerate() {
            // The first and the last flush by a copy-on-write sink.
            let by = match n {
                0 | 3 => UpsertStrategy::CopyOnWrite,
                _ => strategy,
            };
            let sink = DeltaSink::new(&store.url, store.options.clone(), config(by)).unwrap();
            let next = start + 1 + n as i64;
            let staged = sink
                .stage(Flush {
                    tp: tp.clone(),
                    start: Offset(start),
                    next: Offset(next),
                    batches: changes(upserts, deleted),
                    packed: Vec::new(),
                    truncate: false,
                    tick: None,
                })
                .await
                .unwrap();
            sink.commit(&staged).await.unwrap();
            start = next;
        }
        let dir = store.url.strip_prefix("file://").unwrap().to_string();
        let out = std::process::Command::new(python())
            .arg(py_script("read_delta_dv.py"))
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "read_delta_dv.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table: Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows: BTreeMap<i64, String> = table["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_i64().unwrap(),
                    r["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            table["rows"].as_array().unwrap().len(),
            rows.len(),
            "{strategy:?}: no key twice"
        );
        assert_eq!(rows, expected, "{strategy:?}: python deltalake's scan");
        assert_eq!(table["duckdb"]["count"], expected.len(), "{strategy:?}");
        assert_eq!(table["duckdb"]["ids"], expected.len(), "{strategy:?}");
        let features = table["reader_features"].to_string() + &table["writer_features"].to_string();
        match strategy {
            UpsertStrategy::DeletionVectors => {
                assert_eq!(table["min_reader"], 3, "{table}");
                assert_eq!(table["min_writer"], 7, "{table}");
                assert!(
                    features.matches("deletionVectors").count() == 2,
                    "{features}"
                );
                assert!(table["files_with_dv"].as_u64().unwrap() > 0, "{table}");
                let dataset = table["pyarrow_dataset"].as_str().unwrap();
                assert!(
                    dataset.starts_with("refused") && dataset.contains("deletionVectors"),
                    "{dataset}"
                );
            }
            UpsertStrategy::CopyOnWrite => {
                assert!(!features.contains("deletionVectors"), "{features}");
                assert_eq!(table["files_with_dv"], 0, "{table}");
                assert_eq!(
                    table["pyarrow_dataset"].as_str().unwrap(),
                    format!("read {} rows", expected.len())
                );
            }
        }
        results.push(rows);
    }
    assert_eq!(results[0], results[1]);
}
