//! Time in the data plane: one coarse monotonic clock. Every timeout is in seconds, so the
//! coarse clock's few milliseconds of resolution cost nothing, and it reads a variable
//! instead of the clock source (tens of ns on a VM's paravirtual clock).
use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

pub use lb_common::NS_PER_SEC;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a clock read, no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Has an entry last seen at `last_seen_ns` been idle for at most `timeout_s`
/// (`lb_common::is_fresh`, with the timeout in seconds as map values hold it)?
#[inline(always)]
pub fn is_fresh(last_seen_ns: u64, timeout_s: u32, now: u64) -> bool {
    lb_common::is_fresh(last_seen_ns, u64::from(timeout_s) * NS_PER_SEC, now)
}
