//! Selection tables: which backend sits in each slot of a Service's table. Pure functions.
//!
//! - Weighted random: each healthy backend fills slots in proportion to its weight; the kernel
//!   picks a slot at random per connection.
//! - Maglev (Eisenbud et al., NSDI '16): a prime-sized table filled from per-backend
//!   permutations, so removing one of N backends remaps only about 1/N of the flows; the kernel
//!   picks a slot by flow hash.

use std::net::IpAddr;

use mesh_common::lb::mix64;

use super::services::BackendSpec;

/// Largest weighted-random selection table per Service.
pub const MAX_WEIGHTED_SLOTS: u32 = 4096;
/// Maglev table size: a prime, ~100x a large backend set (the paper's guidance for ≤1% imbalance).
pub const MAGLEV_TABLE_SIZE: u32 = 16_381;

/// Indices of the backends that may be chosen: healthy, weight > 0.
fn live(backends: &[BackendSpec]) -> Vec<(usize, u64)> {
    backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.healthy && b.weight > 0)
        .map(|(i, b)| (i, u64::from(b.weight)))
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Weighted table: weights reduced by their gcd, scaled down to [`MAX_WEIGHTED_SLOTS`] keeping at
/// least one slot each. Returns indices into `backends`; empty when none is selectable.
pub fn weighted(backends: &[BackendSpec]) -> Vec<usize> {
    let live = live(backends);
    let divisor = live.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
    let total: u64 = live.iter().map(|&(_, w)| w / divisor).sum();
    let cap = u64::from(MAX_WEIGHTED_SLOTS);
    let mut table = Vec::new();
    for &(i, w) in &live {
        let share = w / divisor;
        let slots = if total > cap { (share * cap / total).max(1) } else { share };
        table.extend(std::iter::repeat_n(i, usize::try_from(slots).unwrap_or(usize::MAX)));
    }
    table
}

/// A backend's stable name for Maglev: its address and port (not its position in the list), so
/// the permutation of a backend does not change when others come and go.
fn backend_seed(b: &BackendSpec) -> u64 {
    let mut bytes = [0u8; 16];
    match b.addr {
        IpAddr::V4(v4) => bytes[12..].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes = v6.octets(),
    }
    let hi = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let lo = u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes"));
    mix64(hi) as u64 ^ (u64::from(mix64(lo ^ u64::from(b.port))) << 32)
}

