//! Full-NAT rewrite of an IPv4 TCP packet, with incremental checksum updates (RFC 1624).
use lb_common::{csum, FlowEntry};

use crate::parse::Packet;

/// Rewrites addresses and ports to those of `entry` and decrements the TTL (lb is a routing
/// hop). The caller has made sure the TTL is above 1.
#[inline(always)]
pub fn rewrite_v4(pkt: &Packet, entry: &FlowEntry) {
    // SAFETY: both headers were bounds-checked in `parse` and nothing resized the packet since.
    let (ip, tcp) = unsafe { (&mut *pkt.ip, &mut *pkt.tcp) };

    let old_src = u32::from_ne_bytes(ip.src_addr);
    let old_dst = u32::from_ne_bytes(ip.dst_addr);
    let old_sport = u16::from_ne_bytes(tcp.source);
    let old_dport = u16::from_ne_bytes(tcp.dest);
    let new_src = entry.new_src_be[0];
    let new_dst = entry.new_dst_be[0];

    let mut ip_check = u16::from_ne_bytes(ip.check);
    ip_check = csum::replace_u32(ip_check, old_src, new_src);
    ip_check = csum::replace_u32(ip_check, old_dst, new_dst);
    // TTL shares a 16-bit checksum word with the protocol byte.
    let old_ttl_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    ip_check = csum::replace_u16(ip_check, old_ttl_word, u16::from_ne_bytes([ip.ttl, ip.proto]));

    // The TCP checksum covers the addresses through the pseudo-header, and the ports.
    let mut tcp_check = u16::from_ne_bytes(tcp.check);
    tcp_check = csum::replace_u32(tcp_check, old_src, new_src);
    tcp_check = csum::replace_u32(tcp_check, old_dst, new_dst);
    tcp_check = csum::replace_u16(tcp_check, old_sport, entry.new_src_port_be);
    tcp_check = csum::replace_u16(tcp_check, old_dport, entry.new_dst_port_be);

    ip.src_addr = new_src.to_ne_bytes();
    ip.dst_addr = new_dst.to_ne_bytes();
    ip.check = ip_check.to_ne_bytes();
    tcp.source = entry.new_src_port_be.to_ne_bytes();
    tcp.dest = entry.new_dst_port_be.to_ne_bytes();
    tcp.check = tcp_check.to_ne_bytes();
}
