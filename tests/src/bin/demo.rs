//! `cargo xtask demo`: a small Lync Front End pool in namespaces, real traffic through lb,
//! and a report of where every client landed.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Instant,
};

use anyhow::{ensure, Result};
use comfy_table::{presets::UTF8_FULL, Table};
use harness::{
    fixture::{Fixture, ServiceSpec},
    topology::{Spec, VIP},
};

const CLIENTS: usize = 40;
const CONNECTIONS_PER_CLIENT: usize = 8;

fn main() -> Result<()> {
    println!("lb demo: external Web Services VIP {VIP}:443 -> 3 Front End servers on :4443, source affinity\n");
    let spec = Spec {
        clients: CLIENTS,
        ..Spec::default()
    };
    let started = Instant::now();
    let f = Fixture::start(&spec, ServiceSpec::default())?;
    println!(
        "topology up in {:.1?}: {} client addresses, lb on {:?} (two-armed), SNAT {:?}, servers {}",
        started.elapsed(),
        f.topology.client_addresses.len(),
        f.topology.lb_interfaces,
        f.topology.snat_addresses,
        f.topology
            .backends
            .iter()
            .map(|b| format!("{}={}", b.name, b.address))
            .collect::<Vec<_>>()
            .join(" "),
    );

    let started = Instant::now();
    let mut per_client: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    let mut snat_seen = BTreeSet::new();
    // Round-robin over clients so each client's connections are spread out in time.
    for _ in 0..CONNECTIONS_PER_CLIENT {
        for &c in &f.topology.client_addresses {
            let reply = f.ask(c)?;
            snat_seen.insert(reply.peer.ip());
            per_client.entry(c).or_default().push(reply.server);
        }
    }
    let total = CLIENTS * CONNECTIONS_PER_CLIENT;
    println!(
        "{total} connections (HTTP GET to {VIP}:443) in {:.2?}\n",
        started.elapsed()
    );

    let mut table = Table::new();
    table.load_preset(UTF8_FULL).set_header([
        "server",
        "clients",
        "connections",
        "clients that always came back here",
        "sample clients",
    ]);
    let mut broken = Vec::new();
    for b in &f.topology.backends {
        let mine: Vec<(&Ipv4Addr, &Vec<String>)> =
            per_client.iter().filter(|(_, s)| s[0] == b.name).collect();
        let connections: usize = per_client
            .values()
            .flatten()
            .filter(|s| **s == b.name)
            .count();
        let loyal = mine
            .iter()
            .filter(|(_, s)| s.iter().all(|x| *x == b.name))
            .count();
        broken.extend(
            mine.iter()
                .filter(|(_, s)| s.iter().any(|x| *x != b.name))
                .map(|(c, _)| **c),
        );
        let sample: Vec<String> = mine.iter().take(3).map(|(c, _)| c.to_string()).collect();
        table.add_row([
            format!("{} ({}:4443)", b.name, b.address),
            mine.len().to_string(),
            connections.to_string(),
            format!("{loyal} of {}", mine.len()),
            sample.join(", "),
        ]);
    }
    println!("{table}\n");
    println!("servers saw these client addresses (SNAT): {snat_seen:?}\n");
    println!(
        "lb status:\n{}",
        lb::cli::status::render(&f.daemon.status()?)
    );
    ensure!(broken.is_empty(), "affinity broken for {broken:?}");
    println!("affinity held: every one of {CLIENTS} clients reached the same server on all {CONNECTIONS_PER_CLIENT} connections.");
    println!("tearing down (namespaces, links, daemon)...");
    Ok(())
}
