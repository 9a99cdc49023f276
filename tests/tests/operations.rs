//! Operations against the real daemon and data plane: drain, live server changes, restarts
//! that keep sessions, CLI errors, hostile control clients. Needs root.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use harness::{
    client::Connection,
    daemon::{lb_binary, Daemon, Site},
    fixture::{Fixture, ServiceSpec},
    server::Server,
    topology::{Spec, Topology},
    wait::until,
};
use lb::api::{AffinityRecord, CheckOutcome, ServerState, StatusReport};

const SERVICE: &str = "web-ext";

fn server_address(f: &Fixture, name: &str) -> Ipv4Addr {
    f.topology
        .backends
        .iter()
        .find(|b| b.name == name)
        .expect("known server")
        .address
}

/// Long-lived connections from the first `n` clients, with the server each one reached.
fn open_long_lived(f: &Fixture, n: usize) -> Result<Vec<(Ipv4Addr, Connection, String)>> {
    f.topology.client_addresses[..n]
        .iter()
        .map(|&c| {
            let mut conn = Connection::open(&f.topology.client, c, 0, f.vip())?;
            let server = conn.ask()?.server;
            Ok((c, conn, server))
        })
        .collect()
}

/// The server that most of `conns` reached.
fn busiest(conns: &[(Ipv4Addr, Connection, String)]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, _, s) in conns {
        *counts.entry(s).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(s, _)| s.to_string())
        .expect("some connections")
}

fn backend_status(status: &StatusReport, address: Ipv4Addr) -> Result<&lb::api::BackendStatus> {
    status.services[0]
        .backends
        .iter()
        .find(|b| b.address == IpAddr::V4(address))
        .context("backend missing from status")
}

/// Whether every server of the first service is as `state` says.
fn every_server(f: &Fixture, state: impl Fn(&lb::api::BackendStatus) -> bool) -> Result<bool> {
    Ok(f.daemon.status()?.services[0].backends.iter().all(state))
}

/// Polls `check` every 100 ms until it holds or `limit` passes.
fn wait_for(limit: Duration, what: &str, check: impl FnMut() -> Result<bool>) -> Result<()> {
    until(limit, Duration::from_millis(100), what, check).map(drop)
}

/// Drain a server while 20 clients hold open connections and keep sending.
/// None of them breaks; new clients never reach it; its clients' affinities hold; undrain
/// brings it back for new clients.
#[test]
fn drain_keeps_connections_and_affinities_and_stops_new_clients() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 60,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    let mut conns = open_long_lived(&f, 20)?;
    let victim = busiest(&conns);
    let victim_addr = server_address(&f, &victim);
    f.daemon
        .cli_ok(&["backend", "drain", SERVICE, &victim_addr.to_string()])?;

    for round in 0..3 {
        for (client, conn, server) in &mut conns {
            let now = conn
                .ask()
                .with_context(|| format!("round {round}: {client}'s open connection broke"))?
                .server;
            ensure!(
                now == *server,
                "{client}'s open connection moved from {server} to {now}"
            );
        }
    }
    // Existing clients of the draining server keep their affinity on new connections.
    for (client, _, server) in conns.iter().filter(|(_, _, s)| *s == victim) {
        let again = f.ask(*client)?.server;
        ensure!(
            again == *server,
            "{client} lost its affinity to the draining {server}"
        );
    }
    for &client in &f.topology.client_addresses[20..40] {
        let server = f.ask(client)?.server;
        ensure!(
            server != victim,
            "new client {client} reached the draining {victim}"
        );
    }
    let status = f.daemon.status()?;
    let b = backend_status(&status, victim_addr)?;
    ensure!(
        matches!(b.state, ServerState::Draining { .. }),
        "state {:?}",
        b.state
    );
    ensure!(
        b.active_flows > 0,
        "status shows no remaining flows on the draining server"
    );

    f.daemon
        .cli_ok(&["backend", "undrain", SERVICE, &victim_addr.to_string()])?;
    let mut reached = BTreeSet::new();
    for &client in &f.topology.client_addresses[40..60] {
        reached.insert(f.ask(client)?.server);
    }
    ensure!(
        reached.contains(&victim),
        "after undrain no new client reached {victim}: {reached:?}"
    );
    Ok(())
}

