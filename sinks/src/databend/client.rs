//! A client for Databend's HTTP API: `POST /v1/query` with paging (`next_uri`, `final_uri`),
//! session echo (the `session` object carries the transaction state), sticky routing while a
//! transaction is open, and `PUT /v1/upload_to_stage`.
//!
//! Invariants:
//! - A response is an error when its `error` is set, whatever the HTTP status (Databend reports
//!   SQL errors with 200).
//! - The session returned by each response is what the next request sends; a transaction lives
//!   in it, so statements of one transaction must share one [`Session`].
//! - Passwords never appear in errors or `Debug` output.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use url::Url;

/// Why a Databend request failed.
/// Databend's `CurrentTransactionIsAborted`: the whole transaction is gone and can be redone.
pub const TRANSACTION_ABORTED: i64 = 4002;
/// Databend's `TableVersionMismatched`: a transaction lost, at COMMIT, to another that changed a
/// table it changed (concurrent transactions on one table conflict, appends included).
pub const TABLE_VERSION_MISMATCHED: i64 = 2009;
/// Databend's `UnresolvableConflict` (`MultiStmtTxnCommitFailed`): the same, for a transaction
/// over several tables.
pub const UNRESOLVABLE_CONFLICT: i64 = 4001;

/// Why a Databend request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached (connection refused, reset, timed out).
    #[error("cannot reach Databend at {url}: {reason}")]
    Transport {
        /// The server's URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an HTTP error status.
    #[error("Databend at {url} answered HTTP {status}: {body}")]
    Http {
        /// The server's URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The response body, shortened.
        body: String,
    },
    /// The server ran the statement and reported an error.
    #[error("Databend error {code}: {message} (in `{sql}`)")]
    Query {
        /// The error code.
        code: i64,
        /// The server's message.
        message: String,
        /// The statement, shortened.
        sql: String,
    },
    /// The server's answer could not be understood.
    #[error("unexpected response from Databend at {url}: {reason}")]
    Protocol {
        /// The server's URL.
        url: String,
        /// Why.
        reason: String,
    },
}

impl ClientError {
    /// Network problems, 5xx and 429 can succeed later; so can a transaction the server aborted
    /// under us (error 4002, `CurrentTransactionIsAborted`: rolled back while the client was
    /// cut off or paused) or one that lost a conflict at COMMIT (2009, 4001): redone, it reads
    /// the ledger again. Other SQL errors and 4xx cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Http { status, .. } => *status >= 500 || *status == 429,
            ClientError::Query { code, .. } => matches!(
                *code,
                TRANSACTION_ABORTED | TABLE_VERSION_MISMATCHED | UNRESOLVABLE_CONFLICT
            ),
            ClientError::Protocol { .. } => false,
        }
    }
}

/// A column of a result.
#[derive(Debug, Clone, Deserialize)]
pub struct ColumnInfo {
    /// The column's name.
    pub name: String,
    /// The column's Databend type, as the server writes it.
    #[serde(rename = "type")]
    pub data_type: String,
}

/// One page of `/v1/query`.
#[derive(Debug, Clone, Deserialize)]
pub struct QueryResponse {
    /// The query's id on the server.
    pub id: String,
    /// The node that runs the query (Databend Cloud routes follow-up pages to it).
    #[serde(default)]
    pub node_id: Option<String>,
    /// The session state to send with the next statement (transactions live in it).
    #[serde(default)]
    pub session: Option<Value>,
    /// The result's columns.
    #[serde(default)]
    pub schema: Vec<ColumnInfo>,
    /// This page's rows, every value in Databend's text form (`None` is NULL).
    #[serde(default)]
    pub data: Vec<Vec<Option<String>>>,
    /// `Running`, `Succeeded` or `Failed`.
    #[serde(default)]
    pub state: String,
    /// Why the query failed, when it did.
    #[serde(default)]
    pub error: Option<QueryError>,
    /// Where the next page is, while the query runs.
    #[serde(default)]
    pub next_uri: Option<String>,
    /// Where to acknowledge the finished query.
    #[serde(default)]
    pub final_uri: Option<String>,
}

/// An error the server reports for a query.
#[derive(Debug, Clone, Deserialize)]
pub struct QueryError {
    /// Databend's error code (see the constants above).
    pub code: i64,
    /// Databend's message.
    pub message: String,
}

/// Rows of a finished query (every value as Databend's text form; `None` is NULL).
#[derive(Debug, Clone, Default)]
pub struct QueryResult {
    /// The result's columns.
    pub schema: Vec<ColumnInfo>,
    /// Every row, every value in Databend's text form (`None` is NULL).
    pub rows: Vec<Vec<Option<String>>>,
}

