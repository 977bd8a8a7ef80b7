//! Where a Connect sink writes, in lakesink terms: the object-store sinks' bucket, layout,
//! rotation and partitioner, and databend-kafka-connect's database, table and insert mode.

use std::collections::BTreeMap;

use super::{quote, Draft};

/// The object store of a Confluent storage sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Store {
    S3,
    Gcs,
    Adls,
}

/// Milliseconds as a lakesink duration.
fn duration(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// The table location, credentials, file rotation and partitioning of an object-store sink.
pub(super) fn storage(
    cfg: &mut BTreeMap<String, String>,
    d: &mut Draft,
    store: Store,
) -> anyhow::Result<()> {
    let topics_dir = cfg.remove("topics.dir").unwrap_or_else(|| "topics".into());
    let topics_dir = topics_dir.trim_matches('/').to_string();
    let base = match store {
        Store::S3 => {
            let bucket = cfg.remove("s3.bucket.name").ok_or_else(|| {
                anyhow::anyhow!("`s3.bucket.name` is not set: the S3 sink needs a bucket")
            })?;
            let region = cfg.remove("s3.region").unwrap_or_else(|| {
                d.note("`s3.region` is not set: Connect's default, us-west-2, is used");
                "us-west-2".into()
            });
            d.storage.push(("region".into(), quote(&region)));
            if let Some(url) = cfg.remove("store.url") {
                if url.starts_with("http://") {
                    d.storage.push(("allow_http".into(), quote("true")));
                }
                d.storage.push(("endpoint".into(), quote(&url)));
            }
            if cfg.remove("s3.path.style.access.enabled").as_deref() == Some("false") {
                d.storage
                    .push(("virtual_hosted_style_request".into(), quote("true")));
            }
            let key = cfg.remove("aws.access.key.id");
            let secret = cfg.remove("aws.secret.access.key");
            if key.is_some() || secret.is_some() {
                let v = d.secret("AWS_ACCESS_KEY_ID", "the S3 access key id");
                d.storage.push(("access_key_id".into(), v));
                let v = d.secret("AWS_SECRET_ACCESS_KEY", "the S3 secret access key");
                d.storage.push(("secret_access_key".into(), v));
            } else {
                d.note("no S3 keys are set: lakesink signs with the AWS SDK's default credential chain, as the connector did");
            }
            format!("s3://{bucket}")
        }
        Store::Gcs => {
            let bucket = cfg.remove("gcs.bucket.name").ok_or_else(|| {
                anyhow::anyhow!("`gcs.bucket.name` is not set: the GCS sink needs a bucket")
            })?;
            if let Some(path) = cfg.remove("gcs.credentials.path") {
                d.storage
                    .push(("service_account_path".into(), quote(&path)));
            }
            if cfg.remove("gcs.credentials.json").is_some()
                || cfg.remove("gcs.credentials.config").is_some()
            {
                let v = d.secret("GCS_SERVICE_ACCOUNT_KEY", "the service account's JSON key");
                d.storage.push(("service_account_key".into(), v));
            }
            format!("gs://{bucket}")
        }
        Store::Adls => {
            let account = cfg
                .remove("azure.datalake.gen2.account.name")
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "`azure.datalake.gen2.account.name` is not set: the ADLS Gen2 sink needs \
                     a storage account"
                    )
                })?;
            if cfg.remove("azure.datalake.gen2.access.key").is_some() {
                let v = d.secret(
                    "AZURE_STORAGE_ACCOUNT_KEY",
                    "the storage account's access key",
                );
                d.storage.push(("access_key".into(), v));
            }
            if let Some(id) = cfg.remove("azure.datalake.gen2.client.id") {
                d.storage.push(("client_id".into(), quote(&id)));
            }
            if cfg.remove("azure.datalake.gen2.client.key").is_some() {
                let v = d.secret(
                    "AZURE_CLIENT_SECRET",
                    "the service principal's client secret",
                );
                d.storage.push(("client_secret".into(), v));
            }
            if let Some(endpoint) = cfg.remove("azure.datalake.gen2.token.endpoint") {
                // https://login.microsoftonline.com/<tenant>/oauth2/token
                match endpoint.split('/').nth(3).filter(|t| !t.is_empty()) {
                    Some(tenant) => d.storage.push(("tenant_id".into(), quote(tenant))),
                    None => d.unmapped(
                        "azure.datalake.gen2.token.endpoint",
                        "not a Microsoft Entra token endpoint with a tenant; set `storage.tenant_id`",
                    ),
                }
            }
            // The connector writes into the file system named by the first segment of
            // `topics.dir`, below the rest of it.
            let (fs, rest) = topics_dir.split_once('/').unwrap_or((&topics_dir, ""));
            let url = format!("abfss://{fs}@{account}.dfs.core.windows.net");
            let base = match rest {
                "" => url,
                rest => format!("{url}/{rest}"),
            };
            return finish(cfg, d, base);
        }
    };
    let base = match topics_dir.as_str() {
        "" => base,
        dir => format!("{base}/{dir}"),
    };
    finish(cfg, d, base)
}

