//! Envoy's token bucket: whole tokens, `tokens_per_fill` added every `interval`, never above
//! `max_tokens`. Local rate limits (`layer::rate_limit`) and the per-source limits on
//! unauthenticated work (`per_source`) both count with it.

use std::time::{Duration, Instant};

/// How a bucket fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refill {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub interval: Duration,
}

/// One bucket's state.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    pub tokens: u32,
    /// Start of the current fill interval.
    filled: Instant,
}

impl Bucket {
    pub fn full(fill: &Refill, now: Instant) -> Self {
        Self {
            tokens: fill.max_tokens,
            filled: now,
        }
    }

    /// Adds the fills due by `now`, then takes a token if there is one.
    pub fn take(&mut self, fill: &Refill, now: Instant) -> bool {
        self.refill(fill, now);
        if self.tokens > 0 {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }

    /// Adds the fills due by `now`.
    pub fn refill(&mut self, fill: &Refill, now: Instant) {
        let elapsed = now.duration_since(self.filled);
        let fills = elapsed.as_nanos() / fill.interval.as_nanos().max(1);
        if fills > 0 {
            let added = u64::from(fill.tokens_per_fill)
                .saturating_mul(u64::try_from(fills).unwrap_or(u64::MAX));
            self.tokens =
                u32::try_from((u64::from(self.tokens) + added).min(u64::from(fill.max_tokens)))
                    .expect("at most max_tokens");
            self.filled += fill.interval * u32::try_from(fills).unwrap_or(u32::MAX);
        }
    }

    /// Until the next fill.
    pub fn reset_in(&self, fill: &Refill, now: Instant) -> Duration {
        (self.filled + fill.interval).saturating_duration_since(now)
    }
}
