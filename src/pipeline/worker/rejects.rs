//! Records that cannot be decoded: the sink's error policy (`errors`), and the dead letters
//! written in one fenced transaction before the table commit that covers them.

use tracing::{info, warn};

use crate::config::ErrorPolicy;
use crate::decode::Rejected;

use super::*;
use crate::pipeline::retry::retry;

impl Worker {
    /// Applies the sink's error policy to a record that cannot be decoded.
    pub(super) async fn reject(&mut self, rejected: Rejected) {
        let Rejected { error, record } = rejected;
        let sink = self.sink_name().to_string();
        let what = match self.ctx.runtime.config.errors {
            ErrorPolicy::Fail => {
                self.fatal(
                    "decode",
                    format!(
                    "sink `{sink}`: {error}. The sink stopped so that nothing is skipped (errors = \
                     \"fail\"); fix the producer or the schema registry, or set errors = \
                     \"dead-letter\" with a dead_letter_topic, and restart"
                ),
                );
                return;
            }
            ErrorPolicy::Skip => {
                warn!(sink = %sink, tp = %self.ctx.tp, offset = error.offset, class = error.class,
                      "skipping a record that cannot be decoded (errors = \"skip\"): {}", error.reason);
                "skip"
            }
            ErrorPolicy::DeadLetter => {
                // Written by the next flush, before the commit that covers it. An owned copy:
                // the payload would otherwise pin the poll thread's arena until then.
                let mut record = record;
                record.key = record.key.map(|k| bytes::Bytes::copy_from_slice(&k));
                record.payload = record.payload.map(|p| bytes::Bytes::copy_from_slice(&p));
                self.dead_pending_bytes += record.payload.as_ref().map_or(0, |p| p.len()) + 256;
                self.dead_pending.push(Rejected { error, record });
                return;
            }
        };
        *self
            .ctx
            .progress
            .rejected
            .lock()
            .expect("progress")
            .entry((sink, error.class, what))
            .or_default() += 1;
    }

    /// Writes the pending dead letters (exactly once unless configured otherwise); retries with
    /// a new session, which re-reads what is already there, and stops the sink when it cannot.
    /// Returns whether the flush may go on to its table commit: not when the sink stopped, nor
    /// when the session was fenced (see [`Self::yield_dead_letters`]).
    pub(super) async fn write_dead_letters(&mut self) -> bool {
        let mut pending = std::mem::take(&mut self.dead_pending);
        self.dead_pending_bytes = 0;
        // Key failures are rejected at once, value failures when the decoder's batch ends: in
        // offset order, the ones already written from an earlier owner are a prefix.
        pending.sort_by_key(|r| r.record.offset);
        let runtime = self.ctx.runtime.clone();
        let dlq = runtime
            .dead_letters
            .as_ref()
            .expect("validation requires a dead_letter_topic");
        let sink = self.sink_name().to_string();
        let mut writer = self
            .dead_writer
            .take()
            .unwrap_or_else(|| dlq.writer(&sink, &self.ctx.tp));
        let mut attempts = Attempts::new(Policy::WORKER);
        let written = loop {
            match writer.write(&pending).await {
                Ok(w) => break w,
                Err(e) if e.fenced => {
                    // The writer is dropped: a new one is made for the next dead letters.
                    self.yield_dead_letters(&e.message).await;
                    return false;
                }
                Err(e) => {
                    if !attempts.left() {
                        let (first, last) = (
                            pending[0].record.offset,
                            pending[pending.len() - 1].record.offset,
                        );
                        self.fatal(
                            "dead-letter",
                            format!(
                                "sink `{sink}` {}: {} records at offsets {first}..={last} cannot \
                                 be decoded, and they cannot be dead-lettered: {e}. Nothing of \
                                 this range was committed; it is read again after a restart",
                                self.ctx.tp,
                                pending.len()
                            ),
                        );
                        return false;
                    }
                    self.stats.retries.inc("dead-letter");
                    warn!(sink = %sink, tp = %self.ctx.tp, attempt = attempts.made(), "{e}; retrying");
                    attempts.wait().await;
                }
            }
        };
        self.dead_writer = Some(writer);
        let (skipped, sent) = pending.split_at(written.already);
        for (r, (_, partition, at)) in sent.iter().zip(&written.deliveries) {
            let e = &r.error;
            warn!(sink = %sink, tp = %self.ctx.tp, offset = e.offset, class = e.class,
                  topic = %dlq.topic(), dead_letter_partition = partition, dead_letter_offset = at,
                  "dead-lettered: {}", e.reason);
        }
        if !skipped.is_empty() {
            info!(sink = %sink, tp = %self.ctx.tp, records = skipped.len(),
                  "already in the dead-letter topic from an earlier owner of the partition; \
                   not written again");
        }
        let mut rejected = self.ctx.progress.rejected.lock().expect("progress");
        for r in sent {
            *rejected
                .entry((sink.clone(), r.error.class, "dead-letter"))
                .or_default() += 1;
        }
        true
    }

    /// The dead-letter session was fenced: another member owns this partition now (this one
    /// was revoked or paused and has not heard yet), or will own it. Opening a new session
    /// would fence that owner in turn, and the two would take turns failing. So this worker
    /// drops what it buffered and reads again from the table's committed position, opening a
    /// session only when it next has dead letters; a revoked worker simply drains empty.
    pub(super) async fn yield_dead_letters(&mut self, reason: &str) {
        let tp = self.ctx.tp.clone();
        let sink = self.ctx.runtime.sink.clone();
        let name = self.sink_name().to_string();
        let recovered = retry(
            Policy::WORKER,
            || sink.recover(&tp),
            |_| true,
            |attempt, e| {
                warn!(sink = %name, %tp, attempt, "cannot read the committed position: {e}; retrying")
            },
        )
        .await;
        let position = match recovered {
            Ok(p) => p,
            Err(e) => {
                self.fatal(
                    "storage",
                    format!(
                        "sink `{name}` {tp}: cannot read the committed position after a \
                         dead-letter fence: {}",
                        e.error
                    ),
                );
                return;
            }
        };
        let position = position.map(|p| p.0).or(self.ctx.position).unwrap_or(0);
        warn!(sink = self.sink_name(), %tp, position,
              "another member took over this partition's dead letters ({reason}); dropping the \
               buffer and re-reading from the table's position");
        self.release();
        self.oldest_ts_ms = None;
        self.due = None;
        self.resync(tp, position);
    }
}