/// Drain with a 2 s deadline. Afterwards that server has no flows and its
/// clients get another server when they reconnect.
#[test]
fn drain_deadline_cuts_flows_and_affinities() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 15,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    let conns = open_long_lived(&f, 15)?;
    let victim = busiest(&conns);
    let victim_addr = server_address(&f, &victim);
    f.daemon.cli_ok(&[
        "backend",
        "drain",
        SERVICE,
        &victim_addr.to_string(),
        "--deadline",
        "2",
    ])?;
    let started = Instant::now();
    wait_for(Duration::from_secs(10), "the drain to be cut", || {
        let status = f.daemon.status()?;
        let b = backend_status(&status, victim_addr)?;
        Ok(b.state == ServerState::Drained && b.active_flows == 0 && b.affinities == 0)
    })?;
    ensure!(
        started.elapsed() >= Duration::from_millis(1500),
        "cut before the deadline"
    );
    for (client, _, server) in conns.iter().filter(|(_, _, s)| *s == victim) {
        let now = f.ask(*client)?.server;
        ensure!(
            now != *server,
            "{client} still reached the drained {server}"
        );
    }
    Ok(())
}

/// Add a server under load. Clients with a live affinity stay where they are,
/// open connections keep working, and new clients reach the new server. Once affinities
/// are flushed, only the clients that the table now maps to the new server move.
#[test]
fn adding_a_server_moves_only_its_share() -> Result<()> {
    let spec = Spec {
        backends: 4,
        clients: 90,
        ..Spec::default()
    };
    let f = Fixture::start_holding_back_last(&spec, ServiceSpec::default())?;
    let all = Fixture::addresses(&f.topology);
    let before = f.servers_of(&f.topology.client_addresses[..60])?;
    let mut conns = open_long_lived(&f, 10)?;

    f.daemon
        .cli_ok(&["backend", "add", SERVICE, &all[3].to_string()])?;
    for (client, conn, server) in &mut conns {
        ensure!(
            conn.ask()?.server == *server,
            "{client}'s open connection moved"
        );
    }
    for (&c, server) in &before {
        let now = f.ask(c)?.server;
        ensure!(
            &now == server,
            "{c} moved from {server} to {now} despite its affinity"
        );
    }
    let newcomers: BTreeSet<String> = f.topology.client_addresses[60..]
        .iter()
        .map(|&c| f.ask(c).map(|r| r.server))
        .collect::<Result<_>>()?;
    ensure!(
        newcomers.contains("fe4"),
        "no new client reached the added server: {newcomers:?}"
    );

    let removed = f.daemon.cli_ok(&["affinity", "flush", SERVICE])?;
    ensure!(removed.contains("affinities removed"), "{removed}");
    let moved = f.count_moved(&before, "fe4")?;
    // About a quarter should move; allow a wide band for 60 clients.
    ensure!((5..=30).contains(&moved), "{moved} of 60 clients moved");
    Ok(())
}

