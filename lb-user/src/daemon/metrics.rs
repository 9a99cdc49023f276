//! Prometheus metrics on `daemon.metrics_address` (off unless configured), rendered from the
//! same report as `lb status`.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::{
    extract::State as Extract,
    http::{header::CONTENT_TYPE as CONTENT_TYPE_HEADER, StatusCode},
    routing::get,
    Router,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use std::sync::atomic::{AtomicI64, AtomicU64};
use tracing::{error, info};

use crate::{
    api::{CheckOutcome, ServerState, StatusReport, Traffic},
    daemon::{off_the_workers, report::StatusSource},
};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The families of one traffic figure set (`api::Traffic`), for one label level: per
/// service, or per server. Kept apart so that a `sum by (service)` over one family counts
/// each packet once.
struct TrafficFamilies {
    packets: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    new_flows: Family<Labels, Counter>,
    affinity_lookups: Family<Labels, Counter>,
}

impl TrafficFamilies {
    fn new() -> Self {
        Self {
            packets: Family::default(),
            bytes: Family::default(),
            new_flows: Family::default(),
            affinity_lookups: Family::default(),
        }
    }

    fn record(&self, l: &Labels, t: &Traffic) {
        let with = |k: &str, v: &str| {
            let mut l = l.clone();
            l.push((k.into(), v.into()));
            l
        };
        for (direction, packets, bytes) in [
            ("in", t.packets_in, t.bytes_in),
            ("out", t.packets_out, t.bytes_out),
        ] {
            self.packets
                .get_or_create(&with("direction", direction))
                .inc_by(packets);
            self.bytes
                .get_or_create(&with("direction", direction))
                .inc_by(bytes);
        }
        self.new_flows.get_or_create(l).inc_by(t.new_flows);
        for (result, n) in [("hit", t.affinity_hits), ("miss", t.affinity_misses)] {
            self.affinity_lookups
                .get_or_create(&with("result", result))
                .inc_by(n);
        }
    }

    fn register(self, registry: &mut Registry, level: &str) {
        registry.register(
            format!("{level}_packets"),
            format!("Packets per {level} and direction (in: client to server)"),
            self.packets,
        );
        registry.register_with_unit(
            format!("{level}_ip"),
            format!("IP bytes per {level} and direction"),
            Unit::Bytes,
            self.bytes,
        );
        registry.register(
            format!("{level}_new_flows"),
            format!("Connections created per {level}"),
            self.new_flows,
        );
        registry.register(
            format!("{level}_affinity_lookups"),
            format!("New connections per {level} by affinity result"),
            self.affinity_lookups,
        );
    }
}

