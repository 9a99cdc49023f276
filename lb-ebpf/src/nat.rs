//! Full-NAT rewrite of an IPv4 or IPv6 packet with incremental checksum updates (RFC 1624).
use aya_ebpf::programs::XdpContext;
use lb_common::{csum, FlowEntry, PROTO_TCP, PROTO_UDP};

use crate::parse::{
    Packet, Part, L3, TCP_CHECK_OFFSET, TCP_MIN_HEADER, UDP_CHECK_OFFSET, UDP_HEADER,
};

/// A UDP checksum that computes to zero is sent as all ones; zero means "none" (RFC 768).
const UDP_CHECK_NONE: u16 = 0;
const UDP_CHECK_ZERO_SENT_AS: u16 = 0xffff;

/// A transport checksum that says "none" and must stay so: UDP with checksum 0.
#[inline(always)]
pub fn has_no_checksum(proto: u8, check: u16) -> bool {
    proto == PROTO_UDP && check == UDP_CHECK_NONE
}

/// An updated transport checksum as it goes on the wire: for UDP, a sum of zero is sent as
/// all ones, since zero would mean "none".
#[inline(always)]
pub fn as_sent(proto: u8, sum: u16) -> u16 {
    if proto == PROTO_UDP && sum == UDP_CHECK_NONE {
        UDP_CHECK_ZERO_SENT_AS
    } else {
        sum
    }
}

/// Rewrites addresses and ports to those of `entry` and decrements the TTL / hop limit (lb
/// is a routing hop). The caller has made sure it is above 1. False only if the transport
/// header `parse` saw is no longer there, which nothing in between can cause.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, entry: &FlowEntry) -> bool {
    let old = &pkt.key;
    match pkt.l3 {
        L3::V4(ip) => {
            // SAFETY: bounds-checked in `parse`; nothing resized the packet since.
            let ip = unsafe { &mut *ip };
            let new_src = entry.new_src_be[0];
            let new_dst = entry.new_dst_be[0];
            let mut check = u16::from_ne_bytes(ip.check);
            check = csum::replace_u32(check, old.src_be[0], new_src);
            check = csum::replace_u32(check, old.dst_be[0], new_dst);
            // TTL shares a 16-bit checksum word with the protocol byte.
            let old_ttl_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
            ip.ttl -= 1;
            check = csum::replace_u16(check, old_ttl_word, u16::from_ne_bytes([ip.ttl, ip.proto]));
            ip.src_addr = new_src.to_ne_bytes();
            ip.dst_addr = new_dst.to_ne_bytes();
            ip.check = check.to_ne_bytes();
        }
        L3::V6(ip) => {
            // SAFETY: as above. IPv6 has no header checksum.
            let ip = unsafe { &mut *ip };
            ip.hop_limit -= 1;
            ip.src_addr = lb_common::v6_bytes(entry.new_src_be);
            ip.dst_addr = lb_common::v6_bytes(entry.new_dst_be);
        }
    }
    if matches!(pkt.part, Part::LaterFragment { .. }) {
        return true;
    }
    match pkt.key.proto {
        PROTO_TCP => match pkt.transport::<TCP_MIN_HEADER>(ctx) {
            // SAFETY: bounds-checked by `transport`.
            Some(tcp) => rewrite_transport(pkt, entry, unsafe { &mut *tcp }, TCP_CHECK_OFFSET),
            None => false,
        },
        PROTO_UDP => match pkt.transport::<UDP_HEADER>(ctx) {
            // SAFETY: bounds-checked by `transport`.
            Some(udp) => rewrite_transport(pkt, entry, unsafe { &mut *udp }, UDP_CHECK_OFFSET),
            None => false,
        },
        _ => true,
    }
}

/// Ports and the transport checksum, which covers the addresses through the pseudo-header.
/// In a first fragment the checksum covers the whole datagram, so updating it for the
/// changed fields is still exact.
#[inline(always)]
fn rewrite_transport<const N: usize>(
    pkt: &Packet,
    entry: &FlowEntry,
    header: &mut [u8; N],
    check_offset: usize,
) -> bool {
    let old = &pkt.key;
    // Ports are the first two words of both headers; the checksum is within the fixed part.
    let check = u16::from_ne_bytes([header[check_offset], header[check_offset + 1]]);
    if !has_no_checksum(old.proto, check) {
        let mut sum = check;
        // IPv4 addresses only use word 0; the others are 0 -> 0, which changes nothing.
        for word in 0..4 {
            sum = csum::replace_u32(sum, old.src_be[word], entry.new_src_be[word]);
            sum = csum::replace_u32(sum, old.dst_be[word], entry.new_dst_be[word]);
        }
        sum = csum::replace_u16(sum, old.src_port_be, entry.new_src_port_be);
        sum = csum::replace_u16(sum, old.dst_port_be, entry.new_dst_port_be);
        let sum = as_sent(old.proto, sum);
        header[check_offset..check_offset + 2].copy_from_slice(&sum.to_ne_bytes());
    }
    header[0..2].copy_from_slice(&entry.new_src_port_be.to_ne_bytes());
    header[2..4].copy_from_slice(&entry.new_dst_port_be.to_ne_bytes());
    true
}
