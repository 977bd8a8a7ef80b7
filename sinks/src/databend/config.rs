//! How a Databend sink loads: the server, the sink's name, the table template, append or
//! upsert. The service validates its `[[sink]]` section into this.

use super::client::ClientConfig;
use crate::encode::Compression;
use crate::upsert::UpsertConfig;

/// How a Databend sink loads.
#[derive(Debug, Clone)]
pub struct DatabendSinkConfig {
    /// The server, user and database.
    pub client: ClientConfig,
    /// The sink's name: the ledger key, and part of staged file names.
    pub sink: String,
    /// Table name template: `{topic}`, and for Debezium topics `server.db.table`, `{db}` and
    /// `{table}` (the topic's last two dot-separated parts).
    pub table: String,
    /// Upsert by key instead of appending (`None`: append).
    pub upsert: Option<UpsertConfig>,
    /// Compression of the staged Parquet files.
    pub compression: Compression,
}
