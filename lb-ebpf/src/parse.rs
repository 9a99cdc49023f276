//! Header parsing. Every access goes through `ptr_at`, which proves to the verifier (and to
//! the reader) that the bytes exist before they are touched.
use aya_ebpf::programs::XdpContext;
use lb_common::{v4_words, AddrKey, Counter, FlowKey, FAMILY_V4, PROTO_TCP};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
};

use crate::{maps::VIPS, verdict::Verdict};

/// IPv4 "more fragments" flag and fragment offset mask, in host order of the `frags` field.
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MIN_HEADER: usize = 20;

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

/// An IPv4 TCP packet addressed to a VIP or a SNAT address, with pointers to its headers.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub tcp: *mut TcpHdr,
    /// The 5-tuple as it arrived: the flow table key.
    pub key: FlowKey,
    /// IP total length (host order), for byte counters and the route lookup.
    pub ip_len: u16,
}

impl Packet {
    #[inline(always)]
    pub fn tcp_flags(&self) -> TcpFlags {
        // SAFETY: `tcp` was bounds-checked in `parse`.
        let tcp = unsafe { &*self.tcp };
        TcpFlags {
            syn: tcp.syn() != 0,
            ack: tcp.ack() != 0,
            fin: tcp.fin() != 0,
            rst: tcp.rst() != 0,
        }
    }
}

#[derive(Clone, Copy)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpFlags {
    /// A connection opening: SYN without ACK.
    #[inline(always)]
    pub fn opens(self) -> bool {
        self.syn && !self.ack
    }

    #[inline(always)]
    pub fn closes(self) -> bool {
        self.fin || self.rst
    }
}

/// Parses Ethernet / IPv4 / TCP. Anything that is not ours comes back as the verdict to
/// return for it (pass untouched, or a counted drop for malformed VIP traffic).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(Counter::PassMalformed))?;
    // SAFETY: bounds-checked just above.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ieee8021q as u16 {
        return Err(Verdict::pass(Counter::PassVlan));
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(Verdict::pass(Counter::PassNotIpv4));
    }

    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::pass(Counter::PassMalformed))?;
    // SAFETY: bounds-checked just above.
    let ip_ref = unsafe { &*ip };
    let header_len = usize::from(ip_ref.ihl());
    if ip_ref.version() != 4 || header_len < IPV4_MIN_HEADER {
        return Err(Verdict::pass(Counter::PassMalformed));
    }
    if ip_ref.proto != PROTO_TCP {
        return Err(Verdict::pass(Counter::PassNotService));
    }
    let src = u32::from_ne_bytes(ip_ref.src_addr);
    let dst = u32::from_ne_bytes(ip_ref.dst_addr);
    let for_vip = is_vip(dst);

    let frags = u16::from_be_bytes(ip_ref.frags);
    if frags & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
        return Err(if for_vip {
            Verdict::drop(Counter::DropFragment)
        } else {
            Verdict::pass(Counter::PassNotService)
        });
    }

    let Some(tcp) = ptr_at::<TcpHdr>(ctx, EthHdr::LEN + header_len) else {
        return Err(if for_vip {
            Verdict::drop(Counter::DropMalformed)
        } else {
            Verdict::pass(Counter::PassMalformed)
        });
    };
    // SAFETY: bounds-checked just above.
    let tcp_ref = unsafe { &*tcp };
    let key = FlowKey {
        src_be: v4_words(src),
        dst_be: v4_words(dst),
        src_port_be: u16::from_ne_bytes(tcp_ref.source),
        dst_port_be: u16::from_ne_bytes(tcp_ref.dest),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    Ok(Packet {
        eth,
        ip,
        tcp,
        key,
        ip_len: u16::from_be_bytes(ip_ref.tot_len),
    })
}

#[inline(always)]
fn is_vip(dst_be: u32) -> bool {
    let key = AddrKey {
        addr_be: v4_words(dst_be),
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    VIPS.get_ptr(&key).is_some()
}
