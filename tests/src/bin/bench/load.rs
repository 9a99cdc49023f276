//! The load client: `wrk` (Debian's), HTTP/1.1 requests to a small nginx response, either
//! one request per connection (`Connection: close`) or back to back on kept-alive
//! connections. Several instances run side by side, one per group of servers. wrk reaches
//! plain routing's rate through the harness where the tokio client this replaced did not.
use std::{net::SocketAddrV4, process::Command, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use harness::netns::Netns;

/// wrk's threads per instance: two instances or more share the machine's two cores.
const THREADS: usize = 2;

#[derive(Clone, Copy)]
pub enum Mode {
    /// One request per connection.
    NewConnections,
    /// Requests back to back on connections opened once.
    KeepAlive,
}

pub struct Load {
    pub target: SocketAddrV4,
    pub connections: usize,
    pub duration: Duration,
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    /// Completed requests (= connections in `NewConnections` mode).
    pub completed: u64,
    /// Socket errors and non-2xx responses.
    pub errors: u64,
    pub elapsed: Duration,
}

/// Runs the loads side by side from `ns`.
pub fn run_all(ns: &Netns, loads: &[Load]) -> Result<Vec<Outcome>> {
    let children = loads
        .iter()
        .map(|load| {
            let mut wrk = Command::new("ip");
            wrk.args(["netns", "exec", ns.name(), "wrk", "--latency"])
                .arg(format!("-t{}", THREADS.min(load.connections)))
                .arg(format!("-c{}", load.connections))
                .arg(format!("-d{}s", load.duration.as_secs().max(1)))
                .args(["--timeout", "5s"]);
            if matches!(load.mode, Mode::NewConnections) {
                wrk.args(["-H", "Connection: close"]);
            }
            wrk.arg(format!("http://{}/", load.target))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("run wrk (cargo xtask bench installs it)")
        })
        .collect::<Result<Vec<_>>>()?;
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().context("wait for wrk")?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "wrk failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
            parse(&text)
        })
        .collect()
}

/// wrk's summary: "N requests in Xs, ...", "Socket errors: connect a, read b, write c,
/// timeout d", "Non-2xx or 3xx responses: e".
fn parse(report: &str) -> Result<Outcome> {
    let mut outcome = None;
    let mut errors = 0;
    for line in report.lines().map(str::trim) {
        if let Some((count, rest)) = line.split_once(" requests in ") {
            let seconds = rest.split(',').next().unwrap_or_default();
            outcome = Some((count.trim().parse::<u64>()?, duration(seconds)?));
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let n = part.split_whitespace().last().unwrap_or("0");
                errors += n.parse::<u64>().with_context(|| format!("in {line:?}"))?;
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += n.trim().parse::<u64>()?;
        }
    }
    let Some((completed, elapsed)) = outcome else {
        bail!("no request count in wrk's report: {report}");
    };
    Ok(Outcome {
        completed,
        errors,
        elapsed,
    })
}

/// "8.00s", "1.00m" or "500.00ms" as wrk prints them.
fn duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, 60.0)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        bail!("unknown duration {text:?}");
    };
    Ok(Duration::from_secs_f64(number.parse::<f64>()? * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_reports() {
        let report = "Running 8s test @ http://10.100.0.1:443/\n  2 threads and 48 connections\n\
                      Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                      Latency     1.02ms  300.00us  10.00ms   90.00%\n\
                      160000 requests in 8.00s, 20.00MB read\n\
                      Socket errors: connect 1, read 2, write 0, timeout 3\n\
                      Non-2xx or 3xx responses: 4\n\
                      Requests/sec:  20000.00\nTransfer/sec:      2.50MB\n";
        assert_eq!(
            parse(report).unwrap(),
            Outcome {
                completed: 160_000,
                errors: 10,
                elapsed: Duration::from_secs(8),
            }
        );
        assert!(parse("garbage").is_err());
        assert_eq!(duration("1.00m").unwrap(), Duration::from_secs(60));
        assert_eq!(duration("500.00ms").unwrap(), Duration::from_millis(500));
    }
}
