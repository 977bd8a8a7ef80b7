//! The global memory budget for decoded data, and when it makes writers flush.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// The global budget for decoded data: buffered in partition writers, plus flushes still being
/// encoded and staged (their Arrow batches and Parquet output are alive until the stage ends),
/// plus staged flushes that keep their rows until their commit (a Delta upsert's changes).
///
/// Only writers holding at least the average buffer act on memory pressure, so pressure
/// produces a few larger files rather than one tiny file per partition. Such a writer first packs
/// its buffer (`sinks::packed`, unless `pipeline.pack_buffers = false`) when most of it is
/// unpacked, so its rows still wait for the latency tick's shared files; one whose buffer is
/// mostly packed already flushes. From three quarters of the limit
/// on, such writers flush a few at a time ([`EARLY_FLUSHES`] being encoded or staged at once),
/// so encoding keeps pace with decoding; over the limit, all of them flush. Flushing only at the
/// limit made every partition (all filling at the same rate) flush at once: the encoders queued
/// dozens of flushes while decoding waited for them, then sat idle while the buffers refilled.
///
/// A writer decides on its next record, so pressure also wakes the idle ones
/// ([`Self::pressed`]): past three quarters of the limit, at most every [`PRESSURE_EVERY_MS`].
/// Without that, the writers holding the most (those whose records are not arriving right now:
/// a quiet table, or partitions librdkafka is not fetching at the moment) never flushed, and
/// the ones receiving records, each below the average they set, filled the budget past its
/// limit.
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    /// Bytes buffered in writers.
    used: AtomicUsize,
    /// Bytes of flushes between their start and the end of their stage.
    in_flight: AtomicUsize,
    /// Writers holding at least one batch.
    holders: AtomicUsize,
    /// Flushes between their start and the end of their stage.
    flushing: AtomicUsize,
    /// Staged flushes between the end of their stage and the end of their commit.
    committing: AtomicUsize,
    /// How many flushes may be in flight before the limit is reached.
    early_flushes: usize,
    /// Whether writers pack their buffers under pressure before flushing them
    /// (`pipeline.pack_buffers`).
    pack: bool,
    /// Wakes the writers waiting in [`Self::pressed`].
    pressure: tokio::sync::Notify,
    /// When pressure last woke them, in ms since `epoch` plus [`PRESSURE_EVERY_MS`].
    pressed_at: AtomicU64,
    epoch: Instant,
}

/// How often, at most, pressure wakes the idle writers: often enough that they start flushing
/// well before decoding fills the last quarter of the budget, rarely enough that hundreds of
/// writers waking cost nothing measurable.
pub const PRESSURE_EVERY_MS: u64 = 25;

/// Flushes in flight (encoding or staging) per core below the limit: enough to keep every
/// core's encoder busy while another flush uploads.
const EARLY_FLUSHES: usize = 2;

