//! Scale-out end to end: two lb nodes, each with its own BIRD announcing the VIP to a router
//! (BIRD, ECMP over both), three servers, clients from many addresses. Real daemons, real
//! BGP, real connections. Needs root and BIRD 2 (installed here if missing).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use anyhow::{ensure, Context, Result};
use harness::{
    client,
    cluster::Cluster,
    daemon::{lb_binary, Daemon},
    fixture::ServiceSpec,
    netns::{ensure_program, run_cmd},
    topology::VIP,
};
use lb::api::MaglevTable;

const CLIENTS: usize = 40;
/// Connections per client: from different source ports, so the router's ECMP hash sends
/// them over both nodes.
const CONNECTIONS_PER_CLIENT: usize = 6;
const CHOICES_COMPARED: u32 = 10_000;

fn maglev(daemon: &Daemon) -> Result<MaglevTable> {
    let json = daemon.cli_ok(&["maglev", "web-ext", "--json"])?;
    Ok(serde_json::from_str(&json)?)
}

fn new_flows(daemon: &Daemon) -> Result<u64> {
    Ok(daemon.status()?.counters["new_flows"])
}

/// The server each connection reached, per client.
fn connect_all(
    cluster: &Cluster,
    clients: &[Ipv4Addr],
    per_client: usize,
) -> Result<BTreeMap<Ipv4Addr, BTreeSet<String>>> {
    let vip = SocketAddr::new(VIP.into(), 443);
    let mut seen: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
    for &c in clients {
        for _ in 0..per_client {
            let reply = client::request(&cluster.client, c, vip)?;
            seen.entry(c).or_default().insert(reply.server);
        }
    }
    Ok(seen)
}

