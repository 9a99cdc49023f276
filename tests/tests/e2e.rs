//! End-to-end: real TCP clients in a namespace, the real XDP program (via the real `lb`
//! daemon) in another, real servers behind it. Needs root.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use harness::{
    client::{self, Connection},
    daemon::ensure_no_drops,
    fixture::{Fixture, ServiceSpec},
    topology::{Arms, Spec},
    wait::until,
};

/// Connections per client address in the affinity test.
const CONNECTIONS_PER_CLIENT: usize = 10;

/// Which server each client reached, per connection.
fn spread(
    f: &Fixture,
    clients: &[Ipv4Addr],
    per_client: usize,
) -> Result<BTreeMap<Ipv4Addr, Vec<String>>> {
    let mut seen = BTreeMap::new();
    for &c in clients {
        let servers: Vec<String> = (0..per_client)
            .map(|_| f.ask(c).map(|r| r.server))
            .collect::<Result<_>>()?;
        seen.insert(c, servers);
    }
    Ok(seen)
}

fn counter(f: &Fixture, name: &str) -> Result<u64> {
    Ok(f.daemon.status()?.counters.get(name).copied().unwrap_or(0))
}

fn check_affinity_and_balance(arms: Arms) -> Result<()> {
    let f = Fixture::start(
        &Spec {
            arms,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    let seen = spread(&f, &f.topology.client_addresses, CONNECTIONS_PER_CLIENT)?;

    let mut clients_per_server: BTreeMap<String, usize> = BTreeMap::new();
    for (client, servers) in &seen {
        let distinct: BTreeSet<&String> = servers.iter().collect();
        ensure!(
            distinct.len() == 1,
            "client {client} reached several servers: {servers:?}"
        );
        *clients_per_server.entry(servers[0].clone()).or_default() += 1;
    }
    let fair = seen.len() as f64 / f.servers.len() as f64;
    for server in &f.servers {
        let n = clients_per_server.get(&server.name).copied().unwrap_or(0);
        ensure!(
            n > 0,
            "{} got no clients: {clients_per_server:?}",
            server.name
        );
        ensure!(
            (n as f64) <= 2.0 * fair,
            "{} got {n} clients, over twice the fair {fair}: {clients_per_server:?}",
            server.name
        );
    }

    // The data plane's own view agrees: every connection was a new flow, and all but the
    // first of each client came from its affinity entry.
    let status = f.daemon.status()?;
    let total = (seen.len() * CONNECTIONS_PER_CLIENT) as u64;
    let svc = &status.services[0].stats;
    ensure!(
        svc.new_flows == total,
        "new_flows {} != {total}",
        svc.new_flows
    );
    ensure!(
        svc.affinity_misses == seen.len() as u64,
        "misses {}",
        svc.affinity_misses
    );
    ensure!(
        svc.affinity_hits == total - seen.len() as u64,
        "hits {}",
        svc.affinity_hits
    );
    ensure_no_drops(&status, &[])?;

    // No packet was lost while neighbours were unresolved: the first packets toward each
    // new client and server went through the kernel (pass_no_neigh), and no client had to
    // retransmit anything.
    ensure!(
        status.counters["pass_no_neigh"] > 0,
        "the unresolved-neighbour path was not exercised"
    );
    let retransmitted = tcp_retransmitted_segments(&f.topology.client)?;
    ensure!(
        retransmitted == 0,
        "clients retransmitted {retransmitted} segments"
    );
    Ok(())
}

/// `RetransSegs` from the namespace's TCP MIB.
fn tcp_retransmitted_segments(ns: &harness::netns::Netns) -> Result<u64> {
    // thread-self: /proc/self/net would show the process's namespace, not this thread's.
    let snmp = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut tcp_lines = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp_lines.next(), tcp_lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        anyhow::bail!("no Tcp lines in snmp")
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .map(|(_, v)| v.parse().map_err(Into::into))
        .unwrap_or_else(|| anyhow::bail!("no RetransSegs in snmp"))
}

/// 3 backends, 30 client addresses x 10 connections each. Every client always
/// reaches the same backend, every backend gets clients, none more than twice its fair share.
#[test]
fn source_affinity_holds_and_load_spreads() -> Result<()> {
    check_affinity_and_balance(Arms::Two)
}

/// The same through the one-armed topology (everything leaves by XDP_TX).
#[test]
fn one_armed_source_affinity_holds() -> Result<()> {
    check_affinity_and_balance(Arms::One)
}

/// VIP:443 reaches the servers on 4443, and the server sees a SNAT address, not the client.
#[test]
fn port_translation_and_source_nat() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 4,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    for &c in &f.topology.client_addresses {
        let reply = f.ask(c)?;
        let IpAddr::V4(peer) = reply.peer.ip() else {
            anyhow::bail!("IPv6 peer {}", reply.peer)
        };
        ensure!(
            f.topology.snat_addresses.contains(&peer),
            "server saw {peer}, not a SNAT address"
        );
        ensure!(peer != c);
    }
    // Only the 4443 listeners exist: a reply at all proves the port was translated.
    ensure!(f.servers.iter().all(|s| s.address.port() == 4443));
    ensure!(f.servers.iter().map(|s| s.accepted()).sum::<u64>() == 4);
    Ok(())
}

/// A backend reaching its own VIP (hairpin) gets a working connection.
#[test]
fn backend_reaches_its_own_vip() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 1,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    for backend in &f.topology.backends {
        for _ in 0..5 {
            let reply = client::request(&backend.ns, backend.address, f.vip())?;
            let IpAddr::V4(peer) = reply.peer.ip() else {
                anyhow::bail!("IPv6 peer")
            };
            ensure!(
                f.topology.snat_addresses.contains(&peer),
                "hairpin not source-NATed: {peer}"
            );
        }
    }
    Ok(())
}

