//! End-to-end for IPv6 and UDP, like `e2e.rs` for IPv4 TCP: real clients in a namespace,
//! the real `lb` daemon and XDP program, real servers, on the dual-stack topology. Needs
//! root.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use anyhow::{bail, ensure, Context, Result};
use harness::{
    client::{self, Reply},
    daemon::{ensure_no_drops, Daemon},
    server::{Server, UdpServer},
    topology::{Spec, Topology, VIP, VIP6},
};

const WEB_PORT: u16 = 443;
const WEB_BACKEND_PORT: u16 = 4443;
/// The A/V edge's STUN/TURN port, the pool's UDP traffic.
const TURN_PORT: u16 = 3478;
const CONNECTIONS_PER_CLIENT: usize = 5;
const SOCKETS_PER_CLIENT: usize = 3;

fn dual_stack(clients: usize) -> Result<Topology> {
    Topology::build(&Spec {
        clients,
        ipv6: true,
        ..Spec::default()
    })
}

/// A `[[service]]` table for `vip`:`port`, source affinity, to `backends` on `backend_port`.
fn service(
    name: &str,
    protocol: &str,
    vip: IpAddr,
    port: u16,
    backend_port: u16,
    backends: &[IpAddr],
) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "[[service]]\nname = {name:?}\nprotocol = {protocol:?}\nvip = \"{vip}\"\nport = {port}\nbackend_port = {backend_port}\naffinity = \"source\"\nbackends = [{}]\n",
        list.join(", ")
    )
}

fn v4_servers(t: &Topology) -> Vec<IpAddr> {
    t.backends.iter().map(|b| b.address.into()).collect()
}

fn v6_servers(t: &Topology) -> Result<Vec<IpAddr>> {
    t.backends
        .iter()
        .map(|b| b.address6.map(IpAddr::from).context("no IPv6 address"))
        .collect()
}

/// The STUN/TURN service in both families, to `v4` and `v6` servers.
fn turn_services(v4: &[IpAddr], v6: &[IpAddr]) -> String {
    service("turn", "udp", VIP.into(), TURN_PORT, TURN_PORT, v4)
        + &service("turn6", "udp", VIP6.into(), TURN_PORT, TURN_PORT, v6)
}

/// Every client reached one server only, and every server got clients.
fn check_affinity(
    seen: &BTreeMap<IpAddr, BTreeSet<String>>,
    servers: usize,
    what: &str,
) -> Result<()> {
    for (client, reached) in seen {
        ensure!(
            reached.len() == 1,
            "{what}: client {client} reached {reached:?}"
        );
    }
    let used: BTreeSet<&String> = seen.values().flatten().collect();
    ensure!(used.len() == servers, "{what}: only {used:?} got clients");
    Ok(())
}

/// IPv6 clients reach the IPv6 VIP:443, land on the servers' 4443, always the same server
/// per client, and the servers see an IPv6 SNAT address. An IPv4 service on the same
/// daemon keeps working alongside.
#[test]
fn ipv6_source_affinity_port_translation_and_snat() -> Result<()> {
    let t = dual_stack(30)?;
    let servers = t
        .backends
        .iter()
        .map(|b| {
            Server::start(
                &b.ns,
                &b.name,
                b.address6.context("no IPv6")?,
                WEB_BACKEND_PORT,
            )
        })
        .chain(
            t.backends
                .iter()
                .map(|b| Server::start(&b.ns, &b.name, b.address, WEB_BACKEND_PORT)),
        )
        .collect::<Result<Vec<_>>>()?;
    let services = service(
        "web6",
        "tcp",
        VIP6.into(),
        WEB_PORT,
        WEB_BACKEND_PORT,
        &v6_servers(&t)?,
    ) + &service(
        "web",
        "tcp",
        VIP.into(),
        WEB_PORT,
        WEB_BACKEND_PORT,
        &v4_servers(&t),
    );
    let daemon = Daemon::start(&t, &services)?;

    let vip = SocketAddr::new(VIP6.into(), WEB_PORT);
    let mut seen: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for &c in &t.client_addresses6 {
        for _ in 0..CONNECTIONS_PER_CLIENT {
            let reply = client::request(&t.client, c, vip)?;
            ensure!(
                t.snat_addresses6
                    .iter()
                    .any(|s| IpAddr::from(*s) == reply.peer.ip()),
                "server saw {}, not an IPv6 SNAT address",
                reply.peer
            );
            seen.entry(c.into()).or_default().insert(reply.server);
        }
    }
    check_affinity(&seen, t.backends.len(), "IPv6 TCP")?;
    let accepted6: u64 = servers[..t.backends.len()]
        .iter()
        .map(Server::accepted)
        .sum();
    let total = (t.client_addresses6.len() * CONNECTIONS_PER_CLIENT) as u64;
    ensure!(
        accepted6 == total,
        "IPv6 servers accepted {accepted6} of {total}"
    );

    // IPv4 alongside, on the same daemon.
    let reply = client::request(
        &t.client,
        t.client_addresses[0],
        SocketAddr::new(VIP.into(), WEB_PORT),
    )?;
    ensure!(
        t.snat_addresses
            .iter()
            .any(|s| IpAddr::from(*s) == reply.peer.ip()),
        "IPv4 server saw {}",
        reply.peer
    );

    let status = daemon.status()?;
    let web6 = status
        .services
        .iter()
        .find(|s| s.name == "web6")
        .context("no web6 in status")?;
    ensure!(
        web6.stats.new_flows == total && web6.stats.affinity_misses == seen.len() as u64,
        "web6: {} new flows, {} affinity misses",
        web6.stats.new_flows,
        web6.stats.affinity_misses
    );
    ensure_no_drops(&status, &[])
}

