//! High availability end to end: an active/standby pair with real keepalived (VRRP) and lb's
//! flow sync; and the sync port under hostile input. Needs root and keepalived (installed
//! here if missing).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use harness::{
    active_active::ActiveActive,
    churn::{self, cpu_seconds},
    client::Connection,
    heartbeat::{Beats, Heartbeat, Held},
    netns::ensure_program,
    pair::{Pair, BACKEND_PORT, PORT, VIP},
    wait::until,
};
use lb::daemon::sync::{
    session::{self, SharedKey},
    wire::{self, Record},
};
use tokio::io::AsyncWriteExt;

/// The tests here run one at a time: VRRP's 100 ms adverts, and the sync-under-load
/// figures, would suffer from another test's load on the same two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const CLIENTS: usize = 100;
/// Ten per client.
const CONNECTIONS: usize = 10 * CLIENTS;
/// The bound on a failover.
const FAILOVER_LIMIT: Duration = Duration::from_secs(3);
const SYNC_WAIT: Duration = Duration::from_secs(30);
const START_WAIT: Duration = Duration::from_secs(30);
/// The 100 ms, as the upper bound of the latency figures' power-of-two bucket.
const LATENCY_BOUND_MS: f64 = 131.072;
/// Every held connection exchanges a request this often, through failover and handover.
const BEAT: Duration = Duration::from_secs(1);
/// Heartbeat rounds are 1 s apart; a round through a failover waits for TCP's retransmission.
const ROUNDS_WAIT: Duration = Duration::from_secs(20);

/// Confirmed connections a node holds (client directions).
fn flows_held(pair: &Pair, k: usize) -> Result<u64> {
    Ok(pair.daemon(k).status()?.tables.flows.entries / 2)
}

