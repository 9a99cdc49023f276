//! The packet path for VIP and SNAT traffic: flow table hit -> rewrite and forward; miss on a
//! connection opening -> pick a backend (affinity, else Maglev), claim a SNAT port, record both
//! directions, rewrite and forward.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use lb_common::{
    hash, maglev_index, AffinityEntry, AffinityKey, Backend, Counter, FlowEntry, FlowKey, Service,
    ServiceKey, Settings, AFFINITY_NONE, AFFINITY_SOURCE_PORT, FLOW_F_CLOSING, FLOW_F_REVERSE,
    MAGLEV_SIZE, NO_BACKEND,
};

use crate::{
    forward::forward_v4,
    maps::{scratch, AFFINITY, BACKENDS, FLOWS, MAGLEV, SERVICES, SETTINGS, SNAT_ADDRS},
    nat::rewrite_v4,
    parse::{parse, Packet},
    stats::{self, Traffic},
    verdict::Verdict,
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// `last_seen` is written at most this often per entry: timeouts are in seconds, and a map
/// write per packet would cost cache-line bouncing between CPUs.
const REFRESH_INTERVAL_NS: u64 = NS_PER_SEC;
/// Flow-entry flag bits recording the service's affinity mode, so refreshing a flow can
/// refresh its affinity without looking the service up.
const FLOW_F_TOUCH_AFFINITY: u32 = 1 << 8;
const FLOW_F_AFFINITY_PORT: u32 = 1 << 9;

pub fn process(ctx: &XdpContext) -> Verdict {
    let pkt = match parse(ctx) {
        Ok(pkt) => pkt,
        Err(verdict) => return verdict,
    };
    // SAFETY: bounds-checked in `parse`.
    if unsafe { (*pkt.ip).ttl } <= 1 {
        return Verdict::pass(Counter::PassTtlExpired);
    }
    // SAFETY: a coarse monotonic clock read, no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let flags = pkt.tcp_flags();

    if let Some(entry) = FLOWS.get_ptr_mut(&pkt.key) {
        // SAFETY: map value pointer from a successful lookup. Concurrent CPUs may race on the
        // timestamp and flags; either write is acceptable.
        let entry = unsafe { &mut *entry };
        let reopened = flags.opens() && entry.flags & FLOW_F_CLOSING != 0;
        if is_fresh(entry.last_seen_ns, entry.timeout_s, now) && !reopened {
            return established(ctx, &pkt, entry, now, flags.closes());
        }
    }

    let service_key = ServiceKey {
        vip_be: pkt.key.dst_be,
        port_be: pkt.key.dst_port_be,
        proto: pkt.key.proto,
        family: pkt.key.family,
    };
    let Some(service) = SERVICES.get_ptr(&service_key) else {
        // Includes return traffic for flows we no longer know: the kernel answers with a RST.
        return Verdict::pass(Counter::PassNotService);
    };
    // SAFETY: map value pointer from a successful lookup; copied out at once.
    let service = unsafe { *service };
    if !flags.opens() {
        return Verdict::drop(Counter::DropTcpNoFlow);
    }
    new_flow(ctx, &pkt, &service, now)
}

#[inline(always)]
fn is_fresh(last_seen_ns: u64, timeout_s: u32, now: u64) -> bool {
    now.saturating_sub(last_seen_ns) <= u64::from(timeout_s) * NS_PER_SEC
}

fn established(
    ctx: &XdpContext,
    pkt: &Packet,
    entry: &mut FlowEntry,
    now: u64,
    closes: bool,
) -> Verdict {
    if closes && entry.flags & FLOW_F_CLOSING == 0 {
        if let Some(settings) = SETTINGS.get(0) {
            entry.timeout_s = settings.closing_timeout_s;
        }
        entry.flags |= FLOW_F_CLOSING;
    }
    if now.saturating_sub(entry.last_seen_ns) > REFRESH_INTERVAL_NS {
        entry.last_seen_ns = now;
        if entry.flags & FLOW_F_TOUCH_AFFINITY != 0 {
            refresh_affinity(pkt, entry, now);
        }
    }
    let bytes = u64::from(pkt.ip_len);
    let traffic = if entry.flags & FLOW_F_REVERSE != 0 {
        Traffic::Reverse { bytes }
    } else {
        Traffic::Forward { bytes }
    };
    stats::record(entry.service_id, entry.backend_id, traffic);
    rewrite_v4(pkt, entry);
    forward_v4(ctx, pkt)
}

/// A long-lived connection keeps its client's affinity alive, so the client's next
/// connection after a long one still lands on the same server.
#[inline(always)]
fn refresh_affinity(pkt: &Packet, entry: &FlowEntry, now: u64) {
    let key = affinity_key(&pkt.key, entry.service_id, entry.flags & FLOW_F_AFFINITY_PORT != 0);
    if let Some(affinity) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: map value pointer from a successful lookup.
        let affinity = unsafe { &mut *affinity };
        if affinity.backend_id == entry.backend_id {
            affinity.last_seen_ns = now;
        }
    }
}

