//! Committing a compaction (see `purge`) on the state it read, or on a newer one it can be
//! carried to.
//!
//! deltalake does not compare removes with `dataChange = false` against each other, so it
//! would commit two compactions of the same files (every row twice). Here a compaction is
//! committed on one known state at a time; when others committed since, their log entries are
//! read:
//! - an entry that removed none of the compacted files (an append, another partition's
//!   compaction) leaves the compaction valid on the newer state;
//! - an entry that gave a compacted file a new deletion vector (an upsert by deletion vectors:
//!   remove and add of the same path) is carried over: the rows it newly marks are marked in
//!   the compacted file that holds them, whose rows are the compacted files' live rows in order
//!   (row `r` of a source whose first live row landed at `base` is row
//!   `base + r - (rows of the old vector below r)`), or merged by key (then the source's
//!   `k`-th live row is the `k`-th of the positions the merge recorded for it);
//! - an entry that removed a compacted file any other way (a copy-on-write upsert, another
//!   compaction) makes it a conflict, and the compaction is dropped (its files stay
//!   unreferenced until vacuum).
//!
//! Invariant: the committed compaction holds each source's live rows at the version it commits
//! on, no more (a row deleted since is marked) and no fewer.

use std::collections::HashMap;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, DeletionVectorDescriptor};
use deltalake::protocol::DeltaOperation;
use deltalake::table::state::DeltaTableState;
use deltalake::{DeltaTable, DeltaTableError};
use roaring::RoaringTreemap;

/// A compacted file's rows in the new file of its bin.
pub(super) struct Source {
    /// Its path as the log writes it.
    pub path: String,
    /// Its deletion vector when compaction read it.
    pub dv0: RoaringTreemap,
    /// The row of the new file where its first live row landed.
    pub base: u64,
    /// Where its live rows landed when they were merged by key with other sources' (see
    /// `sorted`): its `k`-th live row is the `k`-th smallest; `None`: one after another from
    /// `base`.
    pub positions: Option<RoaringTreemap>,
}

/// Files compacted into one new file (or, if the writer split them, several: then their
/// sources cannot be carried over a new deletion vector).
pub(super) struct Bin {
    pub sources: Vec<Source>,
    pub adds: Vec<Add>,
}