/// The server-side session a sequence of statements shares.
#[derive(Debug, Clone, Default)]
pub struct Session {
    state: Option<Value>,
    node: Option<String>,
}

impl Session {
    /// Databend's `txn_state` (`AutoCommit`, `Active`, `Fail`).
    pub fn txn_state(&self) -> &str {
        self.state
            .as_ref()
            .and_then(|s| s.get("txn_state"))
            .and_then(|v| v.as_str())
            .unwrap_or("AutoCommit")
    }

    fn need_sticky(&self) -> bool {
        self.state
            .as_ref()
            .and_then(|s| s.get("need_sticky"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }
}

/// Connection settings.
#[derive(Clone)]
pub struct ClientConfig {
    /// `http(s)://host:port`.
    pub endpoint: Url,
    /// The SQL user.
    pub user: String,
    /// The user's password (never logged: `Debug` redacts it).
    pub password: Option<String>,
    /// `X-DATABEND-WAREHOUSE` for Databend Cloud.
    pub warehouse: Option<String>,
    /// The database statements run in.
    pub database: String,
    /// How long one HTTP request may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint.as_str())
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("warehouse", &self.warehouse)
            .field("database", &self.database)
            .finish()
    }
}

/// A Databend HTTP client (`/v1/query`): statements, pages, sessions and stage uploads.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    config: ClientConfig,
}

