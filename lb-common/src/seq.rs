//! TCP sequence-number arithmetic (modulo 2^32, RFC 793 section 3.3).

/// Is `a` later than `b`?
#[inline(always)]
pub const fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Is `a` within `window` of `b`, before or after?
#[inline(always)]
pub const fn within(a: u32, b: u32, window: u32) -> bool {
    a.wrapping_sub(b).wrapping_add(window) <= window.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_wrap_around() {
        assert!(after(5, u32::MAX - 5));
        assert!(!after(u32::MAX - 5, 5));
        assert!(!after(7, 7));
        assert!(within(5, u32::MAX - 5, 100));
        assert!(within(u32::MAX - 5, 5, 100));
        assert!(within(100, 0, 100));
        assert!(!within(0, 101, 100));
        assert!(!within(1000, 0, 100));
    }
}
