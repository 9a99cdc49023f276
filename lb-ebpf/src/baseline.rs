//! Reference XDP programs, built from the same crate and toolchain as lb's.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action::XDP_PASS, macros::xdp, programs::XdpContext};

/// Does nothing. On a veth peer it also makes the kernel deliver frames that lb sends
/// with XDP_TX (veth only wakes a peer that has an XDP program for those).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
