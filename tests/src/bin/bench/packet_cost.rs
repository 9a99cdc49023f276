//! Section 1: what one packet costs the XDP program, per path, against two baselines, and
//! how the established path scales with the table size.
//!
//! Rewriting paths cannot use `repeat > 1` (the program would run again on its own output),
//! so every figure is the kernel-measured duration of single `BPF_PROG_TEST_RUN` calls
//! (repeat = 1), each on a fresh copy of its input. That duration includes a fixed per-call
//! cost, measured the same way on `xdp_pass` and subtracted to give the net figure.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::{programs::Xdp, Ebpf};
use harness::packet::{
    run_once, verify_frame, Frame, LAB_BACKEND, LAB_CLIENT, LAB_INTERFACE, LAB_SNAT, LAB_VIP,
    TCP_ACK, TCP_SYN,
};
use lb::{
    config::Config,
    daemon::{pool::Pool, runtime::Overlay},
    dataplane::{ifindex, Capacity, Dataplane, BASELINE_OBJECT},
};
use serde::Serialize;

use crate::stats::{median, Summary};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const SERVICE_PORT: u16 = 443;
/// The same service restricted by source lists (`allow` / `deny`), for their lookup's cost.
const RESTRICTED_PORT: u16 = 8443;
const BACKEND_PORT: u16 = 4443;
/// Enough SNAT addresses that a million new flows toward one server find free ports.
const SNAT_ADDRESSES: u32 = 64;

pub struct Plan {
    pub rounds: usize,
    pub calls: usize,
    pub scale_flows: Vec<usize>,
}

#[derive(Serialize, Clone)]
pub struct PathCost {
    pub path: &'static str,
    /// The most this path may cost, as a multiple of `xdp_pass`'s per-call time in the same
    /// run (the data-plane issue's targets: 1.5x Katran's ratio or better).
    pub target: Option<f64>,
    /// Kernel-measured duration of one call, median over rounds of the per-round median.
    pub per_call: Summary,
    /// `per_call` minus `xdp_pass`'s, per round.
    pub net: Summary,
    /// `xdp_pass`'s per-call time, measured call by call alternating with this path's.
    pub pass_alongside: Summary,
}

#[derive(Serialize, Clone)]
pub struct ScalePoint {
    pub flows: usize,
    /// `per_call` of the same path with the fewest live connections: the target is 2.
    pub vs_smallest: f64,
    pub per_call: Summary,
    pub net: Summary,
    /// The daemon's work on these tables, ms: a garbage collection (wall and this thread's
    /// CPU; nothing has expired, so its sweep looks at every entry and deletes none) and a status
    /// report (every flow and affinity read and counted).
    pub gc_ms: Summary,
    pub gc_cpu_ms: Summary,
    pub status_ms: Summary,
}

#[derive(Serialize, Clone)]
pub struct PacketCost {
    pub calls_per_round: usize,
    pub rounds: usize,
    pub paths: Vec<PathCost>,
    pub scale: Vec<ScalePoint>,
}

fn config(snat_addresses: u32) -> Result<Config> {
    let snat: Vec<String> = (0..snat_addresses)
        .map(|i| format!("\"{}\"", snat_address(i)))
        .collect();
    // The same service twice: as is, and behind allow / deny lists.
    let service = |name: &str, port: u16, lists: &str| {
        format!(
            r#"
[[service]]
name = "{name}"
vip = "{LAB_VIP}"
port = {port}
backend_port = {BACKEND_PORT}
affinity = "source"
backends = [{{ address = "{LAB_BACKEND}" }}]
{lists}"#
        )
    };
    Config::parse(&format!(
        "[daemon]\ninterfaces = [\"{LAB_INTERFACE}\"]\nsnat_addresses = [{}]\n{}{}",
        snat.join(", "),
        service("web", SERVICE_PORT, ""),
        service(
            "web-restricted",
            RESTRICTED_PORT,
            r#"allow = ["11.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.7"]
deny = ["11.255.0.0/16", "11.254.1.0/24"]
"#,
        ),
    ))
}

