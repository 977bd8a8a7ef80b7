//! The partitions' recorded positions (txn versions by app id), remembered in memory for one
//! table version and carried forward by reading only the log entries written since, all at once.
//!
//! deltalake answers a txn lookup by replaying the table's log from storage for that one app id
//! (delta-kernel's `get_app_id_version`): on an object store, each commit's fence check then cost
//! a round of requests per partition it carried, one after the other, between reading the
//! table's version and writing the next entry, which is the window in which other members' commits
//! make ours lose its race (BENCHMARKS.md, "Commit contention"). With this cache a fence check
//! costs one parallel read of the entries since the last check, and nothing when there are none.
//!
//! Invariants:
//! - The cache is valid for exactly one table version: it is used only after it has been carried
//!   to the loaded snapshot's version by reading every entry in between; an entry that cannot be
//!   read, or a gap too large, empties it (lookups then go to deltalake, and are remembered).
//! - A txn version is only ever learnt from the log (an entry read, or deltalake's lookup), never
//!   from a commit this process believes it made.
//! - Tables with `delta.setTransactionRetentionDuration` (txns that expire) are not cached.

use std::collections::HashMap;

use deltalake::DeltaTable;
use futures::StreamExt as _;

use super::*;

/// The most log entries read to carry the cache forward; a larger gap starts afresh.
const MAX_GAP: u64 = 1_000;
/// Log entries read at once.
const READS_AT_ONCE: usize = 64;

/// What one table version's log says about app ids looked up so far.
#[derive(Debug, Default)]
pub(super) struct TxnCache {
    version: Option<u64>,
    /// App id → its txn version (`None`: none recorded).
    known: HashMap<String, Option<i64>>,
}

impl DeltaSink {
    /// `app_id`'s txn version in the loaded table (see the module docs).
    pub(super) async fn txn_version(
        &self,
        table: &DeltaTable,
        app_id: &str,
    ) -> Result<Option<i64>> {
        let snapshot = table.snapshot().map_err(|e| self.err("snapshot", e))?;
        let cacheable = !snapshot
            .metadata()
            .configuration()
            .contains_key("delta.setTransactionRetentionDuration");
        let version = table.version();
        if cacheable {
            if let Some(version) = version {
                self.carry_txns(table, version).await;
                let cache = self.txns.lock().expect("poisoned");
                if cache.version == Some(version) {
                    if let Some(known) = cache.known.get(app_id) {
                        return Ok(*known);
                    }
                }
            }
        }
        let found = snapshot
            .transaction_version(table.log_store().as_ref(), app_id)
            .await
            .map_err(|e| self.err("read txn", e))?;
        if cacheable {
            let mut cache = self.txns.lock().expect("poisoned");
            if cache.version == version {
                cache.known.insert(app_id.to_string(), found);
            }
        }
        Ok(found)
    }

    /// Carries the cache to `version` by reading the entries written since its own, or starts it
    /// afresh at `version`.
    async fn carry_txns(&self, table: &DeltaTable, version: u64) {
        let from = {
            let mut cache = self.txns.lock().expect("poisoned");
            match cache.version {
                Some(v) if v == version => return,
                Some(v) if v < version && version - v <= MAX_GAP => v,
                _ => {
                    *cache = TxnCache {
                        version: Some(version),
                        known: HashMap::new(),
                    };
                    return;
                }
            }
        };
        let log = table.log_store();
        let entries: Vec<_> = futures::stream::iter(from + 1..=version)
            .map(|v| {
                let log = log.clone();
                async move { log.read_commit_entry(v).await }
            })
            .buffered(READS_AT_ONCE)
            .collect()
            .await;
        let mut learnt = HashMap::new();
        for entry in entries {
            let Ok(Some(bytes)) = entry else {
                // A gap in what we can read: start afresh.
                let mut cache = self.txns.lock().expect("poisoned");
                *cache = TxnCache {
                    version: Some(version),
                    known: HashMap::new(),
                };
                return;
            };
            for (app_id, txn) in txns_in(&bytes) {
                learnt.insert(app_id, txn);
            }
        }
        let mut cache = self.txns.lock().expect("poisoned");
        if cache.version != Some(from) {
            return;
        }
        cache.version = Some(version);
        for (app_id, txn) in learnt {
            cache.known.insert(app_id, Some(txn));
        }
    }
}

/// The txn actions of one commit entry, in order.
fn txns_in(entry: &[u8]) -> Vec<(String, i64)> {
    entry
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            // Only lines that are txn actions are parsed (`{"txn":` leads them, spaces allowed).
            let head: Vec<u8> = line
                .iter()
                .take(16)
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            if !head.starts_with(b"{\"txn\"") {
                return None;
            }
            let action: serde_json::Value = serde_json::from_slice(line).ok()?;
            let txn = action.get("txn")?;
            Some((
                txn.get("appId")?.as_str()?.to_string(),
                txn.get("version")?.as_i64()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_txn_actions_of_an_entry() {
        let entry = br#"{"commitInfo":{"timestamp":1,"operation":"WRITE"}}
{"txn":{"appId":"lakesink/orders/0","version":41,"lastUpdated":1}}
{"add":{"path":"a.parquet","size":1}}
{"txn":{"appId":"lakesink/orders/1","version":7}}
"#;
        assert_eq!(
            txns_in(entry),
            vec![
                ("lakesink/orders/0".to_string(), 41),
                ("lakesink/orders/1".to_string(), 7)
            ]
        );
        assert!(txns_in(b"").is_empty());
    }
}
