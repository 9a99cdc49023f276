//! Human rendering of `lb status`.
use std::io::IsTerminal;

use comfy_table::{
    presets::{NOTHING, UTF8_BORDERS_ONLY},
    Table,
};

use crate::{
    addr::SourcePrefix,
    api::{unix_now, AffinityRecord, MaglevTable, StatusReport},
};

/// A table drawn for a terminal; in a pipe or a file, plain space-separated columns that
/// grep and awk take apart.
fn new_table() -> Table {
    let mut table = Table::new();
    table.load_preset(if std::io::stdout().is_terminal() {
        UTF8_BORDERS_ONLY
    } else {
        NOTHING
    });
    table
}

/// "10.0.0.0/8,10.9.0.0/16", or "-" for none.
fn prefix_list(prefixes: &[SourcePrefix]) -> String {
    if prefixes.is_empty() {
        return "-".into();
    }
    let texts: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
    texts.join(",")
}

pub fn render(report: &StatusReport) -> String {
    let now = unix_now();
    let mut out = String::new();
    if report.node_drained {
        out.push_str(
            "NODE DRAINED: no VIP is announced; open connections continue (lb node undrain)\n",
        );
    }
    if let Some(announced) = &report.announced {
        let list: Vec<String> = announced.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "announced through BIRD: {}\n",
            if list.is_empty() {
                "nothing".to_string()
            } else {
                list.join(", ")
            }
        ));
    }
    if report.services.is_empty() {
        out.push_str("no services configured\n");
    }
    for s in &report.services {
        out.push_str(&format!(
            "service {} {}:{} -> {} {}  affinity={} ({} s)  idle_timeout={} s  new_flows={}  affinity hits/misses={}/{}\n",
            s.name, s.vip, s.port, s.server_port(), s.protocol, s.affinity, s.affinity_timeout,
            s.idle_timeout, s.stats.new_flows, s.stats.affinity_hits, s.stats.affinity_misses,
        ));
        if !s.allow.is_empty() || !s.deny.is_empty() {
            out.push_str(&format!(
                "  sources: allow {}  deny {}  refused={}\n",
                prefix_list(&s.allow),
                prefix_list(&s.deny),
                s.refused_flows
            ));
        }
        let mut table = new_table();
        table.set_header([
            "backend",
            "weight",
            "state",
            "flows",
            "affinities",
            "new flows",
            "pkts in",
            "pkts out",
            "bytes in",
            "bytes out",
            "last check",
        ]);
        for b in &s.backends {
            table.add_row([
                b.endpoint(),
                b.weight.to_string(),
                b.state.describe(now),
                b.active_flows.to_string(),
                b.affinities.to_string(),
                b.stats.new_flows.to_string(),
                b.stats.packets_in.to_string(),
                b.stats.packets_out.to_string(),
                b.stats.bytes_in.to_string(),
                b.stats.bytes_out.to_string(),
                b.last_check
                    .as_ref()
                    .map_or_else(|| "-".into(), ToString::to_string),
            ]);
        }
        out.push_str(&table.to_string());
        out.push('\n');
        if !s.top_sources.is_empty() {
            let top: Vec<String> = s
                .top_sources
                .iter()
                .map(|t| format!("{} {} ({:.0} %)", t.client, t.new_flows, t.share * 100.0))
                .collect();
            out.push_str(&format!("top clients by new flows: {}\n", top.join(", ")));
        }
        for hot in s.top_sources.iter().filter(|t| t.hot) {
            out.push_str(&format!(
                "HOT SOURCE: {} opened {:.0} % of this service's new flows; if it is a reverse proxy \
                 or NAT, all its users share one server: consider affinity = \"source-port\"\n",
                hot.client,
                hot.share * 100.0
            ));
        }
        out.push('\n');
    }
    let t = &report.tables;
    out.push_str(&format!(
        "tables: flows {}/{}  half-open {}/{}  affinities {}/{}  (expired and collected: {} flows, {} affinities; nearly-full passes {})\n\n",
        t.flows.entries, t.flows.capacity, t.half_open.entries, t.half_open.capacity, t.affinities.entries, t.affinities.capacity,
        t.collected_flows, t.collected_affinities, t.gc_passes_nearly_full,
    ));
    if !report.snat_ports_in_use.is_empty() {
        let held: Vec<String> = report
            .snat_ports_in_use
            .iter()
            .map(|(address, ports)| format!("{address} {ports}"))
            .collect();
        out.push_str(&format!("SNAT ports in use: {}\n\n", held.join(", ")));
    }
    if let Some(sync) = &report.sync {
        out.push_str(&render_sync(sync));
    }
    let mut counters = new_table();
    counters.set_header(["counter", "value"]);
    for (name, value) in &report.counters {
        if *value != 0 || name == "packets" {
            counters.add_row([name.clone(), value.to_string()]);
        }
    }
    if report.debug_log {
        out.push_str("data-plane debug logging is ON (lb debug off)\n");
    }
    out.push_str("data-plane counters (zero ones omitted):\n");
    out.push_str(&counters.to_string());
    out.push('\n');
    out
}

