//! The packet path for VIP and SNAT traffic (TCP and UDP, IPv4 and IPv6):
//! - confirmed flow (`LB_FLOWS`) -> rewrite and forward;
//! - half-open flow (`LB_HALF_OPEN`) -> confirm it if this packet proves the client real
//!   (see `tcp`), then rewrite and forward;
//! - a TCP SYN, or a miss on anything else -> `lb_new_flow`: pick a backend (affinity, else
//!   Maglev), claim a SNAT port, record both directions as half-open, rewrite, forward.
//!
//! Every direction of a flow is tied to the interface it arrives on, and its entry caches
//! where its packets go next (`NextHop`), so an established packet costs two lookups: its
//! flow and the routing generation.
use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    programs::XdpContext,
};
use lb_common::{
    hash, maglev_index, AffinityEntry, Backend, CloseEvent, Counter, FlowEntry, FlowKey, Service,
    ServiceKey, Settings, AFFINITY_NONE, AFFINITY_SOURCE_PORT, BACKEND_PORT_KEEP, CLAIM_SLOT,
    FAMILY_V6, FLOW_F_AFFINITY_PORT, FLOW_F_CLOSING, FLOW_F_REVERSE, FLOW_F_SEQ_KNOWN,
    FLOW_F_SYNACK_SEEN, FLOW_F_TOUCH_AFFINITY, MAGLEV_SIZE, NEW_FLOW_SLOT, NO_BACKEND,
    OPEN_FLOW_SLOT, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, SERVER_TIME_WAIT_S, SNAT_V6_BASE,
};

use crate::{
    affinity,
    clock::{self, is_fresh, NS_PER_SEC},
    copy,
    forward::{next_hop, send, NO_NEXT_HOP},
    fragments, icmp,
    maps::{
        entry_slot, key_slot, plan_slot, EntrySlot, KeySlot, NewFlowPlan, AFFINITY, BACKENDS,
        EVENTS, FLOWS, HALF_OPEN, MAGLEV, PROGRAMS, SERVICES, SETTINGS, SNAT_ADDRS,
    },
    nat::rewrite,
    parse::{is_ours, parse, Packet, Part},
    source_rules,
    stats::{self, Traffic},
    sync,
    tcp::{self, ClientAck},
    verdict::Verdict,
};

/// `bpf_ringbuf_output` flag: do not wake the consumer.
const BPF_RB_NO_WAKEUP: u64 = 1;

/// `last_seen` is written at most this often per entry: timeouts are in seconds, and a map
/// write per packet would cost cache-line bouncing between CPUs.
const REFRESH_INTERVAL_NS: u64 = NS_PER_SEC;

pub fn process(ctx: &XdpContext) -> Verdict {
    parsed(ctx, |pkt| known_flow(ctx, pkt))
}

/// Parses the packet and runs `path` on it; a packet `parse` refuses gets its verdict.
#[inline(always)]
fn parsed(ctx: &XdpContext, path: impl FnOnce(&Packet) -> Verdict) -> Verdict {
    let mut pkt = MaybeUninit::uninit();
    let mut refused = Verdict::pass(Counter::PassMalformed);
    if !parse(ctx, &mut pkt, &mut refused) {
        return refused;
    }
    // SAFETY: `parse` wrote the packet.
    path(unsafe { pkt.assume_init_ref() })
}

/// Hands the packet to the program at `slot` of `LB_PROGRAMS`; returns only if that fails.
#[inline(always)]
fn tail_call(ctx: &XdpContext, slot: u32) -> Verdict {
    // SAFETY: the program array holds only programs of this object. On success this does
    // not return.
    unsafe { PROGRAMS.tail_call(ctx, slot) };
    Verdict::drop(Counter::DropTailCall)
}

