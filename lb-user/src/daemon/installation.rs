//! What of the pool is in the data plane, and under which ids.
//!
//! Service and backend ids are stable (keyed by service name and server address:port) and
//! survive reloads and restarts: affinity entries refer to backend ids, so renumbering would
//! send clients to the wrong server. Maglev tables are written into the idle half and made
//! live by one update of the service entry, so no packet sees a half-written table.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{anyhow, Result};
use lb_common::{
    hash, Backend, Service, ServiceKey, Settings, VipInfo, ADDR_F_SNAT, AFFINITY_NONE,
    AFFINITY_SOURCE, AFFINITY_SOURCE_PORT, BACKEND_F_CONFIGURED, BACKEND_F_DOWN,
    BACKEND_F_DRAINING, MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES, SERVICE_F_ALLOW_LIST,
    SERVICE_F_SOURCE_RULES, SETTINGS_F_DEBUG_LOG, SETTINGS_F_ECHO_REPLY, SETTINGS_F_SYNC,
    SOURCE_ALLOW, SOURCE_DENY,
};
use tracing::info;

use super::runtime::EffectiveBackend;
use crate::{
    addr::{addr_from_words, addr_words, family, SourcePrefix},
    config::{Affinity, Config, ServiceConfig},
    dataplane::{maglev, Dataplane},
};

/// A server of a service, as ids know it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendIdentity {
    pub service: String,
    pub address: IpAddr,
    pub port: u16,
}

/// A server as the data plane should see it: its effective config and its health.
pub struct Member {
    pub backend: EffectiveBackend,
    pub down: bool,
}

/// A service's live Maglev half and what it was built from (members and seed): a sync that
/// changes nothing for a service leaves its table alone, so a drain costs one build. A
/// table adopted from a previous daemon has no known inputs, so the first sync rebuilds it.
#[derive(Debug)]
struct LiveTable {
    half: u32,
    inputs: Option<(Vec<maglev::Member>, u32)>,
}

#[derive(Debug, Default)]
pub struct Installation {
    service_ids: BTreeMap<String, u32>,
    backend_ids: BTreeMap<BackendIdentity, u32>,
    /// Each service's live Maglev table, by service id.
    live: BTreeMap<u32, LiveTable>,
    /// Service keys currently in the data plane, by name, for removal on reload.
    installed: BTreeMap<String, Vec<ServiceKey>>,
    /// Addresses currently in `LB_VIPS` (VIPs and SNAT addresses).
    addresses: BTreeSet<IpAddr>,
    /// What `LB_SOURCE_RULES` holds: (service id, client prefix) -> `SOURCE_ALLOW` /
    /// `SOURCE_DENY`.
    source_rules: BTreeMap<(u32, SourcePrefix), u32>,
}

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

