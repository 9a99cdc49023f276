//! The test network: clients, the lb box, and a server segment, all in namespaces.
//!
//! Two-armed (the default):
//! ```text
//!  client ns                lb ns                      switch ns (bridge)    backend ns i
//!  eth0 10.1.0.2/16 ----- front 10.1.0.1/16
//!  + 10.1.1.x clients       back 10.2.0.1/24 -------- br0 ------------------ eth0 10.2.0.(11+i)/24
//!  default via 10.1.0.1     + SNAT 10.2.0.100.. /32                          default via 10.2.0.1
//! ```
//! One-armed: lb, clients and servers share one bridged segment 10.0.0.0/16 and lb
//! forwards everything back out of its single interface (XDP_TX).
//!
//! The VIP (10.100.0.1) is routed to lb, not configured anywhere: XDP answers for it.
//!
//! With `ipv6`, the two-armed topology is dual-stack: the same layout in fd00:1::/64 (client
//! side, clients from fd00:1::100), fd00:2::/64 (servers fd00:2::11.., SNAT
//! fd00:2::100..), VIP fd00:100::1.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};

use crate::netns::{unique_prefix, veth, Netns};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
const CLIENT_NET6: [u16; 2] = [0xfd00, 1];
const SERVER_NET6: [u16; 2] = [0xfd00, 2];
/// Host parts in the /64s: lb's own, the client's own, the first client source, the first
/// server, the first SNAT address.
const LB_HOST6: u16 = 1;
const CLIENT_HOST6: u16 = 2;
const FIRST_CLIENT6: u16 = 0x100;
const FIRST_SERVER6: u16 = 0x11;
const FIRST_SNAT6: u16 = 0x100;

fn v6(net: [u16; 2], host: u16) -> Ipv6Addr {
    Ipv6Addr::new(net[0], net[1], 0, 0, 0, 0, 0, host)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arms {
    One,
    Two,
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub arms: Arms,
    pub backends: usize,
    /// Extra client source addresses (besides the client's own interface address).
    pub clients: usize,
    pub snat_addresses: usize,
    /// Dual-stack (two-armed only).
    pub ipv6: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            arms: Arms::Two,
            backends: 3,
            clients: 30,
            snat_addresses: 2,
            ipv6: false,
        }
    }
}

pub struct BackendHost {
    pub ns: Netns,
    pub address: Ipv4Addr,
    /// Set in a dual-stack topology.
    pub address6: Option<Ipv6Addr>,
    pub name: String,
}

impl BackendHost {
    /// Server `i` of a multi-node harness (the scale-out cluster, the HA pair): "fe{i+1}"
    /// at 10.2.0.(11+i)/24 on its `eth0`, which `plug` connects to the server segment.
    pub(crate) fn on_server_segment(
        prefix: &str,
        i: usize,
        plug: impl FnOnce(&Netns) -> Result<()>,
    ) -> Result<Self> {
        let ns = Netns::create(&format!("{prefix}-b{i}"))?;
        plug(&ns)?;
        let address = Ipv4Addr::new(10, 2, 0, 11 + i as u8);
        ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
        Ok(Self {
            ns,
            address,
            address6: None,
            name: format!("fe{}", i + 1),
        })
    }
}

/// An `xdp_pass` program attached to an interface, detached on drop. On a veth peer of one
/// of lb's interfaces: veth delivers frames that lb sends with XDP_TX only to a peer that
/// has an XDP program of its own (GRO alone is enough for redirected frames); a real NIC
/// needs nothing like it. The benchmarks also attach it to lb's own interfaces, to measure
/// what any XDP program costs on veth.
pub struct PeerProgram {
    ns_name: String,
    ebpf: Option<Ebpf>,
}

pub fn attach_peer_program(ns: &Netns, dev: &str) -> Result<PeerProgram> {
    attach_baseline(ns, "xdp_pass", &[dev.to_string()])
}

