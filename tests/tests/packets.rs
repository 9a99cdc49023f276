//! Packet-level tests beside the fixture table (fixtures.rs): the real XDP program run on
//! crafted frames with BPF_PROG_TEST_RUN (repeat = 1, so every run sees the original
//! input), for what a table row cannot say: a flow's packets in sequence, SNAT port
//! uniqueness over many flows, IPv4 options carried through, the Maglev tables and the
//! garbage-collecting sweep. Each run states the action and the one verdict counter it
//! must bump; rewritten output is checked by the harness's verifier. Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, ensure, Context, Result};
use harness::packet::{
    lab_network, verify_frame, Frame, PacketLab, LAB_BACKEND, LAB_BACKEND_MAC, LAB_CLIENT,
    LAB_CLIENT_NEXT_HOP_MAC, LAB_CONFIG, LAB_SNAT, LAB_VIP, TCP_ACK, TCP_FIN, TCP_SYN, XDP_TX,
};
use lb_common::Counter;

const VIP: Ipv4Addr = LAB_VIP;
const CLIENT: Ipv4Addr = LAB_CLIENT;
const BACKEND: Ipv4Addr = LAB_BACKEND;
const SNAT: Ipv4Addr = LAB_SNAT;
const BACKEND_MAC: [u8; 6] = LAB_BACKEND_MAC;
const CLIENT_NEXT_HOP_MAC: [u8; 6] = LAB_CLIENT_NEXT_HOP_MAC;

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

fn in_network(test: impl FnOnce(&PacketLab) -> Result<()> + Send) -> Result<()> {
    let ns = lab_network()?;
    ns.run(|| test(&PacketLab::new(LAB_CONFIG)?))?
}

/// Checks a rewritten frame: addresses, ports, TTL, MAC and every checksum.
fn check_rewrite(
    output: &[u8],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    dst_mac: [u8; 6],
) -> Result<()> {
    let seen = verify_frame(output)?;
    ensure!(seen.src == src.into(), "source {}", seen.src);
    ensure!(seen.dst == dst.into(), "destination {}", seen.dst);
    ensure!(seen.ttl == ttl, "TTL {}", seen.ttl);
    ensure!(
        seen.dst_mac == dst_mac,
        "destination MAC {:02x?}",
        seen.dst_mac
    );
    Ok(())
}

#[test]
fn vip_syn_is_translated_with_valid_checksums_and_the_reply_comes_back() -> Result<()> {
    in_network(|h| {
        let syn = Frame::syn(client(40000), vip(443));
        let out = h.expect("VIP SYN", &syn.bytes(), XDP_TX, Counter::Tx)?;
        let snat_port = verify_frame(&out.output)?.src.port();
        check_rewrite(
            &out.output,
            SocketAddrV4::new(SNAT, snat_port),
            SocketAddrV4::new(BACKEND, 4443),
            63,
            BACKEND_MAC,
        )?;

        // Retransmitted SYN: same flow, same SNAT port.
        let again = h.expect("retransmitted SYN", &syn.bytes(), XDP_TX, Counter::Tx)?;
        check_rewrite(
            &again.output,
            SocketAddrV4::new(SNAT, snat_port),
            SocketAddrV4::new(BACKEND, 4443),
            63,
            BACKEND_MAC,
        )?;

        // The server's SYN-ACK to the SNAT address goes back as VIP:443 -> client.
        let syn_ack = Frame::tcp(
            SocketAddrV4::new(BACKEND, 4443),
            SocketAddrV4::new(SNAT, snat_port),
            TCP_SYN | TCP_ACK,
        );
        let back = h.expect(
            "SYN-ACK from the server",
            &syn_ack.bytes(),
            XDP_TX,
            Counter::Tx,
        )?;
        check_rewrite(
            &back.output,
            vip(443),
            client(40000),
            63,
            CLIENT_NEXT_HOP_MAC,
        )?;

        // Data with a payload of odd length keeps a valid checksum too.
        let data = Frame {
            payload: b"GET / HTTP/1.1\r\n\r\n!".to_vec(),
            ..Frame::tcp(client(40000), vip(443), TCP_ACK)
        };
        let out = h.expect("client data", &data.bytes(), XDP_TX, Counter::Tx)?;
        check_rewrite(
            &out.output,
            SocketAddrV4::new(SNAT, snat_port),
            SocketAddrV4::new(BACKEND, 4443),
            63,
            BACKEND_MAC,
        )?;
        Ok(())
    })
}

