//! The certificates of this node's workloads: issued when a workload appears, refreshed at
//! half-life (with exponential backoff on CA errors), dropped when the workload leaves.
//!
//! Rotation never touches open connections: a TLS session keeps the keys it negotiated, and only
//! handshakes after the swap see the new certificate.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rcgen::{CertificateParams, KeyPair};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::{CaClient, Error, Identity, WorkloadCert};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One issued certificate with its key, ready for rustls.
#[derive(Debug)]
pub struct CertEntry {
    pub identity: Identity,
    pub cert: WorkloadCert,
    pub key: Arc<CertifiedKey>,
    /// Half-life: when the rotation loop replaces it.
    pub refresh_at: SystemTime,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabel {
    pub identity: String,
}

#[derive(Clone, Default)]
pub struct Metrics {
    expiry: Family<IdentityLabel, Gauge>,
    issued: Counter,
    errors: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "mesh_cert_expiry_timestamp_seconds",
            "Expiry (unix time) of each workload certificate held by this node",
            m.expiry.clone(),
        );
        registry.register("mesh_cert_issued", "Workload certificates issued (first issue and rotations)", m.issued.clone());
        registry.register("mesh_cert_errors", "Failed certificate requests to the CA", m.errors.clone());
        m
    }
}

/// What the admin endpoint shows: never the key.
#[derive(Debug, serde::Serialize)]
pub struct CertInfo {
    pub identity: String,
    pub serial: u64,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub refresh_at_unix: u64,
}

pub struct CertStore {
    ca: Arc<dyn CaClient>,
    certs: RwLock<HashMap<Identity, Arc<CertEntry>>>,
    roots: RwLock<Vec<CertificateDer<'static>>>,
    wanted: watch::Sender<BTreeSet<Identity>>,
    /// Bumped after every change, so tests and readiness can wait for issuance.
    generation: watch::Sender<u64>,
    metrics: Metrics,
    /// One turn per identity whose certificate is being requested (`fetch`).
    inflight: std::sync::Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
}

