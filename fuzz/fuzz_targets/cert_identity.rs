//! The SPIFFE identity of a peer's leaf certificate (DER from the TLS handshake, before any
//! check of ours): arbitrary bytes never panic the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = mesh_node::tls::identity_of(&CertificateDer::from(data)) {
        // Whatever parsed is a SPIFFE identity that prints as one.
        assert!(id.to_string().starts_with("spiffe://"), "{id}");
    }
});
