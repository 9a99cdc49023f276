//! The packet path for VIP and SNAT traffic (TCP and UDP, IPv4 and IPv6):
//! - confirmed flow (`LB_FLOWS`) -> rewrite and forward;
//! - half-open flow (`LB_HALF_OPEN`) -> confirm it if this packet proves the client real,
//!   then rewrite and forward;
//! - miss on a connection opening (a TCP SYN, any UDP datagram) -> pick a backend (affinity,
//!   else Maglev), claim a SNAT port, record both directions as half-open, rewrite, forward.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use lb_common::{
    hash, maglev_index, AffinityEntry, AffinityKey, Backend, Counter, FlowEntry, FlowKey, Service,
    ServiceKey, Settings, AFFINITY_NONE, BACKEND_PORT_KEEP, AFFINITY_SOURCE_PORT, FAMILY_V6, FLOW_F_CLOSING,
    FLOW_F_REVERSE, MAGLEV_SIZE, NO_BACKEND, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, SNAT_V6_BASE,
};

use crate::{
    forward::forward,
    fragments, icmp,
    maps::{
        entry_slot, key_slot, EntrySlot, KeySlot, AFFINITY, BACKENDS, FLOWS, HALF_OPEN, MAGLEV,
        NEW_FLOW_PROGRAM, NEW_FLOW_SLOT, SERVICES, SETTINGS, SNAT_ADDRS,
    },
    nat::rewrite,
    parse::{is_ours, parse, Packet, Part},
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
    if pkt.key.proto == PROTO_ICMP || pkt.key.proto == PROTO_ICMPV6 {
        return icmp::handle(ctx, &pkt);
    }
    if pkt.hop_limit() <= 1 {
        return Verdict::pass(Counter::PassTtlExpired);
    }
    // SAFETY: a coarse monotonic clock read, no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Part::LaterFragment { id } = pkt.part {
        return fragments::forward_later(ctx, &pkt, id, now);
    }

    if let Some(entry) = FLOWS.get_ptr_mut(pkt.key) {
        // SAFETY: map value pointer from a successful lookup. Concurrent CPUs may race on the
        // timestamp and flags; either write is acceptable.
        let entry = unsafe { &mut *entry };
        let reopened = pkt.opens() && entry.flags & FLOW_F_CLOSING != 0;
        if !reopened && is_fresh(entry.last_seen_ns, entry.timeout_s, now) {
            return established(ctx, &pkt, entry, now);
        }
        if reopened {
            // The client reuses the tuple of a closed connection: the new one must not
            // find the old entry once it is confirmed. The old return entry expires alone.
            let _ = FLOWS.remove(pkt.key);
        }
    }
    // Someone else's traffic leaves here, after one more lookup: it cannot be in the
    // half-open table or open a flow.
    if !is_ours(pkt.key) {
        return Verdict::pass(Counter::PassNotService);
    }
    if let Some(entry) = HALF_OPEN.get_ptr_mut(pkt.key) {
        // SAFETY: as above.
        let entry = unsafe { &mut *entry };
        if is_fresh(entry.last_seen_ns, entry.timeout_s, now) && half_open_usable(&pkt, entry) {
            if confirms(&pkt, entry) {
                confirm(pkt.key, entry, now);
            }
            return established(ctx, &pkt, entry, now);
        }
    }

    // SAFETY: the program array holds only `lb_new_flow`, an XDP program of this object. On
    // success this does not return.
    unsafe { NEW_FLOW_PROGRAM.tail_call(ctx, NEW_FLOW_SLOT) };
    Verdict::drop(Counter::DropInternal)
}

/// The packet path of `lb_new_flow`: a packet that missed both flow tables, so it opens a
/// flow or is refused. A separate program (reached by tail call) so the verifier checks it
/// once, from a clean state, rather than once per way of reaching it; it parses again.
pub fn process_new_flow(ctx: &XdpContext) -> Verdict {
    let pkt = match parse(ctx) {
        Ok(pkt) => pkt,
        Err(verdict) => return verdict,
    };
    // SAFETY: a coarse monotonic clock read, no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    new_flow(ctx, &pkt, now)
}

