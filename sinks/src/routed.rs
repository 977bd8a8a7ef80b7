//! One sink over many tables: a table location template (`abfss://lake@acct.dfs.core.windows.net/cdc/{db}/{table}`)
//! resolved per topic, one table per topic, each with its own commit protocol.
//!
//! Placeholders: `{topic}`; for Debezium topics (`<server>.<db or schema>.<table>`) `{server}`
//! (everything before the last two dot-separated parts), `{db}` and `{table}` (the last two).
//! A value from a topic name enters a path only if it is one plain path segment: non-empty,
//! made of `[A-Za-z0-9_.-]` (Kafka's own alphabet for topic names), and neither `.` nor `..`.
//! Anything else is refused with an error naming the topic, never escaped: percent-escapes are
//! decoded again on the way to a file or object path (`%2E%2E` is `..` to a URL parser, `%2F` a
//! separator to a local path), so escaping would reopen the hole it closes. Kafka refuses such
//! topic names anyway, so no real topic is refused; a template must not rely on that.
//!
//! Invariants:
//! - A topic's table is fixed by the template and the topic's name: every member of the group
//!   resolves the same table, so each table's commit protocol (its fence) works unchanged.
//! - Two topics never share a table through this router: a topic whose location equals another
//!   topic's up to letter case (which case-insensitive stores and readers would merge) is
//!   refused with an error naming both, and its partitions are not written.
//! - Nothing is created before a topic's first call: a new topic's table appears with its first
//!   flush (or recovery reads "no position").

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::{
    CommitOutcome, CommitStats, Error, Flush, Offset, Result, Sink, Staged, TopicIdentity,
    TopicPartition,
};

/// A table location with placeholders, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableTemplate {
    raw: String,
}

const PLACEHOLDERS: [&str; 4] = ["topic", "server", "db", "table"];

impl TableTemplate {
    /// Checks `raw`: every `{...}` is one of the known placeholders.
    pub fn parse(raw: &str) -> std::result::Result<Self, String> {
        let mut rest = raw;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("`{{` without a closing `}}` in `{raw}`"))?;
            let name = &after[..close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(format!(
                    "unknown placeholder `{{{name}}}`; use {{topic}}, {{server}}, {{db}} or {{table}}"
                ));
            }
            rest = &after[close + 1..];
        }
        Ok(Self { raw: raw.into() })
    }

    /// Whether the template names a table per topic (it has a placeholder).
    pub fn is_per_topic(&self) -> bool {
        self.raw.contains('{')
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The location of `topic`'s table.
    pub fn resolve(&self, topic: &str) -> std::result::Result<String, String> {
        let parts: Vec<&str> = topic.split('.').collect();
        let debezium = |what: &str| -> std::result::Result<String, String> {
            if parts.len() < 3 || parts.iter().any(|p| p.is_empty()) {
                return Err(format!(
                    "topic `{topic}` is not named `<server>.<db>.<table>`, so it has no \
                     {{{what}}}; use {{topic}} for such topics"
                ));
            }
            let n = parts.len();
            Ok(match what {
                "server" => parts[..n - 2].join("."),
                "db" => parts[n - 2].to_string(),
                _ => parts[n - 1].to_string(),
            })
        };
        let mut out = String::with_capacity(self.raw.len() + topic.len());
        let mut rest = self.raw.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').expect("checked by parse");
            let value = match &after[..close] {
                "topic" => topic.to_string(),
                other => debezium(other)?,
            };
            out.push_str(segment(&value, topic)?);
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// `value` (from `topic`'s name) if it is one plain path segment (see the module doc).
pub fn segment<'a>(value: &'a str, topic: &str) -> std::result::Result<&'a str, String> {
    let plain = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if plain {
        Ok(value)
    } else {
        Err(format!(
            "topic `{}` gives `{}` for the table template, which is not one plain path segment \
             ([A-Za-z0-9_.-], not `.` or `..`); it is not written",
            topic.escape_debug(),
            value.escape_debug()
        ))
    }
}

/// Makes the sink of one topic's table: `(topic, location)`.
pub type MakeTable<S> = Box<dyn Fn(&str, &str) -> Result<S> + Send + Sync>;

/// A sink writing each topic to its own table (see the module doc).
pub struct Routed<S: Sink> {
    template: TableTemplate,
    location: String,
    make: MakeTable<S>,
    /// Topics whose table is named explicitly instead of by the template.
    fixed: HashMap<String, String>,
    state: Mutex<Tables<S>>,
}

struct Tables<S> {
    /// Each topic's table.
    by_topic: HashMap<String, Arc<S>>,
    /// Each resolved location, lower-cased, and the topic it belongs to.
    claimed: HashMap<String, String>,
}

impl<S: Sink> fmt::Debug for Routed<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.state.lock().map_or(0, |s| s.by_topic.len());
        write!(f, "Routed({}, {n} tables)", self.location)
    }
}

