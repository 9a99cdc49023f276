//! Section 2: end to end through veth. The same namespaces, clients and nginx servers, with
//! five ways of reaching the servers set up one after the other and repeated in alternation:
//! plain routing to the servers (no balancing, the ceiling), the same with `xdp_pass` on the
//! balancer's interfaces (the cost of any XDP program on veth), lb, nftables DNAT with
//! `jhash ip saddr . tcp sport` plus SNAT, and HAProxy `balance roundrobin`. The load is
//! wrk from one address, as a reverse proxy in front of the external web VIP would send it.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use harness::{
    daemon::Daemon,
    fixture::ServiceSpec,
    netns::Netns,
    topology::{attach_baseline, attach_peer_program, PeerProgram, Spec, Topology, VIP},
};
use serde::Serialize;

use crate::{
    load::{self, Load, Mode},
    stats::Summary,
};

const SERVICE_PORT: u16 = 443;
const SERVER_PORT: u16 = 4443;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// SNAT addresses of the compared runs (lb's and nftables'), and the ones after them that
/// only the sustained run uses.
const ROUND_SNAT_ADDRESSES: usize = 8;
/// Enough for 38,000 connections/s by the README's rule (`snat_addresses_for`).
const SUSTAINED_SNAT_ADDRESSES: usize = 24;

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Debug)]
pub enum Balancer {
    Routing,
    /// Plain routing with `xdp_pass` on the balancer's interfaces: what putting any XDP
    /// program on these veths costs, before it does any work.
    RoutingXdpPass,
    /// An XDP program that routes the same direct traffic itself (route lookup, MACs, TTL,
    /// redirect; no NAT, no tables): the floor of any XDP balancer on veth.
    XdpForward,
    Lb,
    Nftables,
    Haproxy,
}

impl Balancer {
    pub const ALL: [Balancer; 6] = [
        Balancer::Routing,
        Balancer::RoutingXdpPass,
        Balancer::XdpForward,
        Balancer::Lb,
        Balancer::Nftables,
        Balancer::Haproxy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Balancer::Routing => "kernel routing, no balancing",
            Balancer::RoutingXdpPass => "kernel routing, xdp_pass on the balancer's interfaces",
            Balancer::XdpForward => "XDP forwarding only (route lookup + redirect, no NAT)",
            Balancer::Lb => "lb (XDP, driver mode)",
            Balancer::Nftables => "nftables DNAT jhash ip saddr . tcp sport + SNAT",
            Balancer::Haproxy => "HAProxy 2.6 tcp, balance roundrobin",
        }
    }
}

pub struct Plan {
    pub rounds: usize,
    pub duration: Duration,
    pub concurrency: usize,
    /// The long close-mode run through lb (`Sustained`).
    pub sustained: Duration,
}

#[derive(Serialize, Clone)]
pub struct Figures {
    pub balancer: Balancer,
    pub label: &'static str,
    pub connections_per_s: Summary,
    pub requests_per_s: Summary,
    /// Machine CPU time (user + system + softirq, all processes) per new connection.
    pub cpu_us_per_connection: Summary,
    /// Failed connections or requests over all rounds.
    pub errors: u64,
}

#[derive(Serialize, Clone)]
pub struct Veth {
    pub rounds: usize,
    pub seconds_per_run: f64,
    pub concurrency: usize,
    pub figures: Vec<Figures>,
    pub sustained: Sustained,
}

/// One long run of new connections through lb with its default tables and the SNAT
/// addresses the README's rule asks for at the rate measured above: what it refused.
#[derive(Serialize, Clone)]
pub struct Sustained {
    pub seconds: f64,
    pub snat_addresses: usize,
    pub connections: u64,
    pub connections_per_s: f64,
    /// wrk's failed connections and requests.
    pub errors: u64,
    pub drop_snat_exhausted: u64,
    pub flow_table_full: u64,
    /// Every other drop counter that moved, by name.
    pub other_drops: Vec<(String, u64)>,
    /// Flow-table entries (both directions) at the end, against the table's capacity.
    pub flow_entries: u64,
    pub flow_capacity: u64,
}

