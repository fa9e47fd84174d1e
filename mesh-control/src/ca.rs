//! The mesh CA: one self-signed root (ECDSA P-256) that signs short-lived workload and node
//! certificates with exactly one SPIFFE URI SAN, and the controller's own gRPC serving
//! certificate.
//!
//! The root is generated on first start and persisted (file mode: `<state-dir>/ca/root.{crt,key}`;
//! Kubernetes: the Secret `mesh-ca` in the controller namespace, see `k8s::ca_secret`).
//! Besides the signing root, the mesh may trust *extra roots* (`extra-roots.pem`): while a root
//! is rotated, certificates of the old and the new one must both verify. The trust bundle is the
//! signing root followed by the extra roots. Rotation: see the README ("Rotating the mesh root").

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

/// Default lifetime of workload certificates.
pub const DEFAULT_TTL: Duration = Duration::from_hours(24);
/// Longest lifetime a node may ask for.
pub const MAX_TTL: Duration = Duration::from_hours(7 * 24);
/// Default lifetime of node certificates (they are renewed at half-life with the node's
/// credential, so a revoked credential locks a node out within this time).
pub const DEFAULT_NODE_TTL: Duration = Duration::from_hours(1);
/// Longest lifetime of a node certificate.
pub const MAX_NODE_TTL: Duration = Duration::from_hours(24);
/// File (next to `root.crt`) and Secret key of the extra trusted roots.
pub const EXTRA_ROOTS: &str = "extra-roots.pem";
/// Lifetime of a generated root.
const ROOT_TTL: Duration = Duration::from_hours(10 * 365 * 24);
/// Certificates start a little in the past, for clocks that lag.
const BACKDATE: Duration = Duration::from_mins(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("mesh root: {0}")]
    Root(rcgen::Error),
    #[error("invalid CSR: {0}")]
    InvalidCsr(rcgen::Error),
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
    #[error("identity {identity:?} is not spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>")]
    InvalidIdentity { identity: String, trust_domain: String },
    #[error("ttl of {seconds} s is out of range (1 s to {} s)", max.as_secs())]
    InvalidTtl { seconds: i64, max: Duration },
    #[error("extra roots: {0}")]
    ExtraRoots(String),
}

/// The parts of a SPIFFE id of this mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
}

/// The root's certificate and key, PEM, as stored.
#[derive(Clone, Debug)]
pub struct RootPem {
    pub cert: String,
    pub key: String,
}

/// A signed certificate: leaf first, then the root.
#[derive(Clone, Debug)]
pub struct Signed {
    pub chain: Vec<String>,
    pub not_after: OffsetDateTime,
}

