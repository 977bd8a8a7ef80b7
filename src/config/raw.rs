//! Phase 1 of the config: the file as written (every table rejects unknown keys).

use super::*;

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
    /// Where a sink with no position in its table starts: where this consumer group (a Kafka
    /// Connect sink's, `connect-<name>`) committed, instead of `auto.offset.reset`.
    #[serde(default)]
    pub start_from_group: Option<String>,
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
    /// `mechanism = "OAUTHBEARER"`: tokens from an OAuth 2.0 / OIDC provider with the
    /// client-credentials grant (Confluent Cloud OAuth, Microsoft Entra ID for Event Hubs).
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
}

/// OAuth 2.0 client credentials, fetched and refreshed by librdkafka's OIDC client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's token endpoint (`https://.../token`).
    pub token_endpoint: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Scope to ask for (Event Hubs: `https://<namespace>.servicebus.windows.net/.default`).
    #[serde(default)]
    pub scope: Option<String>,
    /// SASL extensions sent with the token (Confluent Cloud: `logicalCluster`,
    /// `identityPoolId`).
    #[serde(default)]
    pub extensions: BTreeMap<String, String>,
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
    /// Under memory pressure, pack buffers (compressed, to wait for the latency tick) before
    /// flushing them early.
    #[serde(default = "default_pack")]
    pub pack_buffers: bool,
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
            pack_buffers: default_pack(),
            drain_timeout: default_drain(),
            queue_records: default_queue(),
            stall_timeout: default_stall(),
        }
    }
}

fn default_stall() -> String {
    "60s".into()
}

fn default_pack() -> bool {
    true
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
    #[serde(default)]
    pub format: Format,
    #[serde(default)]
    pub kind: SinkKind,
    /// The table's location (Parquet, Delta) or name (Databend); `{topic}`, and for Debezium
    /// topics `{server}`, `{db}` and `{table}`, give each topic a table of its own.
    pub table: String,
    /// A `topics_regex` sink writes every topic it matches into one table on purpose (they
    /// share one schema); without it, such a sink needs a per-topic `table` template.
    #[serde(default)]
    pub shared_table: bool,
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
    #[serde(default)]
    pub mode: Mode,
    /// What to do with a record that cannot be decoded: `fail`, `skip` or `dead-letter`
    /// (default: `dead-letter` with a `dead_letter_topic`, else `fail`).
    #[serde(default)]
    pub errors: Option<ErrorPolicy>,
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Dead letters in Kafka transactions, fenced per source partition (default), or at least
    /// once for brokers without transactions.
    #[serde(default = "yes")]
    pub dead_letter_exactly_once: bool,
    /// Partitions of the dead-letter topic when lakesink creates it (default: the broker's).
    #[serde(default)]
    pub dead_letter_partitions: Option<i32>,
    /// Replication factor of the dead-letter topic when lakesink creates it (default: the
    /// broker's).
    #[serde(default)]
    pub dead_letter_replication_factor: Option<i32>,
    /// `format = "json"` / `"debezium-json"`: the table's columns, `name = "type"`, in order.
    #[serde(default)]
    pub schema: Option<toml::Table>,
    /// JSON records wrapped in Kafka Connect's `{"schema": ..., "payload": ...}` (`"connect"`).
    #[serde(default)]
    pub json_envelope: JsonEnvelope,
    /// Decode record keys into `_key`: `string`, `json` (with `key_schema`) or `avro`.
    #[serde(default)]
    pub key_format: Option<KeyEncoding>,
    /// `key_format = "json"`: the key's fields, `name = "type"`.
    #[serde(default)]
    pub key_schema: Option<toml::Table>,
    /// `mode = "upsert"`: the columns that identify a row.
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// Per-table settings of a sink with a per-topic `table` template, by topic:
    /// `[sink.tables."shop.public.order_lines"]`.
    #[serde(default)]
    pub tables: BTreeMap<String, TableOverride>,
    /// `kind = "delta"` settings, read and checked by the Delta sink.
    #[serde(default)]
    pub delta: sinks::delta::DeltaSection,
    /// `kind = "parquet"` settings, read and checked by the Parquet sink.
    #[serde(default)]
    pub parquet: sinks::parquet::ParquetSection,
    /// `kind = "databend"` connection, read and checked by the Databend sink.
    #[serde(default)]
    pub databend: Option<sinks::databend::DatabendSection>,
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

fn default_compression() -> String {
    "snappy".into()
}

/// `[sink.tables."<topic>"]`: what differs for one topic's table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableOverride {
    /// The table's location, instead of the sink's template.
    #[serde(default)]
    pub table: Option<String>,
    /// The table's partitioning, instead of the sink's `partition_by`.
    #[serde(default)]
    pub partition_by: Option<Vec<String>>,
    /// `mode = "upsert"`: the table's key columns, instead of the sink's `key`.
    #[serde(default)]
    pub key: Option<Vec<String>>,
}