fn snat_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(LAB_SNAT) + i)
}

/// The `i`-th distinct client address, outside every lab network so it never collides
/// with the server or SNAT addresses.
fn client_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(11, 0, 0, 1)) + i as u32)
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(LAB_VIP, SERVICE_PORT)
}

fn ack(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    Frame {
        payload: vec![0; 10],
        ..Frame::tcp(src, dst, TCP_ACK)
    }
    .bytes()
}

/// lb loaded with a fresh set of maps and one service, in the lab namespace.
struct Lb {
    dp: Dataplane,
    pool: Pool,
    ingress: u32,
}

impl Lb {
    fn load(table_entries: u32) -> Result<Self> {
        let mut dp = Dataplane::load(
            Capacity {
                max_flows: table_entries,
                max_half_open: table_entries,
                max_affinities: table_entries,
            },
            None,
        )?;
        let mut pool = Pool::new(config(SNAT_ADDRESSES)?, Overlay::default(), None);
        pool.sync(&mut dp)?;
        Ok(Self {
            dp,
            pool,
            ingress: ifindex(LAB_INTERFACE)?,
        })
    }

    fn program(&self) -> Result<&Xdp> {
        self.dp.program()
    }

    /// Opens a connection from `client` (SYN, the server's SYN-ACK, the client's ACK) and
    /// returns the server side's address for it.
    fn open(&self, client: SocketAddrV4) -> Result<SocketAddrV4> {
        let server_side = self.half_open(client)?;
        self.run_tx(&ack(client, vip()), "handshake ACK")?;
        Ok(server_side)
    }

    /// A SYN from `client` and the server's SYN-ACK: the flow awaits the client's ACK.
    fn half_open(&self, client: SocketAddrV4) -> Result<SocketAddrV4> {
        let server_side = self.syn(client)?;
        let syn_ack = Frame::tcp(
            SocketAddrV4::new(LAB_BACKEND, BACKEND_PORT),
            server_side,
            TCP_SYN | TCP_ACK,
        );
        self.run_tx(&syn_ack.bytes(), "SYN-ACK")?;
        Ok(server_side)
    }

    fn run_tx(&self, frame: &[u8], what: &str) -> Result<()> {
        let mut out = vec![0u8; 256];
        let r = run_once(self.program()?, frame, self.ingress, &mut out)?;
        if r.return_value != XDP_TX {
            anyhow::bail!(
                "{what}: action {}; counters {:?}",
                r.return_value,
                self.verdicts()?
            );
        }
        Ok(())
    }

    fn verdicts(&self) -> Result<Vec<(lb_common::Counter, u64)>> {
        Ok(self
            .dp
            .counters()?
            .into_iter()
            .filter(|(c, v)| *v != 0 && c.is_verdict())
            .collect())
    }

    /// Sends a SYN from `client` and returns the server side's address for it.
    fn syn(&self, client: SocketAddrV4) -> Result<SocketAddrV4> {
        let mut out = vec![0u8; 256];
        let r = run_once(
            self.program()?,
            &Frame::syn(client, vip()).bytes(),
            self.ingress,
            &mut out,
        )?;
        if r.return_value != XDP_TX {
            let counters: Vec<_> = self
                .dp
                .counters()?
                .into_iter()
                .filter(|(c, v)| *v != 0 && c.is_verdict())
                .collect();
            anyhow::bail!(
                "SYN from {client} not forwarded (action {}; counters {counters:?})",
                r.return_value
            );
        }
        match verify_frame(&out[..r.data_size_out as usize])?.src {
            std::net::SocketAddr::V4(server_side) => Ok(server_side),
            other => anyhow::bail!("SYN from {client} left from {other}"),
        }
    }
}

/// The reference programs, loaded the same way as lb.
struct Baselines {
    ebpf: Ebpf,
}

