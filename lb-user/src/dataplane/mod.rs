//! The one typed wrapper around the XDP program and its maps. Nothing else in the daemon
//! touches a raw map.

pub mod batch;
pub mod maglev;
pub mod mapped;
pub mod next_hops;
pub mod sweep;
pub mod vlan;
use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, DevMapHash, HashMap, IterableMap, Map, MapData, PerCpuArray, ProgramArray, RingBuf,
    },
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    is_fresh, maglev_index, pinned_maps, AddrKey, AffinityEntry, AffinityKey, Backend, Counter,
    FlowEntry, FlowKey, Service, ServiceKey, Settings, SourceRuleKey, TrafficStats, VipInfo,
    VlanPort, ADDR_FILTER_SLOTS, CLAIM_PROGRAM_NAME, CLAIM_SLOT, FLOW_F_CLOSING, LAYOUT_VERSION,
    MAGLEV_ENTRIES, MAGLEV_SIZE, MAP_ADDR_FILTER, MAP_AFFINITY, MAP_BACKENDS, MAP_BACKEND_STATS,
    MAP_COUNTERS, MAP_EVENTS, MAP_FLOWS, MAP_HALF_OPEN, MAP_MAGLEV, MAP_PROGRAMS,
    MAP_ROUTE_GENERATION, MAP_SERVICES, MAP_SERVICE_REFUSED, MAP_SERVICE_STATS, MAP_SETTINGS,
    MAP_SNAT_ADDRS, MAP_SOURCE_RULES, MAP_SWEPT, MAP_SYNC, MAP_TX_PORTS, MAP_VIPS, MAP_VLANS,
    MAX_BACKENDS, NEW_FLOW_PROGRAM_NAME, NEW_FLOW_SLOT, NS_PER_SEC, OPEN_FLOW_PROGRAM_NAME,
    OPEN_FLOW_SLOT, PROGRAM_NAME, SNAT_V6_BASE, SOURCE_RULE_HEADER_BITS, SWEEP_PROGRAM_NAME,
};
use tracing::{info, warn};

use self::{mapped::MappedArray, next_hops::RouteGeneration};
use crate::{
    addr::{addr_from_words, addr_words, family, SourcePrefix},
    config::XdpModeConfig,
};

/// The XDP object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.bpf.o"));
/// Reference programs from the same crate (`xdp_pass`), for the harness and benchmarks.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline.bpf.o"));

/// Table sizes chosen at load time (the object's defaults are the maximums).
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub max_flows: u32,
    pub max_half_open: u32,
    pub max_affinities: u32,
}

/// Forwards the program's aya-log records (see `lb debug`) to the `log` facade.
pub type DataplaneLogger = aya_log::EbpfLogger<DropNames>;

/// The program logs drops as `drop: counter N` (see lb-ebpf `log::drop`); this passes
/// every record on to the global logger with N replaced by the counter's name.
pub struct DropNames;

const DROP_PREFIX: &str = "drop: counter ";

impl log::Log for DropNames {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        let message = record.args().to_string();
        let name = message
            .strip_prefix(DROP_PREFIX)
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| Counter::ALL.get(n));
        match name {
            Some(counter) => log::logger().log(
                &log::Record::builder()
                    .metadata(record.metadata().clone())
                    .args(format_args!("drop: {}", counter.name()))
                    .build(),
            ),
            None => log::logger().log(record),
        }
    }

    fn flush(&self) {
        log::logger().flush()
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    logger: Option<DataplaneLogger>,
    route_generation: Option<RouteGeneration>,
    /// `LB_EVENTS`, until the daemon takes it (not pinned: see `lb_common::MAPS`).
    close_events: Option<RingBuf<MapData>>,
    /// `LB_SYNC`, until the sync service takes it.
    sync_events: Option<RingBuf<MapData>>,
    /// `LB_SWEPT`, which each `Sweeper` reads on a descriptor of its own.
    swept: MapData,
    /// Where maps and links are pinned (`<pin_dir>/v<LAYOUT_VERSION>`); `None` for a
    /// throw-away instance (packet tests).
    pin_dir: Option<PathBuf>,
    services: HashMap<MapData, ServiceKey, Service>,
    vips: HashMap<MapData, AddrKey, VipInfo>,
    address_filter_map: Array<MapData, u32>,
    /// What `LB_ADDR_FILTER` holds.
    address_filter: Vec<u32>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, u32>,
    /// `LB_MAGLEV` in the daemon's memory, unless pinned by an lb from before it could be.
    maglev_mapped: Option<MappedArray>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    half_open: HashMap<MapData, FlowKey, FlowEntry>,
    /// Held open: the kernel empties a program array when its last user reference goes.
    _programs: ProgramArray<MapData>,
    vlans: HashMap<MapData, u32, VlanPort>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    snat: Array<MapData, [u32; 4]>,
    settings: Array<MapData, Settings>,
    tx_ports: DevMapHash<MapData>,
    source_rules: LpmTrie<MapData, SourceRuleKey, u32>,
    /// Also owns the counters and statistics.
    reader: TableReader,
}

