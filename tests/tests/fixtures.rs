//! The packet fixture table (Katran-style): each case is a frame, the action and the one
//! verdict counter it must produce, and for rewritten frames what must come out, with every
//! checksum recomputed by the harness's own implementation (`internet_checksum`). Covers
//! each parser branch and each drop reason a packet can reach. Runs the real program with
//! BPF_PROG_TEST_RUN (repeat = 1). Needs root.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{ensure, Result};
use harness::packet::{
    internet_checksum, lab_network, verify_frame, Fragment, Frame, PacketLab, Seen, Transport,
    CLIENT_MAC, ETH_LEN, FIRST_FRAGMENT_BYTES, LAB_BACKEND, LAB_BACKEND6, LAB_BACKEND_MAC,
    LAB_CLIENT, LAB_CLIENT6, LAB_CLIENT_NEXT_HOP_MAC, LAB_CONFIG, LAB_SNAT, LAB_SNAT6, LAB_VIP,
    LAB_VIP6, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, XDP_DROP, XDP_PASS, XDP_TX,
};
use lb_common::{Counter, VlanPort};

/// LAB_CONFIG plus services whose servers cannot be reached the normal way.
fn config() -> String {
    format!(
        r#"{LAB_CONFIG}
[[service]]
name = "empty"
vip = "10.100.0.1"
port = 8443

[[service]]
name = "unrouted"
vip = "10.100.0.1"
port = 9001
backends = [{{ address = "10.9.0.5" }}]

[[service]]
name = "unresolved"
vip = "10.100.0.1"
port = 9002
backends = [{{ address = "10.2.0.12" }}]

[[service]]
name = "elsewhere"
vip = "10.100.0.1"
port = 9003
backends = [{{ address = "10.5.0.5" }}]

[[service]]
name = "proxies-only"
vip = "10.100.0.1"
port = 9010
allow = ["10.1.0.0/16"]
deny = ["10.1.9.0/24"]
backends = [{{ address = "10.2.0.11" }}]

[[service]]
name = "proxies-only6"
vip = "fd00:100::1"
port = 9010
allow = ["fd00:1::/64"]
backends = [{{ address = "fd00:2::11" }}]

[[service]]
name = "deny-one"
vip = "10.100.0.1"
port = 9011
protocol = "udp"
deny = ["10.1.9.9"]
backends = [{{ address = "10.2.0.11" }}]
"#
    )
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Frame {
    Frame::new(src, dst, Transport::Tcp { flags })
}

fn udp(src: SocketAddr, dst: SocketAddr) -> Frame {
    Frame {
        payload: b"stun binding request".to_vec(),
        ..Frame::new(src, dst, Transport::Udp { no_checksum: false })
    }
}

/// A rewritten frame: its fields and valid checksums.
fn translated(lab: &PacketLab, what: &str, frame: &Frame) -> Result<Seen> {
    let out = lab.expect(what, &frame.bytes(), XDP_TX, Counter::Tx)?;
    verify_frame(&out.output).map_err(|e| e.context(format!("{what}: output")))
}

fn in_lab(test: impl FnOnce(&mut PacketLab) -> Result<()> + Send) -> Result<()> {
    let ns = lab_network()?;
    // A network only reachable through the veth peer, where lb is not attached.
    ns.ip(&["addr", "add", "10.5.0.1/24", "dev", "t1"])?;
    ns.ip(&[
        "neigh",
        "add",
        "10.5.0.5",
        "lladdr",
        "02:00:00:00:05:05",
        "dev",
        "t1",
        "nud",
        "permanent",
    ])?;
    ns.run(|| test(&mut PacketLab::new(&config())?))?
}

/// Each parser branch and drop reason, as one table: every case runs, and each failure is
/// reported by its name.
#[test]
fn parser_branches_and_drop_reasons() -> Result<()> {
    in_lab(|lab| {
        let mut cases = Vec::new();
        let c4 = at(LAB_CLIENT, 40000);
        let c6 = at(LAB_CLIENT6, 40000);
        let syn4 = tcp(c4, at(LAB_VIP, 443), TCP_SYN).bytes();
        let syn6 = tcp(c6, at(LAB_VIP6, 443), TCP_SYN).bytes();
        let eth = 14;

        let mut arp = syn4.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        cases.push(Case::new("ARP", &arp, XDP_PASS, Counter::PassNotIp));
        cases.push(Case::new(
            "Ethernet header only",
            &syn4[..eth],
            XDP_PASS,
            Counter::PassMalformed,
        ));
        let tagged = Frame {
            vlan: Some(100),
            ..tcp(c4, at(LAB_VIP, 443), TCP_SYN)
        }
        .bytes();
        let mut double = tagged.clone();
        double[16..18].copy_from_slice(&[0x81, 0x00]);
        cases.push(Case::new(
            "two VLAN tags",
            &double,
            XDP_PASS,
            Counter::PassVlanStacked,
        ));
        cases.push(Case::new(
            "VLAN tag cut short",
            &tagged[..eth + 2],
            XDP_PASS,
            Counter::PassMalformed,
        ));

        cases.push(Case::new(
            "IPv6 header cut short",
            &syn6[..eth + 30],
            XDP_PASS,
            Counter::PassMalformed,
        ));
        let mut bad_version = syn6.clone();
        bad_version[eth] = 0x40;
        cases.push(Case::new(
            "IPv6 ethertype, version 4",
            &bad_version,
            XDP_PASS,
            Counter::PassMalformed,
        ));
        cases.push(Case::new(
            "IPv6 TCP to a VIP cut short",
            &syn6[..eth + 40 + 10],
            XDP_DROP,
            Counter::DropMalformed,
        ));
        let udp4 = udp(c4, at(LAB_VIP, 3478)).bytes();
        cases.push(Case::new(
            "UDP to a VIP cut short",
            &udp4[..eth + 20 + 6],
            XDP_DROP,
            Counter::DropMalformed,
        ));
        let icmp = Frame::new(c4, at(LAB_VIP, 0), Transport::EchoRequest).bytes();
        cases.push(Case::new(
            "ICMP to a VIP cut short",
            &icmp[..eth + 20 + 4],
            XDP_DROP,
            Counter::DropMalformed,
        ));
        let other = Frame::new(c6, at(LAB_VIP6, 0), Transport::Other(253)).bytes();
        cases.push(Case::new(
            "IPv6, unknown protocol",
            &other,
            XDP_PASS,
            Counter::PassNotService,
        ));
        let icmp_in_v6 = Frame::new(c6, at(LAB_VIP6, 0), Transport::Other(1)).bytes();
        cases.push(Case::new(
            "ICMPv4 inside IPv6",
            &icmp_in_v6,
            XDP_PASS,
            Counter::PassNotService,
        ));

        let routed = Frame {
            extensions: vec![(43, vec![0, 1, 0, 0, 0, 0])],
            ..tcp(c6, at(LAB_VIP6, 443), TCP_SYN)
        };
        cases.push(Case::new(
            "routing header, segments left 1",
            &routed.bytes(),
            XDP_DROP,
            Counter::DropIpv6Extension,
        ));
        let esp = Frame {
            extensions: vec![(50, vec![0; 6])],
            ..tcp(c6, at(LAB_VIP6, 443), TCP_SYN)
        };
        cases.push(Case::new(
            "ESP header",
            &esp.bytes(),
            XDP_DROP,
            Counter::DropIpv6Extension,
        ));
        let five = Frame {
            extensions: vec![(60, vec![0; 6]); 5],
            ..tcp(c6, at(LAB_VIP6, 443), TCP_SYN)
        };
        cases.push(Case::new(
            "five destination-options headers",
            &five.bytes(),
            XDP_DROP,
            Counter::DropIpv6Extension,
        ));
        let five_elsewhere = Frame {
            extensions: vec![(60, vec![0; 6]); 5],
            ..tcp(c6, at(LAB_CLIENT6, 443), TCP_SYN)
        };
        cases.push(Case::new(
            "five headers, not for a VIP",
            &five_elsewhere.bytes(),
            XDP_PASS,
            Counter::PassNotService,
        ));
        let ext_cut = Frame {
            extensions: vec![(60, vec![0; 14])],
            ..tcp(c6, at(LAB_VIP6, 443), TCP_SYN)
        }
        .bytes();
        cases.push(Case::new(
            "extension header cut short",
            &ext_cut[..eth + 40 + 2],
            XDP_DROP,
            Counter::DropMalformed,
        ));

        let lone = Fragment {
            id: 77,
            offset: 3,
            more: false,
        };
        let later4 = Frame {
            fragment: Some(lone),
            ..udp(c4, at(LAB_VIP, 3478))
        };
        cases.push(Case::new(
            "IPv4 later fragment without its first",
            &later4.bytes(),
            XDP_DROP,
            Counter::DropFragmentUnknown,
        ));
        let later6 = Frame {
            fragment: Some(lone),
            ..udp(c6, at(LAB_VIP6, 3478))
        };
        cases.push(Case::new(
            "IPv6 later fragment without its first",
            &later6.bytes(),
            XDP_DROP,
            Counter::DropFragmentUnknown,
        ));
        let later_elsewhere = Frame {
            fragment: Some(lone),
            ..udp(c4, at(LAB_BACKEND, 3478))
        };
        cases.push(Case::new(
            "later fragment, not for a VIP",
            &later_elsewhere.bytes(),
            XDP_PASS,
            Counter::PassNotService,
        ));

        let dying6 = Frame {
            ttl: 1,
            ..tcp(c6, at(LAB_VIP6, 443), TCP_SYN)
        };
        cases.push(Case::new(
            "IPv6 hop limit 1",
            &dying6.bytes(),
            XDP_PASS,
            Counter::PassTtlExpired,
        ));
        cases.push(Case::new(
            "UDP to a port without a service",
            &udp(c4, at(LAB_VIP, 53)).bytes(),
            XDP_PASS,
            Counter::PassNotService,
        ));
        let ack6 = tcp(at(LAB_CLIENT6, 40001), at(LAB_VIP6, 443), TCP_ACK);
        cases.push(Case::new(
            "IPv6 ACK without a flow",
            &ack6.bytes(),
            XDP_DROP,
            Counter::DropTcpNoFlow,
        ));
        cases.push(Case::new(
            "service without servers",
            &tcp(c4, at(LAB_VIP, 8443), TCP_SYN).bytes(),
            XDP_DROP,
            Counter::DropNoBackend,
        ));
        cases.push(Case::new(
            "server without a route",
            &tcp(c4, at(LAB_VIP, 9001), TCP_SYN).bytes(),
            XDP_DROP,
            Counter::DropNoRoute,
        ));
        cases.push(Case::new(
            "server neighbour unresolved",
            &tcp(c4, at(LAB_VIP, 9002), TCP_SYN).bytes(),
            XDP_PASS,
            Counter::PassNoNeigh,
        ));
        cases.push(Case::new(
            "server behind an interface without lb",
            &tcp(c4, at(LAB_VIP, 9003), TCP_SYN).bytes(),
            XDP_PASS,
            Counter::PassEgressNotAttached,
        ));
        // 1,600 bytes of IP on a 1,500-byte path (lb cannot send "fragmentation needed").
        let big_sender = at(LAB_CLIENT, 40999);
        let syn = tcp(big_sender, at(LAB_VIP, 443), TCP_SYN);
        let server_side = translated(lab, "SYN", &syn)?;
        translated(
            lab,
            "SYN-ACK",
            &tcp(server_side.dst, server_side.src, TCP_SYN | TCP_ACK),
        )?;
        let data = Frame {
            payload: vec![0; 1560],
            ..tcp(big_sender, at(LAB_VIP, 443), TCP_ACK)
        };
        cases.push(Case::new(
            "larger than the egress MTU",
            &data.bytes(),
            XDP_DROP,
            Counter::DropOverMtu,
        ));

        // IPv4 headers that cannot be read, and IPv4 packets lb leaves alone.
        cases.push(Case::new(
            "IPv4 header cut short",
            &syn4[..eth + 12],
            XDP_PASS,
            Counter::PassMalformed,
        ));
        let mut short_ihl = syn4.clone();
        short_ihl[eth] = 0x44;
        cases.push(Case::new(
            "IPv4 IHL below 5",
            &short_ihl,
            XDP_PASS,
            Counter::PassMalformed,
        ));
        let mut version6 = syn4.clone();
        version6[eth] = 0x65;
        cases.push(Case::new(
            "IPv4 ethertype, version 6",
            &version6,
            XDP_PASS,
            Counter::PassMalformed,
        ));
        cases.push(Case::new(
            "IPv4 TCP to a VIP cut short",
            &syn4[..eth + 20 + 10],
            XDP_DROP,
            Counter::DropMalformed,
        ));
        let foreign = tcp(c4, at(Ipv4Addr::new(10, 9, 9, 9), 443), TCP_SYN).bytes();
        cases.push(Case::new(
            "TCP to a non-VIP address",
            &foreign,
            XDP_PASS,
            Counter::PassNotService,
        ));
        // Not lb's address: it leaves before its transport header is looked at.
        cases.push(Case::new(
            "TCP to a non-VIP address cut short",
            &foreign[..eth + 20 + 4],
            XDP_PASS,
            Counter::PassNotService,
        ));
        cases.push(Case::new(
            "TCP to a VIP port without a service",
            &tcp(c4, at(LAB_VIP, 80), TCP_SYN).bytes(),
            XDP_PASS,
            Counter::PassNotService,
        ));
        cases.push(Case::new(
            "IPv4 ACK without a flow",
            &tcp(at(LAB_CLIENT, 40001), at(LAB_VIP, 443), TCP_ACK).bytes(),
            XDP_DROP,
            Counter::DropTcpNoFlow,
        ));
        let dying4 = Frame {
            ttl: 1,
            ..tcp(at(LAB_CLIENT, 40002), at(LAB_VIP, 443), TCP_SYN)
        };
        cases.push(Case::new(
            "IPv4 TTL 1",
            &dying4.bytes(),
            XDP_PASS,
            Counter::PassTtlExpired,
        ));
        run_table(lab, cases)?;
        let passed = lab.run(&foreign)?;
        ensure!(passed.output == foreign, "a non-VIP frame was modified");
        Ok(())
    })
}

#[test]
fn icmp_echo_to_a_vip_is_answered_and_other_icmp_goes_to_the_kernel() -> Result<()> {
    in_lab(|lab| {
        for (client, vip, reply_type) in [
            (IpAddr::from(LAB_CLIENT), IpAddr::from(LAB_VIP), 0),
            (LAB_CLIENT6.into(), LAB_VIP6.into(), 129),
        ] {
            let request = Frame::new(at(client, 0), at(vip, 0), Transport::EchoRequest);
            let out = lab.expect("echo request", &request.bytes(), XDP_TX, Counter::Tx)?;
            let seen = verify_frame(&out.output)?;
            ensure!(
                seen.src.ip() == vip && seen.dst.ip() == client,
                "reply {seen:?}"
            );
            ensure!(
                seen.first_transport_byte == reply_type && seen.ttl == 64,
                "reply {seen:?}"
            );
            ensure!(
                seen.dst_mac == CLIENT_MAC,
                "reply goes back to the sender's MAC: {seen:?}"
            );
        }
        let timestamp = Frame {
            payload: vec![13, 0, 0, 0, 0, 0, 0, 0],
            ..Frame::new(at(LAB_CLIENT, 0), at(LAB_VIP, 0), Transport::Other(1))
        };
        lab.expect(
            "ICMP timestamp request",
            &timestamp.bytes(),
            XDP_PASS,
            Counter::PassIcmp,
        )?;
        let to_server = Frame::new(
            at(LAB_CLIENT, 0),
            at(LAB_BACKEND, 0),
            Transport::EchoRequest,
        );
        lab.expect(
            "echo request to a non-VIP",
            &to_server.bytes(),
            XDP_PASS,
            Counter::PassNotService,
        )?;
        Ok(())
    })
}

/// SYN, SYN-ACK, ACK through one family: rewritten both ways with valid checksums, and the
/// ACK confirms the flow.
fn handshake(
    lab: &PacketLab,
    client: SocketAddr,
    vip: SocketAddr,
    snat: IpAddr,
    backend: SocketAddr,
    frame: impl Fn(Frame) -> Frame,
) -> Result<()> {
    let out = translated(
        lab,
        &format!("SYN to {vip}"),
        &frame(tcp(client, vip, TCP_SYN)),
    )?;
    ensure!(
        out.src.ip() == snat && out.dst == backend && out.ttl == 63,
        "SYN became {out:?}"
    );
    ensure!(
        out.dst_mac == LAB_BACKEND_MAC,
        "SYN to MAC {:02x?}",
        out.dst_mac
    );
    let back = translated(lab, "SYN-ACK", &tcp(backend, out.src, TCP_SYN | TCP_ACK))?;
    ensure!(
        back.src == vip && back.dst == client,
        "SYN-ACK became {back:?}"
    );
    ensure!(
        back.dst_mac == LAB_CLIENT_NEXT_HOP_MAC,
        "SYN-ACK to MAC {:02x?}",
        back.dst_mac
    );
    let confirmed = counter(lab, Counter::FlowsConfirmed)?;
    let ack = Frame {
        payload: b"GET / HTTP/1.1\r\n\r\n!".to_vec(),
        ..frame(tcp(client, vip, TCP_ACK))
    };
    let data = translated(lab, "ACK with data", &ack)?;
    ensure!(
        data.src == out.src && data.dst == backend,
        "data went to {data:?}, SYN to {out:?}"
    );
    ensure!(
        counter(lab, Counter::FlowsConfirmed)? == confirmed + 1,
        "the ACK did not confirm the flow"
    );
    Ok(())
}

fn counter(lab: &PacketLab, which: Counter) -> Result<u64> {
    Ok(lab
        .dp
        .counters()?
        .into_iter()
        .find(|(c, _)| *c == which)
        .map_or(0, |(_, v)| v))
}

#[test]
fn tcp_and_udp_are_translated_in_both_families() -> Result<()> {
    in_lab(|lab| {
        handshake(
            lab,
            at(LAB_CLIENT, 41000),
            at(LAB_VIP, 443),
            LAB_SNAT.into(),
            at(LAB_BACKEND, 4443),
            |f| f,
        )?;
        handshake(
            lab,
            at(LAB_CLIENT6, 41000),
            at(LAB_VIP6, 443),
            LAB_SNAT6.into(),
            at(LAB_BACKEND6, 4443),
            |f| f,
        )?;
        // Hop-by-hop and destination options in front of TCP are skipped and kept.
        let with_options = |f: Frame| Frame {
            extensions: vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![1, 4, 0, 0, 0, 0])],
            ..f
        };
        handshake(
            lab,
            at(LAB_CLIENT6, 41001),
            at(LAB_VIP6, 443),
            LAB_SNAT6.into(),
            at(LAB_BACKEND6, 4443),
            with_options,
        )?;

        for (client, vip, snat, backend) in [
            (
                at(LAB_CLIENT, 42000),
                at(LAB_VIP, 3478),
                IpAddr::from(LAB_SNAT),
                at(LAB_BACKEND, 3478),
            ),
            (
                at(LAB_CLIENT6, 42000),
                at(LAB_VIP6, 3478),
                LAB_SNAT6.into(),
                at(LAB_BACKEND6, 3478),
            ),
        ] {
            let out = translated(lab, "UDP request", &udp(client, vip))?;
            ensure!(
                out.src.ip() == snat && out.dst == backend,
                "UDP became {out:?}"
            );
            let confirmed = counter(lab, Counter::FlowsConfirmed)?;
            let back = translated(lab, "UDP reply", &udp(backend, out.src))?;
            ensure!(
                back.src == vip && back.dst == client,
                "UDP reply became {back:?}"
            );
            ensure!(
                counter(lab, Counter::FlowsConfirmed)? == confirmed + 1,
                "the reply did not confirm the flow"
            );
            let again = translated(lab, "second UDP request", &udp(client, vip))?;
            ensure!(
                again.src == out.src,
                "same flow, same SNAT port: {again:?} vs {out:?}"
            );
        }
        // IPv4 UDP without a checksum stays without one.
        let bare = Frame::new(
            at(LAB_CLIENT, 42001),
            at(LAB_VIP, 3478),
            Transport::Udp { no_checksum: true },
        );
        let out = lab.expect("UDP without checksum", &bare.bytes(), XDP_TX, Counter::Tx)?;
        ensure!(
            out.output[14 + 20 + 6..14 + 20 + 8] == [0, 0],
            "checksum 0 must stay 0"
        );
        verify_frame(&out.output)?;
        Ok(())
    })
}

