//! The election's reads and writes: the `coordination.k8s.io/v1` Lease `mesh-control-leader` in
//! the controller's namespace, written with the `resourceVersion` it was read at (optimistic
//! concurrency: of two replicas writing the same version, one gets 409 Conflict). The decisions
//! are `election`'s; this module only turns them into requests and publishes the outcome.
//!
//! On shutdown the leader releases the Lease (empty holder), so the other replica takes over at
//! its next read (2 s) instead of after the lease duration.

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::watch, time::Instant};

use crate::election::{Action, Election, Lead, Record, Timing};

pub const LEASE_NAME: &str = "mesh-control-leader";

/// Every request gets this long; a hung one counts as failed (and the lead still ends on time,
/// see `election`).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{verb} Lease {namespace}/{LEASE_NAME}: {source}")]
    Api { verb: &'static str, namespace: String, source: kube::Error },
    #[error("{verb} Lease {namespace}/{LEASE_NAME}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout { verb: &'static str, namespace: String },
}

impl Error {
    fn is_conflict(&self) -> bool {
        matches!(self, Self::Api { source: kube::Error::Api(e), .. } if e.code == 409)
    }
}

pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    election: Election,
    timing: Timing,
    /// The Lease as last read (we write it back with our changes).
    lease: Option<Lease>,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, identity: &str, timing: Timing) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            election: Election::new(identity, timing),
            timing,
            lease: None,
        }
    }

    /// Runs the election until `shutdown` resolves, publishing leadership to `tx`; then releases
    /// the Lease if we hold it.
    pub async fn run(mut self, tx: watch::Sender<Lead>, shutdown: impl Future<Output = ()>) {
        tracing::info!(identity = self.election.identity(), lease = LEASE_NAME, timing = ?self.timing, "leader election started");
        tokio::pin!(shutdown);
        loop {
            let wake = self.step().await;
            publish(&tx, &self.election);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = &mut shutdown => break,
            }
        }
        self.release().await;
        tx.send_replace(Lead::Follower);
    }

    /// One round: read the Lease, write it if the election says so; returns when to come back.
    async fn step(&mut self) -> Instant {
        let now = Instant::now();
        let was_leader = self.election.is_leader(now);
        let read = match self.call("reading", self.api.get_opt(LEASE_NAME)).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!("{e}");
                self.election.write_failed(false, Instant::now());
                self.log_change(was_leader);
                return Instant::now() + self.timing.retry;
            }
        };
        let action = self.election.observe(read.as_ref().map(record), now);
        self.lease = read;
        let written = match action {
            Action::WaitUntil(at) => {
                self.log_change(was_leader);
                return at;
            }
            Action::Create => {
                let lease = self.claimed(Lease { metadata: ObjectMeta { name: Some(LEASE_NAME.into()), ..ObjectMeta::default() }, spec: None }, 0, true);
                self.call("creating", self.api.create(&PostParams::default(), &lease)).await
            }
            Action::Claim { transitions, .. } => {
                let current = self.lease.clone().expect("a Lease to claim was read");
                let taking = current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.election.identity());
                // `replace` sends the resourceVersion we read: a write in between makes it fail.
                let lease = self.claimed(current, transitions, taking);
                self.call("writing", self.api.replace(LEASE_NAME, &PostParams::default(), &lease)).await
            }
        };
        match written {
            Ok(lease) => {
                self.election.written(now);
                self.lease = Some(lease);
            }
            Err(e) => {
                if e.is_conflict() {
                    tracing::debug!("{e} (another replica wrote first)");
                } else {
                    tracing::warn!("{e}");
                }
                self.election.write_failed(e.is_conflict(), Instant::now());
            }
        }
        self.log_change(was_leader);
        let next = self.election.next_wakeup(Instant::now());
        if self.election.is_leader(Instant::now()) { next } else { next.min(Instant::now() + self.timing.retry) }
    }

    /// `lease` with us as its holder, renewed now (and acquired now when `taking` it over).
    fn claimed(&self, mut lease: Lease, transitions: i32, taking: bool) -> Lease {
        let now = MicroTime(Timestamp::now());
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(self.election.identity().to_owned());
        spec.lease_duration_seconds = Some(i32::try_from(self.timing.lease.as_secs()).unwrap_or(i32::MAX));
        spec.lease_transitions = Some(transitions);
        spec.renew_time = Some(now.clone());
        if taking {
            spec.acquire_time = Some(now);
        }
        lease
    }

    /// Hands the Lease back if we hold it: an empty holder, which the other replica takes at once.
    async fn release(&mut self) {
        if !self.election.is_leader(Instant::now()) {
            return;
        }
        let Some(mut lease) = self.lease.take() else { return };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.call("releasing", self.api.replace(LEASE_NAME, &PostParams::default(), &lease)).await {
            Ok(_) => tracing::info!(identity = self.election.identity(), "released the leader Lease"),
            Err(e) => tracing::warn!("{e} (the other replica takes over after the lease duration)"),
        }
    }

    fn log_change(&self, was_leader: bool) {
        let is_leader = self.election.is_leader(Instant::now());
        if is_leader != was_leader {
            let holder = self.lease.as_ref().and_then(|l| l.spec.as_ref()?.holder_identity.clone()).unwrap_or_default();
            if is_leader {
                tracing::info!(identity = self.election.identity(), "became the leader: writing status from now on");
            } else {
                tracing::warn!(identity = self.election.identity(), holder, "no longer the leader: status writes stop");
            }
        }
    }

    async fn call<T>(&self, verb: &'static str, request: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Error> {
        let namespace = || self.namespace.clone();
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(Error::Api { verb, namespace: namespace(), source }),
            Err(_) => Err(Error::Timeout { verb, namespace: namespace() }),
        }
    }
}

fn publish(tx: &watch::Sender<Lead>, election: &Election) {
    let lead = match election.leading_until() {
        Some(until) if Instant::now() < until => Lead::LeaderUntil(until),
        _ => Lead::Follower,
    };
    tx.send_if_modified(|old| {
        let changed = *old != lead;
        *old = lead;
        changed
    });
}

/// What the election looks at in a Lease.
fn record(l: &Lease) -> Record {
    let spec = l.spec.as_ref();
    Record {
        holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
        version: l.metadata.resource_version.clone().unwrap_or_default(),
        transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
    }
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
