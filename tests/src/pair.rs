//! An active/standby lb pair: two nodes on the same client and server segments, keepalived
//! (real VRRP) floating the VIP and the SNAT address between them, lb syncing flows over
//! the server segment.
//!
//! ```text
//!  client ns                 switch ns                   lb node k (keepalived, lb)
//!  eth0 10.1.0.2/16  ------  cbr (bridge)  ------------- front 10.1.0.(11+k)/16  + VIP 10.1.0.100 (VRRP)
//!  + 10.1.1.x clients        sbr (bridge)  ------------- back  10.2.0.(2+k)/24   + SNAT 10.2.0.100 (VRRP)
//!                              |                          sync: 10.2.0.(2+k):7946
//!                              +-- backends 10.2.0.(11+i)/24
//! ```
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    daemon::{lb_binary, Daemon, Site},
    netns::{unique_prefix, Netns},
    server::Server,
    topology::{attach_peer_program, client_address, tuned_veth, Arms, BackendHost, PeerProgram},
    wait::until,
};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);
pub const SNAT: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 100);
pub const SYNC_PORT: u16 = 7946;
/// The external Web Services VIP's port, and the servers' (443 -> 4443).
pub const PORT: u16 = 443;
pub const BACKEND_PORT: u16 = 4443;
/// VRRP adverts every 100 ms (VRRPv3): a backup takes over about 350 ms after the last.
const ADVERT_INTERVAL: &str = "0.1";
const POLL: Duration = Duration::from_millis(20);

/// keepalived in the foreground, killed on drop.
pub struct Keepalived {
    child: Option<Child>,
    /// Where keepalived writes its VRRP process's pid.
    vrrp_pid_file: PathBuf,
}

impl Keepalived {
    /// Starts keepalived in `ns` with `config`; its pid files go to `dir`, named by `k`.
    pub fn start(
        ns: &Netns,
        config: &std::path::Path,
        dir: &std::path::Path,
        k: usize,
    ) -> Result<Self> {
        let (pid_file, vrrp_pid_file) = (
            dir.join(format!("keepalived{k}.pid")),
            dir.join(format!("vrrp{k}.pid")),
        );
        // A killed instance's VRRP process may linger as a zombie (nothing reaps orphans
        // in a container), and keepalived refuses to start while its pid file names a
        // process that exists.
        for file in [&pid_file, &vrrp_pid_file] {
            let _ = std::fs::remove_file(file);
        }
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "keepalived",
                "--dont-fork",
                "--vrrp",
                "--log-console",
            ])
            // Its own process group: keepalived forks its VRRP process, which dies with it.
            .process_group(0)
            .arg("--use-file")
            .arg(config)
            .arg("--pid")
            .arg(&pid_file)
            .arg("--vrrp_pid")
            .arg(&vrrp_pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start keepalived (Debian package keepalived)")?;
        Ok(Self {
            child: Some(child),
            vrrp_pid_file,
        })
    }

    /// SIGKILL: no VRRP priority-0 advert goes out, as when the node dies.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The VRRP process leaves keepalived's process group: killed by its pid file,
            // else it lives on and takes the addresses back when the links return.
            let vrrp = std::fs::read_to_string(&self.vrrp_pid_file)
                .ok()
                .and_then(|pid| pid.trim().parse::<i32>().ok());
            if let Some(pid) = vrrp {
                // SAFETY: plain kill(2) of the VRRP process keepalived started for us.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            // SAFETY: plain kill(2) of the process group we created (`ip netns exec`
            // execs keepalived, so the group is keepalived).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct PairNode {
    pub ns: Netns,
    pub site: Site,
    pub front: Ipv4Addr,
    pub back: Ipv4Addr,
    pub track_file: PathBuf,
    pub keepalived: Option<Keepalived>,
    pub daemon: Option<Daemon>,
    /// `die` was called: its links are down, whatever addresses they still carry.
    pub dead: bool,
}

