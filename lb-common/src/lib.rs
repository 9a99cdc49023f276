//! Plain-old-data shared by the XDP program (`lb-ebpf`) and the daemon (`lb-user`).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, made of integers and arrays only, with
//! explicit padding so that hash lookups never depend on uninitialised bytes. Addresses are
//! stored as four 32-bit words in network byte order (`_be`); an IPv4 address uses word 0 and
//! leaves the rest zero, so one layout serves IPv4 now and IPv6 later.
#![cfg_attr(not(test), no_std)]

pub mod csum;
pub mod hash;

use core::mem::size_of;

/// Bumped whenever a map layout below changes, so pinned maps of another layout are never
/// read as if they were ours.
pub const LAYOUT_VERSION: u32 = 2;

// Map names: used by `#[map(name = ...)]` in lb-ebpf and by the daemon. Kernel limit: 15 chars.
pub const MAP_SERVICES: &str = "LB_SERVICES";
pub const MAP_VIPS: &str = "LB_VIPS";
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
pub const MAP_MAGLEV: &str = "LB_MAGLEV";
pub const MAP_FLOWS: &str = "LB_FLOWS";
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
pub const MAP_SNAT_ADDRS: &str = "LB_SNAT_ADDRS";
pub const MAP_SETTINGS: &str = "LB_SETTINGS";
pub const MAP_TX_PORTS: &str = "LB_TX_PORTS";
pub const MAP_COUNTERS: &str = "LB_COUNTERS";
pub const MAP_SERVICE_STATS: &str = "LB_SVC_STATS";
pub const MAP_BACKEND_STATS: &str = "LB_BE_STATS";
/// Name of the XDP entry point in the object file.
pub const PROGRAM_NAME: &str = "lb_xdp";

// Capacities. The Maglev table size must be prime; 65537 keeps the per-backend share within a
// fraction of a percent of fair for pools of up to a few hundred servers.
pub const MAGLEV_SIZE: u32 = 65_537;
pub const MAX_SERVICES: u32 = 64;
pub const MAX_BACKENDS: u32 = 4096;
pub const MAX_SNAT_ADDRS: u32 = 64;
pub const MAX_INTERFACES: u32 = 64;
/// Slots in `LB_COUNTERS`: room for counters added later without a layout change.
pub const MAX_COUNTERS: u32 = 64;
pub const MAX_FLOWS: u32 = 1 << 20;
pub const MAX_AFFINITIES: u32 = 1 << 20;
/// Two halves per service: the daemon fills the idle half, then flips `Service::table_half`.
pub const MAGLEV_ENTRIES: u32 = MAX_SERVICES * 2 * MAGLEV_SIZE;
/// Slot value in a Maglev table that has no backend (empty pool).
pub const NO_BACKEND: u32 = u32::MAX;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const AFFINITY_NONE: u32 = 0;
/// Client address only: all connections of one client reach one server.
pub const AFFINITY_SOURCE: u32 = 1;
/// Client address and port.
pub const AFFINITY_SOURCE_PORT: u32 = 2;

/// Backend flags.
pub const BACKEND_F_CONFIGURED: u32 = 1;
/// No new clients; existing flows and affinities continue.
pub const BACKEND_F_DRAINING: u32 = 1 << 1;
/// Failed health checks: neither new clients nor affinity hits.
pub const BACKEND_F_DOWN: u32 = 1 << 2;

/// Flow entry flags.
/// Entry describes the return direction (backend -> SNAT address).
pub const FLOW_F_REVERSE: u32 = 1;
/// FIN or RST seen in this direction: the entry lives `closing_timeout_s` only.
pub const FLOW_F_CLOSING: u32 = 1 << 1;

/// `(vip, port, protocol)` -> [`Service`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip_be: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into the service stats and Maglev tables.
    pub id: u32,
    /// One of `AFFINITY_*`.
    pub affinity_mode: u32,
    pub affinity_timeout_s: u32,
    pub idle_timeout_s: u32,
    /// Which half of this service's Maglev table is live (0 or 1).
    pub table_half: u32,
    pub _pad: u32,
}

/// Value of `LB_VIPS`: any address that has at least one service. Lets the data plane tell
/// "malformed packet for us" (counted drop) from "someone else's traffic" (pass).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    pub services: u32,
    pub _pad: u32,
}

