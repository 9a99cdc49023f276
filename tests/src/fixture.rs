//! A ready Front End pool: topology, one server per backend host, the lb daemon with one
//! service in front. Dropped in field order: daemon, servers, then the namespaces.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use anyhow::{ensure, Result};
use rustls::ServerConfig;

use crate::{
    client::{self, Reply},
    daemon::Daemon,
    server::Server,
    topology::{Spec, Topology, VIP},
};

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub port: u16,
    pub backend_port: u16,
    pub affinity: String,
    pub affinity_timeout: u32,
    pub idle_timeout: u32,
    /// A TOML inline table for `health`, e.g. `{ kind = "tcp", port = 5061 }`.
    pub health: Option<String>,
    /// More keys of the service table, as TOML lines each ending in a newline.
    pub extra: String,
    /// The servers speak HTTPS with this (`Fixture::ask` speaks plain HTTP: open
    /// `Connection::open_tls` instead).
    pub tls: Option<Arc<ServerConfig>>,
}

impl Default for ServiceSpec {
    /// The external Web Services VIP: 443 -> 4443, source affinity.
    fn default() -> Self {
        Self {
            name: "web-ext".into(),
            port: 443,
            backend_port: 4443,
            affinity: "source".into(),
            affinity_timeout: 1800,
            idle_timeout: 3600,
            health: None,
            extra: String::new(),
            tls: None,
        }
    }
}

impl ServiceSpec {
    pub fn toml(&self, backends: &[Ipv4Addr]) -> String {
        let list: Vec<String> = backends
            .iter()
            .map(|a| format!("{{ address = \"{a}\" }}"))
            .collect();
        let health = self
            .health
            .as_ref()
            .map(|h| format!("health = {h}\n"))
            .unwrap_or_default();
        format!(
            "[[service]]\nname = {:?}\nvip = \"{VIP}\"\nport = {}\nbackend_port = {}\naffinity = {:?}\naffinity_timeout = {}\nidle_timeout = {}\n{health}{}backends = [{}]\n",
            self.name,
            self.port,
            self.backend_port,
            self.affinity,
            self.affinity_timeout,
            self.idle_timeout,
            self.extra,
            list.join(", ")
        )
    }
}

pub struct Fixture {
    pub daemon: Daemon,
    pub servers: Vec<Server>,
    pub service: ServiceSpec,
    pub topology: Topology,
}

impl Fixture {
    pub fn start(spec: &Spec, service: ServiceSpec) -> Result<Self> {
        Self::start_with(spec, service, "")
    }

    /// Like `start`, with extra `[daemon]` keys (TOML lines).
    pub fn start_with(spec: &Spec, service: ServiceSpec, daemon_extra: &str) -> Result<Self> {
        Self::launch(spec, service, daemon_extra, 0)
    }

    /// Like `start`, but the last server, running on its host, is not in the pool yet: for
    /// tests that add it later.
    pub fn start_holding_back_last(spec: &Spec, service: ServiceSpec) -> Result<Self> {
        Self::launch(spec, service, "", 1)
    }

    fn launch(
        spec: &Spec,
        service: ServiceSpec,
        daemon_extra: &str,
        held_back: usize,
    ) -> Result<Self> {
        let topology = Topology::build(spec)?;
        let servers = topology
            .backends
            .iter()
            .map(|b| match &service.tls {
                Some(tls) => {
                    Server::start_tls(&b.ns, &b.name, b.address, service.backend_port, tls.clone())
                }
                None => Server::start(&b.ns, &b.name, b.address, service.backend_port),
            })
            .collect::<Result<Vec<_>>>()?;
        let addresses = Self::addresses(&topology);
        let pool = &addresses[..addresses.len().saturating_sub(held_back)];
        let daemon = Daemon::start_with(&topology, daemon_extra, &service.toml(pool))?;
        Ok(Self {
            daemon,
            servers,
            service,
            topology,
        })
    }

    pub fn addresses(topology: &Topology) -> Vec<Ipv4Addr> {
        topology.backends.iter().map(|b| b.address).collect()
    }

    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(VIP, self.service.port)
    }

    /// One fresh connection from `client`, one request.
    pub fn ask(&self, client: Ipv4Addr) -> Result<Reply> {
        client::request(&self.topology.client, client, self.vip())
    }

    /// The server each client reaches on a new connection.
    pub fn servers_of(&self, clients: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, String>> {
        clients
            .iter()
            .map(|&c| self.ask(c).map(|r| (c, r.server)))
            .collect()
    }

    /// Connects once more from every client of `before` and counts those that now reach
    /// another server; fails if any of them went anywhere but `only_to`.
    pub fn count_moved(&self, before: &BTreeMap<Ipv4Addr, String>, only_to: &str) -> Result<usize> {
        let mut moved = 0;
        for (&client, server) in before {
            let now = self.ask(client)?.server;
            if &now != server {
                ensure!(
                    now == only_to,
                    "{client} moved from {server} to {now}, not to {only_to}"
                );
                moved += 1;
            }
        }
        Ok(moved)
    }
}