impl BufferBudget {
    pub fn new(limit: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Self {
            limit: limit as usize,
            used: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            holders: AtomicUsize::new(0),
            flushing: AtomicUsize::new(0),
            committing: AtomicUsize::new(0),
            early_flushes: EARLY_FLUSHES * cores,
            pack: true,
            pressure: tokio::sync::Notify::new(),
            pressed_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
    /// Whether writers pack their buffers under pressure (the default) or flush them at once.
    pub fn packing(mut self, pack: bool) -> Self {
        self.pack = pack;
        self
    }
    /// See [`Self::packing`].
    pub fn packs(&self) -> bool {
        self.pack
    }
    /// A writer buffered `n` more bytes; `first` when its buffer was empty.
    pub fn add(&self, n: usize, first: bool) {
        self.used.fetch_add(n, Ordering::Relaxed);
        if first {
            self.holders.fetch_add(1, Ordering::Relaxed);
        }
        if self.used() > self.limit / 4 * 3 {
            self.wake_idle();
        }
    }
    /// Wakes the writers waiting in [`Self::pressed`], unless pressure woke them less than
    /// [`PRESSURE_EVERY_MS`] ago.
    fn wake_idle(&self) {
        let now = self.epoch.elapsed().as_millis() as u64 + PRESSURE_EVERY_MS;
        let last = self.pressed_at.load(Ordering::Relaxed);
        if now >= last + PRESSURE_EVERY_MS
            && self
                .pressed_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.pressure.notify_waiters();
        }
    }
    /// Resolves when memory pressure asks writers that are not receiving records to decide
    /// whether they flush ([`Self::should_flush`]).
    pub fn pressed(&self) -> tokio::sync::futures::Notified<'_> {
        self.pressure.notified()
    }
    /// A writer dropped its buffer of `n` bytes (`n > 0`).
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
        self.holders.fetch_sub(1, Ordering::Relaxed);
    }
    /// A writer packed `from` bytes of its buffer into `to` bytes (`sinks::packed`).
    pub fn repack(&self, from: usize, to: usize) {
        self.used.fetch_add(to, Ordering::Relaxed);
        self.used.fetch_sub(from, Ordering::Relaxed);
    }
    /// A writer starts flushing its buffer of `n` bytes (`n > 0`): buffered becomes in flight.
    pub fn start_flush(&self, n: usize) {
        self.release(n);
        self.in_flight.fetch_add(n, Ordering::Relaxed);
        self.flushing.fetch_add(1, Ordering::Relaxed);
    }
    /// The flush of `n` bytes started by [`Self::start_flush`] is staged (or abandoned).
    pub fn staged(&self, n: usize) {
        self.in_flight.fetch_sub(n, Ordering::Relaxed);
        self.flushing.fetch_sub(1, Ordering::Relaxed);
    }
    /// A staged flush keeps `n` bytes of decoded data until its commit ends (`end_flush`).
    pub fn hold(&self, n: usize) {
        self.in_flight.fetch_add(n, Ordering::Relaxed);
        self.committing.fetch_add(1, Ordering::Relaxed);
    }
    /// The `n` bytes [`Self::hold`] kept are committed or abandoned.
    pub fn end_flush(&self, n: usize) {
        self.in_flight.fetch_sub(n, Ordering::Relaxed);
        self.committing.fetch_sub(1, Ordering::Relaxed);
    }
    /// Flushes being encoded or staged, staged flushes committing (or waiting to), and
    /// writers holding a buffer.
    pub fn flushes(&self) -> (usize, usize, usize) {
        (
            self.flushing.load(Ordering::Relaxed),
            self.committing.load(Ordering::Relaxed),
            self.holders.load(Ordering::Relaxed),
        )
    }
    /// Bytes held by flushes in flight (being staged, or kept until their commit).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
    /// Buffered plus in flight.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed) + self.in_flight.load(Ordering::Relaxed)
    }
    pub fn over(&self) -> bool {
        self.used() > self.limit
    }
    /// Whether a writer holding `mine` bytes should flush now: holding at least the average
    /// buffer, and over the limit, or over three quarters of it with room among the flushes in
    /// flight while the buffers hold at least half of what is used.
    ///
    /// Below the limit, flushing early relieves memory only when the buffers are what fills it.
    /// When flushes in flight hold most of it (a tick's rows waiting for their shared files, an
    /// upsert's changes waiting for their commit), they free it as they end, and flushing the
    /// small buffers that refilled meanwhile would only commit small files of their own.
    pub fn should_flush(&self, mine: usize) -> bool {
        let used = self.used();
        if mine == 0 || used <= self.limit / 4 * 3 {
            return false;
        }
        let buffered = self.used.load(Ordering::Relaxed);
        let holders = self.holders.load(Ordering::Relaxed).max(1);
        if mine.saturating_mul(holders) < buffered {
            return false;
        }
        used > self.limit
            || (self.flushing.load(Ordering::Relaxed) < self.early_flushes
                && buffered.saturating_mul(2) >= used)
    }
}