/// `LB_VIPS` key: an address with its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr_be: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `LB_BACKENDS[id]`: one server of one service (address and server-side port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
    /// `BACKEND_F_*`.
    pub flags: u32,
    pub service_id: u32,
}

impl Backend {
    /// May an existing affinity still send new connections here?
    #[inline(always)]
    pub fn keeps_affinity(&self) -> bool {
        self.flags & BACKEND_F_CONFIGURED != 0 && self.flags & BACKEND_F_DOWN == 0
    }
}

/// A packet's 5-tuple exactly as it arrives. Forward entries are keyed by
/// (client, VIP), return entries by (backend, SNAT address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// What to rewrite a packet of this flow and direction to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub new_src_be: [u32; 4],
    pub new_dst_be: [u32; 4],
    pub new_src_port_be: u16,
    pub new_dst_port_be: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// `FLOW_F_*`.
    pub flags: u32,
    /// Idle timeout of this entry; an entry not seen for longer is a miss.
    pub timeout_s: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last refresh (refreshed coarsely, see `REFRESH_INTERVAL_NS`).
    pub last_seen_ns: u64,
}

/// `(client address [, port], service)` -> backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client_be: [u32; 4],
    /// Zero unless the service uses `AFFINITY_SOURCE_PORT`.
    pub client_port_be: u16,
    pub family: u8,
    pub _pad: u8,
    pub service_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}

/// `LB_SETTINGS[0]`: global knobs written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Number of valid IPv4 entries at the start of `LB_SNAT_ADDRS`.
    pub snat_v4_count: u32,
    /// SNAT source ports are taken from `[snat_port_min, snat_port_max]` (host order).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Lifetime of a flow entry after FIN or RST.
    pub closing_timeout_s: u32,
    /// Non-zero: the data plane logs new flows and drops through aya-log (`lb debug on`).
    pub debug_log: u32,
}

/// Per-service and per-backend traffic counters (per CPU; the daemon sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    /// Client -> server direction.
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// Server -> client direction.
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_flows: u64,
    pub affinity_hits: u64,
    pub affinity_misses: u64,
}

/// Index into the per-CPU `LB_COUNTERS` array: one slot per outcome of a packet.
/// `Packets` counts every packet the program sees; every packet also lands in exactly one of
/// the `Pass*`, `Tx`, `Redirect` or `Drop*` slots.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Packets = 0,
    /// Not IPv4 (ARP, IPv6, ...): handed to the kernel untouched.
    PassNotIpv4,
    /// IPv4 but not addressed to any service or tracked flow.
    PassNotService,
    /// Carries an 802.1Q tag; VLAN-tagged VIP traffic is left to the kernel for now.
    PassVlan,
    /// Too short or malformed to tell whether it is for a VIP: the kernel drops and counts it.
    PassMalformed,
    /// Rewritten, but the next hop's MAC is not known yet: the kernel forwards it and resolves.
    PassNoNeigh,
    /// TTL would expire: the kernel answers with ICMP time exceeded.
    PassTtlExpired,
    /// Rewritten, but the egress interface has no lb program: the kernel forwards it.
    PassEgressNotAttached,
    /// Forwarded back out of the interface it came in on.
    Tx,
    /// Forwarded out of another interface.
    Redirect,
    /// New flows created (also counted per service and backend).
    NewFlows,
    /// New flows whose backend came from a fresh affinity entry.
    AffinityHits,
    /// New flows that had to consult the Maglev table.
    AffinityMisses,
    /// Addressed to a VIP, but its L4 header is truncated.
    DropMalformed,
    /// IPv4 fragment addressed to a VIP (cannot be matched to ports).
    DropFragment,
    /// TCP packet other than a SYN with no live flow (e.g. after the flow expired).
    DropTcpNoFlow,
    /// Service has no usable backend.
    DropNoBackend,
    /// No free SNAT port after the bounded number of attempts.
    DropSnatExhausted,
    /// Could not record the flow (table update failed).
    DropFlowInsert,
    /// Route lookup failed (no route, blackhole, prohibited, MTU).
    DropNoRoute,
    /// The settings map was not populated (daemon not finished starting).
    DropNotConfigured,
    /// A per-CPU scratch slot was missing: cannot happen in a loaded program, counted so
    /// that it would be seen if it did.
    DropInternal,
}