/// Read access to the tables and counters behind `lb status` and the metrics, on its own
/// file descriptors: a reader handed to another task walks a million flows without the
/// daemon's lock while the pool keeps changing the maps.
pub struct TableReader {
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    half_open: HashMap<MapData, FlowKey, FlowEntry>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    counters: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    service_refused: PerCpuArray<MapData, u64>,
}

/// A second handle on the map behind `data`, of the same kind.
fn reopen<T: TryFrom<Map>>(data: &MapData, kind: fn(MapData) -> Map, name: &str) -> Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicate the descriptor of {name}"))?;
    let data = MapData::from_fd(fd).with_context(|| format!("reopen {name}"))?;
    T::try_from(kind(data)).with_context(|| format!("map {name} has an unexpected type"))
}

impl TableReader {
    /// A reader with handles of its own on the tables (the daemon keeps `flows`,
    /// `half_open` and `affinity` for its writes); the counters only ever get read, so the
    /// reader takes them.
    fn new(
        flows: &HashMap<MapData, FlowKey, FlowEntry>,
        half_open: &HashMap<MapData, FlowKey, FlowEntry>,
        affinity: &HashMap<MapData, AffinityKey, AffinityEntry>,
        counters: PerCpuArray<MapData, u64>,
        service_stats: PerCpuArray<MapData, TrafficStats>,
        backend_stats: PerCpuArray<MapData, TrafficStats>,
        service_refused: PerCpuArray<MapData, u64>,
    ) -> Result<Self> {
        Ok(Self {
            flows: reopen(flows.map(), Map::HashMap, MAP_FLOWS)?,
            half_open: reopen(half_open.map(), Map::LruHashMap, MAP_HALF_OPEN)?,
            affinity: reopen(affinity.map(), Map::LruHashMap, MAP_AFFINITY)?,
            counters,
            service_stats,
            backend_stats,
            service_refused,
        })
    }

    /// Another reader on the same maps, on descriptors of its own, for another task.
    fn reopen(&self) -> Result<Self> {
        Self::new(
            &self.flows,
            &self.half_open,
            &self.affinity,
            reopen(self.counters.map(), Map::PerCpuArray, MAP_COUNTERS)?,
            reopen(
                self.service_stats.map(),
                Map::PerCpuArray,
                MAP_SERVICE_STATS,
            )?,
            reopen(
                self.backend_stats.map(),
                Map::PerCpuArray,
                MAP_BACKEND_STATS,
            )?,
            reopen(
                self.service_refused.map(),
                Map::PerCpuArray,
                MAP_SERVICE_REFUSED,
            )?,
        )
    }
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let values = self.counters.get(&(c as u32), 0).context("read counters")?;
                Ok((c, values.iter().sum()))
            })
            .collect()
    }

    pub fn service_stats(&self, id: u32) -> Result<TrafficStats> {
        let values = self
            .service_stats
            .get(&id, 0)
            .context("read service stats")?;
        Ok(sum_traffic(&values))
    }

    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats> {
        let values = self
            .backend_stats
            .get(&id, 0)
            .context("read backend stats")?;
        Ok(sum_traffic(&values))
    }

    /// New flows service `id`'s source rules refused.
    pub fn service_refused(&self, id: u32) -> Result<u64> {
        let values = self
            .service_refused
            .get(&id, 0)
            .context("read refused flows")?;
        Ok(values.iter().sum())
    }

    /// Affinity entries (expired ones included: the caller knows the timeouts).
    pub fn affinities(&self) -> impl Iterator<Item = (AffinityKey, AffinityEntry)> + '_ {
        entries(&self.affinity, MAP_AFFINITY).into_iter()
    }

    /// Confirmed flow entries, both directions.
    pub fn flows(&self) -> impl Iterator<Item = (FlowKey, FlowEntry)> + '_ {
        entries(&self.flows, MAP_FLOWS).into_iter()
    }

    pub fn select_flows(
        &self,
        remove: impl Fn(&FlowKey, &FlowEntry) -> bool,
    ) -> Result<Selection<FlowKey>> {
        select(&self.flows, remove).context("LB_FLOWS")
    }

    pub fn select_half_open(
        &self,
        remove: impl Fn(&FlowKey, &FlowEntry) -> bool,
    ) -> Result<Selection<FlowKey>> {
        select(&self.half_open, remove).context("LB_HALF_OPEN")
    }

    pub fn select_affinities(
        &self,
        remove: impl Fn(&AffinityKey, &AffinityEntry) -> bool,
    ) -> Result<Selection<AffinityKey>> {
        select(&self.affinity, remove).context("LB_AFFINITY")
    }
}

