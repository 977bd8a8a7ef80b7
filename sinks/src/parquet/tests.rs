//! Conformance tests of the Parquet commit protocol on an in-memory store (the same suite runs
//! against real S3/Azure servers in the service's integration tests).

use std::sync::Arc;

use arrow::array::Int64Array;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::*;
use crate::store::TableStore;
use crate::{CommitOutcome, Flush, Offset, Sink, TopicPartition};

pub(super) fn table(store: Arc<InMemory>) -> TableStore {
    TableStore {
        store,
        root: Path::from("t"),
        location: "memory:///t".into(),
    }
}

pub(super) fn sink(store: &Arc<InMemory>, writer: &str) -> ParquetSink {
    ParquetSink::new(
        table(store.clone()),
        ParquetSinkConfig {
            writer_id: writer.into(),
            ..Default::default()
        },
    )
}

pub(super) fn flush(start: i64, next: i64) -> Flush {
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from_iter_values(start..next))],
    )
    .unwrap();
    Flush {
        tp: TopicPartition::new("orders", 0),
        start: Offset(start),
        next: Offset(next),
        batches: vec![batch],
        packed: Vec::new(),
        truncate: false,
        tick: None,
    }
}

pub(super) async fn paths(store: &InMemory) -> Vec<String> {
    let mut v: Vec<String> = store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    v.sort();
    v
}

pub(super) async fn visible(store: &InMemory) -> Vec<String> {
    paths(store)
        .await
        .into_iter()
        .filter(|p| p.ends_with(".parquet") && !p.contains("/_lakesink/"))
        .collect()
}

#[tokio::test]
async fn stage_commit_recover() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w1");
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(s.recover(&tp).await.unwrap(), None);
    let staged = s.stage(flush(0, 10)).await.unwrap();
    assert!(
        visible(&store).await.is_empty(),
        "staged data must be invisible"
    );
    let (outcome, stats) = s.commit(&staged).await.unwrap();
    assert_eq!(outcome, CommitOutcome::Committed { next: Offset(10) });
    assert_eq!(stats.rows, 10);
    assert_eq!(
        visible(&store).await,
        vec!["t/orders+0+00000000000000000000.parquet"]
    );
    let staged = s.stage(flush(10, 25)).await.unwrap();
    s.commit(&staged).await.unwrap();
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(25)));
    // No staged leftovers once published.
    assert!(!paths(&store).await.iter().any(|p| p.contains("staging")));
}

#[tokio::test]
async fn retried_commit_is_already_committed() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w1");
    let staged = s.stage(flush(0, 5)).await.unwrap();
    s.commit(&staged).await.unwrap();
    let (outcome, _) = s.commit(&staged).await.unwrap();
    assert_eq!(outcome, CommitOutcome::AlreadyCommitted { next: Offset(5) });
    assert_eq!(visible(&store).await.len(), 1);
}