#[test]
fn a_standby_takes_over_every_connection_when_the_active_node_dies() -> Result<()> {
    let _alone = alone();
    ensure_program("keepalived", "keepalived")?;
    let mut pair = Pair::build(3, CLIENTS)?;
    let _servers = pair.start_servers()?;
    let services = pair.services();
    // Equal priorities: VRRP elects one (the higher address); call it the active node.
    let (active, standby) = pair.start_active_standby(&services, START_WAIT)?;
    let vip = SocketAddr::new(VIP.into(), PORT);

    // Long-lived connections through the active node; one client's all reach one server.
    let connections = Held::open_many(&pair.client, &pair.client_addresses, vip, CONNECTIONS)?;
    let server_of = servers_of_clients(&connections)?;
    let total = connections.len() as u64;
    ensure!(
        flows_held(&pair, active)? == total,
        "the active node holds {} of {total} flows",
        flows_held(&pair, active)?
    );
    let synced = Instant::now();
    until(
        SYNC_WAIT,
        Duration::from_millis(20),
        "the standby to hold every flow",
        || Ok(flows_held(&pair, standby)? == total),
    )
    .with_context(|| {
        format!(
            "standby holds {} of {total} flows",
            flows_held(&pair, standby).unwrap_or(0)
        )
    })?;
    eprintln!(
        "standby holds all {total} flows {:?} after the last was opened",
        synced.elapsed()
    );
    let sync = pair
        .daemon(standby)
        .status()?
        .sync
        .context("no sync status")?;
    ensure!(sync.ready, "standby not ready: {sync:?}");
    ensure!(
        sync.records_refused.is_empty(),
        "standby refused records: {sync:?}"
    );
    // From here to the end every connection exchanges a request every second.
    let heartbeat = Heartbeat::start(connections, BEAT);
    heartbeat.wait_rounds(1, ROUNDS_WAIT)?;

    // Power cut on the active node; the standby takes the addresses.
    let killed = Instant::now();
    pair.nodes[active].die()?;
    pair.wait_for_master(standby, Duration::from_secs(10))?;
    let failover = killed.elapsed();
    eprintln!("keepalived moved the VIP and the SNAT address {failover:?} after the kill");
    ensure!(failover <= FAILOVER_LIMIT, "failover took {failover:?}");
    heartbeat.wait_rounds(2, ROUNDS_WAIT)?;
    eprintln!(
        "every connection answered twice more {:?} after the kill",
        killed.elapsed()
    );

    // New connections from the same clients reach the same servers: the affinities came over.
    for (&c, server) in &server_of {
        let reply = Connection::open(&pair.client, c, 0, vip)?.ask()?;
        ensure!(
            reply.server == *server,
            "{c} now reaches {}, before {server}",
            reply.server
        );
    }
    let survivor = pair.daemon(standby).status()?;
    ensure!(
        survivor.counters["drop_tcp_no_flow"] == 0,
        "the survivor dropped packets of unknown flows: {:?}",
        survivor.counters
    );

    // The old node returns, takes a snapshot, stays backup; handed the role, it carries
    // every connection on.
    pair.revive(active)?;

    until(
        SYNC_WAIT,
        Duration::from_millis(50),
        "the returned node to be warm",
        || {
            let sync = pair
                .daemon(active)
                .status()?
                .sync
                .context("no sync status")?;
            Ok(sync.ready && flows_held(&pair, active)? >= flows_held(&pair, standby)?)
        },
    )?;
    ensure!(
        pair.nodes[standby].holds_vip()? && !pair.nodes[active].holds_vip()?,
        "the returned node took the addresses unasked"
    );
    let refused = pair.daemon(standby).cli(&["ha", "handover"])?;
    ensure!(
        refused.status.success(),
        "lb ha handover failed: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let handover = pair.wait_for_master(active, Duration::from_secs(10))?;
    eprintln!("lb ha handover moved the addresses back in {handover:?}");
    heartbeat.wait_rounds(2, ROUNDS_WAIT)?;
    let beats = heartbeat.stop()?;
    no_breaks(&beats)?;
    pair.daemon(standby).cli_ok(&["ha", "resume"])?;
    ensure!(pair
        .daemon(1)
        .cli_ok(&["ha"])?
        .contains("state sync: ready"));
    Ok(())
}

/// The one server each client's connections reached (source affinity).
fn servers_of_clients(connections: &[Held]) -> Result<BTreeMap<Ipv4Addr, String>> {
    let mut server_of: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for held in connections {
        let server = server_of
            .entry(held.source)
            .or_insert_with(|| held.server.clone());
        ensure!(
            *server == held.server,
            "{} reached {} and {server}",
            held.source,
            held.server
        );
    }
    Ok(server_of)
}

/// Every connection answered by its own server in every round of `beats`, none silent for
/// longer than a failover and two beats (a lost request waits for TCP's retransmission).
fn no_breaks(beats: &Beats) -> Result<()> {
    eprintln!(
        "{} connections, {} rounds of one request each, {} broken; the longest a connection went unanswered: {:?}",
        beats.connections, beats.rounds, beats.broken, beats.longest_silence
    );
    ensure!(
        beats.broken == 0,
        "{} of {} connections broke (the first shown): {:?}",
        beats.broken,
        beats.connections,
        beats.breaks
    );
    let bound = FAILOVER_LIMIT + 2 * BEAT;
    ensure!(
        beats.longest_silence <= bound,
        "a connection went unanswered for {:?} (bound {bound:?})",
        beats.longest_silence
    );
    Ok(())
}

/// The load: new connections per second, for how long, from how many threads
/// (enough to reach the rate on two cores).
const LOAD_RATE: f64 = 5_000.0;
const LOAD_TIME: Duration = Duration::from_secs(30);
const LOAD_THREADS: usize = 4;
/// Connections held open through the load.
const PERSISTENT: usize = 200;

#[test]
fn sync_keeps_up_with_a_stream_of_new_connections() -> Result<()> {
    let _alone = alone();
    let mut pair = Pair::build(3, 20)?;
    let _servers = pair.start_servers()?;
    let services = pair.services();
    // A short closing timeout: removals flow while connections are opened.
    pair.start_synced("closing_timeout = 2\n", &services, START_WAIT)?;
    let vip = SocketAddr::new(VIP.into(), PORT);
    // Connections that stay open through the load, from every client.
    let persistent = (0..PERSISTENT)
        .map(|i| {
            let source = pair.client_addresses[i % pair.client_addresses.len()];
            let mut connection = Connection::open(&pair.client, source, 0, vip)?;
            connection.ask()?;
            Ok(connection)
        })
        .collect::<Result<Vec<_>>>()?;
    let cpu_before = [
        cpu_seconds(pair.daemon(0).pid())?,
        cpu_seconds(pair.daemon(1).pid())?,
    ];
    let churn = churn::run(
        &pair.client,
        &pair.client_addresses,
        vip,
        LOAD_THREADS,
        LOAD_TIME,
        Some(LOAD_RATE),
    );
    let cpu_after = [
        cpu_seconds(pair.daemon(0).pid())?,
        cpu_seconds(pair.daemon(1).pid())?,
    ];
    let (opened, elapsed, rate) = (churn.opened, churn.elapsed, churn.rate());
    ensure!(
        churn.failed.is_empty(),
        "{} of {opened} connections failed: {:?}",
        churn.failed.len(),
        &churn.failed[..churn.failed.len().min(5)]
    );

    // Once the closed connections are gone (closing timeout), the standby holds what the
    // active node holds: the open connections, and every client's affinity.
    let live = |status: &lb::api::StatusReport| -> u64 {
        status
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|b| b.active_flows)
            .sum()
    };
    let settle = Duration::from_secs(15);
    let mut active_live = 0;
    until(
        settle,
        Duration::from_millis(50),
        "the closed connections to leave the active node",
        || {
            active_live = live(&pair.daemon(0).status()?);
            Ok(active_live == persistent.len() as u64)
        },
    )
    .with_context(|| {
        format!(
            "{active_live} live connections on the active node, {} open",
            persistent.len()
        )
    })?;
    let within = |a: u64, b: u64| a.abs_diff(b) as f64 <= a.max(b) as f64 * 0.01;
    let mut last = (0, 0, 0, 0);
    let settled = until(
        settle,
        Duration::from_millis(50),
        "the standby to match",
        || {
            let (a, b) = (pair.daemon(0).status()?, pair.daemon(1).status()?);
            last = (
                live(&a),
                live(&b),
                a.tables.affinities.entries,
                b.tables.affinities.entries,
            );
            Ok(within(last.0, last.1) && within(last.2, last.3))
        },
    );
    settled.with_context(|| {
        format!(
            "live connections active {} / standby {}, affinities {} / {}; active log:\n{}",
            last.0,
            last.1,
            last.2,
            last.3,
            pair.daemon(0).log()
        )
    })?;
    let (active, standby) = (pair.daemon(0).status()?, pair.daemon(1).status()?);
    let (sent, received) = (
        active.sync.clone().context("no sync status")?,
        standby.sync.clone().context("no sync status")?,
    );
    let peer = &sent.peers[0];
    ensure!(peer.records_dropped == 0, "records dropped: {peer:?}");
    let cpu_per_thousand =
        |k: usize| (cpu_after[k] - cpu_before[k]) / elapsed.as_secs_f64() / (rate / 1000.0);
    eprintln!(
        "{opened} connections in {elapsed:?} ({rate:.0}/s) beside {} open ones; once the closed ones had gone both nodes held {} live connections and {} / {} affinities; sync latency p50 {:?} ms, p99 {:?} ms; {:.0} bytes on the sync link per connection; daemon CPU per 1,000 connections/s: sender {:.3} s/s, receiver {:.3} s/s",
        persistent.len(),
        live(&standby),
        active.tables.affinities.entries,
        standby.tables.affinities.entries,
        received.latency_p50_ms,
        received.latency_p99_ms,
        peer.bytes_sent as f64 / opened as f64,
        cpu_per_thousand(0),
        cpu_per_thousand(1),
    );
    // The machine is saturated by the load itself (2 cores: clients, servers, both
    // daemons): the median must still be within the 100 ms; the tail is reported.
    ensure!(
        received
            .latency_p50_ms
            .is_some_and(|ms| ms <= LATENCY_BOUND_MS),
        "sync p50 {:?} ms",
        received.latency_p50_ms
    );
    Ok(())
}

