//! The registry of the XDP object's maps: every map lb-ebpf defines is listed here, with
//! whether it outlives the daemon. The daemon pins exactly the `Pinned` ones, and a unit test
//! in lb-user (`dataplane::tests`) checks this list against the maps the object really has,
//! so a map added to lb-ebpf and forgotten here fails the tests instead of silently losing
//! its contents on restart. Names are the `#[map(name = ...)]` of lb-ebpf; kernel limit 15
//! characters.

/// What happens to a map's contents when the daemon restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Pinned under the daemon's pin directory and adopted by the next daemon: flows,
    /// affinities, counters and configuration survive a restart or an upgrade.
    Pinned,
    /// Created afresh by every load; holds nothing that must survive.
    PerLoad,
}

#[derive(Debug, Clone, Copy)]
pub struct MapSpec {
    pub name: &'static str,
    pub lifetime: Lifetime,
}

const fn pinned(name: &'static str) -> MapSpec {
    MapSpec {
        name,
        lifetime: Lifetime::Pinned,
    }
}

const fn per_load(name: &'static str) -> MapSpec {
    MapSpec {
        name,
        lifetime: Lifetime::PerLoad,
    }
}

pub const MAP_SERVICES: &str = "LB_SERVICES";
pub const MAP_VIPS: &str = "LB_VIPS";
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
pub const MAP_MAGLEV: &str = "LB_MAGLEV";
pub const MAP_FLOWS: &str = "LB_FLOWS";
pub const MAP_HALF_OPEN: &str = "LB_HALF_OPEN";
pub const MAP_FRAGMENTS: &str = "LB_FRAGMENTS";
pub const MAP_VLANS: &str = "LB_VLANS";
pub const MAP_AFFINITY: &str = "LB_AFFINITY";
pub const MAP_SNAT_ADDRS: &str = "LB_SNAT_ADDRS";
pub const MAP_SETTINGS: &str = "LB_SETTINGS";
pub const MAP_TX_PORTS: &str = "LB_TX_PORTS";
pub const MAP_COUNTERS: &str = "LB_COUNTERS";
pub const MAP_SERVICE_STATS: &str = "LB_SVC_STATS";
pub const MAP_BACKEND_STATS: &str = "LB_BE_STATS";
pub const MAP_PROGRAMS: &str = "LB_PROGRAMS";
pub const MAP_ROUTE_GENERATION: &str = "LB_ROUTE_GEN";
pub const MAP_ADDR_FILTER: &str = "LB_ADDR_FILTER";
pub const MAP_EVENTS: &str = "LB_EVENTS";
pub const MAP_SYNC: &str = "LB_SYNC";
pub const MAP_SOURCE_RULES: &str = "LB_SOURCE_RULES";
pub const MAP_SERVICE_REFUSED: &str = "LB_SVC_REFUSED";
pub const MAP_SWEPT: &str = "LB_SWEPT";

/// Every map of the XDP object (`lb.bpf.o`).
pub const MAPS: [MapSpec; 28] = [
    pinned(MAP_PROGRAMS),
    pinned(MAP_ADDR_FILTER),
    pinned(MAP_ROUTE_GENERATION),
    pinned(MAP_SERVICES),
    pinned(MAP_VIPS),
    pinned(MAP_BACKENDS),
    pinned(MAP_MAGLEV),
    pinned(MAP_FLOWS),
    pinned(MAP_HALF_OPEN),
    pinned(MAP_FRAGMENTS),
    pinned(MAP_VLANS),
    pinned(MAP_AFFINITY),
    pinned(MAP_SNAT_ADDRS),
    pinned(MAP_SETTINGS),
    pinned(MAP_TX_PORTS),
    pinned(MAP_COUNTERS),
    pinned(MAP_SERVICE_STATS),
    pinned(MAP_BACKEND_STATS),
    pinned(MAP_SOURCE_RULES),
    pinned(MAP_SERVICE_REFUSED),
    // Close events: a restarted daemon reads its own ring, and what closed meanwhile waits
    // for garbage collection.
    per_load(MAP_EVENTS),
    // Confirmed flows for the peers: what a restarting daemon missed reaches them with its
    // first reconciliation (a full snapshot to every peer it connects to).
    per_load(MAP_SYNC),
    // What the last sweep deleted, for the peers: read right after each sweep.
    per_load(MAP_SWEPT),
    // Per-CPU working space, valid within one packet only.
    per_load("LB_SCRATCH_KEY"),
    per_load("LB_SCRATCH_FLOW"),
    per_load("LB_SCRATCH_PLAN"),
    per_load("LB_SCRATCH_FIB"),
    // aya-log's records (`lb debug`): read by whichever daemon loaded the program.
    per_load("AYA_LOGS"),
];

/// The maps a daemon pins and adopts.
pub fn pinned_maps() -> impl Iterator<Item = &'static str> {
    MAPS.iter()
        .filter(|m| m.lifetime == Lifetime::Pinned)
        .map(|m| m.name)
}
