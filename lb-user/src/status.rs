//! Human rendering of `lb status`.
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};

use crate::api::StatusReport;

pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    if report.services.is_empty() {
        out.push_str("no services configured\n");
    }
    for s in &report.services {
        out.push_str(&format!(
            "service {} {}:{} -> :{} {}  affinity={} ({} s)  idle_timeout={} s  new_flows={}  affinity hits/misses={}/{}\n",
            s.name, s.vip, s.port, s.backend_port, s.protocol, s.affinity, s.affinity_timeout,
            s.idle_timeout, s.stats.new_flows, s.stats.affinity_hits, s.stats.affinity_misses,
        ));
        let mut table = Table::new();
        table.load_preset(UTF8_BORDERS_ONLY).set_header([
            "backend", "weight", "state", "flows", "affinities", "new flows", "pkts in", "pkts out",
            "bytes in", "bytes out",
        ]);
        for b in &s.backends {
            table.add_row([
                format!("{}:{}", b.address, b.port),
                b.weight.to_string(),
                b.state.clone(),
                b.active_flows.to_string(),
                b.affinities.to_string(),
                b.stats.new_flows.to_string(),
                b.stats.packets_in.to_string(),
                b.stats.packets_out.to_string(),
                b.stats.bytes_in.to_string(),
                b.stats.bytes_out.to_string(),
            ]);
        }
        out.push_str(&table.to_string());
        out.push_str("\n\n");
    }
    let mut counters = Table::new();
    counters.load_preset(UTF8_BORDERS_ONLY).set_header(["counter", "value"]);
    for (name, value) in &report.counters {
        if *value != 0 || name == "packets" {
            counters.add_row([name.clone(), value.to_string()]);
        }
    }
    out.push_str("data-plane counters (zero ones omitted):\n");
    out.push_str(&counters.to_string());
    out.push('\n');
    out
}