impl PairNode {
    pub fn sync_address(&self) -> SocketAddr {
        SocketAddr::new(self.back.into(), SYNC_PORT)
    }

    /// Does this node hold the VIP (keepalived MASTER)?
    pub fn holds_vip(&self) -> Result<bool> {
        if self.dead {
            return Ok(false);
        }
        let addresses = self.ns.ip(&["-4", "addr", "show", "dev", "front"])?;
        Ok(addresses.contains(&format!("inet {VIP}/")))
    }

    /// Kills the node as a power cut would: lb and keepalived get SIGKILL, the links go
    /// down (the pinned XDP program would otherwise keep forwarding).
    pub fn die(&mut self) -> Result<()> {
        if let Some(daemon) = &mut self.daemon {
            daemon.kill()?;
        }
        if let Some(keepalived) = &mut self.keepalived {
            keepalived.kill();
        }
        self.ns.ip(&["link", "set", "front", "down"])?;
        self.ns.ip(&["link", "set", "back", "down"])?;
        self.dead = true;
        Ok(())
    }
}

/// Dropped in field order: daemons and keepalived (inside the nodes) before the programs
/// and namespaces.
pub struct Pair {
    pub nodes: Vec<PairNode>,
    _peer_programs: Vec<PeerProgram>,
    pub backends: Vec<BackendHost>,
    pub client: Netns,
    pub switch: Netns,
    pub client_addresses: Vec<Ipv4Addr>,
    pub dir: PathBuf,
    pub key_file: PathBuf,
}

impl Pair {
    pub fn build(backends: usize, clients: usize) -> Result<Self> {
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("{prefix}-pair"));
        std::fs::create_dir_all(&dir)?;
        let key_file = dir.join("sync.key");
        let mut key = [0u8; 32];
        getrandom(&mut key)?;
        std::fs::write(
            &key_file,
            key.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        )?;

        let client = Netns::create(&format!("{prefix}-cl"))?;
        let switch = Netns::create(&format!("{prefix}-sw"))?;
        for bridge in ["cbr", "sbr"] {
            switch.ip(&["link", "add", bridge, "type", "bridge"])?;
            switch.ip(&["link", "set", bridge, "up"])?;
        }
        let mut peer_programs = Vec::new();
        let mut plug =
            |ns: &Netns, dev: &str, port: &str, bridge: &str, xdp_peer: bool| -> Result<()> {
                tuned_veth(ns, dev, &switch, port)?;
                switch.ip(&["link", "set", port, "master", bridge])?;
                if xdp_peer {
                    peer_programs.push(attach_peer_program(&switch, port)?);
                }
                Ok(())
            };
        plug(&client, "eth0", "p-cl", "cbr", false)?;
        client.ip(&["addr", "add", "10.1.0.2/16", "dev", "eth0"])?;
        let client_addresses: Vec<Ipv4Addr> =
            (0..clients).map(|i| client_address(Arms::Two, i)).collect();
        client.add_addresses("eth0", &client_addresses, 16)?;

