//! The Maglev array mapped into the daemon's memory (`BPF_F_MMAPABLE`): a table half
//! (65,537 slots) is written with plain stores, where `BPF_MAP_UPDATE_BATCH` takes about
//! 10 ms for it, so a drain or a health change reaches the data plane within a millisecond
//! or two. A map pinned by an lb from before the flag cannot be mapped; it is written in
//! batches instead (`Dataplane::write_maglev`).
use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::{Array, IterableMap, MapData};

/// Bytes per element in an array map's memory: the kernel rounds each value up to 8
/// (`round_up(value_size, 8)` in kernel/bpf/arraymap.c).
const ELEMENT_BYTES: usize = 8;
const U32_PER_ELEMENT: usize = ELEMENT_BYTES / size_of::<u32>();

pub struct MappedArray {
    base: NonNull<u32>,
    entries: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value alone and only reached through its methods,
// which take `&self` / `&mut self`.
unsafe impl Send for MappedArray {}
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// Maps `map` (of `entries` u32 values); `None` when the kernel refuses (a map created
    /// without `BPF_F_MMAPABLE`).
    pub fn map(map: &Array<MapData, u32>, entries: u32) -> Option<Self> {
        let entries = entries as usize;
        let bytes = entries * ELEMENT_BYTES;
        // SAFETY: a fresh shared mapping of the map's fd, of the size its values occupy; the
        // kernel checks the size and the map's flags and fails the call otherwise.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.map().fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        Some(Self {
            base: NonNull::new(base.cast())?,
            entries,
            bytes,
        })
    }

    /// Writes `values` from element `start` on; `false` if they do not fit.
    pub fn write(&mut self, start: u32, values: &[u32]) -> bool {
        let start = start as usize;
        if start + values.len() > self.entries {
            return false;
        }
        for (i, &value) in values.iter().enumerate() {
            // SAFETY: element start + i is within the mapping (checked above).
            unsafe {
                self.base
                    .as_ptr()
                    .add((start + i) * U32_PER_ELEMENT)
                    .write_volatile(value)
            };
        }
        true
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