/// Stop one server's monitored port (5061), not its service port. It leaves
/// selection within interval x fall plus a small margin; its clients move; the other
/// servers' clients do not move at all. When the port is back it returns after `rise`.
#[test]
fn failed_health_check_takes_a_server_out_and_back() -> Result<()> {
    const INTERVAL: f64 = 0.3;
    const FALL: u32 = 3;
    let service = ServiceSpec {
        health: Some(format!("{{ kind = \"tcp\", port = 5061, interval = {INTERVAL}, timeout = 0.3, rise = 2, fall = {FALL} }}")),
        ..ServiceSpec::default()
    };
    let f = Fixture::start(
        &Spec {
            clients: 30,
            ..Spec::default()
        },
        service,
    )?;
    let mut monitors: BTreeMap<String, Server> = f
        .topology
        .backends
        .iter()
        .map(|b| Server::start(&b.ns, &b.name, b.address, 5061).map(|s| (b.name.clone(), s)))
        .collect::<Result<_>>()?;
    let before = f.servers_of(&f.topology.client_addresses)?;
    wait_for(
        Duration::from_secs(10),
        "every server to pass a check",
        || {
            every_server(&f, |b| {
                matches!(b.last_check, Some(CheckOutcome::Passed { .. }))
            })
        },
    )?;

    let victim = before.values().next().expect("clients").clone();
    let victim_addr = server_address(&f, &victim);
    let stopped = Instant::now();
    drop(monitors.remove(&victim));
    wait_for(
        Duration::from_secs(10),
        "the server to be marked down",
        || {
            let status = f.daemon.status()?;
            let state = &backend_status(&status, victim_addr)?.state;
            Ok(matches!(state, ServerState::Down { .. }))
        },
    )?;
    let took = stopped.elapsed();
    let limit = Duration::from_secs_f64(INTERVAL * f64::from(FALL) + 1.0);
    ensure!(took <= limit, "marked down after {took:?}, limit {limit:?}");

    for (&client, server) in &before {
        let now = f.ask(client)?.server;
        if *server == victim {
            ensure!(now != victim, "{client} still reached the failed {victim}");
        } else {
            ensure!(
                now == *server,
                "{client} moved from healthy {server} to {now}"
            );
        }
    }

    monitors.insert(
        victim.clone(),
        Server::start(
            &f.topology
                .backends
                .iter()
                .find(|b| b.name == victim)
                .unwrap()
                .ns,
            &victim,
            victim_addr,
            5061,
        )?,
    );
    wait_for(Duration::from_secs(10), "the server to come back", || {
        Ok(backend_status(&f.daemon.status()?, victim_addr)?.state == ServerState::Up)
    })?;
    Ok(())
}

/// Expired flows and affinities are collected, and `lb status` reports table fill levels.
#[test]
fn expired_entries_are_collected() -> Result<()> {
    let service = ServiceSpec {
        affinity_timeout: 1,
        ..ServiceSpec::default()
    };
    let f = Fixture::start_with(
        &Spec {
            clients: 20,
            ..Spec::default()
        },
        service,
        "gc_interval = 1\nclosing_timeout = 1\n",
    )?;
    for &c in &f.topology.client_addresses {
        f.ask(c)?;
    }
    wait_for(
        Duration::from_secs(15),
        "closed flows and idle affinities to be collected",
        || {
            let t = f.daemon.status()?.tables;
            // Two flow entries (one per direction) per connection, one affinity per client.
            Ok(t.collected_flows >= 40
                && t.collected_affinities >= 20
                && t.flows.entries == 0
                && t.affinities.entries == 0)
        },
    )?;
    let t = f.daemon.status()?.tables;
    ensure!(
        t.flows.capacity == 65536 && t.affinities.capacity == 65536,
        "{t:?}"
    );
    ensure!(t.gc_passes_nearly_full == 0, "{t:?}");
    Ok(())
}

