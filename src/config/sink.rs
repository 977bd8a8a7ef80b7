//! Checking one `[[sink]]`: its name, topics, format and schema, kind and mode, table location,
//! partitioning, flush triggers, error policy and keys, and each kind's own section
//! (`[sink.delta]`, `databend = {..}`). Every error names the key path (`sink[2].flush.max_rows`).

use super::*;

/// Checks `[[sink]]` number `i`; `before` holds the sinks checked so far (names must differ).
pub(super) fn validate_sink(
    i: usize,
    s: &SinkConfig,
    registry: Option<&ValidatedRegistry>,
    before: &[ValidatedSink],
) -> Result<ValidatedSink, ConfigError> {
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
    if before.iter().any(|o: &ValidatedSink| o.name == s.name) {
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
        (None, Some(r)) => TopicSelector::Regex {
            re: regex::Regex::new(r).map_err(|e| err(key("topics_regex"), e.to_string()))?,
            debezium: matches!(s.format, Format::DebeziumJson | Format::DebeziumAvro).then(|| {
                DebeziumTopics {
                    unnamed: ["{server}", "{db}", "{table}"]
                        .iter()
                        .any(|p| s.table.contains(p)),
                }
            }),
        },
        (Some(_), Some(_)) => {
            return Err(err(
                key("topics"),
                "set either `topics` or `topics_regex`, not both",
            ))
        }
        _ => return Err(err(key("topics"), "set `topics = [..]` or `topics_regex`")),
    };
    let needs_registry = match s.format {
        Format::Avro | Format::DebeziumAvro => Some("schema ids"),
        Format::Protobuf => Some("Protobuf schemas and their imports"),
        Format::Json if s.schema.is_none() && s.json_envelope == JsonEnvelope::None => {
            Some("the JSON Schemas of Confluent-framed records")
        }
        _ => None,
    };
    if let (Some(what), None) = (needs_registry, registry) {
        return Err(err(
            key(if s.format == Format::Json { "schema" } else { "format" }),
            match s.format {
                Format::Json => "`json` needs either the table's columns (schema = { id = \"long\", ... }) or a [schema_registry] with JSON Schemas for Confluent-framed records".to_string(),
                f => format!("`{}` needs a [schema_registry] section to resolve {what}", f.name()),
            },
        ));
    }
    if s.format == Format::DebeziumJson
        && s.schema.is_none()
        && s.json_envelope == JsonEnvelope::None
    {
        return Err(err(
            key("schema"),
            "`debezium-json` needs the table's columns (schema = { id = \"long\", name = \"string\", ... }), or json_envelope = \"connect\" to read the schema each record carries (Connect's JsonConverter with schemas.enable=true, Debezium's default)",
        ));
    }
    let kind = s.kind;
    let databend = match (kind, &s.databend) {
        (SinkKind::Databend, Some(d)) => Some(d.validate().map_err(|e| section(&key, "databend", e))?),
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
    let upsert_keys = match (s.mode, &s.key) {
        (Mode::Append, None) => None,
        (Mode::Append, Some(_)) => {
            return Err(err(key("key"), "only used with mode = \"upsert\""))
        }
        (Mode::Upsert, _) if kind == SinkKind::Parquet => {
            return Err(err(
                key("mode"),
                "plain Parquet tables cannot update rows; use kind = \"delta\" or \"databend\" for upserts",
            ))
        }
        (Mode::Upsert, Some(k)) if !k.is_empty() && k.iter().all(|c| !c.trim().is_empty()) => {
            Some(k.clone())
        }
        // Without `key`, each table's key columns are its message key's fields.
        (Mode::Upsert, None) => Some(Vec::new()),
        (Mode::Upsert, Some(_)) => {
            return Err(err(
                key("key"),
                "name the columns that identify a row, key = [\"id\"], or leave `key` out to \
                 take them from the message key",
            ))
        }
    };
    let keys_from_message = upsert_keys.as_ref().is_some_and(Vec::is_empty);
    let connect = s.json_envelope == JsonEnvelope::Connect;
    let delta = s.delta.validate().map_err(|e| section(&key, "delta", e))?;
    let parquet = s
        .parquet
        .validate()
        .map_err(|e| section(&key, "parquet", e))?;
    let template =
        sinks::routed::TableTemplate::parse(&s.table).map_err(|e| err(key("table"), e))?;
    if matches!(topics, TopicSelector::Regex { .. }) && !template.is_per_topic() && !s.shared_table
    {
        return Err(err(
            key("table"),
            "a topics_regex sink would write every topic it matches into this one table; add \
             {topic} (or {db}/{table} for Debezium topics) to give each topic its own table, or \
             set shared_table = true if the topics share one schema on purpose",
        ));
    }
    if s.shared_table && template.is_per_topic() {
        return Err(err(
            key("shared_table"),
            "the table template already gives each topic its own table",
        ));
    }
    if kind == SinkKind::Databend {
        if s.table.trim().is_empty() {
            return Err(err(
                key("table"),
                "the Databend table name (template) is empty",
            ));
        }
    } else {
        check_table_url(&s.table, &key("table"))?;
    }
    let partition_by = s
        .partition_by
        .iter()
        .map(|p| PartitionSpec::parse(p).map_err(|e| err(key("partition_by"), e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if s.flush.max_rows == 0 {
        return Err(err(key("flush.max_rows"), "must be at least 1"));
    }
    let flush = FlushTriggers {
        max_rows: s.flush.max_rows,
        max_bytes: parse_bytes(&s.flush.max_bytes).map_err(|e| err(key("flush.max_bytes"), e))?,
        max_latency: parse_duration(&s.flush.max_latency)
            .map_err(|e| err(key("flush.max_latency"), e))?,
    };
    let compression = s
        .compression
        .parse()
        .map_err(|e: String| err(key("compression"), e))?;
    let errors = match (s.errors, &s.dead_letter_topic) {
        (None, None) => ErrorPolicy::Fail,
        (None, Some(_)) => ErrorPolicy::DeadLetter,
        (Some(ErrorPolicy::DeadLetter), None) => {
            return Err(err(
                key("dead_letter_topic"),
                "required with errors = \"dead-letter\"",
            ))
        }
        (Some(policy), _) => policy,
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
    for (name, v) in [
        ("dead_letter_partitions", s.dead_letter_partitions),
        (
            "dead_letter_replication_factor",
            s.dead_letter_replication_factor,
        ),
    ] {
        match v {
            Some(n) if n < 1 => {
                return Err(err(key(name), format!("{n} is not a positive number")))
            }
            Some(_) if s.dead_letter_topic.is_none() => {
                return Err(err(key(name), "needs a dead_letter_topic"))
            }
            _ => {}
        }
    }
    let declared =
        |cols: &toml::Table, what: &str| -> Result<arrow::datatypes::SchemaRef, ConfigError> {
            let mut fields = Vec::with_capacity(cols.len());
            for (name, t) in cols {
                let t = t.as_str().ok_or_else(|| {
                    err(
                        key(&format!("{what}.{name}")),
                        "the type must be a string such as \"long\"",
                    )
                })?;
                let dt = parse_type(t).map_err(|e| err(key(&format!("{what}.{name}")), e))?;
                fields.push(arrow::datatypes::Field::new(name, dt, true));
            }
            if fields.is_empty() {
                return Err(err(key(what), "declare at least one column"));
            }
            Ok(std::sync::Arc::new(arrow::datatypes::Schema::new(fields)))
        };
    let key_format =
        match (s.key_format, &s.key_schema) {
            // Upserts keyed by the message key read it as Debezium writes it with the value.
            (None, None) if keys_from_message => {
                match s.format {
                    Format::DebeziumAvro => Some(KeyFormat::Avro),
                    Format::DebeziumJson | Format::Json if connect => Some(KeyFormat::ConnectJson),
                    _ => return Err(err(
                        key("key"),
                        "mode = \"upsert\" needs the columns that identify a row: key = [\"id\"], \
                     or key_format (the message key's encoding: \"avro\", \"string\", or \"json\" \
                     with key_schema) to take them from the message key",
                    )),
                }
            }
            (None, None) => None,
            (Some(KeyEncoding::Json), None) if connect => Some(KeyFormat::ConnectJson),
            (Some(KeyEncoding::String), None) => Some(KeyFormat::String),
            (Some(KeyEncoding::Json), Some(cols)) => {
                Some(KeyFormat::Json(declared(cols, "key_schema")?))
            }
            (Some(KeyEncoding::Json), None) => return Err(err(
                key("key_schema"),
                "key_format = \"json\" needs the key's fields, key_schema = { id = \"long\" }, \
                 unless keys carry their schema (json_envelope = \"connect\")",
            )),
            (Some(KeyEncoding::Avro), None) => {
                if registry.is_none() {
                    return Err(err(
                        key("key_format"),
                        "`avro` keys need a [schema_registry]",
                    ));
                }
                Some(KeyFormat::Avro)
            }
            (Some(_), Some(_)) | (None, Some(_)) => {
                return Err(err(
                    key("key_schema"),
                    "only key_format = \"json\" takes a key_schema",
                ))
            }
        };
    let mut tables = BTreeMap::new();
    for (topic, t) in &s.tables {
        let at = |f: &str| key(&format!("tables.\"{topic}\".{f}"));
        if !template.is_per_topic() {
            return Err(err(
                key("tables"),
                "per-table settings need a per-topic `table` template ({topic}, {db}/{table})",
            ));
        }
        if !topics.matches(topic) {
            return Err(err(
                key(&format!("tables.\"{topic}\"")),
                "this sink does not read that topic (check `topics` / `topics_regex`)",
            ));
        }
        if kind == SinkKind::Databend && t.partition_by.is_some() {
            return Err(err(
                at("partition_by"),
                "Databend tables are not partitioned by the sink; only `table` and `key` apply",
            ));
        }
        if let Some(table) = &t.table {
            match kind {
                SinkKind::Databend if table.trim().is_empty() => {
                    return Err(err(at("table"), "the Databend table name is empty"))
                }
                SinkKind::Databend => {}
                _ => check_table_url(table, &at("table"))?,
            }
            if table.contains('{') {
                return Err(err(
                    at("table"),
                    "one table's location takes no placeholders",
                ));
            }
        }
        let partition_by = match &t.partition_by {
            None => None,
            Some(specs) => Some(
                specs
                    .iter()
                    .map(|p| {
                        PartitionSpec::parse(p).map_err(|e| err(at("partition_by"), e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let upsert_keys = match (&t.key, s.mode) {
            (None, _) => None,
            (Some(_), Mode::Append) => {
                return Err(err(at("key"), "only used with mode = \"upsert\""))
            }
            (Some(k), Mode::Upsert) if !k.is_empty() && k.iter().all(|c| !c.trim().is_empty()) => {
                Some(k.clone())
            }
            (Some(_), Mode::Upsert) => {
                return Err(err(
                    at("key"),
                    "name the columns that identify a row: key = [\"id\"]",
                ))
            }
        };
        tables.insert(
            topic.clone(),
            TableSettings {
                table: t.table.clone(),
                partition_by,
                upsert_keys,
            },
        );
    }
    let json_schema = match &s.schema {
        Some(cols) if matches!(s.format, Format::Json | Format::DebeziumJson) => {
            Some(declared(cols, "schema")?)
        }
        Some(_) => {
            return Err(err(
                key("schema"),
                "only the JSON formats take a declared schema",
            ))
        }
        None => None,
    };
    Ok(ValidatedSink {
        name: s.name.clone(),
        topics,
        table: s.table.clone(),
        storage: s.storage.clone(),
        partition_by,
        tables,
        flush,
        compression,
        metadata: s.metadata,
        errors,
        dead_letter_topic: s.dead_letter_topic.clone(),
        dead_letter_exactly_once: s.dead_letter_exactly_once,
        dead_letter_partitions: s.dead_letter_partitions,
        dead_letter_replication_factor: s.dead_letter_replication_factor,
        format: s.format,
        json_schema,
        key_format,
        kind,
        upsert_keys,
        keys_from_message,
        databend,
        delta,
        parquet,
        connect_envelope: match s.json_envelope {
            JsonEnvelope::None => false,
            JsonEnvelope::Connect if matches!(s.format, Format::Json | Format::DebeziumJson) => {
                true
            }
            JsonEnvelope::Connect => {
                return Err(err(
                    key("json_envelope"),
                    "\"connect\" applies to the JSON formats only",
                ))
            }
        },
    })
}

/// A sink section's error under the sink's key path (`sink[0].delta.vacuum_retention`).
fn section(
    key: &dyn Fn(&str) -> String,
    name: &str,
    e: sinks::section::SectionError,
) -> ConfigError {
    err(key(&format!("{name}.{}", e.field)), e.reason)
}

/// Checks a Parquet or Delta table location (a template's placeholders are allowed).
fn check_table_url(table: &str, at: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(table).map_err(|e| {
        let shown = sinks::store::redact_url(table);
        err(
            at.to_string(),
            match e {
                url::ParseError::RelativeUrlWithoutBase => format!(
                    "`{shown}` has no scheme: write file:///abs/dir for a local directory (an \
                     absolute path), or s3://bucket/path, az://container/path, \
                     abfss://container@account.dfs.core.windows.net/path, gs://bucket/path"
                ),
                e => format!(
                    "`{shown}` is not a URL ({e}); write e.g. s3://bucket/path or file:///abs/dir"
                ),
            },
        )
    })?;
    if url.scheme() == "file" {
        if let Some(host) = url
            .host_str()
            .filter(|h| !h.is_empty() && *h != "localhost")
        {
            return Err(err(
                at.to_string(),
                format!(
                    "`{table}` names the host `{host}`, not a directory: a local path needs \
                     three slashes, file:///{host}{}",
                    url.path()
                ),
            ));
        }
    }
    if ![
        "file", "s3", "s3a", "az", "azure", "abfs", "abfss", "adl", "gs", "memory",
    ]
    .contains(&url.scheme())
    {
        return Err(err(
            at.to_string(),
            format!(
                "unsupported scheme `{}://`; use file://, s3://, az://, abfss:// or gs://",
                url.scheme()
            ),
        ));
    }
    if url.password().is_some()
        || !url.username().is_empty() && url.scheme() != "abfss" && url.scheme() != "abfs"
    {
        return Err(err(
            at.to_string(),
            "put credentials in the sink's `storage` table, not in the URL",
        ));
    }
    Ok(())
}