/// With `affinity = "none"` one client's connections spread over the servers.
#[test]
fn no_affinity_spreads_one_client() -> Result<()> {
    let service = ServiceSpec {
        affinity: "none".into(),
        ..ServiceSpec::default()
    };
    let f = Fixture::start(
        &Spec {
            clients: 1,
            ..Spec::default()
        },
        service,
    )?;
    let client = f.topology.client_addresses[0];
    let servers: BTreeSet<String> = (0..60)
        .map(|_| f.ask(client).map(|r| r.server))
        .collect::<Result<_>>()?;
    ensure!(
        servers.len() == f.servers.len(),
        "60 connections reached only {servers:?}"
    );
    ensure!(counter(&f, "affinity_hits")? == 0);
    Ok(())
}

/// With `source-port`, one address with different ports may reach different servers,
/// while the same address and port always reaches the same one.
#[test]
fn source_port_affinity_distinguishes_ports() -> Result<()> {
    let service = ServiceSpec {
        affinity: "source-port".into(),
        ..ServiceSpec::default()
    };
    let f = Fixture::start(
        &Spec {
            clients: 1,
            ..Spec::default()
        },
        service,
    )?;
    let client = f.topology.client_addresses[0];
    let mut by_port = BTreeMap::new();
    for port in 20_000..20_040u16 {
        let reply = Connection::open(&f.topology.client, client, port, f.vip())?.ask()?;
        by_port.insert(port, reply.server);
    }
    let distinct: BTreeSet<&String> = by_port.values().collect();
    ensure!(distinct.len() > 1, "40 ports all reached {distinct:?}");
    // Same port again (after the first connection closed): same server, via affinity.
    for port in [20_000u16, 20_017, 20_039] {
        let again = reconnect_same_port(&f, client, port)?;
        ensure!(
            again == by_port[&port],
            "port {port}: {again} then {}",
            by_port[&port]
        );
    }
    Ok(())
}

/// Reuses a client port right after closing it: retried while the previous connection's
/// TIME_WAIT still holds the port locally.
fn reconnect_same_port(f: &Fixture, client: Ipv4Addr, port: u16) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Connection::open(&f.topology.client, client, port, f.vip()) {
            Ok(mut c) => return Ok(c.ask()?.server),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e),
        }
    }
}