#[inline(always)]
fn affinity_key(flow: &FlowKey, service_id: u32, with_port: bool) -> AffinityKey {
    AffinityKey {
        client_be: flow.src_be,
        client_port_be: if with_port { flow.src_port_be } else { 0 },
        family: flow.family,
        _pad: 0,
        service_id,
    }
}

fn new_flow(ctx: &XdpContext, pkt: &Packet, service: &Service, now: u64) -> Verdict {
    let Some(settings) = SETTINGS.get(0) else {
        return Verdict::drop(Counter::DropNotConfigured);
    };
    let (backend_id, affinity_hit) = match choose_backend(&pkt.key, service, now) {
        Some(choice) => choice,
        None => return Verdict::drop(Counter::DropNoBackend),
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return Verdict::drop(Counter::DropNoBackend);
    };

    let mut flow_flags = 0;
    if service.affinity_mode != AFFINITY_NONE {
        flow_flags |= FLOW_F_TOUCH_AFFINITY;
    }
    if service.affinity_mode == AFFINITY_SOURCE_PORT {
        flow_flags |= FLOW_F_AFFINITY_PORT;
    }
    let Some(scratch) = scratch() else {
        return Verdict::drop(Counter::DropInternal);
    };
    let reverse = &mut scratch.reverse;
    *reverse = FlowEntry {
        new_src_be: pkt.key.dst_be,
        new_dst_be: pkt.key.src_be,
        new_src_port_be: pkt.key.dst_port_be,
        new_dst_port_be: pkt.key.src_port_be,
        service_id: service.id,
        backend_id,
        flags: FLOW_F_REVERSE,
        timeout_s: service.idle_timeout_s,
        _pad: 0,
        last_seen_ns: now,
    };
    let Some((snat_be, snat_port_be, reverse_key)) =
        claim_snat_port(&pkt.key, backend, settings, reverse, now)
    else {
        return Verdict::drop(Counter::DropSnatExhausted);
    };
    let forward = &mut scratch.forward;
    *forward = FlowEntry {
        new_src_be: snat_be,
        new_dst_be: backend.addr_be,
        new_src_port_be: snat_port_be,
        new_dst_port_be: backend.port_be,
        service_id: service.id,
        backend_id,
        flags: flow_flags,
        timeout_s: service.idle_timeout_s,
        _pad: 0,
        last_seen_ns: now,
    };
    let forward: &FlowEntry = forward;
    if FLOWS.insert(&pkt.key, forward, u64::from(BPF_ANY)).is_err() {
        // Give the port back; a half-recorded flow would leak it until it expires.
        let _ = FLOWS.remove(&reverse_key);
        return Verdict::drop(Counter::DropFlowInsert);
    }

    crate::log::new_flow(ctx, &pkt.key, backend, snat_port_be, affinity_hit);
    stats::count(Counter::NewFlows);
    stats::count(if affinity_hit {
        Counter::AffinityHits
    } else {
        Counter::AffinityMisses
    });
    stats::record(service.id, backend_id, Traffic::NewFlow { affinity_hit });
    stats::record(service.id, backend_id, Traffic::Forward { bytes: u64::from(pkt.ip_len) });
    rewrite_v4(pkt, forward);
    forward_v4(ctx, pkt)
}

