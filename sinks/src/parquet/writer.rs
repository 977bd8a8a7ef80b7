//! Encoding a flush into Parquet files, one per output (Hive) partition, off the async threads.

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::config::ParquetSinkConfig;
use crate::encode::writer_properties_for;
use crate::partition;
use crate::{Error, Flush, Result};

/// One staged file and where it is published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedFile {
    /// Path of the staged object, relative to the table root.
    pub staged: String,
    /// Final path, relative to the table root.
    pub path: String,
    /// Rows in the file.
    pub rows: u64,
    /// The file's size.
    pub bytes: u64,
}

/// An encoded file, not yet uploaded.
pub(crate) struct Encoded {
    pub hive_dir: String,
    pub rows: u64,
    pub data: Bytes,
}

/// Encodes `flush` into one Parquet file per output partition, in hive-key order (so the
/// result, and the staged names derived from it, are deterministic). CPU-bound: call from a
/// blocking thread.
pub(crate) fn encode(flush: &Flush, config: &ParquetSinkConfig) -> Result<Vec<Encoded>> {
    let encode_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Encode {
        tp: flush.tp.clone(),
        start: flush.start,
        next: flush.next,
        source: e,
    };
    // Writer properties follow the first batch's columns; packed chunks are unpacked one at a
    // time, so a flush is never all unpacked at once.
    let mut props = None;
    let mut writers: BTreeMap<String, (ArrowWriter<Vec<u8>>, u64, arrow::datatypes::SchemaRef)> =
        BTreeMap::new();
    for chunk in flush.chunks() {
        for batch in chunk.batches().map_err(|e| encode_err(Box::new(e)))? {
            let props = props.get_or_insert_with(|| {
                writer_properties_for(config.compression, config.row_groups, &batch)
            });
            for (dir, part) in partition::split(&batch, &config.partition_by, &flush.tp)? {
                let entry = match writers.entry(dir) {
                    std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        let w =
                            ArrowWriter::try_new(Vec::new(), part.schema(), Some(props.clone()))
                                .map_err(|e| encode_err(Box::new(e)))?;
                        v.insert((w, 0, part.schema()))
                    }
                };
                write_part(&mut entry.0, &entry.2, &part).map_err(encode_err)?;
                entry.1 += part.num_rows() as u64;
            }
        }
    }
    writers
        .into_iter()
        .map(|(hive_dir, (w, rows, _))| {
            let data = w.into_inner().map_err(|e| encode_err(Box::new(e)))?;
            Ok(Encoded {
                hive_dir,
                rows,
                data: Bytes::from(data),
            })
        })
        .collect()
}

fn write_part(
    w: &mut ArrowWriter<Vec<u8>>,
    schema: &arrow::datatypes::SchemaRef,
    part: &RecordBatch,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if part.schema() != *schema {
        return Err(format!(
            "schema changed inside one flush (writer has {} columns, batch has {}); \
             flushes must hold one schema",
            schema.fields().len(),
            part.schema().fields().len()
        )
        .into());
    }
    w.write(part)?;
    Ok(())
}
