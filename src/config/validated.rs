//! Phase 2 of the config: checked values, the only form that builds components.

use super::*;

/// Which topics a sink reads.
#[derive(Debug, Clone)]
pub enum TopicSelector {
    Names(Vec<String>),
    /// A pattern, less Debezium's own topics when `debezium` says so.
    Regex {
        re: regex::Regex,
        debezium: Option<DebeziumTopics>,
    },
}

/// Which of Debezium's own topics (no table's rows) a `topics_regex` sink of a Debezium format
/// skips by rule: heartbeats always; with a `{server}`/`{db}`/`{table}` template also the topics
/// not named `<server>.<db>.<table>`: the schema-change topic `<prefix>` and the
/// transaction-metadata topic `<prefix>.transaction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebeziumTopics {
    pub unnamed: bool,
}

/// The prefix of Debezium's heartbeat topics (`topic.heartbeat.prefix`'s default).
pub const DEBEZIUM_HEARTBEAT_PREFIX: &str = "__debezium-heartbeat";

impl TopicSelector {
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicSelector::Names(n) => n.iter().any(|t| t == topic),
            TopicSelector::Regex { re, .. } => {
                re.is_match(topic) && self.skipped_by_rule(topic).is_none()
            }
        }
    }

    /// Why a topic the pattern matches is not read (Debezium's own topics), if it is not.
    pub fn skipped_by_rule(&self, topic: &str) -> Option<&'static str> {
        let TopicSelector::Regex {
            re,
            debezium: Some(rule),
        } = self
        else {
            return None;
        };
        if !re.is_match(topic) {
            return None;
        }
        if topic.starts_with(DEBEZIUM_HEARTBEAT_PREFIX) {
            return Some("a Debezium heartbeat topic");
        }
        if rule.unnamed && topic.split('.').count() < 3 {
            return Some(
                "not named <server>.<db>.<table>: Debezium's schema-change or \
                 transaction-metadata topic, whose records are no table's rows",
            );
        }
        None
    }

    /// The librdkafka subscription patterns (a regex subscription starts with `^`).
    pub fn subscriptions(&self) -> Vec<String> {
        match self {
            TopicSelector::Names(n) => n.clone(),
            TopicSelector::Regex { re, .. } => {
                let s = re.as_str();
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

/// When a partition writer flushes (`flush = {..}`): whichever comes first.
#[derive(Debug, Clone)]
pub struct FlushTriggers {
    pub max_rows: usize,
    pub max_bytes: u64,
    pub max_latency: Duration,
}

/// What happens to a record a sink cannot decode (`errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    pub flush: FlushTriggers,
    pub compression: Compression,
    pub metadata: MetadataConfig,
    pub errors: ErrorPolicy,
    pub dead_letter_topic: Option<String>,
    pub dead_letter_exactly_once: bool,
    /// Partitions and replication factor of the dead-letter topic if lakesink creates it
    /// (`None`: the broker's default).
    pub dead_letter_partitions: Option<i32>,
    pub dead_letter_replication_factor: Option<i32>,
    pub format: Format,
    /// The declared table schema of `format = "json"` / `"debezium-json"`.
    pub json_schema: Option<arrow::datatypes::SchemaRef>,
    /// JSON values are Kafka Connect `{"schema", "payload"}` envelopes.
    pub connect_envelope: bool,
    /// How to decode keys into `_key`, if at all.
    pub key_format: Option<KeyFormat>,
    pub kind: SinkKind,
    /// `kind = "databend"`: the checked connection.
    pub databend: Option<sinks::databend::client::ClientConfig>,
    /// `mode = "upsert"`: the key columns; empty when they are the message key's fields.
    pub upsert_keys: Option<Vec<String>>,
    /// Upserts keyed by the message key (no `key`): each flush's keys are the fields of its
    /// decoded `_key`, which is never stored.
    pub keys_from_message: bool,
    /// Per-topic table settings (`[sink.tables."<topic>"]`), checked.
    pub tables: BTreeMap<String, TableSettings>,
    /// `[sink.delta]`, checked (defaults for other kinds).
    pub delta: sinks::delta::DeltaSettings,
    /// `[sink.parquet]`, checked (defaults for other kinds).
    pub parquet: sinks::parquet::ParquetSettings,
}

/// Which table format a sink writes (`kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    #[default]
    Parquet,
    Delta,
    Databend,
}

/// How record values are encoded (`format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Schemaless JSON objects decoded into the declared `schema`.
    Json,
    /// Confluent-framed Avro.
    #[default]
    Avro,
    /// Confluent-framed Avro Debezium envelopes, unwrapped to row images.
    DebeziumAvro,
    /// JSON Debezium envelopes (rows of the declared `schema`), unwrapped to row images.
    DebeziumJson,
    /// Confluent-framed Protobuf (schemas and their imports from the registry).
    Protobuf,
}

