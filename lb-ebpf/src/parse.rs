//! Header parsing: Ethernet, one 802.1Q tag, IPv4 or IPv6 (skipping the common extension
//! headers), then TCP, UDP or ICMP. Every access goes through `ptr_at`, which proves to the
//! verifier (and to the reader) that the bytes exist before they are touched.
use core::{mem::MaybeUninit, ptr::addr_of};

use aya_ebpf::programs::XdpContext;
use lb_common::{
    hash, v4_words, AddrKey, Counter, FlowKey, VipInfo, FAMILY_V4, FAMILY_V6, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    copy,
    maps::{key_slot, KeySlot, ADDR_FILTER, VIPS},
    verdict::Verdict,
    wire,
};

// EtherTypes as they sit in the frame (network order), compared with raw loads.
const ETH_P_IPV4: u16 = 0x0800_u16.to_be();
const ETH_P_IPV6: u16 = 0x86dd_u16.to_be();
const ETH_P_8021Q: u16 = 0x8100_u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8_u16.to_be();
pub const VLAN_TAG_LEN: usize = 4;

/// IPv4 "more fragments" flag and fragment offset mask, in host order of the `frags` field.
const IPV4_MF: u16 = 0x2000;
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
pub const IPV4_MIN_HEADER: usize = 20;
pub const IPV6_HEADER: usize = 40;

// IPv6 extension headers lb skips (RFC 8200 section 4), and the fragment header's fields.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers that may precede TCP/UDP but that lb does not look past.
const NEXTHDR_ESP: u8 = 50;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_MOBILITY: u8 = 135;
/// More extension headers than this in front of the transport header: not parsed.
const MAX_EXTENSION_HEADERS: usize = 4;
const EXTENSION_HEADER_UNIT: usize = 8;
const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;
const IPV6_FRAG_MORE: u16 = 1;

pub const TCP_MIN_HEADER: usize = 20;
pub const TCP_DATA_OFFSET: usize = 12;
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_CHECK_OFFSET: usize = 16;
pub const UDP_HEADER: usize = 8;
pub const UDP_CHECK_OFFSET: usize = 6;
pub const ICMP_HEADER: usize = 8;
pub const ICMP_CHECK_OFFSET: usize = 2;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A pointer to a `T` at `offset` bytes into the packet, or `None` if the packet is shorter.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[derive(Clone, Copy)]
pub enum L3 {
    V4(*mut Ipv4Hdr),
    V6(*mut Ipv6Hdr),
}

/// Which part of a datagram a packet carries; `id` is the IP identification.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// Offset 0, more to come: carries the transport header.
    FirstFragment {
        id: u32,
    },
    /// No transport header; follows its first fragment's flow.
    LaterFragment {
        id: u32,
    },
}

/// An IP packet with pointers to its headers.
pub struct Packet {
    pub eth: *mut EthHdr,
    /// The frame carries one 802.1Q (or 802.1ad) tag between Ethernet and IP.
    pub tagged: bool,
    pub l3: L3,
    /// Offset of the TCP, UDP or ICMP header, whose fixed part `parse` found complete (a
    /// `LaterFragment` has none). An offset, not a pointer: the verifier cannot tie a stored
    /// pointer's checked length to the protocol read back later, so each use re-checks
    /// through `transport`.
    pub l4_offset: usize,
    /// The 5-tuple as it arrived: the flow table key (in the per-CPU scratch slot
    /// `KeySlot::Packet`). Ports are 0 for ICMP and later fragments.
    pub key: &'static FlowKey,
    /// IP total length (host order), for byte counters and the route lookup.
    pub ip_len: u16,
    pub part: Part,
    /// TCP flags byte; 0 for other protocols.
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers (host order); 0 for other protocols.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// TCP payload bytes in this packet.
    pub tcp_payload_len: u32,
}

