//! Hostile input through the real program (BPF_PROG_TEST_RUN, repeat = 1): random and
//! mutated frames, and a SYN flood from spoofed sources. Needs root.
//!
//! `LB_FUZZ_PACKETS` sets the fuzz run's size (default 1,000,000; `cargo xtask fuzz` runs
//! a longer one).
use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Result};
use harness::packet::{
    lab_network, verify_frame, Fragment, Frame, PacketLab, Transport, LAB_BACKEND, LAB_BACKEND6,
    LAB_CLIENT, LAB_CLIENT6, LAB_CONFIG, LAB_VIP, LAB_VIP6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
};
use harness::rng::Rng;
use lb_common::Counter;

/// Every this many packets, one is run alone with a full counter comparison.
const SAMPLE_EVERY: u64 = 997;

fn seeds() -> Vec<Vec<u8>> {
    let at = |ip: IpAddr, port| SocketAddr::new(ip, port);
    let mut frames = Vec::new();
    for (client, vip, backend) in [
        (
            IpAddr::from(LAB_CLIENT),
            IpAddr::from(LAB_VIP),
            IpAddr::from(LAB_BACKEND),
        ),
        (LAB_CLIENT6.into(), LAB_VIP6.into(), LAB_BACKEND6.into()),
    ] {
        for flags in [TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK] {
            frames.push(Frame::new(
                at(client, 40000),
                at(vip, 443),
                Transport::Tcp { flags },
            ));
            frames.push(Frame::new(
                at(backend, 4443),
                at(vip, 40000),
                Transport::Tcp { flags },
            ));
        }
        frames.push(Frame {
            payload: vec![7; 40],
            ..Frame::new(
                at(client, 40001),
                at(vip, 3478),
                Transport::Udp { no_checksum: false },
            )
        });
        frames.push(Frame::new(
            at(client, 0),
            at(vip, 0),
            Transport::EchoRequest,
        ));
        let datagram = Frame {
            payload: vec![9; 64],
            ..Frame::new(
                at(client, 40002),
                at(vip, 3478),
                Transport::Udp { no_checksum: false },
            )
        };
        frames.push(Frame {
            fragment: Some(Fragment {
                id: 5,
                offset: 0,
                more: true,
            }),
            ..datagram.clone()
        });
        frames.push(Frame {
            fragment: Some(Fragment {
                id: 5,
                offset: 3,
                more: false,
            }),
            ..datagram
        });
        frames.push(Frame {
            vlan: Some(100),
            ..Frame::new(
                at(client, 40003),
                at(vip, 443),
                Transport::Tcp { flags: TCP_SYN },
            )
        });
    }
    frames.push(Frame {
        extensions: vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![1, 4, 0, 0, 0, 0])],
        ..Frame::new(
            SocketAddr::new(LAB_CLIENT6.into(), 40004),
            SocketAddr::new(LAB_VIP6.into(), 443),
            Transport::Tcp { flags: TCP_SYN },
        )
    });
    frames.iter().map(Frame::bytes).collect()
}

/// A random frame: mostly a seed with a few bytes changed, cut or grown; sometimes noise.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(10) == 0 {
        let len = 14 + rng.below(120) as usize;
        return (0..len).map(|_| rng.next_u64() as u8).collect();
    }
    let mut frame = seeds[rng.below(seeds.len() as u64) as usize].clone();
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(frame.len() as u64) as usize;
        match rng.below(4) {
            0 => frame[i] = rng.next_u64() as u8,
            1 => frame[i] ^= 1 << rng.below(8),
            2 => frame.truncate(i.max(14)),
            _ => frame.extend((0..rng.below(16)).map(|_| rng.next_u64() as u8)),
        }
    }
    frame
}

/// A real handshake from `client` (SYN, the server's SYN-ACK, the client's ACK); returns
/// the flow's SNAT address and port.
fn handshake(lab: &PacketLab, client: SocketAddr, vip: SocketAddr) -> Result<SocketAddr> {
    let tcp = |src, dst, flags| Frame::new(src, dst, Transport::Tcp { flags }).bytes();
    let out = lab.expect("real SYN", &tcp(client, vip, TCP_SYN), XDP_TX, Counter::Tx)?;
    let seen = verify_frame(&out.output)?;
    lab.expect(
        "SYN-ACK",
        &tcp(seen.dst, seen.src, TCP_SYN | TCP_ACK),
        XDP_TX,
        Counter::Tx,
    )?;
    lab.expect("ACK", &tcp(client, vip, TCP_ACK), XDP_TX, Counter::Tx)?;
    Ok(seen.src)
}

