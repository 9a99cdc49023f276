//! Plain-old-data shared by the XDP program (`lb-ebpf`) and the daemon (`lb-user`).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, made of integers and arrays only, with
//! explicit padding so that hash lookups never depend on uninitialised bytes. Addresses are
//! stored as four 32-bit words in network byte order (`_be`); an IPv4 address uses word 0 and
//! leaves the rest zero, so one layout serves both families.
#![cfg_attr(not(test), no_std)]

pub mod csum;
pub mod hash;
pub mod maps;
pub mod seq;

pub use maps::*;

use core::mem::size_of;

/// Bumped whenever a map layout below changes, so pinned maps of another layout are never
/// read as if they were ours.
pub const LAYOUT_VERSION: u32 = 5;

/// Name of the XDP entry point in the object file.
pub const PROGRAM_NAME: &str = "lb_xdp";
/// The program `lb_xdp` tail-calls for packets that may open a flow.
pub const NEW_FLOW_PROGRAM_NAME: &str = "lb_new_flow";
/// Its slot in `LB_PROGRAMS`.
pub const NEW_FLOW_SLOT: u32 = 0;
/// The program `lb_new_flow` tail-calls once it has chosen the backend: it claims the SNAT
/// port.
pub const CLAIM_PROGRAM_NAME: &str = "lb_claim_snat";
pub const CLAIM_SLOT: u32 = 1;
/// The program `lb_claim_snat` tail-calls: it records the flow and sends the packet.
pub const OPEN_FLOW_PROGRAM_NAME: &str = "lb_open_flow";
pub const OPEN_FLOW_SLOT: u32 = 2;
/// Slots of `LB_PROGRAMS`.
pub const PROGRAM_SLOTS: u32 = 3;
/// The garbage collector: never attached, run by the daemon with `BPF_PROG_TEST_RUN` on a
/// `SweepRequest`, it deletes expired entries in the kernel and answers a `SweepTally`.
pub const SWEEP_PROGRAM_NAME: &str = "lb_sweep";

// Capacities. The Maglev table size must be prime; 65537 keeps the per-backend share within a
// fraction of a percent of fair for pools of up to a few hundred servers.
pub const MAGLEV_SIZE: u32 = 65_537;
pub const MAX_SERVICES: u32 = 64;
/// (VIP, port, protocol) entries over all services: a service may listen on many ports.
pub const MAX_SERVICE_PORTS: u32 = 4096;
/// `Backend::port_be` of a multi-port service: each connection keeps the port it asked for.
pub const BACKEND_PORT_KEEP: u16 = 0;
pub const MAX_BACKENDS: u32 = 4096;
/// IPv4 SNAT addresses live at `[0, MAX_SNAT_PER_FAMILY)` of `LB_SNAT_ADDRS`, IPv6 ones at
/// `[SNAT_V6_BASE, SNAT_V6_BASE + MAX_SNAT_PER_FAMILY)`.
pub const MAX_SNAT_PER_FAMILY: u32 = 64;
pub const SNAT_V6_BASE: u32 = MAX_SNAT_PER_FAMILY;
pub const MAX_SNAT_ADDRS: u32 = 2 * MAX_SNAT_PER_FAMILY;
pub const MAX_INTERFACES: u32 = 64;
/// Slots of `LB_ADDR_FILTER`: how many of lb's addresses hash to each
/// (`hash::address_slot`). A packet whose destination's slot is 0 is no one's of lb's.
pub const ADDR_FILTER_SLOTS: u32 = 4096;
/// Slots in `LB_COUNTERS`: room for counters added later without a layout change.
pub const MAX_COUNTERS: u32 = 64;
/// Allow and deny prefixes over all services (`LB_SOURCE_RULES`).
pub const MAX_SOURCE_RULES: u32 = 16_384;
pub const MAX_FLOWS: u32 = 1 << 20;
/// Connections not yet confirmed (see `LB_HALF_OPEN`); a SYN flood can only churn these.
pub const MAX_HALF_OPEN: u32 = 1 << 18;
/// Datagrams whose later IP fragments are still expected.
pub const MAX_FRAGMENTS: u32 = 1 << 14;
pub const MAX_AFFINITIES: u32 = 1 << 20;
/// Two halves per service: the daemon fills the idle half, then flips `Service::table_half`.
pub const MAGLEV_ENTRIES: u32 = MAX_SERVICES * 2 * MAGLEV_SIZE;
/// Slot value in a Maglev table that has no backend (empty pool).
pub const NO_BACKEND: u32 = u32::MAX;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

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
/// `FlowEntry::seq_next` holds this direction's sender's next sequence number (TCP; the
/// return direction learns it from the server's SYN-ACK).
pub const FLOW_F_SEQ_KNOWN: u32 = 1 << 2;
/// Half-open client direction: the server's SYN-ACK was seen, so `handshake_ack` is the
/// acknowledgement number that confirms the client.
pub const FLOW_F_SYNACK_SEEN: u32 = 1 << 3;
/// The service's affinity mode, so refreshing a flow can refresh its affinity without
/// looking the service up: affinity by client address...
pub const FLOW_F_TOUCH_AFFINITY: u32 = 1 << 8;
/// ... and port.
pub const FLOW_F_AFFINITY_PORT: u32 = 1 << 9;
/// Answer ICMP echo requests to VIPs (`Settings::flags`); otherwise they go to the kernel.
pub const SETTINGS_F_ECHO_REPLY: u32 = 1;
/// Log new flows and drops through aya-log (`lb debug on`).
pub const SETTINGS_F_DEBUG_LOG: u32 = 1 << 1;
/// Peers learn this node's flows: every confirmed flow is also written to `LB_SYNC`.
pub const SETTINGS_F_SYNC: u32 = 1 << 2;

