//! Outlier detection, Envoy's consecutive-error kind as Istio configures it: an endpoint that
//! answers `consecutive_5xx` 5xx in a row (or `consecutive_gateway` 502/503/504 or connection
//! failures in a row) is ejected from balancing for `base_ejection_time` × the number of times it
//! has been ejected (capped at 300 s or the base, whichever is larger); the multiplier goes down
//! by one for every `interval` the endpoint then stays in. At most `max_ejection_percent` of the
//! endpoints are out at once, but at least one may be (Envoy's rule). Below
//! `min_health_percent` endpoints in, ejections are ignored (panic mode).
//!
//! One [`Detector`] per Service (or subset) on a node. The node steers the kernel's tables with
//! [`Detector::ejected`] too, so L4 clients of the Service stop getting an ejected endpoint.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::policy::OutlierDetection;

/// Longest ejection (Envoy's `max_ejection_time` default), unless the base is longer.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What became of one request to an endpoint, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Status(u16),
    /// No answer: connect failure, reset, timeout (counted as a gateway error, as Envoy does
    /// with local-origin errors when they are not split).
    Failure,
}

#[derive(Debug, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    /// Ejections that still multiply the next one's length.
    times: u32,
    /// When `times` last went down (or the host came back).
    quiet_since: Option<Instant>,
}

pub struct Detector {
    cfg: OutlierDetection,
    hosts: Mutex<HashMap<SocketAddr, Host>>,
    /// `hosts.len()`, readable without the lock: the common case (a success, no endpoint with
    /// a history) takes no lock at all.
    tracked: AtomicUsize,
}