/// Ports one SNAT address offers each server port (1024-65535).
const PORTS_PER_SNAT_ADDRESS: f64 = 64_512.0;

/// The README's rule: a SNAT port toward a server is held while its connection lives and,
/// when the server closes first (nginx does, answering `Connection: close`), for the
/// server's TIME_WAIT after; one address offers 64,512 ports per server port.
fn snat_addresses_for(rate: f64, servers: usize) -> usize {
    let held_per_server = rate / servers as f64 * (f64::from(lb_common::SERVER_TIME_WAIT_S) + 1.0);
    (held_per_server / PORTS_PER_SNAT_ADDRESS).ceil().max(1.0) as usize
}

/// `seconds` of one request per connection at full rate through lb.
fn sustained(
    topology: &Topology,
    plan: &Plan,
    seconds: Duration,
    measured_rate: f64,
) -> Result<Sustained> {
    let snat_addresses = snat_addresses_for(measured_rate, topology.backends.len());
    // Addresses no earlier run used: the servers still hold those runs' pairs in TIME_WAIT.
    let unused = &topology.snat_addresses[ROUND_SNAT_ADDRESSES..];
    ensure!(
        snat_addresses <= unused.len(),
        "{measured_rate:.0} connections/s need {snat_addresses} SNAT addresses; the topology has {} unused",
        unused.len()
    );
    let mut site: harness::daemon::Site = topology.into();
    site.snat = unused[..snat_addresses]
        .iter()
        .map(|&a| std::net::IpAddr::from(a))
        .collect();
    // Flow entries by the same rule: two per live or closing connection, one per held claim.
    let max_flows = (measured_rate * (f64::from(lb_common::SERVER_TIME_WAIT_S) + 20.0) * 2.0)
        .max(65_536.0) as u32;
    let daemon = Daemon::start_binary(
        &site,
        &harness::daemon::lb_binary()?,
        &format!("max_flows = {}\n", max_flows.next_power_of_two()),
        &lb_services(topology),
    )?;
    let groups = topology.backends.len();
    let loads: Vec<Load> = (0..groups)
        .map(|i| Load {
            target: target(Balancer::Lb, topology, i),
            connections: plan.concurrency / groups,
            duration: seconds,
            mode: Mode::NewConnections,
        })
        .collect();
    let outcomes = load::run_all(&topology.client, &loads)?;
    let status = daemon.status()?;
    let connections: u64 = outcomes.iter().map(|o| o.completed).sum();
    let elapsed = outcomes
        .iter()
        .map(|o| o.elapsed.as_secs_f64())
        .fold(0.0, f64::max);
    let counter = |name: &str| status.counters.get(name).copied().unwrap_or(0);
    Ok(Sustained {
        seconds: seconds.as_secs_f64(),
        snat_addresses,
        connections,
        connections_per_s: connections as f64 / elapsed,
        errors: outcomes.iter().map(|o| o.errors).sum(),
        drop_snat_exhausted: counter("drop_snat_exhausted"),
        flow_table_full: counter("flow_table_full"),
        other_drops: status
            .counters
            .iter()
            .filter(|(name, n)| {
                name.starts_with("drop_") && **n > 0 && name.as_str() != "drop_snat_exhausted"
            })
            .map(|(name, n)| (name.clone(), *n))
            .collect(),
        flow_entries: status.tables.flows.entries,
        flow_capacity: status.tables.flows.capacity,
    })
}

/// A background process that is killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &Netns, program: &str, args: &[&str]) -> Result<Process> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {program} in {}", ns.name()))?;
    Ok(Process(child))
}

/// Waits until `address` accepts TCP connections from inside `ns`.
fn wait_listening(ns: &Netns, address: SocketAddrV4) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if ns.run(|| {
            std::net::TcpStream::connect_timeout(&address.into(), Duration::from_millis(200))
                .is_ok()
        })? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{address} not listening after {READY_TIMEOUT:?}")
}