#[test]
fn later_fragments_follow_their_first_fragment() -> Result<()> {
    in_lab(|lab| {
        for (client, vip, backend) in [
            (
                at(LAB_CLIENT, 43000),
                at(LAB_VIP, 3478),
                at(LAB_BACKEND, 3478),
            ),
            (
                at(LAB_CLIENT6, 43000),
                at(LAB_VIP6, 3478),
                at(LAB_BACKEND6, 3478),
            ),
        ] {
            let datagram = Frame {
                payload: vec![0x5a; 100],
                ..udp(client, vip)
            };
            let first = Frame {
                fragment: Some(Fragment {
                    id: 4242,
                    offset: 0,
                    more: true,
                }),
                ..datagram.clone()
            };
            let rest = Frame {
                fragment: Some(Fragment {
                    id: 4242,
                    offset: (FIRST_FRAGMENT_BYTES / 8) as u16,
                    more: false,
                }),
                ..datagram.clone()
            };
            let tracked = counter(lab, Counter::FragmentsTracked)?;
            let out1 = translated(lab, "first fragment", &first)?;
            ensure!(out1.dst == backend, "first fragment went to {out1:?}");
            ensure!(
                counter(lab, Counter::FragmentsTracked)? == tracked + 1,
                "first fragment not tracked"
            );
            let out2 = translated(lab, "later fragment", &rest)?;
            ensure!(
                out2.src.ip() == out1.src.ip() && out2.dst.ip() == backend.ip(),
                "later fragment went {out2:?}"
            );
            // Reassembled, the two rewritten fragments must carry a valid UDP checksum.
            let reassembled = reassemble(
                &out1,
                &lab.run(&first.bytes())?.output,
                &lab.run(&rest.bytes())?.output,
            )?;
            ensure!(reassembled, "reassembled datagram has a bad checksum");
        }
        Ok(())
    })
}

