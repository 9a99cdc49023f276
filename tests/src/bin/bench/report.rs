//! BENCHMARKS.md from one run's results.
use std::{fmt::Write as _, process::Command};

use serde::Serialize;

use crate::{stats::Summary, veth::Balancer, Results};

#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub commit: String,
    pub date: String,
}

fn command(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0.0);
        let dirty = !command("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Self {
            cpu,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            memory_gib: kib / 1024.0 / 1024.0,
            kernel: command("uname", &["-r"]),
            commit: format!(
                "{}{}",
                command("git", &["rev-parse", "--short", "HEAD"]),
                if dirty { " (with local changes)" } else { "" }
            ),
            date: command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        }
    }
}

fn spread(s: &Summary, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

pub fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask bench{}` ({} mode, {:.0} s). Machine: {} CPUs ({}), {:.1} GiB, kernel {}, \
         commit {}, {}. Raw figures: [`bench/results.json`](bench/results.json).\n",
        if r.mode == "quick" { " --quick" } else { "" },
        r.mode,
        r.total_seconds,
        m.cpus,
        m.cpu,
        m.memory_gib,
        m.kernel,
        m.commit,
        m.date
    );

    let c = &r.packet_cost;
    let _ = writeln!(out, "## 1. Per-packet cost of the XDP program\n");
    let _ = writeln!(
        out,
        "Each figure is the kernel-measured duration of single `BPF_PROG_TEST_RUN` calls with repeat = 1 \
         (a rewriting program cannot be timed with repeat > 1: it would run again on its own output). \
         Per round: the median over {} calls, each on a fresh copy of its input, in blocks of 500 calls \
         alternating with blocks of `xdp_pass` calls on the same frames; the table shows the median of {} rounds and their range. \
         *Net* subtracts the median of those `xdp_pass` calls (the fixed cost of a call), and *÷ xdp_pass* \
         divides by it. New-flow paths use a new \
         connection per call (a new source port from a client with an affinity, or a new client address); \
         the handshake-completing ACK a new half-open flow per call whose SYN-ACK lb has seen. *÷ xdp_pass* \
         is the figure to compare across machines (they differ by 2-3x in absolute terms); the targets \
         are the data-plane issue's, 1.5x Katran's ratios or better.\n",
        c.calls_per_round, c.rounds
    );
    out.push_str(&packet_cost_table(c));
    let v = &r.veth;
    let _ = writeln!(out, "\n## 2. End to end through veth\n");
    let _ = writeln!(
        out,
        "One topology (client namespace → balancer namespace → bridge → 3 server namespaces running nginx \
         1.22, one worker each, answering `GET /` with 3 bytes). Each balancer is set up in turn on the same \
         namespaces and the sequence is repeated {} times; every run lasts {:.0} s with {} connections from \
         three `wrk` instances (Debian's, 2 threads each) from the client namespace's one address, as the \
         reverse proxy in front of the external web VIP sends them; so lb uses `source-port` affinity, nftables \
         hashes address and port, HAProxy goes round robin. With plain routing and the XDP-only rows each wrk \
         goes to its own server. *New connections*: one request per connection (`Connection: close`). \
         *Kept-alive*: requests back to back on {} open connections. *CPU*: busy time of the whole machine (user + system + softirq: clients, servers and \
         balancer together) per new connection, so differences between rows are what the balancer costs. \
         Median of rounds, range in brackets.\n",
        v.rounds, v.seconds_per_run, v.concurrency, v.concurrency
    );
    let _ = writeln!(out, "| balancer | new connections/s | kept-alive requests/s | machine CPU µs per connection | errors |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for f in &v.figures {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            f.label,
            spread(&f.connections_per_s, 0),
            spread(&f.requests_per_s, 0),
            spread(&f.cpu_us_per_connection, 1),
            f.errors
        );
    }
    let fig = |b: Balancer| v.figures.iter().find(|f| f.balancer == b);
    if let (Some(lb), Some(nft), Some(ha), Some(route), Some(route_xdp), Some(floor)) = (
        fig(Balancer::Lb),
        fig(Balancer::Nftables),
        fig(Balancer::Haproxy),
        fig(Balancer::Routing),
        fig(Balancer::RoutingXdpPass),
        fig(Balancer::XdpForward),
    ) {
        let _ = writeln!(
            out,
            "\n| ratio | new connections/s | kept-alive requests/s |"
        );
        let _ = writeln!(out, "|---|---:|---:|");
        for (name, other) in [
            ("lb / nftables", nft),
            ("lb / HAProxy", ha),
            ("lb / plain routing", route),
            ("lb / routing with xdp_pass", route_xdp),
            ("lb / XDP forwarding only (target ≥ 0.95×)", floor),
        ] {
            let _ = writeln!(
                out,
                "| {name} | {} | {} |",
                ratio(lb.connections_per_s.median, other.connections_per_s.median),
                ratio(lb.requests_per_s.median, other.requests_per_s.median)
            );
        }
    }

    let s = &v.sustained;
    let others = if s.other_drops.is_empty() {
        "none".to_string()
    } else {
        s.other_drops
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "\n**Sustained.** {:.0} s of new connections through lb at full rate (nginx closes each one first), \
         with the SNAT addresses and the flow table the README's rule asks for at lb's rate above ({} \
         addresses: each SNAT port is held through the server's 120 s TIME_WAIT): {} connections ({:.0}/s), \
         `drop_snat_exhausted` {}, `flow_table_full` {}, other drops: {}, wrk errors {}. Flow table at the \
         end: {} of {} entries.",
        s.seconds,
        s.snat_addresses,
        s.connections,
        s.connections_per_s,
        s.drop_snat_exhausted,
        s.flow_table_full,
        others,
        s.errors,
        s.flow_entries,
        s.flow_capacity
    );

    out.push_str(&control_section(&r.control));
    out.push_str(&ha_section(&r.ha));
    out
}

/// Section 3: Maglev builds in process, health detection and drain against a daemon.
pub fn control_section(control: &crate::control::Control) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n## 3. Control plane\n");
    let _ = writeln!(
        out,
        "Maglev table builds (M = 65537) in process: build time, the largest and smallest share of a backend \
         relative to its fair share (weighted pools: every third backend has weight 2), and the share of slots \
         that change owner when one backend is removed or added (ideal: 1/N).\n"
    );
    let _ = writeln!(out, "| backends | weights | build ms | max ÷ fair | min ÷ fair | moved on remove | moved on add | 1/N |");
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|");
    for p in &control.maglev {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.3} | {:.3} | {:.2} % | {:.2} % | {:.2} % |",
            p.backends,
            if p.weighted { "1 and 2" } else { "equal" },
            spread(&p.build_ms, 1),
            p.max_over_fair,
            p.min_over_fair,
            p.moved_on_remove * 100.0,
            p.moved_on_add * 100.0,
            100.0 / p.backends as f64
        );
    }
    let h = &control.health;
    let _ = writeln!(
        out,
        "\nAgainst a running daemon (veth harness, TCP check on port 5061 every {} s, fall {}): a server's \
         monitored port closed → server out of selection after **{} s** (median, range; expected between \
         (fall − 1) × interval and fall × interval plus the 0.3 s check timeout: the first failed check comes up to \
         one interval later). `lb backend drain` round trip: **{} ms**; the Maglev table is swapped before the \
         command returns, and of {} new connections from that server's clients made right after it returned \
         (affinities flushed), {} reached the drained server.\n",
        h.interval_s,
        h.fall,
        spread(&h.detection_s, 2),
        spread(&h.drain_command_ms, 1),
        h.checked_connections,
        h.reached_drained_server
    );
    let _ = writeln!(
        out,
        "A criterion benchmark of the Maglev build runs with `cargo bench -p lb-user --bench maglev` (not part of this report)."
    );
    out
}

/// Section 4: failover of both deployments, and flow sync (docs/ha.md).
pub fn ha_section(ha: &crate::ha::Ha) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 4. High availability (docs/ha.md)\n\nFailover in the veth harness with real keepalived (VRRPv3, 100 ms adverts) and, for active/active, \
         the scale-out BIRD/ECMP router. Long-lived connections, each asking once a second before, through and after the kill \
         (SIGKILL of lb and keepalived, links down). Takeover: from the kill until the survivor owns every address (and, behind ECMP, \
         the router's only route) the dead node had.\n"
    );
    let _ = writeln!(
        out,
        "| deployment | connections | takeover s | longest unanswered s | broken |\n|---|---:|---:|---:|---:|"
    );
    for f in &ha.failover {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.2} | **{}** |",
            f.deployment, f.connections, f.takeover_s, f.longest_silence_s, f.broken
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Flow sync at a set rate of new connections (one request each, 20 clients, the load generated on the same 2-core machine), \
         confirmation on the active node to installation on the standby (power-of-two buckets: the figure is the bucket's upper bound):\n"
    );
    let _ = writeln!(
        out,
        "| target /s | achieved /s | latency p50 ms | latency p99 ms | sync bytes / connection | CPU s/s per 1k/s, sender | receiver | records dropped |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for p in &ha.sync {
        let _ = writeln!(
            out,
            "| {:.0} | {:.0} | {} | {} | {:.0} | {:.3} | {:.3} | {} |",
            p.target_per_s,
            p.achieved_per_s,
            ms(p.latency_p50_ms),
            ms(p.latency_p99_ms),
            p.bytes_per_connection,
            p.sender_cpu,
            p.receiver_cpu,
            p.records_dropped
        );
    }
    out
}

/// Section 1's tables: per path, and the established path by table size.
pub fn packet_cost_table(c: &crate::packet_cost::PacketCost) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| path | ns per call | net ns | ÷ xdp_pass | target | met |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    for p in &c.paths {
        let pass = p.pass_alongside.median;
        let (target, met) = match p.target {
            Some(t) => (
                format!("≤ {t}×"),
                if p.per_call.median <= t * pass {
                    "yes"
                } else {
                    "no"
                },
            ),
            None => (String::new(), ""),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {target} | {met} |",
            p.path,
            spread(&p.per_call, 0),
            spread(&p.net, 0),
            ratio(p.per_call.median, pass),
        );
    }
    let _ = writeln!(
        out,
        "\n![per-packet cost](bench/packet-cost.png)\n\n**Table size.** The established path with N live \
         connections (2N flow entries) and N affinities, each call on a connection picked at random, so \
         lookups miss the CPU caches as real traffic would. Target: at most 2x the smallest table's cost.\n"
    );
    let _ = writeln!(
        out,
        "| live connections | ns per call | net ns | ÷ smallest |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|");
    for s in &c.scale {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2}× |",
            s.flows,
            spread(&s.per_call, 0),
            spread(&s.net, 0),
            s.vs_smallest
        );
    }
    let _ = writeln!(
        out,
        "\n**Control plane on the same tables.** A garbage collection (the data plane's sweep, \
         one `BPF_PROG_TEST_RUN` that looks at every flow, half-open and affinity entry in the \
         kernel; nothing has expired, so it deletes none) and a \
         status report (every flow and affinity read and counted), each run three times in \
         process. Targets at a million connections: GC ≤ 200 ms of CPU, status ≤ 100 ms.\n"
    );
    let _ = writeln!(out, "| live connections | GC ms | GC CPU ms | status ms |");
    let _ = writeln!(out, "|---:|---:|---:|---:|");
    for s in &c.scale {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            s.flows,
            spread(&s.gc_ms, 0),
            spread(&s.gc_cpu_ms, 0),
            spread(&s.status_ms, 0)
        );
    }
    out
}
