//! Scale-out: several lb nodes behind a router that spreads the VIP's traffic over them by
//! ECMP, each node announcing the VIP over BGP with its own BIRD.
//!
//! ```text
//!  client ns              router ns (BIRD, AS 65000)        lb node k (BIRD, AS 65001; lb)
//!  eth0 10.1.0.2/16 ---- c0 10.1.0.1/16
//!  + 10.1.1.x clients     nk 10.3.k.1/30 ------------------ uplink 10.3.k.2/30
//!                         VIP via ECMP over the nodes        back 10.2.0.(k+2)/24, SNAT 10.2.0.(101+k)
//!                                                             |
//!                                    switch ns (bridge) ------+------ backends 10.2.0.(11+i)/24
//! ```
//! The router hashes on addresses and ports (`fib_multipath_hash_policy = 1`), so one
//! client's connections land on different nodes.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    daemon::Site,
    netns::{unique_prefix, Netns},
    server::Server,
    topology::{
        attach_peer_program, client_address, tuned_veth, Arms, BackendHost, PeerProgram, VIP,
    },
    wait::until,
};

const ROUTER_AS: u32 = 65000;
const NODE_AS: u32 = 65001;
/// BGP sessions come up within seconds; BIRD retries a refused connection after 5 s.
pub const ROUTE_TIMEOUT: Duration = Duration::from_secs(60);
const ROUTE_POLL: Duration = Duration::from_millis(50);
/// BGP's shortest hold time: the router withdraws a dead node's route within 3 s.
const BGP_TIMERS: &str = "hold time 3; keepalive time 1;";

/// A BIRD daemon in the foreground, stopped on drop.
struct Bird {
    child: Child,
}