/// Parses a response body, turning an `error` in a 200 into [`ClientError::Query`].
pub fn parse_response(body: &[u8], sql: &str, url: &str) -> Result<QueryResponse, ClientError> {
    let resp: QueryResponse = serde_json::from_slice(body).map_err(|e| ClientError::Protocol {
        url: url.to_string(),
        reason: format!(
            "{e}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ),
    })?;
    if let Some(err) = &resp.error {
        return Err(ClientError::Query {
            code: err.code,
            message: err.message.clone(),
            sql: excerpt(sql),
        });
    }
    if resp.state == "Failed" {
        return Err(ClientError::Query {
            code: -1,
            message: "query failed without an error message".into(),
            sql: excerpt(sql),
        });
    }
    Ok(resp)
}

fn excerpt(sql: &str) -> String {
    let one_line: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 160 {
        format!("{}…", one_line.chars().take(160).collect::<String>())
    } else {
        one_line
    }
}

impl Client {
    /// A client for `config` (no request is made).
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| ClientError::Transport {
                url: config.endpoint.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self { http, config })
    }

    /// What the client connects to.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    fn request(
        &self,
        method: reqwest::Method,
        url: Url,
        session: &Session,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, url)
            .basic_auth(&self.config.user, self.config.password.as_ref());
        if let Some(w) = &self.config.warehouse {
            req = req.header("X-DATABEND-WAREHOUSE", w);
        }
        if session.need_sticky() {
            if let Some(node) = &session.node {
                req = req.header("X-DATABEND-STICKY-NODE", node);
            }
        }
        req
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<Bytes, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Transport {
            url: url.to_string(),
            reason: e.without_url().to_string(),
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| ClientError::Transport {
            url: url.to_string(),
            reason: e.without_url().to_string(),
        })?;
        if !status.is_success() {
            // A 4xx can still be a structured query error.
            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                if let Some(msg) = v.pointer("/error/message").and_then(|m| m.as_str()) {
                    return Err(ClientError::Http {
                        url: url.to_string(),
                        status: status.as_u16(),
                        body: msg.to_string(),
                    });
                }
            }
            return Err(ClientError::Http {
                url: url.to_string(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            });
        }
        Ok(body)
    }

    /// Runs one statement in `session` and returns all its rows.
    pub async fn query(
        &self,
        session: &mut Session,
        sql: &str,
    ) -> Result<QueryResult, ClientError> {
        let url = self.config.endpoint.join("/v1/query").expect("valid path");
        let mut body = json!({
            "sql": sql,
            "pagination": {"wait_time_secs": 5, "max_rows_per_page": 10000},
        });
        match &session.state {
            Some(s) => body["session"] = s.clone(),
            None => body["session"] = json!({"database": self.config.database}),
        }
        let bytes = self
            .send(
                self.request(reqwest::Method::POST, url.clone(), session)
                    .json(&body),
                url.as_str(),
            )
            .await?;
        let mut result = QueryResult::default();
        let mut page = self.absorb(session, &bytes, sql, url.as_str());
        loop {
            let resp = match page {
                Ok(r) => r,
                Err(e) => return Err(e),
            };
            if result.schema.is_empty() {
                result.schema = resp.schema.clone();
            }
            result.rows.extend(resp.data);
            match resp.next_uri {
                Some(next) => {
                    let next_url =
                        self.config
                            .endpoint
                            .join(&next)
                            .map_err(|e| ClientError::Protocol {
                                url: url.to_string(),
                                reason: format!("bad next_uri `{next}`: {e}"),
                            })?;
                    let bytes = self
                        .send(
                            self.request(reqwest::Method::GET, next_url.clone(), session),
                            next_url.as_str(),
                        )
                        .await?;
                    page = self.absorb(session, &bytes, sql, next_url.as_str());
                }
                None => {
                    if let Some(fin) = resp.final_uri {
                        if let Ok(fin_url) = self.config.endpoint.join(&fin) {
                            // Releases the query's resources; its outcome is already known.
                            let _ = self
                                .send(
                                    self.request(reqwest::Method::GET, fin_url.clone(), session),
                                    fin_url.as_str(),
                                )
                                .await;
                        }
                    }
                    return Ok(result);
                }
            }
        }
    }

    fn absorb(
        &self,
        session: &mut Session,
        bytes: &[u8],
        sql: &str,
        url: &str,
    ) -> Result<QueryResponse, ClientError> {
        // The session must be taken even from a failed page: it carries txn_state = Fail.
        if let Ok(raw) = serde_json::from_slice::<Value>(bytes) {
            if let Some(s) = raw.get("session").filter(|s| s.is_object()) {
                session.state = Some(s.clone());
            }
            if let Some(n) = raw.get("node_id").and_then(|n| n.as_str()) {
                session.node = Some(n.to_string());
            }
        }
        parse_response(bytes, sql, url)
    }

    /// Uploads `data` as `<dir>/<name>` into the user stage (`@~`).
    pub async fn upload(&self, dir: &str, name: &str, data: Bytes) -> Result<(), ClientError> {
        let url = self
            .config
            .endpoint
            .join("/v1/upload_to_stage")
            .expect("valid path");
        let part =
            reqwest::multipart::Part::stream(reqwest::Body::from(data)).file_name(name.to_string());
        let form = reqwest::multipart::Form::new().part("upload", part);
        let req = self
            .request(reqwest::Method::PUT, url.clone(), &Session::default())
            .header("x-databend-stage-name", "~")
            .header("x-databend-relative-path", dir)
            .multipart(form);
        let body = self.send(req, url.as_str()).await?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        match v.get("state").and_then(|s| s.as_str()) {
            Some("SUCCESS") => Ok(()),
            _ => Err(ClientError::Protocol {
                url: url.to_string(),
                reason: format!("upload not acknowledged: {v}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The response fixtures, compiled in (a moved checkout cannot point at stale paths).
    fn fixture(name: &str) -> &'static [u8] {
        match name {
            "query_ok.json" => include_bytes!("../../../tests/data/databend/query_ok.json"),
            "query_error.json" => include_bytes!("../../../tests/data/databend/query_error.json"),
            "query_txn_active.json" => {
                include_bytes!("../../../tests/data/databend/query_txn_active.json")
            }
            other => panic!("no fixture {other}"),
        }
    }

    #[test]
    fn parses_documented_responses() {
        let ok = parse_response(fixture("query_ok.json"), "SELECT", "u").unwrap();
        assert_eq!(ok.schema.len(), 2);
        assert_eq!(ok.data[0][0].as_deref(), Some("1"));
        assert_eq!(ok.data[1][1], None, "NULL is JSON null");
        assert!(ok.next_uri.is_some());
        assert_eq!(
            ok.session.as_ref().unwrap()["txn_state"].as_str(),
            Some("AutoCommit")
        );
        let e = parse_response(fixture("query_error.json"), "SELECT * FROM nope", "u").unwrap_err();
        match e {
            ClientError::Query { code, message, sql } => {
                assert_eq!(code, 1025);
                assert!(message.contains("Unknown table"));
                assert_eq!(sql, "SELECT * FROM nope");
            }
            other => panic!("{other:?}"),
        }
        assert!(!ClientError::Query {
            code: 1,
            message: String::new(),
            sql: String::new()
        }
        .is_retryable());
        assert!(
            ClientError::Query {
                code: TRANSACTION_ABORTED,
                message: "current transaction is aborted".into(),
                sql: "UPDATE ...".into()
            }
            .is_retryable(),
            "an aborted transaction is redone"
        );
        let txn = parse_response(fixture("query_txn_active.json"), "BEGIN", "u").unwrap();
        let s = Session {
            state: txn.session.clone(),
            node: txn.node_id.clone(),
        };
        assert_eq!(s.txn_state(), "Active");
        assert!(s.need_sticky());
    }

    #[test]
    fn debug_output_hides_the_password() {
        let c = ClientConfig {
            endpoint: Url::parse("http://h:8000").unwrap(),
            user: "u".into(),
            password: Some("hunter2".into()),
            warehouse: None,
            database: "db".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