/// One of the reference programs (`lb-ebpf/src/baseline.rs`) attached to `devs`, which
/// are also its redirect targets (`xdp_forward`'s); detached on drop.
pub fn attach_baseline(ns: &Netns, name: &str, devs: &[String]) -> Result<PeerProgram> {
    let ebpf = ns.run(|| -> Result<Ebpf> {
        let mut ebpf = Ebpf::load(lb::dataplane::BASELINE_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        program.load()?;
        for dev in devs {
            program
                .attach(dev, XdpMode::Driver)
                .with_context(|| format!("attach {name} to {dev}"))?;
        }
        if let Some(map) = ebpf.map_mut("BASE_TX_PORTS") {
            let mut ports = aya::maps::DevMapHash::try_from(map)?;
            for dev in devs {
                let ifindex = lb::dataplane::ifindex(dev)?;
                ports.insert(ifindex, ifindex, None, 0)?;
            }
        }
        Ok(ebpf)
    })??;
    Ok(PeerProgram {
        ns_name: ns.name().to_string(),
        ebpf: Some(ebpf),
    })
}

impl Drop for PeerProgram {
    fn drop(&mut self) {
        // Detach from inside the namespace, where the interface is.
        if let (Some(ebpf), Ok(file)) = (
            self.ebpf.take(),
            std::fs::File::open(format!("/run/netns/{}", self.ns_name)),
        ) {
            std::thread::scope(|s| {
                s.spawn(move || {
                    use std::os::fd::AsRawFd;
                    // SAFETY: valid namespace fd; affects only this thread.
                    unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    drop(ebpf);
                });
            });
        }
    }
}

/// Everything a test needs to know about the network; deleting it (drop) deletes every
/// namespace, and with them every link and address.
pub struct Topology {
    // Held for its Drop: detaches before the namespaces go.
    _peer_programs: Vec<PeerProgram>,
    pub prefix: String,
    pub lb: Netns,
    pub client: Netns,
    pub switch: Netns,
    pub backends: Vec<BackendHost>,
    pub client_addresses: Vec<Ipv4Addr>,
    pub snat_addresses: Vec<Ipv4Addr>,
    /// Empty unless dual-stack.
    pub client_addresses6: Vec<Ipv6Addr>,
    pub snat_addresses6: Vec<Ipv6Addr>,
    /// lb's own address on the client side (for "non-VIP traffic still works").
    pub lb_address: Ipv4Addr,
    pub lb_interfaces: Vec<String>,
}

/// veths deliver frames without a complete checksum (the sender offloads it); a real NIC
/// never does. Make the endpoints compute full checksums, and turn GRO on so frames that
/// lb redirects in native mode have a receiving NAPI on the peer.
pub(crate) fn tune_endpoint(ns: &Netns, dev: &str) -> Result<()> {
    ns.exec("ethtool", &["-K", dev, "tx", "off", "gro", "on"])
        .map(drop)
}

/// A veth pair with both ends tuned like every endpoint of the harness.
pub(crate) fn tuned_veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    veth(a, a_dev, b, b_dev)?;
    tune_endpoint(a, a_dev)?;
    tune_endpoint(b, b_dev)
}

/// Client source addresses: 10.1.1.x behind the front arm, or 10.0.3.x on the shared
/// segment of the one-armed topology.
pub fn client_address(arms: Arms, i: usize) -> Ipv4Addr {
    let (second, third) = match arms {
        Arms::Two => (1, 1),
        Arms::One => (0, 3),
    };
    Ipv4Addr::new(10, second, third + (i / 250) as u8, 1 + (i % 250) as u8)
}