impl Bird {
    fn start(ns: &Netns, config: &std::path::Path, control: &std::path::Path) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "bird", "-f", "-c"])
            .arg(config)
            .arg("-s")
            .arg(control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start bird (Debian package bird2)")?;
        Ok(Self { child })
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Node {
    pub ns: Netns,
    pub site: Site,
    /// The BIRD fragment lb writes, and the command that makes BIRD re-read it.
    pub bird_fragment: PathBuf,
    pub bird_control: PathBuf,
    /// The router's address on this node's link.
    pub router_side: Ipv4Addr,
    /// The node's address on that link: the router's next hop toward the VIP via this node.
    pub uplink: Ipv4Addr,
}

impl Node {
    /// The `[daemon]` keys that make lb announce through this node's BIRD.
    pub fn announce_keys(&self) -> String {
        format!(
            "[daemon.announce]\nbird_fragment = {:?}\nreload_command = [\"birdc\", \"-s\", {:?}, \"configure\"]\n",
            self.bird_fragment.display().to_string(),
            self.bird_control.display().to_string()
        )
    }
}

/// Dropped in field order: BIRDs first, then programs, then namespaces.
pub struct Cluster {
    _birds: Vec<Bird>,
    _peer_programs: Vec<PeerProgram>,
    pub prefix: String,
    pub dir: PathBuf,
    pub client: Netns,
    pub router: Netns,
    pub switch: Netns,
    pub nodes: Vec<Node>,
    pub backends: Vec<BackendHost>,
    pub client_addresses: Vec<Ipv4Addr>,
}

impl Cluster {
    pub fn build(nodes: usize, backends: usize, clients: usize) -> Result<Self> {
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("{prefix}-cluster"));
        std::fs::create_dir_all(&dir)?;
        let client = Netns::create(&format!("{prefix}-cl"))?;
        let router = Netns::create(&format!("{prefix}-rt"))?;
        let switch = Netns::create(&format!("{prefix}-sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut peer_programs = Vec::new();

        tuned_veth(&client, "eth0", &router, "c0")?;
        client.ip(&["addr", "add", "10.1.0.2/16", "dev", "eth0"])?;
        router.ip(&["addr", "add", "10.1.0.1/16", "dev", "c0"])?;
        client.ip(&["route", "add", "default", "via", "10.1.0.1"])?;
        let client_addresses: Vec<Ipv4Addr> =
            (0..clients).map(|i| client_address(Arms::Two, i)).collect();
        client.add_addresses("eth0", &client_addresses, 16)?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        // ECMP over addresses and ports: one client's connections spread over the nodes.
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;

        let plug = |ns: &Netns, dev: &str, port: &str| -> Result<()> {
            tuned_veth(ns, dev, &switch, port)?;
            switch.ip(&["link", "set", port, "master", "br0"])?;
            Ok(())
        };
        let mut node_list = Vec::new();
        for k in 0..nodes {
            let ns = Netns::create(&format!("{prefix}-n{k}"))?;
            let link_name = format!("n{k}");
            tuned_veth(&router, &link_name, &ns, "uplink")?;
            let (router_side, node_side) = (
                Ipv4Addr::new(10, 3, k as u8, 1),
                Ipv4Addr::new(10, 3, k as u8, 2),
            );
            router.ip(&[
                "addr",
                "add",
                &format!("{router_side}/30"),
                "dev",
                &link_name,
            ])?;
            ns.ip(&["addr", "add", &format!("{node_side}/30"), "dev", "uplink"])?;
            // lb sends frames into these links by XDP; the peer needs a program (see topology).
            peer_programs.push(attach_peer_program(&router, &link_name)?);
            let port = format!("p-n{k}");
            plug(&ns, "back", &port)?;
            peer_programs.push(attach_peer_program(&switch, &port)?);
            ns.ip(&[
                "addr",
                "add",
                &format!("10.2.0.{}/24", k + 2),
                "dev",
                "back",
            ])?;
            let snat = Ipv4Addr::new(10, 2, 0, 101 + k as u8);
            ns.ip(&["addr", "add", &format!("{snat}/32"), "dev", "back"])?;
            ns.ip(&[
                "route",
                "add",
                "10.1.0.0/16",
                "via",
                &router_side.to_string(),
            ])?;
            let site = Site {
                name: format!("{prefix}-n{k}"),
                netns: ns.name().to_string(),
                interfaces: vec!["uplink".into(), "back".into()],
                snat: vec![IpAddr::from(snat)],
            };
            node_list.push((ns, site, router_side, node_side));
        }

        let mut backend_list = Vec::new();
        for i in 0..backends {
            backend_list.push(BackendHost::on_server_segment(&prefix, i, |ns| {
                plug(ns, "eth0", &format!("p-b{i}"))
            })?);
        }

        // BIRD: the router imports the VIP from every node and installs all paths (ECMP).
        let mut birds = Vec::new();
        let mut router_conf = String::from(
            "router id 10.1.0.1;\nprotocol device {}\nprotocol kernel { ipv4 { export all; }; merge paths on; }\n",
        );
        for (k, (_, _, router_side, node_side)) in node_list.iter().enumerate() {
            router_conf += &format!(
                "protocol bgp node{k} {{ local {router_side} as {ROUTER_AS}; neighbor {node_side} as {NODE_AS}; {BGP_TIMERS} ipv4 {{ import all; export none; }}; }}\n"
            );
        }
        let router_conf_path = dir.join("router.conf");
        std::fs::write(&router_conf_path, router_conf)?;
        birds.push(Bird::start(
            &router,
            &router_conf_path,
            &dir.join("router.ctl"),
        )?);
        let mut built_nodes = Vec::new();
        for (k, (ns, site, router_side, node_side)) in node_list.into_iter().enumerate() {
            let bird_fragment = dir.join(format!("node{k}-vips.conf"));
            // Nothing announced until lb says so; the file must exist for BIRD to start.
            std::fs::write(
                &bird_fragment,
                lb::daemon::announce::fragment(&Default::default()),
            )?;
            let conf = format!(
                "router id {node_side};\nprotocol device {{}}\ninclude {:?};\nprotocol bgp uplink {{ local {node_side} as {NODE_AS}; neighbor {router_side} as {ROUTER_AS}; {BGP_TIMERS} ipv4 {{ import none; export where proto = \"lb_vips4\"; next hop self; }}; }}\n",
                bird_fragment.display().to_string()
            );
            let conf_path = dir.join(format!("node{k}.conf"));
            std::fs::write(&conf_path, conf)?;
            let bird_control = dir.join(format!("node{k}.ctl"));
            birds.push(Bird::start(&ns, &conf_path, &bird_control)?);
            built_nodes.push(Node {
                ns,
                site,
                bird_fragment,
                bird_control,
                router_side,
                uplink: node_side,
            });
        }
        Ok(Self {
            _birds: birds,
            _peer_programs: peer_programs,
            prefix,
            dir,
            client,
            router,
            switch,
            nodes: built_nodes,
            backends: backend_list,
            client_addresses,
        })
    }

    /// A test server on every backend, on `port`.
    pub fn start_servers(&self, port: u16) -> Result<Vec<Server>> {
        self.backends
            .iter()
            .map(|b| Server::start(&b.ns, &b.name, b.address, port))
            .collect()
    }

    /// The nodes the router's route to the VIP currently goes through.
    pub fn vip_next_hops(&self) -> Result<Vec<Ipv4Addr>> {
        let route = self.router.ip(&["route", "show", &VIP.to_string()])?;
        Ok(route
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect())
    }

    /// Waits until the router reaches the VIP through exactly the nodes in `nodes`; returns
    /// how long that took.
    pub fn wait_for_next_hops(&self, nodes: &[usize]) -> Result<Duration> {
        let mut wanted: Vec<Ipv4Addr> = nodes.iter().map(|&k| self.nodes[k].uplink).collect();
        wanted.sort();
        let mut now = Vec::new();
        let waited = until(ROUTE_TIMEOUT, ROUTE_POLL, "the router's next hops", || {
            now = self.vip_next_hops()?;
            now.sort();
            Ok(now == wanted)
        });
        waited.with_context(|| format!("the router reaches the VIP via {now:?}, not {wanted:?}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
