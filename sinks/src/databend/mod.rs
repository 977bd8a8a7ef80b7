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
//!            COMMIT
//! ```
//!
//! Invariants:
//! - Data and the ledger row change in one transaction, so a batch is applied exactly when its
//!   position is recorded. COPY's load history (which expires) is never relied on.
//! - The ledger update is conditional on the expected previous offset; a zombie's late
//!   transaction finds another position and rolls back.
//! - Staged file names are a function of (sink, topic, partition, start, next): a retried
//!   upload overwrites the same file.
//! - Every identifier that comes from data or config is quoted; every literal is escaped.

pub mod client;
pub mod sql;

use std::collections::HashMap;

use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use tracing::{debug, info, warn};

use crate::crash::CrashHook;
use crate::encode::Compression;
use crate::upsert::{Changes, UpsertConfig};
use crate::{
    CommitOutcome, CommitStats, Error, Flush, Offset, Result, Sink, Staged, TopicPartition,
};
use client::{Client, ClientConfig, ClientError, Session};
use sql::{ident, literal};

/// The ledger table, in the sink's database.
pub const LEDGER: &str = "lakesink_offsets";

/// How a Databend sink loads.
#[derive(Debug, Clone)]
pub struct DatabendSinkConfig {
    pub client: ClientConfig,
    /// The sink's name: the ledger key, and part of staged file names.
    pub sink: String,
    /// Table name template: `{topic}`, and for Debezium topics `server.db.table`, `{db}` and
    /// `{table}` (the topic's last two dot-separated parts).
    pub table: String,
    pub upsert: Option<UpsertConfig>,
    pub compression: Compression,
}

/// What stage leaves for commit.
#[derive(Debug, Clone)]
pub struct DatabendStaged {
    pub table: String,
    /// Path inside the user stage, `lakesink/<sink>/<topic>/<p>/<start>-<next>.parquet`.
    pub file: Option<String>,
    pub columns: Vec<String>,
    pub bytes: u64,
    /// Empty the table before loading (a source TRUNCATE; upserts only).
    pub truncate: bool,
    /// The file's last column, after `columns`, lists per row the columns that keep the
    /// stored value (see `UpsertConfig::unchanged_column`).
    pub unchanged: bool,
}

pub struct DatabendSink {
    client: Client,
    config: DatabendSinkConfig,
    location: String,
    /// Columns known per table (name → SQL type), to decide on ALTER TABLE ADD COLUMN.
    known: tokio::sync::Mutex<HashMap<String, Vec<String>>>,
    ledger_ready: tokio::sync::OnceCell<()>,
    crash_hook: Option<CrashHook>,
}

impl std::fmt::Debug for DatabendSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabendSink")
            .field("location", &self.location)
            .field("config", &self.config)
            .finish()
    }
}

