//! Turns the configured services and backends into data-plane state.
//!
//! Service and backend ids are stable across config reloads (keyed by service name and
//! backend address:port): affinity entries refer to backend ids, so renumbering would send
//! clients to the wrong server. Maglev tables are written into the idle half and then made
//! live by one map update of the service entry, so no packet sees a half-written table.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{anyhow, Result};
use lb_common::{
    Backend, Service, ServiceKey, Settings, AFFINITY_NONE, AFFINITY_SOURCE, AFFINITY_SOURCE_PORT,
    BACKEND_F_CONFIGURED, FAMILY_V4, MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES, PROTO_TCP,
};

use crate::{
    api::{BackendStatus, ServiceStatus, StatusReport},
    config::{Affinity, Config, ServiceConfig},
    dataplane::{monotonic_ns, v4_key_words, Dataplane},
    maglev,
};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct BackendIdentity {
    service: String,
    address: Ipv4Addr,
    port: u16,
}

/// Ids handed out so far. Freed ids are reused lowest-first.
#[derive(Debug, Default)]
pub struct Pool {
    service_ids: BTreeMap<String, u32>,
    backend_ids: BTreeMap<BackendIdentity, u32>,
    /// Live Maglev half per service id.
    live_half: BTreeMap<u32, u32>,
    /// Service keys currently in the data plane, for removal on reload.
    installed: BTreeMap<String, ServiceKey>,
    config: Option<Config>,
}

fn lowest_free(used: impl Iterator<Item = u32>, limit: u32) -> Option<u32> {
    let used: BTreeSet<u32> = used.collect();
    (0..limit).find(|id| !used.contains(id))
}

fn service_key(s: &ServiceConfig) -> ServiceKey {
    ServiceKey {
        vip_be: v4_key_words(s.vip),
        port_be: s.port.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    }
}

fn affinity_mode(a: Affinity) -> u32 {
    match a {
        Affinity::None => AFFINITY_NONE,
        Affinity::Source => AFFINITY_SOURCE,
        Affinity::SourcePort => AFFINITY_SOURCE_PORT,
    }
}

/// A stable identity for Maglev: address and port, independent of config order.
fn maglev_identity(address: Ipv4Addr, port: u16) -> u64 {
    (u64::from(u32::from(address)) << 16) | u64::from(port)
}

impl Pool {
    /// Makes the data plane match `config`. Existing flows are untouched: flow entries
    /// carry their own rewrite, so even a removed backend's open connections keep working.
    pub fn apply(&mut self, dp: &mut Dataplane, config: &Config) -> Result<()> {
        let d = &config.daemon;
        dp.set_snat_addresses(&d.snat_addresses)?;
        dp.set_settings(Settings {
            snat_v4_count: d.snat_addresses.len() as u32,
            snat_port_min: d.snat_port_min,
            snat_port_max: d.snat_port_max,
            closing_timeout_s: d.closing_timeout,
            _pad: 0,
        })?;

        // Ids first, so a failure (table full) leaves the data plane as it was.
        let wanted_services: BTreeSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        self.service_ids.retain(|name, _| wanted_services.contains(name.as_str()));
        let mut wanted_backends = BTreeSet::new();
        for s in &config.services {
            if !self.service_ids.contains_key(&s.name) {
                let id = lowest_free(self.service_ids.values().copied(), MAX_SERVICES)
                    .ok_or_else(|| anyhow!("more than {MAX_SERVICES} services"))?;
                self.service_ids.insert(s.name.clone(), id);
            }
            for b in &s.backends {
                wanted_backends.insert(BackendIdentity {
                    service: s.name.clone(),
                    address: b.address,
                    port: s.backend_port(),
                });
            }
        }
        let removed_backends: Vec<u32> = self
            .backend_ids
            .iter()
            .filter(|(identity, _)| !wanted_backends.contains(*identity))
            .map(|(_, id)| *id)
            .collect();
        self.backend_ids.retain(|identity, _| wanted_backends.contains(identity));
        for identity in wanted_backends {
            if !self.backend_ids.contains_key(&identity) {
                let id = lowest_free(self.backend_ids.values().copied(), MAX_BACKENDS)
                    .ok_or_else(|| anyhow!("more than {MAX_BACKENDS} backends"))?;
                self.backend_ids.insert(identity, id);
            }
        }

        for id in removed_backends {
            // Affinities pointing at it become invalid; its open flows keep their rewrite.
            dp.set_backend(id, Backend::default())?;
        }
        for s in &config.services {
            self.install_service(dp, s)?;
        }
        let stale: Vec<(String, ServiceKey)> = self
            .installed
            .iter()
            .filter(|(name, _)| !wanted_services.contains(name.as_str()))
            .map(|(n, k)| (n.clone(), *k))
            .collect();
        for (name, key) in stale {
            dp.remove_service(&key)?;
            self.installed.remove(&name);
        }
        self.live_half.retain(|id, _| self.service_ids.values().any(|v| v == id));
        self.sync_vips(dp, config)?;
        self.config = Some(config.clone());
        Ok(())
    }

    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    fn install_service(&mut self, dp: &mut Dataplane, s: &ServiceConfig) -> Result<()> {
        let service_id = self.service_ids[&s.name];
        let port = s.backend_port();
        let mut members = Vec::with_capacity(s.backends.len());
        for b in &s.backends {
            let id = self.backend_id(&s.name, b.address, port)?;
            dp.set_backend(
                id,
                Backend {
                    addr_be: v4_key_words(b.address),
                    port_be: port.to_be(),
                    family: FAMILY_V4,
                    _pad: 0,
                    flags: BACKEND_F_CONFIGURED,
                    service_id,
                },
            )?;
            members.push(maglev::Member { id, identity: maglev_identity(b.address, port), weight: b.weight });
        }
        let table = maglev::build(&members, MAGLEV_SIZE);
        let key = service_key(s);
        // A service whose key changed (new VIP or port) is a new entry; drop the old one.
        if let Some(old) = self.installed.get(&s.name).filter(|old| **old != key) {
            dp.remove_service(old)?;
        }
        let half = self.live_half.get(&service_id).map_or(0, |h| h ^ 1);
        dp.write_maglev(service_id, half, &table)?;
        dp.set_service(
            key,
            Service {
                id: service_id,
                affinity_mode: affinity_mode(s.affinity),
                affinity_timeout_s: s.affinity_timeout,
                idle_timeout_s: s.idle_timeout,
                table_half: half,
                _pad: 0,
            },
        )?;
        self.live_half.insert(service_id, half);
        self.installed.insert(s.name.clone(), key);
        Ok(())
    }