/// Joins the transport bytes of two rewritten fragments and checks the UDP checksum of the
/// whole datagram over the rewritten addresses.
fn reassemble(seen: &Seen, first: &[u8], rest: &[u8]) -> Result<bool> {
    let transport = |frame: &[u8]| -> Vec<u8> {
        if seen.src.is_ipv4() {
            frame[14 + 20..].to_vec()
        } else {
            frame[14 + 40 + 8..].to_vec()
        }
    };
    let mut l4 = transport(first);
    l4.extend_from_slice(&transport(rest));
    let pseudo = harness::packet::pseudo_header(
        seen.src.ip(),
        seen.dst.ip(),
        harness::packet::PROTO_UDP,
        l4.len(),
    );
    Ok(harness::packet::internet_checksum(&[&pseudo, &l4]) == 0)
}

/// This kernel has no 802.1Q devices, so the VLAN map is written by hand: first empty (the
/// route leaves untagged: the tag is popped), then with `t0` itself standing for a VLAN
/// device of VLAN 200 on `t0` (the tag is pushed, or rewritten keeping its priority bits).
#[test]
fn vlan_tags_are_popped_pushed_and_rewritten() -> Result<()> {
    in_lab(|lab| {
        let tagged = |client: u16, vid: u16| Frame {
            vlan: Some(vid),
            ..tcp(at(LAB_CLIENT, client), at(LAB_VIP, 443), TCP_SYN)
        };
        let out = translated(lab, "tagged SYN, untagged route", &tagged(44000, 100))?;
        ensure!(
            out.vlan.is_none() && out.dst == at(LAB_BACKEND, 4443),
            "{out:?}"
        );

        let ifindex = lab.ingress;
        lab.dp.set_vlans(&[(
            ifindex,
            VlanPort {
                lower_ifindex: ifindex,
                vid: 200,
                _pad: 0,
            },
        )])?;
        let out = translated(
            lab,
            "untagged SYN, VLAN route",
            &Frame {
                vlan: None,
                ..tagged(44001, 0)
            },
        )?;
        ensure!(
            out.vlan == Some(200) && out.dst == at(LAB_BACKEND, 4443),
            "{out:?}"
        );
        let priority_tag = (5 << 13) | 100;
        let frame = tagged(44002, priority_tag).bytes();
        let result = lab.expect("tagged SYN, other VLAN route", &frame, XDP_TX, Counter::Tx)?;
        let out = verify_frame(&result.output)?;
        ensure!(out.vlan == Some(200), "{out:?}");
        ensure!(
            result.output[14] >> 5 == 5,
            "priority bits lost: {:#04x}",
            result.output[14]
        );
        Ok(())
    })
}

