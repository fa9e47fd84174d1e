//! The `forwarded` header of an HBONE CONNECT (RFC 7239; ztunnel sends `for="<ip>:<port>"`):
//! any bytes a peer may send. No panic, and an address comes back only from a `for=` element.
#![no_main]

use http::{HeaderMap, HeaderValue, header::FORWARDED};
use libfuzzer_sys::fuzz_target;
use mesh_node::proxy::hbone::forwarded_for;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else { return };
    let mut headers = HeaderMap::new();
    headers.insert(FORWARDED, value);
    if forwarded_for(&headers).is_some() {
        let text = String::from_utf8_lossy(data).to_ascii_lowercase();
        assert!(text.contains("for="), "an address without a for= element: {text:?}");
    }
});