/// The whole report in the OpenMetrics text format. One label level per family (service
/// families apart from server families), the packet total apart from the verdicts that
/// share it out, events apart from both.
pub fn render(report: &StatusReport) -> Result<String> {
    let mut registry = Registry::with_prefix("lb");
    let build_info = Family::<Labels, Gauge>::default();
    build_info
        .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))]))
        .set(1);
    let services = TrafficFamilies::new();
    let servers = TrafficFamilies::new();
    let active_flows = Family::<Labels, Gauge>::default();
    let affinities = Family::<Labels, Gauge>::default();
    let up = Family::<Labels, Gauge>::default();
    let weight = Family::<Labels, Gauge>::default();
    let state = Family::<Labels, Gauge>::default();
    let drain_deadline = Family::<Labels, Gauge>::default();
    let check_duration = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let check_passed = Family::<Labels, Gauge>::default();
    let check_failures = Family::<Labels, Counter>::default();
    let health_changed = Family::<Labels, Gauge>::default();
    let snat_ports = Family::<Labels, Gauge>::default();
    let packets = Counter::<u64>::default();
    let verdicts = Family::<Labels, Counter>::default();
    let events = Family::<Labels, Counter>::default();
    let table_entries = Family::<Labels, Gauge>::default();
    let table_capacity = Family::<Labels, Gauge>::default();
    let refused = Family::<Labels, Counter>::default();
    let source_share = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let hot_sources = Family::<Labels, Gauge>::default();

    for s in &report.services {
        let svc = labels(&[("service", s.name.as_str())]);
        hot_sources
            .get_or_create(&svc)
            .set(s.top_sources.iter().filter(|t| t.hot).count() as i64);
        for t in &s.top_sources {
            let client = t.client.to_string();
            source_share
                .get_or_create(&labels(&[("service", &s.name), ("client", &client)]))
                .set(t.share);
        }
        services.record(&svc, &s.stats);
        refused.get_or_create(&svc).inc_by(s.refused_flows);
        for b in &s.backends {
            let server = b.endpoint();
            let l = labels(&[("service", &s.name), ("server", &server)]);
            servers.record(&l, &b.stats);
            active_flows.get_or_create(&l).set(b.active_flows as i64);
            affinities.get_or_create(&l).set(b.affinities as i64);
            let down = matches!(b.state, ServerState::Down { .. });
            up.get_or_create(&l).set(i64::from(!down));
            weight.get_or_create(&l).set(i64::from(b.weight));
            check_failures.get_or_create(&l).inc_by(b.check_failures);
            if let Some(at) = b.health_changed_unix {
                health_changed.get_or_create(&l).set(at as i64);
            }
            for name in ServerState::NAMES {
                let mut with_state = l.clone();
                with_state.push(("state".into(), name.into()));
                let current = b.state.name() == name;
                state.get_or_create(&with_state).set(i64::from(current));
            }
            if let ServerState::Draining {
                deadline_unix: Some(deadline),
            } = b.state
            {
                drain_deadline.get_or_create(&l).set(deadline as i64);
            }
            match &b.last_check {
                Some(CheckOutcome::Passed { latency_ms }) => {
                    check_duration.get_or_create(&l).set(latency_ms / 1000.0);
                    check_passed.get_or_create(&l).set(1);
                }
                Some(CheckOutcome::Failed { .. }) => {
                    check_passed.get_or_create(&l).set(0);
                }
                None => {}
            }
        }
    }
    for (name, value) in &report.counters {
        match lb_common::Counter::ALL.iter().find(|c| c.name() == name) {
            Some(lb_common::Counter::Packets) => {
                packets.inc_by(*value);
            }
            Some(c) if c.is_verdict() => {
                verdicts
                    .get_or_create(&labels(&[("verdict", name)]))
                    .inc_by(*value);
            }
            _ => {
                events
                    .get_or_create(&labels(&[("event", name)]))
                    .inc_by(*value);
            }
        }
    }
    for (address, ports) in &report.snat_ports_in_use {
        snat_ports
            .get_or_create(&labels(&[("address", &address.to_string())]))
            .set(*ports as i64);
    }
    let t = &report.tables;
    for (name, fill) in [
        ("flows", t.flows),
        ("half_open", t.half_open),
        ("affinities", t.affinities),
    ] {
        table_entries
            .get_or_create(&labels(&[("table", name)]))
            .set(fill.entries as i64);
        table_capacity
            .get_or_create(&labels(&[("table", name)]))
            .set(fill.capacity as i64);
    }

    registry.register("build_info", "The running lb's version", build_info);
    services.register(&mut registry, "service");
    servers.register(&mut registry, "server");
    registry.register(
        "service_refused_flows",
        "New connections the service's allow / deny lists refused",
        refused,
    );
    registry.register(
        "server_active_flows",
        "Connections to the server not yet expired",
        active_flows,
    );
    registry.register(
        "server_affinities",
        "Client affinities to the server not yet expired",
        affinities,
    );
    registry.register(
        "server_up",
        "1 unless health checks took the server out",
        up,
    );
    registry.register(
        "server_weight",
        "The server's weight for new clients",
        weight,
    );
    registry.register(
        "server_state",
        "1 for the server's state (up, no-new-clients, draining, drained, down)",
        state,
    );
    registry.register_with_unit(
        "server_drain_deadline",
        "When a draining server's remaining connections are cut (Unix time)",
        Unit::Seconds,
        drain_deadline,
    );
    registry.register_with_unit(
        "health_check_duration",
        "Duration of the server's last passed health check",
        Unit::Seconds,
        check_duration,
    );
    registry.register(
        "health_check_passed",
        "1 if the server's last health check passed, 0 if it failed",
        check_passed,
    );
    registry.register(
        "health_check_failures",
        "Failed health checks of the server since the daemon started",
        check_failures,
    );
    registry.register_with_unit(
        "health_changed",
        "When health checks last moved the server in or out (Unix time)",
        Unit::Seconds,
        health_changed,
    );
    registry.register(
        "snat_ports_in_use",
        "SNAT ports held by confirmed connections, per SNAT address",
        snat_ports,
    );
    registry.register(
        "datapath_packets",
        "Every packet the data plane saw",
        packets,
    );
    registry.register(
        "datapath_verdicts",
        "Packets by what the data plane did with them; they add up to datapath_packets (see README: Counters)",
        verdicts,
    );
    registry.register(
        "datapath_events",
        "Data-plane events that are not verdicts: new and confirmed flows, affinity results, translated ICMP errors",
        events,
    );
    registry.register(
        "table_entries",
        "Entries per table at the last collection",
        table_entries,
    );
    registry.register("table_capacity", "Capacity per table", table_capacity);
    registry.register(
        "source_share",
        "Share of a service's new flows from its top clients (live affinities)",
        source_share,
    );
    registry.register(
        "hot_sources",
        "Clients with a share large enough to suggest a proxy or NAT in front",
        hot_sources,
    );
    if let Some(sync) = &report.sync {
        register_sync(&mut registry, sync);
    }
    let mut out = String::new();
    encode(&mut out, &registry).context("encode metrics")?;
    Ok(out)
}

