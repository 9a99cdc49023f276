//! The affinity a flow belongs to: its client's address (and port, for `source-port`
//! services) at its service.
use lb_common::{AffinityKey, FlowEntry, FlowKey, FLOW_F_AFFINITY_PORT, FLOW_F_TOUCH_AFFINITY};

use crate::copy;

#[inline(always)]
pub fn key(flow: &FlowKey, service_id: u32, with_port: bool) -> AffinityKey {
    AffinityKey {
        client_be: copy::words(&flow.src_be),
        client_port_be: if with_port { flow.src_port_be } else { 0 },
        family: flow.family,
        _pad: 0,
        service_id,
    }
}

/// The affinity of the client direction `flow`, if its service keeps affinities.
#[inline(always)]
pub fn of_flow(flow: &FlowKey, entry: &FlowEntry) -> Option<AffinityKey> {
    (entry.flags & FLOW_F_TOUCH_AFFINITY != 0).then(|| {
        key(
            flow,
            entry.service_id,
            entry.flags & FLOW_F_AFFINITY_PORT != 0,
        )
    })
}
