//! Full-NAT rewrite of an IPv4 or IPv6 packet with incremental checksum updates (RFC 1624).
use core::ptr::{addr_of, addr_of_mut};

use aya_ebpf::programs::XdpContext;
use lb_common::{csum::Delta, FlowEntry, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use network_types::ip::Ipv4Hdr;

use crate::{
    parse::{Packet, Part, L3, TCP_CHECK_OFFSET, TCP_MIN_HEADER, UDP_CHECK_OFFSET, UDP_HEADER},
    wire,
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
            let mut header = Delta::default();
            header.u32(old.src_be[0], new_src);
            header.u32(old.dst_be[0], new_dst);
            set_ttl(ip, ip.ttl - 1, &mut header);
            let check = header.apply(wire::load16(addr_of!(ip.check)));
            wire::store32(addr_of_mut!(ip.src_addr), new_src);
            wire::store32(addr_of_mut!(ip.dst_addr), new_dst);
            wire::store16(addr_of_mut!(ip.check), check);
        }
        L3::V6(ip) => {
            // SAFETY: as above. IPv6 has no header checksum.
            let ip = unsafe { &mut *ip };
            ip.hop_limit -= 1;
            store_address(addr_of_mut!(ip.src_addr), &entry.new_src_be);
            store_address(addr_of_mut!(ip.dst_addr), &entry.new_dst_be);
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

/// Sets an IPv4 TTL and records the change for the header checksum: the TTL shares a 16-bit
/// checksum word with the protocol byte.
#[inline(always)]
pub fn set_ttl(ip: &mut Ipv4Hdr, ttl: u8, header_check: &mut Delta) {
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl = ttl;
    header_check.u16(old, u16::from_ne_bytes([ip.ttl, ip.proto]));
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
    let check_at = header[check_offset..].as_mut_ptr();
    let check = wire::load16(check_at);
    if !has_no_checksum(old.proto, check) {
        let mut delta = Delta::default();
        delta.u32(old.src_be[0], entry.new_src_be[0]);
        delta.u32(old.dst_be[0], entry.new_dst_be[0]);
        if old.family == FAMILY_V6 {
            for word in 1..4 {
                delta.u32(old.src_be[word], entry.new_src_be[word]);
                delta.u32(old.dst_be[word], entry.new_dst_be[word]);
            }
        }
        delta.u16(old.src_port_be, entry.new_src_port_be);
        delta.u16(old.dst_port_be, entry.new_dst_port_be);
        wire::store16(check_at, as_sent(old.proto, delta.apply(check)));
    }
    wire::store16(header.as_mut_ptr(), entry.new_src_port_be);
    wire::store16(header[2..].as_mut_ptr(), entry.new_dst_port_be);
    true
}

/// Writes an IPv6 address (four words, `v6_words`) into the packet, one store each.
#[inline(always)]
fn store_address(field: *mut [u8; 16], words: &[u32; 4]) {
    let to = field.cast::<u32>();
    for (i, word) in words.iter().enumerate() {
        // SAFETY: within the 16 bytes of the address.
        wire::store32(unsafe { to.add(i) }, *word);
    }
}
