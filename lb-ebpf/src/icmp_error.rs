//! ICMP errors about a tracked flow (destination unreachable, fragmentation needed / packet
//! too big, time exceeded, parameter problem), from a router or host on either side.
//!
//! The error quotes a packet lb sent, and is addressed to that packet's (translated)
//! source. lb sends it on to the side the original came from, with the quote turned back
//! into the original's addresses and ports, so path-MTU discovery and "port unreachable"
//! work through the full NAT. The outer source becomes the flow's peer on that side (the
//! VIP toward a client, the SNAT address toward a server): no address of one side leaks
//! to the other, and the receiver can always route back.
use aya_ebpf::programs::XdpContext;
use lb_common::{
    csum::Delta, v4_words, v6_bytes, v6_words, Counter, FlowEntry, FlowKey, FAMILY_V4, FAMILY_V6,
    PROTO_TCP, PROTO_UDP,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    clock::{self, is_fresh},
    forward::forward,
    maps::{key_slot, KeySlot, FLOWS, HALF_OPEN},
    nat::{as_sent, has_no_checksum, set_ttl},
    parse::{
        ptr_at, Packet, ICMP_CHECK_OFFSET, ICMP_HEADER, IPV4_MIN_HEADER, IPV4_OFFSET_MASK,
        IPV6_HEADER, L3, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET,
    },
    stats,
    verdict::Verdict,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
/// Ports: the first 4 bytes of a TCP or UDP header. Every ICMP error quotes at least 8
/// bytes of the transport header (RFC 792, RFC 4443).
const PORTS: usize = 4;

/// Is this ICMP (family V4) or ICMPv6 type an error that quotes the packet it is about?
/// ICMPv6 types 1 to 4: unreachable, packet too big, time exceeded, parameter problem.
#[inline(always)]
pub fn is_error(family: u8, kind: u8) -> bool {
    if family == FAMILY_V4 {
        matches!(
            kind,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    } else {
        (ICMPV6_DEST_UNREACH..=ICMPV6_PARAMETER_PROBLEM).contains(&kind)
    }
}

/// Translates a whole (unfragmented) ICMP error and forwards it, or leaves it to the
/// kernel if it quotes no tracked flow.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
pub fn translate(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    let Some(key) = key_slot(KeySlot::Derived) else {
        return Verdict::drop(Counter::DropInternal);
    };
    let quote_offset = pkt.l4_offset + ICMP_HEADER;
    let quoted_l4 = match pkt.l3 {
        L3::V4(_) => reply_key_v4(ctx, quote_offset, key),
        L3::V6(_) => reply_key_v6(ctx, quote_offset, key),
    };
    // A genuine error goes to the quoted packet's source; anything else is not ours.
    let Some(quoted_l4) = quoted_l4.filter(|_| key.dst_be == pkt.key.dst_be) else {
        return Verdict::pass(Counter::PassIcmp);
    };
    let key: &FlowKey = key;
    let now = clock::now();
    let entry = match FLOWS.get_ptr(key) {
        Some(entry) => entry,
        None => match HALF_OPEN.get_ptr(key) {
            Some(entry) => entry,
            None => return Verdict::pass(Counter::PassIcmp),
        },
    };
    // SAFETY: map value pointer from a successful lookup.
    let entry = unsafe { &*entry };
    if !is_fresh(entry.last_seen_ns, entry.timeout_s, now) {
        return Verdict::pass(Counter::PassIcmp);
    }
    if pkt.hop_limit() <= 1 {
        return Verdict::pass(Counter::PassTtlExpired);
    }
    if !rewrite(ctx, pkt, quoted_l4, key, entry) {
        return Verdict::drop(Counter::DropInternal);
    }
    stats::count(Counter::IcmpErrorsTranslated);
    forward(ctx, pkt)
}

/// Fills `key` with the flow key of a reply to the quoted IPv4 packet (the direction lb
/// tracks it under) and returns the offset of the quoted transport header.
#[inline(always)]
fn reply_key_v4(ctx: &XdpContext, offset: usize, key: &mut FlowKey) -> Option<usize> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked just above.
    let ip = unsafe { &*ip };
    let header_len = usize::from(ip.ihl());
    let later_fragment = u16::from_be_bytes(ip.frags) & IPV4_OFFSET_MASK != 0;
    if ip.version() != 4 || header_len < IPV4_MIN_HEADER || later_fragment {
        return None;
    }
    let l4_offset = offset + header_len;
    let src = v4_words(u32::from_ne_bytes(ip.src_addr));
    let dst = v4_words(u32::from_ne_bytes(ip.dst_addr));
    reply_key(ctx, l4_offset, key, src, dst, ip.proto, FAMILY_V4)
}

/// As `reply_key_v4`; a quoted IPv6 packet with extension headers is not followed.
#[inline(always)]
fn reply_key_v6(ctx: &XdpContext, offset: usize, key: &mut FlowKey) -> Option<usize> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
    // SAFETY: bounds-checked just above.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return None;
    }
    let src = v6_words(ip.src_addr);
    let dst = v6_words(ip.dst_addr);
    reply_key(
        ctx,
        offset + IPV6_HEADER,
        key,
        src,
        dst,
        ip.next_hdr,
        FAMILY_V6,
    )
}

