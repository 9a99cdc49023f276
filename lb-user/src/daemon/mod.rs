//! `lb daemon`: loads (or adopts) the data plane, applies the config and runtime changes,
//! serves the control socket, reloads on SIGHUP.
//!
//! The program and its maps are pinned: on SIGTERM, SIGINT or a crash the data plane keeps
//! forwarding, and the next daemon adopts it with every flow and affinity. `lb detach`
//! stops the data plane for good.

pub mod announce;
pub mod closing;
pub mod health;
pub mod health_state;
pub mod housekeeping;
pub mod installation;
pub mod metrics;
pub mod pool;
pub mod report;
pub mod runtime;
pub mod sync;
pub mod systemd;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch, Mutex},
};
use tracing::{error, info, warn};

use self::{
    announce::Announcer,
    closing::CloseQueue,
    health::{Checker, Report},
    pool::Pool,
    report::{Basis, StatusSource},
    runtime::{state_directory, state_path, Overlay},
};
use crate::{
    api::{self, unix_now, Request, Response},
    config::Config,
    dataplane::{Capacity, Dataplane, DataplaneLogger},
};

/// How often drain deadlines, alarm counters and the announced routes are checked.
const HOUSEKEEPING_TICK: Duration = Duration::from_secs(1);
/// How often closed flows whose closing timeout has passed are removed.
const CLOSING_TICK: Duration = Duration::from_millis(250);

pub struct State {
    config_path: PathBuf,
    pub dataplane: Dataplane,
    pub pool: Pool,
    checker: Checker,
    /// What BIRD announces for this node (None without `daemon.announce`), for `lb status`.
    announced: Option<Vec<IpAddr>>,
    /// Where `lb status` and the metrics learn what changed (`report::StatusSource`).
    publish: watch::Sender<Arc<Basis>>,
    /// State sync with the peers (`daemon.sync`).
    sync: Option<sync::Handle>,
}

impl State {
    /// Hands readers of the status the pool as it is now.
    fn publish(&self) {
        if let Some(sync) = &self.sync {
            sync.set_directory(self.pool.installation());
        }
        match Basis::of(&self.pool, self.announced.clone()) {
            Ok(basis) => {
                self.publish.send_replace(Arc::new(basis));
            }
            Err(e) => error!(error = %format!("{e:#}"), "publishing the status"),
        }
    }

    /// Starts state sync with the peers (`daemon.sync`); the status reports it from then on.
    async fn start_sync(&mut self, status: &mut StatusSource) -> Result<()> {
        let Some(config) = self.pool.config().daemon.sync.clone() else {
            return Ok(());
        };
        let events = self
            .dataplane
            .take_sync_events()
            .context("the sync ring was taken already")?;
        let tables = sync::Tables {
            events,
            reader: Arc::new(self.dataplane.open_reader()?),
            peer_tables: self.dataplane.open_peer_tables()?,
        };
        let interfaces = self
            .pool
            .config()
            .daemon
            .interfaces
            .iter()
            .map(|name| crate::dataplane::ifindex(name))
            .collect::<Result<Vec<_>>>()?;
        let handle = sync::start(&config, self.pool.installation(), interfaces, tables).await?;
        status.set_sync(handle.stats());
        self.sync = Some(handle);
        Ok(())
    }

    fn sync_handle(&self) -> Result<&sync::Handle> {
        self.sync
            .as_ref()
            .context("this node has no [daemon.sync]: it is not part of an HA pair")
    }

    /// Tells the peers of flows this node removed.
    fn removed(&self, keys: Vec<lb_common::FlowKey>) {
        if let Some(sync) = &self.sync {
            sync.removed(keys);
        }
    }

    /// Points the health checker at the servers as they are now.
    fn reconcile_health(&mut self) {
        let targets = self.pool.health_targets();
        let health = self.pool.health();
        self.checker
            .reconcile(targets, |t| health.is_down(&t.service, t.address));
    }