impl Topology {
    pub fn build(spec: &Spec) -> Result<Self> {
        anyhow::ensure!(
            !(spec.ipv6 && spec.arms == Arms::One),
            "the one-armed topology is IPv4 only"
        );
        let prefix = unique_prefix();
        let lb = Netns::create(&format!("{prefix}-lb"))?;
        let client = Netns::create(&format!("{prefix}-cl"))?;
        let switch = Netns::create(&format!("{prefix}-sw"))?;
        let mut backends = Vec::new();
        for i in 0..spec.backends {
            backends.push(BackendHost {
                ns: Netns::create(&format!("{prefix}-b{i}"))?,
                address: Ipv4Addr::UNSPECIFIED,
                address6: None,
                name: format!("fe{}", i + 1),
            });
        }
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let plug_into_switch = |ns: &Netns, dev: &str, port: &str| -> Result<()> {
            veth(ns, dev, &switch, port)?;
            switch.ip(&["link", "set", port, "master", "br0"])?;
            tune_endpoint(&switch, port)
        };

        let mut peer_programs = Vec::new();
        let (lb_address, server_net, server_gw, snat_base, lb_interfaces, client_gw);
        match spec.arms {
            Arms::Two => {
                veth(&client, "eth0", &lb, "front")?;
                lb.ip(&["addr", "add", "10.1.0.1/16", "dev", "front"])?;
                client.ip(&["addr", "add", "10.1.0.2/16", "dev", "eth0"])?;
                peer_programs.push(attach_peer_program(&client, "eth0")?);
                plug_into_switch(&lb, "back", "p-lb")?;
                lb.ip(&["addr", "add", "10.2.0.1/24", "dev", "back"])?;
                lb_address = Ipv4Addr::new(10, 1, 0, 1);
                client_gw = "10.1.0.1";
                server_net = (Ipv4Addr::new(10, 2, 0, 0), 24);
                server_gw = "10.2.0.1";
                snat_base = Ipv4Addr::new(10, 2, 0, 100);
                lb_interfaces = vec!["front".to_string(), "back".to_string()];
            }
            Arms::One => {
                plug_into_switch(&lb, "eth0", "p-lb")?;
                lb.ip(&["addr", "add", "10.0.0.1/16", "dev", "eth0"])?;
                plug_into_switch(&client, "eth0", "p-cl")?;
                client.ip(&["addr", "add", "10.0.1.254/16", "dev", "eth0"])?;
                lb_address = Ipv4Addr::new(10, 0, 0, 1);
                client_gw = "10.0.0.1";
                server_net = (Ipv4Addr::new(10, 0, 2, 0), 16);
                server_gw = "10.0.0.1";
                snat_base = Ipv4Addr::new(10, 0, 0, 100);
                lb_interfaces = vec!["eth0".to_string()];
            }
        }
        peer_programs.push(attach_peer_program(&switch, "p-lb")?);
        tune_endpoint(&client, "eth0")?;
        client.ip(&["route", "add", "default", "via", client_gw])?;
        let client_addresses: Vec<Ipv4Addr> = (0..spec.clients)
            .map(|i| client_address(spec.arms, i))
            .collect();
        client.add_addresses("eth0", &client_addresses, 16)?;

        let snat_addresses: Vec<Ipv4Addr> = (0..spec.snat_addresses)
            .map(|i| Ipv4Addr::from(u32::from(snat_base) + i as u32))
            .collect();
        let lb_server_side = lb_interfaces.last().unwrap().clone();
        for a in &snat_addresses {
            lb.ip(&["addr", "add", &format!("{a}/32"), "dev", &lb_server_side])?;
        }

        for (i, b) in backends.iter_mut().enumerate() {
            plug_into_switch(&b.ns, "eth0", &format!("p-b{i}"))?;
            tune_endpoint(&b.ns, "eth0")?;
            let octets = server_net.0.octets();
            b.address = Ipv4Addr::new(octets[0], octets[1], octets[2], 11 + i as u8);
            b.ns.ip(&[
                "addr",
                "add",
                &format!("{}/{}", b.address, server_net.1),
                "dev",
                "eth0",
            ])?;
            b.ns.ip(&["route", "add", "default", "via", server_gw])?;
        }

        let (mut client_addresses6, mut snat_addresses6) = (Vec::new(), Vec::new());
        if spec.ipv6 {
            // nodad: the addresses are usable at once (no duplicate detection wait).
            let add = |ns: &Netns, address: Ipv6Addr, len: u8, dev: &str| {
                ns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{address}/{len}"),
                    "dev",
                    dev,
                    "nodad",
                ])
            };
            add(&lb, v6(CLIENT_NET6, LB_HOST6), 64, "front")?;
            add(&lb, v6(SERVER_NET6, LB_HOST6), 64, "back")?;
            add(&client, v6(CLIENT_NET6, CLIENT_HOST6), 64, "eth0")?;
            client.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &v6(CLIENT_NET6, LB_HOST6).to_string(),
            ])?;
            client_addresses6 = (0..spec.clients)
                .map(|i| v6(CLIENT_NET6, FIRST_CLIENT6 + i as u16))
                .collect();
            client.ip_batch(
                &client_addresses6
                    .iter()
                    .map(|a| format!("addr add {a}/64 dev eth0 nodad"))
                    .collect::<Vec<_>>(),
            )?;
            snat_addresses6 = (0..spec.snat_addresses)
                .map(|i| v6(SERVER_NET6, FIRST_SNAT6 + i as u16))
                .collect();
            for a in &snat_addresses6 {
                add(&lb, *a, 128, "back")?;
            }
            for (i, b) in backends.iter_mut().enumerate() {
                let address = v6(SERVER_NET6, FIRST_SERVER6 + i as u16);
                add(&b.ns, address, 64, "eth0")?;
                b.ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &v6(SERVER_NET6, LB_HOST6).to_string(),
                ])?;
                b.address6 = Some(address);
            }
        }

        Ok(Self {
            _peer_programs: peer_programs,
            prefix,
            lb,
            client,
            switch,
            backends,
            client_addresses,
            snat_addresses,
            client_addresses6,
            snat_addresses6,
            lb_address,
            lb_interfaces,
        })
    }

    pub fn backend_by_address(&self, address: Ipv4Addr) -> Option<&BackendHost> {
        self.backends.iter().find(|b| b.address == address)
    }
}