#[inline(always)]
fn reply_key(
    ctx: &XdpContext,
    l4_offset: usize,
    key: &mut FlowKey,
    src: [u32; 4],
    dst: [u32; 4],
    proto: u8,
    family: u8,
) -> Option<usize> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let ports: *const [u8; PORTS] = ptr_at(ctx, l4_offset)?;
    // SAFETY: bounds-checked just above.
    let ports = unsafe { *ports };
    *key = FlowKey {
        src_be: dst,
        dst_be: src,
        src_port_be: u16::from_ne_bytes([ports[2], ports[3]]),
        dst_port_be: u16::from_ne_bytes([ports[0], ports[1]]),
        proto,
        family,
        _pad: 0,
    };
    Some(l4_offset)
}

/// `reply` is the reply key (the quote with source and destination swapped) and `entry`
/// what lb does to such replies: the quote becomes the original packet, i.e. the swap of
/// the translated reply. Every change also goes into the ICMP checksum, which covers the
/// quote (and for ICMPv6 the outer addresses through the pseudo-header). Three steps, each
/// out of line with its own small stack frame (see "Stack" in README.md).
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    quoted_l4: usize,
    reply: &FlowKey,
    entry: &FlowEntry,
) -> bool {
    let Some(transport) = rewrite_quoted_transport(ctx, quoted_l4, reply, entry) else {
        return false;
    };
    let Some(quoted_ip) = rewrite_quoted_ip(ctx, pkt, reply, entry) else {
        return false;
    };
    rewrite_outer(ctx, pkt, entry, transport, quoted_ip)
}

/// The quoted transport header: ports, and its checksum if the quote holds it. Returns the
/// changes for the ICMP checksum.
#[inline(never)]
fn rewrite_quoted_transport(
    ctx: &XdpContext,
    quoted_l4: usize,
    reply: &FlowKey,
    entry: &FlowEntry,
) -> Option<Delta> {
    let ports = ptr_at::<[u8; PORTS]>(ctx, quoted_l4)?;
    // SAFETY: bounds-checked just above.
    let ports = unsafe { &mut *ports };
    let (old_sport, old_dport) = (reply.dst_port_be, reply.src_port_be);
    let (new_sport, new_dport) = (entry.new_dst_port_be, entry.new_src_port_be);
    let mut icmp = Delta::default();
    icmp.u16(old_sport, new_sport);
    icmp.u16(old_dport, new_dport);
    ports[0..2].copy_from_slice(&new_sport.to_ne_bytes());
    ports[2..4].copy_from_slice(&new_dport.to_ne_bytes());
    let check_offset = if reply.proto == PROTO_TCP {
        TCP_CHECK_OFFSET
    } else {
        UDP_CHECK_OFFSET
    };
    let Some(check) = ptr_at::<[u8; 2]>(ctx, quoted_l4 + check_offset) else {
        return Some(icmp);
    };
    // SAFETY: bounds-checked just above.
    let check = unsafe { &mut *check };
    let old = u16::from_ne_bytes(*check);
    if has_no_checksum(reply.proto, old) {
        return Some(icmp);
    }
    // The pseudo-header's addresses and the ports.
    let mut l4 = icmp;
    l4.merge(addresses(reply, entry));
    let new = as_sent(reply.proto, l4.apply(old));
    icmp.u16(old, new);
    *check = new.to_ne_bytes();
    Some(icmp)
}

