//! Registry REST client: basic auth, timeouts, bounded retries with backoff on connect errors
//! and 5xx (never on 4xx), Confluent error codes mapped to typed errors, and a cache by id.
//!
//! Invariant: schema ids are immutable, so a fetched schema is cached for the life of the
//! client, and concurrent misses for one id share a single request (single flight).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::OnceCell;
use tracing::warn;

use crate::references::Reference;
use crate::{Error, RegisteredSchema, Result, SchemaId};

/// How to reach a registry.
#[derive(Clone)]
pub struct RegistryConfig {
    /// The registry's base URL (`https://host:8081`).
    pub url: String,
    /// Basic-auth user (Confluent Cloud: the API key).
    pub username: Option<String>,
    /// Never printed: `Debug` redacts it.
    pub password: Option<String>,
    /// `Authorization: Bearer` token (instead of basic auth). Never printed.
    pub bearer_token: Option<String>,
    /// PEM file with extra CA certificates to trust.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM files with a client certificate and its private key (mutual TLS).
    pub client_cert_file: Option<std::path::PathBuf>,
    /// The private key of `client_cert_file`.
    pub client_key_file: Option<std::path::PathBuf>,
    /// How long one request may take.
    pub timeout: Duration,
    /// Attempts for retryable failures (at least 1).
    pub attempts: u32,
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl RegistryConfig {
    /// The defaults for `url`: no auth, 10 s per request, 3 attempts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            bearer_token: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            timeout: Duration::from_secs(10),
            attempts: 5,
        }
    }
}

type Slot = Arc<OnceCell<Arc<RegisteredSchema>>>;

/// A cached, single-flight registry client. Cheap to clone.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: RegistryConfig,
    base: String,
    http: reqwest::Client,
    cache: Mutex<HashMap<SchemaId, Slot>>,
    fetches: AtomicU64,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("url", &self.inner.base)
            .finish()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

#[derive(Deserialize)]
struct IdBody {
    id: u32,
}

/// A subject version as `GET /subjects/{s}/versions/{v}` returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct SubjectVersion {
    /// The subject.
    pub subject: String,
    /// The version within the subject.
    pub version: u32,
    /// The schema's global id.
    pub id: u32,
    /// The schema text.
    pub schema: String,
    /// The schemas it imports or names.
    #[serde(default)]
    pub references: Vec<Reference>,
}