/// `lb_xdp`'s path: a packet of a flow in either table, or on to `lb_new_flow`.
#[inline(always)]
fn known_flow(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    if pkt.key.proto == PROTO_ICMP || pkt.key.proto == PROTO_ICMPV6 {
        return icmp::handle(ctx, pkt);
    }
    if pkt.hop_limit() <= 1 {
        return Verdict::pass(Counter::PassTtlExpired);
    }
    let now = clock::now();
    if let Part::LaterFragment { id } = pkt.part {
        return fragments::forward_later(ctx, pkt, id, now);
    }
    // A SYN opens a connection: `lb_new_flow` asks for the service before any flow table.
    if !pkt.opens() {
        if let Some(entry) = FLOWS.get_ptr_mut(pkt.key) {
            // SAFETY: map value pointer from a successful lookup. Concurrent CPUs may race
            // on the timestamp, flags and sequence number; either write is acceptable.
            let entry = unsafe { &mut *entry };
            if is_fresh(entry.last_seen_ns, entry.timeout_s, now) {
                return established(ctx, pkt, entry, now);
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
            if is_fresh(entry.last_seen_ns, entry.timeout_s, now) {
                return half_open(ctx, pkt, entry, now);
            }
        }
    }

    tail_call(ctx, NEW_FLOW_SLOT)
}

/// The packet path of `lb_new_flow`: a SYN, or a packet that missed both flow tables, so it
/// opens a flow or is refused. Opening a flow takes two more programs, reached by tail
/// call, so the verifier checks each once, from a clean state, rather than once per way of
/// reaching it. `lb_new_flow` chooses the backend, `lb_claim_snat` claims the SNAT port
/// (without parsing), `lb_open_flow` parses again and records the flow.
pub fn process_new_flow(ctx: &XdpContext) -> Verdict {
    parsed(ctx, |pkt| {
        let verdict = new_flow(ctx, pkt, clock::now());
        if verdict.is_none() {
            return tail_call(ctx, CLAIM_SLOT);
        }
        verdict
    })
}

/// The path of `lb_claim_snat` (see `process_new_flow`). It does not parse: it works on the
/// flow key `parse` left in `KeySlot::Packet` and on the plan, so the verifier walks the
/// claim's loop once rather than once per kind of packet.
pub fn process_claim(ctx: &XdpContext) -> Verdict {
    let verdict = claim_planned(ctx, clock::now());
    if verdict.is_none() {
        return tail_call(ctx, OPEN_FLOW_SLOT);
    }
    verdict
}

/// The packet path of `lb_open_flow` (see `process_new_flow`).
pub fn process_open_flow(ctx: &XdpContext) -> Verdict {
    parsed(ctx, |pkt| open_flow(ctx, pkt, clock::now()))
}

/// Is the packet on the side of the flow its direction belongs to? A client's packets
/// come in where its SYN did, a server's where lb sends to it.
#[inline(always)]
fn on_its_side(ctx: &XdpContext, entry: &FlowEntry) -> bool {
    entry.ingress_ifindex == 0 || entry.ingress_ifindex == ctx.ingress_ifindex() as u32
}

/// A packet of a confirmed flow.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn established(ctx: &XdpContext, pkt: &Packet, entry: &mut FlowEntry, now: u64) -> Verdict {
    if !on_its_side(ctx, entry) {
        return Verdict::drop(Counter::DropWrongSide);
    }
    if pkt.closes() && !tcp::close_believable(pkt, entry) {
        return Verdict::drop(Counter::DropTcpOutOfWindow);
    }
    carry(ctx, pkt, entry, now, false)
}

