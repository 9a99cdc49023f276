//! Data-plane debug logging through aya-log, switched at run time by `Settings::debug_log`
//! (`lb debug on|off`). Only slow-path events are logged, new flows and drops, never a packet
//! of an established flow; when off, each costs one array read. Records are emitted at info
//! level under the `xdp` target, so the switch alone decides whether they show.
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use lb_common::{v6_bytes, Counter, FlowKey, FAMILY_V4, SETTINGS_F_DEBUG_LOG};

use crate::maps::SETTINGS;

#[inline(always)]
pub fn enabled() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|settings| settings.flags & SETTINGS_F_DEBUG_LOG != 0)
}

/// Logs the counter's number, not its name: a name is a different string constant on
/// every path to a drop, which multiplies the verifier's work. The daemon prints the name
/// (`lb::dataplane::DropNames`).
#[inline(always)]
pub fn drop(ctx: &XdpContext, counter: Counter) {
    if enabled() {
        info!(ctx, target: "xdp", "drop: counter {}", counter as u32);
    }
}

#[inline(always)]
/// `claimed` is the new flow's return-path key: the backend and the SNAT address and port.
pub fn new_flow(ctx: &XdpContext, client: &FlowKey, claimed: &FlowKey, affinity_hit: bool) {
    if !enabled() {
        return;
    }
    let how = if affinity_hit { "affinity" } else { "maglev" };
    if client.family == FAMILY_V4 {
        new_flow_v4(ctx, client, claimed, how);
    } else {
        new_flow_v6(ctx, client, claimed, how);
    }
}

// Out of line, one record each: their own small stack frames (see "Stack" in README.md).
#[inline(never)]
fn new_flow_v4(ctx: &XdpContext, client: &FlowKey, claimed: &FlowKey, how: &str) {
    info!(
        ctx,
        target: "xdp",
        "new flow {:i}:{} -> {:i}:{} snat port {} ({})",
        client.src_be[0].to_ne_bytes(),
        u16::from_be(client.src_port_be),
        claimed.src_be[0].to_ne_bytes(),
        u16::from_be(claimed.src_port_be),
        u16::from_be(claimed.dst_port_be),
        how
    );
}

#[inline(never)]
fn new_flow_v6(ctx: &XdpContext, client: &FlowKey, claimed: &FlowKey, how: &str) {
    info!(
        ctx,
        target: "xdp",
        "new flow [{:i}]:{} -> [{:i}]:{} snat port {} ({})",
        v6_bytes(client.src_be),
        u16::from_be(client.src_port_be),
        v6_bytes(claimed.src_be),
        u16::from_be(claimed.src_port_be),
        u16::from_be(claimed.dst_port_be),
        how
    );
}