impl Packet {
    /// A TCP connection opening: SYN without ACK.
    #[inline(always)]
    pub fn opens(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    #[inline(always)]
    pub fn closes(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    #[inline(always)]
    pub fn resets(&self) -> bool {
        self.tcp_flags & TCP_RST != 0
    }

    /// A SYN-ACK: the server's answer to a SYN.
    #[inline(always)]
    pub fn answers_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    }

    #[inline(always)]
    pub fn has_ack(&self) -> bool {
        self.tcp_flags & TCP_ACK != 0
    }

    /// The sequence number just past this segment: SYN and FIN take one each.
    #[inline(always)]
    pub fn tcp_seq_end(&self) -> u32 {
        // Arithmetic, not branches: fewer paths for the verifier.
        let flags =
            u32::from((self.tcp_flags & TCP_SYN) >> 1) + u32::from(self.tcp_flags & TCP_FIN);
        self.tcp_seq
            .wrapping_add(self.tcp_payload_len)
            .wrapping_add(flags)
    }

    /// The first `N` bytes of the transport header, if the packet has them.
    #[inline(always)]
    pub fn transport<const N: usize>(&self, ctx: &XdpContext) -> Option<*mut [u8; N]> {
        if matches!(self.part, Part::LaterFragment { .. }) {
            return None;
        }
        ptr_at(ctx, self.l4_offset)
    }

    #[inline(always)]
    pub fn hop_limit(&self) -> u8 {
        // SAFETY: the IP header was bounds-checked in `parse`.
        match self.l3 {
            L3::V4(ip) => unsafe { (*ip).ttl },
            L3::V6(ip) => unsafe { (*ip).hop_limit },
        }
    }
}

/// Parses a frame into `out` and returns true, or says in `refused` what to do with a frame
/// that is not ours (pass untouched, or a counted drop for malformed VIP traffic).
///
/// Out of line, with its own stack frame (see "Stack" in README.md). Results go through
/// pointers and the return value is a plain bool: a returned `Result<Packet, _>` comes
/// back as a pointer into the caller's stack, or is read back as register-sized pieces of
/// spilled pointers, both of which the verifier refuses.
#[inline(never)]
pub fn parse(ctx: &XdpContext, out: &mut MaybeUninit<Packet>, refused: &mut Verdict) -> bool {
    match parse_frame(ctx) {
        Ok(packet) => {
            out.write(packet);
            true
        }
        Err(verdict) => {
            *refused = verdict;
            false
        }
    }
}

#[inline(always)]
fn parse_frame(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(Counter::PassMalformed))?;
    // SAFETY: bounds-checked just above.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_offset = EthHdr::LEN;
    let tagged = ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD;
    if tagged {
        // The tag's TCI, then the encapsulated EtherType.
        let tag: *const [u16; 2] =
            ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::pass(Counter::PassMalformed))?;
        // SAFETY: bounds-checked just above.
        ether_type = unsafe { (*tag)[1] };
        l3_offset += VLAN_TAG_LEN;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            return Err(Verdict::pass(Counter::PassVlanStacked));
        }
    }
    if ether_type == ETH_P_IPV4 {
        parse_v4(ctx, eth, l3_offset, tagged)
    } else if ether_type == ETH_P_IPV6 {
        parse_v6(ctx, eth, l3_offset, tagged)
    } else {
        Err(Verdict::pass(Counter::PassNotIp))
    }
}

#[inline(always)]
fn parse_v4(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    l3_offset: usize,
    tagged: bool,
) -> Result<Packet, Verdict> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3_offset).ok_or(Verdict::pass(Counter::PassMalformed))?;
    // SAFETY: bounds-checked just above.
    let ip_ref = unsafe { &*ip };
    let header_len = usize::from(ip_ref.ihl());
    if ip_ref.version() != 4 || header_len < IPV4_MIN_HEADER {
        return Err(Verdict::pass(Counter::PassMalformed));
    }
    let frags = u16::from_be(wire::load16(addr_of!(ip_ref.frags)));
    let id = u32::from(u16::from_be(wire::load16(addr_of!(ip_ref.id))));
    let part = if frags & (IPV4_MF | IPV4_OFFSET_MASK) == 0 {
        Part::Whole
    } else if frags & IPV4_OFFSET_MASK == 0 {
        Part::FirstFragment { id }
    } else {
        Part::LaterFragment { id }
    };
    let key = key_slot(KeySlot::Packet).ok_or(Verdict::drop(Counter::DropInternal))?;
    *key = FlowKey {
        src_be: v4_words(wire::load32(addr_of!(ip_ref.src_addr))),
        dst_be: v4_words(wire::load32(addr_of!(ip_ref.dst_addr))),
        src_port_be: 0,
        dst_port_be: 0,
        proto: ip_ref.proto,
        family: FAMILY_V4,
        _pad: 0,
    };
    if !maybe_ours(&key.dst_be) {
        return Err(Verdict::pass(Counter::PassNotService));
    }
    let ip_len = u16::from_be(wire::load16(addr_of!(ip_ref.tot_len)));
    // The total length is a claim: the headers must fit in it, and it in the frame.
    if usize::from(ip_len) < header_len || usize::from(ip_len) > frame_after(ctx, l3_offset) {
        return Err(malformed(key));
    }
    parse_l4(
        ctx,
        eth,
        tagged,
        L3::V4(ip),
        l3_offset,
        l3_offset + header_len,
        key,
        ip_len,
        part,
    )
}

