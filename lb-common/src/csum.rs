//! Incremental Internet checksum updates (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! All values are taken exactly as loaded from packet memory (no byte swapping): the ones'
//! complement sum is byte-order independent (RFC 1071 section 2), so reading the checksum
//! field and the replaced words with the same native loads gives the right stored result.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum after one 16-bit word changed from `old` to `new`.
#[inline(always)]
pub fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// Checksum after one 32-bit word (two 16-bit words) changed from `old` to `new`.
#[inline(always)]
pub fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + (new & 0xffff)
        + (new >> 16);
    !fold(sum)
}

/// Full checksum over `data` (16-bit words as stored, i.e. native loads), for tests and the
/// daemon; the data plane only ever updates checksums incrementally.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_ne_bytes([pair[0], pair[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_ne_bytes([*last, 0]));
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte IPv4 header with a valid checksum (from a real capture).
    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0xb1, 0xe6, 0xac, 0x10, 0x0a,
        0x63, 0xac, 0x10, 0x0a, 0x0c,
    ];

    fn stored_check(h: &[u8]) -> u16 {
        u16::from_ne_bytes([h[10], h[11]])
    }

    #[test]
    fn full_checksum_of_valid_header_verifies_to_zero() {
        assert_eq!(checksum(&HEADER), 0);
    }

    #[test]
    fn replacing_an_address_matches_a_full_recompute() {
        let mut h = HEADER;
        let old = u32::from_ne_bytes(h[16..20].try_into().unwrap());
        let new = u32::from_ne_bytes([10, 200, 3, 77]);
        h[16..20].copy_from_slice(&new.to_ne_bytes());
        let incremental = replace_u32(stored_check(&HEADER), old, new);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(incremental, checksum(&h));
    }

    #[test]
    fn replacing_ttl_word_matches_a_full_recompute() {
        let mut h = HEADER;
        let old = u16::from_ne_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_ne_bytes([h[8], h[9]]);
        let incremental = replace_u16(stored_check(&HEADER), old, new);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(incremental, checksum(&h));
    }

    #[test]
    fn many_random_rewrites_match_full_recompute() {
        // xorshift: deterministic and dependency-free.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..10_000 {
            let mut h = HEADER;
            for b in h[12..20].iter_mut() {
                *b = next() as u8;
            }
            h[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_ne_bytes());
            let old = u32::from_ne_bytes(h[12..16].try_into().unwrap());
            let new = next() as u32;
            h[12..16].copy_from_slice(&new.to_ne_bytes());
            let incremental = replace_u32(c, old, new);
            h[10..12].copy_from_slice(&incremental.to_ne_bytes());
            assert_eq!(checksum(&h), 0, "header {h:02x?}");
        }
    }
}
