//! Backend selection: pure functions the kernel programs call and host tests exercise.

/// Index into a selection table of `slot_count` slots for a 32-bit hash.
///
/// Multiply-shift instead of `%`: unbiased enough for tables far smaller than 2^32, and a
/// multiply is cheaper than a division on the BPF JIT. `None` when the table is empty.
#[inline(always)]
pub const fn slot_for(hash: u32, slot_count: u32) -> Option<u32> {
    if slot_count == 0 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, reason = "(a*b)>>32 < b for u32 a, b")]
    Some(((hash as u64 * slot_count as u64) >> 32) as u32)
}

/// 64 → 32-bit mix (the murmur3/splitmix finaliser): good avalanche, a handful of instructions.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u32 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    #[allow(clippy::cast_possible_truncation, reason = "folding to 32 bits is the point")]
    let folded = (x ^ (x >> 32)) as u32;
    folded
}

/// Flow hash for consistent (Maglev) selection: the client (its network-namespace cookie and,
/// when the socket is already bound, its source port) and the Service id. The same client keeps
/// its backend while the table changes only around it.
#[inline(always)]
pub const fn flow_hash(client_netns: u64, client_port: u16, service_id: u32) -> u32 {
    mix64(client_netns ^ ((client_port as u64) << 32 | service_id as u64).rotate_left(17))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_has_no_slot() {
        assert_eq!(slot_for(12345, 0), None);
    }

    #[test]
    fn slot_is_always_in_range() {
        for count in [1u32, 2, 3, 7, 100, 16_381] {
            for hash in [0u32, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX, 0xdead_beef] {
                let s = slot_for(hash, count).unwrap();
                assert!(s < count, "hash {hash} count {count} gave {s}");
            }
        }
    }

    #[test]
    fn uniform_hashes_spread_evenly() {
        let count = 5u32;
        let mut hits = [0u32; 5];
        let steps = 10_000u32;
        for i in 0..steps {
            let hash = (u64::from(i) * (1u64 << 32) / u64::from(steps)) as u32;
            hits[slot_for(hash, count).unwrap() as usize] += 1;
        }
        for h in hits {
            assert!((1999..=2001).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn flow_hash_spreads_ports_over_a_maglev_table() {
        // 20k client ports of one client over a 16381-slot table, bucketed into 8 ranges:
        // every range gets its share within 10%.
        let mut buckets = [0u32; 8];
        for port in 0..20_000u16 {
            let slot = slot_for(flow_hash(0xabcdef, port, 7), 16_381).unwrap();
            buckets[(slot * 8 / 16_381) as usize] += 1;
        }
        for b in buckets {
            assert!((2250..=2750).contains(&b), "{buckets:?}");
        }
        assert_ne!(flow_hash(1, 1, 1), flow_hash(1, 1, 2));
        assert_ne!(flow_hash(1, 1, 1), flow_hash(2, 1, 1));
    }
}