/// The table, the file format and rotation, and the partitioner.
fn finish(cfg: &mut BTreeMap<String, String>, d: &mut Draft, base: String) -> anyhow::Result<()> {
    let format = cfg
        .remove("format.class")
        .or_else(|| cfg.remove("output.data.format"))
        .unwrap_or_default();
    let parquet = format.ends_with("ParquetFormat") || format == "PARQUET";
    d.set("kind", quote("parquet"));
    let leaf = match &d.single_topic {
        Some(t) => t.clone(),
        None => "{topic}".into(),
    };
    let table = match parquet {
        // Beside the connector's Parquet files: one dataset for directory readers.
        true => format!("{base}/{leaf}"),
        false => format!("{base}/lakesink/{leaf}"),
    };
    d.set("table", quote(&table));
    if !parquet {
        d.note(format!(
            "the connector wrote `{format}` files; lakesink writes Parquet with commit markers \
             (or a Delta Lake table with `kind = \"delta\"`), into a table of its own beside \
             them"
        ));
    } else {
        d.note(
            "the table is the connector's topic directory: lakesink's files and its `_lakesink/` \
             commit records go beside the connector's; readers that follow lakesink's markers \
             see only lakesink's",
        );
    }
    if let Some(codec) = cfg.remove("parquet.codec") {
        match codec.as_str() {
            "snappy" | "zstd" | "lz4" | "none" => d.set("compression", quote(&codec)),
            "uncompressed" => d.set("compression", quote("none")),
            other => d.unmapped(
                "parquet.codec",
                format!("`{other}` is not one of lakesink's codecs (none, snappy, zstd, lz4); snappy is used"),
            ),
        }
    }
    for key in [
        "s3.compression.type",
        "gcs.compression.type",
        "avro.codec",
        "az.compression.type",
    ] {
        if cfg.remove(key).is_some() {
            d.unmapped(key, "lakesink writes Parquet; its codec is `compression`");
        }
    }
    rotation(cfg, d);
    partitioner(cfg, d);
    Ok(())
}

/// `flush.size`, `rotate.interval.ms` and `rotate.schedule.interval.ms` to `flush`.
fn rotation(cfg: &mut BTreeMap<String, String>, d: &mut Draft) {
    let mut flush = Vec::new();
    if let Some(n) = cfg.remove("flush.size") {
        flush.push(format!("max_rows = {n}"));
    }
    let interval = cfg
        .remove("rotate.interval.ms")
        .and_then(|v| v.parse::<i64>().ok());
    let schedule = cfg
        .remove("rotate.schedule.interval.ms")
        .and_then(|v| v.parse::<i64>().ok());
    let latency = [interval, schedule]
        .into_iter()
        .flatten()
        .filter(|v| *v > 0)
        .min();
    if let Some(ms) = latency {
        flush.push(format!("max_latency = {}", quote(&duration(ms as u64))));
        d.note(
            "`max_latency` is wall-clock time on a grid every member shares, not the records' \
             timestamps as `rotate.interval.ms` is: a quiet partition is committed on time",
        );
    }
    if !flush.is_empty() {
        d.set("flush", format!("{{ {} }}", flush.join(", ")));
    }
}

/// The partitioner to `partition_by`.
fn partitioner(cfg: &mut BTreeMap<String, String>, d: &mut Draft) {
    let class = cfg.remove("partitioner.class").unwrap_or_default();
    let interval = cfg.remove("time.interval");
    let path_format = cfg.remove("path.format");
    let short = class.rsplit('.').next().unwrap_or_default().to_string();
    let extractor = cfg.remove("timestamp.extractor");
    let field = cfg.remove("timestamp.field");
    let column = match (extractor.as_deref(), field) {
        (Some("RecordField"), Some(f)) => f,
        (Some("Wallclock"), _) => {
            d.note("the Wallclock extractor has no lakesink equivalent: the time partitions follow each record's Kafka timestamp");
            "_kafka_timestamp".into()
        }
        _ => "_kafka_timestamp".into(),
    };
    let hourly = match (short.as_str(), interval.as_deref()) {
        ("HourlyPartitioner", _) | (_, Some("HOURLY")) => Some(true),
        ("DailyPartitioner", _) | (_, Some("DAILY")) => Some(false),
        ("TimeBasedPartitioner", _) => {
            Some(path_format.as_deref().is_some_and(|p| p.contains("HH")))
        }
        _ => None,
    };
    let spec = match (short.as_str(), hourly) {
        (_, Some(hourly)) => {
            let f = if hourly { "hour" } else { "day" };
            if let Some(p) = &path_format {
                d.note(format!(
                    "`path.format` `{p}` becomes lakesink's `{f}=` directories (`day=2026-11-21`, `hour=2026-11-21-13`)"
                ));
            }
            Some(format!("[{}]", quote(&format!("{f}({column})"))))
        }
        ("FieldPartitioner", _) => {
            let fields = cfg.remove("partition.field.name").unwrap_or_default();
            let list: Vec<String> = fields
                .split(',')
                .map(|f| f.trim())
                .filter(|f| !f.is_empty())
                .map(quote)
                .collect();
            Some(format!("[{}]", list.join(", ")))
        }
        ("DefaultPartitioner" | "", _) => {
            d.note("Connect's `partition=<n>` directories become `_kafka_partition=<n>`");
            Some(format!("[{}]", quote("_kafka_partition")))
        }
        _ => {
            d.unmapped(
                "partitioner.class",
                format!("`{class}` has no lakesink equivalent; the table is not partitioned"),
            );
            None
        }
    };
    if let Some(spec) = spec {
        d.set("partition_by", spec);
    }
    if let Some(tz) = cfg.remove("timezone") {
        if !matches!(tz.as_str(), "UTC" | "Etc/UTC" | "GMT") {
            d.unmapped(
                "timezone",
                format!("`{tz}`: lakesink's day and hour partitions are UTC"),
            );
        }
    }
    for key in ["locale", "partition.duration.ms", "timestamp.unit"] {
        if cfg.remove(key).is_some() {
            d.unmapped(key, "lakesink's time partitions are UTC days or hours");
        }
    }
}

