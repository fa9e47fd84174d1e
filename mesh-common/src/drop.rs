//! Stable drop reasons and event counters. The numbers are ABI (counters, metrics, docs):
//! never renumber, never reuse; retire a code by renaming it `UnusedN` and keeping its number.

/// Why the datapath refused a socket operation or a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The Service exists but has no healthy backend: `connect()` fails with ECONNREFUSED.
    NoHealthyBackend = 1,
    /// A selection slot pointed at a backend missing from the backend map (userspace bug or a
    /// race during an update): the connect is refused rather than sent to the VIP.
    BackendMissing = 2,
    /// A slot index had no entry in the slot map.
    SlotMissing = 3,
    /// The L4 policy fast path denied the connection (`connect()` fails with EACCES).
    PolicyDenied = 4,
    /// A plaintext connection from outside the mesh to a STRICT pod was dropped.
    StrictPlaintext = 5,
}

impl DropReason {
    /// One past the largest code: the size of the counter array.
    pub const COUNT: u32 = 6;

    pub const ALL: [Self; 5] = [
        Self::NoHealthyBackend,
        Self::BackendMissing,
        Self::SlotMissing,
        Self::PolicyDenied,
        Self::StrictPlaintext,
    ];

    /// Stable `snake_case` name used in metrics labels and docs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoHealthyBackend => "no_healthy_backend",
            Self::BackendMissing => "backend_missing",
            Self::SlotMissing => "slot_missing",
            Self::PolicyDenied => "policy_denied",
            Self::StrictPlaintext => "strict_plaintext",
        }
    }

    pub const fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::NoHealthyBackend),
            2 => Some(Self::BackendMissing),
            3 => Some(Self::SlotMissing),
            4 => Some(Self::PolicyDenied),
            5 => Some(Self::StrictPlaintext),
            _ => None,
        }
    }
}

/// Things the datapath did (not drops), counted per CPU.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A connect() to a Service VIP was rewritten to a backend.
    LbConnect = 0,
    /// An unconnected UDP datagram to a VIP was rewritten to a backend.
    LbSendmsg = 1,
    /// A meshed pod's connection was redirected to the node daemon.
    Captured = 2,
    /// SO_ORIGINAL_DST was answered for the daemon.
    OrigDstAnswered = 3,
    /// A socket entered the sockhash (same-node bypass).
    BypassSocket = 4,
    /// An sk_msg was redirected to its peer socket.
    BypassRedirect = 5,
}

impl Stat {
    pub const COUNT: u32 = 6;
    pub const ALL: [Self; 6] = [
        Self::LbConnect,
        Self::LbSendmsg,
        Self::Captured,
        Self::OrigDstAnswered,
        Self::BypassSocket,
        Self::BypassRedirect,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LbConnect => "lb_connect",
            Self::LbSendmsg => "lb_sendmsg",
            Self::Captured => "captured",
            Self::OrigDstAnswered => "orig_dst_answered",
            Self::BypassSocket => "bypass_socket",
            Self::BypassRedirect => "bypass_redirect",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_fit_the_counter_array() {
        // These numbers are ABI; this test fails if someone renumbers.
        let expected = [(DropReason::NoHealthyBackend, 1), (DropReason::BackendMissing, 2), (DropReason::SlotMissing, 3), (DropReason::PolicyDenied, 4), (DropReason::StrictPlaintext, 5)];
        for (reason, code) in expected {
            assert_eq!(reason as u32, code);
            assert!(code < DropReason::COUNT);
            assert_eq!(DropReason::from_code(code), Some(reason));
        }
        assert_eq!(DropReason::from_code(0), None);
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }
}
