//! Staging: a flush conformed to the table's schema (upserts reduced to the last change per
//! key), encoded as one Parquet file and uploaded to the user stage, invisible until loaded.

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;

use crate::encode::Compression;
use crate::upsert::Changes;
use crate::{Error, Flush, Offset, Result, Staged, TopicPartition};

use super::*;

impl DatabendSink {
    pub(super) fn staged_path(
        &self,
        tp: &TopicPartition,
        start: Offset,
        next: Offset,
    ) -> (String, String) {
        let safe = |s: &str| crate::partition::escape(s).replace('%', "_");
        (
            format!(
                "lakesink/{}/{}/{}",
                safe(&self.config.sink),
                safe(&tp.topic),
                tp.partition
            ),
            // Unique per stage call: a zombie and the owner staging the same range must never
            // load each other's file (its columns follow each writer's own reader schema).
            format!(
                "{:020}-{:020}-{:016x}.parquet",
                start.0,
                next.0,
                rand::random::<u64>()
            ),
        )
    }

    pub(super) async fn stage_flush(&self, flush: Flush) -> Result<Staged<DatabendStaged>> {
        self.ensure_ledger().await?;
        // One load file of all rows: the packed ones are unpacked here.
        let flush = flush.unpacked()?;
        // The flush's keys (named, or the message key's fields, whose struct is never stored).
        let (upsert, flush) = match &self.config.upsert {
            None => (None, flush),
            Some(u) => {
                // One table's own key columns win over the sink's (and the message key's).
                let mut u = u.clone();
                if let Some(keys) = self
                    .config
                    .tables
                    .get(&*flush.tp.topic)
                    .and_then(|t| t.keys.clone())
                {
                    u.keys = keys;
                }
                let (u, batches) =
                    crate::upsert::message_key::resolve(&u, flush.batches, &flush.tp)?;
                (Some(u), Flush { batches, ..flush })
            }
        };
        let rows = flush.rows() as u64;
        let table = self.table_for(&flush.tp.topic);
        let mut staged = Staged {
            tp: flush.tp.clone(),
            start: flush.start,
            next: flush.next,
            rows,
            columns: Vec::new(),
            data: DatabendStaged {
                table: table.clone(),
                file: None,
                columns: Vec::new(),
                bytes: 0,
                truncate: flush.truncate && upsert.is_some(),
                unchanged: false,
                keys: Vec::new(),
            },
        };
        // A truncate with no rows after it still loads an empty file (it creates the table).
        if flush.batches.is_empty() || (rows == 0 && !flush.truncate) {
            return Ok(staged);
        }
        // One schema for the flush: the union of its batches, in Databend-storable types.
        let mut target: Option<SchemaRef> = None;
        for b in &flush.batches {
            let s = sql::storable_schema(&b.schema());
            target = Some(match target {
                None => s,
                Some(t) => crate::schema::merge(&t, &s).map_err(|r| self.schema_err(&table, r))?,
            });
        }
        let mut target = target.expect("non-empty");
        // The unchanged-values list is loaded as the file's last column, never into the table.
        let unchanged = upsert
            .as_ref()
            .and_then(|u| u.unchanged_column.as_ref())
            .and_then(|c| target.index_of(c).ok());
        if let Some(i) = unchanged {
            let mut fields: Vec<_> = target.fields().iter().cloned().collect();
            let list = fields.remove(i);
            fields.push(list);
            target = std::sync::Arc::new(Schema::new(fields));
        }
        let table_fields = target.fields().len() - usize::from(unchanged.is_some());
        let table_schema = Schema::new(target.fields()[..table_fields].to_vec());
        let mut batches = flush
            .batches
            .iter()
            .map(|b| {
                crate::schema::conform_batch(b, &target).map_err(|r| self.schema_err(&table, r))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(u) = &upsert {
            let changes = Changes::build(u, &target, batches, &flush.tp)?;
            let mut rows = changes.rows;
            if unchanged.is_some() {
                rows = sql::required_last_list(&rows).map_err(|r| self.schema_err(&table, r))?;
                target = rows.schema();
            }
            batches = vec![rows];
        }
        let truncate = flush.truncate && upsert.is_some();
        self.ensure_table(&table, &table_schema).await?;
        let data = {
            let target = target.clone();
            let compression = self.config.compression;
            crate::encode::encode_blocking(move || encode(&batches, &target, compression))
                .await
                .map_err(|e| Error::Join(e.to_string()))?
                .map_err(|e| Error::Encode {
                    tp: flush.tp.clone(),
                    start: flush.start,
                    next: flush.next,
                    source: e.into(),
                })?
        };
        let (dir, name) = self.staged_path(&flush.tp, flush.start, flush.next);
        let bytes = data.len() as u64;
        self.client
            .upload(&dir, &name, data)
            .await
            .map_err(|e| self.err("upload to stage", e))?;
        let columns: Vec<String> = table_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        staged.columns = target
            .fields()
            .iter()
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect();
        staged.data = DatabendStaged {
            table,
            file: Some(format!("{dir}/{name}")),
            columns,
            bytes,
            truncate,
            unchanged: unchanged.is_some(),
            keys: upsert.map(|u| u.keys).unwrap_or_default(),
        };
        self.crash.at("after_stage");
        Ok(staged)
    }
}

/// The name of the `i`-th column in a staged file.
pub(super) fn staged_column(i: usize) -> String {
    format!("c{i}")
}

/// Encodes batches into one Parquet file.
///
/// The file's top-level columns are named `c0`, `c1`, ... in `schema`'s order: the load selects
/// them by those names and renames them to the table's columns. A stage query resolves Parquet
/// names case-insensitively (a quoted `"orderId"` is not found) and `$N` counts nested leaves,
/// so neither the real names nor positions are reliable there.
fn encode(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    compression: Compression,
) -> std::result::Result<Bytes, String> {
    let props = crate::encode::writer_properties(compression, crate::encode::RowGroups::default());
    let file_schema: SchemaRef = std::sync::Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| f.as_ref().clone().with_name(staged_column(i)))
            .collect::<Vec<_>>(),
    ));
    let mut w = ArrowWriter::try_new(Vec::new(), file_schema.clone(), Some(props))
        .map_err(|e| e.to_string())?;
    for b in batches {
        let b = RecordBatch::try_new(file_schema.clone(), b.columns().to_vec())
            .map_err(|e| e.to_string())?;
        w.write(&b).map_err(|e| e.to_string())?;
    }
    Ok(Bytes::from(w.into_inner().map_err(|e| e.to_string())?))
}
