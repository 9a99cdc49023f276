//! Garbage collection by the data plane's own sweeper (`lb_sweep` in lb-ebpf): one
//! `BPF_PROG_TEST_RUN` walks the flow, half-open and affinity tables in the kernel and
//! deletes what has expired, where reading them out in batches cost seconds per million
//! entries. It holds descriptors of its own on the program and on `LB_SWEPT`, so a
//! collection runs outside the daemon's lock.
use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, RingBuf};
use lb_common::{FlowKey, SweepRequest, SweepTally, MAX_SERVICES, NS_PER_SEC, SWEEP_PROGRAM_NAME};

use super::{batch::bpf, ring_record};

/// `enum bpf_cmd` (linux/bpf.h).
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `enum xdp_action`: what `lb_sweep` answers when it swept.
const XDP_PASS: u32 = 2;

/// `union bpf_attr`'s `test` member (linux/bpf.h), up to `ctx_out`. By hand rather than
/// aya's `test_run`: an aya program handle of its own needs `bpf_prog_get_fd_by_id`, which
/// takes CAP_SYS_ADMIN, which the unit does not grant (packaging/lb.service); a
/// duplicated descriptor needs nothing.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
}

pub struct Sweeper {
    program: OwnedFd,
    /// `LB_SWEPT`: the flow directions a sweep deleted, when it announces them.
    swept: RingBuf<MapData>,
}

/// What one sweep did.
pub struct Sweep {
    pub tally: SweepTally,
    /// The confirmed flow directions it deleted (only when asked to announce them).
    pub flows_removed: Vec<FlowKey>,
}

impl Sweeper {
    pub(super) fn new(program: OwnedFd, swept: RingBuf<MapData>) -> Self {
        Self { program, swept }
    }

    /// Deletes every expired entry: flows and half-open ones past their own timeouts,
    /// affinities past their service's (`affinity_timeouts_ns`, by service id; those of
    /// any other id all go). With `announce`, also returns the confirmed flow directions
    /// it deleted (for the peers).
    pub fn sweep(
        &mut self,
        affinity_timeouts_ns: &BTreeMap<u32, u64>,
        announce: bool,
        refresh_affinities: bool,
    ) -> Result<Sweep> {
        // What an earlier sweep left unread is old news: those flows are gone either way.
        while self.swept.next().is_some() {}
        let frame = request_frame(affinity_timeouts_ns, announce, refresh_affinities)?;
        let mut out = vec![0u8; frame.len()];
        let mut attr = TestRunAttr {
            prog_fd: self.program.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..TestRunAttr::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)
            .with_context(|| format!("running {SWEEP_PROGRAM_NAME} (BPF_PROG_TEST_RUN)"))?;
        if attr.retval != XDP_PASS {
            bail!(
                "{SWEEP_PROGRAM_NAME} refused its request (action {})",
                attr.retval
            );
        }
        let tally = ring_record::<SweepTally>(&out)
            .with_context(|| format!("{SWEEP_PROGRAM_NAME} answered a short frame"))?;
        let mut flows_removed = Vec::new();
        while let Some(item) = self.swept.next() {
            flows_removed.extend(ring_record::<FlowKey>(&item));
        }
        Ok(Sweep {
            tally,
            flows_removed,
        })
    }
}

/// The frame `lb_sweep` reads: each service's affinity timeout in whole seconds, and
/// whether to announce.
fn request_frame(
    affinity_timeouts_ns: &BTreeMap<u32, u64>,
    announce: bool,
    refresh_affinities: bool,
) -> Result<Vec<u8>> {
    let mut request = SweepRequest {
        affinity_timeout_s: [0; MAX_SERVICES as usize],
        announce: u32::from(announce),
        refresh_affinities: u32::from(refresh_affinities),
    };
    for (&id, &timeout_ns) in affinity_timeouts_ns {
        let Some(slot) = request.affinity_timeout_s.get_mut(id as usize) else {
            bail!("service id {id} is beyond the data plane's {MAX_SERVICES} services");
        };
        *slot = u32::try_from(timeout_ns / NS_PER_SEC).unwrap_or(u32::MAX);
    }
    // SAFETY: `SweepRequest` is `#[repr(C)]` plain integers with its padding spelled out,
    // so all its bytes are initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&request as *const SweepRequest).cast::<u8>(),
            size_of::<SweepRequest>(),
        )
    };
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_holds_each_services_timeout_in_seconds_at_its_id() {
        let timeouts = BTreeMap::from([(0, 1800 * NS_PER_SEC), (63, 5 * NS_PER_SEC)]);
        let frame = request_frame(&timeouts, true, false).unwrap();
        assert_eq!(frame.len(), size_of::<SweepRequest>());
        let word = |i: usize| u32::from_ne_bytes(frame[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(
            (word(0), word(1), word(63), word(64), word(65)),
            (1800, 0, 5, 1, 0)
        );
        let frame = request_frame(&timeouts, false, true).unwrap();
        assert_eq!((frame[64 * 4], frame[65 * 4]), (0, 1));
        assert!(request_frame(&BTreeMap::from([(64, NS_PER_SEC)]), false, false).is_err());
    }
}