#[cfg(test)]
mod tests {
    use super::BufferBudget;

    #[tokio::test]
    async fn pressure_wakes_idle_writers_past_three_quarters() {
        let b = BufferBudget::new(100);
        let wait = std::time::Duration::from_millis(200);
        let idle = b.pressed();
        b.add(70, true);
        assert!(
            tokio::time::timeout(wait, idle).await.is_err(),
            "under three quarters nobody is woken"
        );
        let idle = b.pressed();
        b.add(10, true);
        assert!(
            tokio::time::timeout(wait, idle).await.is_ok(),
            "past three quarters the waiting writers wake"
        );
        let idle = b.pressed();
        b.add(1, false);
        b.add(1, false);
        tokio::time::sleep(std::time::Duration::from_millis(
            super::PRESSURE_EVERY_MS * 2,
        ))
        .await;
        b.add(1, false);
        assert!(
            tokio::time::timeout(wait, idle).await.is_ok(),
            "pressure wakes them again after a while"
        );
    }

    #[test]
    fn only_large_holders_flush_under_pressure() {
        let b = BufferBudget::new(100);
        b.add(10, true);
        b.add(60, true);
        assert!(!b.should_flush(60), "under three quarters nobody flushes");
        b.add(40, true);
        assert!(b.over());
        assert!(b.should_flush(60), "the largest holder flushes");
        assert!(b.should_flush(40), "so does one over the average");
        assert!(!b.should_flush(10), "small holders keep buffering");
        b.start_flush(60);
        assert!(b.over(), "a flush in flight still counts");
        b.staged(60);
        assert!(!b.over());
        b.release(10);
        b.release(40);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn below_the_limit_a_few_flushes_at_a_time() {
        let b = BufferBudget::new(100);
        for _ in 0..b.early_flushes {
            b.add(1, true);
            b.start_flush(1);
        }
        b.add(39, true);
        b.add(40, true);
        assert!(b.used() > 75 && !b.over());
        assert!(
            !b.should_flush(40),
            "above three quarters, a flush waits for room among those in flight"
        );
        b.staged(1);
        assert!(b.should_flush(40), "room: the largest holder flushes");
        b.start_flush(40);
        b.add(45, false);
        assert!(
            b.over() && b.should_flush(84),
            "over the limit, flushes start whatever is in flight"
        );
    }

    #[test]
    fn buffers_refilling_beside_a_held_tick_wait_until_the_limit() {
        let b = BufferBudget::new(100);
        // A tick's 60 bytes wait for their shared files; two buffers refill meanwhile.
        b.add(60, true);
        b.start_flush(60);
        b.staged(60);
        b.hold(60);
        b.add(10, true);
        b.add(10, true);
        assert!(b.used() > 75 && !b.over());
        assert!(
            !b.should_flush(10),
            "flushing 10 bytes frees nothing the held tick does not free at its commit"
        );
        b.add(25, false);
        assert!(b.over());
        assert!(
            b.should_flush(35),
            "over the limit, the largest buffer flushes"
        );
        b.end_flush(60);
        assert!(!b.should_flush(35), "the tick's commit freed its memory");
    }

    #[test]
    fn changes_waiting_for_their_commit_put_the_buffers_under_pressure() {
        let b = BufferBudget::new(100);
        b.add(60, true);
        b.start_flush(60);
        b.staged(60);
        // The staged upsert keeps its 60 bytes of changes until the commit.
        b.hold(60);
        assert_eq!(b.flushes(), (0, 1, 0), "one flush committing, no buffer");
        b.add(50, true);
        assert!(
            b.over() && b.should_flush(50),
            "buffers flush while changes wait"
        );
        b.end_flush(60);
        assert!(!b.over());
        assert_eq!(b.flushes(), (0, 0, 1));
        assert_eq!(b.in_flight(), 0);
    }
}
