//! An in-memory object store that answers like a cloud store: every request waits a latency
//! drawn from a per-kind range (seeded), and a conditional create is decided when the request
//! reaches the store, half-way through its latency, as S3 decides `If-None-Match: *` — so two
//! writers racing for one log entry overlap as they do on S3, and the loser learns it only when
//! its answer arrives. For simulations of many writers on one table (`lakesink bench
//! --contention`) and their tests; never used by a configured sink.
//!
//! A store is reached by the Delta sink as `sim://<name>/<path>` once [`LatencyStore::register`]ed
//! under `<name>`. It counts what it served ([`Counts`]), including every conditional create
//! of a `_delta_log` commit entry that lost (a commit conflict as the store sees it).

use std::collections::HashMap;
use std::ops::{Range, RangeInclusive};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deltalake::logstore::{
    default_logstore, logstore_factories, object_store_factories, LogStore, LogStoreFactory,
    ObjectStoreFactory, ObjectStoreRef, StorageConfig,
};
use futures::stream::BoxStream;
use futures::StreamExt as _;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use rand::{Rng as _, SeedableRng as _};
use url::Url;

/// Latency ranges per request kind, in milliseconds.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// A PUT (also a copy or a rename, and a multipart upload's start).
    pub put: RangeInclusive<u64>,
    /// A GET, to the last byte of a small object.
    pub get: RangeInclusive<u64>,
    /// A HEAD.
    pub head: RangeInclusive<u64>,
    /// A LIST page.
    pub list: RangeInclusive<u64>,
    /// A (batch) DELETE.
    pub delete: RangeInclusive<u64>,
}

impl Latencies {
    /// Amazon S3 Standard from one region's compute, small objects: PUT 20–50 ms, GET 10–30
    /// ms to the last byte, HEAD 10–20 ms, LIST 20–50 ms, DELETE 10–30 ms.
    pub fn s3() -> Self {
        Self {
            put: 20..=50,
            get: 10..=30,
            head: 10..=20,
            list: 20..=50,
            delete: 10..=30,
        }
    }
}

/// What a [`LatencyStore`] served since it was made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// PUTs, copies and renames.
    pub puts: u64,
    /// GETs.
    pub gets: u64,
    /// HEADs.
    pub heads: u64,
    /// LISTs.
    pub lists: u64,
    /// DELETE requests.
    pub deletes: u64,
    /// Commit entries (`_delta_log/*.json`) created.
    pub log_entries: u64,
    /// Conditional creates of a commit entry that found it written: lost races.
    pub log_conflicts: u64,
}

#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    gets: AtomicU64,
    heads: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
    log_entries: AtomicU64,
    log_conflicts: AtomicU64,
}

/// See the module docs.
pub struct LatencyStore {
    inner: InMemory,
    latencies: Latencies,
    rng: Mutex<rand::rngs::StdRng>,
    counters: Counters,
}

impl std::fmt::Debug for LatencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyStore")
            .field("latencies", &self.latencies)
            .finish()
    }
}

impl std::fmt::Display for LatencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LatencyStore")
    }
}

fn stores() -> &'static Mutex<HashMap<String, Arc<LatencyStore>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<LatencyStore>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

impl LatencyStore {
    /// An empty store whose latencies are drawn from `latencies` with `seed`.
    pub fn new(latencies: Latencies, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            inner: InMemory::new(),
            latencies,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            counters: Counters::default(),
        })
    }

    /// Makes `store` reachable as `sim://<name>/` (replacing an earlier store of that name) and
    /// returns that URL.
    pub fn register(name: &str, store: Arc<LatencyStore>) -> Url {
        static FACTORY: std::sync::Once = std::sync::Once::new();
        FACTORY.call_once(|| {
            let scheme = Url::parse("sim://").expect("a valid URL");
            object_store_factories().insert(scheme.clone(), Arc::new(SimFactory));
            logstore_factories().insert(scheme, Arc::new(SimFactory));
        });
        stores()
            .lock()
            .expect("poisoned")
            .insert(name.to_string(), store);
        Url::parse(&format!("sim://{name}/")).expect("a valid store name")
    }

    /// What the store served so far.
    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            puts: get(&c.puts),
            gets: get(&c.gets),
            heads: get(&c.heads),
            lists: get(&c.lists),
            deletes: get(&c.deletes),
            log_entries: get(&c.log_entries),
            log_conflicts: get(&c.log_conflicts),
        }
    }

    fn draw(&self, range: &RangeInclusive<u64>) -> Duration {
        let ms = self
            .rng
            .lock()
            .expect("poisoned")
            .random_range(range.clone());
        Duration::from_millis(ms)
    }

    /// Waits `latency` around `request`: the store acts half-way, the answer arrives after.
    async fn around<T>(
        &self,
        latency: Duration,
        request: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::time::sleep(latency / 2).await;
        let answer = request.await;
        tokio::time::sleep(latency - latency / 2).await;
        answer
    }
}