/// An ICMP error from `from` to `to` quoting `quote` (an IP packet, cut as the sender chose).
fn icmp_error(from: IpAddr, to: IpAddr, kind: u8, code: u8, info: u32, quote: &[u8]) -> Frame {
    Frame {
        payload: quote.to_vec(),
        ..Frame::new(
            at(from, 0),
            at(to, 0),
            Transport::IcmpError { kind, code, info },
        )
    }
}

/// The translated error must quote the original packet as it reached lb: the same bytes
/// but for the hop lb took off (and, for IPv4, the header checksum, which must be valid).
fn check_quote(what: &str, output: &[u8], original_frame: &[u8], quoted: usize) -> Result<()> {
    let original = &original_frame[ETH_LEN..ETH_LEN + quoted];
    let v4 = original[0] >> 4 == 4;
    let outer = if v4 { 20 } else { 40 };
    let quote = &output[ETH_LEN + outer + 8..];
    ensure!(
        quote.len() == quoted,
        "{what}: quote is {} bytes",
        quote.len()
    );
    let (hop_limit, header_check) = if v4 { (8, 10..12) } else { (7, 0..0) };
    for (i, (&got, &want)) in quote.iter().zip(original).enumerate() {
        if i != hop_limit && !header_check.contains(&i) {
            ensure!(
                got == want,
                "{what}: quote byte {i} is {got:#04x}, the original's {want:#04x}\n quote {quote:02x?}\n original {original:02x?}"
            );
        }
    }
    ensure!(
        quote[hop_limit] == original[hop_limit] - 1,
        "{what}: quoted hop limit"
    );
    if v4 {
        ensure!(
            internet_checksum(&[&quote[..20]]) == 0,
            "{what}: quoted IPv4 header checksum"
        );
    }
    Ok(())
}