/// The Prometheus endpoint serves per-server and data-plane metrics.
#[test]
fn metrics_endpoint_reports_traffic() -> Result<()> {
    let f = Fixture::start_with(
        &Spec {
            clients: 3,
            ..Spec::default()
        },
        ServiceSpec::default(),
        "metrics_address = \"127.0.0.1:9120\"\n",
    )?;
    for &c in &f.topology.client_addresses {
        f.ask(c)?;
    }
    // The endpoint lives on the lb namespace's loopback.
    let body = f.topology.lb.run(|| -> Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", 9120))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })??;
    ensure!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    ensure!(
        body.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{body}"
    );
    ensure!(
        body.contains("lb_service_new_flows_total{service=\"web-ext\"} 3"),
        "{body}"
    );
    ensure!(
        body.contains("lb_datapath_verdicts_total{verdict=\"redirect\"}"),
        "{body}"
    );
    ensure!(
        body.contains("lb_server_up{service=\"web-ext\",server=\"10.2.0.11:4443\"} 1"),
        "{body}"
    );
    Ok(())
}

fn affinities(f: &Fixture) -> Result<BTreeSet<(IpAddr, IpAddr)>> {
    let json = f.daemon.cli_ok(&["affinity", "list", SERVICE, "--json"])?;
    let records: Vec<AffinityRecord> = serde_json::from_str(&json)?;
    Ok(records.into_iter().map(|r| (r.client, r.backend)).collect())
}

/// Kill -9 the daemon and start it again while long-lived connections are
/// open: they keep working, and affinities, flows and counters are unchanged.
#[test]
fn killed_daemon_restarts_without_breaking_sessions() -> Result<()> {
    let mut f = Fixture::start(
        &Spec {
            clients: 12,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    let mut conns = open_long_lived(&f, 12)?;
    let affinities_before = affinities(&f)?;
    ensure!(
        affinities_before.len() == 12,
        "{} affinities",
        affinities_before.len()
    );
    let new_flows_before = f.daemon.status()?.services[0].stats.new_flows;

    f.daemon.kill_and_restart()?;
    ensure!(
        f.daemon.log().contains("adopted"),
        "the new daemon did not adopt the running data plane"
    );

    for (client, conn, server) in &mut conns {
        let now = conn
            .ask()
            .with_context(|| format!("{client}'s connection broke over the restart"))?
            .server;
        ensure!(
            now == *server,
            "{client}'s connection moved from {server} to {now}"
        );
    }
    ensure!(
        affinities(&f)? == affinities_before,
        "affinities changed over the restart"
    );
    for (client, _, server) in &conns {
        ensure!(
            f.ask(*client)?.server == *server,
            "{client} reached another server after the restart"
        );
    }
    let new_flows_after = f.daemon.status()?.services[0].stats.new_flows;
    ensure!(
        new_flows_after == new_flows_before + 12,
        "counters restarted: {new_flows_before} -> {new_flows_after}"
    );
    Ok(())
}

/// Runtime changes are persisted: a restarted daemon still has the drained server draining
/// and the added server present.
#[test]
fn runtime_changes_survive_a_restart() -> Result<()> {
    let spec = Spec {
        backends: 4,
        clients: 2,
        ..Spec::default()
    };
    let mut f = Fixture::start_holding_back_last(&spec, ServiceSpec::default())?;
    let all = Fixture::addresses(&f.topology);
    // In JSON, a change answers with the request carried out, typed.
    let added: serde_json::Value = serde_json::from_str(&f.daemon.cli_ok(&[
        "--json",
        "backend",
        "add",
        SERVICE,
        &all[3].to_string(),
        "--weight",
        "3",
    ])?)?;
    ensure!(
        added["done"]["request"] == "backend-add"
            && added["done"]["weight"] == 3
            && added["done"]["address"] == all[3].to_string(),
        "lb --json backend add: {added}"
    );
    // And a refusal is JSON too, on stdout, naming what it refused, with exit status 1.
    let refused = f
        .daemon
        .cli(&["--json", "backend", "drain", SERVICE, "10.2.9.9"])?;
    let error: serde_json::Value = serde_json::from_slice(&refused.stdout)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&refused.stdout)))?;
    ensure!(
        refused.status.code() == Some(1)
            && error["error"]
                .as_str()
                .is_some_and(|e| e.contains("10.2.9.9")),
        "lb --json backend drain of an unknown server: {:?} {error}",
        refused.status
    );
    f.daemon
        .cli_ok(&["backend", "drain", SERVICE, &all[0].to_string()])?;
    f.daemon
        .cli_ok(&["backend", "remove", SERVICE, &all[1].to_string()])?;
    f.daemon.kill_and_restart()?;
    let status = f.daemon.status()?;
    let listed: BTreeMap<IpAddr, (&ServerState, u32)> = status.services[0]
        .backends
        .iter()
        .map(|b| (b.address, (&b.state, b.weight)))
        .collect();
    let all: Vec<IpAddr> = all.into_iter().map(IpAddr::V4).collect();
    ensure!(
        listed.len() == 3 && !listed.contains_key(&all[1]),
        "{listed:?}"
    );
    ensure!(
        matches!(listed[&all[0]].0, ServerState::Draining { .. }),
        "{listed:?}"
    );
    ensure!(listed[&all[3]] == (&ServerState::Up, 3), "{listed:?}");
    Ok(())
}

