//! The one place that pairs an XDP action with the counter that explains it.
use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};
use lb_common::Counter;

const NO_ACTION: u32 = u32::MAX;

#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: u32,
    pub counter: Counter,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(counter: Counter) -> Self {
        Self {
            action: XDP_PASS,
            counter,
        }
    }

    #[inline(always)]
    pub const fn drop(counter: Counter) -> Self {
        Self {
            action: XDP_DROP,
            counter,
        }
    }

    /// No verdict yet: the packet goes on to the next program (`lb_open_flow`). Its
    /// action is one no XDP program returns.
    #[inline(always)]
    pub const fn none() -> Self {
        Self {
            action: NO_ACTION,
            counter: Counter::DropInternal,
        }
    }

    #[inline(always)]
    pub const fn is_none(&self) -> bool {
        self.action == NO_ACTION
    }

    #[inline(always)]
    pub const fn tx() -> Self {
        Self {
            action: XDP_TX,
            counter: Counter::Tx,
        }
    }

    #[inline(always)]
    pub const fn redirect() -> Self {
        Self {
            action: XDP_REDIRECT,
            counter: Counter::Redirect,
        }
    }
}
