//! Opening a table location (`file://`, `s3://`, `az://`, `abfss://`, `gs://`, `memory://`) as an
//! object store plus a root path inside it.
//!
//! Invariant: [`TableStore::location`] never contains credentials (they live in the storage
//! options, never in the URL we print).

use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreScheme};
use url::Url;

use crate::{Error, Result};

/// AWS credentials for S3 tables from outside object_store (the service passes the AWS SDK's
/// default chain).
pub type AwsCredentialProvider =
    Arc<dyn object_store::CredentialProvider<Credential = object_store::aws::AwsCredential>>;

/// An object store and the table's root inside it.
#[derive(Debug, Clone)]
pub struct TableStore {
    /// The object store the table lives in.
    pub store: Arc<dyn ObjectStore>,
    /// The table's root inside the store.
    pub root: Path,
    pub(crate) location: String,
}

impl TableStore {
    /// Opens `location` with `options` (object_store configuration keys such as `endpoint`,
    /// `region`, `access_key_id`, `allow_http`, `azure_storage_account_name`, ...).
    pub fn open<I, K, V>(location: &str, options: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        Self::open_with(location, options, None)
    }

    /// [`TableStore::open`], with `aws` signing an S3 table's requests (when given).
    pub fn open_with<I, K, V>(
        location: &str,
        options: I,
        aws: Option<AwsCredentialProvider>,
    ) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let bad = |reason: String| Error::Location {
            location: redact_url(location),
            reason,
        };
        let url = Url::parse(location).map_err(|e| bad(e.to_string()))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials in the table URL are not allowed; put them in the `storage` table"
                    .into(),
            ));
        }
        let (scheme, _) = ObjectStoreScheme::parse(&url).map_err(|e| {
            bad(format!(
                "{e}; supported schemes are file://, s3://, az://, abfss://, gs://, memory://"
            ))
        })?;
        let (store, root): (Arc<dyn ObjectStore>, Path) = match scheme {
            ObjectStoreScheme::Local => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| bad("not an absolute local path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad(format!("cannot create directory: {e}")))?;
                // No automatic cleanup of emptied directories: only staged files are deleted,
                // and removing their directory after each publish raced the next flush of
                // another partition creating its own below the same parent ("Unable to create
                // dir", a retried stage) and cost an rmdir and a mkdir per commit.
                let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad(e.to_string()))?;
                (Arc::new(fs), Path::default())
            }
            ObjectStoreScheme::Memory => (Arc::new(InMemory::new()), Path::default()),
            ObjectStoreScheme::AmazonS3 if aws.is_some() => {
                let mut b = object_store::aws::AmazonS3Builder::new().with_url(url.as_str());
                for (k, v) in options {
                    let key: object_store::aws::AmazonS3ConfigKey =
                        k.as_ref().parse().map_err(|e: object_store::Error| {
                            bad(format!("storage option `{}`: {e}", k.as_ref()))
                        })?;
                    b = b.with_config(key, v);
                }
                let store = b
                    .with_credentials(aws.expect("checked"))
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                let root = Path::from_url_path(url.path()).map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), root)
            }
            ObjectStoreScheme::AmazonS3
            | ObjectStoreScheme::MicrosoftAzure
            | ObjectStoreScheme::GoogleCloudStorage => {
                let (store, path) =
                    object_store::parse_url_opts(&url, options).map_err(|e| bad(e.to_string()))?;
                (Arc::from(store), path)
            }
            other => return Err(bad(format!("scheme {other:?} cannot hold a table"))),
        };
        Ok(Self {
            store,
            root,
            location: redact_url(location),
        })
    }

    /// The table location, safe to print.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// A path below the table root. `parts` must already be safe path segments (Hive-escaped
    /// partition values, topic names, file names): they are used as they are, so what a reader
    /// lists is exactly what lakesink escaped. A part object_store would reject (`.`, `..`, a `/`
    /// or a control character) is percent-encoded instead, so it still cannot leave its segment.
    pub fn path<'a>(&self, parts: impl IntoIterator<Item = &'a str>) -> Path {
        let mut p = self.root.clone();
        for part in parts {
            p = p.join(segment(part));
        }
        p
    }

    /// A `/`-separated path relative to the table root (as markers and Delta actions record
    /// them); each segment as in [`TableStore::path`].
    pub fn rel(&self, rel: &str) -> Path {
        self.path(rel.split('/'))
    }

    pub(crate) fn err(&self, path: &Path, source: object_store::Error) -> Error {
        Error::Store {
            table: self.location.clone(),
            path: path.to_string(),
            source: Box::new(source),
        }
    }
}

/// Proves that `store` honours a conditional create (`If-None-Match: *` on S3, `If-None-Match`
/// on Azure, `ifGenerationMatch=0` on GCS, `O_EXCL` on disk) by creating `probe` twice: every
/// fence of the Parquet and Delta protocols is such a create, and a store that ignores it lets
/// two writers commit one range. Deletes the probe.
pub async fn check_conditional_create(
    store: &dyn ObjectStore,
    location: &str,
    probe: &Path,
) -> Result<()> {
    use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
    let err = |source| Error::Store {
        table: location.to_string(),
        path: probe.to_string(),
        source: Box::new(source),
    };
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let _ = store.delete(probe).await;
    store
        .put_opts(probe, PutPayload::from_static(b"lakesink check"), create())
        .await
        .map_err(err)?;
    let second = store
        .put_opts(probe, PutPayload::from_static(b"lakesink check"), create())
        .await;
    let _ = store.delete(probe).await;
    match second {
        Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(err(e)),
        Ok(_) => Err(Error::Location {
            location: location.to_string(),
            reason: "the store accepted a second create of the same object: it ignores \
                     `If-None-Match` (conditional writes), which every commit of this table \
                     relies on to fence writers; use a store that supports it (AWS S3, Azure, \
                     GCS, MinIO, a local disk) or, for S3-compatible stores, enable conditional \
                     writes"
                .into(),
        }),
    }
}