/// A SNAT address that is on no interface of lb's host would show every server up while
/// every connection times out: the daemon refuses to start, naming the key.
#[test]
fn a_snat_address_that_is_not_local_stops_the_start() -> Result<()> {
    let topology = Topology::build(&Spec {
        backends: 1,
        clients: 1,
        ..Spec::default()
    })?;
    let mut site = Site::from(&topology);
    site.snat = vec![IpAddr::V4(Ipv4Addr::new(10, 2, 0, 250))];
    let services = ServiceSpec::default().toml(&Fixture::addresses(&topology));
    let Err(e) = Daemon::start_binary(&site, &lb_binary()?, "", &services) else {
        anyhow::bail!("the daemon started with a SNAT address it does not have");
    };
    let e = format!("{e:#}");
    ensure!(
        e.contains("daemon.snat_addresses[0]: 10.2.0.250 is on no interface"),
        "{e}"
    );
    Ok(())
}

/// A daemon serving two servers whose config file now lists only the first (not reloaded).
fn two_servers_with_a_config_for_one() -> Result<Fixture> {
    let service = ServiceSpec::default();
    let f = Fixture::start(
        &Spec {
            backends: 2,
            clients: 1,
            ..Spec::default()
        },
        service.clone(),
    )?;
    let all = Fixture::addresses(&f.topology);
    f.daemon.write_services(&service.toml(&all[..1]))?;
    Ok(f)
}

/// SIGHUP re-reads the config file, like `lb reload`.
#[test]
fn sighup_reloads_the_config() -> Result<()> {
    let f = two_servers_with_a_config_for_one()?;
    f.daemon.signal(libc::SIGHUP)?;
    wait_for(
        Duration::from_secs(10),
        "the reload to drop the second server",
        || Ok(f.daemon.status()?.services[0].backends.len() == 1),
    )?;
    Ok(())
}

