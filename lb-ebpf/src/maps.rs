//! Every map the data plane uses. Names match the `MAP_*` constants in lb-common; the daemon
//! resizes the big tables at load time (`max_flows`, `max_affinities` in the config).
use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, AffinityEntry, AffinityKey, Backend, FlowEntry, FlowKey, Service, ServiceKey,
    Settings, TrafficStats, VipInfo, MAGLEV_ENTRIES, MAX_AFFINITIES, MAX_BACKENDS, MAX_COUNTERS,
    MAX_FLOWS, MAX_INTERFACES, MAX_SERVICES, MAX_SNAT_ADDRS,
};

#[map(name = "LB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "LB_VIPS")]
pub static VIPS: HashMap<AddrKey, VipInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "LB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Per service, two halves of `MAGLEV_SIZE` backend ids (see `lb_common::maglev_index`).
#[map(name = "LB_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAGLEV_ENTRIES, 0);

/// Connection table for both directions; LRU so a flood cannot make it refuse inserts.
#[map(name = "LB_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

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

/// Working space for values too big for the 512-byte BPF stack. Per CPU, and an XDP program
/// never nests on its CPU, so one slot is never shared by two packets at once.
#[repr(C)]
pub struct Scratch {
    pub fib: FibParams,
    pub forward: FlowEntry,
    pub reverse: FlowEntry,
}

#[map(name = "LB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch slot.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: per-CPU slot, used by one packet at a time (see `Scratch`).
    SCRATCH.get_ptr_mut(0).map(|slot| unsafe { &mut *slot })
}
