//! The decode chain of a worker: the format's decoder, then the key decoder, the Debezium
//! unwrap (records that are not row changes skipped and counted, unavailable values marked),
//! and source truncates.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use tracing::{debug, info};

use std::collections::HashMap;

use crate::config::Format;
use crate::decode::debezium;
use crate::decode::{AvroDecoder, FormatDecoder, JsonDecoder};

use super::*;

/// Why a decoded batch cannot be reshaped into the sink's rows (envelopes without row images,
/// keys that do not decode): the sink stops, naming the partition.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct ReshapeError(String);

impl From<String> for ReshapeError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for ReshapeError {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl Worker {
    /// Format-specific reshaping of a decoded batch (Debezium envelopes to row images).
    pub(super) async fn transform(
        &mut self,
        batch: RecordBatch,
    ) -> Result<Option<RecordBatch>, ReshapeError> {
        let Some(batch) = self.unwrap_envelope(batch)? else {
            return Ok(None);
        };
        let batch = self.truncates(batch)?;
        let Some(keys) = self.keys.as_mut() else {
            return Ok(Some(batch));
        };
        let schema = batch.schema();
        let raw = schema
            .index_of("_kafka_key")
            .map_err(|_| "internal: the raw key column is missing")?;
        let decoded = keys
            .decode(arrow::array::AsArray::as_binary::<i32>(batch.column(raw)))
            .await
            .map_err(|e| format!("cannot decode keys: {e}"))?;
        let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
        let mut columns = batch.columns().to_vec();
        if !self.ctx.runtime.config.metadata.key {
            fields.remove(raw);
            columns.remove(raw);
        }
        fields.push(Arc::new(arrow::datatypes::Field::new(
            crate::decode::key::KEY_COLUMN,
            decoded.data_type().clone(),
            true,
        )));
        columns.push(decoded);
        RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)
            .map(Some)
            .map_err(|e| ReshapeError(e.to_string()))
    }

    /// Counts records skipped by rule (not undecodable: nothing goes to the dead-letter topic).
    pub(super) fn count_skipped(&self, reason: &'static str, n: usize) {
        *self
            .ctx
            .progress
            .rejected
            .lock()
            .expect("progress")
            .entry((self.sink_name().to_string(), reason, "skip"))
            .or_default() += n as u64;
    }

    /// Debezium envelopes to row images. Records that are not row changes (heartbeats,
    /// logical-decoding messages `op: "m"`, schema-change events) are skipped and counted;
    /// `None` when none is left.
    pub(super) fn unwrap_envelope(
        &mut self,
        batch: RecordBatch,
    ) -> Result<Option<RecordBatch>, ReshapeError> {
        if !matches!(
            self.ctx.runtime.config.format,
            Format::DebeziumJson | Format::DebeziumAvro
        ) {
            return Ok(Some(batch));
        }
        let (batch, skipped) = debezium::row_changes(batch)?;
        if skipped > 0 {
            self.count_skipped("not-a-row-change", skipped);
            debug!(sink = self.sink_name(), tp = %self.ctx.tp, skipped,
                   "Debezium records that are not row changes (heartbeats, messages) skipped");
        }
        let Some(batch) = batch else { return Ok(None) };
        let upsert = self.ctx.runtime.config.upsert_keys.is_some();
        let finish = |rows: RecordBatch| match upsert {
            true => debezium::mark_unavailable(rows)
                .map(Some)
                .map_err(ReshapeError),
            false => Ok(Some(rows)),
        };
        if self.ctx.runtime.config.format == Format::DebeziumJson {
            return finish(debezium::unwrap(&batch, &HashMap::new())?);
        }
        let (id, schema) = self
            .decoder
            .reader_schema()
            .ok_or("no reader schema for a decoded batch")?;
        if self
            .semantics
            .as_ref()
            .is_none_or(|(known, _)| *known != id)
        {
            self.semantics = Some((id, debezium::semantic_types(schema)));
        }
        let semantics = &self.semantics.as_ref().expect("just set").1;
        finish(debezium::unwrap(&batch, semantics)?)
    }