/// One nginx per server namespace, answering every request with a 3-byte body.
fn start_nginx(topology: &Topology, dir: &std::path::Path) -> Result<Vec<Process>> {
    let mut processes = Vec::new();
    for b in &topology.backends {
        let prefix = dir.join(&b.name);
        std::fs::create_dir_all(&prefix)?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {pid};\nerror_log stderr crit;\nevents {{ worker_connections 16384; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {tmp};\n\
                 proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n\
                 server {{\n    listen {addr}:{SERVER_PORT} backlog=4096;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
                pid = prefix.join("nginx.pid").display(),
                tmp = prefix.display(),
                addr = b.address,
            ),
        )?;
        let conf = conf.display().to_string();
        let prefix = prefix.display().to_string();
        processes.push(spawn_in(
            &b.ns,
            "nginx",
            &["-p", &prefix, "-c", &conf, "-g", "daemon off;"],
        )?);
    }
    for b in &topology.backends {
        wait_listening(&topology.client, SocketAddrV4::new(b.address, SERVER_PORT))
            .with_context(|| format!("nginx on {}", b.name))?;
    }
    Ok(processes)
}

/// Whatever keeps one balancer in place; dropping it removes that balancer.
enum Active {
    Routing,
    /// A reference XDP program on the balancer's interfaces; dropping detaches it.
    XdpPass {
        _programs: Vec<PeerProgram>,
    },
    /// The daemon; dropping it stops it and removes its pinned data plane.
    Lb {
        _daemon: Box<Daemon>,
    },
    Nftables,
    Haproxy(Process),
}

fn nft_ruleset(topology: &Topology) -> String {
    let mut map = String::new();
    for (i, b) in topology.backends.iter().enumerate() {
        let _ = write!(
            map,
            "{}{i} : {} . {SERVER_PORT}",
            if i > 0 { ", " } else { "" },
            b.address
        );
    }
    let first = topology.snat_addresses.first().expect("SNAT addresses");
    let last = &topology.snat_addresses[ROUND_SNAT_ADDRESSES - 1];
    format!(
        "table ip lbbench {{\n\
           chain pre {{ type nat hook prerouting priority dstnat;\n\
             ip daddr {VIP} tcp dport {SERVICE_PORT} dnat ip to jhash ip saddr . tcp sport mod {n} map {{ {map} }}\n\
           }}\n\
           chain post {{ type nat hook postrouting priority srcnat;\n\
             oifname \"back\" ip daddr 10.2.0.0/24 ct status dnat snat ip to {first}-{last}\n\
           }}\n\
         }}\n",
        n = topology.backends.len(),
    )
}

fn haproxy_config(topology: &Topology, dir: &std::path::Path) -> String {
    let servers: String = topology
        .backends
        .iter()
        .map(|b| format!("  server {} {}:{SERVER_PORT}\n", b.name, b.address))
        .collect();
    format!(
        "global\n  maxconn 9000\n  nbthread 2\n  pidfile {}\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend web\n  bind {VIP}:{SERVICE_PORT}\n  default_backend fe\n\
         backend fe\n  balance roundrobin\n{servers}",
        dir.join("haproxy.pid").display()
    )
}

/// The external web VIP's setting (`lync-web-external`): every connection comes from one
/// address, the reverse proxy's (here wrk's), so affinity is by address and port.
fn lb_services(topology: &Topology) -> String {
    let backends: Vec<Ipv4Addr> = topology.backends.iter().map(|b| b.address).collect();
    ServiceSpec {
        affinity: "source-port".into(),
        ..ServiceSpec::default()
    }
    .toml(&backends)
}

fn activate(balancer: Balancer, topology: &Topology, dir: &std::path::Path) -> Result<Active> {
    let lb_ns = &topology.lb;
    Ok(match balancer {
        Balancer::Routing => Active::Routing,
        Balancer::RoutingXdpPass => Active::XdpPass {
            _programs: topology
                .lb_interfaces
                .iter()
                .map(|i| attach_peer_program(lb_ns, i))
                .collect::<Result<_>>()?,
        },
        Balancer::XdpForward => Active::XdpPass {
            _programs: vec![attach_baseline(
                lb_ns,
                "xdp_forward",
                &topology.lb_interfaces,
            )?],
        },
        Balancer::Lb => {
            let extra = "max_flows = 4194304\nmax_affinities = 1048576\n";
            let mut site: harness::daemon::Site = topology.into();
            site.snat.truncate(ROUND_SNAT_ADDRESSES);
            Active::Lb {
                _daemon: Box::new(Daemon::start_binary(
                    &site,
                    &harness::daemon::lb_binary()?,
                    extra,
                    &lb_services(topology),
                )?),
            }
        }
        Balancer::Nftables => {
            let rules = dir.join("lbbench.nft");
            std::fs::write(&rules, nft_ruleset(topology))?;
            lb_ns.exec("nft", &["-f", &rules.display().to_string()])?;
            Active::Nftables
        }
        Balancer::Haproxy => {
            lb_ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            let conf = dir.join("haproxy.cfg");
            std::fs::write(&conf, haproxy_config(topology, dir))?;
            let process = spawn_in(
                lb_ns,
                "haproxy",
                &["-db", "-f", &conf.display().to_string()],
            )?;
            wait_listening(&topology.client, SocketAddrV4::new(VIP, SERVICE_PORT))?;
            Active::Haproxy(process)
        }
    })
}

fn deactivate(active: Active, topology: &Topology) -> Result<()> {
    match active {
        Active::Routing | Active::XdpPass { .. } | Active::Lb { .. } => {}
        Active::Nftables => {
            topology
                .lb
                .exec("nft", &["delete", "table", "ip", "lbbench"])?;
            // Conntrack entries of this run must not NAT the next balancer's packets.
            let _ = topology.lb.exec("conntrack", &["-F"]);
        }
        Active::Haproxy(process) => {
            drop(process);
            topology
                .lb
                .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"])?;
        }
    }
    Ok(())
}

/// Machine-wide CPU jiffies spent working (user, nice, system, irq, softirq).
fn busy_jiffies() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6])
}

