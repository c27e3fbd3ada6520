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
}
