//! The table itself: opening (object store handlers, canonical options), loading and
//! refreshing the snapshot, creating it, and reading a partition's recorded position.

use std::collections::{BTreeMap, HashMap};

use arrow::datatypes::SchemaRef;
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use tracing::info;
use url::Url;

use crate::{Error, Offset, Result, TopicPartition};

use super::*;

impl DeltaSink {
    pub(super) fn builder(&self) -> Result<DeltaTableBuilder> {
        DeltaTableBuilder::from_url(self.url.clone())
            .map(|b| b.with_storage_options(self.options.clone()))
            .map_err(|e| self.err("open", e))
    }

    /// Loads the table into `slot` if it exists (refreshing it if loaded). Returns whether it
    /// exists.
    pub(super) async fn refresh(&self, slot: &mut Option<DeltaTable>) -> Result<bool> {
        match slot {
            Some(t) => {
                t.update_incremental(None)
                    .await
                    .map_err(|e| self.err("refresh", e))?;
            }
            None => {
                let mut t = self.builder()?.build().map_err(|e| self.err("open", e))?;
                match t.load().await {
                    Ok(()) => *slot = Some(t),
                    Err(DeltaTableError::NotATable(_)) => return Ok(false),
                    Err(e) => return Err(self.err("load", e)),
                }
            }
        }
        if let Some(t) = slot.as_ref() {
            if let Ok(s) = t.snapshot() {
                *self.known_schema.lock().expect("poisoned") = Some(s.snapshot().arrow_schema());
            }
        }
        Ok(true)
    }

    /// Creates the table with `schema` (Delta-normalized, partition columns included). Another
    /// writer creating it at the same moment is fine: the loser loads the winner's table.
    pub(super) async fn create(
        &self,
        slot: &mut Option<DeltaTable>,
        schema: &SchemaRef,
    ) -> Result<()> {
        let kernel = schema::kernel_schema(schema).map_err(|reason| Error::Location {
            location: self.location.clone(),
            reason,
        })?;
        let mut properties: BTreeMap<String, String> = self.config.table_properties.clone();
        properties
            .entry("delta.checkpointInterval".into())
            .or_insert_with(|| self.config.checkpoint_interval.to_string());
        if self.config.upsert.is_some()
            && self.config.upsert_strategy == UpsertStrategy::DeletionVectors
        {
            // Protocol 3/7 with the deletionVectors feature from the first version.
            properties
                .entry("delta.enableDeletionVectors".into())
                .or_insert_with(|| "true".into());
        }
        let partition_columns: Vec<String> = self.partition_columns();
        let created = CreateBuilder::new()
            .with_location(self.url.as_str())
            .with_storage_options(self.options.clone())
            .with_columns(kernel.fields().cloned())
            .with_partition_columns(partition_columns)
            .with_configuration(properties.into_iter().map(|(k, v)| (k, Some(v))))
            .with_save_mode(SaveMode::Ignore)
            .await;
        match created {
            Ok(t) => {
                info!(table = %self.location, "created Delta table");
                *slot = Some(t);
                Ok(())
            }
            Err(e) => {
                // Lost a creation race? Then the table exists now.
                if self.refresh(slot).await? {
                    Ok(())
                } else {
                    Err(self.err("create", e))
                }
            }
        }
    }

    /// The table's committed position for `tp`, from the loaded snapshot: its txn version
    /// under the app id, else under the legacy app id (a table last written by an older
    /// version), which the next commit carries over to the app id.
    pub(super) async fn txn_position(
        &self,
        table: &DeltaTable,
        tp: &TopicPartition,
    ) -> Result<Option<Offset>> {
        let mut v = self.txn_version(table, &self.app_id(tp)).await?;
        for other in self.other_app_ids(tp) {
            if v.is_some() {
                break;
            }
            v = self.txn_version(table, &other).await?;
        }
        Ok(v.map(|v| Offset(v + 1)))
    }

