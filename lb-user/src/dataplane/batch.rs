//! Whole-table reads and deletes of hash maps with `BPF_MAP_LOOKUP_BATCH` and
//! `BPF_MAP_DELETE_BATCH`: thousands of entries per syscall, where walking a map key by key
//! (what aya offers) costs two syscalls per entry, about a second per million. Garbage
//! collection and `lb status` read the flow and affinity tables this way.
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Result};
use aya::{
    maps::{HashMap, IterableMap, MapData},
    Pod,
};

/// Entries asked for per syscall. A hash bucket's entries come in one piece, so a larger
/// buffer is tried when one does not fit (ENOSPC).
const BATCH: usize = 8192;

/// `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(command: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the buffers it points
    // to are owned by the caller and sized by `count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn map_fd<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> u32 {
    map.map().fd().as_fd().as_raw_fd() as u32
}

/// Every entry of `map`, in batches. Entries added or removed meanwhile may or may not
/// appear, as with any walk of a live map.
pub fn read_all<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    let fd = map_fd(map);
    let mut entries = Vec::new();
    let mut size = BATCH;
    let (mut token, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut keys = vec![K::zeroed(); size];
        let mut values = vec![V::zeroed(); size];
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: size as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        match result {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                size *= 2;
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                entries.extend(keys.into_iter().zip(values).take(got));
                return Ok(entries);
            }
            Err(e) => bail!("BPF_MAP_LOOKUP_BATCH: {e}"),
            Ok(()) => entries.extend(keys.into_iter().zip(values).take(got)),
        }
        token = next;
        first = false;
    }
}

/// Deletes `keys` from `map`, in batches; a key already gone is skipped. Returns how many
/// were deleted.
pub fn delete<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, keys: &[K]) -> Result<usize> {
    let fd = map_fd(map);
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = attr.count as usize;
        deleted += done;
        match result {
            Ok(()) => rest = &rest[chunk.len()..],
            // The key at `done` is gone already: go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => bail!("BPF_MAP_DELETE_BATCH: {e}"),
        }
    }
    Ok(deleted)
}

trait Zeroed {
    fn zeroed() -> Self;
}

impl<T: Pod> Zeroed for T {
    fn zeroed() -> Self {
        // SAFETY: `Pod` types are plain data, valid when all-zero.
        unsafe { std::mem::zeroed() }
    }
}