/// The tables a peer's state goes into (see `Dataplane::open_peer_tables`).
pub struct PeerTables {
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
}

impl PeerTables {
    /// Writes flow directions, in batches; returns how many the table took (it refuses
    /// the rest when full).
    pub fn install_flows(&mut self, entries: &[(FlowKey, FlowEntry)]) -> usize {
        let (written, refused) = batch::write_hash(&self.flows, entries);
        if let Some(e) = refused {
            warn!(error = %e, refused = entries.len() - written, "installing a peer's flows");
        }
        written
    }

    /// Writes an affinity unless this node holds a fresher one for the client.
    pub fn install_affinity(&mut self, key: &AffinityKey, entry: &AffinityEntry) -> bool {
        if let Ok(current) = self.affinity.get(key, 0) {
            if current.last_seen_ns >= entry.last_seen_ns {
                return true;
            }
        }
        self.affinity.insert(key, entry, 0).is_ok()
    }

    /// Removes one flow direction, as the peer removed it (a direction may close and go
    /// before the other); false if it was not here.
    pub fn remove_flow(&mut self, key: &FlowKey) -> bool {
        self.flows.remove(key).is_ok()
    }
}

/// How many of `addresses` hash to each `LB_ADDR_FILTER` slot.
fn address_filter(addresses: &[IpAddr]) -> Vec<u32> {
    let mut counts = vec![0; ADDR_FILTER_SLOTS as usize];
    for addr in addresses {
        counts[lb_common::hash::address_slot(&addr_words(*addr)) as usize] += 1;
    }
    counts
}

/// An address as the data plane stores it: the bytes as they appear in a packet, IPv4 in
/// word 0.
fn source_rule_key(service_id: u32, prefix: SourcePrefix) -> LpmKey<SourceRuleKey> {
    LpmKey::new(
        SOURCE_RULE_HEADER_BITS + u32::from(prefix.prefix_len()),
        SourceRuleKey {
            service_id,
            family: u32::from(family(prefix.addr())),
            addr_be: addr_words(prefix.addr()),
        },
    )
}

pub fn vip_key(addr: IpAddr) -> AddrKey {
    AddrKey {
        addr_be: addr_words(addr),
        family: family(addr),
        _pad8: 0,
        _pad16: 0,
    }
}

/// Loads the XDP program `name` of the object into the kernel.
fn load_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("the kernel verifier rejected the XDP program {name}"))?;
    Ok(program)
}

fn take<T: TryFrom<Map>>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn sum_traffic(per_cpu: &[TrafficStats]) -> TrafficStats {
    per_cpu.iter().fold(TrafficStats::default(), |mut acc, v| {
        add_traffic(&mut acc, v);
        acc
    })
}

fn add_traffic(acc: &mut TrafficStats, v: &TrafficStats) {
    acc.fwd_packets += v.fwd_packets;
    acc.fwd_bytes += v.fwd_bytes;
    acc.rev_packets += v.rev_packets;
    acc.rev_bytes += v.rev_bytes;
    acc.new_flows += v.new_flows;
    acc.affinity_hits += v.affinity_hits;
    acc.affinity_misses += v.affinity_misses;
}

/// What a removal pass did: entries deleted.
#[derive(Debug, Clone, Copy)]
pub struct Removal {
    pub removed: usize,
}

/// The entries of a table chosen for deletion: the reading half of a removal, which needs
/// no write access (see `TableReader`).
#[derive(Debug, Default)]
pub struct Selection<K> {
    pub doomed: Vec<K>,
}

/// The entries of `map` that `remove` selects, in one batched walk.
fn select<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    remove: impl Fn(&K, &V) -> bool,
) -> Result<Selection<K>> {
    let doomed = batch::read_all(map)?
        .into_iter()
        .filter(|(k, v)| remove(k, v))
        .map(|(k, _)| k)
        .collect();
    Ok(Selection { doomed })
}

/// Deletes a selection, in batches. An entry already gone (LRU eviction, a racing delete)
/// is fine.
fn delete_selected<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    selection: &Selection<K>,
) -> Result<Removal> {
    Ok(Removal {
        removed: batch::delete(map, &selection.doomed)?,
    })
}

/// Every entry of `map` (batched), or none with a warning if the kernel refuses.
fn entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>, name: &str) -> Vec<(K, V)> {
    batch::read_all(map).unwrap_or_else(|e| {
        warn!(map = name, error = %format!("{e:#}"), "reading a table");
        Vec::new()
    })
}

