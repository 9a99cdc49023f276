//! Prometheus metrics on `daemon.metrics_address` (off unless configured), rendered from the
//! same report as `lb status`.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::{extract::State as Extract, http::StatusCode, routing::get, Router};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::sync::atomic::AtomicU64;
use tracing::{error, info};

use crate::{
    api::{CheckOutcome, ServerState, StatusReport},
    daemon::{off_the_workers, report::StatusSource},
};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The whole report in the Prometheus text format.
pub fn render(report: &StatusReport) -> Result<String> {
    let mut registry = Registry::with_prefix("lb");
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let new_flows = Family::<Labels, Counter>::default();
    let affinity = Family::<Labels, Counter>::default();
    let active_flows = Family::<Labels, Gauge>::default();
    let affinities = Family::<Labels, Gauge>::default();
    let up = Family::<Labels, Gauge>::default();
    let check_latency = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let outcomes = Family::<Labels, Counter>::default();
    let table_entries = Family::<Labels, Gauge>::default();
    let table_capacity = Family::<Labels, Gauge>::default();
    let source_share = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let hot_sources = Family::<Labels, Gauge>::default();

    for s in &report.services {
        let svc = [("service", s.name.as_str())];
        hot_sources
            .get_or_create(&labels(&svc))
            .set(s.top_sources.iter().filter(|t| t.hot).count() as i64);
        for t in &s.top_sources {
            let client = t.client.to_string();
            source_share
                .get_or_create(&labels(&[("service", &s.name), ("client", &client)]))
                .set(t.share);
        }
        let rows =
            std::iter::once((labels(&svc), &s.stats, None)).chain(s.backends.iter().map(|b| {
                let server = b.endpoint();
                (
                    labels(&[("service", &s.name), ("server", &server)]),
                    &b.stats,
                    Some(b),
                )
            }));
        for (l, t, backend) in rows {
            let with = |k: &str, v: &str| {
                let mut l = l.clone();
                l.push((k.into(), v.into()));
                l
            };
            packets
                .get_or_create(&with("direction", "in"))
                .inc_by(t.packets_in);
            packets
                .get_or_create(&with("direction", "out"))
                .inc_by(t.packets_out);
            bytes
                .get_or_create(&with("direction", "in"))
                .inc_by(t.bytes_in);
            bytes
                .get_or_create(&with("direction", "out"))
                .inc_by(t.bytes_out);
            new_flows.get_or_create(&l).inc_by(t.new_flows);
            affinity
                .get_or_create(&with("result", "hit"))
                .inc_by(t.affinity_hits);
            affinity
                .get_or_create(&with("result", "miss"))
                .inc_by(t.affinity_misses);
            if let Some(b) = backend {
                active_flows.get_or_create(&l).set(b.active_flows as i64);
                affinities.get_or_create(&l).set(b.affinities as i64);
                let down = matches!(b.state, ServerState::Down { .. });
                up.get_or_create(&l).set(i64::from(!down));
                if let Some(CheckOutcome::Passed { latency_ms }) = b.last_check {
                    check_latency.get_or_create(&l).set(latency_ms / 1000.0);
                }
            }
        }
    }
    for (name, value) in &report.counters {
        outcomes
            .get_or_create(&labels(&[("outcome", name)]))
            .inc_by(*value);
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

    registry.register(
        "packets",
        "Packets per direction (in: client to server)",
        packets,
    );
    registry.register("bytes", "IP bytes per direction", bytes);
    registry.register("new_flows", "Connections created", new_flows);
    registry.register(
        "affinity_lookups",
        "New connections by affinity result",
        affinity,
    );
    registry.register("active_flows", "Connections not yet expired", active_flows);
    registry.register(
        "affinities",
        "Client affinities not yet expired",
        affinities,
    );
    registry.register(
        "server_up",
        "1 unless health checks took the server out",
        up,
    );
    registry.register(
        "health_check_seconds",
        "Latency of the last passed health check",
        check_latency,
    );
    registry.register(
        "datapath_packets",
        "Every packet by its outcome (see README: Counters)",
        outcomes,
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
    let mut out = String::new();
    encode(&mut out, &registry).context("encode metrics")?;
    Ok(out)
}

async fn metrics(Extract(status): Extract<StatusSource>) -> (StatusCode, String) {
    // The table walk blocks: off the async workers, and without the daemon's lock.
    let report = off_the_workers(move || status.report()).await;
    match report.and_then(|r| render(&r)) {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
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
    fn report_renders_as_prometheus_text() {
        let mut report = sample_report();
        report.services[0].backends[0].state = ServerState::Down {
            reason: "failed: refused".into(),
        };
        report.counters.insert("drop_no_route".to_string(), 4);
        let text = render(&report).unwrap();
        assert!(
            text.contains(r#"lb_new_flows_total{service="web",server="10.2.0.11:4443"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_server_up{service="web",server="10.2.0.11:4443"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_datapath_packets_total{outcome="drop_no_route"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lb_health_check_seconds{service="web",server="10.2.0.11:4443"} 0.0015"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_source_share{service="web",client="192.0.2.7"} 0.75"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_hot_sources{service="web"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
