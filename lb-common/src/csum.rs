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

/// Word changes collected for one checksum, applied at once. The one idiom for every
/// checksum the data plane updates, from a TTL to an ICMP error's whole quoted packet.
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub fn u16(&mut self, old: u16, new: u16) {
        // Folded on every step so the sum never overflows, however many words change.
        self.0 = u32::from(fold(self.0 + u32::from(!old) + u32::from(new)));
    }

    #[inline(always)]
    pub fn u32(&mut self, old: u32, new: u32) {
        self.u16(old as u16, new as u16);
        self.u16((old >> 16) as u16, (new >> 16) as u16);
    }

    /// An address of up to four 32-bit words (IPv4 uses word 0 only; the rest stay 0 -> 0).
    #[inline(always)]
    pub fn address(&mut self, old: &[u32; 4], new: &[u32; 4]) {
        for word in 0..4 {
            self.u32(old[word], new[word]);
        }
    }

    /// Adds the changes recorded in `other`.
    #[inline(always)]
    pub fn merge(&mut self, other: Delta) {
        self.0 = u32::from(fold(self.0 + other.0));
    }

    /// `check` updated for every change recorded.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(u32::from(!check) + self.0)
    }
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
        let mut delta = Delta::default();
        delta.u32(old, new);
        let incremental = delta.apply(stored_check(&HEADER));
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(incremental, checksum(&h));
    }

    #[test]
    fn replacing_ttl_word_matches_a_full_recompute() {
        let mut h = HEADER;
        let old = u16::from_ne_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_ne_bytes([h[8], h[9]]);
        let mut delta = Delta::default();
        delta.u16(old, new);
        let incremental = delta.apply(stored_check(&HEADER));
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(incremental, checksum(&h));
    }

    #[test]
    fn a_delta_of_many_changes_matches_a_full_recompute() {
        let mut h = HEADER;
        let mut delta = Delta::default();
        for (at, new) in [(12, [10u8, 9, 8, 7]), (16, [192, 168, 200, 1])] {
            let old = u32::from_ne_bytes(h[at..at + 4].try_into().unwrap());
            let new = u32::from_ne_bytes(new);
            delta.u32(old, new);
            h[at..at + 4].copy_from_slice(&new.to_ne_bytes());
        }
        let old = u16::from_ne_bytes([h[4], h[5]]);
        h[4..6].copy_from_slice(&[0xbe, 0xef]);
        delta.u16(old, u16::from_ne_bytes([h[4], h[5]]));
        let incremental = delta.apply(stored_check(&HEADER));
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
            let mut delta = Delta::default();
            delta.u32(old, new);
            let incremental = delta.apply(c);
            h[10..12].copy_from_slice(&incremental.to_ne_bytes());
            assert_eq!(checksum(&h), 0, "header {h:02x?}");
        }
    }
}