#[test]
fn an_ecmp_node_dies_and_its_connections_continue_through_the_other() -> Result<()> {
    let _alone = alone();
    ensure_program("keepalived", "keepalived")?;
    let mut both = ActiveActive::start(CLIENTS, START_WAIT)?;

    // Connections spread over both nodes by the router's hash.
    let connections = Held::open_many(
        &both.cluster.client,
        &both.cluster.client_addresses,
        both.vip(),
        CONNECTIONS,
    )?;
    let total = connections.len() as u64;
    let per_node: Vec<u64> = (0..2)
        .map(|k| Ok(both.daemon(k).status()?.counters["new_flows"]))
        .collect::<Result<_>>()?;
    ensure!(
        per_node.iter().all(|&n| n > total / 5),
        "ECMP did not spread {total} connections: {per_node:?}"
    );
    both.wait_for_copies(total, SYNC_WAIT)?;
    let heartbeat = Heartbeat::start(connections, BEAT);
    heartbeat.wait_rounds(1, ROUNDS_WAIT)?;

    // Node 0 dies; the router drops its route when BGP's hold time runs out, and node 1's
    // keepalived takes node 0's SNAT address.
    let moved = both.kill(0)?;
    eprintln!(
        "{moved:?} from the kill until the router sends everything to node 1 and node 1 owns node 0's SNAT address (per node before: {per_node:?})"
    );
    heartbeat.wait_rounds(2, ROUNDS_WAIT)?;
    no_breaks(&heartbeat.stop()?)?;
    Ok(())
}