impl Baselines {
    fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(BASELINE_OBJECT).context("load the baseline programs")?;
        for name in ["xdp_pass", "xdp_mac_swap"] {
            let program: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            program.load()?;
        }
        Ok(Self { ebpf })
    }

    fn program(&self, name: &'static str) -> Result<&Xdp> {
        Ok(self.ebpf.program(name).context(name)?.try_into()?)
    }
}

/// Median kernel-measured ns of one call each over `frames` for `xdp_pass` and for
/// `program`, in alternating blocks of `BLOCK` calls so that both see the same machine
/// (these VMs drift by tens of percent within a minute) while each stays warm in the
/// caches through its block; checks `program`'s action.
fn time_alongside_pass(
    pass: &Xdp,
    program: &Xdp,
    frames: &[Vec<u8>],
    ingress: u32,
    action: u32,
) -> Result<(f64, f64)> {
    const BLOCK: usize = 500;
    let mut out = vec![0u8; 256];
    let (mut pass_ns, mut ns) = (
        Vec::with_capacity(frames.len()),
        Vec::with_capacity(frames.len()),
    );
    for block in frames.chunks(BLOCK) {
        for frame in block {
            pass_ns.push(call_ns(pass, frame, ingress, XDP_PASS, &mut out)?);
        }
        for frame in block {
            ns.push(call_ns(program, frame, ingress, action, &mut out)?);
        }
    }
    Ok((median(&mut pass_ns), median(&mut ns)))
}

/// The kernel-measured ns of one call on `frame`, checking the action.
fn call_ns(program: &Xdp, frame: &[u8], ingress: u32, action: u32, out: &mut [u8]) -> Result<f64> {
    let r = run_once(program, frame, ingress, out)?;
    ensure!(
        r.return_value == action,
        "action {} instead of {action}",
        r.return_value
    );
    Ok(r.duration.as_nanos() as f64)
}

/// Median kernel-measured ns of one call each over `frames`, checking the action.
fn time_calls(program: &Xdp, frames: &[Vec<u8>], ingress: u32, action: u32) -> Result<f64> {
    let mut out = vec![0u8; 256];
    let mut ns = frames
        .iter()
        .map(|frame| call_ns(program, frame, ingress, action, &mut out))
        .collect::<Result<Vec<_>>>()?;
    Ok(median(&mut ns))
}

pub fn run(plan: &Plan) -> Result<PacketCost> {
    let ns = harness::packet::lab_network()?;
    ns.run(|| measure(plan))?
}

/// Keeps the measuring thread on one CPU: a call that starts on another finds the per-CPU
/// tables and counters cold, which the per-call figures would show as noise.
fn pin_to_one_cpu() -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get valid
    // pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(MEASURING_CPU, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("pin the bench to one CPU");
        }
    }
    Ok(())
}

/// The CPU the per-packet figures are measured on (the last of two).
const MEASURING_CPU: usize = 1;