#[derive(Debug, Clone)]
pub struct ValidatedConfig {
    pub bootstrap_servers: String,
    pub group_id: String,
    /// `kafka.start_from_group`.
    pub start_from_group: Option<String>,
    /// Every librdkafka property, safety settings included.
    pub kafka_properties: BTreeMap<String, Secret>,
    pub registry: Option<ValidatedRegistry>,
    pub max_buffer_bytes: u64,
    /// `pipeline.pack_buffers`.
    pub pack_buffers: bool,
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

impl Format {
    /// The name as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
            Format::DebeziumAvro => "debezium-avro",
            Format::DebeziumJson => "debezium-json",
            Format::Protobuf => "protobuf",
        }
    }
}

/// How a sink writes rows (`mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every record is a new row.
    #[default]
    Append,
    /// Rows are replaced or deleted by key.
    Upsert,
}

/// What wraps JSON record values (`json_envelope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JsonEnvelope {
    /// Plain JSON values.
    #[default]
    None,
    /// Kafka Connect's `{"schema": ..., "payload": ...}` (JsonConverter, schemas.enable=true).
    Connect,
}

/// How record keys are encoded, as written (`key_format`); checked into [`KeyFormat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyEncoding {
    /// UTF-8 text.
    String,
    /// JSON objects with a declared `key_schema`.
    Json,
    /// Confluent-framed Avro.
    Avro,
}

/// How record keys are encoded (`key_format`).
#[derive(Debug, Clone)]
pub enum KeyFormat {
    String,
    /// JSON objects with the declared `key_schema`.
    Json(arrow::datatypes::SchemaRef),
    /// JSON in Kafka Connect's envelope, each key decoded with the schema it carries.
    ConnectJson,
    /// Confluent-framed Avro.
    Avro,
}

/// One topic's table settings that differ from its sink's (`[sink.tables."<topic>"]`).
#[derive(Debug, Clone, Default)]
pub struct TableSettings {
    /// The table's location instead of the template's.
    pub table: Option<String>,
    /// The table's partitioning instead of the sink's.
    pub partition_by: Option<Vec<PartitionSpec>>,
    /// The table's key columns instead of the sink's (upserts).
    pub upsert_keys: Option<Vec<String>>,
}

impl ValidatedSink {
    /// The sink's settings for `topic`'s table: its `[sink.tables]` entry over the sink's.
    pub fn for_topic(&self, topic: &str) -> ValidatedSink {
        let mut s = self.clone();
        if let Some(t) = self.tables.get(topic) {
            if let Some(p) = &t.partition_by {
                s.partition_by = p.clone();
            }
            if let Some(k) = &t.upsert_keys {
                s.upsert_keys = Some(k.clone());
            }
        }
        s
    }

    /// The topics whose table is named in `[sink.tables]`, and where it is.
    pub fn fixed_tables(&self) -> Vec<(String, String)> {
        self.tables
            .iter()
            .filter_map(|(topic, t)| Some((topic.clone(), t.table.clone()?)))
            .collect()
    }
}
