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
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};

use crate::netns::{unique_prefix, Netns};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);

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
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            arms: Arms::Two,
            backends: 3,
            clients: 30,
            snat_addresses: 2,
        }
    }
}

pub struct BackendHost {
    pub ns: Netns,
    pub address: Ipv4Addr,
    pub name: String,
}

/// An `xdp_pass` program attached to a veth peer of one of lb's interfaces. veth delivers
/// frames that lb sends with XDP_TX only to a peer that has an XDP program of its own
/// (GRO alone is enough for redirected frames); a real NIC needs nothing like it.
struct PeerProgram {
    ns_name: String,
    ebpf: Option<Ebpf>,
}

fn attach_peer_program(ns: &Netns, dev: &str) -> Result<PeerProgram> {
    let ebpf = ns.run(|| -> Result<Ebpf> {
        let mut ebpf = Ebpf::load(lb::dataplane::BASELINE_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut("xdp_pass")
            .context("xdp_pass missing")?
            .try_into()?;
        program.load()?;
        program
            .attach(dev, XdpMode::Driver)
            .with_context(|| format!("attach xdp_pass to {dev}"))?;
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
    /// lb's own address on the client side (for "non-VIP traffic still works").
    pub lb_address: Ipv4Addr,
    pub lb_interfaces: Vec<String>,
}

/// veths deliver frames without a complete checksum (the sender offloads it); a real NIC
/// never does. Make the endpoints compute full checksums, and turn GRO on so frames that
/// lb redirects in native mode have a receiving NAPI on the peer.
fn tune_endpoint(ns: &Netns, dev: &str) -> Result<()> {
    ns.exec("ethtool", &["-K", dev, "tx", "off", "gro", "on"])
        .map(drop)
}

/// Client source addresses: 10.1.1.x behind the front arm, or 10.0.3.x on the shared
/// segment of the one-armed topology.
fn client_address(arms: Arms, i: usize) -> Ipv4Addr {
    let (second, third) = match arms {
        Arms::Two => (1, 1),
        Arms::One => (0, 3),
    };
    Ipv4Addr::new(10, second, third + (i / 250) as u8, 1 + (i % 250) as u8)
}

impl Topology {
    pub fn build(spec: &Spec) -> Result<Self> {
        let prefix = unique_prefix();
        let lb = Netns::create(&format!("{prefix}-lb"))?;
        let client = Netns::create(&format!("{prefix}-cl"))?;
        let switch = Netns::create(&format!("{prefix}-sw"))?;
        let mut backends = Vec::new();
        for i in 0..spec.backends {
            backends.push(BackendHost {
                ns: Netns::create(&format!("{prefix}-b{i}"))?,
                address: Ipv4Addr::UNSPECIFIED,
                name: format!("fe{}", i + 1),
            });
        }
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let plug_into_switch = |ns: &Netns, dev: &str, port: &str| -> Result<()> {
            crate::netns::run_cmd(
                "ip",
                &[
                    "link",
                    "add",
                    dev,
                    "netns",
                    ns.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    switch.name(),
                ],
            )?;
            switch.ip(&["link", "set", port, "master", "br0", "up"])?;
            tune_endpoint(&switch, port)?;
            ns.ip(&["link", "set", dev, "up"])?;
            Ok(())
        };

        let mut peer_programs = Vec::new();
        let (lb_address, server_net, server_gw, snat_base, lb_interfaces, client_gw);
        match spec.arms {
            Arms::Two => {
                crate::netns::run_cmd(
                    "ip",
                    &[
                        "link",
                        "add",
                        "eth0",
                        "netns",
                        client.name(),
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "front",
                        "netns",
                        lb.name(),
                    ],
                )?;
                lb.ip(&["link", "set", "front", "up"])?;
                lb.ip(&["addr", "add", "10.1.0.1/16", "dev", "front"])?;
                client.ip(&["link", "set", "eth0", "up"])?;
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
        client.ip_batch(
            &client_addresses
                .iter()
                .map(|a| format!("addr add {a}/16 dev eth0"))
                .collect::<Vec<_>>(),
        )?;

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

        Ok(Self {
            _peer_programs: peer_programs,
            prefix,
            lb,
            client,
            switch,
            backends,
            client_addresses,
            snat_addresses,
            lb_address,
            lb_interfaces,
        })
    }

    pub fn backend_by_address(&self, address: Ipv4Addr) -> Option<&BackendHost> {
        self.backends.iter().find(|b| b.address == address)
    }
}
