//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with integer weights.
//!
//! The table depends only on the backends' identities and weights, never on their order or
//! on time: two daemons with the same config build identical tables, and adding or removing
//! one backend moves only about 1/N of the slots.
use lb_common::{hash, NO_BACKEND};

/// One candidate for the table: its data-plane id, a stable identity (address and port) and
/// its relative weight. Weight 0 means "takes no new clients".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub id: u32,
    pub identity: u64,
    pub weight: u32,
}

/// FNV-1a over the identity with a seed: stable across Rust versions and platforms, which
/// `std`'s hasher does not promise.
fn fnv1a(seed: u64, identity: u64) -> u64 {
    hash::fnv1a(hash::FNV1A_BASIS ^ seed, identity.to_le_bytes())
}

/// Builds a table of `size` slots (a prime) mapping slot -> backend id. `seed` (the
/// service's `seed`) is mixed into every member's permutation.
pub fn build(members: &[Member], size: u32, seed: u32) -> Vec<u32> {
    let size = size as usize;
    let mut table = vec![NO_BACKEND; size];
    let mut active: Vec<Member> = members.iter().copied().filter(|m| m.weight > 0).collect();
    if active.is_empty() {
        return table;
    }
    active.sort_by_key(|m| m.identity);
    let perms: Vec<(usize, usize)> = active
        .iter()
        .map(|m| {
            let seed = u64::from(seed) << 32;
            let offset = (fnv1a(0x6f66_6673 ^ seed, m.identity) % size as u64) as usize;
            let skip = (fnv1a(0x736b_6970 ^ seed, m.identity) % (size as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; active.len()];
    let mut filled = 0;
    // Each round, a backend claims as many of its preferred free slots as its weight.
    'fill: loop {
        for (i, member) in active.iter().enumerate() {
            let (offset, skip) = perms[i];
            for _ in 0..member.weight {
                let slot = loop {
                    let candidate = (offset + next[i] * skip) % size;
                    next[i] += 1;
                    if table[candidate] == NO_BACKEND {
                        break candidate;
                    }
                };
                table[slot] = member.id;
                filled += 1;
                if filled == size {
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
    use lb_common::MAGLEV_SIZE;

    fn members(n: u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                id: i,
                identity: 0x0a02_0000 + u64::from(i),
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &id in table {
            counts[id as usize] += 1;
        }
        counts
    }

    #[test]
    fn equal_weights_get_near_equal_shares() {
        let table = build(&members(7), MAGLEV_SIZE, 0);
        let fair = MAGLEV_SIZE as f64 / 7.0;
        for count in shares(&table, 7) {
            assert!(
                (count as f64 - fair).abs() / fair < 0.02,
                "{count} vs {fair}"
            );
        }
    }

    #[test]
    fn weights_are_honoured() {
        let mut m = members(3);
        m[2].weight = 2;
        let counts = shares(&build(&m, MAGLEV_SIZE, 0), 3);
        let ratio = counts[2] as f64 / counts[0] as f64;
        assert!((1.9..2.1).contains(&ratio), "{counts:?}");
    }

    #[test]
    fn the_seed_reshuffles_and_only_the_seed() {
        let m = members(5);
        assert_eq!(build(&m, MAGLEV_SIZE, 7), build(&m, MAGLEV_SIZE, 7));
        let (a, b) = (build(&m, MAGLEV_SIZE, 0), build(&m, MAGLEV_SIZE, 7));
        let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(moved > a.len() / 2, "a new seed moved only {moved} slots");
    }

    #[test]
    fn order_does_not_matter() {
        let m = members(5);
        let mut reversed = m.clone();
        reversed.reverse();
        assert_eq!(build(&m, MAGLEV_SIZE, 0), build(&reversed, MAGLEV_SIZE, 0));
    }

    #[test]
    fn removing_one_backend_moves_only_its_slots_and_a_little_more() {
        let all = members(5);
        let before = build(&all, MAGLEV_SIZE, 0);
        let after = build(&all[..4], MAGLEV_SIZE, 0);
        let moved_other = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 4 && b != a)
            .count();
        // Maglev trades perfect stability for balance: a few percent of other slots move.
        assert!(
            (moved_other as f64) < MAGLEV_SIZE as f64 * 0.05,
            "{moved_other}"
        );
        assert!(after.iter().all(|&id| id < 4));
    }

    #[test]
    fn zero_weight_and_empty_pools() {
        let mut m = members(2);
        m[1].weight = 0;
        assert!(build(&m, MAGLEV_SIZE, 0).iter().all(|&id| id == 0));
        assert!(build(&[], 13, 0).iter().all(|&id| id == NO_BACKEND));
    }
}
