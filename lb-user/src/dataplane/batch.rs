//! Whole-table reads and deletes of hash maps with `BPF_MAP_LOOKUP_BATCH` and
//! `BPF_MAP_DELETE_BATCH`, and writes with `BPF_MAP_UPDATE_BATCH`: thousands of
//! entries per syscall, where aya's key-by-key calls cost one or two syscalls per entry
//! (about a second per million). Garbage collection and `lb status` read the flow and
//! affinity tables this way; a Maglev table (65,537 slots) is read in eight calls, and
//! written so where the array cannot be mapped (`mapped`).
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, MapData},
    Pod,
};

/// Entries asked for per syscall. A hash bucket's entries come in one piece, so a larger
/// buffer is tried when one does not fit (ENOSPC).
const BATCH: usize = 8192;

/// `enum bpf_cmd` (linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
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

/// bpf(2) with `attr`, a `union bpf_attr` member of the command's (`#[repr(C)]`, its
/// buffers owned by the caller and sized as the member says).
pub(super) fn bpf<A>(command: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the buffers it points
    // to are the caller's, as sized in it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *mut A, size_of::<A>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn map_fd<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> u32 {
    map.map().fd().as_fd().as_raw_fd() as u32
}

/// One `BPF_MAP_LOOKUP_BATCH`: as many entries as `keys` holds, from after the batch
/// position `after` (from the start without one); `next` receives the position to go on
/// from. Returns the call's result and how many entries came.
fn lookup_batch<K, V>(
    fd: u32,
    after: Option<u32>,
    next: &mut u32,
    keys: &mut [K],
    values: &mut [V],
) -> (std::io::Result<()>, usize) {
    debug_assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        in_batch: after.as_ref().map_or(0, |a| a as *const u32 as u64),
        out_batch: next as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd,
        ..BatchAttr::default()
    };
    let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
    (result, attr.count as usize)
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
        let after = (!first).then_some(token);
        let (result, got) = lookup_batch(fd, after, &mut next, &mut keys, &mut values);
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

/// One `BPF_MAP_UPDATE_BATCH` of `keys` and `values` (as many of each): the call's
/// result and how many entries went in.
fn update_batch<K, V>(fd: u32, keys: &[K], values: &[V]) -> (std::io::Result<()>, usize) {
    debug_assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd,
        ..BatchAttr::default()
    };
    let result = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
    (result, attr.count as usize)
}

/// Writes `values` into `array` from index `first` on, in batches.
pub fn write_array<V: Pod>(array: &Array<MapData, V>, first: u32, values: &[V]) -> Result<()> {
    let fd = array.map().fd().as_fd().as_raw_fd() as u32;
    for (n, chunk) in values.chunks(BATCH).enumerate() {
        let start = first + (n * BATCH) as u32;
        let keys: Vec<u32> = (start..start + chunk.len() as u32).collect();
        if let (Err(e), _) = update_batch(fd, &keys, chunk) {
            bail!("BPF_MAP_UPDATE_BATCH at index {start}: {e}");
        }
    }
    Ok(())
}

/// Writes `entries` into the hash map, in batches; returns how many went in before the
/// kernel refused one (a full table), with the refusal.
pub fn write_hash<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    entries: &[(K, V)],
) -> (usize, Option<std::io::Error>) {
    let fd = map_fd(map);
    let mut written = 0;
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let (result, count) = update_batch(fd, &keys, &values);
        written += count;
        if let Err(e) = result {
            return (written, Some(e));
        }
    }
    (written, None)
}

/// Reads `count` values of `array` from index `first` on, in batches.
pub fn read_array<V: Pod>(array: &Array<MapData, V>, first: u32, count: u32) -> Result<Vec<V>> {
    let fd = array.map().fd().as_fd().as_raw_fd() as u32;
    let mut values = vec![V::zeroed(); count as usize];
    let mut keys = vec![0u32; BATCH];
    let mut done = 0;
    while done < values.len() {
        let size = (values.len() - done).min(BATCH);
        let index = first + done as u32;
        // The kernel continues after the key it is given: the one before `index`.
        let after = index.checked_sub(1);
        let mut next = 0u32;
        let (result, got) = lookup_batch(
            fd,
            after,
            &mut next,
            &mut keys[..size],
            &mut values[done..done + size],
        );
        match result {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                bail!("BPF_MAP_LOOKUP_BATCH at index {index}: {e}")
            }
            // ENOENT: the array ended after the values that came.
            _ if got == 0 => bail!("the array ends before index {index}"),
            _ => done += got,
        }
    }
    Ok(values)
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