#[inline(always)]
fn parse_v6(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    l3_offset: usize,
    tagged: bool,
) -> Result<Packet, Verdict> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3_offset).ok_or(Verdict::pass(Counter::PassMalformed))?;
    // SAFETY: bounds-checked just above.
    let ip_ref = unsafe { &*ip };
    if ip_ref.vcf[0] >> 4 != 6 {
        return Err(Verdict::pass(Counter::PassMalformed));
    }
    let key = key_slot(KeySlot::Packet).ok_or(Verdict::drop(Counter::DropInternal))?;
    *key = FlowKey {
        src_be: address_words(addr_of!(ip_ref.src_addr)),
        dst_be: address_words(addr_of!(ip_ref.dst_addr)),
        src_port_be: 0,
        dst_port_be: 0,
        proto: ip_ref.next_hdr,
        family: FAMILY_V6,
        _pad: 0,
    };
    if !maybe_ours(&key.dst_be) {
        return Err(Verdict::pass(Counter::PassNotService));
    }
    let ip_len =
        u16::from_be(wire::load16(addr_of!(ip_ref.payload_len))).saturating_add(IPV6_HEADER as u16);
    if usize::from(ip_len) > frame_after(ctx, l3_offset) {
        return Err(malformed(key));
    }
    let mut offset = l3_offset + IPV6_HEADER;
    let mut part = Part::Whole;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match key.proto {
            NEXTHDR_HOP | NEXTHDR_DEST | NEXTHDR_ROUTING => {
                // Next header, length in 8-byte units beyond the first, and for a routing
                // header: type, segments left.
                let Some(ext) = ptr_at::<[u8; 4]>(ctx, offset) else {
                    return Err(malformed(key));
                };
                // SAFETY: bounds-checked just above.
                let ext = unsafe { *ext };
                if key.proto == NEXTHDR_ROUTING && ext[3] != 0 {
                    // Segments left: the destination field is not the final destination.
                    return Err(unsupported_extension(key));
                }
                key.proto = ext[0];
                offset += (usize::from(ext[1]) + 1) * EXTENSION_HEADER_UNIT;
            }
            NEXTHDR_FRAGMENT => {
                let Some(ext) = ptr_at::<[u8; 8]>(ctx, offset) else {
                    return Err(malformed(key));
                };
                // SAFETY: bounds-checked just above.
                let ext = unsafe { *ext };
                let offset_and_flags = u16::from_be_bytes([ext[2], ext[3]]);
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                part = if offset_and_flags & IPV6_FRAG_OFFSET_MASK != 0 {
                    Part::LaterFragment { id }
                } else if offset_and_flags & IPV6_FRAG_MORE != 0 {
                    Part::FirstFragment { id }
                } else {
                    // An atomic fragment (RFC 6946): a whole datagram.
                    Part::Whole
                };
                key.proto = ext[0];
                offset += EXTENSION_HEADER_UNIT;
            }
            _ => break,
        }
    }
    if matches!(
        key.proto,
        NEXTHDR_HOP
            | NEXTHDR_DEST
            | NEXTHDR_ROUTING
            | NEXTHDR_FRAGMENT
            | NEXTHDR_ESP
            | NEXTHDR_AUTH
            | NEXTHDR_MOBILITY
    ) {
        return Err(unsupported_extension(key));
    }
    if offset > l3_offset + usize::from(ip_len) {
        return Err(malformed(key));
    }
    parse_l4(
        ctx,
        eth,
        tagged,
        L3::V6(ip),
        l3_offset,
        offset,
        key,
        ip_len,
        part,
    )
}

/// An IPv6 address in the packet as four words (`v6_words`), one load each.
#[inline(always)]
pub fn address_words(address: *const [u8; 16]) -> [u32; 4] {
    let words = address.cast::<u32>();
    // SAFETY: within the 16 bytes of the address.
    unsafe {
        [
            wire::load32(words),
            wire::load32(words.add(1)),
            wire::load32(words.add(2)),
            wire::load32(words.add(3)),
        ]
    }
}

/// Bytes of the frame from `offset` on.
#[inline(always)]
fn frame_after(ctx: &XdpContext, offset: usize) -> usize {
    (ctx.data_end() - ctx.data()).saturating_sub(offset)
}

