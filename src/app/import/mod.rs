//! `lakesink import-connect`: a Kafka Connect sink's configuration (or kafka-delta-ingest's
//! command line) translated into lakesink TOML.
//!
//! Input: the JSON body of the Connect REST API (`{"name": ..., "config": {...}}`, or the config
//! object alone), a `.properties` file, or a `kafka-delta-ingest ingest ...` command line. The
//! connectors read: Confluent's S3, GCS and Azure Data Lake Storage Gen2 sinks (self-managed
//! class names and Confluent Cloud's), databend-kafka-connect, and kafka-delta-ingest.
//!
//! Invariants:
//! - Every input key is either mapped or listed in the output with the reason it is not
//!   ([`Draft::unmapped`]); nothing is dropped silently.
//! - A secret is never copied: credentials become `${ENV}` references, and the output names the
//!   variables to set.
//! - The output passes config validation once those variables are set (a test keeps it so).

mod connect;
mod kdi;
mod targets;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What the translation produced: lakesink TOML, with the keys it could not map as comments.
#[derive(Debug, Default)]
pub struct Draft {
    /// Where the input came from (its file name), for the header.
    pub source: String,
    /// What the input configured (the connector class, or kafka-delta-ingest).
    pub from: String,
    pub name: String,
    /// The topics: one (its name), or several / a pattern (tables by `{topic}`).
    pub single_topic: Option<String>,
    pub multi_topic: bool,
    pub bootstrap: Option<String>,
    pub group_id: Option<String>,
    /// The consumer group whose committed offsets the sink starts from (the connector's own).
    pub start_from_group: Option<String>,
    pub kafka_properties: Vec<(String, String)>,
    pub registry_url: Option<String>,
    pub registry_auth: bool,
    /// `[[sink]]` keys and their TOML values, in order.
    pub sink: Vec<(String, String)>,
    /// `storage = { ... }` entries (TOML values).
    pub storage: Vec<(String, String)>,
    /// `databend = { ... }` entries (TOML values).
    pub databend: Vec<(String, String)>,
    /// `delta = { ... }` entries (TOML values).
    pub delta: Vec<(String, String)>,
    /// Input keys with no lakesink equivalent, and why.
    pub unmapped: Vec<(String, String)>,
    /// What behaves differently after the move.
    pub notes: Vec<String>,
    /// Environment variables the output reads, and what each holds.
    pub env: Vec<(String, String)>,
    /// Sink keys the input cannot give, to be filled in before the config is used: (why,
    /// a commented-out example line).
    pub todo: Vec<(String, String)>,
}

