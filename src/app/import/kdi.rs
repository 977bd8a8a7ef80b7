//! kafka-delta-ingest's command line (`kafka-delta-ingest ingest TOPIC TABLE [flags]`).

use super::{quote, Draft};

/// Whether `text` is a kafka-delta-ingest command line.
pub(super) fn is_command_line(text: &str) -> bool {
    let first = words(text).into_iter().next().unwrap_or_default();
    first.ends_with("kafka-delta-ingest") || first == "ingest"
}

/// Shell words: whitespace-separated, with '…' and "…" quoting and line continuations.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut started = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, '\\') if chars.peek() == Some(&'\n') => {
                chars.next();
            }
            (None, c) if c.is_whitespace() => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (None, c) => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    out
}

/// Translates `kafka-delta-ingest ingest TOPIC TABLE [flags]`.
pub(super) fn translate(text: &str, d: &mut Draft) -> anyhow::Result<()> {
    let mut args = words(text).into_iter().peekable();
    if args
        .peek()
        .is_some_and(|a| a.ends_with("kafka-delta-ingest"))
    {
        args.next();
    }
    if args.next().as_deref() != Some("ingest") {
        anyhow::bail!(
            "a kafka-delta-ingest command line starts with `kafka-delta-ingest ingest TOPIC TABLE`"
        );
    }
    d.from = "kafka-delta-ingest".into();
    let mut positional = Vec::new();
    let mut app_id = "kafka_delta_ingest".to_string();
    let mut flush = Vec::new();
    let mut transforms = Vec::new();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if !flag.starts_with('-') {
            positional.push(arg);
            continue;
        }
        let takes_value = !matches!(
            flag.as_str(),
            "-c" | "--checkpoints" | "-e" | "--ends_at_latest_offsets" | "--json" | "--avro"
        );
        let value = match (takes_value, inline) {
            (false, _) => String::new(),
            (true, Some(v)) => v,
            (true, None) => args
                .next()
                .ok_or_else(|| anyhow::anyhow!("`{flag}` needs a value"))?,
        };
        match flag.as_str() {
            "-k" | "--kafka" => d.bootstrap = Some(value),
            "-g" | "--consumer_group" => d.group_id = Some(value),
            "-a" | "--app_id" => app_id = value,
            "-l" | "--allowed_latency" => {
                flush.push(format!("max_latency = {}", quote(&format!("{value}s"))))
            }
            "-m" | "--max_messages_per_batch" => flush.push(format!("max_rows = {value}")),
            "-b" | "--min_bytes_per_file" => {
                d.delta
                    .push(("target_file_size".into(), quote(&format!("{value}B"))));
                d.note("`min_bytes_per_file` sizes files at write time in kafka-delta-ingest; lakesink writes one file per table partition per tick and merges small ones with `delta.auto_compact` towards `delta.target_file_size`");
            }
            "-t" | "--transform" => {
                transforms.push(value);
                // `-t` takes several values: the following words up to the next flag.
                while args.peek().is_some_and(|a| !a.starts_with('-')) && positional.len() >= 2 {
                    transforms.push(args.next().unwrap_or_default());
                }
            }
            "-K" | "--kafka_setting" => match value.split_once('=') {
                Some((k, v)) => d.kafka_properties.push((k.trim().into(), v.trim().into())),
                None => d.unmapped("--kafka_setting", format!("`{value}` is not KEY=VALUE")),
            },
            "-o" | "--auto_offset_reset" => {
                d.kafka_properties.push(("auto.offset.reset".into(), value))
            }
            "-c" | "--checkpoints" => {}
            "--json" => d.set("format", quote("json")),
            "--avro" => {
                d.set("format", quote("avro"));
                if !value.is_empty() {
                    d.registry_url = Some(value);
                }
            }
            "-s" | "--statsd_endpoint" => d.unmapped(
                &flag,
                "lakesink serves Prometheus metrics (`[http] listen`)",
            ),
            "--dlq_table_location" | "--dlq_transform" => d.unmapped(
                &flag,
                "undecodable records go to a dead-letter topic (`dead_letter_topic`), not a table",
            ),
            "--seek_offsets" => d.unmapped(
                &flag,
                "start positions come from the table (or `start_from_group`)",
            ),
            other => d.unmapped(other, format!("no lakesink equivalent (value `{value}`)")),
        }
    }
    let [topic, table] = positional.as_slice() else {
        anyhow::bail!("kafka-delta-ingest ingest needs TOPIC and TABLE, found {positional:?}");
    };
    d.name = topic
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    d.sink
        .insert(0, ("topics".into(), format!("[{}]", quote(topic))));
    d.set("kind", quote("delta"));
    let table = match table.split_once("://") {
        Some(_) => table.clone(),
        None if table.starts_with('/') => format!("file://{table}"),
        None => {
            let path = table.trim_start_matches("./");
            d.note(format!(
                "the table `{table}` was relative to kafka-delta-ingest's working directory: \
                 `table` must be an absolute `file://` URL; adjust `file:///{path}`"
            ));
            format!("file:///{path}")
        }
    };
    d.set("table", quote(&table));
    if !d.sink.iter().any(|(k, _)| k == "format") {
        d.set("format", quote("json"));
        d.todo.push((
            "kafka-delta-ingest took the JSON columns from the Delta table; lakesink needs them \
             declared (the table's columns and types), or `json_envelope = \"connect\"` for \
             Kafka Connect envelopes"
                .into(),
            "schema = { id = \"string\", ts = \"timestamp\" }".into(),
        ));
    }
    if !flush.is_empty() {
        d.set("flush", format!("{{ {} }}", flush.join(", ")));
    }
    // kafka-delta-ingest's positions are the table's txn versions under `<app_id>-<partition>`.
    let resume = format!("{app_id}-{{partition}}");
    d.delta.push(("resume_app_id".into(), quote(&resume)));
    d.note(format!(
        "lakesink resumes each partition from kafka-delta-ingest's txn version (`{resume}`) \
         where it has no position of its own; stop kafka-delta-ingest first"
    ));
    for t in transforms {
        d.unmapped("--transform", format!("`{t}`: transforms do not run in lakesink; `_kafka_offset`, `_kafka_partition`, `_kafka_topic` and `_kafka_timestamp` columns are written by default (`metadata`)"));
    }
    Ok(())
}
