//! Deletion vectors in Delta's format: reading a data file's deleted rows, and writing the new
//! deletion vectors of an upsert (all of one commit in one file beside the data).
//!
//! A deletion vector file (`deletion_vector_<uuid>.bin` in the table's root) is a version byte
//! (1), then per vector: its size (4 bytes, big-endian: magic and bitmap), the magic 1681511377
//! (little-endian), a 64-bit roaring bitmap in the portable serialization, and a CRC-32 of magic
//! and bitmap (big-endian). delta-kernel's writer produces that layout; a descriptor names the
//! file by its UUID (z85, storage type `u`), the vector's offset, size and cardinality.
//!
//! Invariants:
//! - A data file's new vector is the union of its old one and the rows deleted now: a row once
//!   deleted never comes back.
//! - A vector file is written before the commit that references it, under a fresh name: a commit
//!   that fails leaves an unreferenced file (vacuumed), never a changed one.

use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use deltalake::DeltaTableError;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use roaring::RoaringTreemap;

/// The magic of a portable 64-bit roaring bitmap in a deletion vector.
const PORTABLE_MAGIC: u32 = 1_681_511_377;

fn dv_err(what: impl std::fmt::Display) -> DeltaTableError {
    DeltaTableError::Generic(format!("deletion vector: {what}"))
}

/// Where the vector described by `dv` lives, relative to the table's root (`None`: inline).
fn location(
    dv: &DeletionVectorDescriptor,
    root: &url::Url,
) -> Result<Option<Path>, DeltaTableError> {
    match dv.storage_type {
        StorageType::Inline => Ok(None),
        StorageType::UuidRelativePath => {
            let s = &dv.path_or_inline_dv;
            if s.len() < 20 {
                return Err(dv_err(format!("malformed path `{s}`")));
            }
            let (prefix, encoded) = s.split_at(s.len() - 20);
            let bytes = z85::decode(encoded).map_err(|e| dv_err(format!("`{s}`: {e}")))?;
            let uuid = uuid::Uuid::from_slice(&bytes).map_err(|e| dv_err(format!("`{s}`: {e}")))?;
            let name = format!("deletion_vector_{uuid}.bin");
            Ok(Some(if prefix.is_empty() {
                Path::from(name)
            } else {
                Path::from(format!("{prefix}/{name}"))
            }))
        }
        StorageType::AbsolutePath => {
            let mut root = root.clone();
            if !root.path().ends_with('/') {
                root.set_path(&format!("{}/", root.path()));
            }
            let url = url::Url::parse(&dv.path_or_inline_dv)
                .map_err(|e| dv_err(format!("`{}`: {e}", dv.path_or_inline_dv)))?;
            let relative = root
                .make_relative(&url)
                .filter(|r| !r.starts_with("../"))
                .ok_or_else(|| dv_err(format!("`{url}` is outside the table at `{root}`")))?;
            Ok(Some(Path::from_url_path(relative).map_err(dv_err)?))
        }
    }
}

/// The rows `dv` deletes, read from the table whose root is `root` in `store`.
pub(super) async fn read(
    store: &dyn ObjectStore,
    root: &url::Url,
    dv: &DeletionVectorDescriptor,
) -> Result<RoaringTreemap, DeltaTableError> {
    let bitmap = match location(dv, root)? {
        None => z85::decode(&dv.path_or_inline_dv).map_err(dv_err)?,
        Some(path) => {
            let start = u64::try_from(dv.offset.unwrap_or(1)).map_err(dv_err)?;
            let size = u64::try_from(dv.size_in_bytes).map_err(dv_err)?;
            let bytes = store
                .get_range(&path, start..start + 4 + size)
                .await
                .map_err(|e| dv_err(format!("reading {path}: {e}")))?;
            let stored = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
            if u64::from(stored) != size {
                return Err(dv_err(format!(
                    "{path} at {start}: size {stored}, the log says {size}"
                )));
            }
            bytes[4..].to_vec()
        }
    };
    if bitmap.len() < 4 {
        return Err(dv_err("shorter than its magic"));
    }
    let magic = u32::from_le_bytes(bitmap[..4].try_into().expect("4 bytes"));
    if magic != PORTABLE_MAGIC {
        return Err(dv_err(format!("unknown magic {magic}")));
    }
    let rows = RoaringTreemap::deserialize_from(&bitmap[4..]).map_err(dv_err)?;
    if rows.len() != dv.cardinality.max(0) as u64 {
        return Err(dv_err(format!(
            "holds {} rows, the log says {}",
            rows.len(),
            dv.cardinality
        )));
    }
    Ok(rows)
}

/// Writes `vectors` into one new file at the table's root and returns their descriptors, in
/// order.
pub(super) async fn write(
    store: &dyn ObjectStore,
    vectors: Vec<RoaringTreemap>,
) -> Result<Vec<DeletionVectorDescriptor>, DeltaTableError> {
    use delta_kernel::actions::deletion_vector_writer::{
        KernelDeletionVector, StreamingDeletionVectorWriter,
    };
    let uuid = uuid::Uuid::new_v4();
    let encoded = z85::encode(uuid.as_bytes());
    let mut buffer = Vec::new();
    let mut written = Vec::with_capacity(vectors.len());
    {
        let mut writer = StreamingDeletionVectorWriter::new(&mut buffer);
        for rows in vectors {
            let mut dv = KernelDeletionVector::new();
            dv.add_deleted_row_indexes(rows.iter());
            let result = writer.write_deletion_vector(dv).map_err(dv_err)?;
            written.push(DeletionVectorDescriptor {
                storage_type: StorageType::UuidRelativePath,
                path_or_inline_dv: encoded.clone(),
                offset: Some(result.offset),
                size_in_bytes: result.size_in_bytes,
                cardinality: result.cardinality,
            });
        }
        writer.finalize().map_err(dv_err)?;
    }
    let path = Path::from(format!("deletion_vector_{uuid}.bin"));
    store
        .put(&path, PutPayload::from(buffer))
        .await
        .map_err(|e| dv_err(format!("writing {path}: {e}")))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn vectors_written_read_back_and_name_their_file() {
        let store = object_store::memory::InMemory::new();
        let root = url::Url::parse("memory:///t/").unwrap();
        let a: RoaringTreemap = [0u64, 5, 1 << 33].into_iter().collect();
        let b: RoaringTreemap = (10u64..20).collect();
        let written = write(&store, vec![a.clone(), b.clone()]).await.unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(written[0].offset, Some(1), "after the version byte");
        assert_eq!(written[1].cardinality, 10);
        assert_eq!(read(&store, &root, &written[0]).await.unwrap(), a);
        assert_eq!(read(&store, &root, &written[1]).await.unwrap(), b);
        // The descriptor names the file it was written to.
        let path = location(&written[0], &root).unwrap().unwrap();
        assert!(store.head(&path).await.is_ok(), "{path}");
        // A cardinality that disagrees with the file is an error, not a silent misread.
        let mut wrong = written[1].clone();
        wrong.cardinality = 9;
        assert!(read(&store, &root, &wrong).await.is_err());
    }
}