/// A half-open entry carries every packet of its flow, except a retransmitted SYN whose
/// return entry the LRU has already evicted: that one starts the flow afresh.
#[inline(always)]
fn half_open_usable(pkt: &Packet, entry: &FlowEntry) -> bool {
    if !pkt.opens() || entry.flags & FLOW_F_REVERSE != 0 {
        return true;
    }
    let Some(other_key) = key_slot(KeySlot::Derived) else {
        return false;
    };
    *other_key = other_direction(pkt.key.proto, pkt.key.family, entry);
    HALF_OPEN.get_ptr(other_key).is_some()
}

/// Has the client shown that it really is at its address? TCP: it acknowledged our
/// SYN-ACK. UDP: the server answered (UDP has no handshake to wait for).
#[inline(always)]
fn confirms(pkt: &Packet, entry: &FlowEntry) -> bool {
    let reverse = entry.flags & FLOW_F_REVERSE != 0;
    if pkt.key.proto == PROTO_TCP {
        !reverse && pkt.acknowledges()
    } else {
        reverse
    }
}

/// The key of the opposite direction of a flow, from one direction's entry: the entry's
/// rewritten tuple, seen from the other side.
#[inline(always)]
fn other_direction(proto: u8, family: u8, entry: &FlowEntry) -> FlowKey {
    FlowKey {
        src_be: entry.new_dst_be,
        dst_be: entry.new_src_be,
        src_port_be: entry.new_dst_port_be,
        dst_port_be: entry.new_src_port_be,
        proto,
        family,
        _pad: [0; 2],
    }
}

/// Moves both directions of a flow from `LB_HALF_OPEN` to `LB_FLOWS` with the service's
/// idle timeout. Inserting into `LB_FLOWS` before deleting from `LB_HALF_OPEN` keeps the
/// SNAT port claimed throughout (see `claim_snat_port`). If `LB_FLOWS` is full, the flow
/// stays half-open, is counted, and ends at the handshake timeout.
// Out of line: its own stack frame (see "Stack" in the README).
#[inline(never)]
fn confirm(key: &FlowKey, entry: &mut FlowEntry, now: u64) {
    let (Some(other_key), Some(this), Some(that)) = (
        key_slot(KeySlot::Derived),
        entry_slot(EntrySlot::Forward),
        entry_slot(EntrySlot::Reverse),
    ) else {
        return;
    };
    *other_key = other_direction(key.proto, key.family, entry);
    let other_key: &FlowKey = other_key;
    let Some(other) = HALF_OPEN.get_ptr(other_key) else {
        return;
    };
    *this = *entry;
    // SAFETY: map value pointer from a successful lookup; copied out at once.
    *that = unsafe { *other };
    for copy in [&mut *this, &mut *that] {
        copy.timeout_s = copy.idle_timeout_s;
        copy.last_seen_ns = now;
    }
    if FLOWS.insert(key, this, u64::from(BPF_ANY)).is_err() {
        stats::count(Counter::FlowTableFull);
        return;
    }
    if FLOWS.insert(other_key, that, u64::from(BPF_ANY)).is_err() {
        let _ = FLOWS.remove(key);
        stats::count(Counter::FlowTableFull);
        return;
    }
    let _ = HALF_OPEN.remove(key);
    let _ = HALF_OPEN.remove(other_key);
    entry.timeout_s = entry.idle_timeout_s;
    stats::count(Counter::FlowsConfirmed);
}

#[inline(always)]
pub fn is_fresh(last_seen_ns: u64, timeout_s: u32, now: u64) -> bool {
    now.saturating_sub(last_seen_ns) <= u64::from(timeout_s) * NS_PER_SEC
}

