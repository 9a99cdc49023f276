//! `lb status`'s report: the pool's servers with their typed state, what the data plane
//! counts for them, and the clients that dominate a service.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use anyhow::Result;
use lb_common::{is_fresh, FLOW_F_REVERSE, NS_PER_SEC};
use tokio::sync::watch;

use super::{
    pool::Pool,
    runtime::{Drain, EffectiveBackend},
};
use crate::{
    addr::addr_from_words,
    api::{
        BackendStatus, ServerState, ServiceStatus, SourceShare, StatusReport, TableReport, Traffic,
    },
    dataplane::{monotonic_ns, TableReader},
};

/// A client with at least this share of a service's new flows (among live affinities) is
/// "hot": probably a reverse proxy or NAT carrying many users (the mega-proxy case).
pub const HOT_SOURCE_SHARE: f64 = 0.2;
/// ... once the service has seen at least this many new flows from live affinities.
pub const HOT_SOURCE_MIN_FLOWS: u64 = 100;
/// Clients listed per service in `lb status`.
pub const TOP_SOURCES: usize = 5;

/// A server's state from its runtime changes and health: down wins over a drain, a drain
/// over weight 0.
pub fn server_state(backend: &EffectiveBackend, down_reason: Option<&str>) -> ServerState {
    match (down_reason, backend.drain) {
        (Some(reason), _) => ServerState::Down {
            reason: reason.to_string(),
        },
        (None, Some(Drain { cut: true, .. })) => ServerState::Drained,
        (None, Some(Drain { deadline_unix, .. })) => ServerState::Draining { deadline_unix },
        (None, None) if backend.weight == 0 => ServerState::NoNewClients,
        (None, None) => ServerState::Up,
    }
}

/// What the pool knows for a status report, copied out under the daemon's lock: no table
/// is read for it. The daemon publishes a fresh one after every change (`StatusSource`).
#[derive(Debug, Clone, Default)]
pub struct Basis {
    /// Each installed service with its servers (their flow and traffic figures still 0)
    /// and their backend ids, in the same order.
    services: Vec<(u32, ServiceStatus, Vec<u32>)>,
    tables: TableReport,
    debug_log: bool,
    node_drained: bool,
    announced: Option<Vec<IpAddr>>,
    affinity_timeouts_ns: BTreeMap<u32, u64>,
}

impl Basis {
    pub fn of(pool: &Pool, announced: Option<Vec<IpAddr>>) -> Result<Self> {
        let installation = pool.installation();
        let health = pool.health();
        let mut services = Vec::new();
        for s in &pool.config().services {
            let Some(&id) = installation.service_ids().get(&s.name) else {
                continue;
            };
            let (mut backends, mut ids) = (Vec::new(), Vec::new());
            for b in pool.backends(&s.name) {
                ids.push(installation.backend_id(&s.name, b.address, b.port)?);
                backends.push(BackendStatus {
                    address: b.address,
                    port: b.port,
                    weight: b.weight,
                    state: server_state(&b, health.down_reason(&s.name, b.address)),
                    last_check: health.last_check(&s.name, b.address).cloned(),
                    check_failures: health.failures(&s.name, b.address),
                    health_changed_unix: health.changed_unix(&s.name, b.address),
                    active_flows: 0,
                    affinities: 0,
                    stats: Traffic::default(),
                });
            }
            let status = ServiceStatus {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port.to_string(),
                backend_port: s.backend_port(),
                protocol: s.protocol.as_str().into(),
                affinity: s.affinity.as_str().into(),
                affinity_timeout: s.affinity_timeout,
                idle_timeout: s.idle_timeout,
                allow: s.allow.clone(),
                deny: s.deny.clone(),
                refused_flows: 0,
                top_sources: Vec::new(),
                stats: Traffic::default(),
                backends,
            };
            services.push((id, status, ids));
        }
        Ok(Self {
            services,
            tables: pool.tables(),
            debug_log: pool.debug_log(),
            node_drained: pool.node_drained(),
            announced,
            affinity_timeouts_ns: pool.affinity_timeouts_ns(),
        })
    }
}