impl Draft {
    fn set(&mut self, key: &str, value: String) {
        self.sink.retain(|(k, _)| k != key);
        self.sink.push((key.to_string(), value));
    }
    fn unmapped(&mut self, key: &str, why: impl Into<String>) {
        self.unmapped.push((key.to_string(), why.into()));
    }
    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }
    /// A `${VAR}` reference for a secret the input held (never the secret itself).
    fn secret(&mut self, var: &str, what: &str) -> String {
        if !self.env.iter().any(|(v, _)| v == var) {
            self.env.push((var.to_string(), what.to_string()));
        }
        quote(&format!("${{{var}}}"))
    }

    /// The TOML text: a header naming what was read, the variables to set, every key not
    /// mapped and what behaves differently; then the config.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# lakesink config imported from {} ({}) by `lakesink import-connect`.",
            self.source, self.from
        );
        if !self.env.is_empty() {
            out.push_str(
                "#\n# Set these environment variables (the input's secrets are not copied):\n",
            );
            for (var, what) in &self.env {
                let _ = writeln!(out, "#   {var}: {what}");
            }
        }
        if !self.unmapped.is_empty() {
            out.push_str("#\n# Not mapped:\n");
            for (key, why) in &self.unmapped {
                let _ = writeln!(out, "#   {key}: {why}");
            }
        }
        if !self.notes.is_empty() {
            out.push_str("#\n# Differences to know:\n");
            for n in &self.notes {
                let _ = writeln!(out, "#   - {n}");
            }
        }
        out.push_str("\n[kafka]\n");
        let bootstrap = self
            .bootstrap
            .clone()
            .map_or_else(|| quote("${KAFKA_BOOTSTRAP_SERVERS}"), |b| quote(&b));
        let _ = writeln!(out, "bootstrap_servers = {bootstrap}");
        let group = self
            .group_id
            .clone()
            .unwrap_or_else(|| format!("lakesink-{}", self.name));
        let _ = writeln!(out, "group_id = {}", quote(&group));
        if let Some(g) = &self.start_from_group {
            let _ = writeln!(out, "start_from_group = {}", quote(g));
        }
        if !self.kafka_properties.is_empty() {
            let _ = writeln!(out, "properties = {}", inline(&self.kafka_properties));
        }
        if let Some(url) = &self.registry_url {
            out.push_str("\n[schema_registry]\n");
            let _ = writeln!(out, "url = {}", quote(url));
            if self.registry_auth {
                out.push_str(
                    "basic_auth = { username = \"${SCHEMA_REGISTRY_KEY}\", password = \
                     \"${SCHEMA_REGISTRY_SECRET}\" }\n",
                );
            }
        }
        out.push_str("\n[[sink]]\n");
        let _ = writeln!(out, "name = {}", quote(&self.name));
        for (k, v) in &self.sink {
            let _ = writeln!(out, "{k} = {v}");
        }
        if !self.storage.is_empty() {
            let _ = writeln!(out, "storage = {}", inline_raw(&self.storage));
        }
        if !self.databend.is_empty() {
            let _ = writeln!(out, "databend = {}", inline_raw(&self.databend));
        }
        if !self.delta.is_empty() {
            let _ = writeln!(out, "delta = {}", inline_raw(&self.delta));
        }
        for (why, example) in &self.todo {
            let _ = writeln!(out, "# TO FILL IN: {why}\n# {example}");
        }
        out
    }
}

/// `s` as a TOML string.
pub(crate) fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A TOML inline table of string values.
fn inline(entries: &[(String, String)]) -> String {
    let quoted: Vec<(String, String)> =
        entries.iter().map(|(k, v)| (k.clone(), quote(v))).collect();
    inline_raw(&quoted)
}

/// A TOML inline table of values already in TOML form; keys quoted where they must be.
fn inline_raw(entries: &[(String, String)]) -> String {
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| {
            let bare = k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            match bare {
                true => format!("{k} = {v}"),
                false => format!("{} = {v}", quote(k)),
            }
        })
        .collect();
    format!("{{ {} }}", body.join(", "))
}

/// Translates the input text (`source` names it in the output).
pub fn translate(text: &str, source: &str) -> anyhow::Result<Draft> {
    let trimmed = text.trim_start();
    let mut draft = Draft {
        source: source.to_string(),
        ..Default::default()
    };
    if trimmed.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{source}: not valid JSON: {e}"))?;
        let (name, config) = match value.get("config") {
            Some(c) => (value.get("name").and_then(|n| n.as_str()), c),
            None => (None, &value),
        };
        let object = config
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("{source}: the connector config is not an object"))?;
        let mut map = BTreeMap::new();
        for (k, v) in object {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            map.insert(k.clone(), v);
        }
        if let Some(n) = name {
            map.entry("name".into()).or_insert_with(|| n.to_string());
        }
        connect::translate(map, &mut draft)?;
    } else if kdi::is_command_line(trimmed) {
        kdi::translate(trimmed, &mut draft)?;
    } else {
        connect::translate(properties(text), &mut draft)?;
    }
    Ok(draft)
}

/// A Java `.properties` file's entries (`key=value` or `key: value`, `#`/`!` comments, lines
/// continued with a trailing backslash).
fn properties(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim_start();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with('!'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            continue;
        }
        pending.push_str(line);
        let entry = std::mem::take(&mut pending);
        let split = entry.find(['=', ':']).unwrap_or(entry.len());
        let (k, v) = entry.split_at(split);
        let v = v.get(1..).unwrap_or("");
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    out
}