impl CertStore {
    pub fn new(ca: Arc<dyn CaClient>, roots: Vec<CertificateDer<'static>>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            ca,
            certs: RwLock::default(),
            roots: RwLock::new(roots),
            wanted: watch::Sender::new(BTreeSet::new()),
            generation: watch::Sender::new(0),
            metrics,
            inflight: std::sync::Mutex::default(),
        })
    }

    pub fn get(&self, id: &Identity) -> Option<Arc<CertEntry>> {
        self.certs.read().unwrap_or_else(PoisonError::into_inner).get(id).cloned()
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The certificate for `id`, issuing it now if the rotation loop has not yet. One request
    /// per identity at a time: a burst of connections for a workload whose certificate is
    /// missing waits on that one instead of each sending a CSR (and each paying for a key).
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<CertEntry>, Error> {
        if let Some(e) = self.get(id) {
            return Ok(e);
        }
        let turn = self.inflight.lock().unwrap_or_else(PoisonError::into_inner).entry(id.clone()).or_default().clone();
        let result = {
            let _turn = turn.lock().await;
            match self.get(id) {
                Some(e) => Ok(e),
                None => self.issue(id).await,
            }
        };
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        // Ours and the map's: nobody else waits for this identity.
        if Arc::strong_count(&turn) <= 2 {
            inflight.remove(id);
        }
        result
    }

    /// The identities of the workloads now on this node; others' certificates are dropped.
    pub fn set_wanted(&self, ids: BTreeSet<Identity>) {
        self.wanted.send_replace(ids);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn dump(&self) -> Vec<CertInfo> {
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut out: Vec<CertInfo> = self
            .certs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|e| CertInfo {
                identity: e.identity.to_string(),
                serial: e.cert.serial,
                not_before_unix: unix(e.cert.not_before),
                not_after_unix: unix(e.cert.not_after),
                refresh_at_unix: unix(e.refresh_at),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    async fn issue(&self, id: &Identity) -> Result<Arc<CertEntry>, Error> {
        let key = KeyPair::generate()?;
        let csr = CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
        let cert = match self.ca.sign(id, csr.der().clone()).await {
            Ok(c) => c,
            Err(e) => {
                self.metrics.errors.inc();
                return Err(e);
            }
        };
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|source| Error::Key { identity: id.clone(), source })?;
        let life = cert.not_after.duration_since(cert.not_before).unwrap_or_default();
        let entry = Arc::new(CertEntry {
            identity: id.clone(),
            key: Arc::new(CertifiedKey::new(cert.chain.clone(), signer)),
            refresh_at: cert.not_before + life / 2,
            cert,
        });
        if !entry.cert.roots.is_empty() {
            entry.cert.roots.clone_into(&mut self.roots.write().unwrap_or_else(PoisonError::into_inner));
        }
        self.metrics.issued.inc();
        let expiry = entry.cert.not_after.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.metrics
            .expiry
            .get_or_create(&IdentityLabel { identity: id.to_string() })
            .set(i64::try_from(expiry).unwrap_or(i64::MAX));
        self.certs.write().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), entry.clone());
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(identity = %id, serial = entry.cert.serial, "certificate issued");
        Ok(entry)
    }

    /// Issues, refreshes and drops certificates until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let mut wanted_rx = self.wanted.subscribe();
        let mut failures: HashMap<Identity, (u32, SystemTime)> = HashMap::new();
        tokio::pin!(stop);
        loop {
            let wanted = wanted_rx.borrow_and_update().clone();
            self.drop_unwanted(&wanted);
            failures.retain(|id, _| wanted.contains(id));
            let mut next = SystemTime::now() + Duration::from_hours(1);
            for id in &wanted {
                let now = SystemTime::now();
                if let Some((_, retry_at)) = failures.get(id)
                    && *retry_at > now
                {
                    next = next.min(*retry_at);
                    continue;
                }
                match self.get(id) {
                    Some(e) if e.refresh_at > now => next = next.min(e.refresh_at),
                    _ => match self.issue(id).await {
                        Ok(e) => {
                            failures.remove(id);
                            next = next.min(e.refresh_at);
                        }
                        Err(err) => {
                            let n = failures.get(id).map_or(0, |f| f.0) + 1;
                            let delay = backoff(n);
                            tracing::warn!(identity = %id, error = %err, retry_in = ?delay, "certificate request failed");
                            failures.insert(id.clone(), (n, now + delay));
                            next = next.min(now + delay);
                        }
                    },
                }
            }
            let sleep = next.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                r = wanted_rx.changed() => if r.is_err() { return },
                () = &mut stop => return,
            }
        }
    }

    fn drop_unwanted(&self, wanted: &BTreeSet<Identity>) {
        let mut certs = self.certs.write().unwrap_or_else(PoisonError::into_inner);
        let before = certs.len();
        certs.retain(|id, _| {
            let keep = wanted.contains(id);
            if !keep {
                self.metrics.expiry.remove(&IdentityLabel { identity: id.to_string() });
            }
            keep
        });
        if certs.len() != before {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

fn backoff(failures: u32) -> Duration {
    BACKOFF_MIN.saturating_mul(1 << failures.min(16)).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TestCa;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_millis(400));
        assert_eq!(backoff(2), Duration::from_millis(800));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }

    /// Counts signatures and takes its time, as a remote CA does.
    struct SlowCa {
        inner: TestCa,
        signed: std::sync::atomic::AtomicUsize,
    }

    impl CaClient for SlowCa {
        fn sign<'a>(&'a self, identity: &'a Identity, csr: rustls_pki_types::CertificateSigningRequestDer<'static>) -> crate::identity::ca::SignFuture<'a> {
            self.signed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.inner.sign(identity, csr).await
            })
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_fetches_of_a_missing_certificate_send_one_request() {
        let ca = Arc::new(SlowCa { inner: TestCa::generate(Duration::from_hours(1)).expect("ca"), signed: 0.into() });
        let store = CertStore::new(ca.clone(), vec![], Metrics::default());
        let (a, b) = (Identity::new("td", "ns", "a"), Identity::new("td", "ns", "b"));
        let fetches = (0..20).map(|i| {
            let (store, id) = (store.clone(), if i % 2 == 0 { a.clone() } else { b.clone() });
            tokio::spawn(async move { store.fetch(&id).await.map(|e| e.cert.serial) })
        });
        let serials: Vec<u64> = futures::future::join_all(fetches).await.into_iter().map(|r| r.expect("task").expect("issued")).collect();
        assert_eq!(ca.signed.load(std::sync::atomic::Ordering::SeqCst), 2, "one request per identity");
        assert!(serials.iter().step_by(2).all(|s| *s == serials[0]), "every caller got the same certificate");
        assert!(store.inflight.lock().expect("lock").is_empty(), "no turn left behind");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rotates_at_half_life_and_retries_after_ca_errors() {
        let ca = Arc::new(TestCa::generate(Duration::from_secs(2)).expect("ca"));
        let store = CertStore::new(ca.clone(), vec![ca.root()], Metrics::default());
        let id = Identity::new("td", "ns", "sa");
        let mut gen_rx = store.subscribe();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(store.clone().run(async move { drop(stop_rx.await) }));
        store.set_wanted(BTreeSet::from([id.clone()]));
        gen_rx.changed().await.expect("issued");
        let first = store.get(&id).expect("cert").cert.serial;
        // TTL 2 s (issued 60 s backdated is capped at the TTL): half-life refresh within ~2 s.
        ca.set_failing(true);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(store.get(&id).expect("old cert kept while the CA fails").cert.serial, first);
        ca.set_failing(false);
        tokio::time::timeout(Duration::from_secs(5), async {
            while store.get(&id).expect("cert").cert.serial == first {
                gen_rx.changed().await.expect("changed");
            }
        })
        .await
        .expect("rotated after the CA recovered");
        store.set_wanted(BTreeSet::new());
        tokio::time::timeout(Duration::from_secs(1), async {
            while store.get(&id).is_some() {
                gen_rx.changed().await.expect("changed");
            }
        })
        .await
        .expect("dropped when the workload left");
        stop_tx.send(()).expect("stop");
        task.await.expect("loop ends");
    }
}