/// `SERVICE_F_*` of a service's source rules.
fn source_rule_flags(s: &ServiceConfig) -> u32 {
    let mut flags = 0;
    if !s.allow.is_empty() || !s.deny.is_empty() {
        flags |= SERVICE_F_SOURCE_RULES;
    }
    if !s.allow.is_empty() {
        flags |= SERVICE_F_ALLOW_LIST;
    }
    flags
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

impl Installation {
    /// Takes over the ids and table halves of a data plane a previous daemon left running,
    /// so its flows and affinities keep their meaning.
    pub fn adopt(&mut self, dp: &Dataplane, config: &Config) -> Result<()> {
        // So that addresses and rules the config no longer has are removed by the first sync.
        self.addresses = dp.addresses().into_iter().collect();
        self.source_rules = dp.installed_source_rules();
        let installed = dp.installed_services();
        let mut names_by_id = BTreeMap::new();
        for s in &config.services {
            let keys = service_keys(s);
            if let Some((_, svc)) = installed.iter().find(|(k, _)| keys.contains(k)) {
                self.service_ids.insert(s.name.clone(), svc.id);
                self.live.insert(
                    svc.id,
                    LiveTable {
                        half: svc.table_half,
                        inputs: None,
                    },
                );
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

    /// Makes the data plane match `config` with `members` as each service's servers.
    /// Existing flows are untouched: flow entries carry their own rewrite, so even a
    /// removed server's open connections work.
    pub fn sync(
        &mut self,
        dp: &mut Dataplane,
        config: &Config,
        members: &BTreeMap<String, Vec<Member>>,
    ) -> Result<()> {
        dp.set_snat_addresses(&config.daemon.snat_addresses)?;

        // Ids first, so running out (table full) leaves the data plane as it was.
        let wanted_services: BTreeSet<String> =
            config.services.iter().map(|s| s.name.clone()).collect();
        self.service_ids
            .retain(|name, _| wanted_services.contains(name));
        let mut wanted_backends = BTreeSet::new();
        for s in &config.services {
            if !self.service_ids.contains_key(&s.name) {
                let id = lowest_free(self.service_ids.values().copied(), MAX_SERVICES)
                    .ok_or_else(|| anyhow!("more than {MAX_SERVICES} services"))?;
                self.service_ids.insert(s.name.clone(), id);
            }
            for m in members.get(&s.name).into_iter().flatten() {
                wanted_backends.insert(BackendIdentity {
                    service: s.name.clone(),
                    address: m.backend.address,
                    port: m.backend.port,
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

        // A service's new rules are in place before its flags say to consult them, and
        // its old ones stay until its flags no longer do.
        let wanted_rules = self.wanted_source_rules(config);
        for (&(id, prefix), &action) in &wanted_rules {
            if self.source_rules.get(&(id, prefix)) != Some(&action) {
                dp.set_source_rule(id, prefix, action)?;
                self.source_rules.insert((id, prefix), action);
            }
        }
        for s in &config.services {
            let servers = members.get(&s.name).map_or(&[][..], Vec::as_slice);
            self.install_service(dp, s, servers)?;
        }
        let stale_rules: Vec<(u32, SourcePrefix)> = self
            .source_rules
            .keys()
            .filter(|rule| !wanted_rules.contains_key(rule))
            .copied()
            .collect();
        for (id, prefix) in stale_rules {
            dp.remove_source_rule(id, prefix)?;
            self.source_rules.remove(&(id, prefix));
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
        self.live.retain(|id, _| live_ids.contains(id));
        self.sync_addresses(dp, config)
    }

    fn install_service(
        &mut self,
        dp: &mut Dataplane,
        s: &ServiceConfig,
        servers: &[Member],
    ) -> Result<()> {
        let service_id = self.service_ids[&s.name];
        let mut members = Vec::new();
        for m in servers {
            let b = &m.backend;
            let id = self.backend_id(&s.name, b.address, b.port)?;
            let mut flags = BACKEND_F_CONFIGURED;
            if b.drain.is_some() {
                flags |= BACKEND_F_DRAINING;
            }
            if m.down {
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
            let takes_new_clients = b.drain.is_none() && !m.down;
            members.push(maglev::Member {
                id,
                identity: maglev_identity(b.address, b.port),
                weight: if takes_new_clients { b.weight } else { 0 },
            });
        }
        let keys = service_keys(s);
        // Ports (or a VIP) the service no longer has.
        for old in self.installed.get(&s.name).into_iter().flatten() {
            if !keys.contains(old) {
                dp.remove_service(old)?;
            }
        }
        let inputs = (members, s.seed);
        let half = match self.live.get(&service_id) {
            Some(live) if live.inputs.as_ref() == Some(&inputs) => live.half,
            live => {
                let half = live.map_or(0, |l| l.half ^ 1);
                let table = maglev::build(&inputs.0, MAGLEV_SIZE, s.seed);
                dp.write_maglev(service_id, half, &table)?;
                half
            }
        };
        let service = Service {
            id: service_id,
            affinity_mode: affinity_mode(s.affinity),
            affinity_timeout_s: s.affinity_timeout,
            idle_timeout_s: s.idle_timeout,
            table_half: half,
            flags: source_rule_flags(s),
        };
        for key in &keys {
            dp.set_service(*key, service)?;
        }
        self.live.insert(
            service_id,
            LiveTable {
                half,
                inputs: Some(inputs),
            },
        );
        self.installed.insert(s.name.clone(), keys);
        Ok(())
    }

    /// Every service's `allow` and `deny` prefixes, under its id.
    fn wanted_source_rules(&self, config: &Config) -> BTreeMap<(u32, SourcePrefix), u32> {
        let mut wanted = BTreeMap::new();
        for s in &config.services {
            let id = self.service_ids[&s.name];
            for prefix in &s.allow {
                wanted.insert((id, *prefix), SOURCE_ALLOW);
            }
            for prefix in &s.deny {
                wanted.insert((id, *prefix), SOURCE_DENY);
            }
        }
        wanted
    }

    /// Makes `LB_VIPS` hold exactly the VIPs (with their service counts) and the SNAT
    /// addresses, this node's and those it backs for its peers (their flows' return
    /// traffic arrives here once keepalived moves those addresses): the data plane passes
    /// traffic to any other address after one lookup.
    fn sync_addresses(&mut self, dp: &mut Dataplane, config: &Config) -> Result<()> {
        let mut wanted: BTreeMap<IpAddr, VipInfo> = BTreeMap::new();
        for s in &config.services {
            wanted.entry(s.vip).or_default().services += 1;
        }
        let backed = config
            .daemon
            .sync
            .iter()
            .flat_map(|s| &s.backup_snat_addresses);
        for snat in config.daemon.snat_addresses.iter().chain(backed) {
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

    /// The data plane's settings for `config`.
    pub fn write_settings(dp: &mut Dataplane, config: &Config, debug_log: bool) -> Result<()> {
        let d = &config.daemon;
        let mut flags = 0;
        if d.echo_reply {
            flags |= SETTINGS_F_ECHO_REPLY;
        }
        if debug_log {
            flags |= SETTINGS_F_DEBUG_LOG;
        }
        if d.sync.is_some() {
            flags |= SETTINGS_F_SYNC;
        }
        dp.set_settings(Settings {
            snat_v4_count: d.snat_addresses.iter().filter(|a| a.is_ipv4()).count() as u32,
            snat_v6_count: d.snat_addresses.iter().filter(|a| a.is_ipv6()).count() as u32,
            snat_port_min: d.snat_port_min,
            snat_port_max: d.snat_port_max,
            closing_timeout_s: d.closing_timeout,
            handshake_timeout_s: d.handshake_timeout,
            fragment_timeout_s: d.fragment_timeout,
            flags,
        })
    }

    pub fn backend_id(&self, service: &str, address: IpAddr, port: u16) -> Result<u32> {
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

    /// The data-plane id of a configured service.
    pub fn service_id(&self, service: &str) -> Result<u32> {
        self.service_ids
            .get(service)
            .copied()
            .ok_or_else(|| anyhow!("service {service:?} not installed"))
    }

    pub fn service_ids(&self) -> &BTreeMap<String, u32> {
        &self.service_ids
    }

    /// The live half of a service's Maglev table.
    pub fn live_half(&self, service_id: u32) -> u32 {
        self.live.get(&service_id).map_or(0, |l| l.half)
    }

    /// Every server with an id, by id.
    pub fn backends_by_id(&self) -> BTreeMap<u32, &BackendIdentity> {
        self.backend_ids.iter().map(|(k, v)| (*v, k)).collect()
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