    fn sync_vips(&self, dp: &mut Dataplane, config: &Config) -> Result<()> {
        let mut counts: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for s in &config.services {
            *counts.entry(s.vip).or_default() += 1;
        }
        if let Some(old) = &self.config {
            for s in &old.services {
                if !counts.contains_key(&s.vip) {
                    dp.remove_vip(s.vip)?;
                }
            }
        }
        for (vip, n) in counts {
            dp.set_vip(vip, n)?;
        }
        Ok(())
    }

    fn backend_id(&self, service: &str, address: Ipv4Addr, port: u16) -> Result<u32> {
        let identity = BackendIdentity { service: service.into(), address, port };
        self.backend_ids
            .get(&identity)
            .copied()
            .ok_or_else(|| anyhow!("backend {address}:{port} of {service} has no id"))
    }

    /// Services, backends, counters and live affinity counts, as `lb status` shows them.
    pub fn status(&self, dp: &Dataplane) -> Result<StatusReport> {
        let Some(config) = &self.config else {
            return Ok(StatusReport::default());
        };
        let now = monotonic_ns();
        let mut affinities_per_backend: BTreeMap<u32, u64> = BTreeMap::new();
        let timeouts: BTreeMap<u32, u64> = config
            .services
            .iter()
            .map(|s| (self.service_ids[&s.name], u64::from(s.affinity_timeout) * 1_000_000_000))
            .collect();
        for (key, entry) in dp.affinities() {
            let fresh = timeouts
                .get(&key.service_id)
                .is_some_and(|t| now.saturating_sub(entry.last_seen_ns) <= *t);
            if fresh {
                *affinities_per_backend.entry(entry.backend_id).or_default() += 1;
            }
        }
        let mut flows_per_backend: BTreeMap<u32, u64> = BTreeMap::new();
        for (_, entry) in dp.flows() {
            let fresh = now.saturating_sub(entry.last_seen_ns) <= u64::from(entry.timeout_s) * 1_000_000_000;
            if fresh && entry.flags & lb_common::FLOW_F_REVERSE == 0 {
                *flows_per_backend.entry(entry.backend_id).or_default() += 1;
            }
        }

        let mut services = Vec::new();
        for s in &config.services {
            let id = self.service_ids[&s.name];
            let mut backends = Vec::new();
            for b in &s.backends {
                let bid = self.backend_id(&s.name, b.address, s.backend_port())?;
                backends.push(BackendStatus {
                    address: b.address,
                    port: s.backend_port(),
                    weight: b.weight,
                    // Health checks are not implemented yet: state only reflects the config.
                    state: if b.weight > 0 { "active" } else { "no-new-clients" }.into(),
                    active_flows: flows_per_backend.get(&bid).copied().unwrap_or(0),
                    affinities: affinities_per_backend.get(&bid).copied().unwrap_or(0),
                    stats: dp.backend_stats(bid)?.into(),
                });
            }
            services.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                backend_port: s.backend_port(),
                protocol: "tcp".into(),
                affinity: s.affinity.as_str().into(),
                affinity_timeout: s.affinity_timeout,
                idle_timeout: s.idle_timeout,
                stats: dp.service_stats(id)?.into(),
                backends,
            });
        }
        let counters = dp.counters()?.into_iter().map(|(c, v)| (c.name().to_string(), v)).collect();
        Ok(StatusReport { services, counters })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_reuses_gaps() {
        assert_eq!(lowest_free([0, 1, 3].into_iter(), 10), Some(2));
        assert_eq!(lowest_free([0, 1].into_iter(), 2), None);
    }

    #[test]
    fn maglev_identity_distinguishes_port() {
        let a = Ipv4Addr::new(10, 2, 0, 11);
        assert_ne!(maglev_identity(a, 443), maglev_identity(a, 4443));
    }
}