    fn record_check(&mut self, report: &Report) {
        if let Err(e) = self.pool.record_check(&mut self.dataplane, report) {
            error!(error = %format!("{e:#}"), "applying a health-check result");
        }
        self.publish();
    }

    fn reload(&mut self) -> Result<()> {
        let config = Config::load(&self.config_path)?;
        let changed = config.daemon.changed_keys(&self.pool.config().daemon);
        if !changed.is_empty() {
            anyhow::bail!(
                "{} changed: [daemon] settings take effect at a restart only (systemctl restart lb; flows are kept); nothing was reloaded",
                changed.join(", ")
            );
        }
        let services = config.services.len();
        let vlans = install_vlans(&mut self.dataplane, &config.daemon.interfaces)?;
        self.pool.set_config(config);
        self.pool.sync(&mut self.dataplane)?;
        info!(services, vlans, "configuration reloaded");
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Response {
        // Anything but a read may change which servers exist, so health follows afterwards.
        let changes_servers = !matches!(
            request,
            Request::Status
                | Request::AffinityList { .. }
                | Request::DebugLog { .. }
                | Request::NodeDrain { .. }
                | Request::HaHandover { .. }
                | Request::HaResume
                | Request::MaglevTable { .. }
        );
        let dp = &mut self.dataplane;
        let pool = &mut self.pool;
        let done = |r: Result<()>| r.map(|()| Response::Done);
        let result = match request {
            // Answered from the status source, outside the lock (see `respond`).
            Request::Status => pool.status(dp).map(Response::Status),
            Request::Reload => done(self.reload()),
            Request::BackendAdd {
                service,
                address,
                port,
                weight,
            } => done(pool.add_backend(dp, &service, address, port, weight)),
            Request::BackendRemove { service, address } => {
                done(pool.remove_backend(dp, &service, address))
            }
            Request::BackendDrain {
                service,
                address,
                deadline_s,
            } => done(pool.drain(dp, &service, address, deadline_s)),
            Request::BackendUndrain { service, address } => {
                done(pool.undrain(dp, &service, address))
            }
            Request::BackendWeight {
                service,
                address,
                weight,
            } => done(pool.set_weight(dp, &service, address, weight)),
            Request::AffinityList { service, client } => pool
                .affinity_list(dp, &service, client)
                .map(|entries| Response::Affinities { entries }),
            Request::AffinityFlush {
                service,
                client,
                backend,
            } => pool
                .affinity_flush(dp, &service, client, backend)
                .map(|removed| Response::Flushed { removed }),
            Request::DebugLog { enabled } => {
                info!(enabled, "data-plane debug logging switched");
                done(pool.set_debug_log(dp, enabled))
            }
            Request::NodeDrain { drained } => {
                info!(
                    drained,
                    "node drain switched; routes follow within a second"
                );
                done(pool.set_node_drained(drained))
            }
            Request::HaHandover { force } => {
                let result = self.sync_handle().and_then(|sync| sync.hand_over(force));
                if result.is_ok() {
                    info!("handed over: keepalived keeps this node out of MASTER until `lb ha resume`");
                }
                done(result)
            }
            Request::HaResume => {
                let result = self.sync_handle().and_then(sync::Handle::resume);
                if result.is_ok() {
                    info!("resumed: keepalived may make this node active again");
                }
                done(result)
            }
            Request::MaglevTable { service } => {
                pool.maglev_table(dp, &service).map(Response::MaglevTable)
            }
        };
        let response = result.unwrap_or_else(|e| Response::Error {
            message: format!("{e:#}"),
        });
        if changes_servers {
            self.reconcile_health();
        }
        self.publish();
        response
    }
}

/// A SNAT address on no interface of this host would start a daemon that shows every server
/// up while every connection times out: servers answer an address nothing here owns.
/// Sysctls the data plane relies on, per attached interface and VLAN device on one:
/// - `forwarding` (IPv4 and IPv6): `bpf_fib_lookup` refuses to route for an interface that
///   does not forward, and the kernel forwards what the program hands it while a
///   neighbour is unresolved;
/// - `accept_local` and `rp_filter=0`: such handed-over packets carry a SNAT address (a
///   local address) as their source, which the kernel otherwise drops as martian;
/// - `net.ipv6.conf.all.forwarding`: the kernel forwards IPv6 only with it, whatever the
///   interface's own setting.
///
/// IPv6 settings are skipped on a host without IPv6.
fn prepare_host(interfaces: &[String]) -> Result<()> {
    let vlans = crate::dataplane::vlan::devices_on(interfaces)?;
    let devices = interfaces.iter().chain(vlans.iter().map(|v| &v.name));
    for iface in devices {
        for (family, key, value) in [
            ("ipv4", "forwarding", "1"),
            ("ipv4", "accept_local", "1"),
            ("ipv4", "rp_filter", "0"),
            ("ipv6", "forwarding", "1"),
        ] {
            let path = format!("/proc/sys/net/{family}/conf/{iface}/{key}");
            if family == "ipv6" && !Path::new(&path).exists() {
                continue;
            }
            let current = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            if current.trim() != value {
                std::fs::write(&path, value).with_context(|| format!("set {path} = {value}"))?;
                info!(%iface, sysctl = %format!("{family}.{key}"), value, "sysctl set for the data plane");
            }
        }
    }
    const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
    if Path::new(IPV6_FORWARDING).exists() {
        let current = std::fs::read_to_string(IPV6_FORWARDING)?;
        if current.trim() != "1" {
            std::fs::write(IPV6_FORWARDING, "1")
                .with_context(|| format!("set {IPV6_FORWARDING} = 1"))?;
            info!("sysctl net.ipv6.conf.all.forwarding set to 1 for the data plane");
        }
        for iface in interfaces {
            let accept_ra = format!("/proc/sys/net/ipv6/conf/{iface}/accept_ra");
            if std::fs::read_to_string(&accept_ra).is_ok_and(|v| v.trim() == "1") {
                warn!(%iface, "IPv6 forwarding is on, so router advertisements are now ignored on this interface; set accept_ra = 2 if it learns its routes from them");
            }
        }
    }
    let all_rp =
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap_or_default();
    if all_rp.trim() != "0" {
        warn!("net.ipv4.conf.all.rp_filter is not 0; packets handed to the kernel while a neighbour resolves may be dropped");
    }
    Ok(())
}

/// Loads the data plane (adopting pinned maps) and brings it in line with the config and
/// the persisted runtime changes. Health reports arrive on `reports`.
pub fn start(
    config_path: &Path,
    reports: mpsc::UnboundedSender<Report>,
) -> Result<(State, StatusSource)> {
    let config = Config::load(config_path)?;
    let state_file = state_path(config_path, state_directory().as_deref());
    let overlay = Overlay::load_or_migrate(&state_file, &state_path(config_path, None))?;
    if config.daemon.sync.is_some() {
        // In an HA pair keepalived moves the SNAT addresses: the standby has none.
        info!("daemon.sync is set: SNAT addresses may float (keepalived), their locality is not checked");
    }
    if let Some(first) = crate::config::host_mismatches(&config)?.into_iter().next() {
        anyhow::bail!(first);
    }
    prepare_host(&config.daemon.interfaces)?;
    let mut dataplane = Dataplane::load(
        Capacity {
            max_flows: config.daemon.max_flows,
            max_half_open: config.daemon.max_half_open,
            max_affinities: config.daemon.max_affinities,
        },
        Some(Path::new(&config.daemon.pin_dir)),
    )?;
    let interfaces = config.daemon.interfaces.clone();
    let mode = config.daemon.xdp_mode;
    install_vlans(&mut dataplane, &interfaces)?;
    let mut pool = Pool::new(config, overlay, Some(state_file));
    pool.adopt(&dataplane)?;
    // Maps first, then attach: the program never runs against empty tables.
    pool.sync(&mut dataplane)?;
    for iface in &interfaces {
        dataplane.attach(iface, mode)?;
    }
    let (publish, status) = StatusSource::new(dataplane.open_reader()?);
    let mut state = State {
        config_path: config_path.to_path_buf(),
        dataplane,
        pool,
        checker: Checker::new(reports),
        announced: None,
        publish,
        sync: None,
    };
    state.reconcile_health();
    state.publish();
    Ok((state, status))
}

/// Tells the data plane about the VLAN devices on `interfaces` (see `vlan`); returns how
/// many. VLAN devices added later are picked up by the next reload.
fn install_vlans(dataplane: &mut Dataplane, interfaces: &[String]) -> Result<usize> {
    let devices = crate::dataplane::vlan::devices_on(interfaces)?;
    dataplane.set_vlans(&crate::dataplane::vlan::ports(&devices)?)?;
    for d in &devices {
        info!(vlan = %d.name, vid = d.vid, lower = %d.lower, "VLAN device on an lb interface");
    }
    Ok(devices.len())
}

pub async fn run(config_path: &Path) -> Result<()> {
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let (mut state, mut status) = start(config_path, report_tx)?;
    state.start_sync(&mut status).await?;
    if let Some(logger) = state.dataplane.take_logger() {
        forward_dataplane_log(logger)?;
    }
    if let Some(generation) = state.dataplane.take_route_generation() {
        crate::dataplane::next_hops::watch(generation)?;
    }
    let mut close_events = state.dataplane.take_close_events();
    let closing_timeout = state.pool.config().daemon.closing_timeout;
    let mut closing = CloseQueue::default();
    let mut closing_tick = tokio::time::interval(CLOSING_TICK);
    let socket_path = PathBuf::from(&state.pool.config().daemon.control_socket);
    let listener = api::bind(&socket_path)?;
    info!(socket = %socket_path.display(), services = state.pool.config().services.len(), "lb daemon ready");

    let metrics_address = state.pool.config().daemon.metrics_address;
    let state = Arc::new(Mutex::new(state));
    let _metrics = match metrics_address {
        Some(address) => Some(metrics::start(address, status.clone()).await?),
        None => None,
    };
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut housekeeping_tick = tokio::time::interval(HOUSEKEEPING_TICK);
    // Announcing runs BIRD's reload command, so it happens outside the state lock.
    let mut announcer = state
        .lock()
        .await
        .pool
        .config()
        .daemon
        .announce
        .clone()
        .map(Announcer::new);
    let mut announce_error: Option<String> = None;
    let gc_every = Duration::from_secs(u64::from(
        state.lock().await.pool.config().daemon.gc_interval,
    ));
    let mut gc_tick = tokio::time::interval(gc_every);
    let sweeper = Arc::new(std::sync::Mutex::new(
        state.lock().await.dataplane.sweeper()?,
    ));
    let watchdog_period = systemd::watchdog_period();
    // Without a watchdog the tick never fires (its branch is disabled).
    let mut watchdog_tick =
        tokio::time::interval(watchdog_period.unwrap_or(Duration::from_secs(86_400)));
    systemd::ready(state.lock().await.pool.config().services.len());
    loop {
        tokio::select! {
            _ = watchdog_tick.tick(), if watchdog_period.is_some() => systemd::feed_watchdog(),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (state, status) = (state.clone(), status.clone());
                    tokio::spawn(async move {
                        if let Err(e) = api::answer(stream, |request| respond(request, state, status)).await {
                            warn!(error = %format!("{e:#}"), "control client");
                        }
                    });
                }
                Err(e) => error!(error = %e, "accept on the control socket"),
            },
            _ = housekeeping_tick.tick() => {
                let wanted = {
                    let mut guard = state.lock().await;
                    let s = &mut *guard;
                    if let Err(e) = s.pool.expire_drains(&mut s.dataplane, unix_now()) {
                        error!(error = %format!("{e:#}"), "cutting expired drains");
                    }
                    if let Err(e) = s.pool.watch_counters(&s.dataplane) {
                        error!(error = %format!("{e:#}"), "reading data-plane counters");
                    }
                    announcer.is_some().then(|| s.pool.announceable_vips())
                };
                if let (Some(announcer), Some(wanted)) = (&mut announcer, wanted) {
                    let result = announcer.update(wanted).await.map_err(|e| format!("{e:#}"));
                    // Logged once per distinct failure, not every second.
                    if let Err(e) = &result {
                        if announce_error.as_ref() != Some(e) {
                            error!(error = %e, "announcing the VIPs through BIRD; retrying every second");
                        }
                    }
                    announce_error = result.err();
                    state.lock().await.announced = Some(announcer.announced());
                }
                state.lock().await.publish();
            }
            Some(report) = reports.recv() => state.lock().await.record_check(&report),
            _ = closing_tick.tick() => {
                if let Some(ring) = &mut close_events {
                    crate::daemon::closing::drain(ring, &mut closing, closing_timeout);
                }
                let now = crate::dataplane::monotonic_ns();
                let due = closing.take_due(now);
                if !due.is_empty() {
                    let mut s = state.lock().await;
                    match s.dataplane.remove_closed(&due, now) {
                        Ok(removed) => s.removed(removed),
                        Err(e) => error!(error = %format!("{e:#}"), "removing closed flows"),
                    }
                }
            }
            _ = gc_tick.tick() => {
                // The sweep runs in the kernel, outside the lock the control socket and the
                // health checks need; the peers hear which flows it deleted.
                let (timeouts, announce, refresh) = {
                    let mut s = state.lock().await;
                    let refresh = s.pool.affinity_refresh_due();
                    (s.pool.affinity_timeouts_ns(), s.sync.is_some(), refresh)
                };
                let sweeper = sweeper.clone();
                let sweep = off_the_workers(move || {
                    let mut sweeper = sweeper.lock().map_err(|_| anyhow::anyhow!("sweeper poisoned"))?;
                    sweeper.sweep(&timeouts, announce, refresh)
                })
                .await;
                let mut s = state.lock().await;
                match sweep {
                    Ok(sweep) => {
                        if sweep.tally.unannounced > 0 {
                            warn!(flows = sweep.tally.unannounced, "more expired flows than one sweep can announce; the peers keep those until they expire");
                        }
                        s.pool.record_collection(&sweep.tally);
                        s.removed(sweep.flows_removed);
                    }
                    Err(e) => error!(error = %format!("{e:#}"), "garbage collection"),
                }
                s.publish();
            }
            _ = hangup.recv() => {
                let mut s = state.lock().await;
                if let Err(e) = s.reload() {
                    error!(error = %format!("{e:#}"), "reload on SIGHUP failed; keeping the running configuration");
                }
                s.reconcile_health();
                s.publish();
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    systemd::stopping();
    if let Some(announcer) = &mut announcer {
        announcer.withdraw_all().await;
    }
    let _ = std::fs::remove_file(&socket_path);
    info!("lb daemon stopping; the data plane keeps running (pinned) until `lb detach`");
    Ok(())
}

/// Runs blocking work (a walk of the tables) on a blocking thread, so it stalls none of the
/// async workers that serve the socket and the health checks.
pub(crate) async fn off_the_workers<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work).await?
}

/// Relays the program's log records (only produced while `lb debug on`) into our log.
fn forward_dataplane_log(logger: DataplaneLogger) -> Result<()> {
    // SAFETY: the logger owns the ring's fd and keeps it open for as long as `ring` lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .context("watch the data-plane log ring")?;
    tokio::spawn(async move {
        loop {
            let mut ready = match ring.readable_mut().await {
                Ok(ready) => ready,
                Err(e) => {
                    error!(error = %e, "data-plane log ring; no more data-plane logs");
                    return;
                }
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Ok(())
}

/// One control request: `lb status` from the status source (a table walk that must not
/// hold the lock the pool and health checks need), everything else under the lock.
async fn respond(request: Request, state: Arc<Mutex<State>>, status: StatusSource) -> Response {
    let result = match request {
        Request::Status => off_the_workers(move || status.report()).await,
        other => return state.lock().await.handle(other),
    };
    result.map_or_else(
        |e| Response::Error {
            message: format!("{e:#}"),
        },
        Response::Status,
    )
}