/// A packet of a half-open flow: the handshake's rules (see `tcp`) decide whether it goes
/// through, and whether it confirms the flow.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn half_open(ctx: &XdpContext, pkt: &Packet, entry: &mut FlowEntry, now: u64) -> Verdict {
    if !on_its_side(ctx, entry) {
        return Verdict::drop(Counter::DropWrongSide);
    }
    let reverse = entry.flags & FLOW_F_REVERSE != 0;
    if pkt.key.proto != PROTO_TCP {
        // UDP has no handshake: the server's answer proves the client's address real.
        return carry(ctx, pkt, entry, now, reverse);
    }
    if pkt.closes() {
        if !tcp::close_believable(pkt, entry) {
            return Verdict::drop(Counter::DropTcpOutOfWindow);
        }
        return carry(ctx, pkt, entry, now, false);
    }
    if reverse {
        if pkt.answers_syn()
            && (pkt.tcp_ack != entry.handshake_ack || !learn_server_isn(pkt, entry))
        {
            return Verdict::drop(Counter::DropTcpBadAck);
        }
        return carry(ctx, pkt, entry, now, false);
    }
    if !pkt.has_ack() {
        return carry(ctx, pkt, entry, now, false);
    }
    match tcp::client_ack(pkt, entry) {
        ClientAck::Confirms => carry(ctx, pkt, entry, now, true),
        ClientAck::Follows => carry(ctx, pkt, entry, now, false),
        ClientAck::Blind => Verdict::drop(Counter::DropTcpBadAck),
    }
}

/// The server's SYN-ACK (on the return entry `entry`): its sequence number starts the
/// return direction's tracking, and the client direction learns which ACK confirms it.
/// False if the client direction's entry is gone or belongs to a later attempt (a SYN the
/// client retried, which took another SNAT port): that SYN-ACK answers nothing live.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn learn_server_isn(pkt: &Packet, entry: &mut FlowEntry) -> bool {
    let Some(client_key) = other_direction_key(pkt.key, entry) else {
        return false;
    };
    let Some(client) = HALF_OPEN.get_ptr_mut(client_key) else {
        return false;
    };
    // SAFETY: map value pointer from a successful lookup.
    let client = unsafe { &mut *client };
    if copy::words(&client.new_src_be) != pkt.key.dst_be
        || client.new_src_port_be != pkt.key.dst_port_be
    {
        return false;
    }
    let server_next = pkt.tcp_seq.wrapping_add(1);
    entry.seq_next = server_next;
    entry.flags |= FLOW_F_SEQ_KNOWN;
    client.handshake_ack = server_next;
    client.flags |= FLOW_F_SYNACK_SEEN;
    true
}

/// Does a half-open client entry still hold its SNAT port? The LRU may have evicted the
/// return entry that claims it; then a retried SYN starts the flow afresh.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn still_claimed(pkt: &Packet, entry: &FlowEntry) -> bool {
    let Some(return_key) = other_direction_key(pkt.key, entry) else {
        return false;
    };
    entry.flags & FLOW_F_REVERSE == 0 && HALF_OPEN.get_ptr(return_key).is_some()
}

/// The key of the opposite direction of the flow `key` belongs to, built in
/// `KeySlot::Derived` from the direction's entry: its rewritten tuple, seen from the other
/// side.
#[inline(always)]
fn other_direction_key(key: &FlowKey, entry: &FlowEntry) -> Option<&'static mut FlowKey> {
    let other = key_slot(KeySlot::Derived)?;
    *other = entry.other_direction(key);
    Some(other)
}

/// Carries a packet of a known flow: its state (closing, sequence, last seen), the counts,
/// the rewrite, the next hop; with `confirm`, the flow moves to `LB_FLOWS` on the way.
#[inline(always)]
fn carry(
    ctx: &XdpContext,
    pkt: &Packet,
    entry: &mut FlowEntry,
    now: u64,
    confirm: bool,
) -> Verdict {
    if pkt.closes() && entry.flags & FLOW_F_CLOSING == 0 {
        start_closing(pkt, entry, now);
    }
    tcp::track(pkt, entry);
    if now.saturating_sub(entry.last_seen_ns) > REFRESH_INTERVAL_NS {
        entry.last_seen_ns = now;
    }
    fragments::track_first(pkt, entry, now);
    stats::flow_packet(pkt, entry);
    if !rewrite(ctx, pkt, entry) {
        return Verdict::drop(Counter::DropInternal);
    }
    let hop = next_hop(ctx, pkt, &mut entry.next_hop);
    if confirm {
        confirm_flow(pkt.key, entry, now);
    }
    match hop {
        Ok(()) => send(ctx, pkt, &entry.next_hop),
        Err(verdict) => verdict,
    }
}

