//! The one retry loop of the service: what is retried (errors the caller calls retryable),
//! how often and how long apart (a [`Policy`]), and what is reported between attempts.
//!
//! Every retried call in the pipeline and the source goes through [`retry`] (or, for calls
//! that hand their input back on failure, a [`Attempts`] counter with the same schedule), so
//! the schedule is set in one place. Sinks retry nothing themselves beyond their own commit
//! protocol's conflict loop (a lost race is not an error).

use std::time::Duration;

/// How many times, and how far apart.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Retries after the first attempt.
    pub retries: u32,
    /// The first wait; each next one doubles, up to `max`.
    pub first: Duration,
    pub max: Duration,
    /// Adds up to a quarter of each wait at random, so members that failed together do not
    /// retry together.
    pub jitter: bool,
}

impl Policy {
    /// Sink, registry and dead-letter calls of a running worker: 12 retries, 200 ms doubling
    /// to 25.6 s (about two and a half minutes in all), with jitter.
    pub const WORKER: Policy = Policy {
        retries: 12,
        first: Duration::from_millis(200),
        max: Duration::from_millis(25_600),
        jitter: true,
    };
    /// Reading a position during an assignment: 8 retries, 400 ms doubling (about a minute
    /// and a half), bounded in practice by the assignment's deadline.
    pub const RECOVERY: Policy = Policy {
        retries: 8,
        first: Duration::from_millis(400),
        max: Duration::from_secs(60),
        jitter: false,
    };
    /// A seek of the consumer: 4 retries, 200 ms doubling.
    pub const SEEK: Policy = Policy {
        retries: 4,
        first: Duration::from_millis(200),
        max: Duration::from_secs(5),
        jitter: false,
    };

    /// The wait before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .first
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.max);
        if self.jitter {
            let quarter = base.as_millis() as u64 / 4;
            base + Duration::from_millis(rand::random::<u64>() % (quarter + 1))
        } else {
            base
        }
    }
}

/// A call that failed after its retries (or at once, when not retryable).
#[derive(Debug)]
pub struct GaveUp<E> {
    /// Attempts made, the first included.
    pub attempts: u32,
    pub error: E,
}

/// Runs `op` until it succeeds, fails with an error `retryable` refuses, or `policy`'s
/// retries are spent; `on_retry(attempt, &error)` runs before each wait.
pub async fn retry<T, E, Fut>(
    policy: Policy,
    mut op: impl FnMut() -> Fut,
    retryable: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(u32, &E),
) -> Result<T, GaveUp<E>>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempts = Attempts::new(policy);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) && attempts.left() => {
                on_retry(attempts.made(), &e);
                attempts.wait().await;
            }
            Err(error) => {
                return Err(GaveUp {
                    attempts: attempts.made(),
                    error,
                })
            }
        }
    }
}

/// The same schedule as [`retry`], for a loop that must own what it retries (a decoder hands
/// a record back with its error).
#[derive(Debug)]
pub struct Attempts {
    policy: Policy,
    retried: u32,
}

impl Attempts {
    pub fn new(policy: Policy) -> Self {
        Self { policy, retried: 0 }
    }
    /// Whether another retry is allowed.
    pub fn left(&self) -> bool {
        self.retried < self.policy.retries
    }
    /// Attempts made so far, the first included.
    pub fn made(&self) -> u32 {
        self.retried + 1
    }
    /// Retries made so far.
    pub fn retried(&self) -> u32 {
        self.retried
    }
    /// Waits before the next retry.
    pub async fn wait(&mut self) {
        self.retried += 1;
        tokio::time::sleep(self.policy.delay(self.retried)).await;
    }
    /// Blocks the thread before the next retry (the source's poll thread).
    pub fn wait_blocking(&mut self) {
        self.retried += 1;
        std::thread::sleep(self.policy.delay(self.retried));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_maximum() {
        let p = Policy {
            jitter: false,
            ..Policy::WORKER
        };
        assert_eq!(p.delay(1), Duration::from_millis(200));
        assert_eq!(p.delay(2), Duration::from_millis(400));
        assert_eq!(p.delay(8), Duration::from_millis(25_600));
        assert_eq!(p.delay(9), Duration::from_millis(25_600));
        assert_eq!(p.delay(40), Duration::from_millis(25_600));
        let j = Policy::WORKER.delay(3);
        assert!(j >= Duration::from_millis(800) && j <= Duration::from_millis(1000));
    }

    const QUICK: Policy = Policy {
        retries: 4,
        first: Duration::from_millis(1),
        max: Duration::from_millis(2),
        jitter: true,
    };

    #[tokio::test]
    async fn retries_only_what_is_retryable_and_stops_when_spent() {
        let mut calls = 0;
        let r: Result<(), GaveUp<bool>> = retry(
            QUICK,
            || {
                calls += 1;
                async { Err(true) }
            },
            |e| *e,
            |_, _| {},
        )
        .await;
        assert_eq!(r.unwrap_err().attempts, 5);
        assert_eq!(calls, 5, "the first attempt and four retries");
        let mut calls = 0;
        let r: Result<(), GaveUp<bool>> = retry(
            QUICK,
            || {
                calls += 1;
                async { Err(false) }
            },
            |e| *e,
            |_, _| {},
        )
        .await;
        assert_eq!((r.unwrap_err().attempts, calls), (1, 1));
        let mut calls = 0;
        let r = retry(
            QUICK,
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(true)
                    } else {
                        Ok(n)
                    }
                }
            },
            |e| *e,
            |_, _| {},
        )
        .await;
        assert_eq!(r.unwrap(), 3);
    }
}