/// An affinity expires after its (short) timeout and a new choice is made. A
/// fourth server is added while affinities are fresh: clients that Maglev now maps to it
/// stay on their old server until their affinity has been idle for the timeout, then move.
#[test]
fn affinity_expires_after_timeout() -> Result<()> {
    const TIMEOUT_S: u32 = 3;
    let service = ServiceSpec {
        affinity_timeout: TIMEOUT_S,
        ..ServiceSpec::default()
    };
    let f = Fixture::start_holding_back_last(
        &Spec {
            backends: 4,
            clients: 40,
            ..Spec::default()
        },
        service.clone(),
    )?;
    let before = f.servers_of(&f.topology.client_addresses)?;
    ensure!(
        before.values().all(|s| s != "fe4"),
        "fe4 was not in the pool yet"
    );

    f.daemon
        .reload(&service.toml(&Fixture::addresses(&f.topology)))?;
    let started = Instant::now();
    for (&c, server) in &before {
        let now = f.ask(c)?.server;
        ensure!(
            &now == server,
            "{c} moved from {server} to {now} while its affinity was fresh"
        );
    }
    ensure!(
        started.elapsed() < Duration::from_secs(u64::from(TIMEOUT_S)),
        "machine too slow for this check"
    );

    // Idle past the timeout (the check above refreshed every affinity).
    std::thread::sleep(Duration::from_secs(u64::from(TIMEOUT_S) + 2));
    let moved = f.count_moved(&before, "fe4")?;
    ensure!(
        moved > 0,
        "no client moved to fe4 after its affinity expired"
    );
    Ok(())
}

/// Non-VIP traffic still works with the program attached (ping and TCP to
/// lb's own address, from the client side).
#[test]
fn non_vip_traffic_passes() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 1,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    let lb_addr = f.topology.lb_address.to_string();
    f.topology
        .client
        .exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", &lb_addr])?;

    let listener = f
        .topology
        .lb
        .run(|| TcpListener::bind((f.topology.lb_address, 2222)))??;
    let accept = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    let conn = Connection::open(
        &f.topology.client,
        f.topology.client_addresses[0],
        0,
        SocketAddrV4::new(f.topology.lb_address, 2222),
    );
    ensure!(
        conn.is_ok(),
        "TCP to lb's own address failed: {:?}",
        conn.err()
    );
    let peer = accept
        .join()
        .map_err(|_| anyhow::anyhow!("accept panicked"))??;
    ensure!(
        peer.ip() == IpAddr::V4(f.topology.client_addresses[0]),
        "lb saw {peer}"
    );
    // The program saw that TCP and let it through.
    ensure!(
        counter(&f, "pass_not_service")? > 0,
        "lb's own TCP traffic was not seen by the program"
    );
    Ok(())
}

/// SNAT port exhaustion: with 8 ports on one SNAT address and one server (a SNAT port is
/// unique per server address and port, as the return flow's key), connections beyond 8 are refused
/// (counted, and a warning in the daemon's log naming what to change) while the ones
/// already open keep working, on their server.
#[test]
fn snat_exhaustion_refuses_new_flows_and_keeps_existing_ones() -> Result<()> {
    const PORTS: usize = 8;
    /// Short: a refused handshake only ever times out, and each try costs this long.
    const REFUSED_WITHIN: Duration = Duration::from_millis(1500);
    let f = Fixture::start_with(
        &Spec {
            backends: 1,
            clients: PORTS + 4,
            snat_addresses: 1,
            ..Spec::default()
        },
        ServiceSpec::default(),
        &format!(
            "snat_port_min = 20000\nsnat_port_max = {}\n",
            20000 + PORTS - 1
        ),
    )?;
    let mut open = Vec::new();
    let mut refused = 0;
    for &c in &f.topology.client_addresses {
        match Connection::open_within(&f.topology.client, c, 0, f.vip(), REFUSED_WITHIN) {
            Ok(mut conn) => {
                let server = conn.ask()?.server;
                open.push((conn, server));
            }
            Err(_) => refused += 1,
        }
    }
    ensure!(
        open.len() <= PORTS && refused >= f.topology.client_addresses.len() - PORTS,
        "{} connections open and {refused} refused with {PORTS} SNAT ports",
        open.len()
    );
    ensure!(!open.is_empty(), "no connection got a SNAT port");
    ensure!(counter(&f, "drop_snat_exhausted")? > 0);

    // The daemon checks the counters every second.
    until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        "the exhaustion warning",
        || Ok(f.daemon.log().contains("SNAT ports exhausted")),
    )
    .with_context(|| format!("daemon log:\n{}", f.daemon.log()))?;
    for (conn, server) in &mut open {
        let now = conn.ask()?.server;
        ensure!(
            &now == server,
            "an open connection moved from {server} to {now}"
        );
    }
    ensure_no_drops(&f.daemon.status()?, &["drop_snat_exhausted"])
}

