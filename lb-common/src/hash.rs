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
    finish(mix_endpoint(client_hash(src_be, src_port_be), dst_be, dst_port_be))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn port_changes_the_hash() {
        let a = [0x0a00_0001, 0, 0, 0];
        assert_ne!(client_hash(&a, 1000), client_hash(&a, 1001));
    }
}