/// The sync section of `lb status`: readiness, one row per peer, what came in.
pub fn render_sync(sync: &crate::api::SyncStatus) -> String {
    let mut out = format!(
        "state sync: {}  inbound sessions {}  records received {}\n",
        if sync.handed_over {
            "HANDED OVER (lb ha resume lets this node be active again)"
        } else if sync.ready {
            "ready"
        } else {
            "NOT READY (no peer snapshot yet; keepalived keeps this node backup)"
        },
        sync.inbound_sessions,
        sync.records_received,
    );
    if let (Some(p50), Some(p99)) = (sync.latency_p50_ms, sync.latency_p99_ms) {
        out.push_str(&format!(
            "peers' new connections installed here {} ms after confirmation (p50), {} ms (p99), of {}\n",
            p50, p99, sync.latency_samples
        ));
    }
    let mut peers = new_table();
    peers.set_header([
        "peer",
        "connected",
        "records sent",
        "dropped",
        "snapshots",
        "last error",
    ]);
    for p in &sync.peers {
        peers.add_row([
            p.address.to_string(),
            if p.connected { "yes" } else { "NO" }.to_string(),
            p.records_sent.to_string(),
            p.bytes_sent.to_string(),
            p.records_dropped.to_string(),
            p.snapshots_sent.to_string(),
            p.last_error.clone().unwrap_or_default(),
        ]);
    }
    out.push_str(&peers.to_string());
    out.push('\n');
    for (what, counts) in [
        ("records refused", &sync.records_refused),
        ("sessions refused", &sync.sessions_refused),
    ] {
        if !counts.is_empty() {
            let list: Vec<String> = counts.iter().map(|(r, n)| format!("{r} {n}")).collect();
            out.push_str(&format!("{what}: {}\n", list.join(", ")));
        }
    }
    out.push('\n');
    out
}

/// `lb stats`: counters and traffic only.
pub fn render_stats(report: &StatusReport) -> String {
    let mut table = new_table();
    table.set_header([
        "service / server",
        "new flows",
        "affinity hits",
        "affinity misses",
        "pkts in",
        "pkts out",
        "bytes in",
        "bytes out",
    ]);
    for s in &report.services {
        let rows = std::iter::once((format!("{} {}:{}", s.name, s.vip, s.port), &s.stats)).chain(
            s.backends
                .iter()
                .map(|b| (format!("  {}", b.endpoint()), &b.stats)),
        );
        for (name, t) in rows {
            table.add_row([
                name,
                t.new_flows.to_string(),
                t.affinity_hits.to_string(),
                t.affinity_misses.to_string(),
                t.packets_in.to_string(),
                t.packets_out.to_string(),
                t.bytes_in.to_string(),
                t.bytes_out.to_string(),
            ]);
        }
    }
    let mut out = table.to_string();
    out.push_str("\n\n");
    let mut counters = new_table();
    counters.set_header(["counter", "value"]);
    for (name, value) in &report.counters {
        counters.add_row([name.clone(), value.to_string()]);
    }
    out.push_str(&counters.to_string());
    out.push('\n');
    out
}

pub fn render_affinities(entries: &[AffinityRecord]) -> String {
    let mut table = new_table();
    table.set_header(["client", "client port", "server", "idle (s)"]);
    for e in entries {
        table.add_row([
            e.client.to_string(),
            e.client_port.map_or("-".into(), |p| p.to_string()),
            e.backend.to_string(),
            e.idle_s.to_string(),
        ]);
    }
    format!("{table}\nlive affinities: {}\n", entries.len())
}

/// `lb maglev`: slots per server and the digest to compare with other nodes.
pub fn render_maglev(table: &MaglevTable) -> String {
    let mut out = format!(
        "digest {:016x} ({} slots): equal on two nodes means they send every client to the same server\n",
        table.digest(),
        table.slots.len()
    );
    let total = table.slots.len().max(1) as f64;
    for (server, slots) in table.shares() {
        out.push_str(&format!(
            "  {server:<40} {slots:>6} slots  {:5.1} %\n",
            100.0 * slots as f64 / total
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::{sample_report, sample_sync};

    #[test]
    fn sync_shows_readiness_peers_and_refusals() {
        let mut report = sample_report();
        assert!(!render(&report).contains("state sync"));
        report.sync = Some(Box::new(sample_sync()));
        let text = render(&report);
        assert!(text.contains("state sync: ready"), "{text}");
        assert!(text.contains("10.2.0.3:7946"), "{text}");
        assert!(
            text.contains("sessions refused: unauthenticated 2"),
            "{text}"
        );
        report.sync.as_mut().unwrap().ready = false;
        assert!(render(&report).contains("NOT READY"));
    }

    #[test]
    fn source_lists_are_shown_only_where_set() {
        let mut report = sample_report();
        let text = render(&report);
        assert!(
            text.contains("sources: allow 192.0.2.0/24  deny -  refused=3"),
            "{text}"
        );
        report.services[0].allow.clear();
        assert!(!render(&report).contains("sources:"));
    }
}