/// Closed connections leave the flow table within the closing timeout, though the daemon's
/// walk of the table (garbage collection) does not run in the meantime: the data plane
/// reports each close and the daemon removes the flow when its timeout has passed.
#[test]
fn closed_connections_leave_the_flow_table_within_the_closing_timeout() -> Result<()> {
    const CLOSING_TIMEOUT_S: u64 = 2;
    const CONNECTIONS: usize = 60;
    let f = Fixture::start_with(
        &Spec {
            clients: 10,
            ..Spec::default()
        },
        ServiceSpec::default(),
        &format!("closing_timeout = {CLOSING_TIMEOUT_S}\ngc_interval = 3600"),
    )?;
    let pinned = lb::dataplane::versioned_pin_dir(&f.daemon.pin_dir)?.join(lb_common::MAP_FLOWS);
    let entries = || -> Result<usize> {
        let map = aya::maps::MapData::from_pin(&pinned).context("open the pinned flow table")?;
        let flows: aya::maps::HashMap<_, lb_common::FlowKey, lb_common::FlowEntry> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map))?;
        Ok(flows.keys().count())
    };
    let collected_before = f.daemon.status()?.tables.collected_flows;
    for i in 0..CONNECTIONS {
        f.ask(f.topology.client_addresses[i % 10])?;
    }
    let closed = Instant::now();
    ensure!(
        entries()? > 0,
        "no flow entries while the connections close"
    );
    until(
        Duration::from_secs(CLOSING_TIMEOUT_S + 4),
        Duration::from_millis(100),
        "closed flows removed",
        || Ok(entries()? == 0),
    )?;
    println!(
        "flow table empty {:?} after the last close",
        closed.elapsed()
    );
    ensure!(
        f.daemon.status()?.tables.collected_flows == collected_before,
        "garbage collection removed them, not the close events"
    );
    Ok(())
}

/// Only the clients a service's lists admit open connections; the others' handshakes are
/// dropped and counted against the service, and a reload that lifts the lists lets them in
/// without touching the connections already open.
#[test]
fn source_lists_admit_only_their_clients_until_reloaded() -> Result<()> {
    /// A refused handshake only ever times out, and each try costs this long.
    const REFUSED_WITHIN: Duration = Duration::from_millis(1500);
    let service = ServiceSpec {
        extra: "allow = [\"10.1.1.0/30\"]\ndeny = [\"10.1.1.2\"]\n".into(),
        ..ServiceSpec::default()
    };
    let f = Fixture::start(
        &Spec {
            clients: 4,
            ..Spec::default()
        },
        service.clone(),
    )?;
    let clients = &f.topology.client_addresses;
    let listed: Vec<Ipv4Addr> = (1..=4).map(|i| Ipv4Addr::new(10, 1, 1, i)).collect();
    ensure!(
        clients[..] == listed[..],
        "the lists above assume clients {listed:?}"
    );
    let mut admitted = Vec::new();
    for (client, expected) in clients.iter().zip([true, false, true, false]) {
        let opened =
            Connection::open_within(&f.topology.client, *client, 0, f.vip(), REFUSED_WITHIN);
        ensure!(
            opened.is_ok() == expected,
            "{client}: connected {} but the lists say {expected}",
            opened.is_ok()
        );
        if let Ok(mut conn) = opened {
            let server = conn.ask()?.server;
            admitted.push((conn, server));
        }
    }
    let status = f.daemon.status()?;
    let refused = status.services[0].refused_flows;
    // Each refused client's SYN and its retransmissions.
    ensure!(refused >= 2, "{refused} refused flows counted");
    ensure!(status.counters.get("drop_source_refused") == Some(&refused));
    ensure_no_drops(&status, &["drop_source_refused"])?;

    let lifted = ServiceSpec {
        extra: String::new(),
        ..service
    };
    f.daemon
        .reload(&lifted.toml(&Fixture::addresses(&f.topology)))?;
    for client in [clients[1], clients[3]] {
        f.ask(client)
            .with_context(|| format!("{client} after the lists were lifted"))?;
    }
    for (conn, server) in &mut admitted {
        let now = conn.ask()?.server;
        ensure!(
            &now == server,
            "an open connection moved from {server} to {now}"
        );
    }
    ensure!(f.daemon.status()?.services[0].refused_flows == refused);
    Ok(())
}