/// A reload that changes `[daemon]` is refused as a whole, naming the key and the restart
/// it needs; and the daemon's log, a file here, carries no colour codes.
#[test]
fn reload_refuses_a_daemon_change_and_names_it() -> Result<()> {
    let f = two_servers_with_a_config_for_one()?;
    let config = std::fs::read_to_string(&f.daemon.config_path)?;
    std::fs::write(
        &f.daemon.config_path,
        config.replacen("[daemon]\n", "[daemon]\ngc_interval = 7\n", 1),
    )?;
    let out = f.daemon.cli(&["reload"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "lb reload succeeded: {stderr}");
    ensure!(
        stderr.contains("daemon.gc_interval") && stderr.contains("restart"),
        "{stderr}"
    );
    ensure!(
        f.daemon.status()?.services[0].backends.len() == 2,
        "the refused reload applied its service changes"
    );
    let log = f.daemon.log();
    ensure!(!log.contains('\x1b'), "colour codes in the log:\n{log}");
    Ok(())
}

/// CLI errors are clear messages with a non-zero exit; output into a pipe is plain.
#[test]
fn cli_errors_are_clear() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 1,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    // Into a pipe (as here), tables are plain columns, not box drawing.
    let status = f.daemon.cli_ok(&["status"])?;
    ensure!(
        status.contains("web-ext") && !status.contains(['│', '─', '┌', '└']),
        "lb status into a pipe:\n{status}"
    );
    let server = f.topology.backends[0].address.to_string();
    let cases: [(&[&str], &str); 6] = [
        (
            &["backend", "drain", "nosuch", &server],
            "unknown service \"nosuch\"",
        ),
        (
            &["backend", "drain", SERVICE, "10.2.0.99"],
            "has no backend 10.2.0.99",
        ),
        (
            &["backend", "drain", SERVICE, "10.2.0"],
            "invalid value '10.2.0'",
        ),
        (&["backend", "undrain", SERVICE, &server], "is not draining"),
        (&["backend", "add", SERVICE, &server], "already has backend"),
        (
            &["affinity", "flush", SERVICE, "--backend", "10.9.9.9"],
            "has no backend 10.9.9.9",
        ),
    ];
    for (args, expected) in cases {
        let out = f.daemon.cli(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "`lb {}` succeeded", args.join(" "));
        ensure!(
            stderr.contains(expected),
            "`lb {}` said {stderr:?}, expected {expected:?}",
            args.join(" ")
        );
    }
    let out = std::process::Command::new(harness::daemon::lb_binary()?)
        .args(["--socket", "/run/lb-no-such-daemon.sock", "status"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("cannot reach the lb daemon"),
        "{stderr}"
    );
    Ok(())
}

/// Malformed, oversized and hung control clients do not wedge the daemon.
#[test]
fn hostile_control_clients_do_not_wedge_the_daemon() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 1,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    let socket = &f.daemon.socket;

    // One request line, the daemon's whole answer.
    let exchange = |request: &[u8]| -> Result<String> {
        let mut stream = UnixStream::connect(socket)?;
        stream.write_all(request)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    };
    for request in [
        &b"this is not json\n"[..],
        b"{\"request\":\"format-disk\"}\n",
    ] {
        let reply = exchange(request)?;
        ensure!(reply.contains("malformed request"), "{reply}");
    }

    // Hung clients: one silent, one with half a line; both stay connected.
    let _silent = UnixStream::connect(socket)?;
    let mut half = UnixStream::connect(socket)?;
    half.write_all(b"{\"request\":")?;
    // An oversized request without a newline.
    let mut big = UnixStream::connect(socket)?;
    let _ = big.write_all(&vec![b'x'; 1 << 20]);
    drop(UnixStream::connect(socket)?);

    let started = Instant::now();
    f.daemon
        .status()
        .context("status while hung clients are connected")?;
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "status took {:?}",
        started.elapsed()
    );
    ensure!(
        f.ask(f.topology.client_addresses[0]).is_ok(),
        "data plane affected"
    );
    Ok(())
}

/// `lb debug on` makes the data plane log new flows (client, backend, SNAT port) and drops
/// into the daemon's log; `lb debug off` silences it again. Off at start.
#[test]
fn data_plane_debug_log_switches_at_run_time() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 4,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    let [quiet, loud, after, marker] = [0, 1, 2, 3].map(|i| f.topology.client_addresses[i]);
    let logged = |client: Ipv4Addr| f.daemon.log().contains(&format!("new flow {client}:"));

    f.ask(quiet)?;
    ensure!(
        !f.daemon.status()?.debug_log,
        "debug logging must be off at start"
    );
    f.daemon.cli_ok(&["debug", "on"])?;
    ensure!(f.daemon.status()?.debug_log);
    f.ask(loud)?;
    wait_for(Duration::from_secs(5), "the new flow to be logged", || {
        Ok(logged(loud))
    })?;
    ensure!(f.daemon.log().contains("(maglev)"), "{}", f.daemon.log());

    f.daemon.cli_ok(&["debug", "off"])?;
    f.ask(after)?;
    // The ring is FIFO: once a flow opened later is logged, anything logged for `after`
    // would already be there.
    f.daemon.cli_ok(&["debug", "on"])?;
    f.ask(marker)?;
    wait_for(
        Duration::from_secs(5),
        "the marker flow to be logged",
        || Ok(logged(marker)),
    )?;
    ensure!(!logged(quiet) && !logged(after), "{}", f.daemon.log());
    Ok(())
}

