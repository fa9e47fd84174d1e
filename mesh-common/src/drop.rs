//! Stable drop reasons. The numbers are ABI (counters, metrics, docs): never renumber, never
//! reuse; retire a reason by renaming it `UnusedN` and keeping its number.

/// Why the datapath refused or could not serve a socket operation.
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
}

impl DropReason {
    /// One past the largest code: the size of the counter array.
    pub const COUNT: u32 = 4;

    pub const ALL: [Self; 3] = [Self::NoHealthyBackend, Self::BackendMissing, Self::SlotMissing];

    /// Stable `snake_case` name used in metrics labels and docs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoHealthyBackend => "no_healthy_backend",
            Self::BackendMissing => "backend_missing",
            Self::SlotMissing => "slot_missing",
        }
    }

    pub const fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::NoHealthyBackend),
            2 => Some(Self::BackendMissing),
            3 => Some(Self::SlotMissing),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_fit_the_counter_array() {
        // These numbers are ABI; this test fails if someone renumbers.
        assert_eq!(DropReason::NoHealthyBackend as u32, 1);
        assert_eq!(DropReason::BackendMissing as u32, 2);
        assert_eq!(DropReason::SlotMissing as u32, 3);
        for r in DropReason::ALL {
            assert!((r as u32) < DropReason::COUNT);
            assert_eq!(DropReason::from_code(r as u32), Some(r));
        }
        assert_eq!(DropReason::from_code(0), None);
    }
}
