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
        let r = self
            .run(
                session,
                "read the offset ledger",
                &format!(
                    "SELECT next_offset FROM {}.{} WHERE sink = {} AND topic = {} AND \"partition\" = {}",
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
                v.parse::<i64>()
                    .map(|o| Some(Offset(o)))
                    .map_err(|_| Error::Warehouse {
                        location: self.location.clone(),
                        op: "read the offset ledger",
                        retryable: false,
                        reason: format!("next_offset `{v}` for {tp} is not a number"),
                    })
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
