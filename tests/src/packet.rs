//! Frames for packet-level tests, built and checked with `etherparse`: an implementation of
//! the checksums independent of lb's own incremental updates.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{ensure, Context, Result};
use aya::programs::{TestRun, TestRunOptions, TestRunResult, Xdp};
use etherparse::{IpFragOffset, IpNumber, Ipv4Header, TcpHeader};

use crate::netns::{unique_prefix, Netns};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_VLAN: [u8; 2] = [0x81, 0x00];
pub const ETH_LEN: usize = 14;

#[derive(Debug, Clone)]
pub struct TcpFrame {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub syn: bool,
    pub ack: bool,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    pub more_fragments: bool,
    pub fragment_offset: u16,
    pub vlan: Option<u16>,
    pub payload: Vec<u8>,
}

impl TcpFrame {
    pub fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            src,
            dst,
            syn: true,
            ack: false,
            ttl: 64,
            ip_options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            vlan: None,
            payload: Vec::new(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), 0x1000_0000, 64240);
        tcp.syn = self.syn;
        tcp.ack = self.ack;
        if self.ack {
            tcp.acknowledgment_number = 0x2000_0001;
        }
        let mut ip = Ipv4Header::new(
            (tcp.header_len() + self.payload.len()) as u16,
            self.ttl,
            IpNumber::TCP,
            self.src.ip().octets(),
            self.dst.ip().octets(),
        )
        .expect("payload fits");
        ip.options = self
            .ip_options
            .as_slice()
            .try_into()
            .expect("options are a multiple of 4 bytes");
        ip.total_len = (ip.header_len() + tcp.header_len() + self.payload.len()) as u16;
        ip.more_fragments = self.more_fragments;
        ip.dont_fragment = !self.more_fragments && self.fragment_offset == 0;
        ip.fragment_offset = IpFragOffset::try_new(self.fragment_offset).expect("13-bit offset");
        ip.header_checksum = ip.calc_header_checksum();
        tcp.checksum = tcp
            .calc_checksum_ipv4(&ip, &self.payload)
            .expect("checksum");

        let mut frame = Vec::new();
        frame.extend_from_slice(&LB_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        if let Some(tag) = self.vlan {
            frame.extend_from_slice(&ETHERTYPE_VLAN);
            frame.extend_from_slice(&tag.to_be_bytes());
        }
        frame.extend_from_slice(&ETHERTYPE_IPV4);
        ip.write(&mut frame).expect("write IPv4");
        tcp.write(&mut frame).expect("write TCP");
        frame.extend_from_slice(&self.payload);
        frame
    }
}

/// An IPv4 TCP frame read back, with both checksums verified from scratch.
#[derive(Debug)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ip: Ipv4Header,
    pub tcp: TcpHeader,
}

pub fn parse_verified(frame: &[u8]) -> Result<Parsed> {
    ensure!(
        frame.len() > ETH_LEN && frame[12..14] == ETHERTYPE_IPV4,
        "not an IPv4 frame"
    );
    let (ip, rest) = Ipv4Header::from_slice(&frame[ETH_LEN..]).context("IPv4 header")?;
    let (tcp, payload) = TcpHeader::from_slice(rest).context("TCP header")?;
    ensure!(
        ip.header_checksum == ip.calc_header_checksum(),
        "bad IPv4 header checksum"
    );
    let expected = tcp.calc_checksum_ipv4(&ip, payload)?;
    ensure!(
        tcp.checksum == expected,
        "bad TCP checksum {:#06x}, expected {expected:#06x}",
        tcp.checksum
    );
    Ok(Parsed {
        dst_mac: frame[0..6].try_into()?,
        src_mac: frame[6..12].try_into()?,
        ip,
        tcp,
    })
}

// The packet lab: one interface, `t0`, behind which both the clients' and the servers'
// networks sit, with permanent neighbours so route lookups succeed deterministically and
// rewritten frames come back as XDP_TX.
pub const LAB_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const LAB_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
pub const LAB_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 11);
pub const LAB_SNAT: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 100);
pub const LAB_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
pub const LAB_CLIENT_NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x01];
pub const LAB_INTERFACE: &str = "t0";

/// Creates the packet lab namespace (see the constants above). Clients live in
/// 10.1.0.0/16, servers in 10.2.0.0/24.
pub fn lab_network() -> Result<Netns> {
    let ns = Netns::create(&format!("{}-pkt", unique_prefix()))?;
    ns.ip(&[
        "link",
        "add",
        LAB_INTERFACE,
        "type",
        "veth",
        "peer",
        "name",
        "t1",
    ])?;
    ns.ip(&["link", "set", LAB_INTERFACE, "up"])?;
    ns.ip(&["link", "set", "t1", "up"])?;
    ns.ip(&["addr", "add", "10.2.0.1/24", "dev", LAB_INTERFACE])?;
    ns.ip(&["addr", "add", "10.1.0.1/16", "dev", LAB_INTERFACE])?;
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    for (address, lladdr) in [
        (LAB_BACKEND, LAB_BACKEND_MAC),
        (LAB_CLIENT, LAB_CLIENT_NEXT_HOP_MAC),
    ] {
        ns.ip(&[
            "neigh",
            "add",
            &address.to_string(),
            "lladdr",
            &mac(lladdr),
            "dev",
            LAB_INTERFACE,
            "nud",
            "permanent",
        ])?;
    }
    ns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
    Ok(ns)
}

/// Runs `program` once on `frame` as if it arrived on `ingress` (BPF_PROG_TEST_RUN with
/// repeat = 1, so the program sees the original input, never its own output).
pub fn run_once(
    program: &Xdp,
    frame: &[u8],
    ingress: u32,
    output: &mut [u8],
) -> Result<TestRunResult> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. The kernel wants data_end == the frame length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress.to_ne_bytes());
    Ok(program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(output),
        ctx_in: Some(&ctx),
        ..TestRunOptions::default()
    })?)
}