/// `<pin_dir>/v<LAYOUT_VERSION>`, refusing to start next to pins of another layout: reading
/// those maps with our types would be reading garbage.
pub fn versioned_pin_dir(pin_dir: &Path) -> Result<PathBuf> {
    let ours = format!("v{LAYOUT_VERSION}");
    if let Ok(entries) = std::fs::read_dir(pin_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('v') && name != ours {
                bail!(
                    "{} holds maps of data-plane layout {name}, this lb uses {ours}: the layouts \
                     differ, so they cannot be adopted. Stop the old version's data plane with \
                     `lb detach` (it drops its flows and affinities) and start again",
                    pin_dir.display()
                );
            }
        }
    }
    let dir = pin_dir.join(ours);
    std::fs::create_dir_all(&dir)
        .with_context(|| {
            format!(
                "create {} (is bpffs mounted there? `ip netns exec` hides /sys/fs/bpf; use `nsenter --net=...`)",
                dir.display()
            )
        })?;
    Ok(dir)
}

/// Removes the pinned links (detaching the program) and maps: the data plane stops and its
/// flows and affinities are gone.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)
            .with_context(|| format!("remove {}", pin_dir.display()))?;
    }
    Ok(())
}

impl Dataplane {
    /// Loads the program and creates its maps (not attached anywhere yet). With `pin_dir`,
    /// maps already pinned there (by a previous daemon) are adopted with their contents.
    pub fn load(capacity: Capacity, pin_dir: Option<&Path>) -> Result<Self> {
        let pin_dir = pin_dir.map(versioned_pin_dir).transpose()?;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_FLOWS, capacity.max_flows)
            .map_max_entries(MAP_HALF_OPEN, capacity.max_half_open)
            .map_max_entries(MAP_AFFINITY, capacity.max_affinities);
        let pin_paths: Vec<(&str, PathBuf)> = match &pin_dir {
            Some(dir) => pinned_maps().map(|name| (name, dir.join(name))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the XDP object (are you root, with CAP_BPF?)")?;
        load_program(&mut ebpf, PROGRAM_NAME)?;
        // Pinned with the other maps: a running data plane keeps its programs while no
        // daemon runs, and the next daemon swaps its own in.
        let mut programs: ProgramArray<MapData> = take(&mut ebpf, MAP_PROGRAMS)?;
        for (name, slot) in [
            (NEW_FLOW_PROGRAM_NAME, NEW_FLOW_SLOT),
            (CLAIM_PROGRAM_NAME, CLAIM_SLOT),
            (OPEN_FLOW_PROGRAM_NAME, OPEN_FLOW_SLOT),
        ] {
            let fd = load_program(&mut ebpf, name)?.fd()?.try_clone()?;
            programs
                .set(slot, &fd, 0)
                .with_context(|| format!("install the program {name}"))?;
        }
        load_program(&mut ebpf, SWEEP_PROGRAM_NAME)?;
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, DropNames)
            .context("open the data-plane log ring")?;
        // Whatever a previous daemon cached may have changed while none was watching.
        let mut route_generation = RouteGeneration::new(take(&mut ebpf, MAP_ROUTE_GENERATION)?);
        route_generation.bump()?;
        let maglev: Array<MapData, u32> = take(&mut ebpf, MAP_MAGLEV)?;
        let maglev_mapped = MappedArray::map(&maglev, MAGLEV_ENTRIES);
        if maglev_mapped.is_none() {
            info!("{MAP_MAGLEV} was pinned without BPF_F_MMAPABLE: Maglev tables are written in batches until the pins are recreated");
        }
        let flows = take(&mut ebpf, MAP_FLOWS)?;
        let half_open = take(&mut ebpf, MAP_HALF_OPEN)?;
        let affinity = take(&mut ebpf, MAP_AFFINITY)?;
        let mut dataplane = Self {
            logger: Some(logger),
            route_generation: Some(route_generation),
            close_events: Some(take(&mut ebpf, MAP_EVENTS)?),
            sync_events: Some(take(&mut ebpf, MAP_SYNC)?),
            swept: match ebpf.take_map(MAP_SWEPT) {
                Some(Map::RingBuf(data)) => data,
                _ => bail!("map {MAP_SWEPT} missing from the XDP object, or not a ring"),
            },
            address_filter_map: take(&mut ebpf, MAP_ADDR_FILTER)?,
            // Filled from LB_VIPS below.
            address_filter: Vec::new(),
            services: take(&mut ebpf, MAP_SERVICES)?,
            vips: take(&mut ebpf, MAP_VIPS)?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            maglev,
            maglev_mapped,
            _programs: programs,
            vlans: take(&mut ebpf, MAP_VLANS)?,
            snat: take(&mut ebpf, MAP_SNAT_ADDRS)?,
            settings: take(&mut ebpf, MAP_SETTINGS)?,
            tx_ports: take(&mut ebpf, MAP_TX_PORTS)?,
            source_rules: take(&mut ebpf, MAP_SOURCE_RULES)?,
            reader: TableReader::new(
                &flows,
                &half_open,
                &affinity,
                take(&mut ebpf, MAP_COUNTERS)?,
                take(&mut ebpf, MAP_SERVICE_STATS)?,
                take(&mut ebpf, MAP_BACKEND_STATS)?,
                take(&mut ebpf, MAP_SERVICE_REFUSED)?,
            )?,
            flows,
            half_open,
            affinity,
            ebpf,
            pin_dir,
        };
        dataplane.write_address_filter()?;
        Ok(dataplane)
    }

