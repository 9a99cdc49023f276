//! ICMP: errors that quote a tracked flow are translated (see `icmp_error`); echo
//! requests to a VIP are answered from the VIP (or left to the kernel, by config); every
//! other ICMP message for a VIP is left to the kernel, counted.
use aya_ebpf::programs::XdpContext;
use lb_common::{csum::Delta, Counter, FAMILY_V4, SETTINGS_F_ECHO_REPLY};

use crate::{
    icmp_error,
    maps::SETTINGS,
    nat::set_ttl,
    parse::{for_vip, is_vip, Packet, Part, ICMP_CHECK_OFFSET, ICMP_HEADER, L3},
    verdict::Verdict,
};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// TTL / hop limit of the replies lb originates.
const REPLY_HOP_LIMIT: u8 = 64;
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
pub fn handle(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    // A fragmented message is the kernel's: a reply or a translation needs all of it.
    let header = match pkt.transport::<ICMP_HEADER>(ctx) {
        Some(header) if pkt.part == Part::Whole => header,
        _ => return not_handled(pkt),
    };
    // SAFETY: bounds-checked by `transport`.
    let header = unsafe { &mut *header };
    if icmp_error::is_error(pkt.key.family, header[0]) {
        return icmp_error::translate(ctx, pkt);
    }
    if !is_vip(pkt.key) {
        return Verdict::pass(Counter::PassNotService);
    }
    let (request, reply) = if pkt.key.family == FAMILY_V4 {
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
    } else {
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
    };
    let answer = SETTINGS
        .get(0)
        .is_some_and(|s| s.flags & SETTINGS_F_ECHO_REPLY != 0);
    if header[0] != request || !answer {
        return Verdict::pass(Counter::PassIcmp);
    }
    echo_reply(pkt, header, reply)
}

#[inline(always)]
fn not_handled(pkt: &Packet) -> Verdict {
    for_vip(pkt.key, Verdict::pass(Counter::PassIcmp))
}

/// Turns the request into its reply in place and sends it back where it came from: swap
/// MACs and addresses (the pseudo-header sum does not change), new type and hop limit.
#[inline(always)]
fn echo_reply(pkt: &Packet, header: &mut [u8; ICMP_HEADER], reply: u8) -> Verdict {
    let old_word = u16::from_ne_bytes([header[0], header[1]]);
    header[0] = reply;
    let mut change = Delta::default();
    change.u16(old_word, u16::from_ne_bytes([header[0], header[1]]));
    let check = u16::from_ne_bytes([header[ICMP_CHECK_OFFSET], header[ICMP_CHECK_OFFSET + 1]]);
    let check = change.apply(check);
    header[ICMP_CHECK_OFFSET..ICMP_CHECK_OFFSET + 2].copy_from_slice(&check.to_ne_bytes());
    match pkt.l3 {
        L3::V4(ip) => {
            // SAFETY: bounds-checked in `parse`.
            let ip = unsafe { &mut *ip };
            core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
            let mut header = Delta::default();
            set_ttl(ip, REPLY_HOP_LIMIT, &mut header);
            ip.check = header.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        }
        L3::V6(ip) => {
            // SAFETY: bounds-checked in `parse`.
            let ip = unsafe { &mut *ip };
            core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
            ip.hop_limit = REPLY_HOP_LIMIT;
        }
    }
    // SAFETY: the Ethernet header was bounds-checked first thing in `parse`.
    let eth = unsafe { &mut *pkt.eth };
    core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
    crate::stats::count(Counter::EchoReplies);
    Verdict::tx()
}