/// The `lb_sync_*` families: this node's readiness, each peer's session, what came in.
fn register_sync(registry: &mut Registry, sync: &crate::api::SyncStatus) {
    let ready = Gauge::<i64, AtomicI64>::default();
    ready.set(i64::from(sync.ready));
    registry.register(
        "sync_ready",
        "1 once this node holds a peer's snapshot (or no peer answered): keepalived may give it the addresses",
        ready,
    );
    let connected = Family::<Labels, Gauge>::default();
    let sent = Family::<Labels, Counter>::default();
    let dropped = Family::<Labels, Counter>::default();
    let snapshots = Family::<Labels, Counter>::default();
    let last_snapshot = Family::<Labels, Gauge>::default();
    for p in &sync.peers {
        let l = labels(&[("peer", &p.address.to_string())]);
        connected.get_or_create(&l).set(i64::from(p.connected));
        sent.get_or_create(&l).inc_by(p.records_sent);
        dropped.get_or_create(&l).inc_by(p.records_dropped);
        snapshots.get_or_create(&l).inc_by(p.snapshots_sent);
        last_snapshot
            .get_or_create(&l)
            .set(p.last_snapshot_unix as i64);
    }
    registry.register(
        "sync_peer_connected",
        "1 while this node's state reaches the peer",
        connected,
    );
    registry.register("sync_records_sent", "Records sent to the peer", sent);
    registry.register(
        "sync_records_dropped",
        "Records not sent because the peer was too slow (it got a new snapshot instead)",
        dropped,
    );
    registry.register(
        "sync_snapshots_sent",
        "Full snapshots sent to the peer",
        snapshots,
    );
    registry.register_with_unit(
        "sync_last_snapshot",
        "When the last full snapshot to the peer finished (Unix time)",
        Unit::Seconds,
        last_snapshot,
    );
    let bytes_sent = Family::<Labels, Counter>::default();
    for p in &sync.peers {
        bytes_sent
            .get_or_create(&labels(&[("peer", &p.address.to_string())]))
            .inc_by(p.bytes_sent);
    }
    registry.register_with_unit(
        "sync_sent",
        "Sealed bytes sent to the peer",
        Unit::Bytes,
        bytes_sent,
    );
    let received = Counter::<u64, AtomicU64>::default();
    received.inc_by(sync.records_received);
    registry.register(
        "sync_records_received",
        "Records received from the peers",
        received,
    );
    let bytes_received = Counter::<u64, AtomicU64>::default();
    bytes_received.inc_by(sync.bytes_received);
    registry.register_with_unit(
        "sync_received",
        "Sealed bytes received from the peers",
        Unit::Bytes,
        bytes_received,
    );
    for (name, help, value) in [
        (
            "sync_latency_p50",
            "Median time from a peer's confirmation of a connection to its installation here",
            sync.latency_p50_ms,
        ),
        (
            "sync_latency_p99",
            "99th percentile of the time from a peer's confirmation of a connection to its installation here",
            sync.latency_p99_ms,
        ),
    ] {
        if let Some(ms) = value {
            let gauge = Gauge::<f64, AtomicU64>::default();
            gauge.set(ms / 1000.0);
            registry.register_with_unit(name, help, Unit::Seconds, gauge);
        }
    }
    let inbound = Gauge::<i64, AtomicI64>::default();
    inbound.set(sync.inbound_sessions as i64);
    registry.register("sync_inbound_sessions", "Peers' sessions open now", inbound);
    let refused_records = Family::<Labels, Counter>::default();
    for (reason, n) in &sync.records_refused {
        refused_records
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*n);
    }
    registry.register(
        "sync_records_refused",
        "Authenticated records not installed, per reason",
        refused_records,
    );
    let refused_sessions = Family::<Labels, Counter>::default();
    for (reason, n) in &sync.sessions_refused {
        refused_sessions
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*n);
    }
    registry.register(
        "sync_sessions_refused",
        "Connections to the sync port refused, per reason",
        refused_sessions,
    );
}