    /// A garbage collector on a descriptor of its own, for another task.
    pub fn sweeper(&self) -> Result<sweep::Sweeper> {
        let program = self
            .ebpf
            .program(SWEEP_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {SWEEP_PROGRAM_NAME} missing"))?;
        let fd = program.fd()?.as_fd().try_clone_to_owned()?;
        let swept = reopen(&self.swept, Map::RingBuf, MAP_SWEPT)?;
        Ok(sweep::Sweeper::new(fd, swept))
    }

    /// The close events, for the daemon (once).
    pub fn take_close_events(&mut self) -> Option<RingBuf<MapData>> {
        self.close_events.take()
    }

    /// The confirmed flows for the peers, for the sync service (once).
    pub fn take_sync_events(&mut self) -> Option<RingBuf<MapData>> {
        self.sync_events.take()
    }

    /// Write access to the flow and affinity tables on descriptors of its own, for the
    /// sync service to install its peers' state without the daemon's lock.
    pub fn open_peer_tables(&self) -> Result<PeerTables> {
        Ok(PeerTables {
            flows: reopen(self.flows.map(), Map::HashMap, MAP_FLOWS)?,
            affinity: reopen(self.affinity.map(), Map::LruHashMap, MAP_AFFINITY)?,
        })
    }

    /// Removes the flows of `keys` (directions that started closing) whose entry has
    /// expired by `now_ns`, with their other direction if that is closing or expired too;
    /// returns the keys of the entries that went. A flow refreshed meanwhile, or a new one
    /// on the same tuple, stays.
    pub fn remove_closed(&mut self, keys: &[FlowKey], now_ns: u64) -> Result<Vec<FlowKey>> {
        let expired =
            |e: &FlowEntry| !is_fresh(e.last_seen_ns, u64::from(e.timeout_s) * NS_PER_SEC, now_ns);
        let mut removed = Vec::new();
        for key in keys {
            let Ok(entry) = self.flows.get(key, 0) else {
                continue;
            };
            if entry.flags & FLOW_F_CLOSING == 0 || !expired(&entry) {
                continue;
            }
            let other_key = entry.other_direction(key);
            if self.flows.remove(key).is_ok() {
                removed.push(*key);
            }
            // The other direction goes with it once its own timeout has passed too: a
            // server's close holds its direction (the SNAT claim) for the server's
            // TIME_WAIT, and garbage collection removes it after that.
            if let Ok(other) = self.flows.get(&other_key, 0) {
                if expired(&other) && self.flows.remove(&other_key).is_ok() {
                    removed.push(other_key);
                }
            }
        }
        Ok(removed)
    }

    /// The routing generation, for the daemon's rtnetlink watcher (once).
    pub fn take_route_generation(&mut self) -> Option<RouteGeneration> {
        self.route_generation.take()
    }

    /// The reader of the program's log ring, for the daemon to poll (once).
    pub fn take_logger(&mut self) -> Option<DataplaneLogger> {
        self.logger.take()
    }

    pub fn program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing"))?
            .try_into()?)
    }

    fn program_mut(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing"))?
            .try_into()?)
    }

    /// Attaches to `iface` and registers it as a redirect target. Returns how.
    ///
    /// With pinning, the attachment is a pinned bpf_link: it outlives this daemon, so a
    /// crash or restart does not stop the data plane. A link pinned by a previous daemon is
    /// adopted by swapping our program into it atomically (no packet goes unbalanced).
    pub fn attach(&mut self, iface: &str, mode: XdpModeConfig) -> Result<&'static str> {
        let ifindex = ifindex(iface)?;
        let link_pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link_{iface}")));
        let how = match &link_pin {
            Some(pin) if pin.exists() => match self.adopt_link(pin) {
                Ok(()) => "adopted",
                Err(e) => {
                    // The interface was recreated or the link is otherwise dead.
                    warn!(%iface, error = %format!("{e:#}"), "pinned link not usable; attaching afresh");
                    std::fs::remove_file(pin)
                        .with_context(|| format!("remove {}", pin.display()))?;
                    self.attach_new(iface, mode, link_pin.as_deref())?
                }
            },
            _ => self.attach_new(iface, mode, link_pin.as_deref())?,
        };
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("register {iface} as a redirect target"))?;
        info!(%iface, ifindex, how, "XDP program attached");
        Ok(how)
    }

    fn attach_in(&mut self, iface: &str, mode: XdpMode, name: &str) -> Result<XdpLinkId> {
        self.program_mut()?
            .attach(iface, mode)
            .with_context(|| format!("attach to {iface} in {name} mode"))
    }

    fn adopt_link(&mut self, pin: &Path) -> Result<()> {
        let pinned = PinnedLink::from_pin(pin).context("open pinned link")?;
        let link = XdpLink::try_from(FdLink::from(pinned)).context("not an XDP link")?;
        self.program_mut()?
            .attach_to_link(link)
            .context("swap program into the pinned link")?;
        Ok(())
    }

    fn attach_new(
        &mut self,
        iface: &str,
        mode: XdpModeConfig,
        pin: Option<&Path>,
    ) -> Result<&'static str> {
        let (id, how) = match mode {
            XdpModeConfig::Driver => (self.attach_in(iface, XdpMode::Driver, "driver")?, "driver"),
            XdpModeConfig::Generic => (self.attach_in(iface, XdpMode::Skb, "generic")?, "generic"),
            XdpModeConfig::Auto => match self.attach_in(iface, XdpMode::Driver, "driver") {
                Ok(id) => (id, "driver"),
                Err(e) => {
                    warn!(%iface, error = %format!("{e:#}"), "driver-mode XDP failed, falling back to generic mode");
                    (self.attach_in(iface, XdpMode::Skb, "generic")?, "generic")
                }
            },
        };
        if let Some(pin) = pin {
            let link = self.program_mut()?.take_link(id)?;
            FdLink::try_from(link)
                .context("kernel gave no bpf_link for XDP (needs Linux 5.9+)")?
                .pin(pin)
                .with_context(|| format!("pin link at {}", pin.display()))?;
        }
        Ok(how)
    }

    pub fn set_settings(&mut self, settings: Settings) -> Result<()> {
        self.settings.set(0, settings, 0).context("write settings")
    }

    /// Writes the SNAT addresses, IPv4 from slot 0 and IPv6 from `SNAT_V6_BASE`, in the
    /// order given; `Settings` says how many of each are valid.
    pub fn set_snat_addresses(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let v4 = addrs.iter().filter(|a| a.is_ipv4());
        let v6 = addrs.iter().filter(|a| a.is_ipv6());
        for (slot, addr) in (0..).zip(v4).chain((SNAT_V6_BASE..).zip(v6)) {
            self.snat
                .set(slot, addr_words(*addr), 0)
                .context("write SNAT address")?;
        }
        Ok(())
    }

    /// Replaces the VLAN devices the data plane tags for (ifindex -> lower device, VLAN id).
    pub fn set_vlans(&mut self, vlans: &[(u32, VlanPort)]) -> Result<()> {
        let stale: Vec<u32> = self
            .vlans
            .keys()
            .filter_map(Result::ok)
            .filter(|ifindex| !vlans.iter().any(|(i, _)| i == ifindex))
            .collect();
        for ifindex in stale {
            self.vlans.remove(&ifindex).context("remove VLAN device")?;
        }
        for (ifindex, port) in vlans {
            self.vlans
                .insert(ifindex, port, 0)
                .context("write VLAN device")?;
        }
        Ok(())
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("write backend {id}"))
    }

    /// Writes one half of a service's Maglev table; the half must not be live.
    pub fn write_maglev(&mut self, service_id: u32, half: u32, table: &[u32]) -> Result<()> {
        anyhow::ensure!(
            table.len() == MAGLEV_SIZE as usize,
            "Maglev table has the wrong size"
        );
        // A half is one run of slots (`maglev_index`).
        let start = maglev_index(service_id, half, 0);
        if let Some(mapped) = &mut self.maglev_mapped {
            anyhow::ensure!(mapped.write(start, table), "Maglev table beyond its map");
            // The kernel's view of three slots, through the syscall: a mapping that does
            // not show the map as the kernel lays it out is dropped, never trusted.
            let last = table.len() - 1;
            let agrees = [0, last / 2, last]
                .iter()
                .all(|&slot| self.maglev.get(&(start + slot as u32), 0).ok() == Some(table[slot]));
            if agrees {
                return Ok(());
            }
            warn!("the mapped {MAP_MAGLEV} disagrees with the kernel's view: writing tables in batches from now on");
            self.maglev_mapped = None;
        }
        batch::write_array(&self.maglev, start, table).context("write Maglev table")
    }

    /// Are Maglev tables written through the mapping (not in batches)?
    pub fn maglev_is_mapped(&self) -> bool {
        self.maglev_mapped.is_some()
    }

    /// One half of a service's Maglev table as the data plane holds it: read through the
    /// kernel (`lb maglev` is rare), so it shows what the programs see, whatever was
    /// written through the mapping.
    pub fn read_maglev(&self, service_id: u32, half: u32) -> Result<Vec<u32>> {
        batch::read_array(&self.maglev, maglev_index(service_id, half, 0), MAGLEV_SIZE)
            .context("read Maglev table")
    }

    pub fn set_service(&mut self, key: ServiceKey, service: Service) -> Result<()> {
        self.services
            .insert(key, service, 0)
            .context("write service")
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services.remove(key).context("remove service")
    }

    /// Service `service_id`'s rule for clients in `prefix` (`SOURCE_ALLOW` or `SOURCE_DENY`).
    pub fn set_source_rule(
        &mut self,
        service_id: u32,
        prefix: SourcePrefix,
        action: u32,
    ) -> Result<()> {
        self.source_rules
            .insert(&source_rule_key(service_id, prefix), action, 0)
            .with_context(|| format!("write source rule {prefix} of service {service_id}"))
    }

    pub fn remove_source_rule(&mut self, service_id: u32, prefix: SourcePrefix) -> Result<()> {
        self.source_rules
            .remove(&source_rule_key(service_id, prefix))
            .with_context(|| format!("remove source rule {prefix} of service {service_id}"))
    }

    /// Every rule in `LB_SOURCE_RULES`: (service id, prefix) -> action.
    pub fn installed_source_rules(&self) -> BTreeMap<(u32, SourcePrefix), u32> {
        self.source_rules
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, action)| {
                let data = key.data();
                let bits = key.prefix_len().checked_sub(SOURCE_RULE_HEADER_BITS)?;
                let addr = addr_from_words(data.addr_be, data.family as u8);
                let prefix = SourcePrefix::new(addr, u8::try_from(bits).ok()?)?;
                Some(((data.service_id, prefix), action))
            })
            .collect()
    }

    /// Records an address lb answers for (a VIP, a SNAT address, or both). A new address
    /// enters the filter first, so no packet for it is passed over meanwhile.
    pub fn set_address(&mut self, addr: IpAddr, info: VipInfo) -> Result<()> {
        let key = vip_key(addr);
        if self.vips.get(&key, 0).is_err() {
            self.count_in_filter(addr, 1)?;
        }
        self.vips.insert(key, info, 0).context("write LB_VIPS")
    }

    pub fn remove_address(&mut self, addr: IpAddr) -> Result<()> {
        self.vips
            .remove(&vip_key(addr))
            .context("remove from LB_VIPS")?;
        self.count_in_filter(addr, -1)
    }

    /// Writes every `LB_ADDR_FILTER` slot from the addresses in `LB_VIPS` (at load: a
    /// pinned filter may hold anything).
    fn write_address_filter(&mut self) -> Result<()> {
        self.address_filter = address_filter(&self.addresses());
        for (slot, &count) in self.address_filter.iter().enumerate() {
            self.address_filter_map
                .set(slot as u32, count, 0)
                .context("write LB_ADDR_FILTER")?;
        }
        Ok(())
    }

    /// Adds `delta` to the count of `addr`'s filter slot.
    fn count_in_filter(&mut self, addr: IpAddr, delta: i32) -> Result<()> {
        let slot = lb_common::hash::address_slot(&addr_words(addr));
        let count = &mut self.address_filter[slot as usize];
        *count = count.saturating_add_signed(delta);
        self.address_filter_map
            .set(slot, *count, 0)
            .context("write LB_ADDR_FILTER")
    }

    /// The addresses in `LB_VIPS` (adopted from a previous daemon, or written by this one).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.vips
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| addr_from_words(k.addr_be, k.family))
            .collect()
    }

    /// The tables and counters, read-only (see `TableReader`).
    pub fn reader(&self) -> &TableReader {
        &self.reader
    }

    /// A reader of its own, for another task.
    pub fn open_reader(&self) -> Result<TableReader> {
        self.reader.reopen()
    }

    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        self.reader.counters()
    }

    pub fn service_stats(&self, id: u32) -> Result<TrafficStats> {
        self.reader.service_stats(id)
    }

    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats> {
        self.reader.backend_stats(id)
    }

    /// Affinity entries (expired ones included: the caller knows the timeouts).
    pub fn affinities(&self) -> impl Iterator<Item = (AffinityKey, AffinityEntry)> + '_ {
        self.reader.affinities()
    }

    /// Confirmed flow entries, both directions.
    pub fn flows(&self) -> impl Iterator<Item = (FlowKey, FlowEntry)> + '_ {
        self.reader.flows()
    }

    /// Half-open flow entries (not yet confirmed), both directions.
    pub fn half_open(&self) -> impl Iterator<Item = (FlowKey, FlowEntry)> + '_ {
        entries(&self.half_open, MAP_HALF_OPEN).into_iter()
    }

    /// Removes every affinity entry matching `remove`, in one walk of the table.
    pub fn remove_affinities(
        &mut self,
        remove: impl Fn(&AffinityKey, &AffinityEntry) -> bool,
    ) -> Result<Removal> {
        let selection = self.reader.select_affinities(remove)?;
        self.delete_affinities(&selection)
    }

    fn delete_affinities(&mut self, selection: &Selection<AffinityKey>) -> Result<Removal> {
        delete_selected(&mut self.affinity, selection).context("LB_AFFINITY")
    }

    fn delete_flows(&mut self, selection: &Selection<FlowKey>) -> Result<Removal> {
        delete_selected(&mut self.flows, selection).context("LB_FLOWS")
    }

    fn delete_half_open(&mut self, selection: &Selection<FlowKey>) -> Result<Removal> {
        delete_selected(&mut self.half_open, selection).context("LB_HALF_OPEN")
    }

    /// Removes every confirmed flow entry (both directions) matching `remove`, in one walk
    /// of the table.
    pub fn remove_flows(
        &mut self,
        remove: impl Fn(&FlowKey, &FlowEntry) -> bool,
    ) -> Result<Removal> {
        let selection = self.reader.select_flows(remove)?;
        self.delete_flows(&selection)
    }

    /// Removes every half-open entry matching `remove` (the LRU bounds them anyway; this is
    /// for GC and for resetting a failed server's flows).
    pub fn remove_half_open(
        &mut self,
        remove: impl Fn(&FlowKey, &FlowEntry) -> bool,
    ) -> Result<Removal> {
        let selection = self.reader.select_half_open(remove)?;
        self.delete_half_open(&selection)
    }

    /// Services currently in the data plane (for adopting a running one).
    pub fn installed_services(&self) -> Vec<(ServiceKey, Service)> {
        self.services.iter().filter_map(Result::ok).collect()
    }

    /// Backend slots currently in use (for adopting a running data plane).
    pub fn installed_backends(&self) -> Result<Vec<(u32, Backend)>> {
        let mut found = Vec::new();
        for id in 0..MAX_BACKENDS {
            let b = self.backends.get(&id, 0).context("read backends")?;
            if b.flags & lb_common::BACKEND_F_CONFIGURED != 0 {
                found.push((id, b));
            }
        }
        Ok(found)
    }
}

