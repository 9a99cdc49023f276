//! The data plane caches each flow's next hop (egress interface, MACs, VLAN, MTU) in its
//! flow entry. This keeps the cache honest: every route, neighbour, address or link change
//! the kernel reports over rtnetlink bumps `LB_ROUTE_GEN`, after which every flow takes one
//! route lookup again on its next packet.
use std::{
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use tokio::io::unix::AsyncFd;
use tracing::{debug, error};

/// The data plane's routing generation (`LB_ROUTE_GEN[0]`); 0 never matches a cache.
pub struct RouteGeneration {
    map: Array<MapData, u32>,
}

impl RouteGeneration {
    pub fn new(map: Array<MapData, u32>) -> Self {
        Self { map }
    }

    /// Invalidates every cached next hop; returns the new generation.
    pub fn bump(&mut self) -> Result<u32> {
        let current = self.map.get(&0, 0).context("read LB_ROUTE_GEN")?;
        let next = next_generation(current);
        self.map.set(0, next, 0).context("write LB_ROUTE_GEN")?;
        Ok(next)
    }
}

/// The generation after `current`, skipping 0.
fn next_generation(current: u32) -> u32 {
    current.wrapping_add(1).max(1)
}

/// The rtnetlink multicast groups whose messages can change where a packet goes.
const GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_NEIGH
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV6_ROUTE) as u32;

fn subscribe() -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("open an rtnetlink socket");
    }
    // SAFETY: `fd` is a socket we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_nl.
    let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as u16;
    address.nl_groups = GROUPS;
    // SAFETY: `address` is a valid sockaddr_nl of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("subscribe to rtnetlink groups");
    }
    Ok(fd)
}

/// Reads whatever is queued. Messages are not parsed: each batch means "something changed".
/// A lost batch (ENOBUFS) means the same.
fn drain(fd: &OwnedFd) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        // SAFETY: `buffer` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            if n == 0 || e.kind() == std::io::ErrorKind::WouldBlock {
                return;
            }
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                debug!(error = %e, "rtnetlink read");
                return;
            }
        }
    }
}

/// Subscribes, then bumps the generation after each batch of changes, for as long as the
/// daemon runs.
pub fn watch(mut generation: RouteGeneration) -> Result<()> {
    // SAFETY: `AsyncFd` owns the socket and closes it only when it is dropped.
    let fd = unsafe { AsyncFd::register(subscribe()?) }
        .map_err(|e| anyhow::anyhow!("watch the rtnetlink socket: {e}"))?;
    tokio::spawn(async move {
        loop {
            let mut ready = match fd.readable().await {
                Ok(ready) => ready,
                Err(e) => {
                    error!(error = %e, "rtnetlink socket; cached next hops now refresh only on restart");
                    return;
                }
            };
            drain(ready.get_inner());
            ready.clear_ready();
            if let Err(e) = generation.bump() {
                error!(error = %format!("{e:#}"), "invalidating cached next hops");
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::next_generation;

    #[test]
    fn generations_skip_zero() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(7), 8);
        assert_eq!(next_generation(u32::MAX), 1);
    }
}
