//! Each `lb init` preset, end to end: the generated file passes `lb config check --strict`,
//! and its services, run by the real daemon, carry real connections on every VIP port to
//! servers listening on the preset's server ports, with health checks on 5061. Needs root.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use harness::{
    client,
    daemon::{ensure_no_drops, lb_binary, Daemon},
    netns::run_cmd,
    server::Server,
    topology::{Spec, Topology, VIP},
    wait::until,
};
use lb::{api::ServerState, config::Config};

const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
const HEALTH_POLL: Duration = Duration::from_millis(200);
const MONITOR_PORT: u16 = 5061;

/// Runs `lb init` for the topology and returns the file's text, checked strictly.
fn init(preset: &str, t: &Topology) -> Result<String> {
    let list = |items: Vec<String>| items.join(",");
    let path = std::env::temp_dir().join(format!("{}-{preset}.toml", t.prefix));
    let lb = lb_binary()?;
    let lb = lb.to_str().context("lb path")?;
    run_cmd(
        lb,
        &[
            "init",
            "--preset",
            preset,
            "--vip",
            &VIP.to_string(),
            "--servers",
            &list(t.backends.iter().map(|b| b.address.to_string()).collect()),
            "--snat",
            &list(t.snat_addresses.iter().map(|a| a.to_string()).collect()),
            "--interfaces",
            &t.lb_interfaces.join(","),
            "--output",
            path.to_str().context("temp path")?,
        ],
    )?;
    // On the balancer itself (its namespace): `config check` also checks the host's
    // interfaces and SNAT addresses.
    let netns = format!("--net=/run/netns/{}", t.lb.name());
    let checked = run_cmd(
        "nsenter",
        &[
            &netns,
            "--",
            lb,
            "config",
            "check",
            "--strict",
            path.to_str().unwrap(),
        ],
    );
    let text = std::fs::read_to_string(&path);
    let _ = std::fs::remove_file(&path);
    checked.context("lb config check --strict")?;
    Ok(text?)
}

/// Runs the preset's services behind the harness's own daemon section (its control
/// socket, pin directory and small tables), with a server on every server port of every
/// backend (named "feN:PORT", so a reply tells the port it reached) and on 5061.
fn check_preset(preset: &str) -> Result<()> {
    let t = Topology::build(&Spec {
        clients: 4,
        ..Spec::default()
    })?;
    let text = init(preset, &t)?;
    let config = Config::parse(&text)?;
    let services = &text[text.find("[[service]]").context("no services")?..];

    // VIP port -> server port, over all services.
    let mut mapping = Vec::new();
    for s in &config.services {
        for port in s.ports() {
            mapping.push((port, s.backend_port().unwrap_or(port)));
        }
    }
    let server_ports: BTreeSet<u16> = mapping
        .iter()
        .map(|(_, p)| *p)
        .chain([MONITOR_PORT])
        .collect();
    let mut servers = Vec::new();
    for b in &t.backends {
        for &port in &server_ports {
            servers.push(Server::start(
                &b.ns,
                &format!("{}:{port}", b.name),
                b.address,
                port,
            )?);
        }
    }
    let daemon = Daemon::start(&t, services)?;
    wait_healthy(&daemon, t.backends.len() * config.services.len())?;

    let source_affinity = config
        .services
        .iter()
        .all(|s| s.affinity == lb::config::Affinity::Source);
    for &client in &t.client_addresses {
        let mut reached = BTreeSet::new();
        for &(vip_port, server_port) in &mapping {
            let reply = client::request(&t.client, client, SocketAddr::new(VIP.into(), vip_port))
                .with_context(|| format!("{preset}: {client} -> VIP:{vip_port}"))?;
            let (server, port) = reply
                .server
                .split_once(':')
                .context("server name without a port")?;
            ensure!(
                port == server_port.to_string(),
                "{preset}: VIP:{vip_port} reached {} instead of port {server_port}",
                reply.server
            );
            ensure!(
                t.snat_addresses.iter().any(|a| reply.peer.ip() == *a),
                "{preset}: server saw {}",
                reply.peer
            );
            reached.insert(server.to_string());
        }
        if source_affinity {
            ensure!(
                reached.len() == 1,
                "{preset}: {client} reached {reached:?} across the VIP's ports"
            );
        }
    }
    ensure_no_drops(&daemon.status()?, &[]).with_context(|| preset.to_string())
}

/// Waits until `expected` (service, server) pairs report "up" from their health checks.
fn wait_healthy(daemon: &Daemon, expected: usize) -> Result<()> {
    let mut up = 0;
    let waited = until(HEALTHY_WITHIN, HEALTH_POLL, "healthy servers", || {
        up = daemon
            .status()?
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.state == ServerState::Up && b.last_check.is_some())
            .count();
        Ok(up == expected)
    });
    waited
        .map(drop)
        .with_context(|| format!("{up} of {expected} servers healthy"))
}

#[test]
fn lync_web_external() -> Result<()> {
    check_preset("lync-web-external")
}

#[test]
fn lync_web_internal() -> Result<()> {
    check_preset("lync-web-internal")
}

#[test]
fn lync_fe_pool() -> Result<()> {
    check_preset("lync-fe-pool")
}

#[test]
fn lync_director() -> Result<()> {
    check_preset("lync-director")
}
