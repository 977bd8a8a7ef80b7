//! Configuration: one TOML file, read in two phases.
//!
//! 1. [`Config::from_toml`] interpolates `${ENV_VAR}` inside string values (`$${` is a literal
//!    `${`), then deserializes with every table rejecting unknown keys; errors name the full key
//!    path (`sink[0].flush.max_rowz`).
//! 2. [`Config::validate`] checks values and cross-field rules and returns a
//!    [`ValidatedConfig`], the only form that builds components.
//!
//! Invariants: secrets (passwords, keys, tokens) are [`Secret`]s or live in option tables whose
//! secret-looking keys are redacted by [`ValidatedConfig::redacted`]; safety settings of the
//! consumer (`enable.auto.commit`, `enable.auto.offset.store`) cannot be set by the user.

mod secret;
mod units;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

pub use secret::{is_secret_key, Secret};
pub use units::{parse_bytes, parse_duration};

use sinks::encode::Compression;
use sinks::partition::PartitionSpec;

/// A configuration problem, naming the key and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config key `{key}`: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1: the file as written.

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub schema_registry: Option<SchemaRegistryConfig>,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub http: Option<HttpConfig>,
    #[serde(rename = "sink", default)]
    pub sinks: Vec<SinkConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub group_id: String,
    #[serde(default)]
    pub security: Option<SecurityConfig>,
    /// Passed to librdkafka unchanged.
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyValue>,
}

/// A librdkafka property value: TOML strings, numbers and booleans are all accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertyValue::Str(s) => f.write_str(s),
            PropertyValue::Int(i) => write!(f, "{i}"),
            PropertyValue::Float(x) => write!(f, "{x}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER`.
    #[serde(default)]
    pub mechanism: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// AWS region of the MSK cluster (`mechanism = "AWS_MSK_IAM"`).
    #[serde(default)]
    pub region: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    pub url: String,
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// `Authorization: Bearer` token, instead of basic auth.
    #[serde(default)]
    pub bearer_token: Option<Secret>,
    /// PEM file of extra CA certificates to trust.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<std::path::PathBuf>,
    #[serde(default = "default_registry_timeout")]
    pub timeout: String,
}

fn default_registry_timeout() -> String {
    "10s".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: Secret,
}

/// The HTTP listener for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `ADDR:PORT`, e.g. `0.0.0.0:9090`.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Bytes of decoded data across all tables (buffered, being staged, or a Delta upsert's
    /// changes waiting for their commit) before the largest writers flush.
    #[serde(default = "default_memory")]
    pub max_buffer_bytes: String,
    /// How long shutdown and partition revocation may take to flush and commit.
    #[serde(default = "default_drain")]
    pub drain_timeout: String,
    /// Records queued per partition between the consumer and its writer.
    #[serde(default = "default_queue")]
    pub queue_records: usize,
    /// An assigned partition with records beyond its fetch position that fetches none for this
    /// long is reported stalled (readiness, metrics, an error log).
    #[serde(default = "default_stall")]
    pub stall_timeout: String,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_buffer_bytes: default_memory(),
            drain_timeout: default_drain(),
            queue_records: default_queue(),
            stall_timeout: default_stall(),
        }
    }
}

fn default_stall() -> String {
    "60s".into()
}

fn default_memory() -> String {
    "64MiB".into()
}
fn default_drain() -> String {
    "30s".into()
}
fn default_queue() -> usize {
    1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub name: String,
    #[serde(default)]
    pub topics: Option<Vec<String>>,
    #[serde(default)]
    pub topics_regex: Option<String>,
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    pub table: String,
    /// object_store options (endpoint, region, credentials, allow_http, ...).
    #[serde(default)]
    pub storage: BTreeMap<String, Secret>,
    #[serde(default)]
    pub partition_by: Vec<String>,
    #[serde(default)]
    pub flush: FlushConfig,
    #[serde(default = "default_compression")]
    pub compression: String,
    #[serde(default)]
    pub metadata: MetadataConfig,
    #[serde(default = "default_mode")]
    pub mode: String,
    /// What to do with a record that cannot be decoded: `fail`, `skip` or `dead-letter`.
    #[serde(default)]
    pub errors: Option<String>,
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Dead letters in Kafka transactions, fenced per source partition (default), or at least
    /// once for brokers without transactions.
    #[serde(default = "yes")]
    pub dead_letter_exactly_once: bool,
    /// `format = "json"` / `"debezium-json"`: the table's columns, `name = "type"`, in order.
    #[serde(default)]
    pub schema: Option<toml::Table>,
    /// JSON records wrapped in Kafka Connect's `{"schema": ..., "payload": ...}` (`"connect"`).
    #[serde(default)]
    pub json_envelope: Option<String>,
    /// Decode record keys into `_key`: `string`, `json` (with `key_schema`) or `avro`.
    #[serde(default)]
    pub key_format: Option<String>,
    /// `key_format = "json"`: the key's fields, `name = "type"`.
    #[serde(default)]
    pub key_schema: Option<toml::Table>,
    /// `mode = "upsert"`: the columns that identify a row.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// `kind = "delta"` settings.
    #[serde(default)]
    pub delta: DeltaConfig,
    /// `kind = "databend"` connection.
    #[serde(default)]
    pub databend: Option<DatabendConfig>,
}

