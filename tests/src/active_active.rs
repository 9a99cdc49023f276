//! Two lb nodes active together behind the ECMP router of `cluster`, syncing flows, each
//! node's SNAT address backed up on the other by keepalived (one VRRP instance per node's
//! address): the active/active deployment of docs/ha.md.
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    cluster::Cluster,
    daemon::{lb_binary, Daemon},
    fixture::ServiceSpec,
    pair::{Keepalived, SYNC_PORT},
    server::Server,
    topology,
    wait::until,
};

/// Both nodes in place, until dropped (daemons and keepalived before the cluster).
pub struct ActiveActive {
    pub daemons: Vec<Option<Daemon>>,
    keepaliveds: Vec<Keepalived>,
    _servers: Vec<Server>,
    pub service: ServiceSpec,
    pub cluster: Cluster,
}

impl ActiveActive {
    /// Two nodes, three servers, `clients` client addresses; returns once the router
    /// reaches the VIP through both nodes and each owns its SNAT address.
    pub fn start(clients: usize, within: Duration) -> Result<Self> {
        let cluster = Cluster::build(2, 3, clients)?;
        let service = ServiceSpec::default();
        let backends: Vec<_> = cluster.backends.iter().map(|b| b.address).collect();
        let servers = cluster.start_servers(service.backend_port)?;
        let key_file = cluster.dir.join("sync.key");
        std::fs::write(&key_file, "3c".repeat(32))?;
        let mut daemons = Vec::new();
        let mut keepaliveds = Vec::new();
        for (k, node) in cluster.nodes.iter().enumerate() {
            // keepalived owns the SNAT addresses from now on.
            let snat = node.site.snat[0];
            node.ns
                .ip(&["addr", "del", &format!("{snat}/32"), "dev", "back"])?;
            let track_file = cluster.dir.join(format!("track{k}"));
            let extra = format!(
                "{}[daemon.sync]\nlisten = \"{}\"\npeers = [\"{}\"]\nkey_file = {:?}\ntrack_file = {:?}\nbulk_sync_timeout = 3\nbackup_snat_addresses = [\"{}\"]\n",
                node.announce_keys(),
                sync_address(k),
                sync_address(1 - k),
                key_file.display().to_string(),
                track_file.display().to_string(),
                cluster.nodes[1 - k].site.snat[0],
            );
            daemons.push(Some(Daemon::start_binary(
                &node.site,
                &lb_binary()?,
                &extra,
                &service.toml(&backends),
            )?));
            let config = cluster.dir.join(format!("keepalived{k}.conf"));
            std::fs::write(&config, snat_backup_config(&cluster, k, &track_file))?;
            keepaliveds.push(Keepalived::start(&node.ns, &config, &cluster.dir, k)?);
        }
        let both = Self {
            daemons,
            keepaliveds,
            _servers: servers,
            service,
            cluster,
        };
        both.cluster.wait_for_next_hops(&[0, 1])?;
        until(
            within,
            Duration::from_millis(50),
            "each node to own its SNAT address",
            || Ok(both.owns(0, both.snat(0))? && both.owns(1, both.snat(1))?),
        )?;
        Ok(both)
    }

    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(topology::VIP.into(), self.service.port)
    }

    pub fn snat(&self, k: usize) -> IpAddr {
        self.cluster.nodes[k].site.snat[0]
    }

    pub fn daemon(&self, k: usize) -> &Daemon {
        self.daemons[k].as_ref().expect("node alive")
    }

    /// Waits until both nodes hold `connections` confirmed connections (each its own and
    /// the other's copies).
    pub fn wait_for_copies(&self, connections: u64, within: Duration) -> Result<()> {
        until(
            within,
            Duration::from_millis(20),
            "each node to hold every flow",
            || {
                Ok((0..2).all(|k| {
                    self.daemon(k)
                        .status()
                        .is_ok_and(|s| s.tables.flows.entries == 2 * connections)
                }))
            },
        )
        .map(drop)
    }

    /// Does node `k` hold `address` on its server-side link?
    pub fn owns(&self, k: usize, address: IpAddr) -> Result<bool> {
        let addresses = self.cluster.nodes[k]
            .ns
            .ip(&["-4", "addr", "show", "dev", "back"])?;
        Ok(addresses.contains(&format!("inet {address}/")))
    }

    /// Kills node `k` as a power cut would (SIGKILL of lb and keepalived, links down);
    /// returns how long it took from the kill until the router sends everything to the
    /// other node and that node owns `k`'s SNAT address.
    pub fn kill(&mut self, k: usize) -> Result<Duration> {
        let killed = Instant::now();
        if let Some(mut dead) = self.daemons[k].take() {
            dead.kill()?;
        }
        self.keepaliveds[k].kill();
        let ns = &self.cluster.nodes[k].ns;
        ns.ip(&["link", "set", "uplink", "down"])?;
        ns.ip(&["link", "set", "back", "down"])?;
        let survivor = 1 - k;
        self.cluster.wait_for_next_hops(&[survivor])?;
        until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            "the survivor to take the dead node's SNAT address",
            || self.owns(survivor, self.snat(k)),
        )?;
        Ok(killed.elapsed())
    }
}

fn sync_address(k: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 2, 0, 2 + k as u8]), SYNC_PORT)
}

/// keepalived for node `k`: one VRRP instance per node's SNAT address on the server
/// segment, MASTER for its own and BACKUP for the other's.
fn snat_backup_config(cluster: &Cluster, k: usize, track_file: &std::path::Path) -> String {
    let mut config = format!(
        "global_defs {{\n  router_id lb{k}\n  vrrp_garp_master_delay 0\n}}\nvrrp_track_file lb_sync {{\n  file {:?}\n}}\n",
        track_file.display().to_string()
    );
    for (owner, node) in cluster.nodes.iter().enumerate() {
        let snat = node.site.snat[0];
        config += &format!(
            "vrrp_instance snat{owner} {{\n  state BACKUP\n  interface back\n  virtual_router_id {}\n  version 3\n  priority {}\n  advert_int 0.1\n  track_file {{\n    lb_sync weight 0\n  }}\n  virtual_ipaddress {{\n    {snat}/32 dev back\n  }}\n}}\n",
            60 + owner,
            if owner == k { 150 } else { 100 },
        );
    }
    config
}