/// A direction's first believable FIN or RST: it now lives `closing_timeout_s` (a server's
/// FIN before the client's: `SERVER_TIME_WAIT_S`), and the daemon hears of it
/// (`LB_EVENTS`) to remove the flow when that has passed, rather than at its next walk of
/// the table. An RST ends the other direction too.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn start_closing(pkt: &Packet, entry: &mut FlowEntry, now: u64) {
    let Some(settings) = SETTINGS.get(0) else {
        return;
    };
    entry.timeout_s = settings.closing_timeout_s;
    entry.flags |= FLOW_F_CLOSING;
    if pkt.resets() {
        if let Some(other_key) = other_direction_key(pkt.key, entry) {
            if let Some(other) = FLOWS.get_ptr_mut(other_key) {
                // SAFETY: map value pointer from a successful lookup.
                let other = unsafe { &mut *other };
                other.timeout_s = settings.closing_timeout_s;
                other.flags |= FLOW_F_CLOSING;
            }
        }
    } else if entry.flags & FLOW_F_REVERSE != 0 {
        let client_closed = other_direction_key(pkt.key, entry)
            .and_then(|key| FLOWS.get_ptr(key))
            // SAFETY: map value pointer from a successful lookup.
            .is_some_and(|other| unsafe { (*other).flags } & FLOW_F_CLOSING != 0);
        if !client_closed {
            // The server closed first: it keeps (server, SNAT address:port) in TIME_WAIT
            // and would refuse a new connection on that pair meanwhile. This entry is the
            // pair's SNAT claim, so it stays as long.
            entry.timeout_s = entry.timeout_s.max(SERVER_TIME_WAIT_S);
        }
    }
    let event = CloseEvent {
        key: copy::key(pkt.key),
        at_ns: now,
    };
    // No wakeup: the daemon drains the ring on a timer, so a busy balancer does not wake
    // it twice per connection.
    if EVENTS
        .output::<CloseEvent>(&event, BPF_RB_NO_WAKEUP)
        .is_err()
    {
        stats::count(Counter::CloseEventsLost);
    }
}

/// Copies both directions of a flow from `LB_HALF_OPEN` to `LB_FLOWS` with the service's
/// idle timeout (`entry` is the direction the confirming packet belongs to). The return
/// direction's half-open entry stays until it expires: `LB_FLOWS` is looked up first, and
/// it keeps the SNAT port claimed meanwhile (see `claim_snat_port`). If
/// `LB_FLOWS` is full, the flow stays half-open, is counted, and ends at the handshake
/// timeout.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn confirm_flow(key: &FlowKey, entry: &mut FlowEntry, now: u64) {
    let (Some(other_key), Some(this), Some(that)) = (
        other_direction_key(key, entry),
        entry_slot(EntrySlot::Forward),
        entry_slot(EntrySlot::Reverse),
    ) else {
        return;
    };
    let other_key: &FlowKey = other_key;
    let Some(other) = HALF_OPEN.get_ptr_mut(other_key) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup.
    let other = unsafe { &mut *other };
    copy::entry(this, entry);
    copy::entry(that, other);
    // The server's side is where lb sends to it (known once a route lookup succeeded).
    let (client_side, server_side) = if entry.flags & FLOW_F_REVERSE == 0 {
        (&mut *this, &mut *that)
    } else {
        (&mut *that, &mut *this)
    };
    if server_side.ingress_ifindex == 0 && client_side.next_hop.generation != 0 {
        server_side.ingress_ifindex = client_side.next_hop.ifindex;
    }
    for copy in [&mut *this, &mut *that] {
        copy.timeout_s = copy.idle_timeout_s;
        copy.last_seen_ns = now;
    }
    if FLOWS.insert(key, &*this, u64::from(BPF_ANY)).is_err() {
        stats::count(Counter::FlowTableFull);
        return;
    }
    if FLOWS.insert(other_key, &*that, u64::from(BPF_ANY)).is_err() {
        let _ = FLOWS.remove(key);
        stats::count(Counter::FlowTableFull);
        return;
    }
    // The client direction's half-open entry ends: a SYN reusing the tuple once the
    // connection has closed must open a new flow, not resume this handshake. It expires
    // in place, which every lookup treats as a miss, for the price of a write instead of
    // an LRU delete; the LRU or the daemon's GC takes it later.
    if entry.flags & FLOW_F_REVERSE == 0 {
        expire(entry);
    } else {
        expire(other);
        entry.timeout_s = entry.idle_timeout_s;
    }
    stats::count(Counter::FlowsConfirmed);
    if let Some(settings) = SETTINGS.get(0) {
        if this.flags & FLOW_F_REVERSE == 0 {
            sync::flow_confirmed(settings, key, this, that);
        } else {
            sync::flow_confirmed(settings, other_key, that, this);
        }
    }
}