/// Service flags. The service has source rules in `LB_SOURCE_RULES`: a new flow's client
/// address is looked up there (services without rules skip the lookup).
pub const SERVICE_F_SOURCE_RULES: u32 = 1;
/// Among its rules are allows: a client that matches none is refused.
pub const SERVICE_F_ALLOW_LIST: u32 = 1 << 1;

/// Source rule actions (`LB_SOURCE_RULES` values); the longest matching prefix decides.
pub const SOURCE_ALLOW: u32 = 1;
pub const SOURCE_DENY: u32 = 2;
/// Bits of `SourceRuleKey` before the address: the service id and family always match in
/// full.
pub const SOURCE_RULE_HEADER_BITS: u32 = 64;

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
    /// `SERVICE_F_*`.
    pub flags: u32,
}

/// Data of an `LB_SOURCE_RULES` key (the LPM trie prefixes it with a bit length of
/// `SOURCE_RULE_HEADER_BITS` + the rule's prefix length): one service's rule for a client
/// prefix. The address is as `FlowKey` holds it (an IPv4 address in word 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRuleKey {
    pub service_id: u32,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u32,
    pub addr_be: [u32; 4],
}

/// Value of `LB_VIPS`: every address lb answers for, a VIP (with at least one service) or a
/// SNAT address (`ADDR_F_SNAT`). Lets the data plane pass someone else's traffic after one
/// lookup, and tell "malformed packet for a VIP" (counted drop) from "not ours" (pass).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Services on this address; 0 for a SNAT address only.
    pub services: u32,
    /// `ADDR_F_*`.
    pub flags: u32,
}

/// `VipInfo::flags`: the address is a SNAT address (return traffic of balanced flows).
pub const ADDR_F_SNAT: u32 = 1;

/// `LB_VIPS` key: an address with its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr_be: [u32; 4],
    pub family: u8,
    // Padding as integers, not byte arrays: zeroing a byte array compiles to a call to
    // `memset`, which the BPF backend does not expand (a byte loop per packet).
    pub _pad8: u8,
    pub _pad16: u16,
}

/// `LB_BACKENDS[id]`: one server of one service (address and server-side port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: [u32; 4],
    /// The server's port, or `BACKEND_PORT_KEEP`.
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
    pub _pad: u16,
}

/// Where a packet of a flow goes next, as `bpf_fib_lookup` last said: cached in the flow
/// entry so an established packet needs no route lookup. Valid while `generation` equals
/// `LB_ROUTE_GEN[0]`, which the daemon bumps on every route, neighbour or link change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `LB_ROUTE_GEN[0]` when this was filled; 0 never matches (the daemon starts at 1).
    pub generation: u32,
    /// The interface lb sends on (a VLAN device resolved to its lower device).
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// 802.1Q VLAN id to send with (host order), or `NEXT_HOP_UNTAGGED`.
    pub vid: u16,
    /// The route's MTU: larger packets take the route lookup, which refuses them.
    pub mtu: u16,
}

