//! Background compaction of a Parquet table (`[sink.parquet] auto_compact`): when this
//! process has committed `min_files` files to a directory since its last compaction there, a
//! task compacts it (see `compact`), at most one at a time per table and `min_age` apart; at
//! shutdown no compaction starts, a running one stops before its commit or is waited for past
//! it, and compactions other members left open are finished.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::info;

use super::committer::ParquetSink;
use super::compact::{parent, CompactReport};
use super::writer::StagedFile;

impl ParquetSink {
    /// Whether the process is shutting down ([`Self::settle_compaction`] was called).
    pub(super) fn closing(&self) -> bool {
        self.compactor.closing.load(Ordering::Acquire)
    }

    /// Stops background compaction: none starts from now on, and a running one is waited for
    /// (at most `within`) so that a directory lister does not see its sources beside its output.
    /// With `auto_compact`, it then finishes the compactions other members left open (one
    /// killed after this process's last recovery).
    pub(super) async fn settle_compaction(&self, within: Duration) {
        let c = &self.compactor;
        c.closing.store(true, Ordering::Release);
        let until = Instant::now() + within;
        while c.running.load(Ordering::Acquire) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.config.auto_compact && !c.running.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(Instant::now());
            if let Ok(Err(e)) = tokio::time::timeout(left, self.finish_interrupted()).await {
                info!(table = self.table.location(),
                      "finishing interrupted compactions at shutdown failed (done at the next start): {e}");
            }
        }
    }

    /// After a commit that published `files`: counts them towards their directories'
    /// compactions and starts one in the background when due (`auto_compact`).
    pub(super) fn after_commit(&self, files: &[StagedFile]) {
        if !self.config.auto_compact || self.compactor.closing.load(Ordering::Acquire) {
            return;
        }
        let settings = self.config.compact;
        let c = &self.compactor;
        let due: Vec<(String, usize)> = {
            let mut pending = c.pending.lock().expect("poisoned");
            for f in files {
                *pending.entry(parent(&f.path).to_string()).or_default() += 1;
            }
            if c.last
                .lock()
                .expect("poisoned")
                .is_some_and(|t| t.elapsed() < settings.min_age)
                || c.running.swap(true, Ordering::AcqRel)
            {
                return;
            }
            let due: Vec<(String, usize)> = pending
                .iter()
                .filter(|(_, n)| **n >= settings.min_files)
                .map(|(d, n)| (d.clone(), *n))
                .collect();
            for (d, _) in &due {
                pending.insert(d.clone(), 0);
            }
            due
        };
        if due.is_empty() {
            c.running.store(false, Ordering::Release);
            return;
        }
        *c.last.lock().expect("poisoned") = Some(Instant::now());
        let this = self.clone_for_io();
        tokio::spawn(async move {
            let closing = || this.closing();
            // Compactions another member left open (killed after this process recovered).
            if let Err(e) = this.finish_interrupted().await {
                info!(
                    table = this.table.location(),
                    "finishing interrupted compactions failed (tried again later): {e}"
                );
            }
            for (dir, files) in &due {
                if closing() {
                    break;
                }
                let idle = |r: &CompactReport| r.files_compacted == 0 && r.dropped == 0;
                let mut r = this.compact_dir(dir, &settings, settings.min_files).await;
                if r.as_ref().is_ok_and(idle) {
                    // Some of the files were too young: once `min_age` has passed, every file
                    // counted is old enough, whether or not more commits come.
                    let until = Instant::now() + settings.min_age;
                    while Instant::now() < until && !closing() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if closing() {
                        break;
                    }
                    r = this.compact_dir(dir, &settings, settings.min_files).await;
                }
                match r {
                    Ok(r) if idle(&r) => {
                        *this
                            .compactor
                            .pending
                            .lock()
                            .expect("poisoned")
                            .entry(dir.clone())
                            .or_default() += files;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        info!(table = this.table.location(), dir,
                        "background compaction dropped (nothing changed; tried again later): {e}")
                    }
                }
            }
            this.compactor.running.store(false, Ordering::Release);
        });
    }
}