impl DatabendSink {
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
            crash_hook: None,
        })
    }

    pub fn with_crash_hook(mut self, hook: CrashHook) -> Self {
        self.crash_hook = Some(hook);
        self
    }

    fn point(&self, name: &'static str) {
        if let Some(h) = &self.crash_hook {
            h(name);
        }
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

    async fn ensure_ledger(&self) -> Result<()> {
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

    async fn ledger_position(
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

    /// Creates the table or adds the columns it lacks (DDL, outside any transaction).
    async fn ensure_table(&self, table: &str, schema: &Schema) -> Result<()> {
        let mut known = self.known.lock().await;
        let mut s = Session::default();
        let qualified = format!("{}.{}", self.db(), ident(table));
        if !known.contains_key(table) {
            let cols: Vec<String> = schema
                .fields()
                .iter()
                .map(|f| sql::column_def(f))
                .collect::<std::result::Result<_, _>>()
                .map_err(|reason| self.schema_err(table, reason))?;
            self.run(
                &mut s,
                "create table",
                &format!(
                    "CREATE TABLE IF NOT EXISTS {qualified} ({})",
                    cols.join(", ")
                ),
            )
            .await?;
            let existing = self
                .run(
                    &mut s,
                    "read table columns",
                    &format!(
                        "SELECT name FROM system.columns WHERE database = {} AND table = {}",
                        literal(&self.config.client.database),
                        literal(table)
                    ),
                )
                .await?;
            known.insert(
                table.to_string(),
                existing
                    .rows
                    .into_iter()
                    .filter_map(|r| r.into_iter().next().flatten())
                    .collect(),
            );
        }
        let columns = known.get_mut(table).expect("inserted");
        for f in schema.fields() {
            if columns.iter().any(|c| c == f.name()) {
                continue;
            }
            let nullable = Field::new(f.name(), f.data_type().clone(), true);
            let def =
                sql::column_def(&nullable).map_err(|reason| self.schema_err(table, reason))?;
            info!(sink = %self.config.sink, table, "adding column {def}");
            if let Err(e) = self
                .run(
                    &mut s,
                    "add column",
                    &format!("ALTER TABLE {qualified} ADD COLUMN {def}"),
                )
                .await
            {
                // Another writer (a partition of this sink in another member) may have added
                // it first: then the column is there and this is not an error.
                let added = self
                    .run(
                        &mut s,
                        "read table columns",
                        &format!(
                            "SELECT name FROM system.columns WHERE database = {} AND table = {} AND name = {}",
                            literal(&self.config.client.database),
                            literal(table),
                            literal(f.name())
                        ),
                    )
                    .await?;
                if added.rows.is_empty() {
                    return Err(e);
                }
                debug!(sink = %self.config.sink, table, "column {} was added by another writer", f.name());
            }
            columns.push(f.name().clone());
        }
        Ok(())
    }

    async fn table_exists(&self, session: &mut Session, table: &str) -> Result<bool> {
        let found = self
            .run(
                session,
                "find the table",
                &format!(
                    "SELECT name FROM system.tables WHERE database = {} AND name = {}",
                    literal(&self.config.client.database),
                    literal(table)
                ),
            )
            .await?;
        Ok(!found.rows.is_empty())
    }

    fn schema_err(&self, table: &str, reason: String) -> Error {
        Error::Warehouse {
            location: self.location.clone(),
            op: "map the schema",
            retryable: false,
            reason: format!("table {table}: {reason}"),
        }
    }

    fn staged_path(&self, tp: &TopicPartition, start: Offset, next: Offset) -> (String, String) {
        let safe = |s: &str| crate::partition::escape(s).replace('%', "_");
        (
            format!(
                "lakesink/{}/{}/{}",
                safe(&self.config.sink),
                safe(&tp.topic),
                tp.partition
            ),
            format!("{:020}-{:020}.parquet", start.0, next.0),
        )
    }

    async fn apply(&self, session: &mut Session, d: &DatabendStaged) -> Result<()> {
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
                let on: Vec<String> = u
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
}

/// The name of the `i`-th column in a staged file.
fn staged_column(i: usize) -> String {
    format!("c{i}")
}

/// Encodes batches into one Parquet file.
///
/// The file's top-level columns are named `c0`, `c1`, ... in `schema`'s order: the load selects
/// them by those names and renames them to the table's columns. A stage query resolves Parquet
/// names case-insensitively (a quoted `"orderId"` is not found) and `$N` counts nested leaves,
/// so neither the real names nor positions are reliable there.
fn encode(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    compression: Compression,
) -> std::result::Result<Bytes, String> {
    let props = crate::encode::writer_properties(compression, 1 << 20);
    let file_schema: SchemaRef = std::sync::Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| f.as_ref().clone().with_name(staged_column(i)))
            .collect::<Vec<_>>(),
    ));
    let mut w = ArrowWriter::try_new(Vec::new(), file_schema.clone(), Some(props))
        .map_err(|e| e.to_string())?;
    for b in batches {
        let b = RecordBatch::try_new(file_schema.clone(), b.columns().to_vec())
            .map_err(|e| e.to_string())?;
        w.write(&b).map_err(|e| e.to_string())?;
    }
    Ok(Bytes::from(w.into_inner().map_err(|e| e.to_string())?))
}

#[async_trait::async_trait]
impl Sink for DatabendSink {
    async fn recover(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        self.committed(tp).await
    }

    async fn committed(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        self.ensure_ledger().await?;
        let mut s = Session::default();
        self.ledger_position(&mut s, tp).await
    }

