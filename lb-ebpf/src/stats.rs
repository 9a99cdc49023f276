//! Per-CPU counters: no atomics needed, the daemon sums the CPUs.
use aya_ebpf::maps::PerCpuArray;
use lb_common::{Counter, FlowEntry, TrafficStats, FLOW_F_REVERSE};

use crate::{
    maps::{BACKEND_STATS, COUNTERS, SERVICE_REFUSED, SERVICE_STATS},
    parse::Packet,
};

#[inline(always)]
pub fn count(counter: Counter) {
    add_one(&COUNTERS, counter as u32);
}

/// Counts a new flow refused by the source rules of service `service_id`.
#[inline(always)]
pub fn refused(service_id: u32) {
    add_one(&SERVICE_REFUSED, service_id);
}

#[inline(always)]
fn add_one(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// What happened to one packet, for the service's and the backend's counters.
#[derive(Clone, Copy)]
pub enum Traffic {
    Forward { bytes: u64 },
    Reverse { bytes: u64 },
    NewFlow { affinity_hit: bool },
}

#[inline(always)]
fn apply(stats: &mut TrafficStats, traffic: Traffic) {
    match traffic {
        Traffic::Forward { bytes } => {
            stats.fwd_packets += 1;
            stats.fwd_bytes += bytes;
        }
        Traffic::Reverse { bytes } => {
            stats.rev_packets += 1;
            stats.rev_bytes += bytes;
        }
        Traffic::NewFlow { affinity_hit } => {
            stats.new_flows += 1;
            if affinity_hit {
                stats.affinity_hits += 1;
            } else {
                stats.affinity_misses += 1;
            }
        }
    }
}

#[inline(always)]
pub fn record(service_id: u32, backend_id: u32, traffic: Traffic) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot.
        apply(unsafe { &mut *stats }, traffic);
    }
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        apply(unsafe { &mut *stats }, traffic);
    }
}

/// Counts a packet for its flow's service and server, in the flow's direction.
#[inline(always)]
pub fn flow_packet(pkt: &Packet, entry: &FlowEntry) {
    let bytes = u64::from(pkt.ip_len);
    let traffic = if entry.flags & FLOW_F_REVERSE != 0 {
        Traffic::Reverse { bytes }
    } else {
        Traffic::Forward { bytes }
    };
    record(entry.service_id, entry.backend_id, traffic);
}