// Out of line: its own stack frame (see "Stack" in the README).
#[inline(never)]
fn established(ctx: &XdpContext, pkt: &Packet, entry: &mut FlowEntry, now: u64) -> Verdict {
    if pkt.closes() && entry.flags & FLOW_F_CLOSING == 0 {
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
    fragments::track_first(pkt, entry, now);
    translate_and_forward(ctx, pkt, entry)
}

/// Counts the packet for its flow's service and server, rewrites it as `entry` says and
/// sends it on: the end of every path that carries a packet of a known flow.
#[inline(always)]
pub fn translate_and_forward(ctx: &XdpContext, pkt: &Packet, entry: &FlowEntry) -> Verdict {
    let bytes = u64::from(pkt.ip_len);
    let traffic = if entry.flags & FLOW_F_REVERSE != 0 {
        Traffic::Reverse { bytes }
    } else {
        Traffic::Forward { bytes }
    };
    stats::record(entry.service_id, entry.backend_id, traffic);
    if !rewrite(ctx, pkt, entry) {
        return Verdict::drop(Counter::DropInternal);
    }
    forward(ctx, pkt)
}

/// A long-lived connection keeps its client's affinity alive, so the client's next
/// connection after a long one still lands on the same server.
#[inline(always)]
fn refresh_affinity(pkt: &Packet, entry: &FlowEntry, now: u64) {
    let key = affinity_key(
        pkt.key,
        entry.service_id,
        entry.flags & FLOW_F_AFFINITY_PORT != 0,
    );
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

#[inline(always)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, now: u64) -> Verdict {
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
    // SAFETY: map value pointer from a successful lookup. An update by the daemon replaces
    // the element (RCU), so the one read here stays whole until the program returns.
    let service = unsafe { &*service };
    if pkt.key.proto == PROTO_TCP && !pkt.opens() {
        return Verdict::drop(Counter::DropTcpNoFlow);
    }
    let Some(settings) = SETTINGS.get(0) else {
        return Verdict::drop(Counter::DropNotConfigured);
    };
    let (backend_id, affinity_hit) = match choose_backend(pkt.key, service, now) {
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
    let (Some(reverse), Some(forward)) = (
        entry_slot(EntrySlot::Reverse),
        entry_slot(EntrySlot::Forward),
    ) else {
        return Verdict::drop(Counter::DropInternal);
    };
    *reverse = FlowEntry {
        new_src_be: pkt.key.dst_be,
        new_dst_be: pkt.key.src_be,
        new_src_port_be: pkt.key.dst_port_be,
        new_dst_port_be: pkt.key.src_port_be,
        service_id: service.id,
        backend_id,
        flags: FLOW_F_REVERSE,
        timeout_s: settings.handshake_timeout_s,
        idle_timeout_s: service.idle_timeout_s,
        last_seen_ns: now,
    };
    // A multi-port service's servers listen on the port the client asked for.
    let server_port_be = if backend.port_be == BACKEND_PORT_KEEP {
        pkt.key.dst_port_be
    } else {
        backend.port_be
    };
    let Some(reverse_key) = claim_snat_port(pkt.key, backend, server_port_be, settings, now) else {
        return Verdict::drop(Counter::DropSnatExhausted);
    };
    *forward = FlowEntry {
        new_src_be: reverse_key.dst_be,
        new_dst_be: backend.addr_be,
        new_src_port_be: reverse_key.dst_port_be,
        new_dst_port_be: server_port_be,
        service_id: service.id,
        backend_id,
        flags: flow_flags,
        timeout_s: settings.handshake_timeout_s,
        idle_timeout_s: service.idle_timeout_s,
        last_seen_ns: now,
    };
    let forward: &FlowEntry = forward;
    if HALF_OPEN
        .insert(pkt.key, forward, u64::from(BPF_ANY))
        .is_err()
    {
        // Give the port back; a half-recorded flow would leak it until it expires.
        let _ = HALF_OPEN.remove(reverse_key);
        return Verdict::drop(Counter::DropFlowInsert);
    }

    crate::log::new_flow(ctx, pkt.key, forward, affinity_hit);
    stats::count(Counter::NewFlows);
    stats::count(if affinity_hit {
        Counter::AffinityHits
    } else {
        Counter::AffinityMisses
    });
    stats::record(service.id, backend_id, Traffic::NewFlow { affinity_hit });
    stats::record(
        service.id,
        backend_id,
        Traffic::Forward {
            bytes: u64::from(pkt.ip_len),
        },
    );
    fragments::track_first(pkt, forward, now);
    if !rewrite(ctx, pkt, forward) {
        return Verdict::drop(Counter::DropInternal);
    }
    crate::forward::forward(ctx, pkt)
}

/// The backend for a new connection: the client's fresh affinity if its backend may still
/// take it, else the service's live Maglev table. Records or refreshes the affinity.
// Out of line: its own stack frame (see "Stack" in the README).
#[inline(never)]
fn choose_backend(flow: &FlowKey, service: &Service, now: u64) -> Option<(u32, bool)> {
    if service.affinity_mode == AFFINITY_NONE {
        let h = hash::flow_hash(
            &flow.src_be,
            &flow.dst_be,
            flow.src_port_be,
            flow.dst_port_be,
        );
        return maglev_pick(service, h).map(|id| (id, false));
    }
    let key = affinity_key(
        flow,
        service.id,
        service.affinity_mode == AFFINITY_SOURCE_PORT,
    );
    if let Some(affinity) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: map value pointer from a successful lookup.
        let affinity = unsafe { &mut *affinity };
        if is_fresh(affinity.last_seen_ns, service.affinity_timeout_s, now)
            && BACKENDS
                .get(affinity.backend_id)
                .is_some_and(|b| b.service_id == service.id && b.keeps_affinity())
        {
            affinity.last_seen_ns = now;
            affinity.new_flows = affinity.new_flows.wrapping_add(1);
            return Some((affinity.backend_id, true));
        }
    }
    let backend_id = maglev_pick(
        service,
        hash::client_hash(&key.client_be, key.client_port_be),
    )?;
    let entry = AffinityEntry {
        backend_id,
        new_flows: 1,
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

/// Claims a SNAT address and port for a flow toward `backend`:`server_port_be` by inserting the return-path
/// entry (`EntrySlot::Reverse`) into `LB_HALF_OPEN` with BPF_NOEXIST: the insert itself is
/// the atomic claim, so two CPUs can never hand out the same (SNAT address, port) toward the
/// same backend. A pair is also taken while a confirmed flow holds it in `LB_FLOWS`; an
/// expired holder there is evicted. The check after the insert closes the race with
/// `confirm`, which inserts into `LB_FLOWS` before it deletes from `LB_HALF_OPEN`.
///
/// Returns the claimed return-path key (`KeySlot::Derived`).
// Out of line: its own stack frame (see "Stack" in the README).
#[inline(never)]
fn claim_snat_port(
    flow: &FlowKey,
    backend: &Backend,
    server_port_be: u16,
    settings: &Settings,
    now: u64,
) -> Option<&'static FlowKey> {
    let (base, count) = if flow.family == FAMILY_V6 {
        (SNAT_V6_BASE, settings.snat_v6_count)
    } else {
        (0, settings.snat_v4_count)
    };
    if count == 0 || settings.snat_port_max < settings.snat_port_min {
        return None;
    }
    let key = key_slot(KeySlot::Derived)?;
    *key = FlowKey {
        src_be: backend.addr_be,
        dst_be: [0; 4],
        src_port_be: server_port_be,
        dst_port_be: 0,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    let hash = hash::flow_hash(
        &flow.src_be,
        &flow.dst_be,
        flow.src_port_be,
        flow.dst_port_be,
    );
    let ports = u32::from(settings.snat_port_max - settings.snat_port_min) + 1;
    for attempt in 0..hash::SNAT_ATTEMPTS {
        let (address, offset) = hash::snat_probe(hash, now as u32, attempt, count, ports);
        key.dst_be = *SNAT_ADDRS.get(base + address)?;
        key.dst_port_be = (settings.snat_port_min + offset as u16).to_be();
        if try_claim(key, now) {
            return Some(key);
        }
    }
    None
}

/// One attempt on the candidate in `key`. Out of line, so the verifier walks one attempt's
/// branches per loop iteration instead of carrying them all in the loop's state.
#[inline(never)]
fn try_claim(key: &FlowKey, now: u64) -> bool {
    let Some(reverse) = entry_slot(EntrySlot::Reverse) else {
        return false;
    };
    let reverse: &FlowEntry = reverse;
    if let Some(holder) = FLOWS.get_ptr(key) {
        // SAFETY: map value pointer from a successful lookup.
        let expired = unsafe { !is_fresh((*holder).last_seen_ns, (*holder).timeout_s, now) };
        if !expired || FLOWS.remove(key).is_err() {
            return false;
        }
    }
    // An expired holder in LB_HALF_OPEN keeps the pair until the daemon's collection or the
    // LRU removes it; with the handshake timeout that is seconds.
    if HALF_OPEN
        .insert(key, reverse, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return false;
    }
    if FLOWS.get_ptr(key).is_some() {
        let _ = HALF_OPEN.remove(key);
        return false;
    }
    true
}
