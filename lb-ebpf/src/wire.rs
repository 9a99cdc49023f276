//! Packet fields read and written as whole words. The header structs (ours and
//! network-types') are byte arrays with alignment 1, so LLVM reads a 4-byte address as four
//! byte loads and three shifts and ors, and writes it as four byte stores. These access the
//! field with one load or store of its width. The kernel accepts unaligned packet access on
//! the architectures lb runs on (the verifier checks alignment only where the architecture
//! asks for strict alignment, which x86-64 and arm64 do not), and the JIT emits a plain
//! load; volatile keeps LLVM from splitting or merging the access.
use core::ptr::{read_volatile, write_volatile};

/// The 16 bits at `field`, as they sit in the packet (network order).
#[inline(always)]
pub fn load16<T>(field: *const T) -> u16 {
    // SAFETY: the caller's pointer comes from a bounds-checked header (`ptr_at`), at
    // least 2 bytes long; see the module comment on alignment.
    unsafe { read_volatile(field.cast::<u16>()) }
}

/// The 32 bits at `field`, as they sit in the packet (network order).
#[inline(always)]
pub fn load32<T>(field: *const T) -> u32 {
    // SAFETY: as in `load16`, at least 4 bytes long.
    unsafe { read_volatile(field.cast::<u32>()) }
}

#[inline(always)]
pub fn store16<T>(field: *mut T, value: u16) {
    // SAFETY: as in `load16`.
    unsafe { write_volatile(field.cast::<u16>(), value) }
}

#[inline(always)]
pub fn store32<T>(field: *mut T, value: u32) {
    // SAFETY: as in `load32`.
    unsafe { write_volatile(field.cast::<u32>(), value) }
}

/// Copies a MAC address into the packet as three 16-bit words.
#[inline(always)]
pub fn store_mac(field: *mut [u8; 6], mac: &[u8; 6]) {
    let from = mac.as_ptr().cast::<u16>();
    let to = field.cast::<u16>();
    for word in 0..3 {
        // SAFETY: both hold 6 bytes; see the module comment on alignment (`mac` is at an
        // even offset of a map value).
        unsafe { write_volatile(to.add(word), read_volatile(from.add(word))) };
    }
}