#[test]
fn ipv4_options_are_skipped_and_kept() -> Result<()> {
    in_network(|h| {
        // Two NOPs and an end-of-options list, padded: IHL 6.
        let with_options = Frame {
            ip_options: vec![1, 1, 0, 0],
            ..Frame::syn(client(40100), vip(443))
        };
        let out = h.expect(
            "VIP SYN with IPv4 options",
            &with_options.bytes(),
            XDP_TX,
            Counter::Tx,
        )?;
        let seen = verify_frame(&out.output)?;
        ensure!(
            seen.ip_options == [1, 1, 0, 0],
            "options changed: {:?}",
            seen.ip_options
        );
        ensure!(seen.dst.port() == 4443, "ports not found after the options");
        Ok(())
    })
}

#[test]
fn snat_ports_are_unique_per_backend() -> Result<()> {
    in_network(|h| {
        let mut seen = std::collections::BTreeSet::new();
        for port in 0..500u16 {
            let out = h.expect(
                "SYN",
                &Frame::syn(client(30000 + port), vip(443)).bytes(),
                XDP_TX,
                Counter::Tx,
            )?;
            let snat = verify_frame(&out.output)?.src;
            if !seen.insert(snat) {
                bail!("SNAT {snat} handed out twice");
            }
        }
        Ok(())
    })
}

/// Maglev halves are written through the mapped array and read through the kernel: a
/// half reads back as written, the service's other half and the next service's tables are
/// untouched, and the mapping is still in use (it agreed with the kernel's view).
#[test]
fn a_maglev_half_reads_back_as_written_and_touches_nothing_else() -> Result<()> {
    let capacity = lb::dataplane::Capacity {
        max_flows: 1024,
        max_half_open: 1024,
        max_affinities: 1024,
    };
    let mut dp = lb::dataplane::Dataplane::load(capacity, None)?;
    let size = lb_common::MAGLEV_SIZE as usize;
    let table: Vec<u32> = (0..size as u32).map(|slot| slot % 7 + 100).collect();
    let (other_half, next_service) = (dp.read_maglev(5, 0)?, dp.read_maglev(6, 1)?);
    dp.write_maglev(5, 1, &table)?;
    ensure!(
        dp.read_maglev(5, 1)? == table,
        "half 1 differs from what was written"
    );
    ensure!(dp.read_maglev(5, 0)? == other_half, "half 0 changed");
    ensure!(
        dp.read_maglev(6, 1)? == next_service,
        "the next service changed"
    );
    ensure!(
        dp.maglev_is_mapped(),
        "the table was not written through the mapping (or the mapping disagreed with the kernel)"
    );
    Ok(())
}

/// A sync that changes nothing for a service leaves its live table in place; a drain
/// builds the other half and flips to it.
#[test]
fn only_a_changed_service_gets_a_new_table() -> Result<()> {
    let half_of = |dp: &lb::dataplane::Dataplane, port: u16| -> Result<u32> {
        dp.installed_services()
            .into_iter()
            .find(|(k, _)| u16::from_be(k.port_be) == port && k.family == 4)
            .map(|(_, s)| s.table_half)
            .context("no service")
    };
    let config = lb::config::Config::parse(LAB_CONFIG)?;
    let mut pool =
        lb::daemon::pool::Pool::new(config, lb::daemon::runtime::Overlay::default(), None);
    let mut dp = lb::dataplane::Dataplane::load(
        lb::dataplane::Capacity {
            max_flows: 1024,
            max_half_open: 1024,
            max_affinities: 1024,
        },
        None,
    )?;
    pool.sync(&mut dp)?;
    let (web, turn) = (half_of(&dp, 443)?, half_of(&dp, 3478)?);
    pool.sync(&mut dp)?;
    ensure!(
        (half_of(&dp, 443)?, half_of(&dp, 3478)?) == (web, turn),
        "an unchanged sync flipped a table"
    );
    pool.drain(&mut dp, "web", LAB_BACKEND.into(), None)?;
    ensure!(
        half_of(&dp, 443)? == web ^ 1,
        "the drain did not flip web's table"
    );
    ensure!(
        half_of(&dp, 3478)? == turn,
        "the drain flipped turn's table"
    );
    Ok(())
}