/// `NextHop::vid` of an untagged egress.
pub const NEXT_HOP_UNTAGGED: u16 = u16::MAX;

/// What to rewrite a packet of this flow and direction to, and what lb knows of the
/// direction's TCP state.
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
    /// The service's idle timeout: `timeout_s` once the flow is confirmed (it starts at the
    /// handshake timeout in `LB_HALF_OPEN`).
    pub idle_timeout_s: u32,
    /// `bpf_ktime_get_coarse_ns` of the last refresh (refreshed coarsely, see
    /// `REFRESH_INTERVAL_NS` in lb-ebpf).
    pub last_seen_ns: u64,
    /// The interface packets of this direction arrive on; one arriving elsewhere is spoofed
    /// (`drop_wrong_side`). 0: not known.
    pub ingress_ifindex: u32,
    /// TCP: the sender's next sequence number as lb has seen it (host order), valid with
    /// `FLOW_F_SEQ_KNOWN`. A FIN or RST is believed only near it.
    pub seq_next: u32,
    /// TCP, half-open: the acknowledgement number that proves the sender saw the other
    /// side's SYN (client direction: server ISN + 1, once `FLOW_F_SYNACK_SEEN`; return
    /// direction: client ISN + 1). Host order.
    pub handshake_ack: u32,
    pub _pad: u32,
    pub next_hop: NextHop,
}

impl FlowEntry {
    /// The key of the flow's opposite direction, from this direction's entry (whose key is
    /// `key`): the rewritten tuple, seen from the other side. Word by word, so the BPF
    /// backend makes no `memmove` call of it.
    #[inline(always)]
    pub fn other_direction(&self, key: &FlowKey) -> FlowKey {
        let (d, s) = (&self.new_dst_be, &self.new_src_be);
        FlowKey {
            src_be: [d[0], d[1], d[2], d[3]],
            dst_be: [s[0], s[1], s[2], s[3]],
            src_port_be: self.new_dst_port_be,
            dst_port_be: self.new_src_port_be,
            proto: key.proto,
            family: key.family,
            _pad: 0,
        }
    }
}

/// `LB_EVENTS` record: a direction of a confirmed flow started closing (its first believable
/// FIN or RST), so the daemon removes the flow once `closing_timeout_s` has passed, without
/// walking the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseEvent {
    /// The direction's key, as in `LB_FLOWS`.
    pub key: FlowKey,
    /// `bpf_ktime_get_coarse_ns` when it started closing.
    pub at_ns: u64,
}

/// `LB_EVENTS` size: room for this many close events between two reads by the daemon.
pub const CLOSE_EVENTS: u32 = 1 << 16;

/// The frame `lb_sweep` runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepRequest {
    /// Each service's affinity timeout in seconds, by service id (0 for an id no service
    /// has: its affinities are all garbage).
    pub affinity_timeout_s: [u32; MAX_SERVICES as usize],
    /// Non-zero: every flow direction deleted goes into `LB_SWEPT` (for the peers).
    pub announce: u32,
    /// Non-zero: each live connection brings its client's affinity up to its last packet.
    pub refresh_affinities: u32,
}

/// `LB_SWEPT` size: flow directions one sweep can announce (a `FlowKey` each).
pub const SWEPT_EVENTS: u32 = 1 << 16;

/// One table's part of a sweep.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepCount {
    /// Entries still fresh, left in place.
    pub kept: u64,
    /// Expired entries deleted.
    pub removed: u64,
}

/// What `lb_sweep` writes over the start of its frame: per table, what it kept and deleted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepTally {
    pub flows: SweepCount,
    pub half_open: SweepCount,
    pub affinities: SweepCount,
    /// Deleted flow directions that did not fit in `LB_SWEPT` (with `announce`).
    pub unannounced: u64,
}

/// `LB_SYNC` record: a flow was confirmed, both directions as they went into `LB_FLOWS`,
/// for the daemon to hand to its peers (only with `SETTINGS_F_SYNC`). Written once per
/// connection, never per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncEvent {
    /// The client direction's key (client -> VIP).
    pub key: FlowKey,
    /// The client direction's entry.
    pub forward: FlowEntry,
    /// The return direction's entry (its key is `forward.other_direction(&key)`).
    pub reverse: FlowEntry,
}

