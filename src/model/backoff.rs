//! How agentq waits before trying again after a failure it cannot fix
//! itself (Redis or PostgreSQL unreachable, a call whose reply was lost):
//! exponentially from 100 ms to 5 s, with jitter so a fleet that lost its
//! Redis at once does not knock all together when it comes back, and
//! without a limit (a worker waits for its servers, it does not give up).
//!
//! One policy for every retry loop, built on `backon` (a well-kept crate:
//! its `Retryable` runs an operation until it succeeds, and its delays are a
//! plain iterator for loops that pace themselves).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// First delay.
pub const FIRST: Duration = Duration::from_millis(100);
/// Longest delay.
pub const MOST: Duration = Duration::from_secs(5);

/// The retry policy (for `backon::Retryable::retry`).
pub fn policy() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(FIRST)
        .with_max_delay(MOST)
        .with_jitter()
        .without_max_times()
}

/// Delays for a loop that paces itself: `next()` after each failure,
/// [`Pacing::reset`] after a success.
pub struct Pacing {
    delays: ExponentialBackoff,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            delays: policy().build(),
        }
    }
}

impl Pacing {
    /// How long to wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(MOST)
    }

    /// Start over (after a success).
    pub fn reset(&mut self) {
        *self = Pacing::default();
    }
}

/// How long a failed job waits before its next attempt: uniform in
/// [d/2, d] with d = `base` * 2^(attempt-1), at most `max` (the jitter
/// spreads the retries of jobs that failed together).
pub fn retry_delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    let d = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let half = d / 2;
    half + Duration::from_millis(rand::random_range(0..=half.as_millis().max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_never_end() {
        let mut p = Pacing::default();
        let first = p.next_delay();
        assert!(first >= FIRST && first <= FIRST * 2, "{first:?}");
        let later: Vec<Duration> = (0..20).map(|_| p.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= MOST * 2), "{later:?}");
        assert!(later[19] >= MOST, "{later:?}");
        p.reset();
        assert!(p.next_delay() <= FIRST * 2);
    }

    #[test]
    fn job_retries_grow_with_jitter_and_cap() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..50 {
            let b1 = retry_delay(base, max, 1);
            assert!(
                b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(101),
                "{b1:?}"
            );
            let b3 = retry_delay(base, max, 3);
            assert!(
                b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(401),
                "{b3:?}"
            );
            assert!(retry_delay(base, max, 30) <= Duration::from_millis(1001));
        }
    }
}
