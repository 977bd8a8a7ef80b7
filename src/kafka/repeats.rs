//! Repeated client errors logged once per [`EVERY`], with how many were held back.
//!
//! librdkafka reports some errors on every reconnect attempt: with the broker unreachable,
//! "1/1 brokers are down" arrives about 20 times a second. The first occurrence of a message is
//! logged at once; the same message again within [`EVERY`] is only counted, and the next one
//! after it is logged with that count. Invariant: every distinct message is logged, and a
//! condition that lasts is logged at least once per [`EVERY`].

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How often a repeated message is logged again.
pub const EVERY: Duration = Duration::from_secs(30);

/// Past this many distinct messages the oldest knowledge is dropped (messages that carry
/// changing details would otherwise grow the map).
const MAX_TRACKED: usize = 256;

static SEEN: LazyLock<Mutex<HashMap<String, (Instant, u64)>>> = LazyLock::new(Mutex::default);

/// Whether `message` should be logged now: `Some(n)` with the `n` repeats held back since it
/// was last logged, `None` to hold this one back.
pub fn admit(message: &str) -> Option<u64> {
    admit_at(&mut SEEN.lock().expect("repeats"), message, Instant::now())
}

fn admit_at(
    seen: &mut HashMap<String, (Instant, u64)>,
    message: &str,
    now: Instant,
) -> Option<u64> {
    if let Some((logged, held)) = seen.get_mut(message) {
        if now.duration_since(*logged) < EVERY {
            *held += 1;
            return None;
        }
        let n = *held;
        *logged = now;
        *held = 0;
        return Some(n);
    }
    if seen.len() >= MAX_TRACKED {
        seen.clear();
    }
    seen.insert(message.to_string(), (now, 0));
    Some(0)
}

/// ` (repeated N times in the last 30s)` for a message logged after `held` repeats, else "".
pub fn suffix(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" (and {held} more times in the last {}s)", EVERY.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_message_is_logged_once_per_period_with_its_count() {
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        assert_eq!(admit_at(&mut seen, "down", t0), Some(0));
        for i in 1..=50 {
            assert_eq!(
                admit_at(&mut seen, "down", t0 + Duration::from_millis(51 * i)),
                None
            );
        }
        // Another message is not held back by the first.
        assert_eq!(
            admit_at(&mut seen, "other", t0 + Duration::from_secs(1)),
            Some(0)
        );
        assert_eq!(admit_at(&mut seen, "down", t0 + EVERY), Some(50));
        assert_eq!(
            admit_at(&mut seen, "down", t0 + EVERY + Duration::from_secs(1)),
            None
        );
        assert_eq!(suffix(50), " (and 50 more times in the last 30s)");
        assert_eq!(suffix(0), "");
    }
}