/// Makes an entry expired for every freshness check (`clock::is_fresh`), whatever the clock.
#[inline(always)]
fn expire(entry: &mut FlowEntry) {
    entry.timeout_s = 0;
    entry.last_seen_ns = 0;
}

/// Chooses the backend of a new flow and leaves the choice in the plan slot for
/// `lb_claim_snat` (`Verdict::none()`), or refuses the packet.
#[inline(always)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, now: u64) -> Verdict {
    let service_key = ServiceKey {
        vip_be: copy::words(&pkt.key.dst_be),
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
    if pkt.key.proto == PROTO_TCP {
        if !pkt.opens() {
            return Verdict::drop(Counter::DropTcpNoFlow);
        }
        if let Some(entry) = FLOWS.get_ptr_mut(pkt.key) {
            // SAFETY: map value pointer from a successful lookup.
            let entry = unsafe { &mut *entry };
            if entry.flags & FLOW_F_CLOSING == 0
                && is_fresh(entry.last_seen_ns, entry.timeout_s, now)
            {
                // A SYN on a live connection's tuple belongs to that connection.
                return established(ctx, pkt, entry, now);
            }
            // The client reuses the tuple of a closed connection: the new one must not
            // find the old entry. The old return entry expires alone.
            let _ = FLOWS.remove(pkt.key);
        }
        if let Some(entry) = HALF_OPEN.get_ptr_mut(pkt.key) {
            // SAFETY: map value pointer from a successful lookup.
            let entry = unsafe { &mut *entry };
            if is_fresh(entry.last_seen_ns, entry.timeout_s, now) && still_claimed(pkt, entry) {
                // A retransmitted SYN: same server, same SNAT port, as the first.
                return established(ctx, pkt, entry, now);
            }
        }
    }
    if !source_rules::admits(service, pkt.key) {
        stats::refused(service.id);
        return Verdict::drop(Counter::DropSourceRefused);
    }
    let (backend_id, affinity_hit) = match choose_backend(pkt.key, service, now) {
        Some(choice) => choice,
        None => return Verdict::drop(Counter::DropNoBackend),
    };
    let Some(plan) = plan_slot() else {
        return Verdict::drop(Counter::DropInternal);
    };
    let mut flow_flags = 0;
    if service.affinity_mode != AFFINITY_NONE {
        flow_flags |= FLOW_F_TOUCH_AFFINITY;
    }
    if service.affinity_mode == AFFINITY_SOURCE_PORT {
        flow_flags |= FLOW_F_AFFINITY_PORT;
    }
    *plan = NewFlowPlan {
        service_id: service.id,
        backend_id,
        flow_flags,
        idle_timeout_s: service.idle_timeout_s,
        affinity_hit,
        tcp_seq: pkt.tcp_seq,
        server_port_be: 0,
        _pad: 0,
    };
    Verdict::none()
}

