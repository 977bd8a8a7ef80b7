//! The ledger: one row per (sink, topic, partition) holding the position the last commit of
//! that partition ended at, updated in the same transaction as the load it records.

use crate::{Error, Offset, Result, TopicPartition};
use client::Session;
use sql::{ident, literal};

use super::*;

impl DatabendSink {
    pub(super) async fn ensure_ledger(&self) -> Result<()> {
        self.ledger_ready
            .get_or_try_init(|| async {
                let mut s = Session::default();
                self.run(&mut s, "create database", &format!("CREATE DATABASE IF NOT EXISTS {}", self.db()))
                    .await?;
                self.run(
                    &mut s,
                    "create the offset ledger",
                    &format!(
                        "CREATE TABLE IF NOT EXISTS {}.{} (sink VARCHAR NOT NULL, topic VARCHAR NOT NULL, \
                         \"partition\" INT NOT NULL, next_offset BIGINT NOT NULL, updated_at TIMESTAMP NOT NULL)",
                        self.db(),
                        ident(LEDGER)
                    ),
                )
                .await?;
                self.run(
                    &mut s,
                    "create the topic identity table",
                    &format!(
                        "CREATE TABLE IF NOT EXISTS {}.{} (sink VARCHAR NOT NULL, topic VARCHAR NOT NULL, \
                         topic_id VARCHAR NOT NULL, recorded_at TIMESTAMP NOT NULL)",
                        self.db(),
                        ident(TOPICS)
                    ),
                )
                .await?;
                Ok(())
            })
            .await
            .map(|_| ())
    }

    pub(super) async fn ledger_position(
        &self,
        session: &mut Session,
        tp: &TopicPartition,
    ) -> Result<Option<Offset>> {
        Ok(self.ledger_last_commit(session, tp).await?.map(|c| c.next))
    }

    /// `tp`'s ledger row: its next offset and when it was last moved (`updated_at`).
    pub(super) async fn ledger_last_commit(
        &self,
        session: &mut Session,
        tp: &TopicPartition,
    ) -> Result<Option<crate::LastCommit>> {
        let r = self
            .run(
                session,
                "read the offset ledger",
                &format!(
                    "SELECT next_offset, to_int64(updated_at) FROM {}.{} WHERE sink = {} AND topic = {} AND \"partition\" = {}",
                    self.db(),
                    ident(LEDGER),
                    literal(&self.config.sink),
                    literal(&tp.topic),
                    tp.partition
                ),
            )
            .await?;
        match r.rows.as_slice() {
            [] => Ok(None),
            [row] => {
                let v = row.first().cloned().flatten().unwrap_or_default();
                let next = v.parse::<i64>().map_err(|_| Error::Warehouse {
                    location: self.location.clone(),
                    op: "read the offset ledger",
                    retryable: false,
                    reason: format!("next_offset `{v}` for {tp} is not a number"),
                })?;
                // Microseconds since the epoch (a TIMESTAMP as an integer).
                let at_ms = row
                    .get(1)
                    .cloned()
                    .flatten()
                    .and_then(|us| us.parse::<i64>().ok())
                    .map(|us| us / 1000);
                Ok(Some(crate::LastCommit {
                    next: Offset(next),
                    at_ms,
                }))
            }
            rows => Err(Error::Warehouse {
                location: self.location.clone(),
                op: "read the offset ledger",
                retryable: false,
                reason: format!("{} ledger rows for {tp}; expected one", rows.len()),
            }),
        }
    }
}

impl DatabendSink {
    /// [`crate::Sink::adopt_topic_id`]: the ids recorded for (sink, topic), or the given one
    /// inserted when there is none. Two writers inserting at once both insert the id they see,
    /// which is the same unless the topic was recreated in between; then the next recovery
    /// finds two ids and stops the partition.
    pub(super) async fn adopt_topic(
        &self,
        topic: &str,
        topic_id: &str,
    ) -> Result<crate::TopicIdentity> {
        self.ensure_ledger().await?;
        let mut s = Session::default();
        let filter = format!(
            "sink = {} AND topic = {}",
            literal(&self.config.sink),
            literal(topic)
        );
        let r = self
            .run(
                &mut s,
                "read the topic ids",
                &format!(
                    "SELECT topic_id FROM {}.{} WHERE {filter}",
                    self.db(),
                    ident(TOPICS)
                ),
            )
            .await?;
        let ids: Vec<String> = r
            .rows
            .iter()
            .filter_map(|row| row.first().cloned().flatten())
            .collect();
        if let Some(other) = ids.iter().find(|id| id.as_str() != topic_id) {
            return Ok(crate::TopicIdentity::Other(other.clone()));
        }
        if !ids.is_empty() {
            return Ok(crate::TopicIdentity::Same);
        }
        self.run(
            &mut s,
            "record the topic id",
            &format!(
                "INSERT INTO {}.{} (sink, topic, topic_id, recorded_at) VALUES ({}, {}, {}, NOW())",
                self.db(),
                ident(TOPICS),
                literal(&self.config.sink),
                literal(topic),
                literal(topic_id)
            ),
        )
        .await?;
        Ok(crate::TopicIdentity::Recorded)
    }
}
