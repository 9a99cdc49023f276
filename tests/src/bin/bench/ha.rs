//! Section 4: high availability (docs/ha.md). Both deployments, with real keepalived (and
//! BIRD for ECMP): how long a failover takes and how many connections it breaks; and the flow sync at set
//! rates of new connections: latency, bytes on the sync link and daemon CPU.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use harness::{
    active_active::ActiveActive,
    churn::{self, cpu_seconds},
    heartbeat::{Heartbeat, Held},
    pair::{Pair, PORT, VIP},
    wait::until,
};
use serde::Serialize;

const START_WAIT: Duration = Duration::from_secs(30);
/// Churn threads: enough to reach the higher rate on two cores.
const THREADS: usize = 4;

#[derive(Serialize, Clone)]
pub struct Failover {
    pub deployment: &'static str,
    pub connections: usize,
    /// From the kill (SIGKILL of lb and keepalived, links down) until the survivor owns
    /// every address and route the dead node had.
    pub takeover_s: f64,
    /// The longest a connection went unanswered while each asked once a second.
    pub longest_silence_s: f64,
    pub broken: usize,
}

#[derive(Serialize, Clone)]
pub struct SyncPoint {
    pub target_per_s: f64,
    pub achieved_per_s: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub bytes_per_connection: f64,
    /// Daemon CPU (seconds per second) per 1,000 new connections/s.
    pub sender_cpu: f64,
    pub receiver_cpu: f64,
    pub records_dropped: u64,
}

#[derive(Serialize, Clone)]
pub struct Ha {
    pub failover: Vec<Failover>,
    pub sync: Vec<SyncPoint>,
}

/// Clients the failover connections come from, as in tests/tests/ha.rs.
const CLIENTS: usize = 100;
/// Each held connection asks once per beat, before, through and after the kill.
const BEAT: Duration = Duration::from_secs(1);
const ROUNDS_WAIT: Duration = Duration::from_secs(20);

/// Runs the heartbeat over `held` through `kill` (which returns the takeover time).
fn through_failover(
    deployment: &'static str,
    held: Vec<Held>,
    kill: impl FnOnce() -> Result<Duration>,
) -> Result<Failover> {
    let connections = held.len();
    let heartbeat = Heartbeat::start(held, BEAT);
    heartbeat.wait_rounds(1, ROUNDS_WAIT)?;
    let takeover = kill()?;
    heartbeat.wait_rounds(2, ROUNDS_WAIT)?;
    let beats = heartbeat.stop()?;
    Ok(Failover {
        deployment,
        connections,
        takeover_s: takeover.as_secs_f64(),
        longest_silence_s: beats.longest_silence.as_secs_f64(),
        broken: beats.broken,
    })
}

fn active_standby(connections: usize) -> Result<Failover> {
    let mut pair = Pair::build(3, CLIENTS)?;
    let _servers = pair.start_servers()?;
    let services = pair.services();
    let (active, standby) = pair.start_active_standby(&services, START_WAIT)?;
    let vip = SocketAddr::new(VIP.into(), PORT);
    let held = Held::open_many(&pair.client, &pair.client_addresses, vip, connections)?;
    until(
        START_WAIT,
        Duration::from_millis(20),
        "the standby's copy",
        || Ok(pair.daemon(standby).status()?.tables.flows.entries == 2 * connections as u64),
    )?;
    through_failover("active/standby (keepalived VRRP)", held, || {
        let killed = Instant::now();
        pair.nodes[active].die()?;
        pair.wait_for_master(standby, Duration::from_secs(10))?;
        Ok(killed.elapsed())
    })
}

fn active_active(connections: usize) -> Result<Failover> {
    let mut both = ActiveActive::start(CLIENTS, START_WAIT)?;
    let held = Held::open_many(
        &both.cluster.client,
        &both.cluster.client_addresses,
        both.vip(),
        connections,
    )?;
    both.wait_for_copies(connections as u64, START_WAIT)?;
    through_failover("active/active (BGP ECMP, hold time 3 s)", held, || {
        both.kill(0)
    })
}

fn sync_at(rate: f64, duration: Duration) -> Result<SyncPoint> {
    let mut pair = Pair::build(3, 20)?;
    let _servers = pair.start_servers()?;
    let services = pair.services();
    pair.start_synced("closing_timeout = 2\n", &services, START_WAIT)?;
    let pids = [pair.daemon(0).pid(), pair.daemon(1).pid()];
    let cpu_before = [cpu_seconds(pids[0])?, cpu_seconds(pids[1])?];
    let vip = SocketAddr::new(VIP.into(), PORT);
    let churn = churn::run(
        &pair.client,
        &pair.client_addresses,
        vip,
        THREADS,
        duration,
        Some(rate),
    );
    let cpu_after = [cpu_seconds(pids[0])?, cpu_seconds(pids[1])?];
    ensure!(
        churn.failed.is_empty(),
        "{} connections failed: {:?}",
        churn.failed.len(),
        churn.failed.first()
    );
    let sender = pair.daemon(0).status()?.sync.context("no sync status")?;
    let receiver = pair.daemon(1).status()?.sync.context("no sync status")?;
    let peer = sender.peers.first().context("no peer")?;
    let per_thousand = |k: usize| {
        (cpu_after[k] - cpu_before[k]) / churn.elapsed.as_secs_f64() / (churn.rate() / 1000.0)
    };
    Ok(SyncPoint {
        target_per_s: rate,
        achieved_per_s: churn.rate(),
        latency_p50_ms: receiver.latency_p50_ms,
        latency_p99_ms: receiver.latency_p99_ms,
        bytes_per_connection: peer.bytes_sent as f64 / churn.opened as f64,
        sender_cpu: per_thousand(0),
        receiver_cpu: per_thousand(1),
        records_dropped: peer.records_dropped,
    })
}

pub fn run(connections: usize, duration: Duration) -> Result<Ha> {
    let failover = vec![
        active_standby(connections).context("active/standby failover")?,
        active_active(connections).context("active/active failover")?,
    ];
    let sync = [1_000.0, 5_000.0]
        .into_iter()
        .map(|rate| sync_at(rate, duration).with_context(|| format!("sync at {rate}/s")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Ha { failover, sync })
}