/// A server that closes first keeps the (server, SNAT address:port) pair in TIME_WAIT, so
/// lb holds that SNAT claim for `SERVER_TIME_WAIT_S` after the server's FIN; when the
/// client closed first, the server ends without TIME_WAIT and the claim goes after the
/// closing timeout.
#[test]
fn a_server_that_closes_first_holds_its_snat_port_through_time_wait() -> Result<()> {
    in_network(|h| {
        let server = SocketAddrV4::new(BACKEND, 4443);
        // Opens a confirmed connection from `port`; returns its server-side SNAT port.
        let open = |port: u16| -> Result<u16> {
            let out = h.expect(
                "SYN",
                &Frame::syn(client(port), vip(443)).bytes(),
                XDP_TX,
                Counter::Tx,
            )?;
            let snat = verify_frame(&out.output)?.src;
            let syn_ack = Frame::tcp(server, snat, TCP_SYN | TCP_ACK);
            h.expect("SYN-ACK", &syn_ack.bytes(), XDP_TX, Counter::Tx)?;
            h.expect(
                "ACK",
                &Frame::tcp(client(port), vip(443), TCP_ACK).bytes(),
                XDP_TX,
                Counter::Tx,
            )?;
            Ok(snat.port())
        };
        let fin_from = |from: SocketAddrV4, to: SocketAddrV4| Frame {
            seq: harness::packet::DEFAULT_ISN + 1,
            ..Frame::tcp(from, to, TCP_FIN | TCP_ACK)
        };
        let claim_timeout = |snat_port: u16| -> Result<u32> {
            h.dp.flows()
                .find(|(k, _)| {
                    u16::from_be(k.src_port_be) == 4443 && u16::from_be(k.dst_port_be) == snat_port
                })
                .map(|(_, e)| e.timeout_s)
                .context("no return entry for the SNAT port")
        };
        let snat_a = open(42000)?;
        let snat_side = SocketAddrV4::new(SNAT, snat_a);
        h.expect(
            "server FIN first",
            &fin_from(server, snat_side).bytes(),
            XDP_TX,
            Counter::Tx,
        )?;
        ensure!(
            claim_timeout(snat_a)? == lb_common::SERVER_TIME_WAIT_S,
            "after the server's FIN, the claim lives {} s",
            claim_timeout(snat_a)?
        );

        let snat_b = open(42001)?;
        h.expect(
            "client FIN first",
            &fin_from(client(42001), vip(443)).bytes(),
            XDP_TX,
            Counter::Tx,
        )?;
        h.expect(
            "server FIN second",
            &fin_from(server, SocketAddrV4::new(SNAT, snat_b)).bytes(),
            XDP_TX,
            Counter::Tx,
        )?;
        let closing = lb::config::DEFAULT_CLOSING_TIMEOUT_S;
        ensure!(
            claim_timeout(snat_b)? == closing,
            "after the client's FIN and the server's, the claim lives {} s, not {closing}",
            claim_timeout(snat_b)?
        );
        Ok(())
    })
}

/// Runs `check` on a lab's data plane with the peers' way into its tables, which writes
/// entries as given, last-seen times included, and `idle`, which turns seconds of idleness
/// into a last-seen time.
fn in_sweep_lab(
    check: impl FnOnce(
            &lb::dataplane::Dataplane,
            &mut lb::dataplane::PeerTables,
            &dyn Fn(u64) -> u64,
        ) -> Result<()>
        + Send,
) -> Result<()> {
    let ns = lab_network()?;
    ns.run(|| {
        let lab = PacketLab::new(LAB_CONFIG)?;
        let mut tables = lab.dp.open_peer_tables()?;
        let now = lb::dataplane::monotonic_ns();
        let idle = |seconds: u64| now.saturating_sub(seconds * lb_common::NS_PER_SEC);
        check(&lab.dp, &mut tables, &idle)
    })?
}

