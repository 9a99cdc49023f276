//! `lb daemon`: loads and attaches the data plane, applies the config, serves the control
//! socket, reloads on SIGHUP, detaches cleanly on SIGTERM / SIGINT.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::Mutex,
};
use tracing::{error, info, warn};

use crate::{
    api::{Request, Response, MAX_REQUEST_BYTES, REQUEST_TIMEOUT},
    config::Config,
    dataplane::{Capacity, Dataplane},
    pool::Pool,
};

struct State {
    config_path: PathBuf,
    dataplane: Dataplane,
    pool: Pool,
}

impl State {
    fn reload(&mut self) -> Result<()> {
        let config = Config::load(&self.config_path)?;
        let old = self.pool.config().map(|c| c.daemon.clone());
        if old.as_ref().is_some_and(|d| *d != config.daemon) {
            warn!("changes to [daemon] need a restart; applying [[service]] changes only");
        }
        let mut effective = config;
        if let Some(daemon) = old {
            effective.daemon = daemon;
        }
        self.pool.apply(&mut self.dataplane, &effective)?;
        info!(services = effective.services.len(), "configuration reloaded");
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => self.pool.status(&self.dataplane).map(Response::Status),
            Request::Reload => self.reload().map(|()| Response::Reloaded),
        };
        result.unwrap_or_else(|e| Response::Error { message: format!("{e:#}") })
    }
}

/// Sysctls the data plane relies on, per attached interface:
/// - `forwarding`: `bpf_fib_lookup` refuses to route for an interface that does not forward,
///   and the kernel forwards what the program hands it while a neighbour is unresolved;
/// - `accept_local` and `rp_filter=0`: such handed-over packets carry a SNAT address (a
///   local address) as their source, which the kernel otherwise drops as martian.
fn prepare_host(interfaces: &[String]) -> Result<()> {
    for iface in interfaces {
        for (key, value) in [("forwarding", "1"), ("accept_local", "1"), ("rp_filter", "0")] {
            let path = format!("/proc/sys/net/ipv4/conf/{iface}/{key}");
            let current = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            if current.trim() != value {
                std::fs::write(&path, value).with_context(|| format!("set {path} = {value}"))?;
                info!(%iface, sysctl = key, value, "sysctl set for the data plane");
            }
        }
    }
    let all_rp = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap_or_default();
    if all_rp.trim() != "0" {
        warn!("net.ipv4.conf.all.rp_filter is not 0; packets handed to the kernel while a neighbour resolves may be dropped");
    }
    Ok(())
}

pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    prepare_host(&config.daemon.interfaces)?;
    let mut dataplane = Dataplane::load(Capacity {
        max_flows: config.daemon.max_flows,
        max_affinities: config.daemon.max_affinities,
    })?;
    let mut pool = Pool::default();
    // Maps first, then attach: the program never runs against empty tables.
    pool.apply(&mut dataplane, &config)?;
    for iface in &config.daemon.interfaces {
        dataplane.attach(iface, config.daemon.xdp_mode)?;
    }
    let listener = bind_control_socket(Path::new(&config.daemon.control_socket))?;
    info!(socket = %config.daemon.control_socket, services = config.services.len(), "lb daemon ready");

    let state = Arc::new(Mutex::new(State { config_path: config_path.to_path_buf(), dataplane, pool }));
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, state).await {
                            warn!(error = %format!("{e:#}"), "control client");
                        }
                    });
                }
                Err(e) => error!(error = %e, "accept on the control socket"),
            },
            _ = hangup.recv() => {
                if let Err(e) = state.lock().await.reload() {
                    error!(error = %format!("{e:#}"), "reload on SIGHUP failed; keeping the running configuration");
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&config.daemon.control_socket);
    info!("lb daemon stopping; detaching XDP programs");
    Ok(())
}

fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        // A live daemon answers; a stale socket file from a crash is replaced.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another lb daemon is already serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    // Root only: the socket controls the data plane.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
    let mut line = String::new();
    let n = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("client sent no request in time")??;
    if n == 0 {
        return Ok(());
    }
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => state.lock().await.handle(request),
        Err(e) => Response::Error { message: format!("malformed request: {e}") },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await.context("client hung up before the response")?;
    Ok(())
}