impl<S: Sink> Routed<S> {
    /// A router over `template`; `make` builds the sink of one resolved location (nothing is
    /// built before a topic's first call). `location` is the template for messages, without
    /// credentials.
    pub fn new(template: TableTemplate, location: String, make: MakeTable<S>) -> Self {
        Self {
            template,
            location,
            make,
            fixed: HashMap::new(),
            state: Mutex::new(Tables {
                by_topic: HashMap::new(),
                claimed: HashMap::new(),
            }),
        }
    }

    /// `topic`'s table is at `location`, not where the template puts it.
    pub fn with_location(mut self, topic: &str, location: &str) -> Self {
        self.fixed.insert(topic.into(), location.into());
        self
    }

    /// The tables opened so far, by topic.
    pub fn tables(&self) -> Vec<(String, Arc<S>)> {
        let s = self.state.lock().expect("routed tables");
        let mut v: Vec<_> = s
            .by_topic
            .iter()
            .map(|(t, s)| (t.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// `topic`'s table, opened on first use.
    pub fn table(&self, topic: &str) -> Result<Arc<S>> {
        let mut s = self.state.lock().expect("routed tables");
        if let Some(t) = s.by_topic.get(topic) {
            return Ok(t.clone());
        }
        let location = match self.fixed.get(topic) {
            Some(l) => l.clone(),
            None => self
                .template
                .resolve(topic)
                .map_err(|reason| Error::Location {
                    location: self.location.clone(),
                    reason,
                })?,
        };
        let key = location.to_lowercase();
        if let Some(other) = s.claimed.get(&key) {
            return Err(Error::Location {
                location: crate::store::redact_url(&location),
                reason: format!(
                    "topics `{other}` and `{topic}` would share this table (their locations \
                     differ at most in letter case, which case-insensitive stores and readers \
                     merge); rename one topic or give the template a placeholder that tells \
                     them apart. `{topic}` is not written"
                ),
            });
        }
        let table = Arc::new((self.make)(topic, &location)?);
        tracing::info!(template = %self.location, topic, table = %table.location(),
                       "a table of its own for topic `{topic}`");
        s.claimed.insert(key, topic.to_string());
        s.by_topic.insert(topic.to_string(), table.clone());
        Ok(table)
    }
}

#[async_trait::async_trait]
impl<S: Sink> Sink for Routed<S> {
    type Data = S::Data;

    async fn recover(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        self.table(&tp.topic)?.recover(tp).await
    }

    async fn committed(&self, tp: &TopicPartition) -> Result<Option<Offset>> {
        self.table(&tp.topic)?.committed(tp).await
    }

    async fn last_commit(&self, tp: &TopicPartition) -> Result<Option<crate::LastCommit>> {
        self.table(&tp.topic)?.last_commit(tp).await
    }

    async fn stage(&self, flush: Flush) -> Result<Staged<S::Data>> {
        let table = self.table(&flush.tp.topic)?;
        table.stage(flush).await
    }

    async fn commit(&self, staged: &Staged<S::Data>) -> Result<(CommitOutcome, CommitStats)> {
        self.table(&staged.tp.topic)?.commit(staged).await
    }

    fn retained_bytes(&self, staged: &Staged<S::Data>) -> usize {
        self.table(&staged.tp.topic)
            .map_or(0, |t| t.retained_bytes(staged))
    }

    async fn adopt_topic_id(&self, topic: &str, topic_id: &str) -> Result<TopicIdentity> {
        self.table(topic)?.adopt_topic_id(topic, topic_id).await
    }

    async fn settle(&self, within: std::time::Duration) {
        let tables: Vec<Arc<S>> = self
            .state
            .lock()
            .map(|s| s.by_topic.values().cloned().collect())
            .unwrap_or_default();
        let until = std::time::Instant::now() + within;
        for t in tables {
            t.settle(until.saturating_duration_since(std::time::Instant::now()))
                .await;
        }
    }

    /// Checks every table opened so far; before the first, a table at the template's fixed
    /// part (the location up to its first placeholder), which says whether the store answers
    /// and takes writes.
    async fn check(&self) -> Result<()> {
        let open = self.tables();
        if open.is_empty() {
            let root = self
                .template
                .as_str()
                .split('{')
                .next()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string();
            return (self.make)("", &format!("{root}/_lakesink_check"))?
                .check()
                .await;
        }
        for (_, t) in open {
            t.check().await?;
        }
        Ok(())
    }

    fn location(&self) -> &str {
        &self.location
    }

    fn table_of(&self, topic: &str) -> String {
        match self.fixed.get(topic) {
            Some(l) => crate::store::redact_url(l),
            None => self.template.resolve(topic).map_or_else(
                |why| format!("{} (no table: {why})", self.location),
                |l| crate::store::redact_url(&l),
            ),
        }
    }
}

#[cfg(test)]
mod tests;