// Each argument is one thing parsed so far; a struct for them would exist for this call alone.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    tagged: bool,
    l3: L3,
    l3_offset: usize,
    l4_offset: usize,
    key: &'static mut FlowKey,
    ip_len: u16,
    part: Part,
) -> Result<Packet, Verdict> {
    let (mut tcp_flags, mut tcp_seq, mut tcp_ack, mut tcp_payload_len) = (0, 0, 0, 0);
    let later_fragment = matches!(part, Part::LaterFragment { .. });
    // What the IP header says follows the headers parsed so far (checked non-negative).
    let l4_len = (l3_offset + usize::from(ip_len)).saturating_sub(l4_offset);
    // One bounds check per protocol, on the pointer that is kept: the verifier tracks the
    // checked length per pointer.
    match key.proto {
        PROTO_TCP => {
            if !later_fragment {
                let Some(tcp) = ptr_at::<[u8; TCP_MIN_HEADER]>(ctx, l4_offset) else {
                    return Err(malformed(key));
                };
                // SAFETY: bounds-checked just above.
                let tcp_ref = unsafe { &*tcp };
                let at = |offset: usize| tcp_ref[offset..].as_ptr();
                key.src_port_be = wire::load16(at(0));
                key.dst_port_be = wire::load16(at(2));
                tcp_flags = tcp_ref[TCP_FLAGS_OFFSET];
                let header_len = usize::from(tcp_ref[TCP_DATA_OFFSET] >> 4) * 4;
                if header_len < TCP_MIN_HEADER || header_len > l4_len {
                    return Err(malformed(key));
                }
                tcp_payload_len = (l4_len - header_len) as u32;
                tcp_seq = u32::from_be(wire::load32(at(4)));
                tcp_ack = u32::from_be(wire::load32(at(8)));
            }
        }
        PROTO_UDP => {
            if !later_fragment {
                let Some(udp) = ptr_at::<[u8; UDP_HEADER]>(ctx, l4_offset) else {
                    return Err(malformed(key));
                };
                // SAFETY: bounds-checked just above.
                let udp_ref = unsafe { &*udp };
                let at = |offset: usize| udp_ref[offset..].as_ptr();
                key.src_port_be = wire::load16(at(0));
                key.dst_port_be = wire::load16(at(2));
                // A first fragment's UDP length counts the whole datagram.
                let udp_len = usize::from(u16::from_be(wire::load16(at(4))));
                if udp_len < UDP_HEADER || (part == Part::Whole && udp_len > l4_len) {
                    return Err(malformed(key));
                }
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let expected = if key.family == FAMILY_V4 {
                PROTO_ICMP
            } else {
                PROTO_ICMPV6
            };
            if key.proto != expected {
                return Err(Verdict::pass(Counter::PassNotService));
            }
            if !later_fragment
                && (ptr_at::<[u8; ICMP_HEADER]>(ctx, l4_offset).is_none() || l4_len < ICMP_HEADER)
            {
                return Err(malformed(key));
            }
        }
        _ => return Err(Verdict::pass(Counter::PassNotService)),
    }
    Ok(Packet {
        eth,
        tagged,
        l3,
        l4_offset,
        key,
        ip_len,
        part,
        tcp_flags,
        tcp_seq,
        tcp_ack,
        tcp_payload_len,
    })
}

/// A truncated header or a false length: a counted drop if the packet was meant for a VIP
/// or a SNAT address, else the kernel's.
#[inline(always)]
fn malformed(key: &FlowKey) -> Verdict {
    if is_ours(key) {
        Verdict::drop(Counter::DropMalformed)
    } else {
        Verdict::pass(Counter::PassMalformed)
    }
}

#[inline(always)]
fn unsupported_extension(key: &FlowKey) -> Verdict {
    for_vip(key, Verdict::drop(Counter::DropIpv6Extension))
}

/// `verdict` for a packet to a VIP; anyone else's packet is passed on as not lb's business.
#[inline(always)]
pub fn for_vip(key: &FlowKey, verdict: Verdict) -> Verdict {
    if is_vip(key) {
        verdict
    } else {
        Verdict::pass(Counter::PassNotService)
    }
}

/// Could the destination be one of lb's addresses? No means certainly not (see
/// `LB_ADDR_FILTER`); yes is confirmed by `is_ours` where it matters.
#[inline(always)]
fn maybe_ours(dst_be: &[u32; 4]) -> bool {
    ADDR_FILTER
        .get(hash::address_slot(dst_be))
        .is_some_and(|count| *count != 0)
}

/// What lb knows of the packet's destination address (`LB_VIPS`), if anything.
#[inline(always)]
fn destination(key: &FlowKey) -> Option<*const VipInfo> {
    let address = AddrKey {
        addr_be: copy::words(&key.dst_be),
        family: key.family,
        _pad8: 0,
        _pad16: 0,
    };
    VIPS.get_ptr(&address)
}

/// Is the packet's destination a VIP? Only asked on the slow paths that need it.
#[inline(always)]
pub fn is_vip(key: &FlowKey) -> bool {
    // SAFETY: map value pointer from a successful lookup.
    destination(key).is_some_and(|info| unsafe { (*info).services } > 0)
}

/// Is the packet addressed to a VIP or a SNAT address? Nothing else can be lb's.
#[inline(always)]
pub fn is_ours(key: &FlowKey) -> bool {
    destination(key).is_some()
}