/// Maglev table of `size` slots (must be prime). Weights: a backend with weight w takes w turns
/// per round (weights reduced by their gcd). Returns indices into `backends`.
pub fn maglev(backends: &[BackendSpec], size: u32) -> Vec<usize> {
    let live = live(backends);
    if live.is_empty() {
        return Vec::new();
    }
    let m = u64::from(size);
    let divisor = live.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
    // (index, offset, skip, turns per round, next position in the permutation)
    let mut perms: Vec<(usize, u64, u64, u64, u64)> = live
        .iter()
        .map(|&(i, w)| {
            let seed = backend_seed(&backends[i]);
            let offset = u64::from(mix64(seed)) % m;
            let skip = u64::from(mix64(seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15)) % (m - 1) + 1;
            (i, offset, skip, (w / divisor).min(64), 0)
        })
        .collect();
    // Order by seed, not by input order, so the table depends only on the set of backends.
    perms.sort_by_key(|p| backend_seed(&backends[p.0]));
    let mut table = vec![usize::MAX; usize::try_from(size).expect("fits")];
    let mut filled = 0usize;
    'fill: loop {
        for perm in &mut perms {
            for _ in 0..perm.3 {
                loop {
                    let slot = usize::try_from((perm.1 + perm.4 * perm.2) % m).expect("fits");
                    perm.4 += 1;
                    if table[slot] == usize::MAX {
                        table[slot] = perm.0;
                        filled += 1;
                        break;
                    }
                }
                if filled == table.len() {
                    break 'fill;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(last: u8, weight: u32, healthy: bool) -> BackendSpec {
        BackendSpec { addr: IpAddr::from([198, 18, 2, last]), port: 8080, weight, healthy }
    }

    #[test]
    fn equal_weights_give_one_slot_each() {
        let t = weighted(&[backend(1, 5, true), backend(2, 5, true), backend(3, 5, true)]);
        assert_eq!(t, vec![0, 1, 2]);
    }

    #[test]
    fn weights_are_proportional_after_gcd() {
        assert_eq!(weighted(&[backend(1, 10, true), backend(2, 30, true)]), vec![0, 1, 1, 1]);
    }

    #[test]
    fn unhealthy_and_zero_weight_backends_get_no_slot() {
        assert_eq!(weighted(&[backend(1, 1, false), backend(2, 0, true), backend(3, 2, true)]), vec![2]);
        assert!(weighted(&[backend(1, 1, false)]).is_empty());
        assert!(maglev(&[backend(1, 1, false)], 7).is_empty());
        assert!(!maglev(&[backend(1, 1, false), backend(2, 1, true)], 7).contains(&0));
    }

    #[test]
    fn huge_weights_are_capped_but_keep_every_backend() {
        let t = weighted(&[backend(1, 1_000_000, true), backend(2, 1, true), backend(3, 999_999, true)]);
        assert!(t.len() <= MAX_WEIGHTED_SLOTS as usize + 3);
        for i in 0..3 {
            assert!(t.contains(&i), "backend {i} lost its slot");
        }
    }

    #[test]
    fn maglev_is_balanced() {
        let backends: Vec<_> = (1..=10).map(|i| backend(i, 1, true)).collect();
        let t = maglev(&backends, MAGLEV_TABLE_SIZE);
        assert_eq!(t.len(), MAGLEV_TABLE_SIZE as usize);
        let mut counts = [0usize; 10];
        for &i in &t {
            counts[i] += 1;
        }
        let ideal = MAGLEV_TABLE_SIZE as usize / 10;
        for c in counts {
            assert!(c.abs_diff(ideal) * 100 <= ideal * 2, "imbalanced: {counts:?}");
        }
    }

    #[test]
    fn maglev_removing_one_of_n_remaps_about_one_nth() {
        let n = 10u8;
        let all: Vec<_> = (1..=n).map(|i| backend(i, 1, true)).collect();
        let before: Vec<IpAddr> = maglev(&all, MAGLEV_TABLE_SIZE).iter().map(|&i| all[i].addr).collect();
        let mut fewer = all.clone();
        let removed = fewer.remove(3).addr;
        let after: Vec<IpAddr> = maglev(&fewer, MAGLEV_TABLE_SIZE).iter().map(|&i| fewer[i].addr).collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let owned_by_removed = before.iter().filter(|&&b| b == removed).count();
        // Every slot of the removed backend must move; of the rest, only a few may (Maglev's
        // disruption bound is close to, not exactly, minimal).
        let extra = moved - owned_by_removed;
        assert!(extra * 100 <= MAGLEV_TABLE_SIZE as usize * 2, "moved {moved}, of which {extra} needlessly");
        assert!(moved * n as usize <= MAGLEV_TABLE_SIZE as usize * 12 / 10, "moved {moved} > ~1/{n}");
    }

    #[test]
    fn maglev_does_not_depend_on_input_order() {
        let a = vec![backend(1, 1, true), backend(2, 1, true), backend(3, 1, true)];
        let b = vec![backend(3, 1, true), backend(1, 1, true), backend(2, 1, true)];
        let ta: Vec<IpAddr> = maglev(&a, 101).iter().map(|&i| a[i].addr).collect();
        let tb: Vec<IpAddr> = maglev(&b, 101).iter().map(|&i| b[i].addr).collect();
        assert_eq!(ta, tb);
    }

    #[test]
    fn maglev_weights_shift_share() {
        let backends = vec![backend(1, 3, true), backend(2, 1, true)];
        let t = maglev(&backends, 1009);
        let first = t.iter().filter(|&&i| i == 0).count();
        assert!((700..=790).contains(&first), "weight 3:1 gave {first}/1009");
    }
}
