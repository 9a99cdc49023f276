//! The client hash that picks a Maglev slot. Shared so the daemon and tests can predict the
//! data plane's choice; it depends only on packet fields, never on node or time, so identical
//! nodes make identical choices.

/// Murmur3's 32-bit finaliser step, applied per word: cheap, and good enough avalanche for
/// slot selection (the slot is `hash % MAGLEV_SIZE`, a prime).
#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let mut k = word.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
    let h = (h ^ k).rotate_left(13);
    h.wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

const SEED: u32 = 0x1b_0001;

#[inline(always)]
fn mix_endpoint(mut h: u32, addr_be: &[u32; 4], port_be: u16) -> u32 {
    h = mix(h, addr_be[0]);
    h = mix(h, addr_be[1]);
    h = mix(h, addr_be[2]);
    h = mix(h, addr_be[3]);
    mix(h, u32::from(port_be))
}

/// Hash of a client address and (for `source-port` affinity) port; port 0 when unused.
#[inline(always)]
pub fn client_hash(addr_be: &[u32; 4], port_be: u16) -> u32 {
    finish(mix_endpoint(SEED, addr_be, port_be))
}

/// Hash of a whole connection, for services without affinity.
#[inline(always)]
pub fn flow_hash(src_be: &[u32; 4], dst_be: &[u32; 4], src_port_be: u16, dst_port_be: u16) -> u32 {
    finish(mix_endpoint(
        client_hash(src_be, src_port_be),
        dst_be,
        dst_port_be,
    ))
}

/// The `LB_ADDR_FILTER` slot of an address (words as in a flow key).
#[inline(always)]
pub fn address_slot(addr_be: &[u32; 4]) -> u32 {
    let h = addr_be[0]
        ^ addr_be[1].rotate_left(8)
        ^ addr_be[2].rotate_left(16)
        ^ addr_be[3].rotate_left(24);
    finish(h) % crate::ADDR_FILTER_SLOTS
}

/// SNAT (address, port) pairs tried per new flow before it is refused: with independent
/// draws, a flow is refused only if all of them are taken, probability `fill^16`.
pub const SNAT_ATTEMPTS: u32 = 16;

/// The SNAT (address index, port offset) to try on `attempt` for a flow with hash
/// `flow_hash`; `salt` varies between SYNs so a retransmission draws afresh. Every attempt
/// is an independent draw over all `addresses * ports` pairs: probing neighbouring ports
/// instead clusters like linear probing and gave up at 15 % of 64 x 64512 pairs.
#[inline(always)]
pub fn snat_probe(
    flow_hash: u32,
    salt: u32,
    attempt: u32,
    addresses: u32,
    ports: u32,
) -> (u32, u32) {
    let draw = finish(flow_hash ^ salt ^ attempt.wrapping_mul(0x9e37_79b1));
    (draw % addresses, (draw / addresses) % ports)
}

/// FNV-1a's 64-bit offset basis: the start of a fresh `fnv1a` hash.
pub const FNV1A_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a (64-bit) of `bytes`, continuing from `hash`. For the daemon's identities and
/// digests that must come out equal on every node and build, which std's hasher does not
/// promise.
pub fn fnv1a(hash: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .into_iter()
        .fold(hash, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims one pair per flow the way the data plane does and returns how
    /// many flows found a free pair before the first failure.
    fn flows_until_exhausted(addresses: u32, ports: u32, flows: u32) -> u32 {
        let mut used = std::collections::HashSet::new();
        for i in 0..flows {
            let h = flow_hash(
                &[(0x0b00_0001 + i).to_be(), 0, 0, 0],
                &[0x0a64_0001u32.to_be(), 0, 0, 0],
                40000,
                443,
            );
            if !(0..SNAT_ATTEMPTS)
                .any(|attempt| used.insert(snat_probe(h, 0, attempt, addresses, ports)))
            {
                return i;
            }
        }
        flows
    }

    #[test]
    fn snat_pairs_fill_up_before_claims_fail() {
        // 4 addresses x 1000 ports: every flow up to half of the pairs gets one.
        assert_eq!(flows_until_exhausted(4, 1000, 2000), 2000);
        // A port range that the address count divides must not matter.
        assert_eq!(flows_until_exhausted(64, 64512, 600_000), 600_000);
    }

    #[test]
    fn nearby_addresses_spread_over_slots() {
        // 10.0.0.0/22 over 3 buckets: each within 10% of fair.
        let mut buckets = [0u32; 3];
        for i in 0..1024u32 {
            let addr = u32::from_be_bytes([10, 0, (i >> 8) as u8, i as u8]).to_be();
            buckets[(client_hash(&[addr, 0, 0, 0], 0) % crate::MAGLEV_SIZE % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((307..=375).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn nearby_addresses_take_different_filter_slots() {
        let slots: std::collections::HashSet<u32> = (1..=64u32)
            .map(|i| address_slot(&[u32::from_be_bytes([10, 100, 0, i as u8]).to_be(), 0, 0, 0]))
            .collect();
        assert!(slots.len() >= 62, "{} distinct slots", slots.len());
    }

    #[test]
    fn port_changes_the_hash() {
        let a = [0x0a00_0001, 0, 0, 0];
        assert_ne!(client_hash(&a, 1000), client_hash(&a, 1001));
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(FNV1A_BASIS, []), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV1A_BASIS, *b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV1A_BASIS, *b"foobar"), 0x8594_4171_f739_67e8);
        // Continuing a hash is hashing the concatenation.
        assert_eq!(
            fnv1a(fnv1a(FNV1A_BASIS, *b"foo"), *b"bar"),
            fnv1a(FNV1A_BASIS, *b"foobar")
        );
    }
}