        let mut nodes = Vec::new();
        for k in 0..2 {
            let ns = Netns::create(&format!("{prefix}-n{k}"))?;
            plug(&ns, "front", &format!("p-f{k}"), "cbr", true)?;
            plug(&ns, "back", &format!("p-b{k}"), "sbr", true)?;
            let front = Ipv4Addr::new(10, 1, 0, 11 + k as u8);
            let back = Ipv4Addr::new(10, 2, 0, 2 + k as u8);
            ns.ip(&["addr", "add", &format!("{front}/16"), "dev", "front"])?;
            ns.ip(&["addr", "add", &format!("{back}/24"), "dev", "back"])?;
            let site = Site {
                name: format!("{prefix}-n{k}"),
                netns: ns.name().to_string(),
                interfaces: vec!["front".into(), "back".into()],
                snat: vec![IpAddr::from(SNAT)],
            };
            let track_file = dir.join(format!("track{k}"));
            nodes.push(PairNode {
                ns,
                site,
                front,
                back,
                track_file,
                keepalived: None,
                daemon: None,
                dead: false,
            });
        }
        let mut backend_list = Vec::new();
        for i in 0..backends {
            backend_list.push(BackendHost::on_server_segment(&prefix, i, |ns| {
                plug(ns, "eth0", &format!("p-s{i}"), "sbr", false)
            })?);
        }
        Ok(Self {
            nodes,
            _peer_programs: peer_programs,
            backends: backend_list,
            client,
            switch,
            client_addresses,
            dir,
            key_file,
        })
    }

    /// The service both nodes balance: the VIP's port to every backend, source affinity.
    pub fn services(&self) -> String {
        let list: Vec<String> = self
            .backends
            .iter()
            .map(|b| format!("{{ address = \"{}\" }}", b.address))
            .collect();
        format!(
            "[[service]]\nname = \"web-ext\"\nvip = \"{VIP}\"\nport = {PORT}\nbackend_port = {BACKEND_PORT}\naffinity = \"source\"\naffinity_timeout = 1800\nidle_timeout = 3600\nbackends = [{}]\n",
            list.join(", ")
        )
    }

    /// A test server on every backend.
    pub fn start_servers(&self) -> Result<Vec<Server>> {
        self.backends
            .iter()
            .map(|b| Server::start(&b.ns, &b.name, b.address, BACKEND_PORT))
            .collect()
    }

    /// Node 0 active for good (its addresses pinned, no keepalived), node 1 its standby,
    /// both running lb with `daemon_extra`; returns once each sends to the other.
    pub fn start_synced(
        &mut self,
        daemon_extra: &str,
        services: &str,
        within: Duration,
    ) -> Result<()> {
        self.pin_addresses_on_node0()?;
        self.start_lb(0, daemon_extra, services)?;
        self.start_lb(1, daemon_extra, services)?;
        until(within, POLL, "the sync sessions", || {
            let up = |k: usize| -> Result<bool> {
                let sync = self.daemon(k).status()?.sync.context("no sync status")?;
                Ok(sync.ready && sync.peers.iter().all(|p| p.connected))
            };
            Ok(up(0)? && up(1)?)
        })
        .map(drop)
    }

    /// The `[daemon.sync]` table of node `k`.
    pub fn sync_keys(&self, k: usize) -> String {
        let node = &self.nodes[k];
        let peer = &self.nodes[1 - k];
        format!(
            "[daemon.sync]\nlisten = \"{}\"\npeers = [\"{}\"]\nkey_file = {:?}\ntrack_file = {:?}\nbulk_sync_timeout = 3\n",
            node.sync_address(),
            peer.sync_address(),
            self.key_file.display().to_string(),
            node.track_file.display().to_string(),
        )
    }

    /// keepalived's configuration for node `k`: one VRRP instance that floats the VIP and
    /// the SNAT address together, kept out of MASTER while lb's track file says 1. Both
    /// nodes have the same priority: a node that returns never preempts the active one
    /// (with different priorities keepalived may, `nopreempt` notwithstanding).
    pub fn keepalived_config(&self, k: usize) -> String {
        let node = &self.nodes[k];
        format!(
            "global_defs {{\n  router_id lb{k}\n  vrrp_garp_master_delay 0\n  vrrp_garp_master_repeat 3\n}}\n\
             vrrp_track_file lb_sync {{\n  file {:?}\n}}\n\
             vrrp_instance lb {{\n  state BACKUP\n  interface front\n  virtual_router_id 51\n  version 3\n  priority 100\n  advert_int {ADVERT_INTERVAL}\n  nopreempt\n  track_interface {{\n    back\n  }}\n  track_file {{\n    lb_sync weight 0\n  }}\n  virtual_ipaddress {{\n    {VIP}/16 dev front\n    {SNAT}/24 dev back\n  }}\n}}\n",
            node.track_file.display().to_string(),
        )
    }

    /// Gives node 0 the VIP and the SNAT address for good (a test of the sync alone, without
    /// keepalived).
    fn pin_addresses_on_node0(&self) -> Result<()> {
        let ns = &self.nodes[0].ns;
        ns.ip(&["addr", "add", &format!("{VIP}/16"), "dev", "front"])?;
        ns.ip(&["addr", "add", &format!("{SNAT}/24"), "dev", "back"])?;
        Ok(())
    }

    /// Starts lb alone on node `k` (no keepalived), with extra `[daemon]` keys before its
    /// sync table.
    pub fn start_lb(&mut self, k: usize, daemon_extra: &str, services: &str) -> Result<()> {
        let extra = format!("{daemon_extra}{}", self.sync_keys(k));
        let daemon = Daemon::start_binary(&self.nodes[k].site, &lb_binary()?, &extra, services)?;
        self.nodes[k].daemon = Some(daemon);
        Ok(())
    }

    /// Brings a dead node back: links up, its lb daemon restarted (it adopts its pinned
    /// tables), keepalived started again.
    pub fn revive(&mut self, k: usize) -> Result<()> {
        let node = &mut self.nodes[k];
        node.ns.ip(&["link", "set", "front", "up"])?;
        node.ns.ip(&["link", "set", "back", "up"])?;
        node.dead = false;
        node.daemon
            .as_mut()
            .context("node never started")?
            .restart()?;
        let config = self.dir.join(format!("keepalived{k}.conf"));
        node.keepalived = Some(Keepalived::start(&node.ns, &config, &self.dir, k)?);
        Ok(())
    }

    /// Starts lb and keepalived on both nodes; returns (the node VRRP elected, the other).
    pub fn start_active_standby(
        &mut self,
        services: &str,
        within: Duration,
    ) -> Result<(usize, usize)> {
        self.start_node(0, services)?;
        self.start_node(1, services)?;
        self.wait_for_one_master(within)
    }

    /// Starts lb (with `services`) and keepalived on node `k`.
    pub fn start_node(&mut self, k: usize, services: &str) -> Result<()> {
        self.start_lb(k, "", services)?;
        let config = self.dir.join(format!("keepalived{k}.conf"));
        std::fs::write(&config, self.keepalived_config(k))?;
        self.nodes[k].keepalived =
            Some(Keepalived::start(&self.nodes[k].ns, &config, &self.dir, k)?);
        Ok(())
    }

    pub fn daemon(&self, k: usize) -> &Daemon {
        self.nodes[k].daemon.as_ref().expect("node started")
    }

    /// Waits until exactly one node holds the VIP; returns (it, the other).
    pub fn wait_for_one_master(&self, within: Duration) -> Result<(usize, usize)> {
        let mut master = None;
        until(within, POLL, "a keepalived MASTER", || {
            let holders: Vec<usize> = (0..self.nodes.len())
                .filter(|&k| self.nodes[k].holds_vip().unwrap_or(false))
                .collect();
            master = (holders.len() == 1).then(|| holders[0]);
            Ok(master.is_some())
        })?;
        let k = master.expect("found above");
        Ok((k, 1 - k))
    }

    /// Waits until node `k`, and only it, holds the VIP; returns how long that took.
    pub fn wait_for_master(&self, k: usize, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        until(within, POLL, "a keepalived MASTER", || {
            let others = (0..self.nodes.len())
                .filter(|&j| j != k)
                .any(|j| self.nodes[j].holds_vip().unwrap_or(false));
            Ok(self.nodes[k].holds_vip()? && !others)
        })
        .with_context(|| format!("node {k} did not become the only VRRP MASTER"))?;
        Ok(start.elapsed())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)?;
    Ok(())
}
