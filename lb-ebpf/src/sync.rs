//! Hands confirmed flows to the daemon, which sends them to its peers (`LB_SYNC`): once per
//! connection, when it is confirmed, and only when the daemon has peers
//! (`SETTINGS_F_SYNC`). Everything else a peer learns (refreshes, closes, removals) the
//! daemon sends from what it already reads.
use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
use lb_common::{Counter, FlowEntry, FlowKey, Settings, SyncEvent, SETTINGS_F_SYNC};

use crate::{copy, maps::SYNC, stats};

/// Records a confirmed flow: `key` and `forward` are its client direction, `reverse` the
/// return direction.
#[inline(always)]
pub fn flow_confirmed(
    settings: &Settings,
    key: &FlowKey,
    forward: &FlowEntry,
    reverse: &FlowEntry,
) {
    if settings.flags & SETTINGS_F_SYNC == 0 {
        return;
    }
    // No wakeup: the daemon drains the ring on a short timer, so a busy balancer does not
    // wake it once per connection.
    let Some(mut slot) = SYNC.reserve::<SyncEvent>(0) else {
        stats::count(Counter::SyncEventsLost);
        return;
    };
    // SAFETY: the reservation is a whole, 8-aligned SyncEvent; every field is written below
    // before it is submitted.
    let event = unsafe { &mut *slot.as_mut_ptr() };
    event.key = copy::key(key);
    copy::entry(&mut event.forward, forward);
    copy::entry(&mut event.reverse, reverse);
    slot.submit(u64::from(BPF_RB_NO_WAKEUP));
}
