//! Reference XDP programs, built from the same crate and toolchain as lb's.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
