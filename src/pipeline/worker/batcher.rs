//! The batcher: decoded batches into the partition's buffer (one schema per buffer, accounted
//! in the global budget), packed under memory pressure, and when the buffer must flush (rows, bytes, memory pressure, dead
//! letters waiting, or the end offset seen at start crossed). The latency trigger is the
//! worker loop's timer.

use super::*;

/// Dead letters waiting for a flush are written at most this many (or bytes) at a time.
const DEAD_PENDING_MAX: usize = 2_000;
const DEAD_PENDING_MAX_BYTES: usize = 16 << 20;
/// A buffer is packed under memory pressure only from this size on: smaller packs compress
/// less and cost a stream header each.
const MIN_PACK_BYTES: usize = 256 << 10;

impl Worker {
    /// Whether the record at `offset` (after `previous`) makes the buffer flush now.
    pub(super) fn flush_due(&self, offset: i64, previous: Option<i64>) -> bool {
        let flush = &self.ctx.runtime.config.flush;
        // Crossing the end offset seen at start flushes once; records past it (produced since,
        // or a broker whose watermark lags) follow the normal flush rules, never one file each.
        let caught_up = self
            .ctx
            .end_offset
            .is_some_and(|end| offset + 1 >= end && previous.is_none_or(|last| last + 1 < end));
        self.buffered_rows + self.decoder.pending_rows() >= flush.max_rows
            || self.buffered_bytes as u64 >= flush.max_bytes
            || self.ctx.budget.should_flush(self.buffered_bytes)
            || self.dead_pending.len() >= DEAD_PENDING_MAX
            || self.dead_pending_bytes >= DEAD_PENDING_MAX_BYTES
            || caught_up
    }

    /// Packs the buffer's batches ([`sinks::packed`]) when memory is short and this writer is
    /// one that would flush for it ([`BufferBudget::should_flush`]), if most of what it holds
    /// is unpacked and the partition is near the end of its log: the rows then wait for the
    /// latency tick at a fraction of their memory, and go into the tick's shared files
    /// instead of a file of their own now. A writer whose buffer is mostly packed already, or
    /// whose partition has more records waiting in Kafka than its buffer holds (catching up,
    /// where size flushes come anyway and packing would only cost CPU), flushes as before.
    pub(super) fn pack_if_pressed(&mut self) {
        let unpacked = self.buffered_bytes - self.packed_bytes;
        if !self.ctx.budget.packs()
            || unpacked < MIN_PACK_BYTES
            || unpacked * 2 < self.buffered_bytes
            || !self.ctx.budget.should_flush(self.buffered_bytes)
            || !self.near_log_end()
        {
            return;
        }
        let schema = self.buffer[0].schema();
        match sinks::packed::Packed::pack(&schema, &self.buffer) {
            Ok(packed) => {
                let size = packed.memory_size();
                self.ctx.budget.repack(unpacked, size);
                self.buffered_bytes = self.buffered_bytes - unpacked + size;
                self.packed_bytes += size;
                self.buffer.clear();
                self.packed.push(packed);
                self.stats
                    .packed_bytes
                    .fetch_add(unpacked as u64, std::sync::atomic::Ordering::Relaxed);
                self.stats
                    .packed_size_bytes
                    .fetch_add(size as u64, std::sync::atomic::Ordering::Relaxed);
            }
            // The rows stay as they are, and flush for memory (`flush_due`).
            Err(e) => warn!(sink = self.sink_name(), tp = %self.ctx.tp,
                "cannot pack the buffer under memory pressure, flushing it instead: {e}"),
        }
    }

    /// Whether the records of this partition still in Kafka (the end offset the consumer last
    /// reported, every 5 s) are fewer than the buffer holds. Unknown (no report yet) is not.
    fn near_log_end(&self) -> bool {
        let Some(last) = self.last_offset else {
            return false;
        };
        let highs = self.ctx.progress.high_watermarks.lock().expect("progress");
        highs
            .get(&self.ctx.tp)
            .is_some_and(|high| high - (last + 1) <= self.buffered_rows as i64)
    }

    pub(super) async fn buffer_batch(&mut self, batch: RecordBatch) {
        let batch = match self.transform(batch).await {
            Ok(None) => return,
            Ok(Some(b)) => b,
            Err(e) => {
                self.fatal(
                    "schema",
                    format!(
                        "sink `{}` {}: cannot unwrap Debezium envelopes: {e}",
                        self.sink_name(),
                        self.ctx.tp
                    ),
                );
                return;
            }
        };
        let buffered = match self.packed.first() {
            Some(p) => Some(p.schema().clone()),
            None => self.buffer.first().map(|b| b.schema()),
        };
        if let Some(first) = buffered {
            if first != batch.schema() {
                // `handle` flushes before a record with another schema, so this cannot happen;
                // refuse rather than write a file with mixed schemas.
                self.fatal(
                    "internal",
                    format!(
                        "sink `{}` {}: internal error: a batch with a different schema reached a \
                     non-empty buffer: {:?} vs {:?}",
                        self.sink_name(),
                        self.ctx.tp,
                        first,
                        batch.schema()
                    ),
                );
                return;
            }
        }
        let batch = shrink(batch, self.ctx.decode_rows);
        let size = batch.get_array_memory_size();
        if size == 0 {
            self.buffered_rows += batch.num_rows();
            self.buffer.push(batch);
            return;
        }
        self.buffered_rows += batch.num_rows();
        self.ctx.budget.add(size, self.buffered_bytes == 0);
        self.buffered_bytes += size;
        self.buffer.push(batch);
    }
}

/// Frees the unused capacity of a batch much shorter than the decoder's batches. The
/// decoders allocate for a full batch; one cut short (by a schema version flip, a latency
/// flush or a flush for rows) would otherwise hold, and count in the budget, a full batch's
/// memory: interleaved Avro versions made one batch per record, about 40 KB each, and 400
/// rows counted as 16 MB. Full batches are kept as they are (nothing to free).
pub(super) fn shrink(batch: RecordBatch, decode_rows: usize) -> RecordBatch {
    if batch.num_rows().saturating_mul(4) >= decode_rows {
        return batch;
    }
    let (schema, mut columns, rows) = batch.into_parts();
    for c in &mut columns {
        arrow::array::Array::shrink_to_fit(c);
    }
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
    RecordBatch::try_new_with_options(schema, columns, &options)
        .expect("the same columns, schema and row count")
}
