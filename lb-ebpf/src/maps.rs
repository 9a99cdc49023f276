//! Every map the data plane uses. Each is listed in lb-common's registry (`lb_common::MAPS`,
//! checked against this object by a unit test), which says whether it is pinned; the daemon
//! resizes the big tables at load time (`max_flows`, `max_affinities` in the config).
use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    macros::map,
    maps::{
        lpm_trie::Key as LpmKey, Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray,
        ProgramArray, RingBuf,
    },
};
use lb_common::{
    AddrKey, AffinityEntry, AffinityKey, Backend, CloseEvent, FlowEntry, FlowKey, FragmentKey,
    Service, ServiceKey, Settings, SourceRuleKey, SyncEvent, TrafficStats, VipInfo, VlanPort,
    ADDR_FILTER_SLOTS, CLOSE_EVENTS, MAGLEV_ENTRIES, MAX_AFFINITIES, MAX_BACKENDS, MAX_COUNTERS,
    MAX_FLOWS, MAX_FRAGMENTS, MAX_HALF_OPEN, MAX_INTERFACES, MAX_SERVICES, MAX_SERVICE_PORTS,
    MAX_SNAT_ADDRS, MAX_SOURCE_RULES, PROGRAM_SLOTS, SWEPT_EVENTS, SYNC_EVENTS,
};

#[map(name = "LB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICE_PORTS, 0);

#[map(name = "LB_VIPS")]
pub static VIPS: HashMap<AddrKey, VipInfo> =
    HashMap::with_max_entries(MAX_SERVICES + MAX_SNAT_ADDRS, 0);

/// How many of lb's addresses hash to each slot (`lb_common::hash::address_slot`),
/// written by the daemon with `LB_VIPS`: traffic for any other address leaves after one
/// array read, before the transport header is parsed.
#[map(name = "LB_ADDR_FILTER")]
pub static ADDR_FILTER: Array<u32> = Array::with_max_entries(ADDR_FILTER_SLOTS, 0);

#[map(name = "LB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Per service, two halves of `MAGLEV_SIZE` backend ids (see `lb_common::maglev_index`).
/// Memory-mapped by the daemon, which writes a table half with plain stores.
#[map(name = "LB_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAGLEV_ENTRIES, BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE` (linux/bpf.h): the array can be mapped into a process's memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The LRU tables share one LRU list between the CPUs (no `BPF_F_NO_COMMON_LRU`): each CPU
/// takes free entries from it 128 at a time, so an insert rarely touches the shared list,
/// while a per-CPU list ages its entries on every insert (measured: a new flow, with its
/// three LRU inserts, ~17 % dearer that way; BENCHMARKS.md).
const LRU_SHARED: u32 = 0;

/// Confirmed connections, both directions. Not LRU: nothing a flood sends can evict an
/// established flow; entries leave when they expire (daemon GC, or reuse of the tuple).
#[map(name = "LB_FLOWS")]
pub static FLOWS: HashMap<FlowKey, FlowEntry> = HashMap::with_max_entries(MAX_FLOWS, 0);

/// Connections from their first packet until confirmed (TCP: the client's ACK of the
/// server's SYN-ACK; UDP: the server's first reply), both directions. LRU and short-lived:
/// spoofed SYNs only ever churn this table, and their SNAT ports come back after the
/// handshake timeout. Confirming copies a flow to `LB_FLOWS`, which is looked up first, and
/// leaves the return entry to expire (one delete saved per connection).
#[map(name = "LB_HALF_OPEN")]
pub static HALF_OPEN: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(MAX_HALF_OPEN, LRU_SHARED);

/// Fragmented datagrams: the first fragment's rewrite, for the later ones.
#[map(name = "LB_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FlowEntry> =
    LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

/// The routing generation (`NextHop::generation`), bumped by the daemon on every route,
/// neighbour or link change.
#[map(name = "LB_ROUTE_GEN")]
pub static ROUTE_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// `lb_new_flow`, `lb_claim_snat` and `lb_open_flow`, at their `*_SLOT`s, put there by the
/// daemon.
#[map(name = "LB_PROGRAMS")]
pub static PROGRAMS: ProgramArray = ProgramArray::with_max_entries(PROGRAM_SLOTS, 0);

/// VLAN devices on lb's interfaces, by ifindex (written by the daemon).
#[map(name = "LB_VLANS")]
pub static VLANS: HashMap<u32, VlanPort> = HashMap::with_max_entries(MAX_INTERFACES, 0);

#[map(name = "LB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(MAX_AFFINITIES, LRU_SHARED);

#[map(name = "LB_SNAT_ADDRS")]
pub static SNAT_ADDRS: Array<[u32; 4]> = Array::with_max_entries(MAX_SNAT_ADDRS, 0);

#[map(name = "LB_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Interfaces lb is attached to, by ifindex: redirect targets.
#[map(name = "LB_TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

