//! Assignment and revocation: a partition assigned is recovered and gets its workers before it
//! is fetched; a partition revoked is drained (flushed and committed, within the drain
//! timeout) before it is given up, so no two members write it at once from this process's side.

use super::*;

impl ConsumerContext for LakeContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let tps: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        let mut router = self.router.lock().expect("router");
        // Records polled before the rebalance reach their workers before it is handled.
        router.dispatch_pending();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                info!(partitions = ?tps.iter().map(ToString::to_string).collect::<Vec<_>>(), "assigned");
                let held =
                    router.sup.held().len() + tps.iter().filter(|tp| !router.sup.holds(tp)).count();
                router.decode_rows = decode_batch_rows(held);
                let (mut started, mut idle) =
                    (TopicPartitionList::new(), TopicPartitionList::new());
                let mut recovered = router.recover_all(&tps, positions::RECOVERY_DEADLINE);
                for tp in &tps {
                    let had = router.sup.holds(tp);
                    match router.start_partition(consumer, tp, &mut recovered) {
                        Ok(Some(at)) => {
                            let _ = tpl.set_partition_offset(&tp.topic, tp.partition, at);
                            started.add_partition(&tp.topic, tp.partition);
                        }
                        Ok(None) if !had => {
                            idle.add_partition(&tp.topic, tp.partition);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            error!("{e}");
                            router.fatal.get_or_insert(e);
                        }
                    }
                }
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                // A partition no sink can take (quarantined) is not fetched; one quarantined
                // before, and now assigned again, is.
                if r.is_ok() {
                    let _ = consumer.pause(&idle);
                    let _ = consumer.resume(&started);
                }
                router.progress.health.assigned.store(
                    !router.sup.held().is_empty(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                if let Err(e) = r {
                    router
                        .fatal
                        .get_or_insert(Error::kafka("cannot assign partitions", e));
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(partitions = tps.len(), "revoked; draining their writers");
                router.sup.drain(&tps);
                router.forget_backpressure(consumer, &tps);
                router.progress.health.assigned.store(
                    !router.sup.held().is_empty(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                for tp in &tps {
                    router.waiting.remove(tp);
                }
                let mut highs = router.progress.high_watermarks.lock().expect("progress");
                let mut lows = router.progress.low_watermarks.lock().expect("progress");
                let mut stalls = self.stalls.lock().expect("stalls");
                for tp in &tps {
                    router.progress.release_quarantine(tp);
                    highs.remove(tp);
                    lows.remove(tp);
                    if stalls.forget(tp) {
                        router.progress.set_stalled(tp, None);
                    }
                }
                drop(stalls);
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    warn!("unassign failed: {e}");
                }
            }
            other => {
                warn!("rebalance error: {other:?}");
                router.sup.drain(&tps);
                let _ = consumer.unassign();
            }
        }
    }
}