/// `LB_SYNC` size: room for this many confirmed flows between two reads by the daemon
/// (every `sync::DRAIN_INTERVAL` of lb-user).
pub const SYNC_EVENTS: u32 = 1 << 15;

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
    /// New flows this client opened under this entry (wraps): the daemon names the clients
    /// with the largest share of a service's new flows (the mega-proxy case).
    pub new_flows: u32,
    pub last_seen_ns: u64,
}

/// `LB_SETTINGS[0]`: global knobs written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Number of valid IPv4 entries at the start of `LB_SNAT_ADDRS`.
    pub snat_v4_count: u32,
    /// Number of valid IPv6 entries from `SNAT_V6_BASE` on.
    pub snat_v6_count: u32,
    /// SNAT source ports are taken from `[snat_port_min, snat_port_max]` (host order).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Lifetime of a flow entry after FIN or RST.
    pub closing_timeout_s: u32,
    /// Lifetime of a half-open flow (and its SNAT port) until it is confirmed.
    pub handshake_timeout_s: u32,
    /// Lifetime of a fragment-tracking entry.
    pub fragment_timeout_s: u32,
    /// `SETTINGS_F_*`.
    pub flags: u32,
}

/// `LB_VLANS` value, keyed by the ifindex of a VLAN device on one of lb's interfaces: where
/// a packet routed out of that device really goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VlanPort {
    /// The interface lb is attached to (the VLAN device's lower device).
    pub lower_ifindex: u32,
    /// 802.1Q VLAN id (12 bits, host order).
    pub vid: u16,
    pub _pad: u16,
}

/// `LB_FRAGMENTS` key: one fragmented datagram (IPv4 id is 16 bits, IPv6's 32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
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
/// the `Pass*`, `Tx`, `Redirect` or `Drop*` slots. The others count events, not packets.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet the program sees.
    Packets = 0,
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): handed to the kernel untouched.
    PassNotIp,
    /// IP, but not addressed to any service or tracked flow.
    PassNotService,
    /// More than one VLAN tag (QinQ): left to the kernel.
    PassVlanStacked,
    /// Too short or malformed to tell whether it is for a VIP: the kernel drops and counts it.
    PassMalformed,
    /// Rewritten, but the next hop's MAC is not known yet: the kernel forwards it and resolves.
    PassNoNeigh,
    /// TTL or hop limit would expire: the kernel answers with ICMP time exceeded.
    PassTtlExpired,
    /// Rewritten, but the egress interface has no lb program: the kernel forwards it.
    PassEgressNotAttached,
    /// ICMP for a VIP that lb does not answer itself (echo with replies off, other types),
    /// and ICMP errors that quote no tracked flow (or are fragmented).
    PassIcmp,
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
    /// Half-open flows confirmed (TCP: the client's handshake ACK; UDP: the server's first reply) and moved to the flow table.
    FlowsConfirmed,
    /// A confirmed flow found the flow table full: it stays half-open and ends at the handshake timeout. Raise `max_flows`.
    FlowTableFull,
    /// ICMP echo requests to a VIP answered by lb (also counted as `tx`).
    EchoReplies,
    /// First fragments whose datagram's later fragments will follow the same flow.
    FragmentsTracked,
    /// ICMP errors (unreachable, fragmentation needed / packet too big, time exceeded,
    /// parameter problem) quoting a tracked flow, translated and sent to the other side.
    IcmpErrorsTranslated,
    /// Close events the daemon could not be told of (`LB_EVENTS` full): those flows leave
    /// the table at the next garbage collection instead.
    CloseEventsLost,
    /// Addressed to a VIP or SNAT address, but a header is truncated or a length field
    /// (IPv4 total length, IPv6 payload length, TCP data offset, UDP length) disagrees with
    /// the headers or the frame.
    DropMalformed,
    /// IPv6 to a VIP behind an extension header lb does not skip (see README), or too many of them.
    DropIpv6Extension,
    /// A later IP fragment to a VIP whose first fragment lb has not seen (or whose flow is gone).
    DropFragmentUnknown,
    /// TCP packet other than a SYN with no live flow (e.g. after the flow expired).
    DropTcpNoFlow,
    /// Service has no usable backend.
    DropNoBackend,
    /// No free SNAT port after the bounded number of attempts.
    DropSnatExhausted,
    /// Could not record the new flow (table update failed).
    DropFlowInsert,
    /// Route lookup failed (no route, blackhole, prohibited).
    DropNoRoute,
    /// Larger than the egress interface's MTU (lb's interfaces should share one MTU).
    DropOverMtu,
    /// The settings map was not populated (daemon not finished starting).
    DropNotConfigured,
    /// A packet of a known flow arrived on the other side's interface (spoofed).
    DropWrongSide,
    /// A TCP ACK on a half-open flow that does not acknowledge the server's SYN-ACK (a blind
    /// spoofer's ACK), or a SYN-ACK that does not acknowledge the client's SYN.
    DropTcpBadAck,
    /// A FIN or RST whose sequence number is too far from the sender's (a blind spoofer's):
    /// the flow keeps its state.
    DropTcpOutOfWindow,
    /// A tail call to the next program failed (its slot in `LB_PROGRAMS` is empty).
    DropTailCall,
    /// A per-CPU scratch slot was missing or the frame could not be resized: cannot happen in a loaded program, counted so that it would be seen if it did.
    DropInternal,
    // Appended after the drops: a slot is a position in the pinned `LB_COUNTERS`, so a
    // counter added in the middle would inherit another's count across an upgrade.
    /// Confirmed flows the peers could not be told of (`LB_SYNC` full): they reach the
    /// peers with the next reconciliation instead.
    SyncEventsLost,
    /// A new flow from a client the service's `allow` / `deny` lists refuse (also counted
    /// per service).
    DropSourceRefused,
}