#[test]
fn two_nodes_behind_ecmp_send_each_client_to_one_server() -> Result<()> {
    ensure_program("bird", "bird2")?;
    let cluster = Cluster::build(2, 3, CLIENTS * 2)?;
    let service = ServiceSpec::default();
    let backends: Vec<Ipv4Addr> = cluster.backends.iter().map(|b| b.address).collect();
    let _servers = cluster.start_servers(service.backend_port)?;
    let started = Instant::now();
    let daemons = cluster
        .nodes
        .iter()
        .map(|n| {
            Daemon::start_binary(
                &n.site,
                &lb_binary()?,
                &n.announce_keys(),
                &service.toml(&backends),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    cluster.wait_for_next_hops(&[0, 1])?;
    eprintln!(
        "both nodes announced and installed as ECMP routes {:?} after the daemons started",
        started.elapsed()
    );

    // Same config, same table: byte for byte by server, and the same pick for 10,000 clients.
    let (a, b) = (maglev(&daemons[0])?, maglev(&daemons[1])?);
    ensure!(a == b, "the nodes' Maglev tables differ");
    let differing = (0..CHOICES_COMPARED)
        .map(|i| IpAddr::from(Ipv4Addr::from(0x0a40_0000 + i)))
        .filter(|&c| a.server_for(c) != b.server_for(c))
        .count();
    ensure!(
        differing == 0,
        "{differing} of {CHOICES_COMPARED} clients would get different servers"
    );

    // (1) Clients spread over both nodes; each reaches one server whichever node carries it.
    let (first, fresh) = cluster.client_addresses.split_at(CLIENTS);
    let seen = connect_all(&cluster, first, CONNECTIONS_PER_CLIENT)?;
    for (c, servers) in &seen {
        ensure!(servers.len() == 1, "{c} reached {servers:?}");
        let server = servers.iter().next().unwrap();
        let predicted = a.server_for((*c).into()).unwrap_or_default();
        let name_of = |endpoint: &str| {
            cluster
                .backends
                .iter()
                .find(|b| endpoint.starts_with(&format!("{}:", b.address)))
                .map(|b| b.name.clone())
        };
        ensure!(
            name_of(predicted).as_deref() == Some(server.as_str()),
            "{c} reached {server}, the table says {predicted}"
        );
    }
    let per_node: Vec<u64> = daemons.iter().map(new_flows).collect::<Result<_>>()?;
    let total = (CLIENTS * CONNECTIONS_PER_CLIENT) as u64;
    ensure!(
        per_node.iter().sum::<u64>() == total && per_node.iter().all(|&n| n > total / 5),
        "new flows per node {per_node:?} of {total}: ECMP did not spread them"
    );
    eprintln!("ECMP spread {total} connections as {per_node:?} over the two nodes");

    // (2) Withdraw node 0: its routes go, and every client still reaches its server via node 1.
    let withdrawn = Instant::now();
    daemons[0].cli_ok(&["node", "drain"])?;
    cluster.wait_for_next_hops(&[1])?;
    eprintln!(
        "node 0 drained: route withdrawn after {:?}",
        withdrawn.elapsed()
    );
    let before_on_0 = new_flows(&daemons[0])?;
    let after = connect_all(&cluster, first, 2)?;
    for (c, servers) in &after {
        ensure!(
            servers == &seen[c],
            "{c} reached {servers:?} through node 1, {:?} before",
            seen[c]
        );
    }
    ensure!(
        new_flows(&daemons[0])? == before_on_0,
        "node 0 took new connections after it was drained"
    );
    let status = daemons[0].status()?;
    ensure!(status.node_drained && status.announced == Some(vec![]));
    daemons[0].cli_ok(&["node", "undrain"])?;
    cluster.wait_for_next_hops(&[0, 1])?;

    // (3) Drain a server on both nodes: no new client reaches it, through either node.
    let victim = &cluster.backends[0];
    for d in &daemons {
        d.cli_ok(&["backend", "drain", "web-ext", &victim.address.to_string()])?;
    }
    let newcomers = connect_all(&cluster, fresh, 3)?;
    let on_victim: Vec<&Ipv4Addr> = newcomers
        .iter()
        .filter(|(_, s)| s.contains(&victim.name))
        .map(|(c, _)| c)
        .collect();
    ensure!(
        on_victim.is_empty(),
        "new clients {on_victim:?} reached the drained {}",
        victim.name
    );
    for (c, servers) in &newcomers {
        ensure!(servers.len() == 1, "{c} reached {servers:?}");
    }
    let flows_now: Vec<u64> = daemons.iter().map(new_flows).collect::<Result<_>>()?;
    ensure!(
        flows_now
            .iter()
            .zip(&per_node)
            .all(|(now, then)| now > then),
        "both nodes should have carried newcomers: {flows_now:?}"
    );

    // A node that stops withdraws its routes first.
    let stopping = Instant::now();
    drop(daemons);
    cluster.wait_for_next_hops(&[])?;
    eprintln!(
        "both daemons stopped: routes withdrawn after {:?}",
        stopping.elapsed()
    );
    Ok(())
}

/// Two nodes' configs: the check accepts their own SNAT addresses and refuses a shared one.
#[test]
fn config_check_refuses_nodes_sharing_a_snat_address() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("lb-peers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let service = ServiceSpec::default().toml(&[Ipv4Addr::new(10, 2, 0, 11)]);
    let write = |name: &str, snat: &str| -> Result<String> {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "[daemon]\ninterfaces = [\"eth0\"]\nsnat_addresses = [\"{snat}\"]\n\n{service}"
            ),
        )?;
        Ok(path.display().to_string())
    };
    let (a, b, c) = (
        write("a.toml", "10.2.0.101")?,
        write("b.toml", "10.2.0.102")?,
        write("c.toml", "10.2.0.101")?,
    );
    let lb = lb_binary()?.display().to_string();
    let ok = run_cmd(&lb, &["config", "check", &a, "--peer", &b]);
    let refused = run_cmd(&lb, &["config", "check", &a, "--peer", &c]);
    let _ = std::fs::remove_dir_all(&dir);
    ok?;
    let e = format!(
        "{:#}",
        refused
            .err()
            .context("a shared SNAT address was accepted")?
    );
    ensure!(e.contains("10.2.0.101 used by both nodes"), "{e}");
    Ok(())
}
