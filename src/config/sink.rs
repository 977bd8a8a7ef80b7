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
                format!("unknown format `{other}`; use avro, debezium-avro, json or debezium-json"),
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
            || !url.username().is_empty() && url.scheme() != "abfss" && url.scheme() != "abfs"
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
    let key_format = match (s.key_format.as_deref(), &s.key_schema) {
        (None, None) => None,
        (Some("string"), None) => Some(KeyFormat::String),
        (Some("json"), Some(cols)) => Some(KeyFormat::Json(declared(cols, "key_schema")?)),
        (Some("json"), None) => {
            return Err(err(
                key("key_schema"),
                "key_format = \"json\" needs the key's fields: key_schema = { id = \"long\" }",
            ))
        }
        (Some("avro"), None) => {
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
        (Some(other), None) => {
            return Err(err(
                key("key_format"),
                format!("unknown key format `{other}`; use string, json or avro"),
            ))
        }
    };
    let json_schema = match &s.schema {
        Some(cols) if s.format == "json" || s.format == "debezium-json" => {
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
    })
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