impl Counter {
    pub const COUNT: u32 = Counter::DropSourceRefused as u32 + 1;
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::Packets,
        Counter::PassNotIp,
        Counter::PassNotService,
        Counter::PassVlanStacked,
        Counter::PassMalformed,
        Counter::PassNoNeigh,
        Counter::PassTtlExpired,
        Counter::PassEgressNotAttached,
        Counter::PassIcmp,
        Counter::Tx,
        Counter::Redirect,
        Counter::NewFlows,
        Counter::AffinityHits,
        Counter::AffinityMisses,
        Counter::FlowsConfirmed,
        Counter::FlowTableFull,
        Counter::EchoReplies,
        Counter::FragmentsTracked,
        Counter::IcmpErrorsTranslated,
        Counter::CloseEventsLost,
        Counter::DropMalformed,
        Counter::DropIpv6Extension,
        Counter::DropFragmentUnknown,
        Counter::DropTcpNoFlow,
        Counter::DropNoBackend,
        Counter::DropSnatExhausted,
        Counter::DropFlowInsert,
        Counter::DropNoRoute,
        Counter::DropOverMtu,
        Counter::DropNotConfigured,
        Counter::DropWrongSide,
        Counter::DropTcpBadAck,
        Counter::DropTcpOutOfWindow,
        Counter::DropTailCall,
        Counter::DropInternal,
        Counter::SyncEventsLost,
        Counter::DropSourceRefused,
    ];

    /// Stable snake_case name, used in `lb status` and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotService => "pass_not_service",
            Counter::PassVlanStacked => "pass_vlan_stacked",
            Counter::PassMalformed => "pass_malformed",
            Counter::PassNoNeigh => "pass_no_neigh",
            Counter::PassTtlExpired => "pass_ttl_expired",
            Counter::PassEgressNotAttached => "pass_egress_not_attached",
            Counter::PassIcmp => "pass_icmp",
            Counter::Tx => "tx",
            Counter::Redirect => "redirect",
            Counter::NewFlows => "new_flows",
            Counter::AffinityHits => "affinity_hits",
            Counter::AffinityMisses => "affinity_misses",
            Counter::FlowsConfirmed => "flows_confirmed",
            Counter::FlowTableFull => "flow_table_full",
            Counter::EchoReplies => "echo_replies",
            Counter::FragmentsTracked => "fragments_tracked",
            Counter::IcmpErrorsTranslated => "icmp_errors_translated",
            Counter::CloseEventsLost => "close_events_lost",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropIpv6Extension => "drop_ipv6_extension",
            Counter::DropFragmentUnknown => "drop_fragment_unknown",
            Counter::DropTcpNoFlow => "drop_tcp_no_flow",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropSnatExhausted => "drop_snat_exhausted",
            Counter::DropFlowInsert => "drop_flow_insert",
            Counter::DropNoRoute => "drop_no_route",
            Counter::DropOverMtu => "drop_over_mtu",
            Counter::DropNotConfigured => "drop_not_configured",
            Counter::DropWrongSide => "drop_wrong_side",
            Counter::DropTcpBadAck => "drop_tcp_bad_ack",
            Counter::DropTcpOutOfWindow => "drop_tcp_out_of_window",
            Counter::DropTailCall => "drop_tail_call",
            Counter::DropInternal => "drop_internal",
            Counter::SyncEventsLost => "sync_events_lost",
            Counter::DropSourceRefused => "drop_source_refused",
        }
    }

    /// Is this slot a final verdict (every packet lands in exactly one)?
    pub const fn is_verdict(self) -> bool {
        !matches!(
            self,
            Counter::Packets
                | Counter::NewFlows
                | Counter::AffinityHits
                | Counter::AffinityMisses
                | Counter::FlowsConfirmed
                | Counter::FlowTableFull
                | Counter::EchoReplies
                | Counter::FragmentsTracked
                | Counter::IcmpErrorsTranslated
                | Counter::CloseEventsLost
                | Counter::SyncEventsLost
        )
    }
}