    /// Applies the source TRUNCATEs (`_op = "t"`) in `batch`: an upsert table drops what was
    /// buffered before the last one and empties the table in the next commit; an append table
    /// keeps its history and skips them, counted.
    pub(super) fn truncates(&mut self, batch: RecordBatch) -> Result<RecordBatch, ReshapeError> {
        let Some(ops) = batch.column_by_name("_op") else {
            return Ok(batch);
        };
        use arrow::array::{Array, AsArray};
        let ops = ops.as_string::<i32>();
        let Some(last) = (0..ops.len())
            .rev()
            .find(|&i| ops.is_valid(i) && ops.value(i) == "t")
        else {
            return Ok(batch);
        };
        if self.ctx.runtime.config.upsert_keys.is_none() {
            let keep: arrow::array::BooleanArray =
                ops.iter().map(|o| Some(o != Some("t"))).collect();
            let n = keep.false_count();
            self.count_skipped("truncate", n);
            info!(sink = self.sink_name(), tp = %self.ctx.tp, truncates = n,
                  "source TRUNCATE skipped: an append table keeps every change it was sent");
            return arrow::compute::filter_record_batch(&batch, &keep)
                .map_err(|e| ReshapeError(e.to_string()));
        }
        let earlier = self.buffered_rows + last;
        info!(sink = self.sink_name(), tp = %self.ctx.tp, dropped = earlier,
              "source TRUNCATE: the next commit empties the table, then applies what follows it");
        self.ctx.budget.release(self.buffered_bytes);
        self.buffered_bytes = 0;
        self.buffered_rows = 0;
        self.buffer.clear();
        self.truncate = true;
        // What follows the truncate; kept even when empty, so the flush has the schema.
        Ok(batch.slice(last + 1, batch.num_rows() - last - 1))
    }
}

pub(super) fn new_decoder(ctx: &WorkerCtx) -> FormatDecoder {
    let batch = ctx
        .runtime
        .config
        .flush
        .max_rows
        .clamp(1, ctx.decode_rows.max(1));
    let mut config = ctx.runtime.config.clone();
    if config.key_format.is_some() {
        // Raw keys ride along as `_kafka_key` until they are decoded into `_key`.
        config.metadata.key = true;
    }
    let config = &config;
    match (&config.format, &config.json_schema) {
        (Format::Json | Format::DebeziumJson, Some(schema)) => {
            FormatDecoder::Json(Box::new(JsonDecoder::new(
                ctx.tp.clone(),
                schema.clone(),
                config.format == Format::DebeziumJson,
                config.connect_envelope,
                config.metadata,
                batch,
            )))
        }
        (Format::Json | Format::DebeziumJson, None) if config.connect_envelope => {
            FormatDecoder::ConnectJson(Box::new(
                crate::decode::connect_json::ConnectJsonDecoder::new(
                    ctx.tp.clone(),
                    config.metadata,
                    batch,
                ),
            ))
        }
        (Format::Json, None) => FormatDecoder::RegistryJson(Box::new(
            crate::decode::json_schema::RegistryJsonDecoder::new(
                ctx.tp.clone(),
                ctx.runtime.registry.clone(),
                config.metadata,
                batch,
            ),
        )),
        (Format::Protobuf, _) => {
            FormatDecoder::Protobuf(Box::new(crate::decode::ProtobufDecoder::new(
                ctx.tp.clone(),
                ctx.runtime.registry.clone(),
                config.metadata,
                batch,
            )))
        }
        _ => FormatDecoder::Avro(Box::new(AvroDecoder::new(
            ctx.tp.clone(),
            ctx.runtime.registry.clone(),
            config.metadata,
            batch,
        ))),
    }
}
