//! Races and store quirks of the Parquet protocol, each from the exactly-once review
//! (`F2`, `F7`, `F8`, `F9`, `F12`): a writer killed between its marker and its publish, a chain
//! with a hole, two writers staging the same range, a store that ignores `If-None-Match`, and
//! S3's `409 ConditionalRequestConflict`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::{Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::tests::{flush, paths, sink, stage_and_commit, table, visible, visible_values};
use super::*;
use crate::{CommitOutcome, Error, Flush, Offset, Sink, TopicPartition};

/// F2: a zombie wins the marker at 10 and dies before publishing. The owner, fenced at 10,
/// goes on after the zombie's end and writes its hint there; the zombie's rows must still become
/// visible, and no later recovery may lose them.
#[tokio::test]
async fn a_winner_that_died_before_publishing_is_published_by_the_fenced_writer() {
    let store = Arc::new(InMemory::new());
    let owner = sink(&store, "owner");
    let tp = TopicPartition::new("orders", 0);
    stage_and_commit(&owner, 0, 10).await.unwrap();

    // The zombie stages [10, 20) and dies right after its marker.
    let zombie = sink(&store, "zombie").with_crash_hook(Arc::new(|at| {
        if at == "after_marker" {
            panic!("killed after the marker");
        }
    }));
    let staged = zombie.stage(flush(10, 20)).await.unwrap();
    let died = tokio::spawn(async move { zombie.commit(&staged).await }).await;
    assert!(died.is_err(), "the zombie must die before publishing");

    // The owner's flush at 10 is fenced; it goes on at 20 and commits (a hint at 20).
    assert_eq!(
        stage_and_commit(&owner, 10, 15).await.unwrap(),
        CommitOutcome::Fenced { next: Offset(20) }
    );
    stage_and_commit(&owner, 20, 30).await.unwrap();

    let fresh = sink(&store, "fresh");
    assert_eq!(fresh.recover(&tp).await.unwrap(), Some(Offset(30)));
    assert_eq!(
        visible_values(&store).await,
        (0..30).collect::<Vec<_>>(),
        "every committed row is visible, the zombie's included"
    );
    assert!(
        !paths(&store).await.iter().any(|p| p.contains("staging")),
        "nothing left staged: {:?}",
        paths(&store).await
    );
}

/// F7: a marker deleted by hand leaves a hole in the chain; recovery stops the partition with an
/// error that names the missing offsets instead of resuming after the hole.
#[tokio::test]
async fn a_hole_in_the_chain_stops_the_partition() {
    let store = Arc::new(InMemory::new());
    let s = sink(&store, "w");
    let tp = TopicPartition::new("orders", 0);
    for (a, b) in [(0, 10), (10, 20), (20, 30)] {
        stage_and_commit(&s, a, b).await.unwrap();
    }
    store.delete(&s.marker_path(&tp, 10)).await.unwrap();
    store
        .delete(&Path::from("t/_lakesink/checkpoints/orders/0.json"))
        .await
        .unwrap();
    let e = sink(&store, "next").recover(&tp).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::Chain { .. }), "{e}");
    assert!(
        text.contains("10..20") && text.contains("orders/0"),
        "the error names the partition and the missing offsets: {text}"
    );
}

fn tagged(writer: &str, start: i64, next: i64) -> Flush {
    let schema = Arc::new(Schema::new(vec![
        Field::new("v", DataType::Int64, false),
        Field::new("writer", DataType::Utf8, false),
    ]));
    let n = (next - start) as usize;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(start..next)),
            Arc::new(StringArray::from(vec![writer; n])),
        ],
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

async fn writers_of_visible_rows(store: &InMemory) -> Vec<String> {
    let mut out = Vec::new();
    for p in visible(store).await {
        let bytes = store
            .get(&Path::from(p.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader =
            ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let col = batch
                .column_by_name("writer")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            out.extend(col.iter().map(|v| v.unwrap().to_string()));
        }
    }
    out.dedup();
    out
}

/// F8: a zombie and the owner stage the same range (flushes end on the same row counts). What
/// the winner publishes is what the winner staged, never the other writer's bytes.
#[tokio::test]
async fn two_writers_staging_one_range_never_publish_each_others_files() {
    let store = Arc::new(InMemory::new());
    let zombie = sink(&store, "zombie");
    let owner = sink(&store, "owner");
    let z = zombie.stage(tagged("zombie", 0, 10)).await.unwrap();
    let o = owner.stage(tagged("owner", 0, 10)).await.unwrap();
    assert_eq!(
        zombie.commit(&z).await.unwrap().0,
        CommitOutcome::Committed { next: Offset(10) }
    );
    assert_eq!(writers_of_visible_rows(&store).await, vec!["zombie"]);
    assert_eq!(
        owner.commit(&o).await.unwrap().0,
        CommitOutcome::Fenced { next: Offset(10) }
    );
    assert_eq!(writers_of_visible_rows(&store).await, vec!["zombie"]);
    assert!(
        !paths(&store).await.iter().any(|p| p.contains("staging")),
        "the loser's staged copy is gone: {:?}",
        paths(&store).await
    );
}

/// A store with the quirks of some S3 implementations.
#[derive(Debug)]
struct Quirky {
    inner: Arc<InMemory>,
    /// Treats `PutMode::Create` as a plain overwrite (a store that ignores `If-None-Match`).
    ignores_create: bool,
    /// Answers the next conditional create with S3's 409 `ConditionalRequestConflict`
    /// (object_store maps it to `AlreadyExists`) without writing anything.
    conflict_once: AtomicBool,
}

impl std::fmt::Display for Quirky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Quirky")
    }
}

#[async_trait::async_trait]
impl ObjectStore for Quirky {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if matches!(opts.mode, PutMode::Create) {
            if self.conflict_once.swap(false, Ordering::SeqCst) {
                return Err(object_store::Error::AlreadyExists {
                    path: location.to_string(),
                    source: "409 ConditionalRequestConflict".into(),
                });
            }
            if self.ignores_create {
                opts.mode = PutMode::Overwrite;
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

fn quirky_sink(ignores_create: bool, conflict_once: bool) -> ParquetSink {
    let store = Arc::new(Quirky {
        inner: Arc::new(InMemory::new()),
        ignores_create,
        conflict_once: AtomicBool::new(conflict_once),
    });
    let mut t = table(Arc::new(InMemory::new()));
    t.store = store;
    ParquetSink::new(
        t,
        ParquetSinkConfig {
            writer_id: "w".into(),
            ..Default::default()
        },
    )
}

/// F9: every fence is a create-if-absent; `check` (run by `lakesink check` and at start-up)
/// refuses a store that does not honour it, and passes on one that does.
#[tokio::test]
async fn check_refuses_a_store_that_ignores_if_none_match() {
    let e = quirky_sink(true, false).check().await.unwrap_err();
    assert!(
        e.to_string().contains("If-None-Match"),
        "the error says why: {e}"
    );
    quirky_sink(false, false).check().await.unwrap();
}

/// F12: S3 answers 409 while another conditional write of the key is in flight; the marker is
/// not there yet. That is a retry, not a corrupt table.
#[tokio::test]
async fn a_conditional_request_conflict_is_retried() {
    let s = quirky_sink(false, true);
    let staged = s.stage(flush(0, 10)).await.unwrap();
    let e = s.commit(&staged).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert_eq!(
        s.commit(&staged).await.unwrap().0,
        CommitOutcome::Committed { next: Offset(10) }
    );
}