#[tokio::test]
async fn second_writer_at_same_start_is_fenced_and_invisible() {
    let store = Arc::new(InMemory::new());
    let a = sink(&store, "a");
    let b = sink(&store, "b");
    let sa = a.stage(flush(0, 5)).await.unwrap();
    let sb = b.stage(flush(0, 8)).await.unwrap();
    assert_eq!(
        a.commit(&sa).await.unwrap().0,
        CommitOutcome::Committed { next: Offset(5) }
    );
    assert_eq!(
        b.commit(&sb).await.unwrap().0,
        CommitOutcome::Fenced { next: Offset(5) }
    );
    // Only the winner's 5 rows are visible, the loser's staged files are gone.
    assert_eq!(visible(&store).await.len(), 1);
    assert!(!paths(&store).await.iter().any(|p| p.contains("staging")));
    let m = a
        .read_marker(&TopicPartition::new("orders", 0), Offset(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((m.writer.as_str(), m.rows), ("a", 5));
}

/// The marker `w1` creates for `staged`, a flush of offsets 0..5 (what commit writes).
fn marker_of(staged: &crate::Staged<Vec<super::StagedFile>>) -> Marker {
    Marker {
        version: 1,
        writer: "w1".into(),
        topic: "orders".into(),
        partition: 0,
        start: 0,
        next: 5,
        rows: 5,
        files: staged.data.clone(),
        columns: vec![],
        committed_at_ms: 0,
    }
}

#[tokio::test]
async fn crash_after_marker_is_published_by_recovery() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w1");
    let staged = s.stage(flush(0, 5)).await.unwrap();
    // Simulate a crash right after the marker create: write the marker the way commit does,
    // but never publish.
    let marker = marker_of(&staged);
    let p = s.marker_path(&staged.tp, 0);
    store
        .put(&p, serde_json::to_vec(&marker).unwrap().into())
        .await
        .unwrap();
    assert!(visible(&store).await.is_empty());
    let restarted = sink(&store, "w2");
    assert_eq!(
        restarted.recover(&staged.tp).await.unwrap(),
        Some(Offset(5))
    );
    assert_eq!(visible(&store).await.len(), 1);
    assert!(!paths(&store).await.iter().any(|p| p.contains("staging")));
}

/// A publish whose copy happened but whose answer was lost (or a second publisher) copies onto
/// the published file again; on a store whose copy is create-only (GCS through object_store
/// 0.13) that is `AlreadyExists`, which means published, not a failure.
#[tokio::test]
async fn republishing_onto_a_create_only_copy_store_is_idempotent() {
    let memory = Arc::new(InMemory::new());
    let s = sink(&memory, "w1");
    let staged = s.stage(flush(0, 5)).await.unwrap();
    let marker = marker_of(&staged);
    memory
        .put(
            &s.marker_path(&staged.tp, 0),
            serde_json::to_vec(&marker).unwrap().into(),
        )
        .await
        .unwrap();
    // The first publisher's copy landed; it died before deleting the staged file.
    let root = Path::from("t");
    for f in &staged.data {
        let (from, to) = (
            Path::from(format!("{root}/{}", f.staged)),
            Path::from(format!("{root}/{}", f.path)),
        );
        memory.copy(&from, &to).await.unwrap();
    }
    let mut gcs_like = FailOnce::new(memory.clone(), 0);
    gcs_like.create_only_copy = true;
    let restarted = ParquetSink::new(
        TableStore {
            store: Arc::new(gcs_like),
            root,
            location: "memory:///t".into(),
        },
        ParquetSinkConfig {
            writer_id: "w2".into(),
            ..Default::default()
        },
    );
    assert_eq!(
        restarted.recover(&staged.tp).await.unwrap(),
        Some(Offset(5))
    );
    assert_eq!(visible_values(&memory).await, vec![0, 1, 2, 3, 4]);
    assert!(!paths(&memory).await.iter().any(|p| p.contains("staging")));
}

#[tokio::test]
async fn crash_before_marker_leaves_nothing_visible() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w1");
    s.stage(flush(0, 5)).await.unwrap();
    let restarted = sink(&store, "w2");
    assert_eq!(
        restarted
            .recover(&TopicPartition::new("orders", 0))
            .await
            .unwrap(),
        None
    );
    assert!(visible(&store).await.is_empty());
    // The restarted writer redoes the same flush and wins.
    let staged = restarted.stage(flush(0, 5)).await.unwrap();
    assert!(matches!(
        restarted.commit(&staged).await.unwrap().0,
        CommitOutcome::Committed { .. }
    ));
    assert_eq!(visible(&store).await.len(), 1);
}

#[tokio::test]
async fn recovery_uses_the_hint_and_still_finds_later_markers() {
    let store = Arc::new(InMemory::new());
    let s = ParquetSink::new(
        table(store.clone()),
        ParquetSinkConfig {
            writer_id: "w".into(),
            hint_every: 2,
            ..Default::default()
        },
    );
    let mut start = 0;
    for n in [3, 4, 5, 6, 7] {
        let staged = s.stage(flush(start, start + n)).await.unwrap();
        s.commit(&staged).await.unwrap();
        start += n;
    }
    let tp = TopicPartition::new("orders", 0);
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(start)));
    assert_eq!(s.recover(&tp).await.unwrap(), Some(Offset(start)));
}

/// An object store that fails exactly one call, the `fail_at`-th (1-based) over every operation,
/// and passes everything else to an in-memory store.
#[derive(Debug)]
pub(super) struct FailOnce {
    inner: Arc<InMemory>,
    calls: std::sync::atomic::AtomicUsize,
    fail_at: usize,
    injected: std::sync::Mutex<Option<String>>,
    /// Every copy is create-only, as object_store 0.13's GCS client does (its `copy` sends
    /// `x-goog-if-generation-match: 0`): copying onto an existing object is `AlreadyExists`.
    create_only_copy: bool,
}

impl FailOnce {
    fn new(inner: Arc<InMemory>, fail_at: usize) -> Self {
        Self {
            inner,
            calls: Default::default(),
            fail_at,
            injected: Default::default(),
            create_only_copy: false,
        }
    }

    fn tick(&self, op: &str, path: &str) -> object_store::Result<()> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n != self.fail_at {
            return Ok(());
        }
        let what = format!("call {n}: {op} {path}");
        *self.injected.lock().unwrap() = Some(what.clone());
        Err(object_store::Error::Generic {
            store: "FailOnce",
            source: format!("injected failure of {what}").into(),
        })
    }
}

