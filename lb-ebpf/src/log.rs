//! Data-plane debug logging through aya-log, switched at run time by `Settings::debug_log`
//! (`lb debug on|off`). Only slow-path events are logged, new flows and drops, never a packet
//! of an established flow; when off, each costs one array read. Records are emitted at info
//! level under the `xdp` target, so the switch alone decides whether they show.
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use lb_common::{Backend, Counter, FlowKey};

use crate::maps::SETTINGS;

#[inline(always)]
pub fn enabled() -> bool {
    SETTINGS.get(0).is_some_and(|settings| settings.debug_log != 0)
}

#[inline(always)]
pub fn drop(ctx: &XdpContext, counter: Counter) {
    if enabled() {
        info!(ctx, target: "xdp", "drop: {}", counter.name());
    }
}

#[inline(always)]
pub fn new_flow(ctx: &XdpContext, client: &FlowKey, backend: &Backend, snat_port_be: u16, affinity_hit: bool) {
    if enabled() {
        info!(
            ctx,
            target: "xdp",
            "new flow {:i}:{} -> {:i}:{} snat port {} ({})",
            client.src_be[0].to_ne_bytes(),
            u16::from_be(client.src_port_be),
            backend.addr_be[0].to_ne_bytes(),
            u16::from_be(backend.port_be),
            u16::from_be(snat_port_be),
            if affinity_hit { "affinity" } else { "maglev" }
        );
    }
}
