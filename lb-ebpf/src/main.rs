//! lb's XDP programs. Entry points only; the packet path starts in `balancer::process`.
#![no_std]
#![no_main]
// Map lookups take keys by reference on purpose: a key passed by value is copied to a new
// stack slot first, and stack is the data plane's scarcest resource (README "Stack").
#![allow(clippy::needless_borrows_for_generic_args)]

mod affinity;
mod balancer;
mod clock;
mod copy;
mod forward;
mod fragments;
mod icmp;
mod icmp_error;
mod log;
mod maps;
mod nat;
mod parse;
mod source_rules;
mod stats;
mod sweep;
mod sync;
mod tcp;
mod verdict;
mod wire;

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::Counter;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    stats::count(Counter::Packets);
    finish(&ctx, balancer::process(&ctx))
}

/// Tail-called by `lb_xdp` for packets that may open a flow (see `balancer::process_new_flow`).
#[xdp]
pub fn lb_new_flow(ctx: XdpContext) -> u32 {
    finish(&ctx, balancer::process_new_flow(&ctx))
}

/// Tail-called by `lb_new_flow` once it has chosen a backend.
#[xdp]
pub fn lb_claim_snat(ctx: XdpContext) -> u32 {
    finish(&ctx, balancer::process_claim(&ctx))
}

/// Tail-called by `lb_claim_snat` once it has claimed a SNAT port.
#[xdp]
pub fn lb_open_flow(ctx: XdpContext) -> u32 {
    finish(&ctx, balancer::process_open_flow(&ctx))
}

/// Garbage collection, never attached: the daemon runs it on a `lb_common::SweepRequest`
/// (see `sweep`).
#[xdp]
pub fn lb_sweep(ctx: XdpContext) -> u32 {
    if sweep::sweep(&ctx) {
        XDP_PASS
    } else {
        XDP_ABORTED
    }
}

/// Counts the packet's one verdict and returns its action.
#[inline(always)]
fn finish(ctx: &XdpContext, verdict: verdict::Verdict) -> u32 {
    stats::count(verdict.counter);
    if verdict.action == XDP_DROP {
        log::drop(ctx, verdict.counter);
    }
    verdict.action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; the verifier rejects any path that could get here.
    loop {}
}