pub fn ifindex(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface).context("interface name contains NUL")?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(anyhow!(
            "interface {iface:?} not found: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(index)
}

/// Monotonic clock in the data plane's unit (`bpf_ktime_get_ns` is CLOCK_MONOTONIC).
/// A record of a ring buffer (`LB_EVENTS`, `LB_SYNC`) as its plain-old-data type; None
/// for a record too short to be one.
pub fn ring_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>())
        // SAFETY: T is plain old data (any bytes are a value) and `bytes` holds at least
        // one; the read is unaligned-safe.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NS_PER_SEC + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use lb_common::MAPS;

    use super::*;

    /// The registry (`lb_common::MAPS`) names exactly the object's maps: a map it missed
    /// would be neither pinned nor adopted, and lose its contents on every restart.
    #[test]
    fn the_map_registry_names_every_map_of_the_object() {
        let object = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        let in_object: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            // Sections (.rodata, .bss) the loader makes maps of, not lb's own.
            .filter(|name| !name.starts_with('.'))
            .collect();
        let registered: BTreeSet<&str> = MAPS.iter().map(|m| m.name).collect();
        assert_eq!(registered.len(), MAPS.len(), "a map is registered twice");
        assert_eq!(in_object, registered);
        assert!(pinned_maps().all(|name| in_object.contains(name)));
        assert!(pinned_maps().any(|name| name == MAP_FLOWS));
    }

    #[test]
    fn pins_of_another_layout_are_refused() {
        let dir = std::env::temp_dir().join(format!("lb-pins-{}", std::process::id()));
        let ours = versioned_pin_dir(&dir).unwrap();
        assert!(ours.ends_with(format!("v{LAYOUT_VERSION}")));
        // Our own version again: adopted, not refused.
        assert_eq!(versioned_pin_dir(&dir).unwrap(), ours);
        std::fs::create_dir_all(dir.join("v0")).unwrap();
        let err = format!("{:#}", versioned_pin_dir(&dir).unwrap_err());
        assert!(
            err.contains("layout v0") && err.contains("lb detach"),
            "{err}"
        );
        remove_pins(&dir).unwrap();
        assert!(!dir.exists());
    }
}
