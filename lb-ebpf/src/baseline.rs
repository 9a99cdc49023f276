//! Reference XDP programs, built from the same crate and toolchain as lb's.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::bpf_fib_lookup,
    macros::{map, xdp},
    maps::DevMapHash,
    programs::XdpContext,
    EbpfContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

/// Does nothing. On a veth peer it also makes the kernel deliver frames that lb sends
/// with XDP_TX (veth only wakes a peer that has an XDP program for those). In benchmarks:
/// the fixed cost of running any XDP program.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Parses Ethernet and IPv4 and sends the frame back with its MACs swapped: the floor any
/// forwarding XDP program pays. Benchmarks only.
#[xdp]
pub fn xdp_mac_swap(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + EthHdr::LEN + Ipv4Hdr::LEN > ctx.data_end() {
        return XDP_DROP;
    }
    // SAFETY: both headers bounds-checked just above.
    let (eth, ip) = unsafe {
        (
            &mut *(start as *mut EthHdr),
            &*((start + EthHdr::LEN) as *const Ipv4Hdr),
        )
    };
    if eth.ether_type != EtherType::Ipv4 as u16 || ip.version() != 4 {
        return XDP_PASS;
    }
    core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
    XDP_TX
}

/// The interfaces `xdp_forward` may redirect to, by ifindex (filled by the benchmark).
#[map(name = "BASE_TX_PORTS")]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

const AF_INET: u8 = 2;

/// Routes IPv4 itself: a route lookup, the next hop's MACs, TTL and header checksum, then
/// a redirect (or XDP_TX out of the interface it came in on); anything the FIB cannot
/// resolve goes to the kernel. No NAT and no tables: the floor of any XDP balancer that
/// forwards through the kernel's routes. Benchmarks only.
#[xdp]
pub fn xdp_forward(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + EthHdr::LEN + Ipv4Hdr::LEN > ctx.data_end() {
        return XDP_PASS;
    }
    // SAFETY: both headers bounds-checked just above.
    let (eth, ip) = unsafe {
        (
            &mut *(start as *mut EthHdr),
            &mut *((start + EthHdr::LEN) as *mut Ipv4Hdr),
        )
    };
    if eth.ether_type != EtherType::Ipv4 as u16 || ip.version() != 4 || ip.ttl <= 1 {
        return XDP_PASS;
    }
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    params.__bindgen_anon_2.tos = ip.tos;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    params.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `params` is a valid, correctly sized bpf_fib_lookup.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc as u32 != BPF_FIB_LKUP_RET_SUCCESS {
        return XDP_PASS;
    }
    // TTL shares a 16-bit checksum word with the protocol byte.
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let mut header = lb_common::csum::Delta::default();
    header.u16(old, u16::from_ne_bytes([ip.ttl, ip.proto]));
    ip.check = header.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
    eth.dst_addr = params.dmac;
    eth.src_addr = params.smac;
    if params.ifindex == ctx.ingress_ifindex() as u32 {
        return XDP_TX;
    }
    TX_PORTS
        .redirect(params.ifindex, u64::from(XDP_PASS))
        .unwrap_or(XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