impl Counter {
    pub const COUNT: u32 = Counter::DropInternal as u32 + 1;
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::Packets,
        Counter::PassNotIpv4,
        Counter::PassNotService,
        Counter::PassVlan,
        Counter::PassMalformed,
        Counter::PassNoNeigh,
        Counter::PassTtlExpired,
        Counter::PassEgressNotAttached,
        Counter::Tx,
        Counter::Redirect,
        Counter::NewFlows,
        Counter::AffinityHits,
        Counter::AffinityMisses,
        Counter::DropMalformed,
        Counter::DropFragment,
        Counter::DropTcpNoFlow,
        Counter::DropNoBackend,
        Counter::DropSnatExhausted,
        Counter::DropFlowInsert,
        Counter::DropNoRoute,
        Counter::DropNotConfigured,
        Counter::DropInternal,
    ];

    /// Stable snake_case name, used in `lb status` and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::PassNotIpv4 => "pass_not_ipv4",
            Counter::PassNotService => "pass_not_service",
            Counter::PassVlan => "pass_vlan",
            Counter::PassMalformed => "pass_malformed",
            Counter::PassNoNeigh => "pass_no_neigh",
            Counter::PassTtlExpired => "pass_ttl_expired",
            Counter::PassEgressNotAttached => "pass_egress_not_attached",
            Counter::Tx => "tx",
            Counter::Redirect => "redirect",
            Counter::NewFlows => "new_flows",
            Counter::AffinityHits => "affinity_hits",
            Counter::AffinityMisses => "affinity_misses",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropFragment => "drop_fragment",
            Counter::DropTcpNoFlow => "drop_tcp_no_flow",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropSnatExhausted => "drop_snat_exhausted",
            Counter::DropFlowInsert => "drop_flow_insert",
            Counter::DropNoRoute => "drop_no_route",
            Counter::DropNotConfigured => "drop_not_configured",
            Counter::DropInternal => "drop_internal",
        }
    }

    /// Is this slot a final verdict (every packet lands in exactly one)?
    pub const fn is_verdict(self) -> bool {
        !matches!(
            self,
            Counter::Packets | Counter::NewFlows | Counter::AffinityHits | Counter::AffinityMisses
        )
    }
}

/// Index of a service's live Maglev slot `slot` in `LB_MAGLEV`.
#[inline(always)]
pub const fn maglev_index(service_id: u32, half: u32, slot: u32) -> u32 {
    (service_id * 2 + (half & 1)) * MAGLEV_SIZE + slot
}

// Layouts are part of the kernel ABI of our maps: a size change must bump LAYOUT_VERSION.
const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<Service>() == 24);
const _: () = assert!(size_of::<AddrKey>() == 20);
const _: () = assert!(size_of::<VipInfo>() == 8);
const _: () = assert!(size_of::<Backend>() == 28);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<FlowEntry>() == 64);
const _: () = assert!(size_of::<AffinityKey>() == 24);
const _: () = assert!(size_of::<AffinityEntry>() == 16);
const _: () = assert!(size_of::<Settings>() == 12 + 4);
const _: () = assert!(size_of::<TrafficStats>() == 56);
const _: () = assert!(MAGLEV_ENTRIES <= u32::MAX / 2);
const _: () = assert!(Counter::COUNT <= MAX_COUNTERS);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, made of integers and arrays with explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for TrafficStats {}
}

/// Word 0 of an address: an IPv4 address in network byte order, as read raw from a packet.
#[inline(always)]
pub const fn v4_words(addr_be: u32) -> [u32; 4] {
    [addr_be, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
        }
        for a in Counter::ALL {
            for b in Counter::ALL {
                if a != b {
                    assert_ne!(a.name(), b.name());
                }
            }
        }
    }

    #[test]
    fn maglev_halves_do_not_overlap() {
        let last_of_half0 = maglev_index(3, 0, MAGLEV_SIZE - 1);
        let first_of_half1 = maglev_index(3, 1, 0);
        assert_eq!(last_of_half0 + 1, first_of_half1);
        assert!(maglev_index(MAX_SERVICES - 1, 1, MAGLEV_SIZE - 1) < MAGLEV_ENTRIES);
    }
}