impl Detector {
    pub fn new(cfg: OutlierDetection) -> Self {
        Self {
            cfg,
            hosts: Mutex::default(),
            tracked: AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> &OutlierDetection {
        &self.cfg
    }

    /// Counts one outcome of `addr`, one of `endpoints` endpoints. `true`: it was just ejected.
    pub fn observe(
        &self,
        addr: SocketAddr,
        outcome: Outcome,
        endpoints: usize,
        now: Instant,
    ) -> bool {
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => ((500..600).contains(&s), matches!(s, 502..=504)),
            Outcome::Failure => (true, true),
        };
        if !is_5xx && self.tracked.load(Ordering::Relaxed) == 0 {
            return false; // the common case: a success, and no endpoint with a history
        }
        let mut hosts = self.hosts.lock().expect("outlier lock");
        if !is_5xx && !hosts.contains_key(&addr) {
            return false;
        }
        let ejected_now = hosts.values().filter(|h| h.ejected_until.is_some()).count();
        if !hosts.contains_key(&addr) {
            hosts.insert(addr, Host::default());
            self.tracked.store(hosts.len(), Ordering::Relaxed);
        }
        let h = hosts.get_mut(&addr).expect("just inserted");
        if h.ejected_until.is_some() {
            return false; // requests already in flight when it was ejected
        }
        h.consecutive_5xx = if is_5xx { h.consecutive_5xx + 1 } else { 0 };
        h.consecutive_gateway = if is_gateway {
            h.consecutive_gateway + 1
        } else {
            0
        };
        let tripped = (self.cfg.consecutive_5xx > 0
            && h.consecutive_5xx >= self.cfg.consecutive_5xx)
            || (self.cfg.consecutive_gateway > 0
                && h.consecutive_gateway >= self.cfg.consecutive_gateway);
        if !tripped {
            return false;
        }
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        if !self.may_eject(ejected_now, endpoints) {
            return false;
        }
        h.times += 1;
        let base = self.cfg.base_ejection_time;
        let length = base.saturating_mul(h.times).min(MAX_EJECTION.max(base));
        h.ejected_until = Some(now + length);
        h.quiet_since = None;
        true
    }

    /// At most `max_ejection_percent` of the endpoints out, but one may always be.
    fn may_eject(&self, ejected: usize, endpoints: usize) -> bool {
        let cap = (endpoints * self.cfg.max_ejection_percent as usize / 100).max(1);
        ejected < cap && ejected < endpoints
    }

    /// Lets back the endpoints whose ejection is over and lowers the multiplier of those that
    /// stayed in for an `interval`. Returns the endpoints that came back (none: the ejected set
    /// did not change).
    pub fn sweep(&self, now: Instant) -> Vec<SocketAddr> {
        let mut back = Vec::new();
        let mut hosts = self.hosts.lock().expect("outlier lock");
        hosts.retain(|addr, h| {
            if h.ejected_until.is_some_and(|t| now >= t) {
                h.ejected_until = None;
                h.quiet_since = Some(now);
                back.push(*addr);
            }
            if h.ejected_until.is_none()
                && h.times > 0
                && h.quiet_since
                    .is_some_and(|q| now.duration_since(q) >= self.cfg.interval)
            {
                h.times -= 1;
                h.quiet_since = Some(now);
            }
            // Forget endpoints with nothing to remember (bounded by the endpoints that fail).
            h.ejected_until.is_some()
                || h.times > 0
                || h.consecutive_5xx > 0
                || h.consecutive_gateway > 0
        });
        self.tracked.store(hosts.len(), Ordering::Relaxed);
        back
    }

    /// The endpoints out of balancing among `endpoints` of them, `None` if none is, or in panic
    /// mode (fewer than `min_health_percent` would be left).
    pub fn ejected(&self, endpoints: usize) -> Option<Vec<SocketAddr>> {
        let hosts = self.hosts.lock().expect("outlier lock");
        let out: Vec<SocketAddr> = hosts
            .iter()
            .filter(|(_, h)| h.ejected_until.is_some())
            .map(|(a, _)| *a)
            .collect();
        if out.is_empty() {
            return None;
        }
        let healthy = endpoints.saturating_sub(out.len());
        if endpoints == 0 || healthy * 100 < endpoints * self.cfg.min_health_percent as usize {
            return None;
        }
        Some(out)
    }

    /// Whether any endpoint is out right now (a cheap check before [`Detector::ejected`]).
    pub fn any_ejected(&self) -> bool {
        self.hosts
            .lock()
            .expect("outlier lock")
            .values()
            .any(|h| h.ejected_until.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 50,
            min_health_percent: 0,
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 2, i], 8080))
    }

    #[test]
    fn consecutive_5xx_eject_and_a_success_resets_the_count() {
        let d = Detector::new(cfg());
        let t = Instant::now();
        assert!(!d.observe(addr(1), Outcome::Status(503), 4, t));
        assert!(!d.observe(addr(1), Outcome::Status(500), 4, t));
        assert!(
            !d.observe(addr(1), Outcome::Status(200), 4, t),
            "a success resets"
        );
        assert!(!d.observe(addr(1), Outcome::Status(503), 4, t));
        assert!(!d.observe(addr(1), Outcome::Failure, 4, t));
        assert!(
            d.observe(addr(1), Outcome::Status(503), 4, t),
            "third in a row"
        );
        assert_eq!(d.ejected(4), Some(vec![addr(1)]));
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_decays_when_quiet() {
        let d = Detector::new(cfg());
        let t0 = Instant::now();
        let trip = |t| (0..3).fold(false, |_, _| d.observe(addr(1), Outcome::Status(500), 4, t));
        assert!(trip(t0));
        assert_eq!(d.sweep(t0 + Duration::from_secs(9)), [], "still out at 9 s");
        assert_eq!(
            d.sweep(t0 + Duration::from_secs(10)),
            [addr(1)],
            "back after the base time"
        );
        assert_eq!(d.ejected(4), None);
        let t1 = t0 + Duration::from_millis(10_500);
        assert!(trip(t1), "ejected again at once");
        assert_eq!(
            d.sweep(t1 + Duration::from_secs(19)),
            [],
            "second ejection lasts twice the base"
        );
        assert_eq!(d.sweep(t1 + Duration::from_secs(20)), [addr(1)]);
        // Quiet for two intervals: the multiplier is back to 0, the next ejection is 10 s again.
        let t2 = t1 + Duration::from_secs(20);
        d.sweep(t2 + Duration::from_secs(1));
        d.sweep(t2 + Duration::from_secs(2));
        let t3 = t2 + Duration::from_secs(3);
        assert!(trip(t3));
        assert_eq!(
            d.sweep(t3 + Duration::from_secs(10)),
            [addr(1)],
            "base time only"
        );
    }

    #[test]
    fn at_most_the_max_share_is_ejected_but_always_one_may_be() {
        let d = Detector::new(cfg());
        let t = Instant::now();
        for i in 1..=3 {
            for _ in 0..3 {
                d.observe(addr(i), Outcome::Status(503), 4, t);
            }
        }
        assert_eq!(d.ejected(4).map(|e| e.len()), Some(2), "50 % of 4");
        let one = Detector::new(OutlierDetection {
            max_ejection_percent: 10,
            ..cfg()
        });
        for _ in 0..3 {
            one.observe(addr(1), Outcome::Status(503), 2, t);
        }
        assert_eq!(
            one.ejected(2).map(|e| e.len()),
            Some(1),
            "10 % of 2 still ejects one"
        );
    }

    #[test]
    fn gateway_errors_count_separately_and_panic_mode_ignores_ejections() {
        let d = Detector::new(OutlierDetection {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            min_health_percent: 60,
            max_ejection_percent: 100,
            ..cfg()
        });
        let t = Instant::now();
        assert!(
            !d.observe(addr(1), Outcome::Status(500), 2, t),
            "500 is not a gateway error"
        );
        assert!(!d.observe(addr(1), Outcome::Status(500), 2, t));
        assert!(!d.observe(addr(1), Outcome::Status(502), 2, t));
        assert!(d.observe(addr(1), Outcome::Failure, 2, t));
        assert_eq!(
            d.ejected(2),
            None,
            "one of two in is 50 % < 60 %: panic, everyone balances"
        );
        assert_eq!(d.ejected(3), Some(vec![addr(1)]), "two of three in is 66 %");
    }
}