/// A sync session from the test itself, with the group's key or another.
async fn dial(
    address: SocketAddr,
    key: &SharedKey,
) -> Result<(tokio::net::TcpStream, session::Sealer)> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let sealer = session::dial(&mut stream, key).await?;
    Ok((stream, sealer))
}

fn refused(pair: &Pair, reason: &str) -> u64 {
    pair.daemon(0)
        .status()
        .ok()
        .and_then(|s| s.sync)
        .and_then(|s| s.sessions_refused.get(reason).copied())
        .unwrap_or(0)
}

#[test]
fn forged_replayed_truncated_and_wrong_version_sync_traffic_changes_nothing() -> Result<()> {
    let _alone = alone();
    let mut pair = Pair::build(1, 0)?;
    let _servers = pair.start_servers()?;
    let services = pair.services();
    // Node 0 alone, without keepalived: its sync port is what is under attack.
    let extra = pair.sync_keys(0);
    pair.nodes[0].daemon = Some(harness::daemon::Daemon::start_binary(
        &pair.nodes[0].site,
        &harness::daemon::lb_binary()?,
        &extra,
        &services,
    )?);
    let target = pair.nodes[0].sync_address();
    let key = lb::daemon::sync::read_key(&pair.key_file)?;
    let wrong_key = SharedKey::parse(&"5a".repeat(32))?;
    let direction = |interface: u8| wire::Direction {
        flags: 0,
        timeout_s: 3600,
        seq_next: 1,
        handshake_ack: 0,
        idle_ms: 0,
        interface,
    };
    let flow = |port: u16| {
        Record::Flow(wire::Flow {
            service: "web-ext".into(),
            protocol: 6,
            client: SocketAddr::new(IpAddr::from([10, 1, 1, 1]), port),
            vip: SocketAddr::new(VIP.into(), PORT),
            snat: SocketAddr::new(harness::pair::SNAT.into(), 20000 + port),
            server: SocketAddr::new(pair.backends[0].address.into(), BACKEND_PORT),
            server_port: BACKEND_PORT,
            idle_timeout_s: 3600,
            forward: direction(0),
            reverse: direction(1),
        })
    };
    let holds = |pair: &Pair| -> Result<u64> { Ok(pair.daemon(0).status()?.tables.flows.entries) };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The test's sockets live in node 1's namespace, a host on the sync segment.
    let in_ns = |f: &(dyn Fn() -> Result<()> + Sync)| -> Result<()> { pair.nodes[1].ns.run(f)? };

    // One session of `records` sealed under `key`, from a host on the sync segment.
    let send_sealed = |key: &SharedKey, records: &[Record]| -> Result<()> {
        in_ns(&|| {
            runtime.block_on(async {
                let (mut stream, mut sealer) = dial(target, key).await?;
                sealer
                    .send(&mut stream, &wire::encode(records, false)?)
                    .await?;
                stream.shutdown().await?;
                Ok(())
            })
        })
    };
    // Waits until the node has refused one more session for `reason` than `before`.
    let counted = |reason: &str, before: u64| -> Result<()> {
        until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            reason,
            || Ok(refused(&pair, reason) > before),
        )
        .map(drop)
    };

    // A genuine session installs a flow, and its bytes are recorded.
    let recorded = std::sync::Mutex::new(Vec::new());
    in_ns(&|| {
        runtime.block_on(async {
            let (mut stream, mut sealer) = dial(target, &key).await?;
            let mut tape = Vec::new();
            sealer
                .send(&mut tape, &wire::encode(&[flow(1)], false)?)
                .await?;
            stream.write_all(&tape).await?;
            stream.flush().await?;
            *recorded.lock().unwrap() = tape;
            Ok(())
        })
    })?;
    until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "the genuine flow",
        || Ok(holds(&pair)? == 2),
    )?;

    // Garbage, another version, a frame cut short, a wrong key, and the genuine frame
    // replayed into a new session.
    let hostile: Vec<(&str, Vec<u8>)> = {
        let mut hello_v9 = b"LBSY".to_vec();
        hello_v9.extend_from_slice(&9u16.to_be_bytes());
        hello_v9.extend_from_slice(&[0; 16]);
        let mut hello = b"LBSY".to_vec();
        hello.extend_from_slice(&session::VERSION.to_be_bytes());
        hello.extend_from_slice(&[1; 16]);
        let mut truncated = hello.clone();
        truncated.extend_from_slice(&200u32.to_be_bytes());
        truncated.extend_from_slice(&[0; 50]);
        let mut replayed = hello.clone();
        replayed.extend_from_slice(&recorded.lock().unwrap());
        vec![
            ("malformed", b"GET / HTTP/1.1\r\n\r\n".repeat(2)),
            ("wrong_version", hello_v9),
            ("malformed", truncated),
            ("unauthenticated", replayed),
        ]
    };
    for (reason, bytes) in &hostile {
        let before = refused(&pair, reason);
        in_ns(&|| {
            runtime.block_on(async {
                let mut stream = tokio::net::TcpStream::connect(target).await?;
                stream.write_all(bytes).await?;
                stream.shutdown().await?;
                Ok(())
            })
        })?;
        counted(reason, before).with_context(|| format!("a {reason} session was not counted"))?;
    }
    let before = refused(&pair, "unauthenticated");
    send_sealed(&wrong_key, &[flow(2)])?;
    counted("unauthenticated", before).context("the forged session was not counted")?;

    // A genuine record naming a service this node does not have is refused and counted.
    let Record::Flow(mut other) = flow(3) else {
        unreachable!()
    };
    other.service = "no-such-service".into();
    send_sealed(&key, &[Record::Flow(other)])?;
    until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "the refused record",
        || {
            let sync = pair.daemon(0).status()?.sync.context("no sync status")?;
            Ok(sync.records_refused.get("unknown service") == Some(&1))
        },
    )?;
    ensure!(
        holds(&pair)? == 2,
        "hostile sessions changed the flow table: {} entries",
        holds(&pair)?
    );
    Ok(())
}