/// Close events for the daemon (`CloseEvent`).
#[map(name = "LB_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(CLOSE_EVENTS * CLOSE_EVENT_RECORD, 0);
/// A record's size in the ring: the event and the ring's 8-byte header.
const CLOSE_EVENT_RECORD: u32 = core::mem::size_of::<CloseEvent>() as u32 + 8;

/// Confirmed flows for the peers (`SyncEvent`), written only with `SETTINGS_F_SYNC`.
#[map(name = "LB_SYNC")]
pub static SYNC: RingBuf = RingBuf::with_byte_size(SYNC_EVENTS * SYNC_EVENT_RECORD, 0);
/// A record's size in the ring: the event and the ring's 8-byte header.
const SYNC_EVENT_RECORD: u32 = core::mem::size_of::<SyncEvent>() as u32 + 8;

/// Flow directions `lb_sweep` deleted (`FlowKey`), written only when its request asks.
#[map(name = "LB_SWEPT")]
pub static SWEPT: RingBuf = RingBuf::with_byte_size(SWEPT_EVENTS * SWEPT_RECORD, 0);
/// A record's size in the ring: the key and the ring's 8-byte header.
const SWEPT_RECORD: u32 = core::mem::size_of::<FlowKey>() as u32 + 8;

#[map(name = "LB_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_COUNTERS, 0);

#[map(name = "LB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// New flows refused by their service's source rules, per service id.
#[map(name = "LB_SVC_REFUSED")]
pub static SERVICE_REFUSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Each service's `allow` / `deny` prefixes (`SOURCE_ALLOW`, `SOURCE_DENY`), looked up by
/// client address when a flow opens; written by the daemon.
#[map(name = "LB_SOURCE_RULES")]
pub static SOURCE_RULES: LpmTrie<SourceRuleKey, u32> =
    LpmTrie::with_max_entries(MAX_SOURCE_RULES, 0);

pub type SourceRuleLookup = LpmKey<SourceRuleKey>;

#[map(name = "LB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

// Working space for values too big for the 512-byte BPF stack. Per CPU, and an XDP program
// never nests on its CPU, so a slot is never shared by two packets at once. Each slot has
// exactly one use per packet, so no two live references ever point at the same slot.

/// `LB_SCRATCH_KEY` slots.
#[derive(Clone, Copy)]
pub enum KeySlot {
    /// The packet's own 5-tuple (`Packet::key`), written by `parse`.
    Packet,
    /// A key built from it: the opposite direction, or a SNAT candidate.
    Derived,
}

/// `LB_SCRATCH_FLOW` slots: the two directions of a flow being created or confirmed, and a
/// fragment's copy.
#[derive(Clone, Copy)]
pub enum EntrySlot {
    Forward,
    Reverse,
    Fragment,
}

#[map(name = "LB_SCRATCH_KEY")]
static SCRATCH_KEYS: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(2, 0);

#[map(name = "LB_SCRATCH_FLOW")]
static SCRATCH_ENTRIES: PerCpuArray<FlowEntry> = PerCpuArray::with_max_entries(3, 0);

/// What `lb_new_flow` and `lb_claim_snat` decided for the packet they hand on (the SNAT
/// claim itself is in `KeySlot::Derived`).
#[derive(Clone, Copy)]
pub struct NewFlowPlan {
    pub service_id: u32,
    pub backend_id: u32,
    /// `FLOW_F_*` of the client direction (the service's affinity mode).
    pub flow_flags: u32,
    pub idle_timeout_s: u32,
    /// 1 if the backend came from the client's affinity.
    pub affinity_hit: u32,
    /// The packet's TCP sequence number (0 for UDP).
    pub tcp_seq: u32,
    /// The server's port for this flow, set by `lb_claim_snat`.
    pub server_port_be: u16,
    pub _pad: u16,
}

#[map(name = "LB_SCRATCH_PLAN")]
static SCRATCH_PLAN: PerCpuArray<NewFlowPlan> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn plan_slot() -> Option<&'static mut NewFlowPlan> {
    // SAFETY: as above; each program writes it before the tail call to the one that reads it.
    SCRATCH_PLAN.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[map(name = "LB_SCRATCH_FIB")]
static SCRATCH_FIB: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn key_slot(slot: KeySlot) -> Option<&'static mut FlowKey> {
    // SAFETY: per-CPU slot with a single use per packet (see above).
    SCRATCH_KEYS
        .get_ptr_mut(slot as u32)
        .map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn entry_slot(slot: EntrySlot) -> Option<&'static mut FlowEntry> {
    // SAFETY: as above.
    SCRATCH_ENTRIES
        .get_ptr_mut(slot as u32)
        .map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn fib_params() -> Option<&'static mut FibParams> {
    // SAFETY: as above.
    SCRATCH_FIB.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}