/// `stream`, answered after `latency`.
fn delayed<T: Send + 'static>(
    latency: Duration,
    stream: BoxStream<'static, T>,
) -> BoxStream<'static, T> {
    futures::stream::once(async move {
        tokio::time::sleep(latency).await;
        stream
    })
    .flatten()
    .boxed()
}

fn is_log_entry(location: &Path) -> bool {
    let s = location.as_ref();
    s.contains("_delta_log/") && s.ends_with(".json") && !s.contains(".tmp")
}

#[async_trait]
impl ObjectStore for LatencyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(path = %location, "PUT");
        let create = matches!(opts.mode, PutMode::Create) && is_log_entry(location);
        let latency = self.draw(&self.latencies.put);
        let result = self
            .around(latency, self.inner.put_opts(location, payload, opts))
            .await;
        if create {
            match &result {
                Ok(_) => self.counters.log_entries.fetch_add(1, Ordering::Relaxed),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    self.counters.log_conflicts.fetch_add(1, Ordering::Relaxed)
                }
                Err(_) => 0,
            };
        }
        result
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let latency = self.draw(&self.latencies.put);
        self.around(latency, self.inner.put_multipart_opts(location, opts))
            .await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        tracing::trace!(path = %location, head = options.head, "GET");
        let latency = if options.head {
            self.counters.heads.fetch_add(1, Ordering::Relaxed);
            self.draw(&self.latencies.head)
        } else {
            self.counters.gets.fetch_add(1, Ordering::Relaxed);
            self.draw(&self.latencies.get)
        };
        self.around(latency, self.inner.get_opts(location, options))
            .await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        tracing::trace!(path = %location, "GET ranges");
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let latency = self.draw(&self.latencies.get);
        self.around(latency, self.inner.get_ranges(location, ranges))
            .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.counters.deletes.fetch_add(1, Ordering::Relaxed);
        let latency = self.draw(&self.latencies.delete);
        let deleted = self.inner.delete_stream(locations);
        delayed(latency, deleted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        tracing::trace!(?prefix, "LIST");
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let latency = self.draw(&self.latencies.list);
        let listed = self.inner.list(prefix);
        delayed(latency, listed)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        tracing::trace!(?prefix, %offset, "LIST from");
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let latency = self.draw(&self.latencies.list);
        let listed = self.inner.list_with_offset(prefix, offset);
        delayed(latency, listed)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let latency = self.draw(&self.latencies.list);
        self.around(latency, self.inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let latency = self.draw(&self.latencies.put);
        self.around(latency, self.inner.copy_opts(from, to, options))
            .await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        let latency = self.draw(&self.latencies.put);
        self.around(latency, self.inner.rename_opts(from, to, options))
            .await
    }
}

/// deltalake's way to `sim://<name>/`: the registered store of that name.
struct SimFactory;

impl ObjectStoreFactory for SimFactory {
    fn parse_url_opts(
        &self,
        url: &Url,
        _config: &StorageConfig,
    ) -> deltalake::DeltaResult<(ObjectStoreRef, Path)> {
        let name = url.host_str().unwrap_or_default();
        let store = stores().lock().expect("poisoned").get(name).cloned();
        let store = store.ok_or_else(|| {
            deltalake::DeltaTableError::InvalidTableLocation(format!(
                "no simulated store is registered as `{name}`"
            ))
        })?;
        let prefix =
            Path::parse(url.path()).map_err(|e| deltalake::DeltaTableError::GenericError {
                source: Box::new(e),
            })?;
        Ok((store as ObjectStoreRef, prefix))
    }
}

impl LogStoreFactory for SimFactory {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> deltalake::DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt as _;

    /// Two creates of one log entry in flight at once: one wins, the other is told the entry
    /// exists, and the store counts one entry and one conflict.
    #[tokio::test]
    async fn racing_creates_of_one_entry_have_one_winner() {
        let store = LatencyStore::new(Latencies::s3(), 7);
        let path = Path::from("t/_delta_log/00000000000000000001.json");
        let create = || {
            store.put_opts(
                &path,
                PutPayload::from_static(b"{}"),
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            )
        };
        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(create(), create());
        assert!(
            started.elapsed() >= Duration::from_millis(20),
            "the latency is applied"
        );
        assert_eq!(
            a.is_ok() as u32 + b.is_ok() as u32,
            1,
            "one winner: {a:?} {b:?}"
        );
        let lost = if a.is_err() { a } else { b };
        assert!(matches!(
            lost,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        let counts = store.counts();
        assert_eq!(
            (counts.log_entries, counts.log_conflicts, counts.puts),
            (1, 1, 2)
        );
        assert_eq!(store.get(&path).await.unwrap().bytes().await.unwrap(), "{}");
    }
}
