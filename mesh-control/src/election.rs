//! Leader election among the controller's replicas, sans-IO: what to do with a `Lease` as read,
//! and whether this replica leads right now. The reads and writes of the Lease itself are
//! `k8s::lease`'s; every replica serves nodes, only the leader writes status and creates the CA
//! Secret (see [`Leadership`]).
//!
//! The rules are client-go's (`tools/leaderelection`), with its default numbers:
//! - a candidate takes the Lease over when its record (holder, renew time, ...) has not changed
//!   for the lease duration (15 s) **as measured on the candidate's own clock from when it saw
//!   that record** — never from the timestamps inside it, so clock skew between nodes does not
//!   matter; an empty holder (a released Lease) is taken at once;
//! - the holder renews every 5 s, writing with the `resourceVersion` it read, so that of two
//!   writers exactly one succeeds (the other gets a conflict and stays a follower);
//! - the holder **stops leading 10 s (the renew deadline) after the last renewal it sent** that
//!   succeeded, even if it never hears back from the API server: 5 s before any other replica may
//!   take over. A deadline, not a flag, so a replica stuck in a hung request stops all the same.

use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

/// Lease timing. [`Timing::DEFAULT`] is client-go's (15 s / 10 s / 2 s), renewing every 5 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a record must stay unchanged before a candidate takes the Lease over.
    pub lease: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// The holder stops leading this long after its last successful renewal was sent.
    pub renew_deadline: Duration,
    /// How often a follower reads the Lease, and how soon a failed write is retried.
    pub retry: Duration,
}

impl Timing {
    pub const DEFAULT: Self = Self {
        lease: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
        renew_deadline: Duration::from_secs(10),
        retry: Duration::from_secs(2),
    };

    /// Safe only if the holder stops before anyone may take over, and renews well before that.
    pub fn is_safe(&self) -> bool {
        self.renew_every < self.renew_deadline && self.renew_deadline < self.lease && !self.retry.is_zero()
    }
}

/// The Lease as read: only what the decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `None` when the Lease is released (or was never held).
    pub holder: Option<String>,
    /// `resourceVersion`: any write, a renewal included, changes it.
    pub version: String,
    /// `leaseTransitions`, carried on to the next holder.
    pub transitions: i32,
}

/// The write to make now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// No Lease exists: create it, held by us.
    Create,
    /// Write the Lease with us as holder, if it still has this `resourceVersion`. `transitions`
    /// is the value to write: one more than read when we take it over, unchanged on a renewal.
    Claim { version: String, transitions: i32 },
    /// Nothing to write before this instant (then read again).
    WaitUntil(Instant),
}

/// One replica's view of the election.
#[derive(Debug)]
pub struct Election {
    me: String,
    timing: Timing,
    /// The last record read, and when we first saw it as it is (our clock).
    seen: Option<(Record, Instant)>,
    /// When the last successful renewal (or acquisition) was sent, while we lead.
    renewed: Option<Instant>,
}

impl Election {
    pub fn new(me: impl Into<String>, timing: Timing) -> Self {
        debug_assert!(timing.is_safe(), "{timing:?}");
        Self { me: me.into(), timing, seen: None, renewed: None }
    }

    pub fn identity(&self) -> &str {
        &self.me
    }

    /// Until when we lead (exclusive), or `None` when we do not.
    pub fn leading_until(&self) -> Option<Instant> {
        self.renewed.map(|at| at + self.timing.renew_deadline)
    }

    pub fn is_leader(&self, now: Instant) -> bool {
        self.leading_until().is_some_and(|until| now < until)
    }

    /// The Lease as read at `now` (`None`: it does not exist): what to write, if anything.
    pub fn observe(&mut self, lease: Option<Record>, now: Instant) -> Action {
        self.expire(now);
        let Some(record) = lease else {
            self.seen = None;
            self.renewed = None;
            return Action::Create;
        };
        let since = match &self.seen {
            Some((old, at)) if *old == record => *at,
            _ => now,
        };
        self.seen = Some((record.clone(), since));
        match record.holder.as_deref() {
            Some(h) if h == self.me => {
                // Ours: renew when due. (Also after a restart under the same name: the process
                // that held it is gone, so the Lease is ours to keep.)
                let due = self.renewed.map_or(now, |at| at + self.timing.renew_every);
                if now >= due { Action::Claim { version: record.version, transitions: record.transitions } } else { Action::WaitUntil(due) }
            }
            holder => {
                // Someone else's (or nobody's): we do not lead, whatever we thought.
                self.renewed = None;
                let free_at = if holder.is_none() { since } else { since + self.timing.lease };
                if now >= free_at {
                    Action::Claim { version: record.version, transitions: record.transitions.saturating_add(1) }
                } else {
                    Action::WaitUntil(free_at.min(now + self.timing.retry))
                }
            }
        }
    }

    /// Our write, sent at `sent`, succeeded: we lead until `sent` + the renew deadline.
    pub fn written(&mut self, sent: Instant) {
        self.renewed = Some(sent);
        // The next read shows a new version written by us: nothing to wait for.
        self.seen = None;
    }

    /// Our write failed. A conflict means someone else wrote first: we do not lead. Any other
    /// error keeps us leading until the deadline (the API server may be briefly unreachable).
    pub fn write_failed(&mut self, conflict: bool, now: Instant) {
        if conflict {
            self.renewed = None;
        }
        self.expire(now);
    }

    /// When to act next if nothing fails: renew (leader) or read again (follower).
    pub fn next_wakeup(&self, now: Instant) -> Instant {
        match self.renewed {
            Some(at) if self.is_leader(now) => (at + self.timing.renew_every).max(now),
            _ => now + self.timing.retry,
        }
    }

    fn expire(&mut self, now: Instant) {
        if !self.is_leader(now) {
            self.renewed = None;
        }
    }
}

/// Whether this replica leads, as the rest of the controller sees it: a deadline published by
/// the election loop, checked against the clock at each use, so it turns false on time even if
/// the loop is stuck.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<Lead>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lead {
    /// A single controller with nobody to elect against (file mode): always leads.
    Alone,
    Follower,
    LeaderUntil(Instant),
}

impl Leadership {
    /// A handle that always leads (file mode, tests of the leader's paths).
    pub fn alone() -> Self {
        let (_tx, rx) = watch::channel(Lead::Alone);
        Self { rx }
    }

    /// The sending side for the election loop, and a handle for everyone else.
    pub fn channel() -> (watch::Sender<Lead>, Self) {
        let (tx, rx) = watch::channel(Lead::Follower);
        (tx, Self { rx })
    }

    pub fn is_leader(&self) -> bool {
        match *self.rx.borrow() {
            Lead::Alone => true,
            Lead::Follower => false,
            Lead::LeaderUntil(until) => Instant::now() < until,
        }
    }

    /// Resolves when leadership may have changed: a new value from the election loop, or the
    /// current deadline passing. Never resolves for [`Leadership::alone`].
    pub async fn changed(&mut self) {
        // `borrow`, not `borrow_and_update`: a value sent since the last call must still wake us.
        let deadline = match *self.rx.borrow() {
            Lead::LeaderUntil(until) if until > Instant::now() => Some(until),
            _ => None,
        };
        let sleep = async {
            match deadline {
                Some(until) => tokio::time::sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.rx.changed() => if r.is_err() { std::future::pending::<()>().await },
            () = sleep => {}
        }
    }

    /// Resolves once this replica leads.
    pub async fn acquired(&mut self) {
        while !self.is_leader() {
            self.changed().await;
        }
    }
}

#[cfg(test)]
#[path = "election_tests.rs"]
mod tests;
