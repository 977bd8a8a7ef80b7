//! Kafka Connect sink configs: Confluent's object-store sinks (S3, GCS, ADLS Gen2; the
//! self-managed classes and Confluent Cloud's managed ones) and databend-kafka-connect.

use std::collections::BTreeMap;

use super::{quote, Draft};

/// The connectors read, by `connector.class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    S3,
    Gcs,
    Adls,
    Databend,
}

fn target(class: &str) -> Option<Target> {
    Some(match class {
        "io.confluent.connect.s3.S3SinkConnector" | "S3_SINK" => Target::S3,
        "io.confluent.connect.gcs.GcsSinkConnector" | "GcsSink" => Target::Gcs,
        "io.confluent.connect.azure.datalake.gen2.AzureDataLakeGen2SinkConnector"
        | "AzureDataLakeGen2Sink" => Target::Adls,
        "com.databend.kafka.connect.DatabendSinkConnector" => Target::Databend,
        _ => return None,
    })
}

/// Keys every Connect sink may carry that need no lakesink setting, and why.
const NOT_NEEDED: &[(&str, &str)] = &[
    ("tasks.max", "lakesink scales by running more members of `group_id`, each reading the partitions it is assigned"),
    ("confluent.license", "lakesink needs no license"),
    ("confluent.topic.bootstrap.servers", "the license topic of Confluent's connectors"),
    ("confluent.topic.replication.factor", "the license topic of Confluent's connectors"),
    ("storage.class", "the table URL names the store"),
    ("s3.part.size", "lakesink writes each file in one request or its own multipart uploads"),
    ("gcs.part.size", "lakesink writes each file in one request or its own multipart uploads"),
    ("schema.compatibility", "lakesink evolves a table additively within one file series and starts new files for a new schema; it never projects records to an older schema"),
    ("enhanced.avro.schema.support", "Avro is decoded with its full schema (enums, defaults, logical types)"),
    ("connect.meta.data", "lakesink writes Kafka metadata as `_kafka_*` columns (`metadata` table)"),
    ("directory.delim", "lakesink's directory layout is fixed (Hive `key=value` directories)"),
    ("file.delim", "lakesink names its own files"),
    ("behavior.on.null.values", "tombstones carry no row in an append table (their offsets are committed); upserts delete the key"),
    ("key.converter", "keys are read only where a sink needs them (`key_format`, upserts)"),
    ("header.converter", "headers are kept in dead letters only"),
    ("errors.log.enable", "lakesink logs every rejected record with its topic, partition, offset and reason"),
    ("errors.log.include.messages", "lakesink never logs record contents"),
    ("errors.deadletterqueue.context.headers.enable", "dead letters always carry `lakesink.error.*` and `lakesink.source.*` headers"),
    ("errors.retry.timeout", "transient failures are retried with backoff until the sink's own limits, never dead-lettered"),
    ("errors.retry.delay.max.ms", "transient failures are retried with backoff until the sink's own limits, never dead-lettered"),
    ("max.retries", "transient failures are retried with backoff until the sink's own limits"),
    ("retry.backoff.ms", "transient failures are retried with backoff until the sink's own limits"),
    ("connection.attempts", "transient failures are retried with backoff until the sink's own limits"),
    ("connection.backoff.ms", "transient failures are retried with backoff until the sink's own limits"),
    ("kafka.auth.mode", "set `[kafka] security` (see Managed Kafka in the README)"),
    ("kafka.service.account.id", "set `[kafka] security` with the service account's API key"),
];

