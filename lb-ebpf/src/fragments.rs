//! IP fragments of balanced flows. The first fragment carries the ports and goes the way of
//! its flow; its rewrite is remembered under (source, destination, IP id, protocol) so that
//! the later fragments, which carry no ports, follow it to the same backend with the same
//! addresses. A later fragment whose first fragment was not seen is dropped (for a VIP,
//! counted) rather than forwarded half-translated.
use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use lb_common::{Counter, FlowEntry, FragmentKey};

use crate::{
    clock::is_fresh,
    copy, forward,
    maps::{entry_slot, EntrySlot, FRAGMENTS, SETTINGS},
    nat::rewrite,
    parse::{for_vip, Packet, Part},
    stats,
    verdict::Verdict,
};

#[inline(always)]
fn key(pkt: &Packet, id: u32) -> FragmentKey {
    FragmentKey {
        src_be: copy::words(&pkt.key.src_be),
        dst_be: copy::words(&pkt.key.dst_be),
        id,
        proto: pkt.key.proto,
        family: pkt.key.family,
        _pad: 0,
    }
}

/// Remembers the rewrite of a first fragment for the rest of its datagram.
#[inline(always)]
pub fn track_first(pkt: &Packet, entry: &FlowEntry, now: u64) {
    if let Part::FirstFragment { id } = pkt.part {
        remember(pkt, id, entry, now);
    }
}

// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
fn remember(pkt: &Packet, id: u32, entry: &FlowEntry, now: u64) {
    let (Some(settings), Some(remembered)) = (SETTINGS.get(0), entry_slot(EntrySlot::Fragment))
    else {
        return;
    };
    copy::entry(remembered, entry);
    remembered.timeout_s = settings.fragment_timeout_s;
    remembered.last_seen_ns = now;
    if FRAGMENTS
        .insert(&key(pkt, id), remembered, u64::from(BPF_ANY))
        .is_ok()
    {
        stats::count(Counter::FragmentsTracked);
    }
}
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
pub fn forward_later(ctx: &XdpContext, pkt: &Packet, id: u32, now: u64) -> Verdict {
    let Some(entry) = FRAGMENTS.get_ptr(&key(pkt, id)) else {
        return unknown(pkt);
    };
    // SAFETY: map value pointer from a successful lookup.
    let entry = unsafe { &*entry };
    if !is_fresh(entry.last_seen_ns, entry.timeout_s, now) {
        return unknown(pkt);
    }
    translate_and_forward(ctx, pkt, entry)
}

#[inline(always)]
fn unknown(pkt: &Packet) -> Verdict {
    for_vip(pkt.key, Verdict::drop(Counter::DropFragmentUnknown))
}

/// Counts, rewrites and sends a later fragment: no flow state changes, no cached next hop.
#[inline(always)]
fn translate_and_forward(ctx: &XdpContext, pkt: &Packet, entry: &FlowEntry) -> Verdict {
    stats::flow_packet(pkt, entry);
    if !rewrite(ctx, pkt, entry) {
        return Verdict::drop(Counter::DropInternal);
    }
    forward::forward(ctx, pkt)
}