/// Commits `bins` (their sources removed, their adds added, all with `dataChange = false`) on
/// `state` or a newer state they can be carried to; see the module docs.
pub(super) async fn commit_rewrite(
    table: &DeltaTable,
    state: &DeltaTableState,
    bins: Vec<Bin>,
    target: u64,
) -> Result<DeltaTable, DeltaTableError> {
    // Source path (as logged, and decoded) → (bin, source).
    let mut ours: HashMap<String, (usize, usize)> = HashMap::new();
    for (b, bin) in bins.iter().enumerate() {
        for (s, source) in bin.sources.iter().enumerate() {
            ours.insert(source.path.clone(), (b, s));
            ours.insert(percent_decode(&source.path), (b, s));
        }
    }
    let log = table.log_store();
    let store = log.object_store(None);
    let root = log.root_url().clone();
    let mut state = state.clone();
    // The newest deletion vector of each source given one since the compaction read it.
    let mut newer: HashMap<(usize, usize), DeletionVectorDescriptor> = HashMap::new();
    let mut actions = actions_on(&state, &bins, &[])?;
    for _ in 0..20 {
        let properties = CommitProperties::default()
            .with_max_retries(0)
            .with_cleanup_expired_logs(Some(false));
        let result = CommitBuilder::from(properties)
            .with_actions(actions.clone())
            .build(
                Some(&state),
                log.clone(),
                DeltaOperation::Optimize {
                    predicate: None,
                    target_size: target as i64,
                },
            )
            .await;
        let err = match result {
            Ok(committed) => {
                let mut table = table.clone();
                table.state = Some(committed.snapshot);
                return Ok(table);
            }
            Err(e) if super::is_conflict(&e) => e,
            Err(e) => return Err(e),
        };
        let latest = log.get_latest_version(state.version()).await?;
        for version in state.version() + 1..=latest {
            let Some(entry) = log.read_commit_entry(version).await? else {
                continue;
            };
            let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&entry)
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()
                .map_err(|e| DeltaTableError::Generic(format!("log entry {version}: {e}")))?;
            let mut added: HashMap<String, Option<&serde_json::Value>> = HashMap::new();
            for line in &lines {
                if let Some(path) = line.pointer("/add/path").and_then(|p| p.as_str()) {
                    added.insert(percent_decode(path), line.pointer("/add/deletionVector"));
                }
            }
            for line in &lines {
                let Some(path) = line.pointer("/remove/path").and_then(|p| p.as_str()) else {
                    continue;
                };
                let Some(&(b, s)) = ours.get(path).or_else(|| ours.get(&percent_decode(path)))
                else {
                    continue;
                };
                let carried = match added.get(&percent_decode(path)) {
                    Some(Some(dv)) if bins[b].adds.len() == 1 => {
                        serde_json::from_value::<DeletionVectorDescriptor>((*dv).clone()).ok()
                    }
                    _ => None,
                };
                match carried {
                    Some(dv) => {
                        newer.insert((b, s), dv);
                    }
                    None => {
                        return Err(DeltaTableError::Generic(format!(
                            "log entry {version} removed {path}, which this compaction \
                             rewrote ({err})"
                        )))
                    }
                }
            }
        }
        state.update(log.as_ref(), Some(latest)).await?;
        // The rows marked since, in the new files.
        let mut marks: HashMap<usize, RoaringTreemap> = HashMap::new();
        for (&(b, s), dv) in &newer {
            let source = &bins[b].sources[s];
            let now = super::dv::read(store.as_ref(), &root, dv).await?;
            let at = marks.entry(b).or_default();
            for r in &now - &source.dv0 {
                let live = r - source.dv0.rank(r);
                let row = match &source.positions {
                    None => Some(source.base + live),
                    Some(p) => p.select(live),
                };
                let row = row.ok_or_else(|| {
                    DeltaTableError::Generic(format!(
                        "row {r} of {} is not among the rows the compaction merged",
                        source.path
                    ))
                })?;
                at.insert(row);
            }
        }
        let mut order: Vec<usize> = marks.keys().copied().collect();
        order.sort_unstable();
        let vectors = order.iter().map(|b| marks[b].clone()).collect::<Vec<_>>();
        let written = if vectors.is_empty() {
            Vec::new()
        } else {
            super::dv::write(store.as_ref(), vectors).await?
        };
        let rebased: Vec<(usize, DeletionVectorDescriptor)> =
            order.into_iter().zip(written).collect();
        if !newer.is_empty() {
            tracing::info!(
                version = latest,
                files = newer.len(),
                rows = marks.values().map(|m| m.len()).sum::<u64>(),
                "compaction carried over to a newer version: rows deleted since marked in its files"
            );
        }
        actions = actions_on(&state, &bins, &rebased)?;
    }
    Err(DeltaTableError::Generic(
        "the table kept changing under the compaction".into(),
    ))
}

/// The compaction's actions on `state`: each source removed as `state` holds it (with its
/// current deletion vector), and each bin's adds, with the deletion vector `rebased` gives it.
fn actions_on(
    state: &DeltaTableState,
    bins: &[Bin],
    rebased: &[(usize, DeletionVectorDescriptor)],
) -> Result<Vec<Action>, DeltaTableError> {
    let files: HashMap<String, deltalake::kernel::LogicalFileView> = state
        .log_data()
        .iter()
        .map(|f| (percent_decode(f.path().as_ref()), f))
        .collect();
    let mut actions = Vec::new();
    for (b, bin) in bins.iter().enumerate() {
        for source in &bin.sources {
            let file = files.get(&percent_decode(&source.path)).ok_or_else(|| {
                DeltaTableError::Generic(format!(
                    "{} is no longer in the table the compaction commits on",
                    source.path
                ))
            })?;
            actions.push(Action::Remove(file.remove_action(false)));
        }
        for add in &bin.adds {
            let mut add = add.clone();
            add.data_change = false;
            if let Some((_, dv)) = rebased.iter().find(|(r, _)| *r == b) {
                add.deletion_vector = Some(dv.clone());
                add.stats = add.stats.as_deref().map(super::mor::loose_bounds);
            }
            actions.push(Action::Add(add));
        }
    }
    Ok(actions)
}

/// `path` with its `%XX` escapes decoded (log paths are URL-encoded).
pub(super) fn percent_decode(path: &str) -> String {
    url::form_urlencoded::parse(format!("p={}", path.replace('+', "%2B")).as_bytes())
        .next()
        .map_or_else(|| path.to_string(), |(_, v)| v.into_owned())
}