/// The change of the quoted addresses back to the original's.
#[inline(always)]
fn addresses(reply: &FlowKey, entry: &FlowEntry) -> Delta {
    let mut delta = address_change(&reply.dst_be, &entry.new_dst_be);
    delta.merge(address_change(&reply.src_be, &entry.new_src_be));
    delta
}

// Out of line: unrolled inline, the address words all stay live and spill to the stack.
#[inline(never)]
fn address_change(old: &[u32; 4], new: &[u32; 4]) -> Delta {
    let mut delta = Delta::default();
    delta.address(old, new);
    delta
}

/// The quoted IP header's addresses (and IPv4 header checksum). Returns the changes for
/// the ICMP checksum.
#[inline(never)]
fn rewrite_quoted_ip(
    ctx: &XdpContext,
    pkt: &Packet,
    reply: &FlowKey,
    entry: &FlowEntry,
) -> Option<Delta> {
    let quote_offset = pkt.l4_offset + ICMP_HEADER;
    let (orig_src, orig_dst) = (&entry.new_dst_be, &entry.new_src_be);
    let mut icmp = addresses(reply, entry);
    if pkt.key.family == FAMILY_V4 {
        let quoted = ptr_at::<Ipv4Hdr>(ctx, quote_offset)?;
        // SAFETY: bounds-checked just above.
        let quoted = unsafe { &mut *quoted };
        let mut header = Delta::default();
        header.u32(reply.dst_be[0], orig_src[0]);
        header.u32(reply.src_be[0], orig_dst[0]);
        let old = u16::from_ne_bytes(quoted.check);
        let new = header.apply(old);
        icmp.u16(old, new);
        quoted.check = new.to_ne_bytes();
        quoted.src_addr = orig_src[0].to_ne_bytes();
        quoted.dst_addr = orig_dst[0].to_ne_bytes();
    } else {
        let quoted = ptr_at::<Ipv6Hdr>(ctx, quote_offset)?;
        // SAFETY: bounds-checked just above.
        let quoted = unsafe { &mut *quoted };
        quoted.src_addr = v6_bytes(*orig_src);
        quoted.dst_addr = v6_bytes(*orig_dst);
    }
    Some(icmp)
}

/// The outer header: from the flow's peer on the original's side to the original's
/// source, one hop less; then the ICMP checksum with every change folded in.
#[inline(never)]
fn rewrite_outer(
    ctx: &XdpContext,
    pkt: &Packet,
    entry: &FlowEntry,
    transport: Delta,
    quoted_ip: Delta,
) -> bool {
    let mut icmp = transport;
    icmp.merge(quoted_ip);
    match pkt.l3 {
        L3::V4(outer) => {
            // SAFETY: bounds-checked in `parse`; nothing resized the packet since.
            let outer = unsafe { &mut *outer };
            let mut header = Delta::default();
            header.u32(pkt.key.src_be[0], entry.new_src_be[0]);
            header.u32(pkt.key.dst_be[0], entry.new_dst_be[0]);
            set_ttl(outer, outer.ttl - 1, &mut header);
            outer.check = header.apply(u16::from_ne_bytes(outer.check)).to_ne_bytes();
            outer.src_addr = entry.new_src_be[0].to_ne_bytes();
            outer.dst_addr = entry.new_dst_be[0].to_ne_bytes();
        }
        L3::V6(outer) => {
            // SAFETY: as above.
            let outer = unsafe { &mut *outer };
            icmp.merge(address_change(&pkt.key.src_be, &entry.new_src_be));
            icmp.merge(address_change(&pkt.key.dst_be, &entry.new_dst_be));
            outer.hop_limit -= 1;
            outer.src_addr = v6_bytes(entry.new_src_be);
            outer.dst_addr = v6_bytes(entry.new_dst_be);
        }
    }
    let Some(header) = ptr_at::<[u8; ICMP_HEADER]>(ctx, pkt.l4_offset) else {
        return false;
    };
    // SAFETY: bounds-checked just above.
    let header = unsafe { &mut *header };
    let old = u16::from_ne_bytes([header[ICMP_CHECK_OFFSET], header[ICMP_CHECK_OFFSET + 1]]);
    let new = icmp.apply(old);
    header[ICMP_CHECK_OFFSET..ICMP_CHECK_OFFSET + 2].copy_from_slice(&new.to_ne_bytes());
    true
}