/// `[sink.databend]`: where a Databend sink loads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabendConfig {
    /// `http(s)://[user[:password]@]host:port[/database]`.
    pub url: Secret,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub database: Option<String>,
    /// Databend Cloud warehouse (`X-DATABEND-WAREHOUSE`).
    #[serde(default)]
    pub warehouse: Option<String>,
    #[serde(default = "default_databend_timeout")]
    pub timeout: String,
}

fn default_databend_timeout() -> String {
    "60s".into()
}

/// `[sink.delta]`: Delta table settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaConfig {
    /// Write a checkpoint every N commits (`delta.checkpointInterval` of created tables).
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
    /// Table properties for tables lakesink creates (e.g. `"delta.logRetentionDuration"`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Commit attempts before a commit that keeps losing races is retried by the pipeline.
    #[serde(default = "default_commit_attempts")]
    pub commit_attempts: u32,
    /// `lakesink maintain`: files older than this, no longer referenced, are vacuumed.
    #[serde(default = "default_vacuum_retention")]
    pub vacuum_retention: String,
    /// `lakesink maintain`: compact files smaller than this into files of about this size.
    #[serde(default = "default_target_file_size")]
    pub target_file_size: String,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: default_checkpoint_interval(),
            properties: BTreeMap::new(),
            commit_attempts: default_commit_attempts(),
            vacuum_retention: default_vacuum_retention(),
            target_file_size: default_target_file_size(),
        }
    }
}

fn default_checkpoint_interval() -> u64 {
    10
}
fn default_commit_attempts() -> u32 {
    20
}
/// The shortest `delta.vacuum_retention`: longer than any flush's stage-to-commit time, with
/// room for clock skew between the maintaining host and the store.
pub const MIN_VACUUM_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

fn default_vacuum_retention() -> String {
    "168h".into()
}
fn default_target_file_size() -> String {
    "128MiB".into()
}

fn default_format() -> String {
    "avro".into()
}
fn default_kind() -> String {
    "parquet".into()
}
fn default_compression() -> String {
    "snappy".into()
}
fn default_mode() -> String {
    "append".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushConfig {
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: String,
    #[serde(default = "default_max_latency")]
    pub max_latency: String,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            max_rows: default_max_rows(),
            max_bytes: default_max_bytes(),
            max_latency: default_max_latency(),
        }
    }
}

fn default_max_rows() -> usize {
    1_000_000
}
fn default_max_bytes() -> String {
    "128MiB".into()
}
fn default_max_latency() -> String {
    "60s".into()
}

/// Which Kafka metadata columns every row carries.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetadataConfig {
    #[serde(default = "yes")]
    pub topic: bool,
    #[serde(default = "yes")]
    pub partition: bool,
    #[serde(default = "yes")]
    pub offset: bool,
    #[serde(default = "yes")]
    pub timestamp: bool,
    #[serde(default)]
    pub key: bool,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        Self {
            topic: true,
            partition: true,
            offset: true,
            timestamp: true,
            key: false,
        }
    }
}

fn yes() -> bool {
    true
}

impl Config {
    /// Reads a config file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(
                path.display().to_string(),
                format!("cannot read the file: {e}"),
            )
        })?;
        Self::from_toml(&text)
    }

    /// Parses config text, interpolating `${ENV_VAR}` from the process environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_toml_with_env(text, |k| std::env::var(k).ok())
    }

    pub fn from_toml_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| {
            let span = e
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "file".into());
            err(span, e.message().to_string())
        })?;
        interpolate(&mut value, &mut String::new(), &env)?;
        serde_path_to_error::deserialize(value).map_err(|e| {
            let mut key = e.path().to_string();
            let msg = e.inner().to_string();
            // toml appends "in `table`" on a new line; the key path already says where.
            let msg = msg
                .split("\nin `")
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            // serde names the unknown or missing field only in its message; add it to the path.
            if let Some(field) = msg
                .strip_prefix("unknown field `")
                .or_else(|| msg.strip_prefix("missing field `"))
                .and_then(|r| r.split('`').next())
            {
                if key == "." || key.is_empty() {
                    key = field.to_string();
                } else if !key.ends_with(field) {
                    let _ = write!(key, ".{field}");
                }
            }
            err(key, msg)
        })
    }
}

