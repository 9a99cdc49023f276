//! Garbage collection in the kernel (`lb_sweep`): one walk of each table with
//! `bpf_for_each_map_elem`, deleting what has expired on the spot. Reading a million flows
//! out to the daemon and deleting them back costs a copy and a bucket lock per entry
//! (seconds per million); here an entry costs one look at its timestamp.
//!
//! The walk also keeps the affinities of live connections alive: a client whose connection
//! has lasted past the affinity timeout must still land on the same server with its next
//! one. Doing it here, on the walks the daemon asks it of, rather than from the packet path,
//! keeps a lookup in a second large table off every established packet.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_for_each_map_elem, bpf_map_delete_elem},
    programs::XdpContext,
};
use lb_common::{
    AffinityEntry, AffinityKey, FlowEntry, FlowKey, SweepCount, SweepRequest, SweepTally,
    MAX_SERVICES,
};

use crate::{
    affinity,
    clock::{self, is_fresh},
    maps::{AFFINITY, FLOWS, HALF_OPEN, SWEPT},
};

/// What a walk carries from entry to entry, on the caller's stack.
#[repr(C)]
struct Walk {
    now: u64,
    count: SweepCount,
    /// Non-zero while walking `LB_FLOWS` for a request that announces.
    announce: u32,
    /// Non-zero while walking `LB_FLOWS` for a request that refreshes affinities.
    refresh_affinities: u32,
    unannounced: u64,
    /// `SweepRequest::affinity_timeout_s`, for the affinity walk.
    affinity_timeout_s: [u32; MAX_SERVICES as usize],
}

/// Sweeps the three tables and writes the tally over the frame. False if the frame is not
/// a `SweepRequest` (the daemon always sends one).
#[inline(always)]
pub fn sweep(ctx: &XdpContext) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + size_of::<SweepRequest>() > end {
        return false;
    }
    let request = start as *const SweepRequest;
    // SAFETY: within the frame, checked above.
    let (affinity_timeout_s, announce, refresh_affinities) = unsafe {
        (
            (*request).affinity_timeout_s,
            (*request).announce,
            (*request).refresh_affinities,
        )
    };
    let mut walk = Walk {
        now: clock::now(),
        count: SweepCount::default(),
        announce,
        refresh_affinities,
        unannounced: 0,
        affinity_timeout_s,
    };
    let flows = walk_table(&FLOWS as *const _ as *mut c_void, sweep_flow, &mut walk);
    // Only confirmed flows are the peers' business, and only they hold affinities: a
    // half-open one is at most a handshake timeout old.
    walk.announce = 0;
    walk.refresh_affinities = 0;
    let half_open = walk_table(&HALF_OPEN as *const _ as *mut c_void, sweep_flow, &mut walk);
    let affinities = walk_table(
        &AFFINITY as *const _ as *mut c_void,
        sweep_affinity,
        &mut walk,
    );
    let tally = SweepTally {
        flows,
        half_open,
        affinities,
        unannounced: walk.unannounced,
    };
    // SAFETY: a `SweepTally` is smaller than the `SweepRequest` checked above.
    unsafe { (start as *mut SweepTally).write_unaligned(tally) };
    true
}

type Visit = extern "C" fn(*mut c_void, *mut c_void, *mut c_void, *mut c_void) -> i64;

#[inline(always)]
fn walk_table(map: *mut c_void, visit: Visit, walk: &mut Walk) -> SweepCount {
    walk.count = SweepCount::default();
    // SAFETY: `map` is one of this object's hash maps and `visit` matches its key and
    // value types; the kernel passes `walk` back to every call of `visit`.
    unsafe {
        bpf_for_each_map_elem(
            map,
            visit as *mut c_void,
            walk as *mut Walk as *mut c_void,
            0,
        )
    };
    walk.count
}

/// Deletes `key` from `map` unless `fresh`; counts either way. True if it deleted the
/// entry (false if kept, or another CPU deleted it first).
#[inline(always)]
fn settle(map: *mut c_void, key: *mut c_void, fresh: bool, walk: &mut Walk) -> bool {
    if fresh {
        walk.count.kept += 1;
        return false;
    }
    // SAFETY: `key` is the entry's own key, as the kernel handed it.
    let deleted = unsafe { bpf_map_delete_elem(map, key) } == 0;
    if deleted {
        walk.count.removed += 1;
    }
    deleted
}

/// A flow direction (either table): expired once idle past its own timeout. Returns 0: go
/// on.
#[inline(never)]
extern "C" fn sweep_flow(
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    walk: *mut c_void,
) -> i64 {
    // SAFETY: the kernel passes a value of this table and the `Walk` given to the helper.
    let (entry, walk) = unsafe { (&*(value as *const FlowEntry), &mut *(walk as *mut Walk)) };
    let fresh = is_fresh(entry.last_seen_ns, entry.timeout_s, walk.now);
    // SAFETY: the kernel passes a key of this table.
    let flow = unsafe { &*(key as *const FlowKey) };
    if settle(map, key, fresh, walk) && walk.announce != 0 {
        if SWEPT.output::<FlowKey>(flow, 0).is_err() {
            walk.unannounced += 1;
        }
    } else if fresh && walk.refresh_affinities != 0 {
        refresh_affinity(flow, entry);
    }
    0
}

/// Brings the affinity of a live client direction up to the flow's last packet, if it
/// still names the flow's server (a later connection may have moved the client on).
#[inline(always)]
fn refresh_affinity(flow: &FlowKey, entry: &FlowEntry) {
    let Some(key) = affinity::of_flow(flow, entry) else {
        return;
    };
    if let Some(affinity) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: map value pointer from a successful lookup.
        let affinity = unsafe { &mut *affinity };
        if affinity.backend_id == entry.backend_id && affinity.last_seen_ns < entry.last_seen_ns {
            affinity.last_seen_ns = entry.last_seen_ns;
        }
    }
}

/// An affinity: expired once idle past its service's affinity timeout; of a service that is
/// gone, garbage now. Returns 0: go on.
#[inline(never)]
extern "C" fn sweep_affinity(
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    walk: *mut c_void,
) -> i64 {
    // SAFETY: as in `sweep_flow`, for the affinity table.
    let (key_fields, entry, walk) = unsafe {
        (
            &*(key as *const AffinityKey),
            &*(value as *const AffinityEntry),
            &mut *(walk as *mut Walk),
        )
    };
    let timeout_s = walk
        .affinity_timeout_s
        .get(key_fields.service_id as usize)
        .copied()
        .unwrap_or(0);
    let fresh = timeout_s != 0 && is_fresh(entry.last_seen_ns, timeout_s, walk.now);
    settle(map, key, fresh, walk);
    0
}
