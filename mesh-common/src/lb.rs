//! Backend selection: pure functions the kernel program calls and host tests exercise.

/// Index into a selection table of `slot_count` slots for a 32-bit hash.
///
/// Multiply-shift instead of `%`: unbiased enough for tables far smaller than 2^32, and a
/// multiply is cheaper than a division on the BPF JIT. `None` when the table is empty.
#[inline(always)]
pub const fn slot_for(hash: u32, slot_count: u32) -> Option<u32> {
    if slot_count == 0 {
        return None;
    }
    // Truncation is intended: the product of two u32 shifted right by 32 always fits in u32.
    #[allow(clippy::cast_possible_truncation, reason = "(a*b)>>32 < b for u32 a, b")]
    Some(((hash as u64 * slot_count as u64) >> 32) as u32)
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
        // Walk the hash space evenly: each of 5 slots must get 1/5 of the hashes (±1).
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
}