fn interpolate(
    v: &mut toml::Value,
    path: &mut String,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match v {
        toml::Value::String(s) if s.contains('$') => {
            *s = interpolate_str(s, env).map_err(|reason| err(path.clone(), reason))?;
        }
        toml::Value::Array(a) => {
            for (i, item) in a.iter_mut().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                interpolate(item, path, env)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                interpolate(item, path, env)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn interpolate_str(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = t;
        } else if let Some(t) = tail.strip_prefix("${") {
            let end = t
                .find('}')
                .ok_or_else(|| "unclosed `${` (write `$${` for a literal)".to_string())?;
            let name = &t[..end];
            let (name, default) = match name.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (name, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable name"
                ));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
                    ))
                }
            }
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Phase 2: checked values.

/// Which topics a sink reads.
#[derive(Debug, Clone)]
pub enum TopicSelector {
    Names(Vec<String>),
    Regex(regex::Regex),
}

impl TopicSelector {
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicSelector::Names(n) => n.iter().any(|t| t == topic),
            TopicSelector::Regex(r) => r.is_match(topic),
        }
    }

    /// The librdkafka subscription patterns (a regex subscription starts with `^`).
    pub fn subscriptions(&self) -> Vec<String> {
        match self {
            TopicSelector::Names(n) => n.clone(),
            TopicSelector::Regex(r) => {
                let s = r.as_str();
                vec![if s.starts_with('^') {
                    s.to_string()
                } else {
                    format!("^{s}")
                }]
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct ValidatedRegistry {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub bearer_token: Option<Secret>,
    pub ca_file: Option<std::path::PathBuf>,
    pub client_cert_file: Option<std::path::PathBuf>,
    pub client_key_file: Option<std::path::PathBuf>,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Flush {
    pub max_rows: usize,
    pub max_bytes: u64,
    pub max_latency: Duration,
}

/// What happens to a record a sink cannot decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// Stop the sink with an error naming the record (nothing is skipped).
    Fail,
    /// Log and count it, commit past it.
    Skip,
    /// Send it to the dead-letter topic with headers naming the error, commit past it.
    DeadLetter,
}

#[derive(Debug, Clone)]
pub struct ValidatedSink {
    pub name: String,
    pub topics: TopicSelector,
    pub table: String,
    pub storage: BTreeMap<String, Secret>,
    pub partition_by: Vec<PartitionSpec>,
    pub flush: Flush,
    pub compression: Compression,
    pub metadata: MetadataConfig,
    pub errors: ErrorPolicy,
    pub dead_letter_topic: Option<String>,
    pub dead_letter_exactly_once: bool,
    pub format: Format,
    /// The declared table schema of `format = "json"` / `"debezium-json"`.
    pub json_schema: Option<arrow::datatypes::SchemaRef>,
    /// JSON values are Kafka Connect `{"schema", "payload"}` envelopes.
    pub connect_envelope: bool,
    /// How to decode keys into `_key`, if at all.
    pub key_format: Option<crate::decode::key::KeyFormat>,
    pub kind: SinkKind,
    /// `kind = "databend"`: the checked connection.
    pub databend: Option<ValidatedDatabend>,
    /// `mode = "upsert"`: the key columns.
    pub upsert_keys: Option<Vec<String>>,
    pub delta: ValidatedDelta,
}

/// Which table format a sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Parquet,
    Delta,
    Databend,
}

/// A checked Databend connection.
#[derive(Debug, Clone)]
pub struct ValidatedDatabend {
    /// `http(s)://host:port`, without credentials.
    pub endpoint: url::Url,
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    pub warehouse: Option<String>,
    pub timeout: std::time::Duration,
}

fn validate_databend(
    d: &DatabendConfig,
    key: &dyn Fn(&str) -> String,
) -> Result<ValidatedDatabend, ConfigError> {
    let mut url = url::Url::parse(d.url.expose()).map_err(|e| {
        err(
            key("databend.url"),
            format!("not a URL ({e}); write e.g. https://user:${{PASSWORD}}@host:8000/db"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(err(
            key("databend.url"),
            format!(
                "scheme `{}` is not supported; use http:// or https://",
                url.scheme()
            ),
        ));
    }
    let user = d.user.clone().unwrap_or_else(|| {
        if url.username().is_empty() {
            "root".into()
        } else {
            percent_decode(url.username())
        }
    });
    let password = d
        .password
        .clone()
        .or_else(|| url.password().map(|p| Secret::new(percent_decode(p))));
    let path_db = url.path().trim_matches('/').to_string();
    let database = d.database.clone().unwrap_or(if path_db.is_empty() {
        "default".into()
    } else {
        path_db
    });
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_path("/");
    let timeout = parse_duration(&d.timeout).map_err(|e| err(key("databend.timeout"), e))?;
    Ok(ValidatedDatabend {
        endpoint: url,
        user,
        password,
        database,
        warehouse: d.warehouse.clone(),
        timeout,
    })
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

/// Checked `[sink.delta]` settings.
#[derive(Debug, Clone)]
pub struct ValidatedDelta {
    pub checkpoint_interval: u64,
    pub properties: BTreeMap<String, String>,
    pub commit_attempts: u32,
    pub vacuum_retention: std::time::Duration,
    pub target_file_size: u64,
}

/// How record values are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Schemaless JSON objects decoded into the declared `schema`.
    Json,
    /// Confluent-framed Avro.
    Avro,
    /// Confluent-framed Avro Debezium envelopes, unwrapped to row images.
    DebeziumAvro,
    /// JSON Debezium envelopes (rows of the declared `schema`), unwrapped to row images.
    DebeziumJson,
}

#[derive(Debug, Clone)]
pub struct ValidatedConfig {
    pub bootstrap_servers: String,
    pub group_id: String,
    /// Every librdkafka property, safety settings included.
    pub kafka_properties: BTreeMap<String, Secret>,
    pub registry: Option<ValidatedRegistry>,
    pub max_buffer_bytes: u64,
    pub drain_timeout: Duration,
    /// `pipeline.stall_timeout`.
    pub stall_timeout: Duration,
    pub queue_records: usize,
    /// `security.mechanism = "AWS_MSK_IAM"`: sign OAUTHBEARER tokens for this region.
    pub msk_iam_region: Option<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub http_listen: Option<std::net::SocketAddr>,
    pub sinks: Vec<ValidatedSink>,
}

/// librdkafka properties lakesink owns; setting them is an error.
const FORCED: &[(&str, &str, &str)] = &[
    (
        "enable.auto.commit",
        "false",
        "lakesink commits offsets itself, after the sink's commit; auto commit would lose records on a crash",
    ),
    (
        "enable.auto.offset.store",
        "false",
        "lakesink stores offsets itself, after the sink's commit",
    ),
];

impl Config {
    pub fn validate(self) -> Result<ValidatedConfig, ConfigError> {
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            return Err(err("kafka.bootstrap_servers", "must not be empty"));
        }
        if k.group_id.trim().is_empty() {
            return Err(err("kafka.group_id", "must not be empty"));
        }
        let mut props: BTreeMap<String, Secret> = BTreeMap::new();
        let mut msk_iam_region = None;
        for (name, value) in &k.properties {
            let key = format!("kafka.properties.\"{name}\"");
            if let Some((_, _, why)) = FORCED.iter().find(|(n, _, _)| n == name) {
                return Err(err(
                    key,
                    format!("cannot be set: {why}; remove it (lakesink forces it to false)"),
                ));
            }
            match name.as_str() {
                "bootstrap.servers" => {
                    return Err(err(key, "set `kafka.bootstrap_servers` instead"))
                }
                "group.id" => return Err(err(key, "set `kafka.group_id` instead")),
                _ => {}
            }
            props.insert(name.clone(), Secret::new(value.to_string()));
        }
        // KIP-848's protocol takes membership timing from the broker; librdkafka refuses these.
        if k.properties
            .get("group.protocol")
            .map(|v| v.to_string().to_ascii_lowercase())
            == Some("consumer".into())
        {
            for name in [
                "session.timeout.ms",
                "heartbeat.interval.ms",
                "partition.assignment.strategy",
                "group.protocol.type",
            ] {
                if k.properties.contains_key(name) {
                    return Err(err(
                        format!("kafka.properties.\"{name}\""),
                        "not supported with group.protocol = \"consumer\": the broker sets it \
                         (group.consumer.* settings); remove it, or use the classic protocol",
                    ));
                }
            }
        }
        if let Some(sec) = &k.security {
            let protocol = sec.protocol.to_ascii_uppercase();
            if !["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"].contains(&protocol.as_str()) {
                return Err(err(
                    "kafka.security.protocol",
                    format!(
                        "`{}` is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
                        sec.protocol
                    ),
                ));
            }
            props.insert("security.protocol".into(), Secret::new(protocol.clone()));
            if let Some(m) = &sec.mechanism {
                let librdkafka = if m.eq_ignore_ascii_case("AWS_MSK_IAM") {
                    if sec.region.is_none() {
                        return Err(err(
                            "kafka.security.region",
                            "AWS_MSK_IAM signs tokens for the cluster's region; set e.g. region = \"eu-west-1\"",
                        ));
                    }
                    if !protocol.starts_with("SASL") {
                        return Err(err("kafka.security.protocol", "AWS_MSK_IAM needs SASL_SSL"));
                    }
                    msk_iam_region = sec.region.clone();
                    "OAUTHBEARER".to_string()
                } else {
                    m.clone()
                };
                props.insert("sasl.mechanism".into(), Secret::new(librdkafka));
            }
            if let Some(u) = &sec.username {
                props.insert("sasl.username".into(), Secret::new(u.clone()));
            }
            if let Some(p) = &sec.password {
                props.insert("sasl.password".into(), p.clone());
            }
            if protocol.starts_with("SASL") && sec.mechanism.is_none() {
                return Err(err(
                    "kafka.security.mechanism",
                    "required with a SASL protocol (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)",
                ));
            }
        }
        for (name, value, _) in FORCED {
            props.insert((*name).into(), Secret::new(*value));
        }
        let reset = props
            .entry("auto.offset.reset".into())
            .or_insert_with(|| Secret::new("earliest"));
        if !matches!(
            reset.expose(),
            "earliest" | "smallest" | "beginning" | "latest" | "largest" | "end"
        ) {
            return Err(err(
                "kafka.properties.\"auto.offset.reset\"",
                format!(
                    "`{}`: must be `earliest` or `latest`. It only says where a sink with no \
                     position in its table starts; lakesink resolves out-of-range positions itself \
                     (see \"When the log and the table disagree\" in the README)",
                    reset.expose()
                ),
            ));
        }

        let registry = match &self.schema_registry {
            Some(r) => {
                let url = url::Url::parse(&r.url).map_err(|e| {
                    err(
                        "schema_registry.url",
                        format!("`{}` is not a URL: {e}", r.url),
                    )
                })?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(err(
                        "schema_registry.url",
                        "must be an http:// or https:// URL",
                    ));
                }
                if url.password().is_some() {
                    return Err(err(
                        "schema_registry.url",
                        "put credentials in `schema_registry.basic_auth`, not in the URL",
                    ));
                }
                if r.basic_auth.is_some() && r.bearer_token.is_some() {
                    return Err(err(
                        "schema_registry.bearer_token",
                        "set either `basic_auth` or `bearer_token`, not both",
                    ));
                }
                if r.client_cert_file.is_some() != r.client_key_file.is_some() {
                    return Err(err(
                        "schema_registry.client_key_file",
                        "mutual TLS needs both `client_cert_file` and `client_key_file`",
                    ));
                }
                for (k, f) in [
                    ("ca_file", &r.ca_file),
                    ("client_cert_file", &r.client_cert_file),
                    ("client_key_file", &r.client_key_file),
                ] {
                    if let Some(f) = f {
                        if !f.is_file() {
                            return Err(err(
                                format!("schema_registry.{k}"),
                                format!("{} is not a readable file", f.display()),
                            ));
                        }
                    }
                }
                Some(ValidatedRegistry {
                    url: r.url.clone(),
                    username: r.basic_auth.as_ref().map(|b| b.username.clone()),
                    password: r.basic_auth.as_ref().map(|b| b.password.clone()),
                    bearer_token: r.bearer_token.clone(),
                    ca_file: r.ca_file.clone(),
                    client_cert_file: r.client_cert_file.clone(),
                    client_key_file: r.client_key_file.clone(),
                    timeout: parse_duration(&r.timeout)
                        .map_err(|e| err("schema_registry.timeout", e))?,
                })
            }
            None => None,
        };

        let p = &self.pipeline;
        let max_buffer_bytes =
            parse_bytes(&p.max_buffer_bytes).map_err(|e| err("pipeline.max_buffer_bytes", e))?;
        let drain_timeout =
            parse_duration(&p.drain_timeout).map_err(|e| err("pipeline.drain_timeout", e))?;
        let stall_timeout =
            parse_duration(&p.stall_timeout).map_err(|e| err("pipeline.stall_timeout", e))?;
        if stall_timeout < Duration::from_secs(5) {
            return Err(err(
                "pipeline.stall_timeout",
                "must be at least 5s (librdkafka reports fetch positions every 5 s)",
            ));
        }
        if p.queue_records == 0 {
            return Err(err("pipeline.queue_records", "must be at least 1"));
        }

        if self.sinks.is_empty() {
            return Err(err("sink", "at least one [[sink]] is required"));
        }
        let mut sinks = Vec::with_capacity(self.sinks.len());
        for (i, s) in self.sinks.iter().enumerate() {
            let key = |f: &str| format!("sink[{i}].{f}");
            if s.name.trim().is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(err(
                    key("name"),
                    "must be non-empty letters, digits, `-`, `_`, `.`",
                ));
            }
            if sinks.iter().any(|o: &ValidatedSink| o.name == s.name) {
                return Err(err(
                    key("name"),
                    format!("`{}` is used by two sinks", s.name),
                ));
            }
            let topics = match (&s.topics, &s.topics_regex) {
                (Some(t), None) if !t.is_empty() => {
                    for name in t {
                        if name.is_empty()
                            || name == "."
                            || name == ".."
                            || !name
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                        {
                            return Err(err(
                                key("topics"),
                                format!("`{name}` is not a valid Kafka topic name"),
                            ));
                        }
                    }
                    TopicSelector::Names(t.clone())
                }
                (None, Some(r)) => TopicSelector::Regex(
                    regex::Regex::new(r).map_err(|e| err(key("topics_regex"), e.to_string()))?,
                ),
                (Some(_), Some(_)) => {
                    return Err(err(
                        key("topics"),
                        "set either `topics` or `topics_regex`, not both",
                    ))
                }
                _ => return Err(err(key("topics"), "set `topics = [..]` or `topics_regex`")),
            };
            match s.format.as_str() {
                "avro" => {
                    if registry.is_none() {
                        return Err(err(
                            key("format"),
                            "`avro` needs a [schema_registry] section to resolve schema ids",
                        ));
                    }
                }
                "debezium-avro" => {
                    if registry.is_none() {
                        return Err(err(
                            key("format"),
                            "`debezium-avro` needs a [schema_registry] section to resolve schema ids",
                        ));
                    }
                }
                "json" | "debezium-json"
                    if s.schema.is_none() && s.json_envelope.as_deref() == Some("connect") =>
                {
                    // The schema each record carries (Kafka Connect's JsonConverter).
                }
                "json" if s.schema.is_none() => {
                    if registry.is_none() {
                        return Err(err(
                            key("schema"),
                            "`json` needs either the table's columns (schema = { id = \"long\", ... }) or a [schema_registry] with JSON Schemas for Confluent-framed records",
                        ));
                    }
                }
                "json" | "debezium-json" => {
                    if s.schema.is_none() {
                        return Err(err(
                            key("schema"),
                            "`debezium-json` needs the table's columns (schema = { id = \"long\", name = \"string\", ... }), or json_envelope = \"connect\" to read the schema each record carries (Connect's JsonConverter with schemas.enable=true, Debezium's default)",
                        ));
                    }
                }
                other => {
                    return Err(err(
                        key("format"),
                        format!(
                        "unknown format `{other}`; use avro, debezium-avro, json or debezium-json"
                    ),
                    ))
                }
            }
            let kind = match s.kind.as_str() {
                "parquet" => SinkKind::Parquet,
                "delta" => SinkKind::Delta,
                "databend" => SinkKind::Databend,
                other => {
                    return Err(err(
                        key("kind"),
                        format!("unknown sink kind `{other}`; use parquet, delta or databend"),
                    ))
                }
            };
            let databend = match (kind, &s.databend) {
                (SinkKind::Databend, Some(d)) => Some(validate_databend(d, &key)?),
                (SinkKind::Databend, None) => {
                    return Err(err(
                        key("databend"),
                        "kind = \"databend\" needs databend = { url = \"https://user:${PASSWORD}@host:8000/db\" }",
                    ))
                }
                (_, Some(_)) => {
                    return Err(err(key("databend"), "only used with kind = \"databend\""))
                }
                (_, None) => None,
            };
            let upsert_keys = match (s.mode.as_str(), &s.key) {
                ("append", None) => None,
                ("append", Some(_)) => {
                    return Err(err(key("key"), "only used with mode = \"upsert\""))
                }
                ("upsert", _) if kind == SinkKind::Parquet => {
                    return Err(err(
                        key("mode"),
                        "plain Parquet tables cannot update rows; use kind = \"delta\" or \"databend\" for upserts",
                    ))
                }
                ("upsert", Some(k)) if !k.is_empty() && k.iter().all(|c| !c.trim().is_empty()) => {
                    Some(k.clone())
                }
                ("upsert", _) => {
                    return Err(err(
                        key("key"),
                        "mode = \"upsert\" needs the columns that identify a row: key = [\"id\"]",
                    ))
                }
                (other, _) => {
                    return Err(err(
                        key("mode"),
                        format!("unknown mode `{other}`; use append or upsert"),
                    ))
                }
            };
            if s.delta.checkpoint_interval == 0 {
                return Err(err(key("delta.checkpoint_interval"), "must be at least 1"));
            }
            if s.delta.commit_attempts == 0 {
                return Err(err(key("delta.commit_attempts"), "must be at least 1"));
            }
            let vacuum_retention = parse_duration(&s.delta.vacuum_retention)
                .map_err(|e| err(key("delta.vacuum_retention"), e))?;
            if vacuum_retention < MIN_VACUUM_RETENTION {
                return Err(err(
                    key("delta.vacuum_retention"),
                    format!(
                        "`{}` is below the floor of 1h: the data files a running writer has \
                         written but not committed yet are unreferenced too, and would be \
                         deleted (a clock ahead of the store's counts against it). With every \
                         writer of the table stopped, `lakesink maintain --retention 0s` applies \
                         a shorter one once",
                        s.delta.vacuum_retention
                    ),
                ));
            }
            let target_file_size = parse_bytes(&s.delta.target_file_size)
                .map_err(|e| err(key("delta.target_file_size"), e))?;
            if kind == SinkKind::Databend {
                if s.table.trim().is_empty() {
                    return Err(err(
                        key("table"),
                        "the Databend table name (template) is empty",
                    ));
                }
            } else {
                let url = url::Url::parse(&s.table).map_err(|e| {
                    err(
                        key("table"),
                        format!(
                        "`{}` is not a URL ({e}); write e.g. s3://bucket/path or file:///abs/dir",
                        sinks::store::redact_url(&s.table)
                    ),
                    )
                })?;
                if ![
                    "file", "s3", "s3a", "az", "azure", "abfs", "abfss", "adl", "gs", "memory",
                ]
                .contains(&url.scheme())
                {
                    return Err(err(
                        key("table"),
                        format!(
                        "unsupported scheme `{}://`; use file://, s3://, az://, abfss:// or gs://",
                        url.scheme()
                    ),
                    ));
                }
                if url.password().is_some()
                    || !url.username().is_empty()
                        && url.scheme() != "abfss"
                        && url.scheme() != "abfs"
                {
                    return Err(err(
                        key("table"),
                        "put credentials in the sink's `storage` table, not in the URL",
                    ));
                }
            }
            let partition_by = s
                .partition_by
                .iter()
                .map(|p| {
                    PartitionSpec::parse(p).map_err(|e| err(key("partition_by"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if s.flush.max_rows == 0 {
                return Err(err(key("flush.max_rows"), "must be at least 1"));
            }
            let flush = Flush {
                max_rows: s.flush.max_rows,
                max_bytes: parse_bytes(&s.flush.max_bytes)
                    .map_err(|e| err(key("flush.max_bytes"), e))?,
                max_latency: parse_duration(&s.flush.max_latency)
                    .map_err(|e| err(key("flush.max_latency"), e))?,
            };
            let compression = s
                .compression
                .parse()
                .map_err(|e: String| err(key("compression"), e))?;
            let errors = match (s.errors.as_deref(), &s.dead_letter_topic) {
                (None, None) | (Some("fail"), _) => ErrorPolicy::Fail,
                (None, Some(_)) | (Some("dead-letter"), Some(_)) => ErrorPolicy::DeadLetter,
                (Some("skip"), _) => ErrorPolicy::Skip,
                (Some("dead-letter"), None) => {
                    return Err(err(
                        key("dead_letter_topic"),
                        "required with errors = \"dead-letter\"",
                    ))
                }
                (Some(other), _) => {
                    return Err(err(
                        key("errors"),
                        format!("unknown policy `{other}`; use fail, skip or dead-letter"),
                    ))
                }
            };
            if let Some(t) = &s.dead_letter_topic {
                if t.is_empty()
                    || !t
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    return Err(err(
                        key("dead_letter_topic"),
                        format!("`{t}` is not a valid Kafka topic name"),
                    ));
                }
                if topics.matches(t) {
                    return Err(err(
                        key("dead_letter_topic"),
                        "the sink would read its own dead letters",
                    ));
                }
            }
            let declared = |cols: &toml::Table,
                            what: &str|
             -> Result<arrow::datatypes::SchemaRef, ConfigError> {
                let mut fields = Vec::with_capacity(cols.len());
                for (name, t) in cols {
                    let t = t.as_str().ok_or_else(|| {
                        err(
                            key(&format!("{what}.{name}")),
                            "the type must be a string such as \"long\"",
                        )
                    })?;
                    let dt = crate::decode::json::parse_type(t)
                        .map_err(|e| err(key(&format!("{what}.{name}")), e))?;
                    fields.push(arrow::datatypes::Field::new(name, dt, true));
                }
                if fields.is_empty() {
                    return Err(err(key(what), "declare at least one column"));
                }
                Ok(std::sync::Arc::new(arrow::datatypes::Schema::new(fields)))
            };
            let key_format = match (s.key_format.as_deref(), &s.key_schema) {
                (None, None) => None,
                (Some("string"), None) => Some(crate::decode::key::KeyFormat::String),
                (Some("json"), Some(cols)) => Some(crate::decode::key::KeyFormat::Json(declared(
                    cols,
                    "key_schema",
                )?)),
                (Some("json"), None) => return Err(err(
                    key("key_schema"),
                    "key_format = \"json\" needs the key's fields: key_schema = { id = \"long\" }",
                )),
                (Some("avro"), None) => {
                    if registry.is_none() {
                        return Err(err(
                            key("key_format"),
                            "`avro` keys need a [schema_registry]",
                        ));
                    }
                    Some(crate::decode::key::KeyFormat::Avro)
                }
                (Some(_), Some(_)) | (None, Some(_)) => {
                    return Err(err(
                        key("key_schema"),
                        "only key_format = \"json\" takes a key_schema",
                    ))
                }
                (Some(other), None) => {
                    return Err(err(
                        key("key_format"),
                        format!("unknown key format `{other}`; use string, json or avro"),
                    ))
                }
            };
            let json_schema = match &s.schema {
                Some(cols) if s.format == "json" || s.format == "debezium-json" => {
                    let mut fields = Vec::with_capacity(cols.len());
                    for (name, t) in cols {
                        let t = t.as_str().ok_or_else(|| {
                            err(
                                key(&format!("schema.{name}")),
                                "the type must be a string such as \"long\"",
                            )
                        })?;
                        let dt = crate::decode::json::parse_type(t)
                            .map_err(|e| err(key(&format!("schema.{name}")), e))?;
                        fields.push(arrow::datatypes::Field::new(name, dt, true));
                    }
                    if fields.is_empty() {
                        return Err(err(key("schema"), "declare at least one column"));
                    }
                    Some(std::sync::Arc::new(arrow::datatypes::Schema::new(fields)))
                }
                Some(_) => {
                    return Err(err(
                        key("schema"),
                        "only the JSON formats take a declared schema",
                    ))
                }
                None => None,
            };
            sinks.push(ValidatedSink {
                name: s.name.clone(),
                topics,
                table: s.table.clone(),
                storage: s.storage.clone(),
                partition_by,
                flush,
                compression,
                metadata: s.metadata,
                errors,
                dead_letter_topic: s.dead_letter_topic.clone(),
                dead_letter_exactly_once: s.dead_letter_exactly_once,
                format: match s.format.as_str() {
                    "debezium-avro" => Format::DebeziumAvro,
                    "json" => Format::Json,
                    "debezium-json" => Format::DebeziumJson,
                    _ => Format::Avro,
                },
                json_schema,
                key_format,
                kind,
                upsert_keys,
                databend,
                delta: ValidatedDelta {
                    checkpoint_interval: s.delta.checkpoint_interval,
                    properties: s.delta.properties.clone(),
                    commit_attempts: s.delta.commit_attempts,
                    vacuum_retention,
                    target_file_size,
                },
                connect_envelope: match s.json_envelope.as_deref() {
                    None | Some("none") => false,
                    Some("connect") if s.format.contains("json") => true,
                    Some(other) => {
                        return Err(err(
                            key("json_envelope"),
                            format!("`{other}` is not supported; use \"connect\" (JSON formats only) or leave it out"),
                        ))
                    }
                },
            });
        }
        Ok(ValidatedConfig {
            bootstrap_servers: k.bootstrap_servers.clone(),
            group_id: k.group_id.clone(),
            kafka_properties: props,
            registry,
            max_buffer_bytes,
            drain_timeout,
            stall_timeout,
            queue_records: p.queue_records,
            msk_iam_region,
            http_listen: match &self.http {
                Some(h) => Some(h.listen.parse().map_err(|e| {
                    err(
                        "http.listen",
                        format!(
                            "`{}` is not ADDR:PORT ({e}); write e.g. 0.0.0.0:9090",
                            h.listen
                        ),
                    )
                })?),
                None => None,
            },
            sinks,
        })
    }
}

impl ValidatedConfig {
    /// A printable summary with every secret redacted.
    pub fn redacted(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "kafka: {} group={}",
            self.bootstrap_servers, self.group_id
        );
        for (k, v) in &self.kafka_properties {
            let shown = if is_secret_key(k) { "***" } else { v.expose() };
            let _ = writeln!(s, "  {k} = {shown}");
        }
        if let Some(r) = &self.registry {
            let _ = writeln!(
                s,
                "schema_registry: {} auth={}",
                r.url,
                if r.username.is_some() {
                    "basic (***)"
                } else {
                    "none"
                }
            );
        }
        for sink in &self.sinks {
            let _ = writeln!(
                s,
                "sink {}: {:?} -> {} partition_by={:?} flush={:?}",
                sink.name,
                sink.topics.subscriptions(),
                sinks::store::redact_url(&sink.table),
                sink.partition_by,
                sink.flush
            );
            for (k, v) in &sink.storage {
                let shown = if is_secret_key(k) { "***" } else { v.expose() };
                let _ = writeln!(s, "  storage.{k} = {shown}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests;