/// Translates a Connect sink's config.
pub(super) fn translate(mut cfg: BTreeMap<String, String>, d: &mut Draft) -> anyhow::Result<()> {
    let class = cfg.remove("connector.class").unwrap_or_default();
    let Some(t) = target(&class) else {
        anyhow::bail!(
            "connector.class `{class}` is not one import-connect reads: Confluent's S3, GCS and \
             Azure Data Lake Storage Gen2 sinks (io.confluent.connect.s3.S3SinkConnector, \
             io.confluent.connect.gcs.GcsSinkConnector, \
             io.confluent.connect.azure.datalake.gen2.AzureDataLakeGen2SinkConnector, or the \
             Confluent Cloud names S3_SINK, GcsSink, AzureDataLakeGen2Sink) and \
             com.databend.kafka.connect.DatabendSinkConnector"
        );
    };
    d.from = class;
    let raw_name = cfg.remove("name").unwrap_or_else(|| "connector".into());
    d.name = raw_name
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() || "-_.".contains(c) {
            true => c,
            false => '-',
        })
        .collect();
    // A sink connector's consumer group is `connect-<name>` unless overridden.
    let group = cfg
        .remove("consumer.override.group.id")
        .unwrap_or_else(|| format!("connect-{raw_name}"));
    d.start_from_group = Some(group);
    d.note(format!(
        "`start_from_group` makes each table lakesink has no position in start where the \
         connector's consumer group (`{}`) committed, read once; stop the connector first \
         (see Moving from Kafka Connect in the README)",
        d.start_from_group.as_deref().unwrap_or_default()
    ));
    topics(&mut cfg, d)?;
    converters(&mut cfg, d);
    errors(&mut cfg, d);
    consumer_overrides(&mut cfg, d);
    match t {
        Target::Databend => super::targets::databend(&mut cfg, d)?,
        Target::S3 => super::targets::storage(&mut cfg, d, super::targets::Store::S3)?,
        Target::Gcs => super::targets::storage(&mut cfg, d, super::targets::Store::Gcs)?,
        Target::Adls => super::targets::storage(&mut cfg, d, super::targets::Store::Adls)?,
    }
    for (key, why) in NOT_NEEDED {
        if cfg.remove(*key).is_some() {
            d.unmapped(key, *why);
        }
    }
    for (key, value) in cfg {
        let why = if key.starts_with("transforms") || key.starts_with("predicates") {
            "Single Message Transforms do not run in lakesink; apply them upstream, or keep the \
             columns as they arrive"
                .to_string()
        } else if key.starts_with("value.converter.") || key.starts_with("key.converter.") {
            "a converter setting with no lakesink equivalent".to_string()
        } else if looks_secret(&key) {
            "no lakesink equivalent (a secret: its value is not copied)".to_string()
        } else {
            format!("no lakesink equivalent (value `{value}`)")
        };
        d.unmapped(&key, why);
    }
    Ok(())
}

pub(super) fn looks_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "key", "token", "jaas", "credentials"]
        .iter()
        .any(|s| k.contains(s))
}

