//! Copies and zeroing the BPF backend would otherwise turn into calls to `memmove` and
//! `memset`: it does not expand those, so each becomes a byte loop that runs per packet and
//! that the verifier walks byte by byte on every path. A copy between two pointers that may
//! alias (map value to map value, packet to map) becomes `memmove`; zeroing an array
//! becomes `memset`. Volatile accesses keep LLVM from merging the words back into one.
use core::ptr::{read_volatile, write_volatile};

use lb_common::{FlowEntry, FlowKey};

/// An address (four words) read out of memory that may alias the destination.
#[inline(always)]
pub fn words(src: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reads through a valid reference.
    unsafe {
        [
            read_volatile(&src[0]),
            read_volatile(&src[1]),
            read_volatile(&src[2]),
            read_volatile(&src[3]),
        ]
    }
}

/// A flow key read out of memory that may alias the destination (a map value, a scratch
/// slot).
#[inline(always)]
pub fn key(src: &FlowKey) -> FlowKey {
    FlowKey {
        src_be: words(&src.src_be),
        dst_be: words(&src.dst_be),
        src_port_be: src.src_port_be,
        dst_port_be: src.dst_port_be,
        proto: src.proto,
        family: src.family,
        _pad: 0,
    }
}

const ENTRY_WORDS: usize = size_of::<FlowEntry>() / 8;
const _: () = assert!(size_of::<FlowEntry>().is_multiple_of(8) && align_of::<FlowEntry>() == 8);

/// `*dst = *src` for flow entries, eight bytes at a time.
#[inline(always)]
pub fn entry(dst: &mut FlowEntry, src: &FlowEntry) {
    let dst = (dst as *mut FlowEntry).cast::<u64>();
    let src = (src as *const FlowEntry).cast::<u64>();
    for i in 0..ENTRY_WORDS {
        // SAFETY: both point at a whole, 8-aligned FlowEntry of ENTRY_WORDS words.
        unsafe { write_volatile(dst.add(i), read_volatile(src.add(i))) };
    }
}

/// Zeroes a plain C struct whose size is a multiple of eight bytes and that is 8-aligned.
#[inline(always)]
pub fn zero<T: Copy>(value: &mut T) {
    let words = size_of::<T>() / 8;
    let dst = (value as *mut T).cast::<u64>();
    for i in 0..words {
        // SAFETY: within `value`, which the caller's type makes 8-aligned; all-zero is
        // valid for the plain C structs this is used on.
        unsafe { write_volatile(dst.add(i), 0) };
    }
}
