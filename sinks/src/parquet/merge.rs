//! Choosing and merging the files of one compaction (see `compact` for the protocol): which
//! published files of a directory may be taken, how they are grouped (by schema) and packed
//! (towards the target size), and the streamed merge of a group into one staged file.
//!
//! Invariants: a file is a candidate only when nothing can publish it again (its marker's
//! staged copies are gone, or it is the output of a finished compaction) and it has been
//! published for `min_age`; files of one output share one Arrow schema; an output holds its
//! sources' rows in their order, and only one row group is held in memory while writing.

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use parquet::arrow::async_writer::AsyncArrowWriter;

use super::committer::ParquetSink;
use super::compact::{CompactedFile, OUTPUT_PREFIX};
use super::config::ParquetCompact;
use crate::object_file::ObjectFile;
use crate::{Result, TopicPartition};

/// A candidate file's name: a marker's (`<topic>+<partition>+<start>.parquet`) or an output's.
enum Named {
    Marker(TopicPartition, i64),
    Output(u64),
}

fn classify(name: &str) -> Option<Named> {
    let stem = name.strip_suffix(".parquet")?;
    if let Some(rest) = stem.strip_prefix(OUTPUT_PREFIX) {
        let seq = rest.split('-').next()?.parse().ok()?;
        return Some(Named::Output(seq));
    }
    let mut parts = stem.rsplitn(3, '+');
    let start = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    let topic = parts.next()?;
    Some(Named::Marker(TopicPartition::new(topic, partition), start))
}

impl ParquetSink {
    /// The files of `dir` a compaction may take now: published, below the target size, old
    /// enough, and beyond anyone's publish.
    pub(super) async fn candidates(
        &self,
        dir: &str,
        settings: &ParquetCompact,
        next_seq: u64,
    ) -> Result<Vec<ObjectMeta>> {
        let path = self.dir_path(dir);
        let listed = self
            .table
            .store
            .list_with_delimiter(Some(&path))
            .await
            .map_err(|e| self.table.err(&path, e))?;
        let now = chrono::Utc::now();
        let min_age = chrono::Duration::from_std(settings.min_age).unwrap_or_default();
        let mut out = Vec::new();
        // Staged objects per source partition, listed once each.
        let mut staged: HashMap<TopicPartition, HashSet<String>> = HashMap::new();
        let mut objects = listed.objects;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        for meta in objects {
            let Some(name) = meta.location.filename() else {
                continue;
            };
            if meta.size >= settings.target_file_size || now - meta.last_modified < min_age {
                continue;
            }
            let rel = if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
            match classify(name) {
                Some(Named::Output(seq)) if seq < next_seq => out.push(meta),
                Some(Named::Marker(tp, start)) => {
                    let Some(marker) = self.read_marker(&tp, crate::Offset(start)).await? else {
                        continue;
                    };
                    if !marker.files.iter().any(|f| f.path == rel) {
                        continue;
                    }
                    if !staged.contains_key(&tp) {
                        let now = self.staged_now(&tp).await?;
                        staged.insert(tp.clone(), now);
                    }
                    let still = &staged[&tp];
                    if marker
                        .files
                        .iter()
                        .all(|f| !still.contains(self.rel(&f.staged).as_ref()))
                    {
                        out.push(meta);
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Groups `candidates` by schema (files of one bin must share it) and packs each group, in
    /// name order, into bins of up to `target` bytes; bins of one file are left out.
    pub(super) async fn bins(
        &self,
        dir: &str,
        candidates: Vec<ObjectMeta>,
        target: u64,
    ) -> Result<Vec<Vec<CompactedFile>>> {
        let mut groups: Vec<(arrow::datatypes::SchemaRef, Vec<CompactedFile>)> = Vec::new();
        for meta in candidates {
            let builder = self.open(dir, &meta.location, meta.size).await?;
            let schema = builder.schema().clone();
            let file = CompactedFile {
                path: self.relative(&meta.location),
                rows: builder.metadata().file_metadata().num_rows().max(0) as u64,
                bytes: meta.size,
            };
            match groups.iter_mut().find(|(s, _)| *s == schema) {
                Some((_, files)) => files.push(file),
                None => groups.push((schema, vec![file])),
            }
        }
        let mut bins = Vec::new();
        for (_, files) in groups {
            let mut bin: Vec<CompactedFile> = Vec::new();
            let mut size = 0;
            for f in files {
                if !bin.is_empty() && size + f.bytes > target {
                    bins.push(std::mem::take(&mut bin));
                    size = 0;
                }
                size += f.bytes;
                bin.push(f);
            }
            bins.push(bin);
        }
        bins.retain(|b| b.len() >= 2);
        Ok(bins)
    }

    pub(super) fn relative(&self, path: &Path) -> String {
        path.prefix_match(&self.table.root)
            .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>())
            .unwrap_or_default()
            .join("/")
    }

    async fn open(
        &self,
        dir: &str,
        path: &Path,
        size: u64,
    ) -> Result<ParquetRecordBatchStreamBuilder<ObjectFile>> {
        let reader = ObjectFile::new(self.table.store.clone(), path.clone(), size);
        ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(|e| self.compaction_err(dir, format!("cannot read `{path}`: {e}")))
    }

    /// Writes the rows of `bin`'s files, in order, into the staged file `staged` (streamed:
    /// one row group in memory at a time); returns its rows and size.
    pub(super) async fn merge(
        &self,
        dir: &str,
        bin: &[CompactedFile],
        staged: &str,
    ) -> Result<(u64, u64)> {
        let target = self.rel(staged);
        let mut writer: Option<AsyncArrowWriter<BufWriter>> = None;
        let mut rows = 0u64;
        for f in bin {
            let stream = self
                .open(dir, &self.rel(&f.path), f.bytes)
                .await?
                .build()
                .map_err(|e| self.compaction_err(dir, format!("cannot read `{}`: {e}", f.path)))?;
            futures::pin_mut!(stream);
            while let Some(batch) = stream
                .try_next()
                .await
                .map_err(|e| self.compaction_err(dir, format!("cannot read `{}`: {e}", f.path)))?
            {
                let w = match &mut writer {
                    Some(w) => w,
                    None => {
                        let props = crate::encode::writer_properties_for(
                            self.config.compression,
                            self.config.row_groups,
                            &batch,
                        );
                        let out = BufWriter::new(self.table.store.clone(), target.clone());
                        writer.insert(
                            AsyncArrowWriter::try_new(out, batch.schema(), Some(props))
                                .map_err(|e| self.compaction_err(dir, e))?,
                        )
                    }
                };
                if self.closing() {
                    return Err(self.compaction_err(dir, "stopped: the process is shutting down"));
                }
                rows += batch.num_rows() as u64;
                w.write(&batch)
                    .await
                    .map_err(|e| self.compaction_err(dir, format!("writing `{staged}`: {e}")))?;
            }
        }
        let Some(writer) = writer else {
            return Err(self.compaction_err(dir, "the files to merge hold no rows"));
        };
        writer
            .close()
            .await
            .map_err(|e| self.compaction_err(dir, format!("writing `{staged}`: {e}")))?;
        let size = self
            .table
            .store
            .head(&target)
            .await
            .map_err(|e| self.table.err(&target, e))?
            .size;
        Ok((rows, size))
    }
}
