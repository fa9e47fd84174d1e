//! `sk_lookup` on the node's network namespace: plaintext for local meshed pods into the daemon.
//!
//! Policy routing (`mesh-node`'s `routing`) delivers TCP addressed to a local meshed pod to this
//! node instead of forwarding it, unless the node itself sent it. The socket lookup then has no
//! listener on the pod's `ip:port`; this program hands the connection to the daemon's plaintext
//! listener (index 0 of `MESH_LSN_V1`), which authorizes it as the pod's inbound and forwards
//! it. The accepted socket keeps the pod's address and port as its local address: that is the
//! original destination. STRICT pods drop the SYN here, counted as the tc guard counts it.

use aya_ebpf::{bindings::bpf_sk_lookup, programs::SkLookupContext};
use mesh_common::{
    decide::{steer_inbound, Steer},
    names::LISTENER_PLAINTEXT,
    Addr, DropReason,
};

use core::mem::offset_of;

use crate::ctx::{load_ip6, load_u32};
use crate::maps::{count_drop, node_config, ENDPOINTS, LISTENERS};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

pub fn sk_lookup(ctx: &SkLookupContext) -> u32 {
    let sk = ctx.lookup;
    // SAFETY: fixed-offset loads of the program's own context.
    let (family, protocol, port) = unsafe {
        (
            load_u32::<{ offset_of!(bpf_sk_lookup, family) }, _>(sk),
            load_u32::<{ offset_of!(bpf_sk_lookup, protocol) }, _>(sk),
            load_u32::<{ offset_of!(bpf_sk_lookup, local_port) }, _>(sk),
        )
    };
    let dst = match family {
        // SAFETY: as above.
        AF_INET => Addr::from_v4_raw(unsafe { load_u32::<{ offset_of!(bpf_sk_lookup, local_ip4) }, _>(sk) }),
        // SAFETY: as above.
        AF_INET6 => Addr::from_v6_raw(unsafe { load_ip6!(sk, bpf_sk_lookup, local_ip6) }),
        _ => return SK_PASS,
    };
    // `local_port` is in host order; protocol numbers fit a byte.
    #[allow(clippy::cast_possible_truncation, reason = "port and protocol fit")]
    let (port, protocol) = (port as u16, protocol as u8);
    // SAFETY: value copied out at once.
    let ep = unsafe { ENDPOINTS.get(&dst) };
    match steer_inbound(ep, node_config(), &dst, port, protocol) {
        Steer::Pass => SK_PASS,
        Steer::Drop => {
            count_drop(DropReason::StrictPlaintext);
            SK_DROP
        }
        // No listener (the daemon is gone, or its listener is of the other family): the normal
        // lookup finds none either; the node cannot even answer with a reset from the pod's
        // address, so the SYN goes unanswered until a daemon holds the listener again. Never
        // the pod unguarded.
        Steer::Daemon => {
            let _ = LISTENERS.redirect_sk_lookup(ctx, LISTENER_PLAINTEXT, 0);
            SK_PASS
        }
    }
}
