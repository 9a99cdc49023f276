//! Health checks: one task per (service, server). A server that fails `fall` checks in a row
//! is reported down, one that then passes `rise` in a row is reported up again. Servers
//! start up, so a daemon restart does not empty the pool while the first checks run; a
//! check restarted with new settings starts from the server's state as the pool has it,
//! so a server that is down stays down until it passes `rise` checks, and is reported up
//! when it does.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::mpsc, task::JoinHandle};

use crate::config::{ca_certificates, HealthConfig, HealthKind};

/// How much of a response body `expect_body` looks at: a server cannot make a check read
/// without end.
const BODY_LIMIT: usize = 64 * 1024;

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

    /// Starts, restarts (when its settings changed) or stops tasks to match `targets`; a
    /// task (re)started for a server `is_down` says is out starts from down.
    pub fn reconcile(&mut self, targets: Vec<Target>, is_down: impl Fn(&Target) -> bool) {
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
            let up = !is_down(&target);
            let task = tokio::spawn(run(target.clone(), up, self.reports.clone()));
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

async fn run(target: Target, mut up: bool, reports: mpsc::UnboundedSender<Report>) {
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
    let (mut passes, mut failures) = (0u32, 0u32);
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

fn http_client(target: &Target) -> Result<Option<reqwest::Client>, String> {
    let cfg = &target.config;
    if cfg.kind == HealthKind::Tcp {
        return Ok(None);
    }
    let mut builder = reqwest::Client::builder()
        .timeout(seconds(cfg.timeout))
        // A new connection per check: one kept alive from the last check would pass
        // while the server accepts no new connections (its listener gone).
        .pool_max_idle_per_host(0)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    builder = match &cfg.ca_file {
        Some(path) => {
            let certificates = ca_certificates(path).map_err(|e| format!("{e:#}"))?;
            certificates
                .into_iter()
                .fold(builder.tls_built_in_root_certs(false), |b, c| {
                    b.add_root_certificate(c)
                })
        }
        // Pools present internal certificates; the check is about liveness, not identity.
        None => builder.danger_accept_invalid_certs(true),
    };
    if let Some(sni) = &cfg.sni {
        builder = builder.resolve(sni, SocketAddr::new(target.address, target.port));
    }
    builder.build().map(Some).map_err(|e| e.to_string())
}

/// Whether the body (its first `BODY_LIMIT` bytes) contains `expected`.
async fn body_contains(mut response: reqwest::Response, expected: &str) -> Result<bool, String> {
    let mut body = Vec::new();
    while body.len() < BODY_LIMIT {
        match response.chunk().await.map_err(|e| e.to_string())? {
            Some(chunk) => body.extend_from_slice(&chunk),
            None => break,
        }
    }
    body.truncate(BODY_LIMIT);
    Ok(String::from_utf8_lossy(&body).contains(expected))
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
            if !target.config.expect.contains(&status) {
                return Err(format!(
                    "GET {url}: status {status}, expected {:?}",
                    target.config.expect
                ));
            }
            if let Some(expected) = &target.config.expect_body {
                let found = body_contains(response, expected)
                    .await
                    .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
                if !found {
                    return Err(format!("GET {url}: the body does not contain {expected:?}"));
                }
            }
            Ok(started.elapsed())
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
                expect_body: None,
                ca_file: None,
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

    /// A CA: its PEM, and what signs with it.
    fn ca() -> (String, rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), cert, key)
    }

    /// A loopback HTTPS server with a certificate for 127.0.0.1 signed by `ca`, answering
    /// 200 with `body`; returns its port.
    async fn https_server(
        ca: &(String, rcgen::Certificate, rcgen::KeyPair),
        body: &'static str,
    ) -> u16 {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca.1, &ca.2)
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        port
    }

    async fn check(t: &Target) -> Result<Duration, String> {
        probe(t, http_client(t)?.as_ref()).await
    }

    #[tokio::test]
    async fn https_probe_passes_any_certificate_and_matches_the_body() {
        let port = https_server(&ca(), "pool ready").await;
        let mut t = target(HealthKind::Https, port, vec![200]);
        check(&t).await.unwrap();
        t.config.expect_body = Some("ready".into());
        check(&t).await.unwrap();
        t.config.expect_body = Some("draining".into());
        let err = check(&t).await.unwrap_err();
        assert!(err.contains("does not contain \"draining\""), "{err}");
    }

    #[tokio::test]
    async fn https_probe_verifies_the_certificate_against_its_ca_file() {
        let (pool_ca, other_ca) = (ca(), ca());
        let port = https_server(&pool_ca, "ok").await;
        let dir = std::env::temp_dir().join(format!("lb-health-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut t = target(HealthKind::Https, port, vec![200]);
        for (name, pem, passes) in [("pool", &pool_ca.0, true), ("other", &other_ca.0, false)] {
            let path = dir.join(format!("{name}.pem"));
            std::fs::write(&path, pem).unwrap();
            t.config.ca_file = Some(path.display().to_string());
            let result = check(&t).await;
            assert_eq!(result.is_ok(), passes, "CA {name}: {result:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Counts the checks with the matching outcome until the server goes `up` (or down),
    /// within 20 checks.
    async fn checks_until(rx: &mut mpsc::UnboundedReceiver<Report>, up: bool) -> u32 {
        let mut matching = 0;
        for _ in 0..20 {
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
        panic!("no transition to up = {up} within 20 checks");
    }

    /// A loopback listener and a checker with a TCP check on it, started up (or down).
    async fn checked_listener(
        down: bool,
    ) -> (
        tokio::net::TcpListener,
        Checker,
        mpsc::UnboundedReceiver<Report>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut checker = Checker::new(tx);
        checker.reconcile(vec![target(HealthKind::Tcp, port, vec![])], |_| down);
        (listener, checker, rx)
    }

    #[tokio::test]
    async fn fall_and_rise_are_counted() {
        let (listener, mut checker, mut rx) = checked_listener(false).await;
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        assert_eq!(checks_until(&mut rx, false).await, 2, "fall = 2");
        let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        assert_eq!(checks_until(&mut rx, true).await, 2, "rise = 2");
        checker.reconcile(Vec::new(), |_| false);
        assert!(checker.tasks.is_empty());
    }

    /// A check restarted for a server that is down (its settings changed while it was out)
    /// reports it up once it passes `rise` checks.
    #[tokio::test]
    async fn a_restarted_check_brings_a_down_server_back() {
        let (_listener, _checker, mut rx) = checked_listener(true).await;
        assert_eq!(checks_until(&mut rx, true).await, 2, "rise = 2");
    }
}
