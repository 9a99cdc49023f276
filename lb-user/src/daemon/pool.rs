//! The servers behind each service as they are now: the config file, the runtime changes
//! made over the control socket (persisted, `runtime`) and what the health checks said
//! (`health_state`). The pool applies them to the data plane through `installation` and
//! answers the control socket's questions; periodic work is in `housekeeping`, the status
//! report in `report`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{anyhow, bail, Result};
use lb_common::{is_fresh, SweepTally, NS_PER_SEC};
use tracing::{info, warn};

use super::{
    health,
    health_state::{HealthState, Transition},
    housekeeping::{due_drains, Housekeeping},
    installation::{Installation, Member},
    report,
    runtime::{Drain, EffectiveBackend, Overlay},
};
use crate::{
    addr::{addr_from_words, endpoint},
    api::{unix_now, AffinityRecord, MaglevTable, StatusReport, TableReport, EMPTY_SLOT},
    config::{BackendConfig, Config, OnDown, ServiceConfig, MAX_WEIGHT},
    dataplane::{monotonic_ns, Dataplane},
};

pub struct Pool {
    config: Config,
    overlay: Overlay,
    /// Where `overlay` is persisted; `None` keeps it in memory only.
    state_path: Option<PathBuf>,
    health: HealthState,
    installation: Installation,
    housekeeping: Housekeeping,
    /// Data-plane debug logging (`lb debug on|off`). Deliberately not persisted: a restart
    /// returns to the quiet default.
    debug_log: bool,
}