/// The record of a topic's identity in a table (`_lakesink/topics/<topic>.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TopicRecord {
    topic: String,
    topic_id: String,
    recorded_at: String,
}

/// [`crate::Sink::adopt_topic_id`] for tables on an object store: `path` is created only if
/// absent (the fences' conditional create), so of two writers recording at once the first wins
/// and the second compares with it.
pub async fn adopt_topic_id(
    store: &dyn ObjectStore,
    location: &str,
    path: &Path,
    topic: &str,
    topic_id: &str,
) -> Result<crate::TopicIdentity> {
    use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
    let err = |source| Error::Store {
        table: location.to_string(),
        path: path.to_string(),
        source: Box::new(source),
    };
    let record = TopicRecord {
        topic: topic.to_string(),
        topic_id: topic_id.to_string(),
        recorded_at: chrono::Utc::now().to_rfc3339(),
    };
    let body = serde_json::to_vec_pretty(&record).expect("serialisable");
    let create = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store.put_opts(path, PutPayload::from(body), create).await {
        Ok(_) => return Ok(crate::TopicIdentity::Recorded),
        Err(object_store::Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(err(e)),
    }
    let bytes = store
        .get(path)
        .await
        .map_err(err)?
        .bytes()
        .await
        .map_err(err)?;
    let found: TopicRecord = serde_json::from_slice(&bytes).map_err(|e| Error::CorruptMarker {
        table: location.to_string(),
        path: path.to_string(),
        reason: format!("not a topic record: {e}"),
    })?;
    Ok(if found.topic_id == topic_id {
        crate::TopicIdentity::Same
    } else {
        crate::TopicIdentity::Other(found.topic_id)
    })
}

/// Removes user info and query strings (SAS tokens) from a URL for display.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            let had_secret = !url.username().is_empty() || url.password().is_some();
            let _ = url.set_username("");
            let _ = url.set_password(None);
            if url.query().is_some() {
                url.set_query(Some("REDACTED"));
            }
            let mut s = url.to_string();
            if had_secret {
                s.push_str(" (credentials redacted)");
            }
            s
        }
        // Not a URL (a path without a scheme, a typo): the text as typed, less anything that
        // may be a credential (a `user:password@` part, a query string).
        Err(_) => {
            let mut s = raw.split(['?', '#']).next().unwrap_or("").to_string();
            let mut had_secret = s.len() != raw.len();
            if let Some(at) = s.rfind('@') {
                let start = s.find("://").map_or(0, |i| i + 3);
                if at >= start {
                    s.replace_range(start..=at, "");
                    had_secret = true;
                }
            }
            if had_secret {
                s.push_str(" (credentials redacted)");
            }
            s
        }
    }
}

/// One path segment, verbatim when object_store accepts it as is. `Path::join` on a `&str` would
/// percent-encode `%` (and other characters) a second time, so a Hive-escaped value such as
/// `a%2Fb` would land as `a%252Fb` and read back wrong.
fn segment(part: &str) -> object_store::path::PathPart<'_> {
    object_store::path::PathPart::parse(part).unwrap_or_else(|_| part.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials_and_queries() {
        let r = redact_url("s3://user:hunter2@bucket/t?sig=abc");
        assert!(!r.contains("hunter2"), "{r}");
        assert!(!r.contains("abc"), "{r}");
        assert!(r.starts_with("s3://bucket/t"), "{r}");
    }

    #[test]
    fn text_that_is_not_a_url_is_shown_as_typed_less_credentials() {
        assert_eq!(redact_url("lake/orders"), "lake/orders");
        let r = redact_url("s3//user:hunter2@bucket/t");
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("bucket/t"), "{r}");
        let r = redact_url("lake/t?sig=abc");
        assert_eq!(r, "lake/t (credentials redacted)");
    }

    #[test]
    fn rejects_credentials_in_url_and_unknown_schemes() {
        let e = TableStore::open("s3://k:secret@b/t", Vec::<(String, String)>::new()).unwrap_err();
        assert!(e.to_string().contains("storage"), "{e}");
        assert!(!e.to_string().contains("secret@"), "{e}");
        let e = TableStore::open("ftp://x/y", Vec::<(String, String)>::new()).unwrap_err();
        assert!(e.to_string().contains("supported schemes"), "{e}");
    }

    #[test]
    fn escaped_segments_are_kept_verbatim_and_cannot_escape() {
        let t = TableStore::open("memory:///t", Vec::<(String, String)>::new()).unwrap();
        assert_eq!(
            t.path(["region=a%2Fb", "f.parquet"]).as_ref(),
            "region=a%2Fb/f.parquet"
        );
        assert_eq!(t.rel("region=%2E%2E/x").as_ref(), "region=%2E%2E/x");
        for bad in ["..", ".", "a/b", "a\nb"] {
            let p = t.path([bad]);
            assert_eq!(p.parts().count(), 1, "{bad} -> {p}");
            assert!(
                !p.parts().any(|s| s.as_ref() == ".." || s.as_ref() == "."),
                "{bad} -> {p}"
            );
        }
    }
}