/// Where `lb status` and the metrics get their report: the latest basis the daemon
/// published and a table reader of their own, so neither waits for the daemon's lock nor
/// holds it while a million flows are read.
#[derive(Clone)]
pub struct StatusSource {
    basis: watch::Receiver<Arc<Basis>>,
    tables: Arc<TableReader>,
    sync: Option<Arc<crate::daemon::sync::Stats>>,
}

impl StatusSource {
    /// A source reading `tables`, and the sender the daemon publishes bases on.
    pub fn new(tables: TableReader) -> (watch::Sender<Arc<Basis>>, Self) {
        let (publish, basis) = watch::channel(Arc::new(Basis::default()));
        let tables = Arc::new(tables);
        (
            publish,
            Self {
                basis,
                tables,
                sync: None,
            },
        )
    }

    /// Reports state sync from now on (set before the source is handed out).
    pub fn set_sync(&mut self, stats: Arc<crate::daemon::sync::Stats>) {
        self.sync = Some(stats);
    }

    /// The tables it reads, for other readers (garbage collection's planning).
    pub fn tables(&self) -> Arc<TableReader> {
        self.tables.clone()
    }

    /// The report as of now. Blocking (it walks the tables): call it off the async
    /// workers.
    pub fn report(&self) -> Result<StatusReport> {
        let basis = self.basis.borrow().clone();
        let mut report = build(&basis, &self.tables)?;
        report.sync = self.sync.as_ref().map(|s| Box::new(s.report()));
        Ok(report)
    }
}

/// What the flow and affinity tables hold, per backend and per client.
#[derive(Default)]
struct TableCounts {
    flow_entries: u64,
    affinity_entries: u64,
    /// Live client connections per backend id.
    flows: BTreeMap<u32, u64>,
    /// Live affinities per backend id.
    affinities: BTreeMap<u32, u64>,
    /// New flows per (service id, client address) among live affinities.
    sources: BTreeMap<u32, BTreeMap<IpAddr, u64>>,
    /// Live return directions per SNAT address: the ports they hold.
    snat_ports: BTreeMap<IpAddr, u64>,
}

fn count_tables(tables: &TableReader, affinity_timeouts_ns: &BTreeMap<u32, u64>) -> TableCounts {
    let now = monotonic_ns();
    let mut counts = TableCounts::default();
    for (key, entry) in tables.affinities() {
        counts.affinity_entries += 1;
        if affinity_timeouts_ns
            .get(&key.service_id)
            .is_some_and(|t| is_fresh(entry.last_seen_ns, *t, now))
        {
            *counts.affinities.entry(entry.backend_id).or_default() += 1;
            let client = addr_from_words(key.client_be, key.family);
            *counts
                .sources
                .entry(key.service_id)
                .or_default()
                .entry(client)
                .or_default() += u64::from(entry.new_flows);
        }
    }
    for (key, entry) in tables.flows() {
        counts.flow_entries += 1;
        let fresh = is_fresh(
            entry.last_seen_ns,
            u64::from(entry.timeout_s) * NS_PER_SEC,
            now,
        );
        if !fresh {
            continue;
        }
        if entry.flags & FLOW_F_REVERSE == 0 {
            *counts.flows.entry(entry.backend_id).or_default() += 1;
        } else {
            // A return direction is keyed by (server, SNAT address and port).
            let snat = addr_from_words(key.dst_be, key.family);
            *counts.snat_ports.entry(snat).or_default() += 1;
        }
    }
    counts
}