/// OpenMetrics' content type (what `render` writes; it ends with `# EOF`).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(
    Extract(status): Extract<StatusSource>,
) -> (
    StatusCode,
    [(axum::http::HeaderName, &'static str); 1],
    String,
) {
    // The table walk blocks: off the async workers, and without the daemon's lock.
    let report = off_the_workers(move || status.report()).await;
    match report.and_then(|r| render(&r)) {
        Ok(text) => (StatusCode::OK, [(CONTENT_TYPE_HEADER, CONTENT_TYPE)], text),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(CONTENT_TYPE_HEADER, "text/plain; charset=utf-8")],
            format!("{e:#}\n"),
        ),
    }
}

/// Binds the endpoint (so a bad address fails the daemon's start) and returns the task
/// that serves it.
pub async fn start(
    address: SocketAddr,
    status: StatusSource,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("bind the metrics endpoint on {address}"))?;
    info!(%address, "Prometheus metrics on /metrics");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(status);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "metrics endpoint stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::sample_report;

    #[test]
    fn report_renders_as_openmetrics_one_label_level_per_family() {
        let mut report = sample_report();
        report.services[0].backends[0].state = ServerState::Down {
            reason: "failed: refused".into(),
        };
        report.counters.insert("drop_no_route".to_string(), 4);
        report.counters.insert("flows_confirmed".to_string(), 2);
        let text = render(&report).unwrap();
        for expected in [
            r#"lb_service_new_flows_total{service="web"} 7"#,
            r#"lb_service_refused_flows_total{service="web"} 3"#,
            r#"lb_server_new_flows_total{service="web",server="10.2.0.11:4443"} 7"#,
            r#"lb_server_up{service="web",server="10.2.0.11:4443"} 0"#,
            r#"lb_server_state{service="web",server="10.2.0.11:4443",state="down"} 1"#,
            r#"lb_server_state{service="web",server="10.2.0.11:4443",state="up"} 0"#,
            r#"lb_server_weight{service="web",server="10.2.0.11:4443"} 1"#,
            r#"lb_datapath_packets_total 99"#,
            r#"lb_datapath_verdicts_total{verdict="drop_no_route"} 4"#,
            r#"lb_datapath_events_total{event="flows_confirmed"} 2"#,
            r#"lb_health_check_duration_seconds{service="web",server="10.2.0.11:4443"} 0.0015"#,
            r#"lb_source_share{service="web",client="192.0.2.7"} 0.75"#,
            r#"lb_hot_sources{service="web"} 1"#,
            r#"lb_build_info{version=""#,
            r#"lb_health_check_failures_total{service="web",server="10.2.0.11:4443"} 2"#,
            r#"lb_health_changed_seconds{service="web",server="10.2.0.11:4443"} 1700000000"#,
            r#"lb_snat_ports_in_use{address="10.2.0.100"} 3"#,
        ] {
            assert!(text.contains(expected), "{expected} not in\n{text}");
        }
        // No family mixes label levels: the service family has no server label.
        assert!(!text.contains(r#"lb_service_new_flows_total{service="web",server"#));
        assert!(text.ends_with("# EOF\n"));
    }

    /// Every metric the shipped Grafana dashboard queries is one `render` produces.
    #[test]
    fn the_dashboard_names_only_metrics_that_exist() {
        let dashboard = include_str!("../../../packaging/grafana-dashboard.json");
        let json: serde_json::Value = serde_json::from_str(dashboard).unwrap();
        let mut report = sample_report();
        report.services[0].backends[0].state = ServerState::Draining {
            deadline_unix: Some(1),
        };
        report.counters.insert("drop_no_route".to_string(), 1);
        report.counters.insert("flows_confirmed".to_string(), 1);
        let text = render(&report).unwrap();
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let mut queried = Vec::new();
        for panel in json["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                let names = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("lb_"));
                queried.extend(names.map(String::from));
            }
        }
        assert!(queried.len() >= 10, "{queried:?}");
        for name in &queried {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard queries {name}, which lb does not export"
            );
        }
    }

    #[test]
    fn sync_renders_per_peer_and_per_reason() {
        let mut report = sample_report();
        report.sync = Some(Box::new(crate::api::tests::sample_sync()));
        let text = render(&report).unwrap();
        for expected in [
            "lb_sync_ready 1",
            r#"lb_sync_peer_connected{peer="10.2.0.3:7946"} 1"#,
            r#"lb_sync_records_sent_total{peer="10.2.0.3:7946"} 12"#,
            r#"lb_sync_sessions_refused_total{reason="unauthenticated"} 2"#,
            "lb_sync_records_received_total 9",
            "lb_sync_latency_p99_seconds 0.032",
            r#"lb_sync_sent_bytes_total{peer="10.2.0.3:7946"} 1200"#,
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(!render(&sample_report()).unwrap().contains("lb_sync_"));
    }
}
