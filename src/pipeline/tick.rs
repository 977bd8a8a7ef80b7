//! The latency tick grid: the moments at which partition workers cut their `max_latency`
//! flushes.
//!
//! Invariants:
//! - Every worker of one process cuts on one grid (the same period gives the same instants), so
//!   the partitions of a table that hold rows flush at one moment, and a sink writes them into
//!   shared files and one commit (see [`sinks::Tick`]).
//! - Each process's grid is shifted by its own phase within the period, drawn once at random:
//!   the members of a consumer group committing to one table spread their commits over the
//!   period instead of all racing for the table's next log entry at the same instant, which
//!   costs one lost race per member per round (a conflict storm; measured in BENCHMARKS.md,
//!   "Commit contention"). No coordinator is needed.
//! - A record still waits at most `max_latency` before its flush is cut.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// The environment variable that pins the phase instead of drawing it: a fraction of the
/// period in `[0, 1)`; `0` cuts on multiples of `max_latency` since the epoch (for a single
/// member that should flush at round wall-clock times, and for tests that produce just after a
/// tick).
pub const PHASE_VAR: &str = "LAKESINK_TICK_PHASE";

/// This process's phase: a fraction of any latency period, pinned by [`PHASE_VAR`] or drawn
/// once.
pub fn process_phase() -> f64 {
    static PHASE: OnceLock<f64> = OnceLock::new();
    *PHASE.get_or_init(|| {
        pinned_phase()
            .ok()
            .flatten()
            .unwrap_or_else(rand::random::<f64>)
    })
}

/// The phase [`PHASE_VAR`] pins, if set; an error naming the variable if it is not a fraction
/// in `[0, 1)` (checked when the service starts).
pub fn pinned_phase() -> Result<Option<f64>, String> {
    let Ok(text) = std::env::var(PHASE_VAR) else {
        return Ok(None);
    };
    match text.trim().parse::<f64>() {
        Ok(phase) if (0.0..1.0).contains(&phase) => Ok(Some(phase)),
        _ => Err(format!(
            "{PHASE_VAR} = `{text}`: the tick phase is a fraction of max_latency in [0, 1), \
             e.g. 0 for multiples of max_latency since the epoch; unset it to draw one at random"
        )),
    }
}

/// The first tick after `now_ms` on the grid of `period_ms` shifted by `phase` (a fraction of
/// the period), in ms since the Unix epoch.
pub fn next_at(now_ms: u64, period_ms: u64, phase: f64) -> u64 {
    let period = period_ms.max(1);
    let offset = ((phase.clamp(0.0, 1.0) * period as f64) as u64).min(period - 1);
    if now_ms < offset {
        return offset;
    }
    ((now_ms - offset) / period + 1) * period + offset
}

/// The first latency tick after now on this process's grid, as an instant and in ms since the
/// Unix epoch.
pub fn next_tick(latency: Duration) -> (Instant, u64) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let at_ms = next_at(now_ms, latency.as_millis() as u64, process_phase());
    (
        Instant::now() + Duration::from_millis(at_ms - now_ms),
        at_ms,
    )
}

/// How long after a tick a sink may wait for the other partitions' flushes of that tick: a
/// twentieth of `max_latency`, between 10 ms and 1 s.
pub fn gather_window(latency: Duration) -> Duration {
    (latency / 20).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_one_period_apart_at_the_phase() {
        // Phase 0 is the epoch grid.
        assert_eq!(next_at(10_500, 1000, 0.0), 11_000);
        assert_eq!(next_at(11_000, 1000, 0.0), 12_000);
        // A quarter period later, every period.
        assert_eq!(next_at(10_100, 1000, 0.25), 10_250);
        assert_eq!(next_at(10_250, 1000, 0.25), 11_250);
        assert_eq!(next_at(10_300, 1000, 0.25), 11_250);
        // Never more than a period away, whatever the phase.
        for phase in [0.0, 0.1, 0.5, 0.999, 1.0] {
            for now in [0, 1, 999, 1000, 123_456_789] {
                let at = next_at(now, 1000, phase);
                assert!(at > now && at - now <= 1000, "{now} {phase} -> {at}");
            }
        }
    }

    #[test]
    fn one_process_has_one_phase() {
        assert_eq!(process_phase(), process_phase());
        assert!((0.0..1.0).contains(&process_phase()));
    }
}
