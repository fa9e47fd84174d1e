use x509_parser::{extensions::GeneralName, pem::parse_x509_pem, prelude::*};

use super::*;

fn csr() -> (KeyPair, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["ignored.example".to_owned()]).expect("params");
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained); // a greedy CSR: must be ignored
    let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
    (key, csr)
}

fn with_cert<T>(pem: &str, f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
    let (_, p) = parse_x509_pem(pem.as_bytes()).expect("PEM");
    let cert = p.parse_x509().expect("X.509");
    f(&cert)
}

#[test]
fn signs_a_workload_cert_with_exactly_the_spiffe_id_and_ttl() {
    let ca = Ca::generate("cluster.local").expect("root");
    let (key, csr) = csr();
    let id = "spiffe://cluster.local/ns/demo/sa/whoami";
    let signed = ca.sign_workload(&csr, id, Duration::from_hours(1)).expect("signed");
    assert_eq!(signed.chain.len(), 2);
    assert_eq!(signed.chain[1], ca.root().cert);
    with_cert(&signed.chain[0], |c| {
        let sans: Vec<String> = c
            .subject_alternative_name()
            .expect("ext")
            .expect("SAN present")
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, [format!("uri:{id}")], "the CSR's DNS name is dropped");
        assert!(!c.is_ca(), "CA bit requested by the CSR is ignored");
        assert_eq!(&*c.public_key().subject_public_key.data, key.public_key_raw(), "the CSR's key is certified");
        let lifetime = c.validity().not_after.timestamp() - c.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + BACKDATE.as_secs().cast_signed());
        with_cert(&ca.root().cert, |root| {
            c.verify_signature(Some(root.public_key())).expect("signed by the root");
        });
    });
}

#[test]
fn refuses_foreign_or_malformed_identities_and_bad_csrs() {
    let ca = Ca::generate("cluster.local").expect("root");
    let (_, csr) = csr();
    for bad in ["spiffe://other.domain/ns/demo/sa/x", "spiffe://cluster.local/ns/demo", "cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns//sa/x"] {
        let e = ca.sign_workload(&csr, bad, DEFAULT_TTL).expect_err(bad);
        assert!(matches!(e, Error::InvalidIdentity { .. }), "{bad}: {e}");
    }
    let e = ca.sign_workload("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "spiffe://cluster.local/ns/a/sa/b", DEFAULT_TTL);
    assert!(matches!(e, Err(Error::InvalidCsr(_))));
}

#[test]
fn ttl_defaults_and_bounds() {
    assert_eq!(ttl(0, DEFAULT_TTL, MAX_TTL).expect("default"), DEFAULT_TTL);
    assert!(ttl(i64::try_from(MAX_NODE_TTL.as_secs()).expect("fits") + 1, DEFAULT_NODE_TTL, MAX_NODE_TTL).is_err(), "node certificates have their own cap");
    assert_eq!(ttl(60, DEFAULT_TTL, MAX_TTL).expect("60 s"), Duration::from_mins(1));
    assert!(ttl(-1, DEFAULT_TTL, MAX_TTL).is_err());
    assert!(ttl(i64::try_from(MAX_TTL.as_secs()).expect("fits") + 1, DEFAULT_TTL, MAX_TTL).is_err());
}

#[test]
fn root_is_created_once_and_reloaded_from_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Ca::load_or_create(dir.path(), "cluster.local").expect("created");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join("root.key")).expect("key file").permissions());
    assert_eq!(mode & 0o777, 0o600);
    let again = Ca::load_or_create(dir.path(), "cluster.local").expect("loaded");
    assert_eq!(first.root().cert, again.root().cert);
    // A cert signed by the reloaded root verifies against the first root.
    let (_, csr) = csr();
    let signed = again.sign_workload(&csr, "spiffe://cluster.local/ns/a/sa/b", DEFAULT_TTL).expect("signed");
    with_cert(&signed.chain[0], |c| with_cert(&first.root().cert, |r| c.verify_signature(Some(r.public_key())).expect("verifies")));
}

#[test]
fn serving_cert_names_dns_and_ip() {
    let ca = Ca::generate("cluster.local").expect("root");
    let (signed, key) = ca.serving_cert(&["mesh-control".into(), "127.0.0.1".into()], Duration::from_mins(1)).expect("cert");
    assert!(key.contains("PRIVATE KEY"));
    with_cert(&signed.chain[0], |c| {
        let names = &c.subject_alternative_name().expect("ext").expect("SAN").value.general_names;
        assert!(names.iter().any(|n| matches!(n, GeneralName::DNSName("mesh-control"))));
        assert!(names.iter().any(|n| matches!(n, GeneralName::IPAddress(b) if *b == [127, 0, 0, 1])));
    });
}

#[test]
fn node_certs_are_client_only_with_the_node_uri() {
    let ca = Ca::generate("cluster.local").expect("root");
    let (_, csr) = csr();
    let uri = "spiffe://cluster.local/ns/mesh-system/sa/mesh-node/node/n1";
    let signed = ca.sign_node(&csr, uri, Duration::from_mins(10)).expect("signed");
    with_cert(&signed.chain[0], |c| {
        let names = &c.subject_alternative_name().expect("ext").expect("SAN").value.general_names;
        assert_eq!(names.len(), 1);
        assert!(matches!(names[0], GeneralName::URI(u) if u == uri));
        let eku = c.extended_key_usage().expect("ext").expect("EKU present").value;
        assert!(eku.client_auth && !eku.server_auth, "a node certificate must not serve TLS");
    });
}

#[test]
fn extra_roots_join_the_trust_bundle_once_and_must_be_cas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::load_or_create(dir.path(), "cluster.local").expect("created");
    let next = Ca::generate("cluster.local").expect("new root");
    // The signing root listed again is not repeated; the new one is added after it.
    std::fs::write(dir.path().join(EXTRA_ROOTS), format!("{}{}", next.root().cert, ca.root().cert)).expect("write");
    let reloaded = Ca::load_or_create(dir.path(), "cluster.local").expect("reloaded");
    assert_eq!(reloaded.trust_bundle(), [ca.root().cert.clone(), next.root().cert.clone()]);
    let (_, csr) = csr();
    let leaf = ca.sign_workload(&csr, "spiffe://cluster.local/ns/a/sa/b", DEFAULT_TTL).expect("signed");
    let e = Ca::generate("cluster.local").expect("root").with_extra_roots(&leaf.chain[0]).expect_err("a leaf is no root");
    assert!(matches!(e, Error::ExtraRoots(_)), "{e}");
}