/// The basis completed with what the tables and counters say now.
pub fn build(basis: &Basis, tables: &TableReader) -> Result<StatusReport> {
    let mut counts = count_tables(tables, &basis.affinity_timeouts_ns);
    let mut services = Vec::new();
    for (id, service, backend_ids) in &basis.services {
        let mut service = service.clone();
        for (b, bid) in service.backends.iter_mut().zip(backend_ids) {
            b.active_flows = counts.flows.get(bid).copied().unwrap_or(0);
            b.affinities = counts.affinities.get(bid).copied().unwrap_or(0);
            b.stats = tables.backend_stats(*bid)?.into();
        }
        service.top_sources = top_sources(counts.sources.remove(id).unwrap_or_default());
        service.stats = tables.service_stats(*id)?.into();
        service.refused_flows = tables.service_refused(*id)?;
        services.push(service);
    }
    let counters = tables
        .counters()?
        .into_iter()
        .map(|(c, v)| (c.name().to_string(), v))
        .collect();
    let mut table_report = basis.tables;
    table_report.flows.entries = counts.flow_entries;
    table_report.affinities.entries = counts.affinity_entries;
    Ok(StatusReport {
        services,
        counters,
        tables: table_report,
        debug_log: basis.debug_log,
        node_drained: basis.node_drained,
        announced: basis.announced.clone(),
        snat_ports_in_use: counts.snat_ports,
        sync: None,
    })
}

/// The clients with the most new flows, largest first, with their share and whether that
/// makes them hot (see `HOT_SOURCE_SHARE`).
fn top_sources(per_client: BTreeMap<IpAddr, u64>) -> Vec<SourceShare> {
    let total: u64 = per_client.values().sum();
    let mut ranked: Vec<(IpAddr, u64)> = per_client.into_iter().filter(|(_, n)| *n > 0).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
        .into_iter()
        .take(TOP_SOURCES)
        .map(|(client, new_flows)| {
            let share = new_flows as f64 / total as f64;
            SourceShare {
                client,
                new_flows,
                share,
                hot: total >= HOT_SOURCE_MIN_FLOWS && share >= HOT_SOURCE_SHARE,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_with_most_new_flows_is_hot() {
        let ip = |last: u8| IpAddr::from([192, 0, 2, last]);
        let mut per_client: BTreeMap<IpAddr, u64> = (1..=20).map(|i| (ip(i), 5)).collect();
        per_client.insert(ip(200), 300);
        let top = top_sources(per_client);
        assert_eq!(top.len(), TOP_SOURCES);
        assert_eq!((top[0].client, top[0].new_flows), (ip(200), 300));
        assert!(top[0].hot && (top[0].share - 0.75).abs() < 1e-9);
        assert!(top[1..].iter().all(|s| !s.hot && s.new_flows == 5));
    }

    #[test]
    fn few_flows_or_an_even_spread_is_not_hot() {
        let ip = |last: u8| IpAddr::from([192, 0, 2, last]);
        // One client, but only 10 flows: too little to call.
        assert!(!top_sources([(ip(1), 10)].into()).iter().any(|s| s.hot));
        // 100 clients with 10 flows each: 1 % each.
        assert!(!top_sources((1..=100).map(|i| (ip(i), 10)).collect())
            .iter()
            .any(|s| s.hot));
    }

    #[test]
    fn down_wins_over_a_drain_and_a_drain_over_weight_zero() {
        let backend = |weight, drain| EffectiveBackend {
            address: "10.2.0.11".parse().unwrap(),
            port: 4443,
            weight,
            drain,
        };
        let draining = Some(Drain {
            deadline_unix: Some(500),
            cut: false,
        });
        let cut = Some(Drain {
            deadline_unix: Some(500),
            cut: true,
        });
        assert_eq!(server_state(&backend(1, None), None), ServerState::Up);
        assert_eq!(
            server_state(&backend(0, None), None),
            ServerState::NoNewClients
        );
        assert_eq!(
            server_state(&backend(0, draining), None),
            ServerState::Draining {
                deadline_unix: Some(500)
            }
        );
        assert_eq!(server_state(&backend(1, cut), None), ServerState::Drained);
        assert_eq!(
            server_state(&backend(1, draining), Some("failed: refused")),
            ServerState::Down {
                reason: "failed: refused".into()
            }
        );
    }
}
