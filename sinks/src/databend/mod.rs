//! Databend tables loaded over Databend's HTTP API, exactly once through an offset ledger.
//!
//! Protocol (one flush = the rows of one source partition between two positions):
//!
//! ```text
//!  stage  ─► DDL outside any transaction: CREATE TABLE IF NOT EXISTS / ALTER TABLE ADD COLUMN
//!            PUT /v1/upload_to_stage  @~/lakesink/<sink>/<topic>/<p>/<start>-<next>.parquet
//!  commit ─► BEGIN
//!            SELECT next_offset FROM lakesink_offsets WHERE (sink, topic, partition)
//!              ≠ start (someone committed before) ⇒ ROLLBACK, Fenced / AlreadyCommitted
//!            COPY INTO <table> (cols) FROM (SELECT c0 AS col0, ... FROM @~/...) FORCE = TRUE  (append)
//!            MERGE INTO <table> USING (SELECT c0 AS col0, ... FROM @~/...)           (upsert)
//!            UPDATE lakesink_offsets ... WHERE next_offset = start   (or INSERT the first one)
//!            SELECT next_offset ... (must read `next`, in one row)
//!            COMMIT   (txn_state checked to be Active before it)
//! ```
//!
//! Invariants:
//! - Data and the ledger row change in one transaction, so a batch is applied exactly when its
//!   position is recorded. COPY's load history (which expires) is never relied on.
//! - The ledger update is conditional on the expected previous offset; a zombie's late
//!   transaction finds another position and rolls back.
//! - The fence is Databend's conflict detection: two transactions that change one table (the
//!   ledger, which every load changes) conflict at COMMIT (2009 `TableVersionMismatched`, 4001
//!   `UnresolvableConflict`), so of two writers that both read the same position (two first
//!   commits included, where each INSERTs the ledger row) only one commits; the other is redone,
//!   reads the winner's position and is fenced. tests/databend_races.rs runs such transactions
//!   really overlapping.
//! - A transaction that is no longer `Active` (the session lost it: a COMMIT outside a
//!   transaction is silently ignored by Databend) is never committed; the ledger row is read
//!   back inside the transaction before COMMIT and must say `next`, once.
//! - Staged file names are unique per stage call, so a zombie and the owner never load each
//!   other's file; the commit loads exactly the file its own stage wrote.
//! - Every identifier that comes from data or config is quoted; every literal is escaped.
//! - `lakesink_topics` records, per (sink, topic), the Kafka topic id the ledger's positions
//!   count offsets of; it is written before the first load of the topic.

pub mod client;
mod committer;
mod config;
mod ledger;
pub mod sql;
mod table;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;

use tracing::debug;

use crate::crash::{CrashHook, CrashPoints};
use crate::{
    CommitOutcome, CommitStats, Error, Flush, Offset, Result, Sink, Staged, TopicPartition,
};
use client::{Client, ClientError, Session};
use sql::ident;

pub use config::{DatabendSection, DatabendSinkConfig, DatabendTable};

/// The ledger table, in the sink's database.
pub const LEDGER: &str = "lakesink_offsets";
/// The Kafka topic id (KIP-516) each sink's ledger positions count offsets of, per topic.
pub const TOPICS: &str = "lakesink_topics";

/// What stage leaves for commit.
#[derive(Debug, Clone)]
pub struct DatabendStaged {
    /// The table the file is loaded into.
    pub table: String,
    /// Path inside the user stage, `lakesink/<sink>/<topic>/<p>/<start>-<next>.parquet`.
    pub file: Option<String>,
    /// The file's columns, in order, as the load names them.
    pub columns: Vec<String>,
    /// The staged file's size.
    pub bytes: u64,
    /// Empty the table before loading (a source TRUNCATE; upserts only).
    pub truncate: bool,
    /// The file's last column, after `columns`, lists per row the columns that keep the
    /// stored value (see `UpsertConfig::unchanged_column`).
    pub unchanged: bool,
    /// Upserts: the key columns the load merges on (named, or the message key's fields).
    pub keys: Vec<String>,
}