/// Claims a SNAT port for the planned flow (`Verdict::none()` on success).
#[inline(always)]
fn claim_planned(ctx: &XdpContext, now: u64) -> Verdict {
    let (Some(plan), Some(settings), Some(key)) =
        (plan_slot(), SETTINGS.get(0), key_slot(KeySlot::Packet))
    else {
        return Verdict::drop(Counter::DropNotConfigured);
    };
    let key: &FlowKey = key;
    let Some(backend) = BACKENDS.get(plan.backend_id) else {
        return Verdict::drop(Counter::DropNoBackend);
    };
    let Some(reverse) = entry_slot(EntrySlot::Reverse) else {
        return Verdict::drop(Counter::DropInternal);
    };
    *reverse = FlowEntry {
        new_src_be: copy::words(&key.dst_be),
        new_dst_be: copy::words(&key.src_be),
        new_src_port_be: key.dst_port_be,
        new_dst_port_be: key.src_port_be,
        service_id: plan.service_id,
        backend_id: plan.backend_id,
        flags: FLOW_F_REVERSE,
        timeout_s: settings.handshake_timeout_s,
        idle_timeout_s: plan.idle_timeout_s,
        last_seen_ns: now,
        // Bound to the server's side once a route lookup has found it.
        ingress_ifindex: 0,
        seq_next: 0,
        // TCP: a SYN-ACK must acknowledge the SYN (meaningless, and unused, for UDP).
        handshake_ack: plan.tcp_seq.wrapping_add(1),
        _pad: 0,
        next_hop: NO_NEXT_HOP,
    };
    // A multi-port service's servers listen on the port the client asked for.
    plan.server_port_be = if backend.port_be == BACKEND_PORT_KEEP {
        key.dst_port_be
    } else {
        backend.port_be
    };
    let Some(claimed) = claim_snat_port(key, backend, plan.server_port_be, settings, now) else {
        return Verdict::drop(Counter::DropSnatExhausted);
    };
    // Logged here, where no parse's many kinds of packet multiply aya-log's code.
    crate::log::new_flow(ctx, key, claimed, plan.affinity_hit != 0);
    Verdict::none()
}

/// Opens the flow planned and claimed before: records both directions as half-open,
/// rewrites and sends the packet.
#[inline(always)]
fn open_flow(ctx: &XdpContext, pkt: &Packet, now: u64) -> Verdict {
    let (Some(plan), Some(settings), Some(reverse_key)) =
        (plan_slot(), SETTINGS.get(0), key_slot(KeySlot::Derived))
    else {
        return Verdict::drop(Counter::DropNotConfigured);
    };
    let (plan, reverse_key): (&NewFlowPlan, &FlowKey) = (plan, reverse_key);
    let backend_id = plan.backend_id;
    let affinity_hit = plan.affinity_hit != 0;
    let server_port_be = plan.server_port_be;
    let (Some(backend), Some(forward)) = (BACKENDS.get(backend_id), entry_slot(EntrySlot::Forward))
    else {
        let _ = HALF_OPEN.remove(reverse_key);
        return Verdict::drop(Counter::DropNoBackend);
    };
    let flow_flags = plan.flow_flags;
    let tcp = pkt.key.proto == PROTO_TCP;
    *forward = FlowEntry {
        new_src_be: copy::words(&reverse_key.dst_be),
        new_dst_be: copy::words(&backend.addr_be),
        new_src_port_be: reverse_key.dst_port_be,
        new_dst_port_be: server_port_be,
        service_id: plan.service_id,
        backend_id,
        flags: flow_flags | if tcp { FLOW_F_SEQ_KNOWN } else { 0 },
        timeout_s: settings.handshake_timeout_s,
        idle_timeout_s: plan.idle_timeout_s,
        last_seen_ns: now,
        ingress_ifindex: ctx.ingress_ifindex() as u32,
        seq_next: pkt.tcp_seq_end(),
        handshake_ack: 0,
        _pad: 0,
        next_hop: NO_NEXT_HOP,
    };
    stats::count(Counter::NewFlows);
    stats::count(if affinity_hit {
        Counter::AffinityHits
    } else {
        Counter::AffinityMisses
    });
    stats::record(
        plan.service_id,
        backend_id,
        Traffic::NewFlow { affinity_hit },
    );
    stats::flow_packet(pkt, forward);
    fragments::track_first(pkt, forward, now);
    if !rewrite(ctx, pkt, forward) {
        let _ = HALF_OPEN.remove(reverse_key);
        return Verdict::drop(Counter::DropInternal);
    }
    let hop = next_hop(ctx, pkt, &mut forward.next_hop);
    let forward: &FlowEntry = forward;
    if HALF_OPEN
        .insert(pkt.key, forward, u64::from(BPF_ANY))
        .is_err()
    {
        // Give the port back; a half-recorded flow would leak it until it expires.
        let _ = HALF_OPEN.remove(reverse_key);
        return Verdict::drop(Counter::DropFlowInsert);
    }
    match hop {
        Ok(()) => {
            bind_server_side(reverse_key, forward.next_hop.ifindex);
            send(ctx, pkt, &forward.next_hop)
        }
        Err(verdict) => verdict,
    }
}

