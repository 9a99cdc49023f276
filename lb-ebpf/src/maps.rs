//! Every map the data plane uses. Names match the `MAP_*` constants in lb-common; the daemon
//! resizes the big tables at load time (`max_flows`, `max_affinities` in the config).
use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    AddrKey, AffinityEntry, AffinityKey, Backend, FlowEntry, FlowKey, FragmentKey, Service,
    ServiceKey, Settings, TrafficStats, VipInfo, VlanPort, MAGLEV_ENTRIES, MAX_AFFINITIES,
    MAX_BACKENDS, MAX_COUNTERS, MAX_SERVICE_PORTS, MAX_FLOWS, MAX_FRAGMENTS, MAX_HALF_OPEN, MAX_INTERFACES,
    MAX_SERVICES, MAX_SNAT_ADDRS,
};

#[map(name = "LB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::with_max_entries(MAX_SERVICE_PORTS, 0);

#[map(name = "LB_VIPS")]
pub static VIPS: HashMap<AddrKey, VipInfo> =
    HashMap::with_max_entries(MAX_SERVICES + MAX_SNAT_ADDRS, 0);

#[map(name = "LB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Per service, two halves of `MAGLEV_SIZE` backend ids (see `lb_common::maglev_index`).
#[map(name = "LB_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAGLEV_ENTRIES, 0);

/// Confirmed connections, both directions. Not LRU: nothing a flood sends can evict an
/// established flow; entries leave when they expire (daemon GC, or reuse of the tuple).
#[map(name = "LB_FLOWS")]
pub static FLOWS: HashMap<FlowKey, FlowEntry> = HashMap::with_max_entries(MAX_FLOWS, 0);

/// Connections from their first packet until confirmed (TCP: the client's handshake ACK;
/// UDP: the server's first reply), both directions. LRU and short-lived: spoofed SYNs only
/// ever churn this table, and their SNAT ports come back after the handshake timeout.
#[map(name = "LB_HALF_OPEN")]
pub static HALF_OPEN: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(MAX_HALF_OPEN, 0);

/// Fragmented datagrams: the first fragment's rewrite, for the later ones.
#[map(name = "LB_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FlowEntry> =
    LruHashMap::with_max_entries(MAX_FRAGMENTS, 0);

/// `lb_new_flow`, at `NEW_FLOW_SLOT`, put there by the daemon.
#[map(name = "LB_PROGRAMS")]
pub static NEW_FLOW_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);
pub const NEW_FLOW_SLOT: u32 = 0;

/// VLAN devices on lb's interfaces, by ifindex (written by the daemon).
#[map(name = "LB_VLANS")]
pub static VLANS: HashMap<u32, VlanPort> = HashMap::with_max_entries(MAX_INTERFACES, 0);

#[map(name = "LB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(MAX_AFFINITIES, 0);

#[map(name = "LB_SNAT_ADDRS")]
pub static SNAT_ADDRS: Array<[u32; 4]> = Array::with_max_entries(MAX_SNAT_ADDRS, 0);

#[map(name = "LB_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Interfaces lb is attached to, by ifindex: redirect targets.
#[map(name = "LB_TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

#[map(name = "LB_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_COUNTERS, 0);

#[map(name = "LB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

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
