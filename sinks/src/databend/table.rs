//! Destination tables: created from the first flush's schema, new columns added as the data
//! brings them (DDL, outside any transaction).

use arrow::datatypes::{Field, Schema};
use tracing::{debug, info};

use crate::{Error, Result};
use client::Session;
use sql::{ident, literal};

use super::*;

impl DatabendSink {
    /// Creates the table or adds the columns it lacks (DDL, outside any transaction).
    pub(super) async fn ensure_table(&self, table: &str, schema: &Schema) -> Result<()> {
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

    pub(super) async fn table_exists(&self, session: &mut Session, table: &str) -> Result<bool> {
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

    pub(super) fn schema_err(&self, table: &str, reason: String) -> Error {
        Error::Warehouse {
            location: self.location.clone(),
            op: "map the schema",
            retryable: false,
            reason: format!("table {table}: {reason}"),
        }
    }
}