/// The backend for a new connection: the client's fresh affinity if its backend may still
/// take it, else the service's live Maglev table. Records or refreshes the affinity.
#[inline(always)]
fn choose_backend(flow: &FlowKey, service: &Service, now: u64) -> Option<(u32, bool)> {
    if service.affinity_mode == AFFINITY_NONE {
        let h = hash::flow_hash(&flow.src_be, &flow.dst_be, flow.src_port_be, flow.dst_port_be);
        return maglev_pick(service, h).map(|id| (id, false));
    }
    let key = affinity_key(flow, service.id, service.affinity_mode == AFFINITY_SOURCE_PORT);
    if let Some(affinity) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: map value pointer from a successful lookup.
        let affinity = unsafe { &mut *affinity };
        if is_fresh(affinity.last_seen_ns, service.affinity_timeout_s, now)
            && BACKENDS
                .get(affinity.backend_id)
                .is_some_and(|b| b.service_id == service.id && b.keeps_affinity())
        {
            affinity.last_seen_ns = now;
            return Some((affinity.backend_id, true));
        }
    }
    let backend_id = maglev_pick(service, hash::client_hash(&key.client_be, key.client_port_be))?;
    let entry = AffinityEntry {
        backend_id,
        _pad: 0,
        last_seen_ns: now,
    };
    // An LRU insert only fails under memory pressure; the flow itself still goes through,
    // the client just has no affinity until its next connection.
    let _ = AFFINITY.insert(&key, &entry, u64::from(BPF_ANY));
    Some((backend_id, false))
}

#[inline(always)]
fn maglev_pick(service: &Service, hash: u32) -> Option<u32> {
    let slot = hash % MAGLEV_SIZE;
    let id = *MAGLEV.get(maglev_index(service.id, service.table_half, slot))?;
    (id != NO_BACKEND).then_some(id)
}

/// Claims a SNAT address and port for a flow toward `backend` by inserting the return-path
/// entry with BPF_NOEXIST: the insert itself is the atomic claim, so two CPUs can never hand
/// out the same (SNAT address, port) toward the same backend. An expired holder is evicted.
#[inline(always)]
fn claim_snat_port(
    flow: &FlowKey,
    backend: &Backend,
    settings: &Settings,
    reverse: &FlowEntry,
    now: u64,
) -> Option<([u32; 4], u16, FlowKey)> {
    if settings.snat_v4_count == 0 || settings.snat_port_max < settings.snat_port_min {
        return None;
    }
    let h = hash::flow_hash(&flow.src_be, &flow.dst_be, flow.src_port_be, flow.dst_port_be);
    let range = u32::from(settings.snat_port_max - settings.snat_port_min) + 1;
    let mut key = FlowKey {
        src_be: backend.addr_be,
        dst_be: [0; 4],
        src_port_be: backend.port_be,
        dst_port_be: 0,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    for attempt in 0..hash::SNAT_ATTEMPTS {
        let (address, offset) = hash::snat_probe(h, now as u32, attempt, settings.snat_v4_count, range);
        key.dst_be = *SNAT_ADDRS.get(address)?;
        key.dst_port_be = (settings.snat_port_min + offset as u16).to_be();
        if FLOWS.insert(&key, reverse, u64::from(BPF_NOEXIST)).is_ok() {
            return Some((key.dst_be, key.dst_port_be, key));
        }
        let holder_expired = FLOWS
            .get_ptr(&key)
            // SAFETY: map value pointer from a successful lookup.
            .is_some_and(|e| unsafe { !is_fresh((*e).last_seen_ns, (*e).timeout_s, now) });
        if holder_expired
            && FLOWS.remove(&key).is_ok()
            && FLOWS.insert(&key, reverse, u64::from(BPF_NOEXIST)).is_ok()
        {
            return Some((key.dst_be, key.dst_port_be, key));
        }
    }
    None
}