/// Ties a new flow's return entry to the interface lb sends to the server on.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn bind_server_side(reverse_key: &FlowKey, ifindex: u32) {
    if let Some(reverse) = HALF_OPEN.get_ptr_mut(reverse_key) {
        // SAFETY: map value pointer from a successful lookup.
        unsafe { (*reverse).ingress_ifindex = ifindex };
    }
}

/// The backend for a new connection: the client's fresh affinity if its backend may still
/// take it, else the service's live Maglev table. Records or refreshes the affinity.
/// Returns the backend id and 1 if it came from the affinity, else 0 (a `bool` there would
/// make the `Option` niche-tagged, which the kernel's BTF check refuses).
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn choose_backend(flow: &FlowKey, service: &Service, now: u64) -> Option<(u32, u32)> {
    if service.affinity_mode == AFFINITY_NONE {
        let h = hash::flow_hash(
            &flow.src_be,
            &flow.dst_be,
            flow.src_port_be,
            flow.dst_port_be,
        );
        return maglev_pick(service, h).map(|id| (id, 0));
    }
    let key = affinity::key(
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
            return Some((affinity.backend_id, 1));
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
    Some((backend_id, 0))
}

#[inline(always)]
fn maglev_pick(service: &Service, hash: u32) -> Option<u32> {
    let slot = hash % MAGLEV_SIZE;
    let id = *MAGLEV.get(maglev_index(service.id, service.table_half, slot))?;
    (id != NO_BACKEND).then_some(id)
}

/// Claims a SNAT address and port for a flow toward `backend`:`server_port_be` by inserting
/// the return-path entry (`EntrySlot::Reverse`) into `LB_HALF_OPEN` with BPF_NOEXIST: the
/// insert itself is the atomic claim, so two CPUs can never hand out the same (SNAT
/// address, port) toward the same backend. A pair is also taken while a confirmed flow
/// holds it in `LB_FLOWS`; an expired holder in either table is evicted. A confirmed
/// flow's return entry stays in `LB_HALF_OPEN` until it expires (`confirm_flow`), so the
/// check of `LB_FLOWS` before the insert cannot miss a flow being confirmed meanwhile.
///
/// Returns the claimed return-path key (`KeySlot::Derived`).
// Out of line: its own stack frame (see "Stack" in README.md).
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
        src_be: copy::words(&backend.addr_be),
        dst_be: [0, 0, 0, 0],
        src_port_be: server_port_be,
        dst_port_be: 0,
        proto: flow.proto,
        family: flow.family,
        _pad: 0,
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
        key.dst_be = copy::words(SNAT_ADDRS.get(base + address)?);
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
    if HALF_OPEN
        .insert(key, reverse, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return true;
    }
    // Taken in LB_HALF_OPEN: by a live attempt, or by one that expired (a confirmed flow's
    // leftover, a spoofed SYN's), whose pair is free again.
    let Some(holder) = HALF_OPEN.get_ptr(key) else {
        return false;
    };
    // SAFETY: map value pointer from a successful lookup.
    let expired = unsafe { !is_fresh((*holder).last_seen_ns, (*holder).timeout_s, now) };
    expired
        && HALF_OPEN.remove(key).is_ok()
        && HALF_OPEN
            .insert(key, reverse, u64::from(BPF_NOEXIST))
            .is_ok()
}