/// databend-kafka-connect: the database, the table names and the insert mode.
pub(super) fn databend(cfg: &mut BTreeMap<String, String>, d: &mut Draft) -> anyhow::Result<()> {
    d.set("kind", quote("databend"));
    let url = cfg.remove("connection.url").ok_or_else(|| {
        anyhow::anyhow!("`connection.url` is not set: the Databend sink needs the server")
    })?;
    let rest = url
        .strip_prefix("jdbc:databend://")
        .ok_or_else(|| anyhow::anyhow!("connection.url `{url}` is not a jdbc:databend:// URL"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let ssl = cfg.remove("connection.ssl").as_deref() == Some("true")
        || query.contains("sslmode=enable")
        || query.contains("ssl=true");
    let database = cfg
        .remove("connection.database")
        .or_else(|| (!path.is_empty()).then(|| path.to_string()))
        .unwrap_or_else(|| "default".into());
    let scheme = if ssl { "https" } else { "http" };
    d.databend.push((
        "url".into(),
        quote(&format!("{scheme}://{authority}/{database}")),
    ));
    if let Some(user) = cfg
        .remove("connection.user")
        .or_else(|| cfg.remove("connection.username"))
    {
        d.databend.push(("user".into(), quote(&user)));
    }
    if cfg.remove("connection.password").is_some() {
        let v = d.secret("DATABEND_PASSWORD", "the Databend user's password");
        d.databend.push(("password".into(), v));
    }
    let format = cfg
        .remove("table.name.format")
        .unwrap_or_else(|| "${topic}".into());
    let template = format.replace("${topic}", "{topic}");
    let template = template
        .strip_prefix(&format!("{database}."))
        .map(str::to_string)
        .unwrap_or(template);
    if template.contains('.') {
        d.unmapped(
            "table.name.format",
            format!("`{format}` names another database; lakesink loads into `{database}`"),
        );
    }
    d.set("table", quote(&template));
    if let Some(n) = cfg.remove("batch.size") {
        d.set("flush", format!("{{ max_rows = {n} }}"));
        d.note("`batch.size` rows were one INSERT; lakesink loads each flush in one transaction, fenced by its offsets");
    }
    let mode = cfg.remove("insert.mode").unwrap_or_else(|| "insert".into());
    let pk_mode = cfg.remove("pk.mode");
    let pk_fields = cfg.remove("pk.fields");
    if mode.eq_ignore_ascii_case("upsert") {
        d.set("mode", quote("upsert"));
        match (pk_mode.as_deref(), pk_fields) {
            (Some("record_key") | None, _) => {
                d.note("upserts key on the message key's fields (Debezium's primary key)")
            }
            (_, Some(fields)) => {
                let list: Vec<String> = fields.split(',').map(|f| quote(f.trim())).collect();
                d.set("key", format!("[{}]", list.join(", ")));
            }
            (Some(other), None) => d.unmapped(
                "pk.mode",
                format!("`{other}` without `pk.fields`: upserts key on the message key"),
            ),
        }
    } else if pk_fields.is_some() || pk_mode.is_some() {
        d.unmapped("pk.fields", "only upserts use a key");
    }
    for key in ["auto.create", "auto.evolve"] {
        if cfg.remove(key).as_deref() == Some("false") {
            d.note(format!(
                "`{key}=false`: lakesink creates missing tables and adds new columns itself"
            ));
        }
    }
    if cfg.remove("delete.enabled").is_some() {
        d.unmapped(
            "delete.enabled",
            "upserts delete a key on a tombstone or a Debezium delete",
        );
    }
    Ok(())
}