fn measure(plan: &Plan) -> Result<PacketCost> {
    pin_to_one_cpu()?;
    let baselines = Baselines::load()?;
    let paths = [
        ("xdp_pass (baseline)", None),
        ("mac swap + XDP_TX (baseline)", None),
        ("established flow", Some(2.7)),
        ("reverse path (server -> client)", Some(2.7)),
        ("ACK completing a handshake", Some(5.0)),
        ("new flow, affinity hit", Some(17.0)),
        ("new flow, Maglev pick", Some(17.0)),
        ("new flow, Maglev pick, allow / deny lists", Some(17.0)),
        ("not for a VIP (pass)", Some(1.6)),
        ("malformed (early drop)", None),
    ];
    let mut per_round: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut pass_per_round: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..plan.rounds {
        // Fresh maps each round, so new-flow paths always find the same table fill.
        let lb = Lb::load(1 << 20)?;
        let client = SocketAddrV4::new(LAB_CLIENT, 40000);
        let server_side = lb.open(client)?;
        let established = vec![ack(client, vip()); plan.calls];
        let reverse =
            vec![ack(SocketAddrV4::new(LAB_BACKEND, BACKEND_PORT), server_side); plan.calls];
        // Same client address (its affinity exists), a new source port each call.
        let affinity_hits: Vec<Vec<u8>> = (0..plan.calls)
            .map(|i| {
                Frame::syn(
                    SocketAddrV4::new(LAB_CLIENT, 1024 + (i % 60000) as u16),
                    vip(),
                )
                .bytes()
            })
            .collect();
        // A new client address each call: no affinity, so the Maglev table decides.
        let offset = round * plan.calls;
        let maglev: Vec<Vec<u8>> = (0..plan.calls)
            .map(|i| {
                Frame::syn(SocketAddrV4::new(client_address(offset + i), 40000), vip()).bytes()
            })
            .collect();
        // The same, to the restricted service, from clients its allow list admits.
        let restricted: Vec<Vec<u8>> = (0..plan.calls)
            .map(|i| {
                Frame::syn(
                    SocketAddrV4::new(client_address((1 << 23) + offset + i), 40000),
                    SocketAddrV4::new(LAB_VIP, RESTRICTED_PORT),
                )
                .bytes()
            })
            .collect();
        let foreign =
            vec![ack(client, SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 443)); plan.calls];
        let syn = Frame::syn(client, vip()).bytes();
        let truncated = vec![syn[..14 + 20 + 10].to_vec(); plan.calls];
        // Half-open flows whose SYN-ACK has been seen, one per call, from ports of the
        // client no other path uses (the lab routes only its address back).
        let handshake_client = |i: usize| SocketAddrV4::new(LAB_CLIENT, 41_000 + i as u16);
        for i in 0..plan.calls {
            lb.half_open(handshake_client(i))?;
        }
        let handshake_acks: Vec<Vec<u8>> = (0..plan.calls)
            .map(|i| ack(handshake_client(i), vip()))
            .collect();

        let pass = baselines.program("xdp_pass")?;
        let swap = baselines.program("xdp_mac_swap")?;
        let lb_prog = lb.program()?;
        let runs: [(&Xdp, &[Vec<u8>], u32); 10] = [
            (pass, &established, XDP_PASS),
            (swap, &established, XDP_TX),
            (lb_prog, &established, XDP_TX),
            (lb_prog, &reverse, XDP_TX),
            (lb_prog, &handshake_acks, XDP_TX),
            (lb_prog, &affinity_hits, XDP_TX),
            (lb_prog, &maglev, XDP_TX),
            (lb_prog, &restricted, XDP_TX),
            (lb_prog, &foreign, XDP_PASS),
            (lb_prog, &truncated, XDP_DROP),
        ];
        for (i, (program, frames, action)) in runs.into_iter().enumerate() {
            let (pass_ns, ns) = time_alongside_pass(pass, program, frames, lb.ingress, action)
                .with_context(|| paths[i].0)?;
            per_round[i].push(ns);
            pass_per_round[i].push(pass_ns);
        }
    }
    let paths = paths
        .iter()
        .zip(per_round.iter().zip(&pass_per_round))
        .map(|((path, target), (rounds, pass_rounds))| PathCost {
            path,
            target: *target,
            per_call: Summary::of(rounds),
            net: Summary::of(&net(rounds, pass_rounds)),
            pass_alongside: Summary::of(pass_rounds),
        })
        .collect();

    let mut scale: Vec<ScalePoint> = Vec::new();
    for &flows in &plan.scale_flows {
        let mut point =
            scale_point(plan, flows, &baselines).with_context(|| format!("scale {flows} flows"))?;
        point.vs_smallest = scale
            .first()
            .map_or(1.0, |first| point.per_call.median / first.per_call.median);
        scale.push(point);
    }
    Ok(PacketCost {
        calls_per_round: plan.calls,
        rounds: plan.rounds,
        paths,
        scale,
    })
}