/// Loads flushes into Databend tables, each load and its ledger row in one transaction (see
/// the module doc).
pub struct DatabendSink {
    client: Client,
    config: DatabendSinkConfig,
    location: String,
    /// Columns known per table (name → SQL type), to decide on ALTER TABLE ADD COLUMN.
    known: tokio::sync::Mutex<HashMap<String, Vec<String>>>,
    ledger_ready: tokio::sync::OnceCell<()>,
    /// One load transaction at a time per sink in this process: every one changes the ledger
    /// table, and concurrent transactions on one table conflict at COMMIT, so overlapping them
    /// only buys retries. Transactions of other processes (members) still conflict, and the
    /// loser is redone.
    commit_lock: tokio::sync::Mutex<()>,
    crash: CrashPoints,
}

impl std::fmt::Debug for DatabendSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client config redacts the password; the location names server and database.
        write!(f, "DatabendSink({}, {:?})", self.location, self.config)
    }
}

impl DatabendSink {
    /// A sink for `config` (no request is made until the first call).
    pub fn new(config: DatabendSinkConfig) -> Result<Self> {
        let location = format!(
            "databend {}{} database {}",
            config.client.endpoint.origin().ascii_serialization(),
            config
                .client
                .warehouse
                .as_ref()
                .map(|w| format!(" warehouse {w}"))
                .unwrap_or_default(),
            config.client.database
        );
        let client = Client::new(config.client.clone()).map_err(|e| Error::Warehouse {
            location: location.clone(),
            op: "connect",
            retryable: false,
            reason: e.to_string(),
        })?;
        Ok(Self {
            client,
            config,
            location,
            known: tokio::sync::Mutex::new(HashMap::new()),
            ledger_ready: tokio::sync::OnceCell::new(),
            commit_lock: tokio::sync::Mutex::new(()),
            crash: CrashPoints::default(),
        })
    }

    /// Calls `hook` at every crash point (tests inject crashes with it).
    pub fn with_crash_hook(mut self, hook: CrashHook) -> Self {
        self.crash.set(hook);
        self
    }

    fn err(&self, op: &'static str, e: ClientError) -> Error {
        Error::Warehouse {
            location: self.location.clone(),
            op,
            retryable: e.is_retryable(),
            reason: e.to_string(),
        }
    }

    fn db(&self) -> String {
        ident(&self.config.client.database)
    }

    /// The table a topic's rows go to.
    pub fn table_for(&self, topic: &str) -> String {
        if let Some(t) = self.config.tables.get(topic).and_then(|t| t.table.clone()) {
            return t;
        }
        let parts: Vec<&str> = topic.split('.').collect();
        let n = parts.len();
        let (db, table) = if n >= 2 {
            (parts[n - 2], parts[n - 1])
        } else {
            (topic, topic)
        };
        self.config
            .table
            .replace("{topic}", topic)
            .replace("{db}", db)
            .replace("{table}", table)
    }

    async fn run(
        &self,
        session: &mut Session,
        op: &'static str,
        sql: &str,
    ) -> Result<client::QueryResult> {
        debug!(sink = %self.config.sink, "databend: {sql}");
        self.client
            .query(session, sql)
            .await
            .map_err(|e| self.err(op, e))
    }
}

#[async_trait::async_trait]
impl Sink for DatabendSink {
    type Data = DatabendStaged;

    async fn recover(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        self.committed(tp).await
    }

    async fn committed(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        self.ensure_ledger().await?;
        let mut s = Session::default();
        self.ledger_position(&mut s, tp).await
    }

    async fn last_commit(&self, tp: &TopicPartition) -> Result<Option<crate::LastCommit>> {
        self.ensure_ledger().await?;
        let mut s = Session::default();
        self.ledger_last_commit(&mut s, tp).await
    }

    async fn stage(&self, flush: Flush) -> Result<Staged<DatabendStaged>> {
        self.stage_flush(flush).await
    }

    async fn commit(
        &self,
        staged: &Staged<DatabendStaged>,
    ) -> Result<(CommitOutcome, CommitStats)> {
        self.commit_staged(staged).await
    }

    async fn adopt_topic_id(&self, topic: &str, topic_id: &str) -> Result<crate::TopicIdentity> {
        self.adopt_topic(topic, topic_id).await
    }

    async fn check(&self) -> Result<()> {
        self.ensure_ledger().await?;
        let mut s = Session::default();
        self.run(&mut s, "query", "SELECT 1").await?;
        Ok(())
    }

    fn location(&self) -> &str {
        &self.location
    }

    fn table_of(&self, topic: &str) -> String {
        format!("{}.{}", self.config.client.database, self.table_for(topic))
    }
}