impl std::fmt::Display for FailOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FailOnce({})", self.fail_at)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FailOnce {
    async fn put_opts(
        &self,
        location: &Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.tick("put", location.as_ref())?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.tick("put_multipart", location.as_ref())?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.tick("get", location.as_ref())?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        use futures::StreamExt;
        match self.tick("delete", "") {
            Ok(()) => self.inner.delete_stream(locations),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        use futures::StreamExt;
        match self.tick("list", prefix.map_or("", |p| p.as_ref())) {
            Ok(()) => self.inner.list(prefix),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.tick("list_with_delimiter", prefix.map_or("", |p| p.as_ref()))?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.tick("copy", to.as_ref())?;
        let options = if self.create_only_copy {
            object_store::CopyOptions::new().with_mode(object_store::CopyMode::Create)
        } else {
            options
        };
        self.inner.copy_opts(from, to, options).await
    }
}

/// Every value in the visible (published) Parquet files, sorted.
pub(super) async fn visible_values(store: &InMemory) -> Vec<i64> {
    let mut out = Vec::new();
    for p in visible(store).await {
        let bytes = store
            .get(&Path::from(p.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let col = batch
                .column_by_name("v")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            out.extend(col.values().iter().copied());
        }
    }
    out.sort_unstable();
    out
}

/// One flush through a sink: stage, then commit.
pub(super) async fn stage_and_commit(
    s: &ParquetSink,
    start: i64,
    next: i64,
) -> crate::Result<CommitOutcome> {
    let staged = s.stage(flush(start, next)).await?;
    Ok(s.commit(&staged).await?.0)
}

/// Fails every object-store call of three flushes in turn (every step of staging, marker
/// creation, publishing and cleanup), then either retries in place (what the worker does with a
/// transient error) or restarts a new writer that recovers; every record is visible exactly
/// once at the end, whatever call failed.
#[tokio::test]
async fn a_failure_at_any_store_call_loses_and_duplicates_nothing() {
    const BOUNDS: [(i64, i64); 3] = [(0, 10), (10, 25), (25, 30)];
    let tp = TopicPartition::new("orders", 0);
    let mut injected = 0;
    for restart in [false, true] {
        for fail_at in 1.. {
            let mem = Arc::new(InMemory::new());
            let faulty = Arc::new(FailOnce::new(mem.clone(), fail_at));
            let w1 = ParquetSink::new(
                TableStore {
                    store: faulty.clone(),
                    root: Path::from("t"),
                    location: "memory:///t".into(),
                },
                ParquetSinkConfig {
                    writer_id: "w1".into(),
                    ..Default::default()
                },
            );
            let mut failed_at = None;
            for (i, (a, b)) in BOUNDS.iter().enumerate() {
                match stage_and_commit(&w1, *a, *b).await {
                    Ok(CommitOutcome::Committed { next }) => assert_eq!(next, Offset(*b)),
                    Ok(other) => panic!("flush {a}..{b} with call {fail_at} failing: {other:?}"),
                    Err(_) => {
                        failed_at = Some(i);
                        break;
                    }
                }
            }
            let what = faulty.injected.lock().unwrap().clone();
            if let Some(i) = failed_at {
                assert!(what.is_some(), "an error without an injected failure");
                let (resume, writer) = if restart {
                    // A new process: recover the position from the table, redo from there.
                    let w2 = sink(&mem, "w2");
                    let pos = w2.recover(&tp).await.unwrap().map_or(0, |o| o.0);
                    // The failed flush may already be committed (its marker was written before
                    // the failure): then recovery publishes it and the position is its end.
                    let resume = BOUNDS
                        .iter()
                        .position(|(a, _)| *a == pos)
                        .or((pos == 30).then_some(BOUNDS.len()))
                        .unwrap_or_else(|| {
                            panic!("recovered {pos}, not a flush boundary ({what:?})")
                        });
                    (resume, w2)
                } else {
                    // The same writer retries the failed flush (the failure was transient).
                    (i, w1)
                };
                for (a, b) in &BOUNDS[resume..] {
                    let out = stage_and_commit(&writer, *a, *b).await.unwrap();
                    assert!(
                        matches!(out, CommitOutcome::Committed { next } | CommitOutcome::AlreadyCommitted { next } if next == Offset(*b)),
                        "{a}..{b} after {what:?}: {out:?}"
                    );
                }
                injected += 1;
            }
            assert_eq!(
                visible_values(&mem).await,
                (0..30).collect::<Vec<i64>>(),
                "after {what:?} (restart: {restart})"
            );
            let recovered = sink(&mem, "w3").recover(&tp).await.unwrap();
            assert_eq!(recovered, Some(Offset(30)), "after {what:?}");
            if what.is_none() {
                break; // fail_at is past the last call: every call has been failed once
            }
        }
    }
    println!("{injected} injected failures, each followed by exactly-once recovery");
    assert!(
        injected >= 20,
        "only {injected} failure points were exercised"
    );
}

#[tokio::test]
async fn runs_the_sink_contract() {
    let store = Arc::new(InMemory::new());
    crate::testing::all("contract", |i| {
        let s = sink(&store, &format!("w{i}"));
        async move { s }
    })
    .await;
}
