//! The servers behind each service as they are now (config file + runtime changes + health)
//! and how that becomes data-plane state.
//!
//! Service and backend ids are stable (keyed by service name and server address:port) and
//! survive reloads and restarts: affinity entries refer to backend ids, so renumbering would
//! send clients to the wrong server. Maglev tables are written into the idle half and made
//! live by one update of the service entry, so no packet sees a half-written table.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Result};
use lb_common::{
    hash, is_fresh, Backend, Counter, FlowEntry, FlowKey, Service, ServiceKey, Settings, VipInfo,
    ADDR_F_SNAT, AFFINITY_NONE, AFFINITY_SOURCE, AFFINITY_SOURCE_PORT, BACKEND_F_CONFIGURED,
    BACKEND_F_DOWN, BACKEND_F_DRAINING, FLOW_F_REVERSE, MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES,
    NS_PER_SEC, SETTINGS_F_DEBUG_LOG, SETTINGS_F_ECHO_REPLY,
};
use tracing::{info, warn};

use crate::{
    api::{
        endpoint, AffinityRecord, BackendStatus, MaglevTable, ServiceStatus, SourceShare,
        StatusReport, TableFill, TableReport, EMPTY_SLOT,
    },
    config::{family, Affinity, BackendConfig, Config, OnDown, ServiceConfig, MAX_WEIGHT},
    dataplane::{addr_from_words, addr_words, monotonic_ns, Dataplane},
    health, maglev,
    runtime::{Drain, EffectiveBackend, Overlay},
};

