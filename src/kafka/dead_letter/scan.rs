//! Opening a dead-letter session: the fence (`init_transactions`), then the tail read of the
//! dead-letter partition for the highest source offset this (group, sink, partition) already
//! has there (`read_committed`, up to the log end offset taken after the fence, waiting out open
//! transactions below it).

use super::*;
use crate::error::Error;

/// Fences earlier writers of `tp`, then finds the highest source offset they dead-lettered.
pub(super) fn open_session(
    mut client: ClientConfig,
    auth: KafkaAuth,
    topic: &str,
    group: &str,
    sink: &str,
    tp: &TopicPartition,
    cancelled: &std::sync::atomic::AtomicBool,
) -> Result<DeadLetterSession, Error> {
    let reader: BaseConsumer<AuthContext> = client
        .clone()
        .set("group.id", format!("lakesink-dlq-reader.{group}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create_with_context(AuthContext(auth.clone()))
        .map_err(|e| Error::DeadLetters(format!("cannot create the dead-letter reader: {e}")))?;
    // The end to read to is the log end offset, which only a read_uncommitted client reports
    // (a read_committed one reports the last stable offset).
    let ends: BaseConsumer<AuthContext> = client
        .clone()
        .set("group.id", format!("lakesink-dlq-reader.{group}"))
        .set("isolation.level", "read_uncommitted")
        .create_with_context(AuthContext(auth.clone()))
        .map_err(|e| Error::DeadLetters(format!("cannot create the dead-letter reader: {e}")))?;
    let metadata = reader.fetch_metadata(Some(topic), TIMEOUT).map_err(|e| {
        Error::DeadLetters(format!(
            "cannot read the metadata of the dead-letter topic `{topic}`: {e}"
        ))
    })?;
    let partitions = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len());
    if partitions == 0 {
        return Err(Error::DeadLetters(format!(
            "the dead-letter topic `{topic}` does not exist; create it (any number of partitions)"
        )));
    }
    let partition = dead_letter_partition(sink, tp, partitions);
    tracing::debug!(%tp, topic, partition, "dead-letter session: fencing earlier writers");
    let producer: FutureProducer<AuthContext> = client
        .set("transactional.id", transactional_id(group, sink, tp))
        .set("transaction.timeout.ms", "60000")
        .set("message.timeout.ms", "55000")
        .set("acks", "all")
        .create_with_context(AuthContext(auth))
        .map_err(|e| Error::DeadLetters(format!("cannot create the dead-letter producer: {e}")))?;
    if cancelled.load(std::sync::atomic::Ordering::SeqCst) {
        // Its worker stopped: fencing now could only fence a later owner's session.
        return Err(Error::DeadLetters(format!(
            "the dead-letter session of {tp} was no longer needed"
        )));
    }
    producer.init_transactions(TIMEOUT).map_err(|e| {
        Error::DeadLetters(format!("cannot start dead-letter transactions on `{topic}` (does the broker support transactions? else set dead_letter_exactly_once = false): {e}"))
    })?;
    // Taken after the fence, so everything the fenced writers appended lies below it. Reading
    // only to the last stable offset would be wrong: a transaction open there (a killed
    // member's, until it is fenced or times out) would hide every committed dead letter above
    // it, ours included, and they would be written again.
    let (low, end) = ends
        .fetch_watermarks(topic, partition, TIMEOUT)
        .map_err(|e| {
            Error::DeadLetters(format!(
                "cannot read the end of the dead-letter topic `{topic}` partition {partition}: {e}"
            ))
        })?;
    drop(ends);
    tracing::debug!(%tp, topic, partition, low, end, "dead-letter session: fenced; reading the tail");
    let scan = last_dead_lettered(&reader, topic, partition, (low, end), group, sink, tp)?;
    let last = scan.last;
    tracing::info!(
        sink,
        tp = %tp,
        dead_letter_partition = partition,
        low,
        end,
        read_from = scan.from,
        ours = scan.ours,
        last = ?last,
        "dead-letter session open: earlier writers fenced; the tail [{}, {end}) of partition \
         {partition} holds {} dead letters of this source partition, the last for offset {last:?}",
        scan.from,
        scan.ours
    );
    Ok(DeadLetterSession {
        producer: Arc::new(producer),
        partition,
        last,
    })
}

/// What the tail read of a dead-letter partition found.
struct Scan {
    /// The highest source offset of ours.
    last: Option<i64>,
    /// Where the read started (the last window's start).
    from: i64,
    /// Dead letters of ours seen.
    ours: usize,
}

/// The highest source offset of (group, sink, tp) in the committed part of a dead-letter
/// partition: reads windows backwards from the end, growing 4× each time, and stops at the
/// first window holding one of ours (they are in source-offset order, so its highest is the
/// highest). Records without a `lakesink.group` header (written before it existed) count as
/// every group's.
fn last_dead_lettered(
    reader: &BaseConsumer<AuthContext>,
    topic: &str,
    partition: i32,
    (low, high): (i64, i64),
    group: &str,
    sink: &str,
    tp: &TopicPartition,
) -> Result<Scan, Error> {
    let fail = |e: KafkaError| {
        Error::DeadLetters(format!(
            "cannot read the dead-letter topic `{topic}` partition {partition}: {e}"
        ))
    };
    let (mut end, mut window) = (high, 1024i64);
    let source_partition = tp.partition.to_string();
    while end > low {
        let start = (end - window).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(start))
            .map_err(fail)?;
        reader.assign(&tpl).map_err(fail)?;
        let deadline = std::time::Instant::now() + SCAN_TIMEOUT;
        let mut best: Option<i64> = None;
        let mut ours = 0;
        let mut told = false;
        loop {
            if std::time::Instant::now() > deadline {
                // Longer than any writer's transaction.timeout.ms (60 s): the broker should
                // have aborted it. A transaction its coordinator no longer tracks (a "hanging"
                // transaction, KIP-664) stays open until an operator aborts it.
                let at = reader
                    .position()
                    .ok()
                    .and_then(|l| {
                        l.find_partition(topic, partition)
                            .and_then(|e| e.offset().to_raw())
                    })
                    .unwrap_or(start);
                return Err(Error::DeadLetters(format!(
                    "timed out reading the dead-letter topic `{topic}` partition {partition} \
                     from offset {start} to {end}: a transaction open at offset {at} outlived \
                     the transaction timeout. If it stays, it is a hanging transaction: find it \
                     with `kafka-transactions.sh --bootstrap-server ... find-hanging \
                     --broker-id <leader of {topic}-{partition}>` and end it with \
                     `kafka-transactions.sh --bootstrap-server ... abort --topic {topic} \
                     --partition {partition} --start-offset {at}`; every read_committed \
                     consumer of the partition waits for it"
                )));
            }
            match reader.poll(Duration::from_millis(200)) {
                None => {
                    tracing::trace!(topic, partition, "dead-letter tail read: nothing yet");
                    continue;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    // read_committed ends at the last stable offset: below `end`, a transaction
                    // is still open (a killed writer's, until it is fenced or times out), and
                    // what follows it is not visible yet. Wait for it.
                    let at = reader
                        .position()
                        .ok()
                        .and_then(|l| {
                            l.find_partition(topic, partition)
                                .and_then(|e| e.offset().to_raw())
                        })
                        .unwrap_or(-1);
                    tracing::debug!(
                        topic,
                        partition,
                        at,
                        end,
                        "dead-letter tail read: end of the readable part"
                    );
                    if at >= end {
                        break;
                    }
                    if !told {
                        told = true;
                        tracing::info!(
                            topic,
                            partition,
                            at,
                            end,
                            "waiting for an open transaction in the dead-letter partition to end"
                        );
                    }
                    // Read on from where we are; a fresh fetch reports the end again.
                    std::thread::sleep(Duration::from_millis(500));
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(
                        topic,
                        partition,
                        rdkafka::Offset::Offset(at.max(start)),
                    )
                    .map_err(fail)?;
                    reader.assign(&tpl).map_err(fail)?;
                }
                Some(Err(e)) => return Err(fail(e)),
                Some(Ok(m)) if m.offset() >= end => break,
                Some(Ok(m)) => {
                    if let Some(h) = m.headers() {
                        let get = |k: &str| {
                            h.iter()
                                .find(|x| x.key == k)
                                .and_then(|x| x.value)
                                .and_then(|v| std::str::from_utf8(v).ok())
                        };
                        if get("lakesink.sink") == Some(sink)
                            && get("lakesink.group").is_none_or(|g| g == group)
                            && get("lakesink.source.topic") == Some(&*tp.topic)
                            && get("lakesink.source.partition") == Some(source_partition.as_str())
                        {
                            if let Some(o) =
                                get("lakesink.source.offset").and_then(|v| v.parse::<i64>().ok())
                            {
                                ours += 1;
                                best = Some(best.map_or(o, |b| b.max(o)));
                            }
                        }
                    }
                    if m.offset() + 1 >= end {
                        break;
                    }
                }
            }
        }
        if best.is_some() {
            return Ok(Scan {
                last: best,
                from: start,
                ours,
            });
        }
        end = start;
        window = window.saturating_mul(4);
    }
    Ok(Scan {
        last: None,
        from: low,
        ours: 0,
    })
}