fn topics(cfg: &mut BTreeMap<String, String>, d: &mut Draft) -> anyhow::Result<()> {
    let topics: Vec<String> = cfg
        .remove("topics")
        .map(|s| {
            s.split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let regex = cfg.remove("topics.regex");
    match (topics.is_empty(), regex) {
        (false, None) => {
            let list: Vec<String> = topics.iter().map(|t| quote(t)).collect();
            d.set("topics", format!("[{}]", list.join(", ")));
            d.multi_topic = topics.len() > 1;
            d.single_topic = (topics.len() == 1).then(|| topics[0].clone());
        }
        (true, Some(r)) => {
            d.set("topics_regex", quote(&r));
            d.multi_topic = true;
        }
        (false, Some(_)) => {
            anyhow::bail!("both `topics` and `topics.regex` are set; Connect refuses that too")
        }
        (true, None) => anyhow::bail!("neither `topics` nor `topics.regex` is set"),
    }
    Ok(())
}

/// `value.converter` (or Confluent Cloud's `input.data.format`) to `format`.
fn converters(cfg: &mut BTreeMap<String, String>, d: &mut Draft) {
    let converter = cfg.remove("value.converter");
    let input = cfg.remove("input.data.format");
    let format = match (converter.as_deref(), input.as_deref()) {
        (Some("io.confluent.connect.avro.AvroConverter"), _) | (None, Some("AVRO")) => "avro",
        (Some("io.confluent.connect.json.JsonSchemaConverter"), _) | (None, Some("JSON_SR")) => {
            "json"
        }
        (Some("org.apache.kafka.connect.json.JsonConverter"), _) | (None, Some("JSON")) => {
            let envelope = cfg
                .remove("value.converter.schemas.enable")
                .is_none_or(|v| v == "true");
            match envelope {
                true => d.set("json_envelope", quote("connect")),
                false => d.note(
                    "schemaless JSON (`schemas.enable=false`): declare the columns with \
                     `schema = { ... }` in the sink before running",
                ),
            }
            "json"
        }
        (Some("io.confluent.connect.protobuf.ProtobufConverter"), _) | (None, Some("PROTOBUF")) => {
            "protobuf"
        }
        (None, None) => {
            d.note("no `value.converter` is set: the Connect worker's default applies; lakesink assumes Confluent Avro");
            "avro"
        }
        (c, i) => {
            let what = c.or(i).unwrap_or_default().to_string();
            d.unmapped(
                "value.converter",
                format!(
                    "`{what}` has no lakesink format (avro, json, protobuf, debezium-avro, debezium-json)"
                ),
            );
            return;
        }
    };
    d.set("format", quote(format));
    if let Some(url) = cfg.remove("value.converter.schema.registry.url") {
        d.registry_url = Some(url.split(',').next().unwrap_or_default().trim().to_string());
    } else if matches!(format, "avro" | "protobuf") || input.as_deref() == Some("JSON_SR") {
        d.registry_url = Some("${SCHEMA_REGISTRY_URL}".into());
        d.env.push((
            "SCHEMA_REGISTRY_URL".into(),
            "the schema registry's URL".into(),
        ));
    }
    let auth = cfg.remove("value.converter.basic.auth.credentials.source");
    if cfg.remove("value.converter.basic.auth.user.info").is_some()
        || cfg
            .remove("value.converter.schema.registry.basic.auth.user.info")
            .is_some()
        || auth.as_deref() == Some("USER_INFO")
    {
        d.registry_auth = true;
        d.env.push((
            "SCHEMA_REGISTRY_KEY".into(),
            "the registry API key (user)".into(),
        ));
        d.env.push((
            "SCHEMA_REGISTRY_SECRET".into(),
            "the registry API secret".into(),
        ));
    }
    if cfg.remove("store.kafka.keys").as_deref() == Some("true") {
        d.set("metadata", "{ key = true }".into());
    }
}

/// `errors.tolerance` and the dead-letter queue.
fn errors(cfg: &mut BTreeMap<String, String>, d: &mut Draft) {
    let tolerance = cfg.remove("errors.tolerance");
    let dlq = cfg.remove("errors.deadletterqueue.topic.name");
    match (tolerance.as_deref(), dlq) {
        (Some("all"), Some(topic)) if !topic.is_empty() => {
            d.set("dead_letter_topic", quote(&topic));
            if let Some(rf) = cfg.remove("errors.deadletterqueue.topic.replication.factor") {
                d.set("dead_letter_replication_factor", rf);
            }
        }
        (Some("all"), _) => d.set("errors", quote("skip")),
        _ => d.set("errors", quote("fail")),
    }
}

/// `consumer.override.*` to `[kafka] properties`, except what lakesink sets itself.
fn consumer_overrides(cfg: &mut BTreeMap<String, String>, d: &mut Draft) {
    let keys: Vec<String> = cfg
        .keys()
        .filter(|k| k.starts_with("consumer.override."))
        .cloned()
        .collect();
    for key in keys {
        let value = cfg.remove(&key).unwrap_or_default();
        let prop = &key["consumer.override.".len()..];
        match prop {
            "bootstrap.servers" => d.bootstrap = Some(value),
            "auto.offset.reset" | "max.poll.interval.ms" | "session.timeout.ms"
            | "client.rack" | "fetch.max.bytes" | "max.partition.fetch.bytes" => {
                d.kafka_properties.push((prop.to_string(), value))
            }
            _ if looks_secret(prop) || prop.starts_with("sasl.") || prop.starts_with("security.") => d.unmapped(
                &key,
                "a login setting: set `[kafka] security` with `${ENV}` references (see Managed Kafka in the README)",
            ),
            _ => d.unmapped(&key, "a Java consumer setting librdkafka does not share"),
        }
    }
}
