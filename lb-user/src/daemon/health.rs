//! Health checks: one task per (service, server). A server that fails `fall` checks in a row
//! is reported down, one that then passes `rise` in a row is reported up again. Servers
//! start up, so a daemon restart does not empty the pool while the first checks run.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::mpsc, task::JoinHandle};

use crate::config::{HealthConfig, HealthKind};

/// What to check, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub service: String,
    pub address: IpAddr,
    /// The monitor port (may differ from the balanced port).
    pub port: u16,
    pub config: HealthConfig,
}

/// One check's outcome, with the state change it caused, if any.
#[derive(Debug, Clone)]
pub struct Report {
    pub service: String,
    pub address: IpAddr,
    pub result: Result<Duration, String>,
    /// `Some(up)` when this check moved the server up or down.
    pub transition: Option<bool>,
}

pub struct Checker {
    tasks: BTreeMap<(String, IpAddr), (Target, JoinHandle<()>)>,
    reports: mpsc::UnboundedSender<Report>,
}

impl Checker {
    pub fn new(reports: mpsc::UnboundedSender<Report>) -> Self {
        Self {
            tasks: BTreeMap::new(),
            reports,
        }
    }

    /// Starts, restarts (when its settings changed) or stops tasks to match `targets`.
    pub fn reconcile(&mut self, targets: Vec<Target>) {
        let mut wanted: BTreeMap<(String, IpAddr), Target> = targets
            .into_iter()
            .map(|t| ((t.service.clone(), t.address), t))
            .collect();
        self.tasks
            .retain(|key, (target, task)| match wanted.get(key) {
                Some(t) if t == target => {
                    wanted.remove(key);
                    true
                }
                _ => {
                    task.abort();
                    false
                }
            });
        for (key, target) in wanted {
            let task = tokio::spawn(run(target.clone(), self.reports.clone()));
            self.tasks.insert(key, (target, task));
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

async fn run(target: Target, reports: mpsc::UnboundedSender<Report>) {
    let cfg = &target.config;
    let client = match http_client(&target) {
        Ok(c) => c,
        Err(e) => {
            let _ = reports.send(Report {
                service: target.service.clone(),
                address: target.address,
                result: Err(format!("cannot set up the check: {e}")),
                transition: None,
            });
            return;
        }
    };
    let mut ticker = tokio::time::interval(seconds(cfg.interval));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut up, mut passes, mut failures) = (true, 0u32, 0u32);
    loop {
        ticker.tick().await;
        let result = probe(&target, client.as_ref()).await;
        let mut transition = None;
        match &result {
            Ok(_) => {
                failures = 0;
                passes = passes.saturating_add(1);
                if !up && passes >= cfg.rise {
                    up = true;
                    transition = Some(true);
                }
            }
            Err(_) => {
                passes = 0;
                failures = failures.saturating_add(1);
                if up && failures >= cfg.fall {
                    up = false;
                    transition = Some(false);
                }
            }
        }
        let report = Report {
            service: target.service.clone(),
            address: target.address,
            result,
            transition,
        };
        if reports.send(report).is_err() {
            return; // the daemon is shutting down
        }
    }
}

fn http_client(target: &Target) -> reqwest::Result<Option<reqwest::Client>> {
    let cfg = &target.config;
    if cfg.kind == HealthKind::Tcp {
        return Ok(None);
    }
    let mut builder = reqwest::Client::builder()
        .timeout(seconds(cfg.timeout))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        // Pools present internal certificates; the check is about liveness, not identity.
        .danger_accept_invalid_certs(true);
    if let Some(sni) = &cfg.sni {
        builder = builder.resolve(sni, SocketAddr::new(target.address, target.port));
    }
    builder.build().map(Some)
}

fn url(target: &Target) -> String {
    let cfg = &target.config;
    let scheme = if cfg.kind == HealthKind::Https {
        "https"
    } else {
        "http"
    };
    let host = cfg
        .sni
        .clone()
        .unwrap_or_else(|| target.address.to_string());
    format!("{scheme}://{host}:{}{}", target.port, cfg.path)
}

/// One check: its latency, or why it failed.
pub async fn probe(target: &Target, client: Option<&reqwest::Client>) -> Result<Duration, String> {
    let started = Instant::now();
    let timeout = seconds(target.config.timeout);
    match client {
        None => {
            let addr = SocketAddr::new(target.address, target.port);
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Err(_) => Err(format!("tcp connect to {addr}: no answer in {timeout:?}")),
                Ok(Err(e)) => Err(format!("tcp connect to {addr}: {e}")),
                Ok(Ok(_)) => Ok(started.elapsed()),
            }
        }
        Some(client) => {
            let url = url(target);
            let response = client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let status = response.status().as_u16();
            if target.config.expect.contains(&status) {
                Ok(started.elapsed())
            } else {
                Err(format!(
                    "GET {url}: status {status}, expected {:?}",
                    target.config.expect
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnDown;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn target(kind: HealthKind, port: u16, expect: Vec<u16>) -> Target {
        Target {
            service: "web".into(),
            address: IpAddr::from([127, 0, 0, 1]),
            port,
            config: HealthConfig {
                kind,
                port: Some(port),
                path: "/status".into(),
                expect,
                sni: None,
                interval: 0.05,
                timeout: 1.0,
                rise: 2,
                fall: 2,
                on_down: OnDown::Keep,
            },
        }
    }

    /// A loopback HTTP server answering every request with `status`; returns its port.
    async fn http_server(status: u16) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn tcp_probe_sees_listener_and_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(probe(&target(HealthKind::Tcp, port, vec![]), None)
            .await
            .is_ok());
        drop(listener);
        let err = probe(&target(HealthKind::Tcp, port, vec![]), None)
            .await
            .unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        let port = http_server(204).await;
        let ok = target(HealthKind::Http, port, vec![200, 204]);
        let client = http_client(&ok).unwrap();
        assert!(probe(&ok, client.as_ref()).await.is_ok());
        let strict = target(HealthKind::Http, port, vec![200]);
        let err = probe(&strict, http_client(&strict).unwrap().as_ref())
            .await
            .unwrap_err();
        assert!(err.contains("status 204"), "{err}");
    }

    #[tokio::test]
    async fn https_probe_fails_cleanly_against_plain_http() {
        let port = http_server(200).await;
        let t = target(HealthKind::Https, port, vec![200]);
        let err = probe(&t, http_client(&t).unwrap().as_ref())
            .await
            .unwrap_err();
        assert!(err.starts_with("GET https://127.0.0.1"), "{err}");
    }

    /// Counts the checks with the matching outcome until the server goes `up` (or down).
    async fn checks_until(rx: &mut mpsc::UnboundedReceiver<Report>, up: bool) -> u32 {
        let mut matching = 0;
        loop {
            let r = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            if r.result.is_ok() == up {
                matching += 1;
            }
            if r.transition == Some(up) {
                return matching;
            }
        }
    }

    #[tokio::test]
    async fn fall_and_rise_are_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut checker = Checker::new(tx);
        checker.reconcile(vec![target(HealthKind::Tcp, port, vec![])]);
        drop(listener);
        assert_eq!(checks_until(&mut rx, false).await, 2, "fall = 2");
        let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        assert_eq!(checks_until(&mut rx, true).await, 2, "rise = 2");
        checker.reconcile(Vec::new());
        assert!(checker.tasks.is_empty());
    }
}
