//! Long-lived connections that each exchange a request every period on a thread of their
//! own, as Lync clients' keep-alives do, while a test kills, revives and hands over nodes:
//! which connections broke or moved to another server, and the longest any of them went
//! unanswered.
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};

use crate::{client::Connection, netns::Netns, wait::until};

/// Broken connections described in full; the rest are only counted.
const DESCRIBED_BREAKS: usize = 5;

/// A connection and the server that answered it first.
pub struct Held {
    pub source: Ipv4Addr,
    pub connection: Connection,
    pub server: String,
}

impl Held {
    /// `count` connections to `target` from `clients` in turn (inside `ns`), each answered
    /// once.
    pub fn open_many(
        ns: &Netns,
        clients: &[Ipv4Addr],
        target: SocketAddr,
        count: usize,
    ) -> Result<Vec<Self>> {
        (0..count)
            .map(|i| {
                let source = clients[i % clients.len()];
                let mut connection = Connection::open(ns, source, 0, target)?;
                let server = connection.ask()?.server;
                Ok(Self {
                    source,
                    connection,
                    server,
                })
            })
            .collect()
    }
}

/// What the heartbeat saw, once stopped.
#[derive(Debug)]
pub struct Beats {
    pub connections: usize,
    /// Rounds in which every connection still unbroken was asked.
    pub rounds: u64,
    pub broken: usize,
    /// The first few broken connections, with what happened to them.
    pub breaks: Vec<String>,
    /// The longest time between two answers on one connection.
    pub longest_silence: Duration,
}

pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<Beats>,
}

impl Heartbeat {
    /// Asks on every connection once per `period` until stopped. A connection that fails
    /// or is answered by another server is broken and not asked again (each failure costs
    /// an I/O timeout).
    pub fn start(mut connections: Vec<Held>, period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop_flag, round_count) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut last_answer = vec![started; connections.len()];
            let mut alive = vec![true; connections.len()];
            let mut beats = Beats {
                connections: connections.len(),
                rounds: 0,
                broken: 0,
                breaks: Vec::new(),
                longest_silence: Duration::ZERO,
            };
            let mut next_round = started;
            while !stop_flag.load(Ordering::Relaxed) {
                for (i, held) in connections.iter_mut().enumerate() {
                    if !alive[i] {
                        continue;
                    }
                    let failure = match held.connection.ask() {
                        Ok(reply) if reply.server == held.server => None,
                        Ok(reply) => {
                            Some(format!("now {} instead of {}", reply.server, held.server))
                        }
                        Err(e) => Some(format!("{e:#}")),
                    };
                    let now = Instant::now();
                    match failure {
                        None => {
                            beats.longest_silence = beats.longest_silence.max(now - last_answer[i]);
                            last_answer[i] = now;
                        }
                        Some(what) => {
                            alive[i] = false;
                            beats.broken += 1;
                            if beats.breaks.len() < DESCRIBED_BREAKS {
                                beats.breaks.push(format!(
                                    "{} {}: {what}",
                                    held.source, held.connection.local
                                ));
                            }
                        }
                    }
                }
                beats.rounds += 1;
                round_count.store(beats.rounds, Ordering::Relaxed);
                next_round += period;
                if let Some(wait) = next_round.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            beats
        });
        Self {
            stop,
            rounds,
            thread,
        }
    }

    /// Waits until `n` rounds have completed after this call: every connection asked
    /// `n` times since.
    pub fn wait_rounds(&self, n: u64, within: Duration) -> Result<()> {
        let target = self.rounds.load(Ordering::Relaxed) + n + 1;
        until(
            within,
            Duration::from_millis(20),
            "heartbeat rounds",
            || Ok(self.rounds.load(Ordering::Relaxed) >= target),
        )
        .map(drop)
        .with_context(|| format!("{n} heartbeat rounds did not complete within {within:?}"))
    }

    /// Stops after the current round; returns what it saw.
    pub fn stop(self) -> Result<Beats> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the heartbeat thread panicked"))
    }
}