    async fn stage(&self, flush: Flush) -> Result<Staged> {
        self.ensure_ledger().await?;
        let rows = flush.rows() as u64;
        let table = self.table_for(&flush.tp.topic);
        let mut staged = Staged {
            tp: flush.tp.clone(),
            start: flush.start,
            next: flush.next,
            rows,
            files: Vec::new(),
            delta: None,
            databend: Some(DatabendStaged {
                table: table.clone(),
                file: None,
                columns: Vec::new(),
                bytes: 0,
                truncate: flush.truncate && self.config.upsert.is_some(),
                unchanged: false,
            }),
            columns: Vec::new(),
        };
        // A truncate with no rows after it still loads an empty file (it creates the table).
        if flush.batches.is_empty() || (rows == 0 && !flush.truncate) {
            return Ok(staged);
        }
        // One schema for the flush: the union of its batches, in Databend-storable types.
        let mut target: Option<SchemaRef> = None;
        for b in &flush.batches {
            let s = sql::storable_schema(&b.schema());
            target = Some(match target {
                None => s,
                Some(t) => crate::schema::merge(&t, &s).map_err(|r| self.schema_err(&table, r))?,
            });
        }
        let mut target = target.expect("non-empty");
        // The unchanged-values list is loaded as the file's last column, never into the table.
        let unchanged = self
            .config
            .upsert
            .as_ref()
            .and_then(|u| u.unchanged_column.as_ref())
            .and_then(|c| target.index_of(c).ok());
        if let Some(i) = unchanged {
            let mut fields: Vec<_> = target.fields().iter().cloned().collect();
            let list = fields.remove(i);
            fields.push(list);
            target = std::sync::Arc::new(Schema::new(fields));
        }
        let table_fields = target.fields().len() - usize::from(unchanged.is_some());
        let table_schema = Schema::new(target.fields()[..table_fields].to_vec());
        let mut batches = flush
            .batches
            .iter()
            .map(|b| {
                crate::schema::conform_batch(b, &target).map_err(|r| self.schema_err(&table, r))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(u) = &self.config.upsert {
            let changes = Changes::build(u, &target, batches, &flush.tp)?;
            let mut rows = changes.rows;
            if unchanged.is_some() {
                rows = sql::required_last_list(&rows).map_err(|r| self.schema_err(&table, r))?;
                target = rows.schema();
            }
            batches = vec![rows];
        }
        let truncate = flush.truncate && self.config.upsert.is_some();
        self.ensure_table(&table, &table_schema).await?;
        let data = {
            let target = target.clone();
            let compression = self.config.compression;
            crate::encode_blocking(move || encode(&batches, &target, compression))
                .await
                .map_err(|e| Error::Join(e.to_string()))?
                .map_err(|e| Error::Encode {
                    tp: flush.tp.clone(),
                    start: flush.start,
                    next: flush.next,
                    source: e.into(),
                })?
        };
        let (dir, name) = self.staged_path(&flush.tp, flush.start, flush.next);
        let bytes = data.len() as u64;
        self.client
            .upload(&dir, &name, data)
            .await
            .map_err(|e| self.err("upload to stage", e))?;
        let columns: Vec<String> = table_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        staged.columns = target
            .fields()
            .iter()
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect();
        staged.databend = Some(DatabendStaged {
            table,
            file: Some(format!("{dir}/{name}")),
            columns,
            bytes,
            truncate,
            unchanged: unchanged.is_some(),
        });
        self.point("after_stage");
        Ok(staged)
    }

    async fn commit(&self, staged: &Staged) -> Result<(CommitOutcome, CommitStats)> {
        let d = staged.databend.as_ref().ok_or_else(|| {
            Error::Join("a Databend sink was handed a flush staged by another sink kind".into())
        })?;
        let stats = CommitStats {
            files: usize::from(d.file.is_some()),
            rows: staged.rows,
            bytes: d.bytes,
        };
        let tp = &staged.tp;
        let mut s = Session::default();
        self.run(&mut s, "begin", "BEGIN").await?;
        let outcome = async {
            let current = self.ledger_position(&mut s, tp).await?;
            if let Some(done) = crate::fence::decide(current, staged.start, staged.next) {
                return Ok(Some(done));
            }
            self.apply(&mut s, d).await?;
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
                self.point("after_commit");
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

    async fn check(&self) -> Result<()> {
        self.ensure_ledger().await?;
        let mut s = Session::default();
        self.run(&mut s, "query", "SELECT 1").await?;
        Ok(())
    }

    fn location(&self) -> &str {
        &self.location
    }
}
