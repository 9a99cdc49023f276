//! `cargo xtask demo`: a small Lync Front End pool in namespaces behind lb's external Web
//! Services VIP, configured as docs/lync.md and the `lync-web-external` preset do: HTTPS
//! 443 -> 4443 on real TLS servers, TCP affinity (`source-port`), SIP monitored on 5061, and
//! only the reverse proxies allowed in. Real traffic, then a report of where it landed.
use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration, time::Instant};

use anyhow::{ensure, Result};
use comfy_table::{presets::UTF8_FULL, Table};
use harness::{
    client::Connection,
    fixture::{Fixture, ServiceSpec},
    server::Server,
    tls::Authority,
    topology::{Spec, VIP},
};

/// The reverse proxies: the first client addresses of the topology.
const PROXIES: usize = 2;
/// Kept-alive HTTPS connections each proxy opens, and requests on each.
const CONNECTIONS_PER_PROXY: usize = 30;
const REQUESTS_PER_CONNECTION: usize = 4;
/// The external Web Services name, on every Front End's certificate.
const WEB_EXTERNAL_NAME: &str = "webext.lab.test";
/// The preset's monitor: SIP on 5061.
const MONITOR_PORT: u16 = 5061;
/// A refused handshake only ever times out; this is how long the demo waits for one.
const REFUSED_WITHIN: Duration = Duration::from_millis(1500);

fn main() -> Result<()> {
    println!(
        "lb demo: external Web Services VIP {VIP}:443 (HTTPS) -> 3 Front End servers on :4443, \
         TCP affinity (source-port), reverse proxies only\n"
    );
    let spec = Spec {
        clients: PROXIES + 1,
        ..Spec::default()
    };
    let authority = Authority::new()?;
    let proxies: Vec<String> = (0..PROXIES)
        .map(|i| format!("\"{}\"", harness::topology::client_address(spec.arms, i)))
        .collect();
    let service = ServiceSpec {
        affinity: "source-port".into(),
        health: Some(format!(
            "{{ kind = \"tcp\", port = {MONITOR_PORT}, interval = 2.0, timeout = 1.0, rise = 2, fall = 3 }}"
        )),
        extra: format!("allow = [{}]\n", proxies.join(", ")),
        tls: Some(authority.server(WEB_EXTERNAL_NAME)?),
        ..ServiceSpec::default()
    };
    let started = Instant::now();
    let f = Fixture::start(&spec, service)?;
    let _monitors = f
        .topology
        .backends
        .iter()
        .map(|b| Server::start(&b.ns, &b.name, b.address, MONITOR_PORT))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "topology up in {:.1?}: reverse proxies {:?} and a stray client {}, lb on {:?} (two-armed), \
         SNAT {:?}, servers {}",
        started.elapsed(),
        &f.topology.client_addresses[..PROXIES],
        f.topology.client_addresses[PROXIES],
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
    let client_tls = authority.client()?;
    // Per server: connections from each proxy.
    let mut landed: BTreeMap<String, BTreeMap<Ipv4Addr, usize>> = BTreeMap::new();
    let mut moved = 0;
    let mut open = Vec::new();
    for &proxy in &f.topology.client_addresses[..PROXIES] {
        for _ in 0..CONNECTIONS_PER_PROXY {
            let mut conn = Connection::open_tls(
                &f.topology.client,
                proxy,
                f.vip(),
                client_tls.clone(),
                WEB_EXTERNAL_NAME,
            )?;
            let server = conn.ask()?.server;
            *landed
                .entry(server.clone())
                .or_default()
                .entry(proxy)
                .or_default() += 1;
            open.push((conn, server));
        }
    }
    for (conn, server) in &mut open {
        for _ in 1..REQUESTS_PER_CONNECTION {
            if conn.ask()?.server != *server {
                moved += 1;
            }
        }
    }
    let total = PROXIES * CONNECTIONS_PER_PROXY;
    println!(
        "{total} HTTPS connections from the proxies (certificate for {WEB_EXTERNAL_NAME} verified), \
         {REQUESTS_PER_CONNECTION} requests each, in {:.2?}\n",
        started.elapsed()
    );

    let mut table = Table::new();
    table.load_preset(UTF8_FULL);
    let mut header = vec!["server".to_string()];
    header.extend(
        f.topology.client_addresses[..PROXIES]
            .iter()
            .map(|p| format!("connections from proxy {p}")),
    );
    table.set_header(header);
    for b in &f.topology.backends {
        let mut row = vec![format!("{} ({}:4443)", b.name, b.address)];
        for proxy in &f.topology.client_addresses[..PROXIES] {
            let n = landed
                .get(&b.name)
                .and_then(|m| m.get(proxy))
                .copied()
                .unwrap_or(0);
            row.push(n.to_string());
        }
        table.add_row(row);
    }
    println!("{table}\n");

    let stray = f.topology.client_addresses[PROXIES];
    let refused =
        Connection::open_within(&f.topology.client, stray, 0, f.vip(), REFUSED_WITHIN).is_err();
    println!(
        "a client that is not a reverse proxy ({stray}): {}\n",
        if refused {
            "refused (not in the service's allow list)"
        } else {
            "CONNECTED"
        }
    );
    let status = f.daemon.status()?;
    println!("lb status:\n{}", lb::cli::status::render(&status));
    ensure!(
        moved == 0,
        "{moved} requests reached another server than their connection's first"
    );
    ensure!(
        f.topology
            .backends
            .iter()
            .all(|b| landed.contains_key(&b.name)),
        "the proxies' connections did not spread over every server: {landed:?}"
    );
    ensure!(refused, "the stray client {stray} was let in");
    ensure!(
        status.services[0].refused_flows > 0,
        "the refusal was not counted"
    );
    println!(
        "TCP affinity spread the proxies' {total} connections over all {} servers, every request \
         stayed on its connection's server, and the stray client was refused.",
        f.topology.backends.len()
    );
    println!("tearing down (namespaces, links, daemon)...");
    Ok(())
}