fn net(rounds: &[f64], pass: &[f64]) -> Vec<f64> {
    rounds.iter().zip(pass).map(|(r, p)| r - p).collect()
}

/// The established path with `flows` live connections (and as many affinities, one
/// client address each), each call on a randomly chosen one so that lookups miss the
/// cache as they would under real traffic.
fn scale_point(plan: &Plan, flows: usize, baselines: &Baselines) -> Result<ScalePoint> {
    // Two entries per connection, with headroom so the LRU never evicts.
    let entries = (flows as u32 * 4).next_power_of_two().max(1 << 12);
    let mut lb = Lb::load(entries)?;
    for i in 0..flows {
        lb.open(SocketAddrV4::new(client_address(i), 40000))?;
    }
    let mut rng = harness::rng::Rng::new(flows as u64);
    let frames: Vec<Vec<u8>> = (0..plan.calls)
        .map(|_| {
            ack(
                SocketAddrV4::new(client_address(rng.below(flows as u64) as usize), 40000),
                vip(),
            )
        })
        .collect();
    let (mut lb_rounds, mut pass_rounds) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        pass_rounds.push(time_calls(
            baselines.program("xdp_pass")?,
            &frames,
            lb.ingress,
            XDP_PASS,
        )?);
        lb_rounds.push(time_calls(lb.program()?, &frames, lb.ingress, XDP_TX)?);
    }
    let (mut gc_ms, mut gc_cpu_ms, mut status_ms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..CONTROL_ROUNDS {
        let (wall, cpu) = (Instant::now(), thread_cpu());
        lb.pool.collect_garbage(&lb.dp)?;
        gc_ms.push(wall.elapsed().as_secs_f64() * 1e3);
        gc_cpu_ms.push((thread_cpu() - cpu).as_secs_f64() * 1e3);
        let wall = Instant::now();
        let report = lb.pool.status(&lb.dp)?;
        status_ms.push(wall.elapsed().as_secs_f64() * 1e3);
        ensure!(
            report.tables.flows.entries >= 2 * flows as u64,
            "status counted {} flow entries of {}",
            report.tables.flows.entries,
            2 * flows
        );
    }
    Ok(ScalePoint {
        flows,
        vs_smallest: 1.0,
        per_call: Summary::of(&lb_rounds),
        net: Summary::of(&net(&lb_rounds, &pass_rounds)),
        gc_ms: Summary::of(&gc_ms),
        gc_cpu_ms: Summary::of(&gc_cpu_ms),
        status_ms: Summary::of(&status_ms),
    })
}

/// Garbage collections and status reports timed per table size.
const CONTROL_ROUNDS: usize = 3;

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A development aid for profiling (`lb-bench --spin PATH`, under `perf record -a`): runs
/// one path's calls for `seconds`. PATH is `established`, `handshake`, `maglev` or `foreign`.
pub fn spin(path: &str, seconds: u64) -> Result<()> {
    let ns = harness::packet::lab_network()?;
    let path = path.to_string();
    ns.run(move || -> Result<()> {
        let lb = Lb::load(1 << 20)?;
        let client = SocketAddrV4::new(LAB_CLIENT, 40000);
        lb.open(client)?;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        let mut out = vec![0u8; 256];
        let mut i = 0usize;
        while std::time::Instant::now() < until {
            let frame = match path.as_str() {
                "established" => ack(client, vip()),
                "foreign" => ack(client, SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 443)),
                "handshake" => {
                    let c = SocketAddrV4::new(client_address(i), 40000);
                    lb.half_open(c)?;
                    ack(c, vip())
                }
                "maglev" => Frame::syn(SocketAddrV4::new(client_address(i), 40000), vip()).bytes(),
                other => anyhow::bail!("no path {other}"),
            };
            run_once(lb.program()?, &frame, lb.ingress, &mut out)?;
            i += 1;
        }
        Ok(())
    })?
}