#[test]
fn the_sweep_deletes_exactly_the_expired_entries() -> Result<()> {
    in_sweep_lab(|dp, tables, idle| {
        // Flow directions with a 60 s timeout, idle 0-4 s (fresh) or 120-124 s (expired).
        let flow = |n: u32, idle_s: u64| {
            let key = lb_common::FlowKey {
                src_port_be: (40000 + n as u16).to_be(),
                ..lb_common::FlowKey::default()
            };
            let entry = lb_common::FlowEntry {
                timeout_s: 60,
                last_seen_ns: idle(idle_s),
                ..lb_common::FlowEntry::default()
            };
            (key, entry)
        };
        let flows: Vec<_> = (0..5)
            .map(|n| {
                flow(
                    n,
                    if n < 3 {
                        u64::from(n)
                    } else {
                        120 + u64::from(n)
                    },
                )
            })
            .collect();
        ensure!(
            tables.install_flows(&flows) == flows.len(),
            "flows installed"
        );
        // Affinities of service 0 (timeout 60 s), fresh and expired, and a fresh one of
        // service 1, which has no timeout: no such service, so garbage.
        let affinity = |n: u32, service_id: u32, idle_s: u64| {
            let key = lb_common::AffinityKey {
                client_be: [n, 0, 0, 0],
                service_id,
                ..lb_common::AffinityKey::default()
            };
            let entry = lb_common::AffinityEntry {
                last_seen_ns: idle(idle_s),
                ..lb_common::AffinityEntry::default()
            };
            (key, entry)
        };
        let affinities = [affinity(1, 0, 1), affinity(2, 0, 90), affinity(3, 1, 1)];
        for (key, entry) in &affinities {
            ensure!(tables.install_affinity(key, entry), "affinity installed");
        }
        let timeouts = std::collections::BTreeMap::from([(0, 60 * lb_common::NS_PER_SEC)]);
        let mut sweeper = dp.sweeper()?;
        let sweep = sweeper.sweep(&timeouts, true, false)?;
        let tally = sweep.tally;
        let count = |kept, removed| lb_common::SweepCount { kept, removed };
        ensure!(tally.flows == count(3, 2), "flows {:?}", tally.flows);
        ensure!(
            tally.half_open == count(0, 0),
            "half-open {:?}",
            tally.half_open
        );
        ensure!(
            tally.affinities == count(1, 2),
            "affinities {:?}",
            tally.affinities
        );
        let mut left: Vec<_> = dp
            .flows()
            .map(|(k, _)| u16::from_be(k.src_port_be))
            .collect();
        left.sort();
        ensure!(left == [40000, 40001, 40002], "flows left: {left:?}");
        let left: Vec<_> = dp.affinities().map(|(k, _)| k.client_be[0]).collect();
        ensure!(left == [1], "affinities left: {left:?}");
        let mut announced: Vec<_> = sweep
            .flows_removed
            .iter()
            .map(|k| u16::from_be(k.src_port_be))
            .collect();
        announced.sort();
        ensure!(announced == [40003, 40004], "announced: {announced:?}");
        let again = sweeper.sweep(&timeouts, false, false)?;
        ensure!(
            again.tally.flows == count(3, 0) && again.flows_removed.is_empty(),
            "a second sweep: {:?}",
            again.tally.flows
        );
        Ok(())
    })
}

/// A connection that outlives its affinity's timeout keeps the affinity: the sweep brings
/// it up to the connection's last packet, but only while it still names that connection's
/// server, and only for a live connection of a service that keeps affinities.
#[test]
fn the_sweep_keeps_the_affinities_of_live_connections() -> Result<()> {
    in_sweep_lab(|dp, tables, idle| {
        // Client n's connection to server `flow_backend`, idle `flow_idle_s` of 60 s, and
        // its affinity to `affinity_backend`, idle 90 s of 60 s: expired on its own.
        let case = |n: u32, flow_backend: u32, flow_idle_s: u64, flags: u32, affinity_backend| {
            let key = lb_common::FlowKey {
                src_be: [n, 0, 0, 0],
                src_port_be: 40000u16.to_be(),
                ..lb_common::FlowKey::default()
            };
            let entry = lb_common::FlowEntry {
                backend_id: flow_backend,
                flags,
                timeout_s: 60,
                last_seen_ns: idle(flow_idle_s),
                ..lb_common::FlowEntry::default()
            };
            let affinity_key = lb_common::AffinityKey {
                client_be: [n, 0, 0, 0],
                ..lb_common::AffinityKey::default()
            };
            let affinity = lb_common::AffinityEntry {
                backend_id: affinity_backend,
                last_seen_ns: idle(90),
                ..lb_common::AffinityEntry::default()
            };
            (key, entry, affinity_key, affinity)
        };
        let touch = lb_common::FLOW_F_TOUCH_AFFINITY;
        let cases = [
            // Live, same server: kept, as of the connection's last packet.
            case(1, 7, 2, touch, 7),
            // Live, but the client has since been moved to another server.
            case(2, 7, 2, touch, 8),
            // The connection itself expired.
            case(3, 7, 120, touch, 7),
            // A service without affinities.
            case(4, 7, 2, 0, 7),
        ];
        for (key, entry, affinity_key, affinity) in &cases {
            ensure!(
                tables.install_flows(&[(*key, *entry)]) == 1,
                "flow installed"
            );
            ensure!(
                tables.install_affinity(affinity_key, affinity),
                "affinity installed"
            );
        }
        let timeouts = std::collections::BTreeMap::from([(0, 60 * lb_common::NS_PER_SEC)]);
        let tally = dp.sweeper()?.sweep(&timeouts, false, true)?.tally;
        ensure!(
            tally.affinities
                == lb_common::SweepCount {
                    kept: 1,
                    removed: 3
                },
            "affinities {:?}",
            tally.affinities
        );
        let left: Vec<_> = dp
            .affinities()
            .map(|(k, v)| (k.client_be[0], v.last_seen_ns))
            .collect();
        ensure!(
            left == [(1, cases[0].1.last_seen_ns)],
            "affinities left (client, last seen): {left:?}"
        );
        Ok(())
    })
}
