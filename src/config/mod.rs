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

mod kafka;
mod raw;
mod secret;
mod sink;
mod types;
mod validated;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;

pub use raw::*;
pub use secret::{is_secret_key, Secret};
pub use sinks::units::{parse_bytes, parse_duration};
pub use types::parse_type;
pub use validated::*;

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

impl Config {
    /// Checks values and cross-field rules (phase 2); every error names the key path.
    pub fn validate(self) -> Result<ValidatedConfig, ConfigError> {
        let k = &self.kafka;
        let (props, msk_iam_region) = kafka::validate_kafka(k)?;
        let registry = kafka::validate_registry(self.schema_registry.as_ref())?;

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
            let checked = sink::validate_sink(i, s, registry.as_ref(), &sinks)?;
            sinks.push(checked);
        }
        Ok(ValidatedConfig {
            bootstrap_servers: k.bootstrap_servers.clone(),
            group_id: k.group_id.clone(),
            start_from_group: match k.start_from_group.as_deref().map(str::trim) {
                Some("") => {
                    return Err(err(
                        "kafka.start_from_group",
                        "is empty: name the consumer group to start from (a Kafka Connect \
                         sink's is `connect-<connector name>`), or remove the key",
                    ))
                }
                other => other.map(str::to_string),
            },
            kafka_properties: props,
            registry,
            max_buffer_bytes,
            pack_buffers: p.pack_buffers,
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

#[cfg(test)]
mod tests;