fn verdict_sum(counters: &[(Counter, u64)]) -> u64 {
    counters
        .iter()
        .filter(|(c, _)| c.is_verdict())
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn a_million_random_and_mutated_frames_are_all_accounted_for() -> Result<()> {
    let total: u64 = std::env::var("LB_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seed = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1b_5eed_u64);
    let ns = lab_network()?;
    ns.run(|| -> Result<()> {
        let lab = PacketLab::new(LAB_CONFIG)?;
        let seeds = seeds();
        let mut rng = Rng::new(seed);
        let before = lab.dp.counters()?;
        let mut output = Vec::new();
        let (mut rewritten, mut sampled) = (0u64, 0u64);
        for n in 0..total {
            let frame = mutate(&mut rng, &seeds);
            let action = if n % SAMPLE_EVERY == 0 {
                // Exactly one verdict counter moves for this packet.
                let outcome = lab.run(&frame)?;
                ensure!(
                    outcome.verdicts.len() == 1 && outcome.verdicts[0].1 == 1,
                    "seed {seed:#x}, packet {n}: verdict counters {:?} for {frame:02x?}",
                    outcome.verdicts
                );
                sampled += 1;
                output = outcome.output;
                outcome.action
            } else {
                lab.run_fast(&frame, &mut output)?
            };
            ensure!(action != XDP_ABORTED, "seed {seed:#x}, packet {n}: XDP_ABORTED for {frame:02x?}");
            ensure!(matches!(action, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT), "action {action}");
            // lb updates checksums incrementally and does not validate them (like a router:
            // the endpoint drops a corrupt packet). So a frame that arrived consistent must
            // leave consistent; one that arrived corrupt stays corrupt by the same amount.
            if (action == XDP_TX || action == XDP_REDIRECT) && verify_frame(&frame).is_ok() {
                verify_frame(&output).map_err(|e| e.context(format!("seed {seed:#x}, packet {n}: in {frame:02x?} out {output:02x?}")))?;
                rewritten += 1;
            }
        }
        let after = lab.dp.counters()?;
        let packets = after[Counter::Packets as usize].1 - before[Counter::Packets as usize].1;
        let verdicts = verdict_sum(&after) - verdict_sum(&before);
        ensure!(packets == total && verdicts == total, "{total} frames: packets {packets}, verdicts {verdicts}");
        ensure!(rewritten > total / 20, "only {rewritten} of {total} frames were valid and sent on: the mutator is too harsh");
        println!("{total} frames (seed {seed:#x}): {rewritten} valid ones sent on and checked, {sampled} with per-packet counters");
        Ok(())
    })?
}

/// 100,000 SYNs from spoofed sources against a VIP whose half-open table holds 4,096
/// entries: established flows keep working and are still in the flow table, the flood shows
/// in the counters, and the half-open table stays at its size.
#[test]
fn syn_flood_from_spoofed_sources_does_not_evict_established_flows() -> Result<()> {
    const FLOOD: u32 = 100_000;
    const REAL_CLIENTS: u16 = 50;
    let ns = lab_network()?;
    ns.run(|| -> Result<()> {
        let config = LAB_CONFIG.replace(
            "max_half_open = 4096",
            "max_half_open = 4096\nhandshake_timeout = 2",
        );
        let lab = PacketLab::new(&config)?;
        let vip = SocketAddr::new(LAB_VIP.into(), 443);
        let client = |i: u16| SocketAddr::new(LAB_CLIENT.into(), 30000 + i);
        let mut snat = Vec::new();
        for i in 0..REAL_CLIENTS {
            snat.push(handshake(&lab, client(i), vip)?);
        }
        let established = lab.dp.flows().count();
        ensure!(
            established == 2 * usize::from(REAL_CLIENTS),
            "{established} flow entries before the flood"
        );

        let before = lab.dp.counters()?;
        let mut output = Vec::new();
        let mut rng = Rng::new(0xf100d);
        for _ in 0..FLOOD {
            let spoofed =
                IpAddr::from((rng.next_u64() as u32 & 0x00ff_ffff | 0x0b00_0000).to_be_bytes());
            let syn = Frame::new(
                SocketAddr::new(spoofed, 1024 + rng.below(60000) as u16),
                vip,
                Transport::Tcp { flags: TCP_SYN },
            );
            let action = lab.run_fast(&syn.bytes(), &mut output)?;
            // No route back to 11.0.0.0/8 is needed: the SYN goes to the server.
            ensure!(
                action == XDP_TX || action == XDP_DROP,
                "flood SYN: action {action}"
            );
        }
        let after = lab.dp.counters()?;
        let moved = |c: Counter| after[c as usize].1 - before[c as usize].1;
        ensure!(
            moved(Counter::NewFlows) + moved(Counter::DropSnatExhausted) == u64::from(FLOOD),
            "flood not in the counters"
        );
        let half_open = lab.dp.half_open().count();
        ensure!(
            half_open <= 4096 + 64,
            "half-open table grew to {half_open}"
        );
        ensure!(
            lab.dp.flows().count() == established,
            "the flood changed the flow table"
        );

        // Every real client's connection still goes to its server, with its SNAT port.
        for i in 0..REAL_CLIENTS {
            let data = Frame {
                payload: b"still here".to_vec(),
                ..Frame::new(client(i), vip, Transport::Tcp { flags: TCP_ACK })
            };
            let out = lab.expect("data after the flood", &data.bytes(), XDP_TX, Counter::Tx)?;
            let seen = verify_frame(&out.output)?;
            ensure!(
                seen.src == snat[usize::from(i)],
                "client {i} moved to {:?}",
                seen.src
            );
        }
        println!(
            "flood: {} new flows, {} refused, half-open {half_open}/4096, flows {established} kept",
            moved(Counter::NewFlows),
            moved(Counter::DropSnatExhausted)
        );
        Ok(())
    })?
}

/// Spoofed handshakes, blind RSTs and a server-side RST sweep from the client side, against
/// the real program: 2,000 spoofed SYN + bare-ACK pairs confirm nothing and leave the flow
/// table as it was; 20 real connections opened afterwards confirm; one blind RST each
/// closes none of them; RSTs from the servers' address and port swept over the SNAT ports
/// but arriving on the clients' interface reach no one.
#[test]
fn blind_spoofers_confirm_and_kill_nothing() -> Result<()> {
    const SPOOFED: u32 = 2_000;
    const REAL: u16 = 20;
    let ns = lab_network()?;
    ns.run(|| -> Result<()> {
        let mut lab = PacketLab::new(LAB_CONFIG)?;
        let vip = SocketAddr::new(LAB_VIP.into(), 443);
        let backend = SocketAddr::new(LAB_BACKEND.into(), 4443);
        let before = lab.dp.counters()?;
        let mut output = Vec::new();
        let mut rng = Rng::new(0xb11d);
        for _ in 0..SPOOFED {
            let spoofed = SocketAddr::new(
                IpAddr::from((rng.next_u64() as u32 & 0x00ff_ffff | 0x0b00_0000).to_be_bytes()),
                1024 + rng.below(60000) as u16,
            );
            let syn = Frame::new(spoofed, vip, Transport::Tcp { flags: TCP_SYN });
            lab.run_fast(&syn.bytes(), &mut output)?;
            let ack = Frame {
                seq: harness::packet::DEFAULT_ISN + 1,
                ack: rng.next_u64() as u32,
                ..Frame::new(spoofed, vip, Transport::Tcp { flags: TCP_ACK })
            };
            let action = lab.run_fast(&ack.bytes(), &mut output)?;
            ensure!(action == XDP_DROP, "spoofed ACK: action {action}");
        }
        let after = lab.dp.counters()?;
        let moved = |c: Counter| after[c as usize].1 - before[c as usize].1;
        ensure!(
            moved(Counter::FlowsConfirmed) == 0,
            "spoofed handshakes confirmed flows"
        );
        ensure!(
            moved(Counter::DropTcpBadAck) == u64::from(SPOOFED),
            "spoofed ACKs not all counted"
        );
        ensure!(
            lab.dp.flows().count() == 0,
            "spoofed handshakes reached the flow table"
        );

        let client = |i: u16| SocketAddr::new(LAB_CLIENT.into(), 30000 + i);
        let mut server_sides = Vec::new();
        for i in 0..REAL {
            server_sides.push(handshake(&lab, client(i), vip)?);
        }
        ensure!(
            lab.dp.flows().count() == 2 * usize::from(REAL),
            "real connections not confirmed"
        );

        for i in 0..REAL {
            let rst = Frame {
                seq: rng.next_u64() as u32 | 0x8000_0000,
                ..Frame::new(client(i), vip, Transport::Tcp { flags: TCP_RST })
            };
            lab.expect(
                "blind RST",
                &rst.bytes(),
                XDP_DROP,
                Counter::DropTcpOutOfWindow,
            )?;
        }
        // The sweep: every SNAT port, from the server, on the clients' interface.
        let home = lab.ingress;
        lab.ingress = lb::dataplane::ifindex("t1")?;
        let swept = lab.dp.counters()?;
        for port in 1024..=65535u16 {
            let rst = Frame::new(
                backend,
                SocketAddr::new(server_sides[0].ip(), port),
                Transport::Tcp {
                    flags: TCP_RST | TCP_ACK,
                },
            );
            let action = lab.run_fast(&rst.bytes(), &mut output)?;
            ensure!(
                action != XDP_TX && action != XDP_REDIRECT,
                "a swept RST was forwarded"
            );
        }
        lab.ingress = home;
        let wrong_side = lab.dp.counters()?[Counter::DropWrongSide as usize].1
            - swept[Counter::DropWrongSide as usize].1;
        // The live flows' ports, and those of the spoofed half-open ones, were all hit.
        ensure!(
            wrong_side >= u64::from(REAL),
            "only {wrong_side} swept RSTs were refused as wrong-side"
        );
        let closing = lab
            .dp
            .flows()
            .filter(|(_, e)| e.flags & lb_common::FLOW_F_CLOSING != 0)
            .count();
        ensure!(closing == 0, "{closing} flow entries moved to closing");
        for (i, server_side) in server_sides.iter().enumerate() {
            let data = Frame {
                payload: b"still here".to_vec(),
                ..Frame::new(client(i as u16), vip, Transport::Tcp { flags: TCP_ACK })
            };
            let out = lab.expect("data afterwards", &data.bytes(), XDP_TX, Counter::Tx)?;
            ensure!(
                verify_frame(&out.output)?.src == *server_side,
                "client {i} moved"
            );
        }
        Ok(())
    })?
}