/// Fill level at which a table counts as nearly full.
const NEARLY_FULL: f64 = 0.9;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct BackendIdentity {
    service: String,
    address: IpAddr,
    port: u16,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct Pool {
    config: Config,
    overlay: Overlay,
    /// Where `overlay` is persisted; `None` keeps it in memory only.
    state_path: Option<PathBuf>,
    /// Servers that failed their health checks, by (service, address).
    down: BTreeSet<(String, IpAddr)>,
    /// The last health-check result per server (summary, latency if it passed).
    last_check: BTreeMap<(String, IpAddr), (String, Option<f64>)>,
    /// Table fill levels seen by the last garbage collection.
    tables: TableReport,
    service_ids: BTreeMap<String, u32>,
    backend_ids: BTreeMap<BackendIdentity, u32>,
    /// Live Maglev half per service id.
    live_half: BTreeMap<u32, u32>,
    /// Service keys currently in the data plane, by name, for removal on reload.
    installed: BTreeMap<String, Vec<ServiceKey>>,
    /// Addresses currently in `LB_VIPS` (VIPs and SNAT addresses).
    addresses: BTreeSet<IpAddr>,
    /// Data-plane debug logging (`lb debug on|off`). Deliberately not persisted: a restart
    /// returns to the quiet default.
    debug_log: bool,
    /// Last seen value of each counter that `watch_counters` raises alarms for.
    alarms_seen: BTreeMap<&'static str, u64>,
}

/// A client with at least this share of a service's new flows (among live affinities) is
/// "hot": probably a reverse proxy or NAT carrying many users (the mega-proxy case).
pub const HOT_SOURCE_SHARE: f64 = 0.2;
/// ... once the service has seen at least this many new flows from live affinities.
pub const HOT_SOURCE_MIN_FLOWS: u64 = 100;
/// Clients listed per service in `lb status`.
pub const TOP_SOURCES: usize = 5;

/// Counters that mean new connections are being refused, with what the operator should do.
const ALARM_COUNTERS: [(Counter, &str); 3] = [
    (Counter::DropSnatExhausted, "SNAT ports exhausted: new flows refused, existing ones unaffected; add daemon.snat_addresses or widen snat_port_min..snat_port_max"),
    (Counter::FlowTableFull, "flow table full: confirmed flows stay half-open and end at the handshake timeout; raise daemon.max_flows"),
    (Counter::DropFlowInsert, "half-open table refused an insert: new flows refused; raise daemon.max_half_open"),
];
fn lowest_free(used: impl Iterator<Item = u32>, limit: u32) -> Option<u32> {
    let used: BTreeSet<u32> = used.collect();
    (0..limit).find(|id| !used.contains(id))
}

/// One data-plane key per VIP port of the service.
fn service_keys(s: &ServiceConfig) -> Vec<ServiceKey> {
    s.ports()
        .into_iter()
        .map(|port| ServiceKey {
            vip_be: addr_words(s.vip),
            port_be: port.to_be(),
            proto: s.protocol.number(),
            family: family(s.vip),
        })
        .collect()
}

fn affinity_mode(a: Affinity) -> u32 {
    match a {
        Affinity::None => AFFINITY_NONE,
        Affinity::Source => AFFINITY_SOURCE,
        Affinity::SourcePort => AFFINITY_SOURCE_PORT,
    }
}

/// A stable identity for Maglev: address and port, independent of config order and node.
/// IPv6 addresses are folded with FNV-1a, which is fixed (unlike std's hasher).
fn maglev_identity(address: IpAddr, port: u16) -> u64 {
    match address {
        IpAddr::V4(a) => (u64::from(u32::from(a)) << 16) | u64::from(port),
        IpAddr::V6(a) => hash::fnv1a(
            hash::FNV1A_BASIS,
            a.octets().into_iter().chain(port.to_be_bytes()),
        ),
    }
}

impl Pool {
    pub fn new(config: Config, overlay: Overlay, state_path: Option<PathBuf>) -> Self {
        Self {
            config,
            overlay,
            state_path,
            down: BTreeSet::new(),
            last_check: BTreeMap::new(),
            tables: TableReport::default(),
            service_ids: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            live_half: BTreeMap::new(),
            installed: BTreeMap::new(),
            addresses: BTreeSet::new(),
            debug_log: false,
            alarms_seen: BTreeMap::new(),
        }
    }

    /// Logs a warning whenever a counter in `ALARM_COUNTERS` has grown since the last call
    /// (called every second): the operator sees refused connections in the log, not only
    /// in `lb status`.
    pub fn watch_counters(&mut self, dp: &Dataplane) -> Result<()> {
        let counters = dp.counters()?;
        for (counter, advice) in ALARM_COUNTERS {
            let now = counters
                .iter()
                .find(|(c, _)| *c == counter)
                .map_or(0, |(_, v)| *v);
            let before = self.alarms_seen.insert(counter.name(), now);
            // The first reading (and a data plane restarted from zero) only sets the baseline.
            if let Some(before) = before.filter(|b| now > *b) {
                warn!(
                    counter = counter.name(),
                    new = now - before,
                    total = now,
                    "{advice}"
                );
            }
        }
        Ok(())
    }

    /// The VIPs this node should announce: none while the node is drained; otherwise each
    /// VIP with at least one server taking new clients (up, not draining, weight above 0).
    pub fn announceable_vips(&self) -> BTreeSet<IpAddr> {
        if self.overlay.node_drained {
            return BTreeSet::new();
        }
        self.config
            .services
            .iter()
            .filter(|s| {
                self.backends(&s.name).iter().any(|b| {
                    b.drain.is_none()
                        && b.weight > 0
                        && !self.down.contains(&(s.name.clone(), b.address))
                })
            })
            .map(|s| s.vip)
            .collect()
    }

    pub fn node_drained(&self) -> bool {
        self.overlay.node_drained
    }

    /// `lb node drain` / `undrain`: persisted like every runtime change.
    pub fn set_node_drained(&mut self, drained: bool) -> Result<()> {
        self.overlay.node_drained = drained;
        self.persist()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Affinity timeout per installed service id, in nanoseconds.
    fn affinity_timeouts_ns(&self) -> BTreeMap<u32, u64> {
        self.config
            .services
            .iter()
            .filter_map(|s| {
                Some((
                    *self.service_ids.get(&s.name)?,
                    u64::from(s.affinity_timeout) * NS_PER_SEC,
                ))
            })
            .collect()
    }

    /// Takes over the ids and table halves of a data plane a previous daemon left running,
    /// so its flows and affinities keep their meaning.
    pub fn adopt(&mut self, dp: &Dataplane) -> Result<()> {
        // So that addresses the config no longer has are removed by the first sync.
        self.addresses = dp.addresses().into_iter().collect();
        let installed = dp.installed_services();
        let mut names_by_id = BTreeMap::new();
        for s in &self.config.services {
            let keys = service_keys(s);
            if let Some((_, svc)) = installed.iter().find(|(k, _)| keys.contains(k)) {
                self.service_ids.insert(s.name.clone(), svc.id);
                self.live_half.insert(svc.id, svc.table_half);
                let adopted = installed
                    .iter()
                    .filter(|(_, other)| other.id == svc.id)
                    .map(|(k, _)| *k)
                    .collect();
                self.installed.insert(s.name.clone(), adopted);
                names_by_id.insert(svc.id, s.name.clone());
            }
        }
        for (id, b) in dp.installed_backends()? {
            if let Some(service) = names_by_id.get(&b.service_id) {
                let identity = BackendIdentity {
                    service: service.clone(),
                    address: addr_from_words(b.addr_be, b.family),
                    port: u16::from_be(b.port_be),
                };
                self.backend_ids.insert(identity, id);
            }
        }
        if !self.service_ids.is_empty() {
            info!(
                services = self.service_ids.len(),
                backends = self.backend_ids.len(),
                "adopted the running data plane"
            );
        }
        Ok(())
    }

    /// Replaces the config (reload); runtime changes for services that still exist stay.
    pub fn set_config(&mut self, config: Config) {
        self.overlay.retain_services(&config);
        self.config = config;
    }

    fn service(&self, name: &str) -> Result<&ServiceConfig> {
        self.config
            .services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .config
                    .services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                anyhow!("unknown service {name:?} (known: {})", known.join(", "))
            })
    }

    pub fn backends(&self, service: &str) -> Vec<EffectiveBackend> {
        self.overlay.backends(&self.config, service)
    }

    fn backend(&self, service: &str, address: IpAddr) -> Result<EffectiveBackend> {
        self.service(service)?;
        self.backends(service)
            .into_iter()
            .find(|b| b.address == address)
            .ok_or_else(|| anyhow!("service {service:?} has no backend {address}"))
    }

    fn persist(&self) -> Result<()> {
        match &self.state_path {
            Some(path) => self.overlay.save(path),
            None => Ok(()),
        }
    }

    /// Makes the data plane match the effective state. Existing flows are untouched: flow
    /// entries carry their own rewrite, so even a removed server's open connections work.
    pub fn sync(&mut self, dp: &mut Dataplane) -> Result<()> {
        dp.set_snat_addresses(&self.config.daemon.snat_addresses)?;
        self.write_settings(dp)?;

        // Ids first, so running out (table full) leaves the data plane as it was.
        let wanted_services: BTreeSet<String> = self
            .config
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        self.service_ids
            .retain(|name, _| wanted_services.contains(name));
        let mut wanted_backends = BTreeSet::new();
        for s in &self.config.services {
            if !self.service_ids.contains_key(&s.name) {
                let id = lowest_free(self.service_ids.values().copied(), MAX_SERVICES)
                    .ok_or_else(|| anyhow!("more than {MAX_SERVICES} services"))?;
                self.service_ids.insert(s.name.clone(), id);
            }
            for b in self.backends(&s.name) {
                wanted_backends.insert(BackendIdentity {
                    service: s.name.clone(),
                    address: b.address,
                    port: b.port,
                });
            }
        }
        let removed: Vec<u32> = self
            .backend_ids
            .iter()
            .filter(|(identity, _)| !wanted_backends.contains(*identity))
            .map(|(_, id)| *id)
            .collect();
        self.backend_ids
            .retain(|identity, _| wanted_backends.contains(identity));
        for identity in wanted_backends {
            if !self.backend_ids.contains_key(&identity) {
                let id = lowest_free(self.backend_ids.values().copied(), MAX_BACKENDS)
                    .ok_or_else(|| anyhow!("more than {MAX_BACKENDS} backends"))?;
                self.backend_ids.insert(identity, id);
            }
        }
        for id in removed {
            // Affinities pointing at it become invalid; its open flows keep their rewrite.
            dp.set_backend(id, Backend::default())?;
        }

        let services = self.config.services.clone();
        for s in &services {
            self.install_service(dp, s)?;
        }
        let stale: Vec<String> = self
            .installed
            .keys()
            .filter(|name| !wanted_services.contains(*name))
            .cloned()
            .collect();
        for name in stale {
            for key in self.installed.remove(&name).unwrap_or_default() {
                dp.remove_service(&key)?;
            }
        }
        let live_ids: BTreeSet<u32> = self.service_ids.values().copied().collect();
        self.live_half.retain(|id, _| live_ids.contains(id));
        self.sync_addresses(dp)
    }

    fn install_service(&mut self, dp: &mut Dataplane, s: &ServiceConfig) -> Result<()> {
        let service_id = self.service_ids[&s.name];
        let mut members = Vec::new();
        for b in self.backends(&s.name) {
            let id = self.backend_id(&s.name, b.address, b.port)?;
            let down = self.down.contains(&(s.name.clone(), b.address));
            let mut flags = BACKEND_F_CONFIGURED;
            if b.drain.is_some() {
                flags |= BACKEND_F_DRAINING;
            }
            if down {
                flags |= BACKEND_F_DOWN;
            }
            dp.set_backend(
                id,
                Backend {
                    addr_be: addr_words(b.address),
                    port_be: b.port.to_be(),
                    family: family(b.address),
                    _pad: 0,
                    flags,
                    service_id,
                },
            )?;
            let takes_new_clients = b.drain.is_none() && !down;
            members.push(maglev::Member {
                id,
                identity: maglev_identity(b.address, b.port),
                weight: if takes_new_clients { b.weight } else { 0 },
            });
        }
        let table = maglev::build(&members, MAGLEV_SIZE, s.seed);
        let keys = service_keys(s);
        // Ports (or a VIP) the service no longer has.
        for old in self.installed.get(&s.name).into_iter().flatten() {
            if !keys.contains(old) {
                dp.remove_service(old)?;
            }
        }
        let half = self.live_half.get(&service_id).map_or(0, |h| h ^ 1);
        dp.write_maglev(service_id, half, &table)?;
        let service = Service {
            id: service_id,
            affinity_mode: affinity_mode(s.affinity),
            affinity_timeout_s: s.affinity_timeout,
            idle_timeout_s: s.idle_timeout,
            table_half: half,
            _pad: 0,
        };
        for key in &keys {
            dp.set_service(*key, service)?;
        }
        self.live_half.insert(service_id, half);
        self.installed.insert(s.name.clone(), keys);
        Ok(())
    }

    /// Makes `LB_VIPS` hold exactly the VIPs (with their service counts) and the SNAT
    /// addresses: the data plane passes traffic to any other address after one lookup.
    fn sync_addresses(&mut self, dp: &mut Dataplane) -> Result<()> {
        let mut wanted: BTreeMap<IpAddr, VipInfo> = BTreeMap::new();
        for s in &self.config.services {
            wanted.entry(s.vip).or_default().services += 1;
        }
        for snat in &self.config.daemon.snat_addresses {
            wanted.entry(*snat).or_default().flags |= ADDR_F_SNAT;
        }
        for old in &self.addresses {
            if !wanted.contains_key(old) {
                dp.remove_address(*old)?;
            }
        }
        for (address, info) in &wanted {
            dp.set_address(*address, *info)?;
        }
        self.addresses = wanted.into_keys().collect();
        Ok(())
    }

    fn backend_id(&self, service: &str, address: IpAddr, port: u16) -> Result<u32> {
        let identity = BackendIdentity {
            service: service.into(),
            address,
            port,
        };
        self.backend_ids
            .get(&identity)
            .copied()
            .ok_or_else(|| anyhow!("backend {address}:{port} of {service} has no id"))
    }

    fn id_of(&self, service: &str, address: IpAddr) -> Result<u32> {
        let b = self.backend(service, address)?;
        self.backend_id(service, address, b.port)
    }

    // --- runtime changes (each persisted, then applied) ---

    pub fn add_backend(
        &mut self,
        dp: &mut Dataplane,
        service: &str,
        address: IpAddr,
        port: Option<u16>,
        weight: Option<u32>,
    ) -> Result<()> {
        self.service(service)?;
        if self.backends(service).iter().any(|b| b.address == address) {
            bail!("service {service:?} already has backend {address}");
        }
        let svc = self.service(service)?;
        if port.is_some() && svc.backend_port().is_none() {
            bail!("service {service:?} has several ports; each connection goes to the port it asked for, so a server takes no port");
        }
        let vip = svc.vip;
        if address.is_ipv6() != vip.is_ipv6() {
            bail!("backend {address} is not of the VIP's address family ({vip}): lb translates v4 -> v4 and v6 -> v6 only");
        }
        let weight = weight.unwrap_or(1);
        if weight > MAX_WEIGHT || port == Some(0) {
            bail!("weight must be 0..={MAX_WEIGHT} and port non-zero");
        }
        let o = self.overlay.service_mut(service);
        o.removed.remove(&address);
        o.weights.remove(&address);
        o.added.insert(
            address,
            BackendConfig {
                address,
                port,
                weight,
            },
        );
        self.commit(dp, format_args!("backend {address} added to {service}"))
    }

    pub fn remove_backend(
        &mut self,
        dp: &mut Dataplane,
        service: &str,
        address: IpAddr,
    ) -> Result<()> {
        self.backend(service, address)?;
        let o = self.overlay.service_mut(service);
        if o.added.remove(&address).is_none() {
            o.removed.insert(address);
        }
        o.weights.remove(&address);
        o.draining.remove(&address);
        self.commit(dp, format_args!("backend {address} removed from {service}"))
    }

    pub fn drain(
        &mut self,
        dp: &mut Dataplane,
        service: &str,
        address: IpAddr,
        deadline_s: Option<u64>,
    ) -> Result<()> {
        self.backend(service, address)?;
        let drain = Drain {
            deadline_unix: deadline_s.map(|d| unix_now() + d),
            cut: false,
        };
        self.overlay
            .service_mut(service)
            .draining
            .insert(address, drain);
        self.commit(
            dp,
            format_args!("backend {address} of {service} draining (deadline {deadline_s:?} s)"),
        )
    }

    pub fn undrain(&mut self, dp: &mut Dataplane, service: &str, address: IpAddr) -> Result<()> {
        self.backend(service, address)?;
        if self
            .overlay
            .service_mut(service)
            .draining
            .remove(&address)
            .is_none()
        {
            bail!("backend {address} of {service:?} is not draining");
        }
        self.commit(
            dp,
            format_args!("backend {address} of {service} takes new clients again"),
        )
    }

    pub fn set_weight(
        &mut self,
        dp: &mut Dataplane,
        service: &str,
        address: IpAddr,
        weight: u32,
    ) -> Result<()> {
        self.backend(service, address)?;
        if weight > MAX_WEIGHT {
            bail!("weight must be 0..={MAX_WEIGHT}");
        }
        self.overlay
            .service_mut(service)
            .weights
            .insert(address, weight);
        self.commit(
            dp,
            format_args!("backend {address} of {service} weight {weight}"),
        )
    }

    fn commit(&mut self, dp: &mut Dataplane, what: std::fmt::Arguments<'_>) -> Result<()> {
        self.persist()?;
        self.sync(dp)?;
        info!("{what}");
        Ok(())
    }

    /// What the health checker should be checking now.
    pub fn health_targets(&mut self) -> Vec<health::Target> {
        let mut targets = Vec::new();
        for s in &self.config.services {
            let Some(h) = &s.health else { continue };
            for b in self.backends(&s.name) {
                targets.push(health::Target {
                    service: s.name.clone(),
                    address: b.address,
                    port: s.health_port(b.port),
                    config: h.clone(),
                });
            }
        }
        // Forget health state of servers that are no longer checked.
        let checked: BTreeSet<(String, IpAddr)> = targets
            .iter()
            .map(|t| (t.service.clone(), t.address))
            .collect();
        self.down.retain(|k| checked.contains(k));
        self.last_check.retain(|k, _| checked.contains(k));
        targets
    }

    /// Applies one health-check result: a state change goes to the data plane at once.
    pub fn record_check(&mut self, dp: &mut Dataplane, report: &health::Report) -> Result<()> {
        let key = (report.service.clone(), report.address);
        let (summary, latency_ms) = match &report.result {
            Ok(latency) => {
                let ms = latency.as_secs_f64() * 1000.0;
                (format!("ok in {ms:.1} ms"), Some(ms))
            }
            Err(reason) => (format!("failed: {reason}"), None),
        };
        self.last_check
            .insert(key.clone(), (summary.clone(), latency_ms));
        let Some(up) = report.transition else {
            return Ok(());
        };
        let reason = summary;
        let changed = if up {
            self.down.remove(&key)
        } else {
            self.down.insert(key)
        };
        if !changed {
            return Ok(());
        }
        self.sync(dp)?;
        let (service, address) = (&report.service, report.address);
        if up {
            info!(%service, %address, %reason, "server up: back in selection");
        } else {
            warn!(%service, %address, %reason, "server down: out of selection");
            let reset = self
                .service(service)?
                .health
                .as_ref()
                .is_some_and(|h| h.on_down == OnDown::Reset);
            if reset {
                let id = self.id_of(service, address)?;
                let flows = dp.remove_flows(|_, e| e.backend_id == id)?.removed
                    + dp.remove_half_open(|_, e| e.backend_id == id)?.removed;
                warn!(%service, %address, flows, "on_down = reset: its connections were dropped");
            }
        }
        Ok(())
    }

    /// Cuts drains whose deadline has passed: their remaining flows and affinities go.
    pub fn expire_drains(&mut self, dp: &mut Dataplane, now_unix: u64) -> Result<()> {
        let mut due = Vec::new();
        for (service, o) in &self.overlay.services {
            for (address, drain) in &o.draining {
                if !drain.cut && drain.deadline_unix.is_some_and(|d| d <= now_unix) {
                    due.push((service.clone(), *address));
                }
            }
        }
        for (service, address) in due {
            let id = self.id_of(&service, address)?;
            let flows = dp.remove_flows(|_, e| e.backend_id == id)?.removed
                + dp.remove_half_open(|_, e| e.backend_id == id)?.removed;
            let affinities = dp.remove_affinities(|_, e| e.backend_id == id)?.removed;
            if let Some(drain) = self
                .overlay
                .service_mut(&service)
                .draining
                .get_mut(&address)
            {
                drain.cut = true;
            }
            self.persist()?;
            info!(%service, %address, flows, affinities, "drain deadline passed: remaining flows and affinities cut");
        }
        Ok(())
    }

    /// Deletes expired flow and affinity entries (the data plane already ignores them; this
    /// frees their slots and SNAT ports) and records how full the tables are. A table above
    /// `NEARLY_FULL` is logged: the LRU then evicts live entries.
    pub fn collect_garbage(&mut self, dp: &mut Dataplane) -> Result<()> {
        let now = monotonic_ns();
        let expired = |_: &FlowKey, e: &FlowEntry| {
            !is_fresh(e.last_seen_ns, u64::from(e.timeout_s) * NS_PER_SEC, now)
        };
        let flows = dp.remove_flows(expired)?;
        let half_open = dp.remove_half_open(expired)?;
        let timeouts = self.affinity_timeouts_ns();
        // Entries of services that no longer exist are garbage too.
        let affinities = dp.remove_affinities(|k, e| {
            timeouts
                .get(&k.service_id)
                .is_none_or(|t| !is_fresh(e.last_seen_ns, *t, now))
        })?;
        let d = &self.config.daemon;
        let previous = self.tables;
        let mut tables = TableReport {
            flows: TableFill {
                entries: flows.kept as u64,
                capacity: u64::from(d.max_flows),
            },
            half_open: TableFill {
                entries: half_open.kept as u64,
                capacity: u64::from(d.max_half_open),
            },
            affinities: TableFill {
                entries: affinities.kept as u64,
                capacity: u64::from(d.max_affinities),
            },
            gc_passes_nearly_full: previous.gc_passes_nearly_full,
            collected_flows: previous.collected_flows
                + flows.removed as u64
                + half_open.removed as u64,
            collected_affinities: previous.collected_affinities + affinities.removed as u64,
        };
        // The half-open table is left out: under a SYN flood it is full by design.
        for (name, fill) in [("flows", tables.flows), ("affinities", tables.affinities)] {
            if fill.entries as f64 >= fill.capacity as f64 * NEARLY_FULL {
                tables.gc_passes_nearly_full += 1;
                warn!(
                    table = name,
                    entries = fill.entries,
                    capacity = fill.capacity,
                    "table nearly full; raise max_{name}"
                );
            }
        }
        self.tables = tables;
        Ok(())
    }

    // --- affinities ---

    pub fn affinity_list(
        &self,
        dp: &Dataplane,
        service: &str,
        client: Option<IpAddr>,
    ) -> Result<Vec<AffinityRecord>> {
        let svc = self.service(service)?;
        let service_id = self.installed_id(service)?;
        let by_id: BTreeMap<u32, &BackendIdentity> =
            self.backend_ids.iter().map(|(k, v)| (*v, k)).collect();
        let now = monotonic_ns();
        let timeout = u64::from(svc.affinity_timeout) * NS_PER_SEC;
        let mut records: Vec<AffinityRecord> = dp
            .affinities()
            .filter(|(k, _)| k.service_id == service_id)
            .filter(|(k, _)| client.is_none_or(|c| addr_from_words(k.client_be, k.family) == c))
            .filter(|(_, e)| is_fresh(e.last_seen_ns, timeout, now))
            .filter_map(|(k, e)| {
                let backend = by_id.get(&e.backend_id)?;
                Some(AffinityRecord {
                    client: addr_from_words(k.client_be, k.family),
                    client_port: (k.client_port_be != 0).then(|| u16::from_be(k.client_port_be)),
                    backend: backend.address,
                    idle_s: now.saturating_sub(e.last_seen_ns) / NS_PER_SEC,
                })
            })
            .collect();
        records.sort_by_key(|r| (r.client, r.client_port));
        Ok(records)
    }

    /// The data-plane id of a configured service.
    fn installed_id(&self, service: &str) -> Result<u32> {
        self.service_ids
            .get(service)
            .copied()
            .ok_or_else(|| anyhow!("service {service:?} not installed"))
    }

    /// The live half of a service's Maglev table, by server.
    pub fn maglev_table(&self, dp: &Dataplane, service: &str) -> Result<MaglevTable> {
        let svc = self.service(service)?;
        let service_id = self.installed_id(service)?;
        let half = self.live_half.get(&service_id).copied().unwrap_or(0);
        let ids = dp.read_maglev(service_id, half)?;
        let by_id: BTreeMap<u32, String> = self
            .backend_ids
            .iter()
            .filter(|(k, _)| k.service == svc.name)
            .map(|(k, id)| (*id, endpoint(k.address, k.port)))
            .collect();
        let servers: Vec<String> = by_id
            .values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Backend id -> index into the sorted servers, once, not per slot.
        let index_of: BTreeMap<u32, u16> = by_id
            .iter()
            .filter_map(|(id, e)| {
                let i = servers.binary_search(e).ok()?;
                Some((*id, i as u16))
            })
            .collect();
        let slots = ids
            .iter()
            .map(|id| index_of.get(id).copied().unwrap_or(EMPTY_SLOT))
            .collect();
        Ok(MaglevTable { servers, slots })
    }

    pub fn affinity_flush(
        &self,
        dp: &mut Dataplane,
        service: &str,
        client: Option<IpAddr>,
        backend: Option<IpAddr>,
    ) -> Result<usize> {
        self.service(service)?;
        let service_id = self.installed_id(service)?;
        let backend_id = backend.map(|b| self.id_of(service, b)).transpose()?;
        let removal = dp.remove_affinities(|k, e| {
            k.service_id == service_id
                && client.is_none_or(|c| addr_from_words(k.client_be, k.family) == c)
                && backend_id.is_none_or(|id| e.backend_id == id)
        })?;
        Ok(removal.removed)
    }

    // --- status ---

    pub fn status(&self, dp: &Dataplane) -> Result<StatusReport> {
        let now = monotonic_ns();
        let timeouts = self.affinity_timeouts_ns();
        let (mut affinity_entries, mut flow_entries) = (0, 0);
        let mut affinities: BTreeMap<u32, u64> = BTreeMap::new();
        // New flows per (service id, client address) among live affinities.
        let mut sources: BTreeMap<u32, BTreeMap<IpAddr, u64>> = BTreeMap::new();
        for (key, entry) in dp.affinities() {
            affinity_entries += 1;
            if timeouts
                .get(&key.service_id)
                .is_some_and(|t| is_fresh(entry.last_seen_ns, *t, now))
            {
                *affinities.entry(entry.backend_id).or_default() += 1;
                let client = addr_from_words(key.client_be, key.family);
                *sources
                    .entry(key.service_id)
                    .or_default()
                    .entry(client)
                    .or_default() += u64::from(entry.new_flows);
            }
        }
        let mut flows: BTreeMap<u32, u64> = BTreeMap::new();
        for (_, entry) in dp.flows() {
            flow_entries += 1;
            let fresh = is_fresh(
                entry.last_seen_ns,
                u64::from(entry.timeout_s) * NS_PER_SEC,
                now,
            );
            if fresh && entry.flags & FLOW_F_REVERSE == 0 {
                *flows.entry(entry.backend_id).or_default() += 1;
            }
        }

        let unix = unix_now();
        let mut services = Vec::new();
        for s in &self.config.services {
            let Some(&id) = self.service_ids.get(&s.name) else {
                continue;
            };
            let mut backends = Vec::new();
            for b in self.backends(&s.name) {
                let bid = self.backend_id(&s.name, b.address, b.port)?;
                let down = self.down.contains(&(s.name.clone(), b.address));
                let check = self.last_check.get(&(s.name.clone(), b.address));
                let state = match (down, b.drain) {
                    (true, _) => "down".to_string(),
                    (false, Some(Drain { cut: true, .. })) => "drained".to_string(),
                    (
                        false,
                        Some(Drain {
                            deadline_unix: Some(d),
                            ..
                        }),
                    ) => format!("draining ({} s left)", d.saturating_sub(unix)),
                    (false, Some(_)) => "draining".to_string(),
                    (false, None) if b.weight == 0 => "no-new-clients".to_string(),
                    (false, None) => "up".to_string(),
                };
                backends.push(BackendStatus {
                    address: b.address,
                    port: b.port,
                    weight: b.weight,
                    state,
                    health: check.map(|(summary, _)| summary.clone()),
                    health_latency_ms: check.and_then(|(_, ms)| *ms),
                    active_flows: flows.get(&bid).copied().unwrap_or(0),
                    affinities: affinities.get(&bid).copied().unwrap_or(0),
                    stats: dp.backend_stats(bid)?.into(),
                });
            }
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port.to_string(),
                backend_port: s.backend_port(),
                protocol: s.protocol.as_str().into(),
                affinity: s.affinity.as_str().into(),
                affinity_timeout: s.affinity_timeout,
                idle_timeout: s.idle_timeout,
                top_sources: top_sources(sources.remove(&id).unwrap_or_default()),
                stats: dp.service_stats(id)?.into(),
                backends,
            });
        }
        let counters = dp
            .counters()?
            .into_iter()
            .map(|(c, v)| (c.name().to_string(), v))
            .collect();
        let mut tables = self.tables;
        tables.flows.entries = flow_entries;
        tables.affinities.entries = affinity_entries;
        Ok(StatusReport {
            services,
            counters,
            tables,
            debug_log: self.debug_log,
            node_drained: self.overlay.node_drained,
            announced: None,
        })
    }

    pub fn set_debug_log(&mut self, dp: &mut Dataplane, enabled: bool) -> Result<()> {
        self.debug_log = enabled;
        self.write_settings(dp)
    }

    fn write_settings(&self, dp: &mut Dataplane) -> Result<()> {
        let d = &self.config.daemon;
        dp.set_settings(Settings {
            snat_v4_count: d.snat_addresses.iter().filter(|a| a.is_ipv4()).count() as u32,
            snat_v6_count: d.snat_addresses.iter().filter(|a| a.is_ipv6()).count() as u32,
            snat_port_min: d.snat_port_min,
            snat_port_max: d.snat_port_max,
            closing_timeout_s: d.closing_timeout,
            handshake_timeout_s: d.handshake_timeout,
            fragment_timeout_s: d.fragment_timeout,
            flags: if d.echo_reply {
                SETTINGS_F_ECHO_REPLY
            } else {
                0
            } | if self.debug_log {
                SETTINGS_F_DEBUG_LOG
            } else {
                0
            },
        })
    }
}