/// How long a server that closed a connection first keeps its (server, SNAT address:port)
/// pair in TIME_WAIT, refusing a new connection on it: Windows Server's default
/// (`TcpTimedWaitDelay`, the Front Ends' OS; Linux's is 60 s). lb holds the SNAT port that
/// long after such a close.
pub const SERVER_TIME_WAIT_S: u32 = 120;

/// Entries are stamped in nanoseconds (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC);
/// timeouts are configured in seconds.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Has an entry last seen at `last_seen_ns` been idle for at most `timeout_ns` by `now`?
/// The one rule for the data plane's lookups and the daemon's collection alike.
#[inline(always)]
pub const fn is_fresh(last_seen_ns: u64, timeout_ns: u64, now: u64) -> bool {
    now.saturating_sub(last_seen_ns) <= timeout_ns
}

/// Index of a service's live Maglev slot `slot` in `LB_MAGLEV`.
#[inline(always)]
pub const fn maglev_index(service_id: u32, half: u32, slot: u32) -> u32 {
    (service_id * 2 + (half & 1)) * MAGLEV_SIZE + slot
}

// Layouts are part of the kernel ABI of our maps: a size change must bump LAYOUT_VERSION.
const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<Service>() == 24);
const _: () = assert!(size_of::<SourceRuleKey>() == 24);
const _: () = assert!(size_of::<AddrKey>() == 20);
const _: () = assert!(size_of::<VipInfo>() == 8);
const _: () = assert!(size_of::<Backend>() == 28);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<NextHop>() == 24);
const _: () = assert!(size_of::<FlowEntry>() == 104);
const _: () = assert!(size_of::<AffinityKey>() == 24);
const _: () = assert!(size_of::<SweepRequest>() == 4 * MAX_SERVICES as usize + 8);
const _: () = assert!(size_of::<SweepTally>() == 56);
const _: () = assert!(size_of::<AffinityEntry>() == 16);
const _: () = assert!(size_of::<Settings>() == 28);
const _: () = assert!(size_of::<VlanPort>() == 8);
const _: () = assert!(size_of::<FragmentKey>() == 40);
const _: () = assert!(size_of::<TrafficStats>() == 56);
const _: () = assert!(size_of::<CloseEvent>() == 48);
const _: () = assert!(size_of::<SyncEvent>() == 248);
const _: () = assert!(MAGLEV_ENTRIES <= u32::MAX / 2);
const _: () = assert!(Counter::COUNT <= MAX_COUNTERS);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, made of integers and arrays with explicit padding.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for SourceRuleKey {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for VlanPort {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for CloseEvent {}
    unsafe impl aya::Pod for SyncEvent {}
    unsafe impl aya::Pod for SweepTally {}
}

/// Word 0 of an address: an IPv4 address in network byte order, as read raw from a packet.
#[inline(always)]
pub const fn v4_words(addr_be: u32) -> [u32; 4] {
    [addr_be, 0, 0, 0]
}

/// An IPv6 address as four words, each as read raw (native load) from the packet.
#[inline(always)]
pub const fn v6_words(addr: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// The 16 bytes of an address stored by [`v6_words`].
#[inline(always)]
pub const fn v6_bytes(words: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = [
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
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
