//! Committing: one transaction that checks the ledger (the fence rule), loads the staged file
//! (COPY INTO, or MERGE for upserts), records the new position, and commits.

use tracing::{debug, warn};

use crate::{CommitOutcome, CommitStats, Error, Result, Staged};
use client::Session;
use sql::{ident, literal};

use super::writer::staged_column;
use super::*;

impl DatabendSink {
    /// Fails unless the session's transaction is still open. Lost before the load (`early`),
    /// the transaction is simply redone; lost after it, statements may have run outside any
    /// transaction, so nothing is committed and the error says what to check.
    fn in_transaction(&self, s: &Session, after: &str, early: bool) -> Result<()> {
        if s.txn_state() == "Active" {
            return Ok(());
        }
        Err(Error::Warehouse {
            location: self.location.clone(),
            op: "commit",
            retryable: early,
            reason: if early {
                format!("the transaction is {} after {after}; redone", s.txn_state())
            } else {
                format!(
                    "the transaction is {} after {after}: its statements may have run outside \
                     a transaction (the session lost it). Nothing is committed; check the table \
                     for rows of this range before restarting",
                    s.txn_state()
                )
            },
        })
    }

    pub(super) async fn apply(&self, session: &mut Session, d: &DatabendStaged) -> Result<()> {
        let qualified = format!("{}.{}", self.db(), ident(&d.table));
        if d.truncate && (d.file.is_some() || self.table_exists(session, &d.table).await?) {
            // In the load's transaction: the rows go, the ledger moves, or neither.
            self.run(session, "truncate", &format!("DELETE FROM {qualified}"))
                .await?;
        }
        let Some(file) = &d.file else { return Ok(()) };
        let cols: Vec<String> = d.columns.iter().map(|c| ident(c)).collect();
        // The staged file's columns are c0, c1, ... (see `encode`); tests/security.rs found that
        // a quoted "orderId" cannot be selected from a stage by its own name.
        let mut positional: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} AS {c}", staged_column(i)))
            .collect();
        let unchanged = ident(
            self.config
                .upsert
                .as_ref()
                .and_then(|u| u.unchanged_column.as_deref())
                .unwrap_or("_unchanged"),
        );
        if d.unchanged {
            positional.push(format!("{} AS {unchanged}", staged_column(cols.len())));
        }
        let source = format!("@~/{file}");
        match &self.config.upsert {
            None => {
                self.run(
                    session,
                    "load",
                    &format!(
                        "COPY INTO {qualified} ({}) FROM (SELECT {} FROM {source}) FILE_FORMAT = (TYPE = PARQUET) FORCE = TRUE",
                        cols.join(", "),
                        positional.join(", ")
                    ),
                )
                .await?;
            }
            Some(u) => {
                let on: Vec<String> = d
                    .keys
                    .iter()
                    .map(|k| format!("t.{k} = s.{k}", k = ident(k)))
                    .collect();
                let deleted = u
                    .delete_column
                    .as_ref()
                    .filter(|c| d.columns.contains(c))
                    .map(|c| format!("s.{}", ident(c)));
                // A column the change did not carry keeps the target's value.
                let set: Vec<String> = cols
                    .iter()
                    .zip(&d.columns)
                    .map(|(c, name)| match d.unchanged {
                        true => format!(
                            "{c} = CASE WHEN contains(s.{unchanged}, {}) THEN t.{c} ELSE s.{c} END",
                            literal(name)
                        ),
                        false => format!("{c} = s.{c}"),
                    })
                    .collect();
                let values: Vec<String> = cols.iter().map(|c| format!("s.{c}")).collect();
                let mut stmt = format!(
                    "MERGE INTO {qualified} AS t USING (SELECT {} FROM {source} (FILE_FORMAT => 'parquet')) AS s ON {} ",
                    positional.join(", "),
                    on.join(" AND ")
                );
                if let Some(del) = &deleted {
                    stmt.push_str(&format!("WHEN MATCHED AND {del} THEN DELETE "));
                }
                stmt.push_str(&format!("WHEN MATCHED THEN UPDATE SET {} ", set.join(", ")));
                match &deleted {
                    Some(del) => stmt.push_str(&format!(
                        "WHEN NOT MATCHED AND NOT {del} THEN INSERT ({}) VALUES ({})",
                        cols.join(", "),
                        values.join(", ")
                    )),
                    None => stmt.push_str(&format!(
                        "WHEN NOT MATCHED THEN INSERT ({}) VALUES ({})",
                        cols.join(", "),
                        values.join(", ")
                    )),
                }
                self.run(session, "merge", &stmt).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn commit_staged(
        &self,
        staged: &Staged<DatabendStaged>,
    ) -> Result<(CommitOutcome, CommitStats)> {
        let d = &staged.data;
        let stats = CommitStats {
            files: usize::from(d.file.is_some()),
            rows: staged.rows,
            bytes: d.bytes,
        };
        let tp = &staged.tp;
        let _one_at_a_time = self.commit_lock.lock().await;
        let mut s = Session::default();
        self.run(&mut s, "begin", "BEGIN").await?;
        let outcome = async {
            self.in_transaction(&s, "BEGIN", true)?;
            let current = self.ledger_position(&mut s, tp).await?;
            if let Some(done) = crate::fence::decide(current, staged.start, staged.next) {
                return Ok(Some(done));
            }
            // Before the load: a transaction lost here costs only a retry.
            self.in_transaction(&s, "reading the ledger", true)?;
            self.apply(&mut s, d).await?;
            self.in_transaction(&s, "the load", false)?;
            let ledger = format!("{}.{}", self.db(), ident(LEDGER));
            let stmt = match current {
                Some(_) => format!(
                    "UPDATE {ledger} SET next_offset = {}, updated_at = now() WHERE sink = {} AND topic = {} AND \"partition\" = {} AND next_offset = {}",
                    staged.next.0,
                    literal(&self.config.sink),
                    literal(&tp.topic),
                    tp.partition,
                    staged.start.0
                ),
                None => format!(
                    "INSERT INTO {ledger} (sink, topic, \"partition\", next_offset, updated_at) VALUES ({}, {}, {}, {}, now())",
                    literal(&self.config.sink),
                    literal(&tp.topic),
                    tp.partition,
                    staged.next.0
                ),
            };
            self.run(&mut s, "record the offset", &stmt).await?;
            // The guarded UPDATE must have moved exactly this partition's row to `next`.
            let recorded = self.ledger_position(&mut s, tp).await?;
            if recorded != Some(staged.next) {
                return Err(Error::Warehouse {
                    location: self.location.clone(),
                    op: "record the offset",
                    retryable: true,
                    reason: format!(
                        "{tp}: the ledger reads {recorded:?} after moving it from {} to {}; \
                         rolled back",
                        staged.start.0, staged.next.0
                    ),
                });
            }
            self.in_transaction(&s, "recording the offset", false)?;
            Ok::<_, Error>(None)
        }
        .await;
        match outcome {
            Ok(Some(o)) => {
                let _ = self.client.query(&mut s, "ROLLBACK").await;
                Ok((o, stats))
            }
            Ok(None) => {
                self.run(&mut s, "commit", "COMMIT").await?;
                self.crash.at("after_commit");
                if let Some(file) = &d.file {
                    // Best effort: the file is never loaded again (the ledger moved on).
                    let mut cleanup = Session::default();
                    if let Err(e) = self
                        .client
                        .query(&mut cleanup, &format!("REMOVE @~/{file}"))
                        .await
                    {
                        debug!("cannot remove staged {file}: {e}");
                    }
                }
                Ok((CommitOutcome::Committed { next: staged.next }, stats))
            }
            Err(e) => {
                if let Err(r) = self.client.query(&mut s, "ROLLBACK").await {
                    warn!(sink = %self.config.sink, "rollback after a failed load also failed: {r}");
                }
                Err(e)
            }
        }
    }
}
