//! Connection churn: threads inside the client namespace opening connections one after
//! another (one request each, then closed), as fast as they can or at a set rate. Used by
//! the HA tests and the HA section of the benchmarks.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};

use crate::netns::Netns;

const TIMEOUT: Duration = Duration::from_secs(5);

/// What a churn run did.
pub struct Churn {
    pub opened: u64,
    /// One line per connection that failed.
    pub failed: Vec<String>,
    pub elapsed: Duration,
}

impl Churn {
    pub fn rate(&self) -> f64 {
        self.opened as f64 / self.elapsed.as_secs_f64()
    }
}

/// One connection from `source`, one request, closed; call inside the client namespace.
fn one_request(source: IpAddr, target: SocketAddr) -> Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&target.into(), TIMEOUT)?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: lb-test\r\n\r\n")?;
    // The test server keeps the connection open: read until the reply's last line.
    let mut reply = Vec::new();
    let mut buf = [0; 512];
    while !(reply.ends_with(b"\n") && String::from_utf8_lossy(&reply).contains("server=")) {
        let n = stream.read(&mut buf)?;
        ensure!(n > 0, "closed before a reply");
        reply.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// Opens connections to `target` from `sources` in turn, with `threads` threads, for
/// `duration`; with `rate`, at most that many per second in all.
pub fn run(
    ns: &Netns,
    sources: &[Ipv4Addr],
    target: SocketAddr,
    threads: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Churn {
    let started = Instant::now();
    let opened = AtomicU64::new(0);
    let failed = Mutex::new(Vec::new());
    let spacing = rate.map(|r| Duration::from_secs_f64(threads as f64 / r));
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (opened, failed) = (&opened, &failed);
            scope.spawn(move || {
                let result = ns.run(|| {
                    let mut i = t;
                    let mut next = started;
                    while started.elapsed() < duration {
                        if let Some(spacing) = spacing {
                            next += spacing;
                            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                        let source = IpAddr::from(sources[i % sources.len()]);
                        if let Err(e) = one_request(source, target) {
                            failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(format!("{source}: {e:#}"));
                        }
                        opened.fetch_add(1, Ordering::Relaxed);
                        i += threads;
                    }
                });
                if let Err(e) = result {
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("churn thread: {e:#}"));
                }
            });
        }
    });
    Churn {
        opened: opened.into_inner(),
        failed: failed.into_inner().unwrap_or_else(|e| e.into_inner()),
        elapsed: started.elapsed(),
    }
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    ensure!(fields.len() > 12, "short /proc/{pid}/stat");
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / per_second)
}