    /// The app ids read for `tp` when its own has no version: the legacy one, then another
    /// writer's (`resume_app_id`). Their version is the last offset covered, as lakesink's.
    fn other_app_ids(&self, tp: &TopicPartition) -> Vec<String> {
        let mut ids = Vec::new();
        if let Some(legacy) = &self.config.legacy_app_id_prefix {
            ids.push(format!("{legacy}/{}/{}", tp.topic, tp.partition));
        }
        if let Some(other) = &self.config.resume_app_id {
            ids.push(
                other
                    .replace("{topic}", &tp.topic)
                    .replace("{partition}", &tp.partition.to_string()),
            );
        }
        ids
    }
}

/// How many of the newest commits [`DeltaSink::txn_time`] reads for a partition's last txn.
const TXN_TIME_LOOK_BACK: u64 = 200;

impl DeltaSink {
    /// When `tp`'s last commit was written (ms since the epoch): the `commitInfo.timestamp`
    /// of the newest of the last [`TXN_TIME_LOOK_BACK`] commits whose txn action carries its
    /// app id (or the legacy one). `None` for a partition last committed before those.
    pub(super) async fn txn_time(
        &self,
        table: &DeltaTable,
        tp: &TopicPartition,
    ) -> Result<Option<i64>> {
        let Some(latest) = table.version() else {
            return Ok(None);
        };
        let mut ids = vec![self.app_id(tp)];
        ids.extend(self.other_app_ids(tp));
        let log = table.log_store();
        let oldest = (latest + 1).saturating_sub(TXN_TIME_LOOK_BACK);
        for version in (oldest..=latest).rev() {
            let Some(bytes) = log
                .read_commit_entry(version)
                .await
                .map_err(|e| self.err("read the log", e))?
            else {
                continue;
            };
            let (mut ours, mut at) = (false, None);
            for line in bytes.split(|b| *b == b'\n') {
                let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue;
                };
                if let Some(txn) = action.get("txn") {
                    let app = txn.get("appId").and_then(|a| a.as_str());
                    ours |= app.is_some_and(|a| ids.iter().any(|id| id == a));
                }
                if let Some(ts) = action.pointer("/commitInfo/timestamp") {
                    at = ts.as_i64();
                }
            }
            if ours {
                return Ok(at);
            }
        }
        Ok(None)
    }
}

/// Registers the object stores deltalake needs for `s3://`, `az://`/`abfss://` and `gs://`.
pub(super) fn register_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        deltalake::aws::register_handlers(None);
        deltalake::azure::register_handlers(None);
        deltalake::gcp::register_handlers(None);
    });
}

/// Storage options in the spelling deltalake's object stores expect: object_store's aliases
/// (`endpoint`, `access_key_id`) become their canonical keys (`aws_endpoint`, ...), which also
/// stops deltalake from probing the AWS SDK credential chain when explicit settings are given.
pub(super) fn canonical_options(
    url: &Url,
    options: impl IntoIterator<Item = (String, String)>,
) -> HashMap<String, String> {
    use std::str::FromStr;
    options
        .into_iter()
        .map(|(k, v)| {
            let lower = k.to_ascii_lowercase();
            let key = match url.scheme() {
                "s3" | "s3a" => object_store::aws::AmazonS3ConfigKey::from_str(&lower)
                    .map(|c| c.as_ref().to_string())
                    .unwrap_or(k),
                "az" | "azure" | "abfs" | "abfss" | "adl" => {
                    object_store::azure::AzureConfigKey::from_str(&lower)
                        .map(|c| c.as_ref().to_string())
                        .unwrap_or(k)
                }
                "gs" => object_store::gcp::GoogleConfigKey::from_str(&lower)
                    .map(|c| c.as_ref().to_string())
                    .unwrap_or(k),
                _ => k,
            };
            (key, v)
        })
        .collect()
}