/// Path-MTU discovery and "unreachable" through the full NAT: errors about a flow, from
/// either side, reach the other side's end with the quote translated back; errors about
/// no flow go to the kernel.
#[test]
fn icmp_errors_about_a_flow_are_translated() -> Result<()> {
    in_lab(|lab| {
        // (family name, client, VIP, server-side router, client-side router, ICMP types:
        // fragmentation needed / packet too big, port unreachable, time exceeded)
        let families = [
            (
                "IPv4",
                IpAddr::from(LAB_CLIENT),
                IpAddr::from(LAB_VIP),
                IpAddr::from([10, 2, 0, 254]),
                IpAddr::from([10, 1, 0, 254]),
                ((3, 4), (3, 3), (11, 0)),
            ),
            (
                "IPv6",
                LAB_CLIENT6.into(),
                LAB_VIP6.into(),
                "fd00:2::fe".parse()?,
                "fd00:1::fe".parse()?,
                ((2, 0), (1, 4), (3, 0)),
            ),
        ];
        for (family, client, vip, server_router, client_router, types) in families {
            let ((too_big, too_big_code), (unreachable, port_code), (expired, expired_code)) =
                types;
            let errors_before = counter(lab, Counter::IcmpErrorsTranslated)?;

            // A router on the servers' side cannot pass the SYN on: the client hears it,
            // from the VIP, about the SYN it sent.
            let syn = tcp(at(client, 43000), at(vip, 443), TCP_SYN).bytes();
            let out = lab.expect("SYN", &syn, XDP_TX, Counter::Tx)?.output;
            let out_seen = verify_frame(&out)?;
            let quote_len = out.len() - ETH_LEN;
            let error = icmp_error(
                server_router,
                out_seen.src.ip(),
                too_big,
                too_big_code,
                1400,
                &out[ETH_LEN..],
            );
            let what = format!("{family} packet too big for the SYN");
            let seen = translated(lab, &what, &error)?;
            ensure!(
                seen.src.ip() == vip && seen.dst.ip() == client && seen.ttl == 63,
                "{what}: became {seen:?}"
            );
            ensure!(seen.first_transport_byte == too_big, "{what}: {seen:?}");
            let output = lab.run(&error.bytes())?.output;
            check_quote(&what, &output, &syn, quote_len)?;

            // Only the first 8 transport bytes quoted (no TCP checksum): still translated.
            let short = icmp_error(
                server_router,
                out_seen.src.ip(),
                too_big,
                too_big_code,
                1400,
                &out[ETH_LEN..out.len() - 12],
            );
            let output = lab.expect("short quote", &short.bytes(), XDP_TX, Counter::Tx)?;
            verify_frame(&output.output)?;
            check_quote("short quote", &output.output, &syn, quote_len - 12)?;

            // A router on the client's side drops the SYN-ACK: the server hears it, from
            // the SNAT address, about the SYN-ACK it sent.
            let synack = tcp(out_seen.dst, out_seen.src, TCP_SYN | TCP_ACK).bytes();
            let back = lab.expect("SYN-ACK", &synack, XDP_TX, Counter::Tx)?.output;
            let error = icmp_error(
                client_router,
                vip,
                expired,
                expired_code,
                0,
                &back[ETH_LEN..],
            );
            let what = format!("{family} time exceeded for the SYN-ACK");
            let seen = translated(lab, &what, &error)?;
            ensure!(
                seen.src.ip() == out_seen.src.ip() && seen.dst.ip() == out_seen.dst.ip(),
                "{what}: became {seen:?}, the flow is {out_seen:?}"
            );
            check_quote(
                &what,
                &lab.run(&error.bytes())?.output,
                &synack,
                back.len() - ETH_LEN,
            )?;

            // A server without the UDP port: "port unreachable" reaches the client.
            let request = udp(at(client, 43001), at(vip, 3478)).bytes();
            let out = lab.expect("UDP", &request, XDP_TX, Counter::Tx)?.output;
            let out_seen = verify_frame(&out)?;
            let error = icmp_error(
                out_seen.dst.ip(),
                out_seen.src.ip(),
                unreachable,
                port_code,
                0,
                &out[ETH_LEN..],
            );
            let what = format!("{family} port unreachable");
            let seen = translated(lab, &what, &error)?;
            ensure!(
                seen.src.ip() == vip && seen.dst.ip() == client,
                "{what}: {seen:?}"
            );
            check_quote(
                &what,
                &lab.run(&error.bytes())?.output,
                &request,
                out.len() - ETH_LEN,
            )?;

            ensure!(
                counter(lab, Counter::IcmpErrorsTranslated)? == errors_before + 7,
                "{family}: icmp_errors_translated"
            );

            // About a flow lb does not have, or not sent to the quoted source: the kernel's.
            let unknown = tcp(at(client, 43999), at(vip, 443), TCP_SYN).bytes();
            let stray = icmp_error(
                server_router,
                vip,
                unreachable,
                port_code,
                0,
                &unknown[ETH_LEN..],
            );
            lab.expect(
                "error about no flow",
                &stray.bytes(),
                XDP_PASS,
                Counter::PassIcmp,
            )?;
            let misaddressed = icmp_error(
                server_router,
                client,
                unreachable,
                port_code,
                0,
                &out[ETH_LEN..],
            );
            lab.expect(
                "error not sent to the quoted source",
                &misaddressed.bytes(),
                XDP_PASS,
                // Not addressed to lb at all: it leaves before the ICMP header is read.
                Counter::PassNotService,
            )?;
        }
        Ok(())
    })
}