impl RegistryClient {
    /// A client for `config`; fails only on unreadable TLS files.
    pub fn new(config: RegistryConfig) -> Result<Self> {
        let base = config.url.trim_end_matches('/').to_string();
        let tls = |what: &str, e: String| Error::Tls {
            url: base.clone(),
            reason: format!("{what}: {e}"),
        };
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| tls(&format!("cannot read {}", ca.display()), e.to_string()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| tls(&format!("bad CA file {}", ca.display()), e.to_string()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&config.client_cert_file, &config.client_key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = std::fs::read(cert)
                    .map_err(|e| tls(&format!("cannot read {}", cert.display()), e.to_string()))?;
                pem.extend(
                    std::fs::read(key).map_err(|e| {
                        tls(&format!("cannot read {}", key.display()), e.to_string())
                    })?,
                );
                let id = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| tls("bad client certificate or key", e.to_string()))?;
                builder = builder.identity(id);
            }
            (None, None) => {}
            _ => {
                return Err(tls(
                    "client certificate",
                    "set both the certificate and the key file".into(),
                ))
            }
        }
        let http = builder.build().map_err(|e| Error::Unreachable {
            url: base.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                base,
                http,
                cache: Mutex::new(HashMap::new()),
                fetches: AtomicU64::new(0),
            }),
        })
    }

    /// The registry's base URL.
    pub fn url(&self) -> &str {
        &self.inner.base
    }

    /// How many schema-by-id requests reached the network (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// The schema with `id`, from the cache or (once) from the registry.
    pub async fn schema(&self, id: SchemaId) -> Result<Arc<RegisteredSchema>> {
        let slot = {
            let mut cache = self.inner.cache.lock().expect("registry cache");
            cache.entry(id).or_default().clone()
        };
        slot.get_or_try_init(|| async {
            self.inner.fetches.fetch_add(1, Ordering::Relaxed);
            let body: SchemaBody = self
                .request(
                    reqwest::Method::GET,
                    &format!("/schemas/ids/{}", id.0),
                    None,
                )
                .await
                .map_err(|e| match e {
                    Error::Rejected { code, url, .. } if code == 40403 || code == 404 => {
                        Error::SchemaNotFound { id, url, code }
                    }
                    e => e,
                })?;
            let schema_type = body.schema_type.unwrap_or_else(|| "AVRO".into());
            let mut imports = Vec::new();
            let schema = if body.references.is_empty() {
                body.schema
            } else if schema_type == "PROTOBUF" {
                self.imported_files(&body.references, 0, &mut imports)
                    .await?;
                body.schema
            } else {
                self.inline_references(&body.schema, &body.references, 0)
                    .await?
            };
            Ok(Arc::new(RegisteredSchema {
                id,
                schema_type,
                schema,
                imports,
            }))
        })
        .await
        .cloned()
    }

    /// The subject version reference `r` names, fetched at reference depth `depth` (refused past
    /// 16 levels: a cycle).
    async fn referenced(&self, r: &Reference, depth: usize) -> Result<SubjectVersion> {
        if depth > 16 {
            return Err(Error::BadResponse {
                url: self.inner.base.clone(),
                reason: "schema references nest deeper than 16 levels (a cycle?)".into(),
            });
        }
        self.request(
            reqwest::Method::GET,
            &format!(
                "/subjects/{}/versions/{}",
                encode_segment(&r.subject),
                r.version
            ),
            None,
        )
        .await
    }

    /// Protobuf: fetches the files `references` name (by subject version) and the files they
    /// import in turn, each once, into `out` as (import name, schema).
    fn imported_files<'a>(
        &'a self,
        references: &'a [Reference],
        depth: usize,
        out: &'a mut Vec<(String, String)>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            for r in references {
                if out.iter().any(|(name, _)| *name == r.name) {
                    continue;
                }
                let v = self.referenced(r, depth).await?;
                out.push((r.name.clone(), v.schema));
                self.imported_files(&v.references, depth + 1, out).await?;
            }
            Ok(())
        })
    }

    /// Resolves `references` (recursively, by subject version) and inlines their definitions,
    /// so that the schema is self-contained for a decoder.
    fn inline_references<'a>(
        &'a self,
        schema: &'a str,
        references: &'a [Reference],
        depth: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + Send + 'a>> {
        Box::pin(async move {
            let mut defs = HashMap::new();
            for r in references {
                let v = self.referenced(r, depth).await?;
                let text = if v.references.is_empty() {
                    v.schema
                } else {
                    self.inline_references(&v.schema, &v.references, depth + 1)
                        .await?
                };
                let def: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| Error::BadResponse {
                        url: self.inner.base.clone(),
                        reason: format!("referenced schema `{}` is not JSON: {e}", r.name),
                    })?;
                defs.insert(r.name.clone(), def);
            }
            let main: serde_json::Value =
                serde_json::from_str(schema).map_err(|e| Error::BadResponse {
                    url: self.inner.base.clone(),
                    reason: format!("schema is not JSON: {e}"),
                })?;
            Ok(crate::references::inline(&main, &defs).to_string())
        })
    }

    /// Registers `schema` with references to named types of other subjects.
    pub async fn register_with_references(
        &self,
        subject: &str,
        schema: &str,
        references: &[Reference],
    ) -> Result<SchemaId> {
        let body: IdBody = self
            .request(
                reqwest::Method::POST,
                &format!("/subjects/{}/versions", encode_segment(subject)),
                Some(json!({ "schema": schema, "references": references })),
            )
            .await?;
        Ok(SchemaId(body.id))
    }

    /// Registers a Protobuf `schema` (`.proto` text) that imports the files `references` name.
    pub async fn register_protobuf(
        &self,
        subject: &str,
        schema: &str,
        references: &[Reference],
    ) -> Result<SchemaId> {
        let body: IdBody = self
            .request(
                reqwest::Method::POST,
                &format!("/subjects/{}/versions", encode_segment(subject)),
                Some(json!({
                    "schemaType": "PROTOBUF",
                    "schema": schema,
                    "references": references,
                })),
            )
            .await
            .map_err(|e| match e {
                Error::Rejected {
                    code: 409,
                    message,
                    url,
                    ..
                } => Error::Incompatible {
                    subject: subject.to_string(),
                    url,
                    message,
                },
                e => e,
            })?;
        Ok(SchemaId(body.id))
    }

    /// Registers `schema` (Avro JSON) under `subject`; returns its id (the existing id when the
    /// same schema is already registered).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<SchemaId> {
        let body: IdBody = self
            .request(
                reqwest::Method::POST,
                &format!("/subjects/{}/versions", encode_segment(subject)),
                Some(json!({ "schema": schema })),
            )
            .await
            .map_err(|e| match e {
                Error::Rejected {
                    code: 409,
                    message,
                    url,
                    ..
                } => Error::Incompatible {
                    subject: subject.to_string(),
                    url,
                    message,
                },
                Error::Rejected {
                    code: 42201,
                    message,
                    url,
                    ..
                } => Error::InvalidSchema {
                    subject: subject.to_string(),
                    url,
                    message,
                },
                e => e,
            })?;
        Ok(SchemaId(body.id))
    }

    /// Tests `schema` against `subject`'s latest version under the subject's compatibility
    /// level; returns whether it is compatible and the registry's reasons.
    pub async fn compatible(&self, subject: &str, schema: &str) -> Result<(bool, Vec<String>)> {
        #[derive(Deserialize)]
        struct Body {
            is_compatible: bool,
            #[serde(default)]
            messages: Vec<String>,
        }
        let b: Body = self
            .request(
                reqwest::Method::POST,
                &format!(
                    "/compatibility/subjects/{}/versions/latest?verbose=true",
                    encode_segment(subject)
                ),
                Some(json!({ "schema": schema })),
            )
            .await?;
        Ok((b.is_compatible, b.messages))
    }

    /// The latest version of `subject`.
    pub async fn latest(&self, subject: &str) -> Result<SubjectVersion> {
        self.request(
            reqwest::Method::GET,
            &format!("/subjects/{}/versions/latest", encode_segment(subject)),
            None,
        )
        .await
        .map_err(|e| match e {
            Error::Rejected { code, url, .. } if code == 40401 || code == 404 => {
                Error::SubjectNotFound {
                    subject: subject.to_string(),
                    url,
                    code,
                }
            }
            e => e,
        })
    }

    /// Checks that the registry answers (and that the credentials are accepted).
    pub async fn check(&self) -> Result<()> {
        let _: Vec<String> = self
            .request(reqwest::Method::GET, "/subjects", None)
            .await?;
        Ok(())
    }

    async fn request<T: for<'de> Deserialize<'de>>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T> {
        let attempts = self.inner.config.attempts.max(1);
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.request_once(method.clone(), path, body.as_ref()).await {
                Err(e) if e.is_retryable() && attempt < attempts => {
                    warn!(registry = %self.inner.base, path, attempt, error = %e,
                          "schema registry request failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn request_once<T: for<'de> Deserialize<'de>>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T> {
        let url = format!("{}{}", self.inner.base, path);
        let mut req = self
            .inner
            .http
            .request(method, &url)
            .header("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some(token) = &self.inner.config.bearer_token {
            req = req.bearer_auth(token);
        } else if let Some(user) = &self.inner.config.username {
            req = req.basic_auth(user, self.inner.config.password.as_deref());
        }
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/vnd.schemaregistry.v1+json")
                .body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| Error::Unreachable {
            url: url.clone(),
            reason: without_url(&e),
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| Error::Unreachable {
            url: url.clone(),
            reason: without_url(&e),
        })?;
        if !status.is_success() {
            let parsed: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
            let (code, message) = match parsed {
                Some(b) => (
                    b.error_code.unwrap_or(status.as_u16() as i64),
                    b.message.unwrap_or_default(),
                ),
                None => (
                    status.as_u16() as i64,
                    String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                ),
            };
            return Err(Error::Rejected {
                url,
                status: status.as_u16(),
                code,
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::BadResponse {
            url,
            reason: e.to_string(),
        })
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.without_url_ref().to_string();
    if let Some(src) = std::error::Error::source(e) {
        s.push_str(": ");
        s.push_str(&src.to_string());
    }
    s
}

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

trait WithoutUrlRef {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrlRef for reqwest::Error {
    fn without_url_ref(&self) -> String {
        // reqwest puts the URL (which may carry user info) in its message; rebuild it without.
        let kind = if self.is_timeout() {
            "timed out"
        } else if self.is_connect() {
            "connection failed"
        } else if self.is_request() {
            "request failed"
        } else if self.is_body() || self.is_decode() {
            "bad response body"
        } else {
            "http error"
        };
        kind.to_string()
    }
}
