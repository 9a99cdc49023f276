//! Packet-level tests: the real XDP program run on crafted frames with BPF_PROG_TEST_RUN
//! (repeat = 1, so every run sees the original input). Each case states the action and the
//! one verdict counter it must bump; rewritten output is checked with an independent
//! checksum implementation (etherparse). Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, ensure, Context, Result};
use harness::packet::{
    lab_network, parse_verified, PacketLab, TcpFrame, ETH_LEN, LAB_BACKEND, LAB_BACKEND_MAC,
    LAB_CLIENT, LAB_CLIENT_NEXT_HOP_MAC, LAB_CONFIG, LAB_SNAT, LAB_VIP, XDP_DROP, XDP_PASS, XDP_TX,
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

#[test]
fn malformed_and_foreign_frames_are_classified() -> Result<()> {
    in_network(|h| {
        let syn = TcpFrame::syn(client(40000), vip(443)).bytes();
        let ip_header_end = ETH_LEN + 20;

        // Shorter frames never reach XDP (nor BPF_PROG_TEST_RUN, which refuses them).
        h.expect(
            "Ethernet header only",
            &syn[..ETH_LEN],
            XDP_PASS,
            Counter::PassMalformed,
        )?;
        let mut arp = syn.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        h.expect("ARP", &arp, XDP_PASS, Counter::PassNotIp)?;
        h.expect(
            "IPv4 header cut short",
            &syn[..ETH_LEN + 12],
            XDP_PASS,
            Counter::PassMalformed,
        )?;
        let mut bad_ihl = syn.clone();
        bad_ihl[ETH_LEN] = 0x44;
        h.expect(
            "IPv4 IHL below 5",
            &bad_ihl,
            XDP_PASS,
            Counter::PassMalformed,
        )?;
        let mut version6 = syn.clone();
        version6[ETH_LEN] = 0x65;
        h.expect(
            "IP version 6 in an IPv4 ethertype",
            &version6,
            XDP_PASS,
            Counter::PassMalformed,
        )?;
        h.expect(
            "VIP SYN with TCP header cut short",
            &syn[..ip_header_end + 10],
            XDP_DROP,
            Counter::DropMalformed,
        )?;

        let mut udp = syn.clone();
        udp[ETH_LEN + 9] = 17;
        // The TCP header read as UDP: its length field must still fit the datagram.
        let udp_len = (udp.len() - ip_header_end) as u16;
        udp[ip_header_end + 4..ip_header_end + 6].copy_from_slice(&udp_len.to_be_bytes());
        h.expect(
            "UDP to a port with only a TCP service",
            &udp,
            XDP_PASS,
            Counter::PassNotService,
        )?;

        let foreign = TcpFrame::syn(
            client(40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 9, 9, 9), 443),
        )
        .bytes();
        let out = h.expect(
            "TCP to a non-VIP address",
            &foreign,
            XDP_PASS,
            Counter::PassNotService,
        )?;
        ensure!(out.output == foreign, "non-VIP frame was modified");
        let foreign_short = &foreign[..ip_header_end + 4];
        h.expect(
            "truncated TCP to a non-VIP address",
            foreign_short,
            XDP_PASS,
            // Not lb's address: it leaves before its transport header is looked at.
            Counter::PassNotService,
        )?;
        h.expect(
            "VIP, port without a service",
            &TcpFrame::syn(client(40000), vip(80)).bytes(),
            XDP_PASS,
            Counter::PassNotService,
        )?;

        let later_fragment = TcpFrame {
            fragment_offset: 185,
            ..TcpFrame::syn(client(40000), vip(443))
        };
        h.expect(
            "later fragment without its first",
            &later_fragment.bytes(),
            XDP_DROP,
            Counter::DropFragmentUnknown,
        )?;

        let stray_ack = TcpFrame {
            syn: false,
            ack: true,
            ..TcpFrame::syn(client(40001), vip(443))
        };
        h.expect(
            "ACK without a flow",
            &stray_ack.bytes(),
            XDP_DROP,
            Counter::DropTcpNoFlow,
        )?;
        let dying = TcpFrame {
            ttl: 1,
            ..TcpFrame::syn(client(40002), vip(443))
        };
        h.expect("TTL 1", &dying.bytes(), XDP_PASS, Counter::PassTtlExpired)?;
        Ok(())
    })
}

/// Checks a rewritten frame: addresses, ports, TTL, MACs and both checksums.
fn check_rewrite(
    output: &[u8],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    dst_mac: [u8; 6],
) -> Result<()> {
    let p = parse_verified(output)?;
    ensure!(
        p.ip.source == src.ip().octets() && p.tcp.source_port == src.port(),
        "source {:?}:{}",
        p.ip.source,
        p.tcp.source_port
    );
    ensure!(
        p.ip.destination == dst.ip().octets() && p.tcp.destination_port == dst.port(),
        "destination {:?}:{}",
        p.ip.destination,
        p.tcp.destination_port
    );
    ensure!(p.ip.time_to_live == ttl, "TTL {}", p.ip.time_to_live);
    ensure!(p.dst_mac == dst_mac, "destination MAC {:02x?}", p.dst_mac);
    Ok(())
}

#[test]
fn vip_syn_is_translated_with_valid_checksums_and_the_reply_comes_back() -> Result<()> {
    in_network(|h| {
        let syn = TcpFrame::syn(client(40000), vip(443));
        let out = h.expect("VIP SYN", &syn.bytes(), XDP_TX, Counter::Tx)?;
        let p = parse_verified(&out.output)?;
        let snat_port = p.tcp.source_port;
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
        let syn_ack = TcpFrame {
            syn: true,
            ack: true,
            ..TcpFrame::syn(
                SocketAddrV4::new(BACKEND, 4443),
                SocketAddrV4::new(SNAT, snat_port),
            )
        };
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
        let data = TcpFrame {
            syn: false,
            ack: true,
            payload: b"GET / HTTP/1.1\r\n\r\n!".to_vec(),
            ..syn.clone()
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
        let with_options = TcpFrame {
            ip_options: vec![1, 1, 0, 0],
            ..TcpFrame::syn(client(40100), vip(443))
        };
        let out = h.expect(
            "VIP SYN with IPv4 options",
            &with_options.bytes(),
            XDP_TX,
            Counter::Tx,
        )?;
        let p = parse_verified(&out.output)?;
        ensure!(
            p.ip.options.as_slice() == [1, 1, 0, 0],
            "options changed: {:?}",
            p.ip.options
        );
        ensure!(
            p.tcp.destination_port == 4443,
            "ports not found after the options"
        );
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
                &TcpFrame::syn(client(30000 + port), vip(443)).bytes(),
                XDP_TX,
                Counter::Tx,
            )?;
            let p = parse_verified(&out.output)?;
            if !seen.insert((p.ip.source, p.tcp.source_port)) {
                bail!(
                    "SNAT {:?}:{} handed out twice",
                    p.ip.source,
                    p.tcp.source_port
                );
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
