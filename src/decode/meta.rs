//! The Kafka metadata columns appended to every row: `_kafka_topic`, `_kafka_partition`,
//! `_kafka_offset`, `_kafka_timestamp` (UTC milliseconds) and, optionally, `_kafka_key`.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Int32Array, Int64Builder, StringArray, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, TimeUnit};

use crate::config::MetadataConfig;

/// Builders for the metadata columns of the rows currently held by a decoder.
#[derive(Debug)]
pub struct MetaColumns {
    config: MetadataConfig,
    topic: Arc<str>,
    partition: i32,
    offsets: Int64Builder,
    timestamps: TimestampMillisecondBuilder,
    keys: BinaryBuilder,
    rows: usize,
}

impl MetaColumns {
    pub fn new(config: MetadataConfig, topic: Arc<str>, partition: i32) -> Self {
        Self {
            config,
            topic,
            partition,
            offsets: Int64Builder::new(),
            timestamps: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            keys: BinaryBuilder::new(),
            rows: 0,
        }
    }

    pub fn push(&mut self, offset: i64, timestamp_ms: Option<i64>, key: Option<&[u8]>) {
        self.offsets.append_value(offset);
        self.timestamps.append_option(timestamp_ms);
        if self.config.key {
            self.keys.append_option(key);
        }
        self.rows += 1;
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The metadata fields and columns for the rows pushed since the last call.
    pub fn finish(&mut self) -> Vec<(Field, ArrayRef)> {
        let n = self.rows;
        self.rows = 0;
        let mut out: Vec<(Field, ArrayRef)> = Vec::with_capacity(5);
        let offsets = self.offsets.finish();
        let timestamps = self.timestamps.finish();
        let keys = self.keys.finish();
        if self.config.topic {
            out.push((
                Field::new("_kafka_topic", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                    &*self.topic,
                    n,
                ))),
            ));
        }
        if self.config.partition {
            out.push((
                Field::new("_kafka_partition", DataType::Int32, false),
                Arc::new(Int32Array::from_value(self.partition, n)),
            ));
        }
        if self.config.offset {
            out.push((
                Field::new("_kafka_offset", DataType::Int64, false),
                Arc::new(offsets),
            ));
        }
        if self.config.timestamp {
            out.push((
                Field::new(
                    "_kafka_timestamp",
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    true,
                ),
                Arc::new(timestamps),
            ));
        }
        if self.config.key {
            out.push((
                Field::new("_kafka_key", DataType::Binary, true),
                Arc::new(keys),
            ));
        }
        out
    }
}