/// UDP in both families: every datagram is answered through lb, a client's sockets (one
/// flow each) all reach the client's server, each flow keeps its SNAT address and port,
/// and the server's first answer confirms the flow.
#[test]
fn udp_affinity_and_snat_in_both_families() -> Result<()> {
    let t = dual_stack(30)?;
    let mut udp_servers = Vec::new();
    for b in &t.backends {
        udp_servers.push(UdpServer::start(&b.ns, &b.name, b.address, TURN_PORT)?);
        udp_servers.push(UdpServer::start(
            &b.ns,
            &b.name,
            b.address6.context("no IPv6")?,
            TURN_PORT,
        )?);
    }
    let services = turn_services(&v4_servers(&t), &v6_servers(&t)?);
    let daemon = Daemon::start(&t, &services)?;

    let families: [(&str, Vec<IpAddr>, IpAddr, Vec<IpAddr>); 2] = [
        (
            "IPv4",
            t.client_addresses.iter().map(|&a| a.into()).collect(),
            VIP.into(),
            t.snat_addresses.iter().map(|&a| a.into()).collect(),
        ),
        (
            "IPv6",
            t.client_addresses6.iter().map(|&a| a.into()).collect(),
            VIP6.into(),
            t.snat_addresses6.iter().map(|&a| a.into()).collect(),
        ),
    ];
    let mut flows = 0;
    for (family, clients, vip, snat) in families {
        let mut seen: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for &c in &clients {
            for _ in 0..SOCKETS_PER_CLIENT {
                let socket = client::udp_socket(
                    &t.client,
                    SocketAddr::new(c, 0),
                    SocketAddr::new(vip, TURN_PORT),
                )?;
                let first: Reply = client::udp_ask(&socket)?;
                let second = client::udp_ask(&socket)?;
                ensure!(
                    snat.contains(&first.peer.ip()),
                    "{family}: server saw {}, not a SNAT address",
                    first.peer
                );
                ensure!(
                    first == second,
                    "{family}: one flow, two translations: {first:?} then {second:?}"
                );
                seen.entry(c).or_default().insert(first.server);
                flows += 1;
            }
        }
        check_affinity(&seen, t.backends.len(), family)?;
    }
    let status = daemon.status()?;
    let confirmed = status.counters["flows_confirmed"];
    ensure!(
        confirmed == flows,
        "{confirmed} flows confirmed, {flows} UDP flows answered"
    );
    let answered: u64 = udp_servers.iter().map(UdpServer::answered).sum();
    ensure!(
        answered >= 2 * flows,
        "servers answered {answered} datagrams for {flows} flows"
    );
    ensure_no_drops(&status, &[])
}

/// A server without the UDP port answers "port unreachable"; lb translates the ICMP error,
/// so the client's connected socket sees the refusal at once instead of timing out.
#[test]
fn port_unreachable_from_a_server_reaches_the_client() -> Result<()> {
    let t = dual_stack(1)?;
    // One server, and nothing listening on its UDP port.
    let only = &t.backends[..1];
    let services = turn_services(
        &[only[0].address.into()],
        &[only[0].address6.context("no IPv6")?.into()],
    );
    let daemon = Daemon::start(&t, &services)?;
    for (client, vip) in [
        (IpAddr::from(t.client_addresses[0]), IpAddr::from(VIP)),
        (t.client_addresses6[0].into(), VIP6.into()),
    ] {
        let socket = client::udp_socket(
            &t.client,
            SocketAddr::new(client, 0),
            SocketAddr::new(vip, TURN_PORT),
        )?;
        match client::udp_ask(&socket) {
            Ok(reply) => bail!("{vip}: an answer from a closed port: {reply:?}"),
            Err(e) => {
                let refused = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
                ensure!(refused, "{vip}: expected connection refused, got {e:#}");
            }
        }
    }
    let status = daemon.status()?;
    ensure!(
        status.counters["icmp_errors_translated"] >= 2,
        "icmp_errors_translated: {}",
        status.counters["icmp_errors_translated"]
    );
    ensure_no_drops(&status, &[])
}
