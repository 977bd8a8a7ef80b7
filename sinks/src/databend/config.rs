//! How a Databend sink loads: [`DatabendSinkConfig`] (the server, the sink's name, the table
//! template, append or upsert), and [`DatabendSection`], the `databend = {..}` section of the
//! service's config as written, checked here into the connection ([`ClientConfig`]).

use super::client::ClientConfig;
use crate::encode::Compression;
use crate::section::SectionError;
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
    /// Topics whose table differs from the template's: another name, other key columns.
    pub tables: std::collections::BTreeMap<String, DatabendTable>,
    /// Compression of the staged Parquet files.
    pub compression: Compression,
}

/// One topic's table where it differs from the sink's template.
#[derive(Debug, Clone, Default)]
pub struct DatabendTable {
    /// The table's name instead of the template's.
    pub table: Option<String>,
    /// Upserts: the key columns instead of the sink's (or the message key's).
    pub keys: Option<Vec<String>>,
}

/// `databend = {..}` as written in the service's config: where a Databend sink loads.
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabendSection {
    /// `http(s)://[user[:password]@]host:port[/database]`.
    pub url: String,
    /// The SQL user, instead of the URL's (default `root`).
    #[serde(default)]
    pub user: Option<String>,
    /// The user's password, instead of the URL's.
    #[serde(default)]
    pub password: Option<String>,
    /// The database, instead of the URL's path (default `default`).
    #[serde(default)]
    pub database: Option<String>,
    /// Databend Cloud warehouse (`X-DATABEND-WAREHOUSE`).
    #[serde(default)]
    pub warehouse: Option<String>,
    /// How long one request may take.
    #[serde(default = "default_timeout")]
    pub timeout: String,
}

fn default_timeout() -> String {
    "60s".into()
}

impl std::fmt::Debug for DatabendSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabendSection")
            .field("url", &crate::store::redact_url(&self.url))
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("warehouse", &self.warehouse)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl DatabendSection {
    /// Checks the section into a connection: credentials out of the URL (the explicit `user`
    /// and `password` win), the database from `database` or the URL's path.
    pub fn validate(&self) -> Result<ClientConfig, SectionError> {
        let mut url = url::Url::parse(&self.url).map_err(|e| {
            SectionError::new(
                "url",
                format!("not a URL ({e}); write e.g. https://user:${{PASSWORD}}@host:8000/db"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SectionError::new(
                "url",
                format!(
                    "scheme `{}` is not supported; use http:// or https://",
                    url.scheme()
                ),
            ));
        }
        let user = self.user.clone().unwrap_or_else(|| {
            if url.username().is_empty() {
                "root".into()
            } else {
                percent_decode(url.username())
            }
        });
        let password = self
            .password
            .clone()
            .or_else(|| url.password().map(percent_decode));
        let path_db = url.path().trim_matches('/').to_string();
        let database = self.database.clone().unwrap_or(if path_db.is_empty() {
            "default".into()
        } else {
            path_db
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_path("/");
        let timeout = crate::units::parse_duration(&self.timeout)
            .map_err(|e| SectionError::new("timeout", e))?;
        Ok(ClientConfig {
            endpoint: url,
            user,
            password,
            database,
            warehouse: self.warehouse.clone(),
            timeout,
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
