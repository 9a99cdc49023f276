//! Section 3: the control plane. Maglev table builds (time, fairness, disruption) in
//! process, and against a running daemon how fast a dead server leaves selection and how a
//! drain takes effect.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use harness::{
    fixture::{Fixture, ServiceSpec},
    server::Server,
    topology::Spec,
    wait::until,
};
use lb::{
    api::{CheckOutcome, ServerState},
    dataplane::maglev::{build, Member},
};
use lb_common::MAGLEV_SIZE;
use serde::Serialize;

use crate::stats::Summary;

#[derive(Serialize, Clone)]
pub struct MaglevPoint {
    pub backends: usize,
    pub weighted: bool,
    pub build_ms: Summary,
    /// Largest and smallest slot count of a backend relative to its fair share.
    pub max_over_fair: f64,
    pub min_over_fair: f64,
    /// Share of slots that change owner when one backend is removed / added (ideal: 1/N).
    pub moved_on_remove: f64,
    pub moved_on_add: f64,
}

#[derive(Serialize, Clone)]
pub struct Health {
    pub interval_s: f64,
    pub fall: u32,
    /// From the monitored port closing to the server being out of selection.
    pub detection_s: Summary,
    /// Round trip of `lb backend drain` (the table is swapped before it returns).
    pub drain_command_ms: Summary,
    /// New connections from clients of the drained server, made right after the command
    /// returned, that still reached it (should be 0).
    pub reached_drained_server: u64,
    pub checked_connections: u64,
}

#[derive(Serialize, Clone)]
pub struct Control {
    pub maglev: Vec<MaglevPoint>,
    pub health: Health,
}

/// Section 3 of the report: Maglev builds in process, then health and drain against a daemon.
pub fn run(maglev_rounds: usize, health_rounds: usize) -> Result<Control> {
    Ok(Control {
        maglev: maglev(maglev_rounds),
        health: health(health_rounds).context("health and drain timing")?,
    })
}

fn members(n: usize, weighted: bool) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            id: i as u32,
            identity: (u64::from(u32::from(Ipv4Addr::new(
                10,
                2,
                (i / 250) as u8,
                (i % 250) as u8 + 1,
            ))) << 16)
                | 4443,
            // Weighted pools: every third server twice as big.
            weight: if weighted && i % 3 == 0 { 2 } else { 1 },
        })
        .collect()
}

fn moved(a: &[u32], b: &[u32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

fn maglev(rounds: usize) -> Vec<MaglevPoint> {
    let mut points = Vec::new();
    for weighted in [false, true] {
        for n in [10, 100, 1000] {
            let pool = members(n, weighted);
            let mut times = Vec::new();
            let mut table = Vec::new();
            for _ in 0..rounds {
                let start = Instant::now();
                table = build(&pool, MAGLEV_SIZE, 0);
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
            let total_weight: u32 = pool.iter().map(|m| m.weight).sum();
            let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
            for &id in &table {
                *slots.entry(id).or_default() += 1;
            }
            let ratios: Vec<f64> = pool
                .iter()
                .map(|m| {
                    let fair =
                        f64::from(MAGLEV_SIZE) * f64::from(m.weight) / f64::from(total_weight);
                    slots.get(&m.id).copied().unwrap_or(0) as f64 / fair
                })
                .collect();
            let without_one = build(&pool[1..], MAGLEV_SIZE, 0);
            let mut plus_one = pool.clone();
            plus_one.extend(
                members(n + 1, weighted)
                    .last()
                    .copied()
                    .map(|m| Member { id: n as u32, ..m }),
            );
            let with_one_more = build(&plus_one, MAGLEV_SIZE, 0);
            points.push(MaglevPoint {
                backends: n,
                weighted,
                build_ms: Summary::of(&times),
                max_over_fair: ratios.iter().copied().fold(0.0, f64::max),
                min_over_fair: ratios.iter().copied().fold(f64::INFINITY, f64::min),
                moved_on_remove: moved(&table, &without_one),
                moved_on_add: moved(&table, &with_one_more),
            });
        }
    }
    points
}

/// Polled every 10 ms: these waits are the measurements.
fn wait_for(limit: Duration, check: impl FnMut() -> Result<bool>) -> Result<Duration> {
    until(limit, Duration::from_millis(10), "the condition", check)
}

fn health(rounds: usize) -> Result<Health> {
    const INTERVAL: f64 = 0.5;
    const FALL: u32 = 3;
    let service = ServiceSpec {
        health: Some(format!("{{ kind = \"tcp\", port = 5061, interval = {INTERVAL}, timeout = 0.3, rise = 1, fall = {FALL} }}")),
        ..ServiceSpec::default()
    };
    let f = Fixture::start(
        &Spec {
            clients: 60,
            ..Spec::default()
        },
        service,
    )?;
    let state_of = |address: Ipv4Addr| -> Result<Option<ServerState>> {
        let status = f.daemon.status()?;
        Ok(status.services[0]
            .backends
            .iter()
            .find(|b| b.address == address)
            .map(|b| b.state.clone()))
    };
    let (mut detection, mut drain_ms) = (Vec::new(), Vec::new());
    let (mut reached, mut checked) = (0, 0);
    let mut monitors: BTreeMap<String, Server> = BTreeMap::new();
    for round in 0..rounds {
        for b in &f.topology.backends {
            if !monitors.contains_key(&b.name) {
                monitors.insert(
                    b.name.clone(),
                    Server::start(&b.ns, &b.name, b.address, 5061)?,
                );
            }
        }
        let victim = &f.topology.backends[round % f.topology.backends.len()];
        wait_for(Duration::from_secs(10), || {
            Ok(state_of(victim.address)? == Some(ServerState::Up)
                && f.daemon.status()?.services[0]
                    .backends
                    .iter()
                    .all(|b| matches!(b.last_check, Some(CheckOutcome::Passed { .. }))))
        })?;
        let clients = f.servers_of(&f.topology.client_addresses)?;
        let victims_clients: Vec<Ipv4Addr> = clients
            .iter()
            .filter(|(_, s)| **s == victim.name)
            .map(|(c, _)| *c)
            .collect();
        ensure!(
            !victims_clients.is_empty(),
            "no client reached {}",
            victim.name
        );

        // Drain: the command returns after the table swap; new connections must already
        // avoid the server. Affinities are flushed so the check tests the table alone.
        let start = Instant::now();
        f.daemon
            .cli_ok(&["backend", "drain", "web-ext", &victim.address.to_string()])?;
        drain_ms.push(start.elapsed().as_secs_f64() * 1e3);
        f.daemon.cli_ok(&[
            "affinity",
            "flush",
            "web-ext",
            "--backend",
            &victim.address.to_string(),
        ])?;
        for &c in &victims_clients {
            checked += 1;
            if f.ask(c)?.server == victim.name {
                reached += 1;
            }
        }
        f.daemon
            .cli_ok(&["backend", "undrain", "web-ext", &victim.address.to_string()])?;

        // Health: close the monitored port (the service port stays up).
        let stopped = Instant::now();
        monitors.remove(&victim.name);
        wait_for(Duration::from_secs(15), || {
            Ok(matches!(
                state_of(victim.address)?,
                Some(ServerState::Down { .. })
            ))
        })?;
        detection.push(stopped.elapsed().as_secs_f64());
    }
    Ok(Health {
        interval_s: INTERVAL,
        fall: FALL,
        detection_s: Summary::of(&detection),
        drain_command_ms: Summary::of(&drain_ms),
        reached_drained_server: reached,
        checked_connections: checked,
    })
}