/// HTTPS health checks against real TLS servers (the servers' monitor port, certificates
/// from the pool's CA): every server passes with the pool's CA, the body match and SNI;
/// one whose TLS server stops is taken out while the others stay; told to trust another CA,
/// the checks fail every server, and with the pool's CA back they all return.
#[test]
fn https_checks_verify_the_pools_certificates() -> Result<()> {
    const MONITOR_PORT: u16 = 5443;
    const POOL_NAME: &str = "pool.lab.test";
    let pool_ca = harness::tls::Authority::new()?;
    let other_ca = harness::tls::Authority::new()?;
    let (pool_pem, other_pem) = (pool_ca.write_pem()?, other_ca.write_pem()?);
    let with_ca = |pem: &harness::tls::PemFile| {
        ServiceSpec {
        health: Some(format!(
            "{{ kind = \"https\", port = {MONITOR_PORT}, sni = \"{POOL_NAME}\", ca_file = \"{}\", expect_body = \"server=\", interval = 0.3, timeout = 0.3, rise = 1, fall = 2 }}",
            pem.path.display()
        )),
        ..ServiceSpec::default()
    }
    };
    let f = Fixture::start(&Spec::default(), with_ca(&pool_pem))?;
    let tls = pool_ca.server(POOL_NAME)?;
    let mut monitors: BTreeMap<String, Server> = f
        .topology
        .backends
        .iter()
        .map(|b| {
            Server::start_tls(&b.ns, &b.name, b.address, MONITOR_PORT, tls.clone())
                .map(|s| (b.name.clone(), s))
        })
        .collect::<Result<_>>()?;
    wait_for(
        Duration::from_secs(10),
        "every server to pass its HTTPS check",
        || {
            every_server(&f, |b| {
                matches!(b.last_check, Some(CheckOutcome::Passed { .. }))
            })
        },
    )?;

    let victim = f.topology.backends[0].name.clone();
    let victim_addr = server_address(&f, &victim);
    drop(monitors.remove(&victim));
    wait_for(
        Duration::from_secs(10),
        "the server without TLS to be marked down",
        || {
            let status = f.daemon.status()?;
            Ok(matches!(
                backend_status(&status, victim_addr)?.state,
                ServerState::Down { .. }
            ))
        },
    )?;
    let status = f.daemon.status()?;
    for b in &status.services[0].backends[1..] {
        ensure!(
            b.state == ServerState::Up,
            "{} went {:?}",
            b.address,
            b.state
        );
    }

    let addresses = Fixture::addresses(&f.topology);
    f.daemon.reload(&with_ca(&other_pem).toml(&addresses))?;
    wait_for(
        Duration::from_secs(10),
        "every server to fail verification against another CA",
        || every_server(&f, |b| matches!(b.state, ServerState::Down { .. })),
    )?;
    let victim_host = &f.topology.backends[0];
    monitors.insert(
        victim.clone(),
        Server::start_tls(&victim_host.ns, &victim, victim_addr, MONITOR_PORT, tls)?,
    );
    f.daemon.reload(&with_ca(&pool_pem).toml(&addresses))?;
    wait_for(
        Duration::from_secs(10),
        "every server back with the pool's CA",
        || every_server(&f, |b| b.state == ServerState::Up),
    )
    .with_context(|| {
        format!(
            "{:?}",
            f.daemon.status().map(|s| s.services[0].backends.clone())
        )
    })?;
    f.ask(f.topology.client_addresses[0])?;
    Ok(())
}