impl Pool {
    pub fn new(config: Config, overlay: Overlay, state_path: Option<PathBuf>) -> Self {
        Self {
            config,
            overlay,
            state_path,
            health: HealthState::default(),
            installation: Installation::default(),
            housekeeping: Housekeeping::default(),
            debug_log: false,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn installation(&self) -> &Installation {
        &self.installation
    }

    pub fn health(&self) -> &HealthState {
        &self.health
    }

    pub fn tables(&self) -> TableReport {
        self.housekeeping.tables()
    }

    pub fn debug_log(&self) -> bool {
        self.debug_log
    }

    pub fn node_drained(&self) -> bool {
        self.overlay.node_drained
    }

    /// `lb node drain` / `undrain`: persisted like every runtime change.
    pub fn set_node_drained(&mut self, drained: bool) -> Result<()> {
        self.overlay.node_drained = drained;
        self.persist()
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
                    b.drain.is_none() && b.weight > 0 && !self.health.is_down(&s.name, b.address)
                })
            })
            .map(|s| s.vip)
            .collect()
    }

    /// Affinity timeout per installed service id, in nanoseconds.
    pub fn affinity_timeouts_ns(&self) -> BTreeMap<u32, u64> {
        self.config
            .services
            .iter()
            .filter_map(|s| {
                Some((
                    *self.installation.service_ids().get(&s.name)?,
                    u64::from(s.affinity_timeout) * NS_PER_SEC,
                ))
            })
            .collect()
    }

    /// Takes over the ids and table halves of a data plane a previous daemon left running.
    pub fn adopt(&mut self, dp: &Dataplane) -> Result<()> {
        self.installation.adopt(dp, &self.config)
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

    fn id_of(&self, service: &str, address: IpAddr) -> Result<u32> {
        let b = self.backend(service, address)?;
        self.installation.backend_id(service, address, b.port)
    }

    fn persist(&self) -> Result<()> {
        match &self.state_path {
            Some(path) => self.overlay.save(path),
            None => Ok(()),
        }
    }

    /// Makes the data plane match the effective state.
    pub fn sync(&mut self, dp: &mut Dataplane) -> Result<()> {
        Installation::write_settings(dp, &self.config, self.debug_log)?;
        let members = self
            .config
            .services
            .iter()
            .map(|s| {
                let servers = self
                    .backends(&s.name)
                    .into_iter()
                    .map(|backend| Member {
                        down: self.health.is_down(&s.name, backend.address),
                        backend,
                    })
                    .collect();
                (s.name.clone(), servers)
            })
            .collect();
        self.installation.sync(dp, &self.config, &members)
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

    pub fn set_debug_log(&mut self, dp: &mut Dataplane, enabled: bool) -> Result<()> {
        self.debug_log = enabled;
        Installation::write_settings(dp, &self.config, enabled)
    }

    // --- health ---

    /// What the health checker should be checking now; health state of servers no longer
    /// checked is forgotten.
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
        let checked: BTreeSet<(String, IpAddr)> = targets
            .iter()
            .map(|t| (t.service.clone(), t.address))
            .collect();
        self.health.retain(&checked);
        targets
    }

    /// Applies one health-check result: a state change goes to the data plane at once.
    pub fn record_check(&mut self, dp: &mut Dataplane, report: &health::Report) -> Result<()> {
        let Some(transition) = self.health.record(report) else {
            return Ok(());
        };
        self.sync(dp)?;
        let (service, address) = (&report.service, report.address);
        match transition {
            Transition::Up { reason } => {
                info!(%service, %address, %reason, "server up: back in selection");
            }
            Transition::Down { reason } => {
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
        }
        Ok(())
    }

    // --- housekeeping ---

    /// Logs counters that mean refused connections (see `Housekeeping::watch_counters`).
    pub fn watch_counters(&mut self, dp: &Dataplane) -> Result<()> {
        self.housekeeping.watch_counters(&dp.counters()?);
        Ok(())
    }

    /// Cuts drains whose deadline has passed: their remaining flows and affinities go.
    pub fn expire_drains(&mut self, dp: &mut Dataplane, now_unix: u64) -> Result<()> {
        for (service, address) in due_drains(&self.overlay, now_unix) {
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

    /// Whether the collection starting now refreshes live connections' affinities
    /// (`Housekeeping::affinity_refresh_due`).
    pub fn affinity_refresh_due(&mut self) -> bool {
        let shortest = self
            .affinity_timeouts_ns()
            .into_values()
            .min()
            .unwrap_or(u64::MAX);
        self.housekeeping.affinity_refresh_due(
            crate::dataplane::monotonic_ns(),
            u64::from(self.config.daemon.gc_interval) * NS_PER_SEC,
            shortest,
        )
    }

    /// Deletes expired flow and affinity entries, refreshing the affinities of live
    /// connections, and records how full the tables are (the daemon sweeps outside its
    /// lock, then `record_collection`).
    pub fn collect_garbage(&mut self, dp: &Dataplane) -> Result<()> {
        let sweep = dp
            .sweeper()?
            .sweep(&self.affinity_timeouts_ns(), false, true)?;
        self.record_collection(&sweep.tally);
        Ok(())
    }

    pub fn record_collection(&mut self, sweep: &SweepTally) {
        self.housekeeping
            .record_collection(&self.config.daemon, sweep)
    }

    // --- affinities and tables ---

    pub fn affinity_list(
        &self,
        dp: &Dataplane,
        service: &str,
        client: Option<IpAddr>,
    ) -> Result<Vec<AffinityRecord>> {
        let svc = self.service(service)?;
        let service_id = self.installation.service_id(service)?;
        let by_id = self.installation.backends_by_id();
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

    /// The live half of a service's Maglev table, by server.
    pub fn maglev_table(&self, dp: &Dataplane, service: &str) -> Result<MaglevTable> {
        let svc = self.service(service)?;
        let service_id = self.installation.service_id(service)?;
        let ids = dp.read_maglev(service_id, self.installation.live_half(service_id))?;
        let by_id: BTreeMap<u32, String> = self
            .installation
            .backends_by_id()
            .into_iter()
            .filter(|(_, k)| k.service == svc.name)
            .map(|(id, k)| (id, endpoint(k.address, k.port)))
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
        let service_id = self.installation.service_id(service)?;
        let backend_id = backend.map(|b| self.id_of(service, b)).transpose()?;
        let removal = dp.remove_affinities(|k, e| {
            k.service_id == service_id
                && client.is_none_or(|c| addr_from_words(k.client_be, k.family) == c)
                && backend_id.is_none_or(|id| e.backend_id == id)
        })?;
        Ok(removal.removed)
    }

    /// The status report, read through the data plane's own reader (tests and tools; the
    /// daemon answers from its `StatusSource`).
    pub fn status(&self, dp: &Dataplane) -> Result<StatusReport> {
        report::build(&report::Basis::of(self, None)?, dp.reader())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn mark_down(pool: &mut Pool, address: &str) {
        pool.health.record(&health::Report {
            service: "web-ext".into(),
            address: address.parse().unwrap(),
            result: Err::<Duration, _>("refused".into()),
            transition: Some(false),
        });
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
        mark_down(&mut pool, "10.2.0.11");
        assert_eq!(
            pool.announceable_vips(),
            [web].into(),
            "one server still up"
        );
        mark_down(&mut pool, "10.2.0.12");
        assert!(pool.announceable_vips().is_empty(), "every server down");
        pool.health.retain(&BTreeSet::new());
        pool.set_node_drained(true).unwrap();
        assert!(pool.announceable_vips().is_empty(), "node drained");
        pool.set_node_drained(false).unwrap();
        assert_eq!(pool.announceable_vips(), [web].into());
    }
}
