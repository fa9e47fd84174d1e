//! One address type for both families: IPv6, with IPv4 as IPv4-mapped (`::ffff:a.b.c.d`).
//! One key layout for both families keeps the maps and the lookups identical.

/// An IP address in network byte order. IPv4 is stored IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Addr {
    pub octets: [u8; 16],
}

const _: () = assert!(size_of::<Addr>() == 16);

impl Addr {
    pub const UNSPECIFIED: Self = Self { octets: [0; 16] };

    /// From the four octets of an IPv4 address.
    #[inline(always)]
    pub const fn from_v4(v4: [u8; 4]) -> Self {
        Self {
            octets: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]],
        }
    }

    /// From `bpf_sock_addr.user_ip4`: the address in network order as the kernel stores it in a
    /// u32 (so on little-endian hosts the first octet is the low byte).
    #[inline(always)]
    pub const fn from_v4_raw(raw_be: u32) -> Self {
        Self::from_v4(raw_be.to_ne_bytes())
    }

    pub const fn from_v6(octets: [u8; 16]) -> Self {
        Self { octets }
    }

    /// From `bpf_sock_addr.user_ip6`: four u32 words, each holding four octets in network order.
    #[inline(always)]
    pub const fn from_v6_raw(words: [u32; 4]) -> Self {
        let a = words[0].to_ne_bytes();
        let b = words[1].to_ne_bytes();
        let c = words[2].to_ne_bytes();
        let d = words[3].to_ne_bytes();
        Self {
            octets: [
                a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
                d[2], d[3],
            ],
        }
    }

    /// True if this is an IPv4-mapped address.
    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        let o = &self.octets;
        o[0] == 0
            && o[1] == 0
            && o[2] == 0
            && o[3] == 0
            && o[4] == 0
            && o[5] == 0
            && o[6] == 0
            && o[7] == 0
            && o[8] == 0
            && o[9] == 0
            && o[10] == 0xff
            && o[11] == 0xff
    }

    /// The IPv4 address in the kernel's `user_ip4` representation.
    #[inline(always)]
    pub const fn v4_raw(&self) -> u32 {
        let o = &self.octets;
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]])
    }

    /// The address in the kernel's `user_ip6` representation.
    #[inline(always)]
    pub const fn v6_raw(&self) -> [u32; 4] {
        let o = &self.octets;
        [
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ]
    }
}

impl core::fmt::Debug for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let o = &self.octets;
        if self.is_v4() {
            write!(f, "{}.{}.{}.{}", o[12], o[13], o[14], o[15])
        } else {
            for i in 0..8 {
                if i > 0 {
                    f.write_str(":")?;
                }
                write!(f, "{:x}", u16::from_be_bytes([o[2 * i], o[2 * i + 1]]))?;
            }
            Ok(())
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    #![expect(unsafe_code, reason = "aya::Pod marks types as plain old data for map access")]
    // SAFETY: repr(C) array of bytes: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::Addr {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trips_through_kernel_representation() {
        // 198.19.0.10 as the kernel stores it in user_ip4 (network order in memory).
        let raw = u32::from_ne_bytes([198, 19, 0, 10]);
        let a = Addr::from_v4_raw(raw);
        assert!(a.is_v4());
        assert_eq!(a.v4_raw(), raw);
        assert_eq!(a.octets[10..], [0xff, 0xff, 198, 19, 0, 10]);
    }

    #[test]
    fn v6_round_trips_and_is_not_v4() {
        let octets = [0xfd, 0x6d, 0x65, 0x73, 0x68, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7];
        let a = Addr::from_v6(octets);
        assert!(!a.is_v4());
        assert_eq!(Addr::from_v6_raw(a.v6_raw()), a);
    }
}