fn jiffy_us() -> f64 {
    // SAFETY: sysconf has no preconditions.
    1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Where clients connect for `balancer`: the VIP, or with plain routing one server each.
fn target(balancer: Balancer, topology: &Topology, worker: usize) -> SocketAddrV4 {
    match balancer {
        Balancer::Routing | Balancer::RoutingXdpPass | Balancer::XdpForward => SocketAddrV4::new(
            topology.backends[worker % topology.backends.len()].address,
            SERVER_PORT,
        ),
        _ => SocketAddrV4::new(VIP, SERVICE_PORT),
    }
}

struct Run {
    connections_per_s: f64,
    requests_per_s: f64,
    cpu_us_per_connection: f64,
    errors: u64,
}

fn measure(balancer: Balancer, topology: &Topology, plan: &Plan) -> Result<Run> {
    // One wrk per server: with plain routing each goes to its own server, through a
    // balancer all go to the VIP.
    let groups = topology.backends.len();
    let loads: Vec<Load> = (0..groups)
        .map(|i| Load {
            target: target(balancer, topology, i),
            connections: plan.concurrency / groups,
            duration: plan.duration,
            mode: Mode::NewConnections,
        })
        .collect();
    let cpu_before = busy_jiffies()?;
    let outcomes = load::run_all(&topology.client, &loads)?;
    let cpu = (busy_jiffies()? - cpu_before) as f64 * jiffy_us();
    let connections: u64 = outcomes.iter().map(|o| o.completed).sum();
    let elapsed = outcomes
        .iter()
        .map(|o| o.elapsed.as_secs_f64())
        .fold(0.0, f64::max);
    let mut errors: u64 = outcomes.iter().map(|o| o.errors).sum();

    let kept: Vec<Load> = loads
        .into_iter()
        .map(|l| Load {
            mode: Mode::KeepAlive,
            ..l
        })
        .collect();
    let outcomes = load::run_all(&topology.client, &kept)?;
    let requests: u64 = outcomes.iter().map(|o| o.completed).sum();
    let kept_elapsed = outcomes
        .iter()
        .map(|o| o.elapsed.as_secs_f64())
        .fold(0.0, f64::max);
    errors += outcomes.iter().map(|o| o.errors).sum::<u64>();
    Ok(Run {
        connections_per_s: connections as f64 / elapsed,
        requests_per_s: requests as f64 / kept_elapsed,
        cpu_us_per_connection: cpu / connections.max(1) as f64,
        errors,
    })
}

pub fn run(plan: &Plan) -> Result<Veth> {
    let topology = Topology::build(&Spec {
        clients: 0,
        snat_addresses: ROUND_SNAT_ADDRESSES + SUSTAINED_SNAT_ADDRESSES,
        ..Spec::default()
    })?;
    let dir = std::env::temp_dir().join(format!("{}-bench", topology.prefix));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(plan, &topology, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(plan: &Plan, topology: &Topology, dir: &std::path::Path) -> Result<Veth> {
    topology.lb.sysctl("net.ipv4.ip_forward", "1")?;
    // HAProxy opens its own connections to the servers; give it the ports lb's SNAT has.
    topology
        .lb
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    topology.lb.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    topology.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let _nginx = start_nginx(topology, dir)?;
    let mut runs: Vec<Vec<Run>> = Balancer::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.rounds {
        for (i, &balancer) in Balancer::ALL.iter().enumerate() {
            let active = activate(balancer, topology, dir)
                .with_context(|| format!("set up {balancer:?}"))?;
            let run = measure(balancer, topology, plan)
                .with_context(|| format!("{balancer:?} round {round}"));
            deactivate(active, topology)?;
            let run = run?;
            eprintln!(
                "  round {round} {:<36} {:>8.0} conn/s {:>8.0} req/s {:>6.1} µs CPU/conn, {} errors",
                balancer.label(),
                run.connections_per_s,
                run.requests_per_s,
                run.cpu_us_per_connection,
                run.errors
            );
            runs[i].push(run);
        }
    }
    let figures: Vec<Figures> = Balancer::ALL
        .iter()
        .zip(&runs)
        .map(|(&balancer, runs)| Figures {
            balancer,
            label: balancer.label(),
            connections_per_s: Summary::of(
                &runs.iter().map(|r| r.connections_per_s).collect::<Vec<_>>(),
            ),
            requests_per_s: Summary::of(&runs.iter().map(|r| r.requests_per_s).collect::<Vec<_>>()),
            cpu_us_per_connection: Summary::of(
                &runs
                    .iter()
                    .map(|r| r.cpu_us_per_connection)
                    .collect::<Vec<_>>(),
            ),
            errors: runs.iter().map(|r| r.errors).sum(),
        })
        .collect();
    let lb_rate = figures
        .iter()
        .find(|f| f.balancer == Balancer::Lb)
        .map_or(0.0, |f| f.connections_per_s.median);
    let sustained = sustained(topology, plan, plan.sustained, lb_rate)
        .context("sustained new connections through lb")?;
    eprintln!(
        "  sustained: {} connections in {:.0} s ({:.0}/s) with {} SNAT address(es): {} snat exhausted, {} flow table full, {} errors",
        sustained.connections,
        sustained.seconds,
        sustained.connections_per_s,
        sustained.snat_addresses,
        sustained.drop_snat_exhausted,
        sustained.flow_table_full,
        sustained.errors
    );
    Ok(Veth {
        rounds: plan.rounds,
        seconds_per_run: plan.duration.as_secs_f64(),
        concurrency: plan.concurrency,
        figures,
        sustained,
    })
}