/// The clients with the most new flows, largest first, with their share and whether that
/// makes them hot (see `HOT_SOURCE_SHARE`).
fn top_sources(per_client: BTreeMap<IpAddr, u64>) -> Vec<SourceShare> {
    let total: u64 = per_client.values().sum();
    let mut ranked: Vec<(IpAddr, u64)> = per_client.into_iter().filter(|(_, n)| *n > 0).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
        .into_iter()
        .take(TOP_SOURCES)
        .map(|(client, new_flows)| {
            let share = new_flows as f64 / total as f64;
            SourceShare {
                client,
                new_flows,
                share,
                hot: total >= HOT_SOURCE_MIN_FLOWS && share >= HOT_SOURCE_SHARE,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_with_most_new_flows_is_hot() {
        let ip = |last: u8| IpAddr::from([192, 0, 2, last]);
        let mut per_client: BTreeMap<IpAddr, u64> = (1..=20).map(|i| (ip(i), 5)).collect();
        per_client.insert(ip(200), 300);
        let top = top_sources(per_client);
        assert_eq!(top.len(), TOP_SOURCES);
        assert_eq!((top[0].client, top[0].new_flows), (ip(200), 300));
        assert!(top[0].hot && (top[0].share - 0.75).abs() < 1e-9);
        assert!(top[1..].iter().all(|s| !s.hot && s.new_flows == 5));
    }

    #[test]
    fn few_flows_or_an_even_spread_is_not_hot() {
        let ip = |last: u8| IpAddr::from([192, 0, 2, last]);
        // One client, but only 10 flows: too little to call.
        assert!(!top_sources([(ip(1), 10)].into()).iter().any(|s| s.hot));
        // 100 clients with 10 flows each: 1 % each.
        assert!(!top_sources((1..=100).map(|i| (ip(i), 10)).collect())
            .iter()
            .any(|s| s.hot));
    }

    #[test]
    fn a_vip_is_announced_while_a_server_takes_new_clients_and_the_node_is_not_drained() {
        let text = format!(
            "{}\n[[service]]\nname = \"idle\"\nvip = \"10.100.0.9\"\nport = 443\nbackends = [{{ address = \"10.2.0.11\", weight = 0 }}]\n",
            crate::config::tests::MINIMAL
        );
        let mut pool = Pool::new(Config::parse(&text).unwrap(), Overlay::default(), None);
        let web: IpAddr = "10.100.0.1".parse().unwrap();
        assert_eq!(
            pool.announceable_vips(),
            [web].into(),
            "weight 0 everywhere: not announced"
        );
        pool.down
            .insert(("web-ext".into(), "10.2.0.11".parse().unwrap()));
        assert_eq!(
            pool.announceable_vips(),
            [web].into(),
            "one server still up"
        );
        pool.down
            .insert(("web-ext".into(), "10.2.0.12".parse().unwrap()));
        assert!(pool.announceable_vips().is_empty(), "every server down");
        pool.down.clear();
        pool.set_node_drained(true).unwrap();
        assert!(pool.announceable_vips().is_empty(), "node drained");
        pool.set_node_drained(false).unwrap();
        assert_eq!(pool.announceable_vips(), [web].into());
    }

    #[test]
    fn lowest_free_reuses_gaps() {
        assert_eq!(lowest_free([0, 1, 3].into_iter(), 10), Some(2));
        assert_eq!(lowest_free([0, 1].into_iter(), 2), None);
    }

    #[test]
    fn maglev_identity_distinguishes_port() {
        let a = IpAddr::from([10, 2, 0, 11]);
        assert_ne!(maglev_identity(a, 443), maglev_identity(a, 4443));
        let b: IpAddr = "fd00:2::11".parse().unwrap();
        assert_ne!(maglev_identity(b, 443), maglev_identity(b, 4443));
        assert_ne!(
            maglev_identity(b, 443),
            maglev_identity("fd00:2::12".parse().unwrap(), 443)
        );
    }
}