pub struct Ca {
    root: RootPem,
    issuer: Issuer<'static, KeyPair>,
    trust_domain: String,
    /// Other roots trusted during a rotation (PEM, one certificate each).
    extra_roots: Vec<String>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(Error::Root)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::OrganizationName, "mesh");
        params.distinguished_name.push(DnType::CommonName, format!("mesh root CA ({trust_domain})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_TTL;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(Error::Root)?;
        Self::from_pem(RootPem { cert: cert.pem(), key: key.serialize_pem() }, trust_domain)
    }

    /// A root loaded from storage.
    pub fn from_pem(root: RootPem, trust_domain: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(&root.key).map_err(Error::Root)?;
        let issuer = Issuer::from_ca_cert_pem(&root.cert, key).map_err(Error::Root)?;
        Ok(Self { root, issuer, trust_domain: trust_domain.to_owned(), extra_roots: Vec::new() })
    }

    /// Also trusts the CA certificates in `bundle` (any number, PEM). The signing root, if listed,
    /// is not repeated.
    pub fn with_extra_roots(mut self, bundle: &str) -> Result<Self, Error> {
        let blocks = pem::parse_many(bundle).map_err(|e| Error::ExtraRoots(e.to_string()))?;
        for block in blocks {
            if block.tag() != "CERTIFICATE" {
                return Err(Error::ExtraRoots(format!("unexpected PEM block {:?}", block.tag())));
            }
            let (_, cert) = x509_parser::parse_x509_certificate(block.contents()).map_err(|e| Error::ExtraRoots(e.to_string()))?;
            if !cert.is_ca() {
                return Err(Error::ExtraRoots(format!("{} is not a CA certificate", cert.subject())));
            }
            let text = pem::encode_config(&block, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF));
            if pem::parse(&self.root.cert).is_ok_and(|r| r.contents() == block.contents()) || self.extra_roots.contains(&text) {
                continue;
            }
            self.extra_roots.push(text);
        }
        Ok(self)
    }

    /// File mode: loads `dir/root.crt` + `dir/root.key`, or creates them (key mode 0600).
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let (cert_path, key_path) = (dir.join("root.crt"), dir.join("root.key"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let ca = Self::from_pem(RootPem { cert, key }, trust_domain)?;
            let extra_path = dir.join(EXTRA_ROOTS);
            return match std::fs::read_to_string(&extra_path) {
                Ok(extra) => {
                    let ca = ca.with_extra_roots(&extra)?;
                    tracing::info!(extra_roots = ca.extra_roots.len(), file = %extra_path.display(), "trusting extra roots (root rotation)");
                    Ok(ca)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ca),
                Err(source) => Err(Error::Io { path: extra_path, source }),
            };
        }
        let ca = Self::generate(trust_domain)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&key_path, &ca.root.key).map_err(io(&key_path))?;
        std::fs::write(&cert_path, &ca.root.cert).map_err(io(&cert_path))?;
        tracing::info!(cert = %cert_path.display(), "generated a new mesh root");
        Ok(ca)
    }

    pub fn root(&self) -> &RootPem {
        &self.root
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every root the mesh trusts, PEM: the signing root first, then the extra roots.
    pub fn trust_bundle(&self) -> Vec<String> {
        std::iter::once(self.root.cert.clone()).chain(self.extra_roots.iter().cloned()).collect()
    }

    /// Parses `spiffe://<our trust domain>/ns/<ns>/sa/<sa>`.
    pub fn parse_identity(&self, identity: &str) -> Result<Identity, Error> {
        let invalid = || Error::InvalidIdentity { identity: identity.to_owned(), trust_domain: self.trust_domain.clone() };
        let rest = identity.strip_prefix("spiffe://").ok_or_else(invalid)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if *td == self.trust_domain && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity { namespace: (*ns).to_owned(), service_account: (*sa).to_owned() })
            }
            _ => Err(invalid()),
        }
    }

    /// Signs a workload certificate for `identity` with the public key of `csr_pem`. Only the
    /// key is taken from the CSR; names, usages and lifetime are ours.
    pub fn sign_workload(&self, csr_pem: &str, identity: &str, ttl: Duration) -> Result<Signed, Error> {
        self.parse_identity(identity)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(Error::InvalidCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = identity.to_owned().try_into().map_err(|_| Error::InvalidIdentity {
            identity: identity.to_owned(),
            trust_domain: self.trust_domain.clone(),
        })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        self.leaf(params, &csr.public_key, ttl, Usage::ServerAndClient)
    }

    /// Signs a node certificate: exactly one URI SAN, `node_uri` (see `auth::NodeIds`), valid
    /// for client authentication only, so it can never serve HBONE or the controller.
    pub fn sign_node(&self, csr_pem: &str, node_uri: &str, ttl: Duration) -> Result<Signed, Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(Error::InvalidCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = node_uri.to_owned().try_into().map_err(Error::Sign)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        self.leaf(params, &csr.public_key, ttl, Usage::Client)
    }

    /// The controller's gRPC serving certificate (and its fresh key, PEM), valid for `names`
    /// (DNS names or IP addresses).
    pub fn serving_cert(&self, names: &[String], ttl: Duration) -> Result<(Signed, String), Error> {
        let key = KeyPair::generate().map_err(Error::Sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "mesh-control");
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into().map_err(Error::Sign)?),
            };
            params.subject_alt_names.push(san);
        }
        Ok((self.leaf(params, &key, ttl, Usage::ServerAndClient)?, key.serialize_pem()))
    }

    fn leaf(&self, mut params: CertificateParams, key: &impl rcgen::PublicKeyData, ttl: Duration, usage: Usage) -> Result<Signed, Error> {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = match usage {
            Usage::ServerAndClient => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(key, &self.issuer).map_err(Error::Sign)?;
        Ok(Signed { chain: vec![cert.pem(), self.root.cert.clone()], not_after: params.not_after })
    }
}

/// Extended key usages of a leaf.
#[derive(Clone, Copy)]
enum Usage {
    /// Workloads (both ends of HBONE) and the controller's serving certificate.
    ServerAndClient,
    /// Node certificates.
    Client,
}

/// The requested lifetime: 0 means the default; otherwise 1 s to `max`.
pub fn ttl(seconds: i64, default: Duration, max: Duration) -> Result<Duration, Error> {
    match seconds {
        0 => Ok(default),
        s if s > 0 && s.unsigned_abs() <= max.as_secs() => Ok(Duration::from_secs(s.unsigned_abs())),
        s => Err(Error::InvalidTtl { seconds: s, max }),
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("the OS random source works");
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(contents.as_bytes())
}

#[cfg(test)]
#[path = "ca_tests.rs"]
mod tests;