/// One packet of a fixture table: what it is, where it comes from, and what lb must do
/// with it (the action and the one verdict counter it moves).
struct Case {
    what: &'static str,
    frame: Vec<u8>,
    /// Arrives on the lab's other interface (`t1`) instead of `t0`.
    other_side: bool,
    action: u32,
    counter: Counter,
}

impl Case {
    /// A case arriving on the lab's client side (`t0`).
    fn new(what: &'static str, frame: &[u8], action: u32, counter: Counter) -> Self {
        Self {
            what,
            frame: frame.to_vec(),
            other_side: false,
            action,
            counter,
        }
    }
}

/// Runs every case and reports all the failures at once, each by name.
fn run_table(lab: &mut PacketLab, cases: Vec<Case>) -> Result<()> {
    let home = lab.ingress;
    let other = lb::dataplane::ifindex("t1")?;
    let mut failures = Vec::new();
    for case in cases {
        lab.ingress = if case.other_side { other } else { home };
        if let Err(e) = lab.expect(case.what, &case.frame, case.action, case.counter) {
            failures.push(format!("{e:#}"));
        }
    }
    lab.ingress = home;
    ensure!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

fn with_seq(frame: Frame, seq: u32, ack: u32) -> Frame {
    Frame { seq, ack, ..frame }
}

/// A sender who never sees the traffic cannot confirm a flow, close one, or speak for the
/// other side; lengths that disagree with the frame are dropped (issue: data plane).
#[test]
fn blind_spoofers_confirm_close_and_cross_nothing() -> Result<()> {
    in_lab(|lab| {
        let vip = at(LAB_VIP, 443);
        let backend = at(LAB_BACKEND, 4443);
        // A half-open flow whose SYN-ACK has been seen, and an established one.
        let half = at(LAB_CLIENT, 43000);
        let syn = translated(lab, "SYN (half-open)", &tcp(half, vip, TCP_SYN))?;
        let half_server = syn.src;
        translated(
            lab,
            "SYN-ACK (half-open)",
            &tcp(backend, half_server, TCP_SYN | TCP_ACK),
        )?;
        let live = at(LAB_CLIENT, 43001);
        let syn = translated(lab, "SYN (live)", &tcp(live, vip, TCP_SYN))?;
        let live_server = syn.src;
        translated(
            lab,
            "SYN-ACK (live)",
            &tcp(backend, live_server, TCP_SYN | TCP_ACK),
        )?;
        translated(lab, "handshake ACK (live)", &tcp(live, vip, TCP_ACK))?;
        let isn = harness::packet::DEFAULT_ISN;
        let blind = 0x7654_3210;
        let unacked = at(LAB_CLIENT, 43002);
        translated(lab, "SYN (no SYN-ACK yet)", &tcp(unacked, vip, TCP_SYN))?;

        let mut cases = vec![
            Case {
                what: "bare ACK before any SYN-ACK",
                frame: tcp(unacked, vip, TCP_ACK).bytes(),
                other_side: false,
                action: XDP_DROP,
                counter: Counter::DropTcpBadAck,
            },
            Case {
                what: "ACK that does not acknowledge the SYN-ACK",
                frame: with_seq(tcp(half, vip, TCP_ACK), isn + 1, blind).bytes(),
                other_side: false,
                action: XDP_DROP,
                counter: Counter::DropTcpBadAck,
            },
            Case {
                what: "SYN-ACK that does not acknowledge the SYN",
                frame: with_seq(tcp(backend, half_server, TCP_SYN | TCP_ACK), isn, blind).bytes(),
                other_side: false,
                action: XDP_DROP,
                counter: Counter::DropTcpBadAck,
            },
            Case {
                what: "blind RST on a live flow",
                frame: with_seq(tcp(live, vip, TCP_RST), blind, 0).bytes(),
                other_side: false,
                action: XDP_DROP,
                counter: Counter::DropTcpOutOfWindow,
            },
            Case {
                what: "blind FIN on a live flow",
                frame: with_seq(tcp(live, vip, TCP_FIN | TCP_ACK), blind, isn + 1).bytes(),
                other_side: false,
                action: XDP_DROP,
                counter: Counter::DropTcpOutOfWindow,
            },
            Case {
                what: "blind server RST on a live flow",
                frame: with_seq(tcp(backend, live_server, TCP_RST), blind, 0).bytes(),
                other_side: false,
                action: XDP_DROP,
                counter: Counter::DropTcpOutOfWindow,
            },
            Case {
                what: "server's packet arriving from the client side",
                frame: tcp(backend, live_server, TCP_RST | TCP_ACK).bytes(),
                other_side: true,
                action: XDP_DROP,
                counter: Counter::DropWrongSide,
            },
            Case {
                what: "client's packet arriving from the server side",
                frame: tcp(live, vip, TCP_ACK).bytes(),
                other_side: true,
                action: XDP_DROP,
                counter: Counter::DropWrongSide,
            },
            Case {
                what: "in-window RST from the client",
                frame: with_seq(tcp(live, vip, TCP_RST), isn + 1, 0).bytes(),
                other_side: false,
                action: XDP_TX,
                counter: Counter::Tx,
            },
        ];
        // Lengths that disagree with the headers or the frame, on every way in.
        let good = tcp(at(LAB_CLIENT, 43003), vip, TCP_SYN).bytes();
        let ip = ETH_LEN;
        let mut short_total = good.clone();
        short_total[ip + 2..ip + 4].copy_from_slice(&19u16.to_be_bytes());
        let mut long_total = good.clone();
        long_total[ip + 2..ip + 4].copy_from_slice(&((good.len() - ip + 1) as u16).to_be_bytes());
        let mut small_offset = good.clone();
        small_offset[ip + 20 + 12] = 4 << 4;
        let mut large_offset = good.clone();
        large_offset[ip + 20 + 12] = 15 << 4;
        let good6 = tcp(at(LAB_CLIENT6, 43003), at(LAB_VIP6, 443), TCP_SYN).bytes();
        let mut long_payload6 = good6.clone();
        long_payload6[ip + 4..ip + 6]
            .copy_from_slice(&((good6.len() - ip - 40 + 1) as u16).to_be_bytes());
        let good_udp = udp(at(LAB_CLIENT, 43004), at(LAB_VIP, 3478)).bytes();
        let mut long_udp = good_udp.clone();
        long_udp[ip + 20 + 4..ip + 20 + 6]
            .copy_from_slice(&((good_udp.len() - ip - 20 + 1) as u16).to_be_bytes());
        for (what, bytes) in [
            ("IPv4 total length shorter than its header", short_total),
            ("IPv4 total length beyond the frame", long_total),
            ("TCP data offset below 5", small_offset),
            ("TCP data offset beyond the segment", large_offset),
            ("IPv6 payload length beyond the frame", long_payload6),
            ("UDP length beyond the datagram", long_udp),
        ] {
            cases.push(Case {
                what,
                frame: bytes,
                other_side: false,
                action: XDP_DROP,
                counter: Counter::DropMalformed,
            });
        }
        run_table(lab, cases)?;
        // The rejected packets changed nothing: the half-open flow confirms with the right
        // ACK, and the live flow (closed only by the in-window RST) was never touched by
        // the blind ones.
        let confirmed = counter(lab, Counter::FlowsConfirmed)?;
        translated(lab, "the real handshake ACK", &tcp(half, vip, TCP_ACK))?;
        ensure!(
            counter(lab, Counter::FlowsConfirmed)? == confirmed + 1,
            "the real ACK did not confirm"
        );
        Ok(())
    })
}

/// A service's `allow` / `deny` lists decide who may open a flow (the longest matching
/// prefix; no match refuses only where there are allows), refusals count per service, and
/// services without lists are untouched.
#[test]
fn source_lists_refuse_new_flows_per_service() -> Result<()> {
    in_lab(|lab| {
        let refused_v4: IpAddr = "10.1.9.1".parse()?;
        let outside: IpAddr = "11.0.0.5".parse()?;
        let outside6: IpAddr = "fd00:9::1".parse()?;
        let denied_one: IpAddr = "10.1.9.9".parse()?;
        let cases = vec![
            Case::new(
                "allowed prefix",
                &tcp(at(LAB_CLIENT, 44000), at(LAB_VIP, 9010), TCP_SYN).bytes(),
                XDP_TX,
                Counter::Tx,
            ),
            Case::new(
                "longer deny inside the allow",
                &tcp(at(refused_v4, 44000), at(LAB_VIP, 9010), TCP_SYN).bytes(),
                XDP_DROP,
                Counter::DropSourceRefused,
            ),
            Case::new(
                "in no allowed prefix",
                &tcp(at(outside, 44000), at(LAB_VIP, 9010), TCP_SYN).bytes(),
                XDP_DROP,
                Counter::DropSourceRefused,
            ),
            Case::new(
                "IPv6 allowed prefix",
                &tcp(at(LAB_CLIENT6, 44000), at(LAB_VIP6, 9010), TCP_SYN).bytes(),
                XDP_TX,
                Counter::Tx,
            ),
            Case::new(
                "IPv6 in no allowed prefix",
                &tcp(at(outside6, 44000), at(LAB_VIP6, 9010), TCP_SYN).bytes(),
                XDP_DROP,
                Counter::DropSourceRefused,
            ),
            Case::new(
                "UDP from the denied host",
                &udp(at(denied_one, 44000), at(LAB_VIP, 9011)).bytes(),
                XDP_DROP,
                Counter::DropSourceRefused,
            ),
            Case::new(
                "UDP from a host no list names",
                &udp(at(refused_v4, 44001), at(LAB_VIP, 9011)).bytes(),
                XDP_TX,
                Counter::Tx,
            ),
            Case::new(
                "a service without lists",
                &tcp(at(outside, 44000), at(LAB_VIP, 443), TCP_SYN).bytes(),
                XDP_TX,
                Counter::Tx,
            ),
        ];
        run_table(lab, cases)?;
        let refused_by_port = |port: u16, family: u8| -> Result<u64> {
            let (_, service) = lab
                .dp
                .installed_services()
                .into_iter()
                .find(|(k, _)| u16::from_be(k.port_be) == port && k.family == family)
                .ok_or_else(|| anyhow::anyhow!("no service on port {port}"))?;
            lab.dp.reader().service_refused(service.id)
        };
        for (port, family, expected) in [(9010, 4, 2), (9010, 6, 1), (9011, 4, 1), (443, 4, 0)] {
            let refused = refused_by_port(port, family)?;
            ensure!(
                refused == expected,
                "port {port} IPv{family}: {refused} refused flows, expected {expected}"
            );
        }
        Ok(())
    })
}
