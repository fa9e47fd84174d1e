//! Per-source token buckets for what an unauthenticated client can make expensive: the
//! controller's node bootstrap (`CreateNodeCertificate`: a TokenReview on the API server, then a
//! signature) and the node daemon's HBONE handshakes (a key exchange and a signature each).
//! Sources are IPv4 addresses and IPv6 /64s (one host holds a whole /64). The table is bounded:
//! past [`MAX_SOURCES`] it forgets the buckets that have refilled (sources quiet long enough to be
//! as good as new), and if every tracked source is still busy, a new one is refused until some
//! refill (fail closed).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::bucket::{Bucket, Refill};

/// Sources tracked at once.
pub const MAX_SOURCES: usize = 4096;

/// Calls allowed per source: `burst` at once, then `per_minute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rate {
    pub burst: u32,
    pub per_minute: u32,
}

pub struct PerSource {
    fill: Refill,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl PerSource {
    pub fn new(rate: Rate) -> Self {
        let fill = Refill {
            max_tokens: rate.burst.max(1),
            tokens_per_fill: 1,
            interval: Duration::from_mins(1) / rate.per_minute.max(1),
        };
        Self {
            fill,
            buckets: Mutex::default(),
        }
    }

    /// Takes one call's token for `source` at `now`: `Err` carries how long until it may call again.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let (key, fill) = (prefix(source), &self.fill);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !buckets.contains_key(&key) && buckets.len() >= MAX_SOURCES {
            buckets.retain(|_, b| {
                b.refill(fill, now);
                b.tokens < fill.max_tokens
            });
            if buckets.len() >= MAX_SOURCES {
                return Err(fill.interval);
            }
        }
        let bucket = buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(fill, now));
        if bucket.take(fill, now) {
            Ok(())
        } else {
            Err(bucket.reset_in(fill, now))
        }
    }
}

/// The unit a limit applies to: the address for IPv4, its /64 for IPv6.
fn prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        burst: 3,
        per_minute: 60,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_burst_then_the_rate_per_source() {
        let limit = PerSource::new(RATE);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limit.admit(ip("10.0.0.1"), t0).is_ok());
        }
        let wait = limit.admit(ip("10.0.0.1"), t0).expect_err("burst spent");
        assert_eq!(
            wait,
            Duration::from_secs(1),
            "one call per second at 60/min"
        );
        assert!(
            limit.admit(ip("10.0.0.2"), t0).is_ok(),
            "another source has its own bucket"
        );
        assert!(
            limit
                .admit(ip("10.0.0.1"), t0 + Duration::from_millis(1100))
                .is_ok(),
            "refilled one"
        );
        assert!(
            limit
                .admit(ip("10.0.0.1"), t0 + Duration::from_millis(1200))
                .is_err()
        );
        for _ in 0..3 {
            assert!(
                limit
                    .admit(ip("10.0.0.1"), t0 + Duration::from_mins(10))
                    .is_ok(),
                "a full burst again, no more"
            );
        }
        assert!(
            limit
                .admit(ip("10.0.0.1"), t0 + Duration::from_mins(10))
                .is_err()
        );
    }

    #[test]
    fn ipv6_sources_share_their_64_and_mapped_ipv4_is_ipv4() {
        let limit = PerSource::new(RATE);
        let t0 = Instant::now();
        for host in 1..=3 {
            assert!(
                limit
                    .admit(ip(&format!("2001:db8:1:2::{host}")), t0)
                    .is_ok()
            );
        }
        assert!(
            limit.admit(ip("2001:db8:1:2:ffff::9"), t0).is_err(),
            "same /64"
        );
        assert!(
            limit.admit(ip("2001:db8:1:3::1"), t0).is_ok(),
            "another /64"
        );
        for _ in 0..3 {
            assert!(limit.admit(ip("10.0.0.7"), t0).is_ok());
        }
        assert!(
            limit.admit(ip("::ffff:10.0.0.7"), t0).is_err(),
            "the same IPv4 host"
        );
    }

    #[test]
    fn the_table_is_bounded_and_forgets_quiet_sources_first() {
        let limit = PerSource::new(RATE);
        let t0 = Instant::now();
        for i in 0..u32::try_from(MAX_SOURCES).expect("small") {
            assert!(limit.admit(IpAddr::V4(i.into()), t0).is_ok());
        }
        assert!(
            limit.admit(ip("203.0.113.1"), t0).is_err(),
            "every tracked source is busy: a new one waits"
        );
        let later = t0 + Duration::from_secs(5);
        assert!(
            limit.admit(ip("203.0.113.1"), later).is_ok(),
            "refilled sources are forgotten, making room"
        );
        assert!(limit.buckets.lock().expect("lock").len() <= 1);
    }
}
