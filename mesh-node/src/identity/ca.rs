//! The CA client seam. The daemon generates each workload key itself and sends only a CSR, so a
//! private key never leaves the node. The control plane's gRPC CA will implement [`CaClient`];
//! until it exists, [`TestCa`] signs in process (tests, the lab, and single-machine runs).

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use super::{Error, Identity};

/// A signed workload certificate (leaf first) and the roots it chains to.
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: u64,
}

pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCert, Error>> + Send + 'a>>;

/// Signs workload certificates. Object-safe so the daemon can hold `Arc<dyn CaClient>`.
pub trait CaClient: Send + Sync {
    fn sign<'a>(&'a self, identity: &'a Identity, csr: CertificateSigningRequestDer<'static>) -> SignFuture<'a>;
}

/// An in-process CA (rcgen) for tests and the lab: a self-signed root that signs leaves with the
/// requested SPIFFE URI SAN and a short, configurable lifetime.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    ttl: Duration,
    serial: AtomicU64,
    /// When set, `sign` fails (rotation backoff tests).
    fail: std::sync::atomic::AtomicBool,
}

impl TestCa {
    /// A fresh root. `ttl` is the lifetime of the leaves it signs.
    pub fn generate(ttl: Duration) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::OrganizationName, "mesh test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let root = cert.der().clone();
        Ok(Self::with(Issuer::new(params, key), root, cert.pem(), ttl))
    }

    /// Loads a root written by [`TestCa::write_pem`] (both daemons of a lab share one root).
    pub fn load_pem(cert: &Path, key: &Path, ttl: Duration) -> Result<Self, Error> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| Error::Read { path: p.into(), source });
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let key = KeyPair::from_pem(&key_pem)?;
        let root = pem_certs(&cert_pem).into_iter().next().ok_or(Error::Pem { path: cert.into(), what: "certificate" })?;
        let issuer = Issuer::from_ca_cert_der(&root, key)?;
        Ok(Self::with(issuer, root, cert_pem, ttl))
    }

    fn with(issuer: Issuer<'static, KeyPair>, root: CertificateDer<'static>, root_pem: String, ttl: Duration) -> Self {
        Self { issuer, root, root_pem, ttl, serial: AtomicU64::new(1), fail: false.into() }
    }

    /// Writes the root certificate and key as PEM; the key readable by its owner only (0600,
    /// also when the file was there before with a wider mode).
    pub fn write_pem(&self, cert: &Path, key: &Path) -> std::io::Result<()> {
        use std::{io::Write as _, os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _}};
        std::fs::write(cert, &self.root_pem)?;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(key)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(self.issuer.key().serialize_pem().as_bytes())
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// Makes every later `sign` fail (true) or succeed (false).
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    fn sign_now(&self, identity: &Identity, csr: &CertificateSigningRequestDer<'_>) -> Result<WorkloadCert, Error> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Refused { identity: identity.clone(), reason: "test CA set to fail".into() });
        }
        let csr = CertificateSigningRequestParams::from_der(csr)?;
        // The CA decides the identity; whatever the CSR asked for is ignored.
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(serial.into());
        let now = SystemTime::now();
        // Backdate a little: peers' clocks differ.
        let not_before = now - Duration::from_mins(1).min(self.ttl / 4);
        let not_after = now + self.ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let leaf = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(WorkloadCert { chain: vec![leaf.der().clone()], roots: vec![self.root.clone()], not_before, not_after, serial })
    }
}

impl CaClient for TestCa {
    fn sign<'a>(&'a self, identity: &'a Identity, csr: CertificateSigningRequestDer<'static>) -> SignFuture<'a> {
        Box::pin(async move { self.sign_now(identity, &csr) })
    }
}

/// Certificates in a PEM text, in order.
pub fn pem_certs(text: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(text.as_bytes()).filter_map(Result::ok).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_the_root() {
        let ca = TestCa::generate(Duration::from_mins(1)).expect("ca");
        let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (c, k) = (dir.join("ca.pem"), dir.join("ca.key"));
        ca.write_pem(&c, &k).expect("write");
        let loaded = TestCa::load_pem(&c, &k, Duration::from_mins(1)).expect("load");
        assert_eq!(loaded.root(), ca.root());
        let mode = |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("stat").permissions()) & 0o777;
        assert_eq!(mode(&k), 0o600, "the key is its owner's alone");
        // A key file left with a wider mode is narrowed when written again.
        std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
        ca.write_pem(&c, &k).expect("write again");
        assert_eq!(mode(&k), 0o600);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
