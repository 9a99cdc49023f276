//! Frames for packet-level tests: one builder (`Frame`) and one verifier (`verify_frame`),
//! both byte by byte with checksums from `internet_checksum`, which shares no code with
//! lb's own incremental updates.
use std::net::Ipv4Addr;

use anyhow::{ensure, Context, Result};
use aya::programs::{TestRun, TestRunOptions, TestRunResult, Xdp};

use crate::netns::{unique_prefix, Netns};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_VLAN: [u8; 2] = [0x81, 0x00];
pub const ETH_LEN: usize = 14;

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
pub const LAB_VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
pub const LAB_CLIENT6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
pub const LAB_BACKEND6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x11);
pub const LAB_SNAT6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x100);

/// Creates the packet lab namespace (see the constants above). Clients live in
/// 10.1.0.0/16 and fd00:1::/64, servers in 10.2.0.0/24 and fd00:2::/64.
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
    ns.ip(&["addr", "add", "fd00:2::1/64", "dev", LAB_INTERFACE, "nodad"])?;
    ns.ip(&[
        "addr",
        "add",
        "fd00:1::ffff/64",
        "dev",
        LAB_INTERFACE,
        "nodad",
    ])?;
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let neighbours: [(std::net::IpAddr, [u8; 6]); 4] = [
        (LAB_BACKEND.into(), LAB_BACKEND_MAC),
        (LAB_CLIENT.into(), LAB_CLIENT_NEXT_HOP_MAC),
        (LAB_BACKEND6.into(), LAB_BACKEND_MAC),
        (LAB_CLIENT6.into(), LAB_CLIENT_NEXT_HOP_MAC),
    ];
    for (address, lladdr) in neighbours {
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
    // Many client addresses (11.0.0.0/8, the benchmarks'), behind the lab client's next hop.
    ns.ip(&["route", "add", "11.0.0.0/8", "via", &LAB_CLIENT.to_string()])?;
    ns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
    // bpf_fib_lookup checks the ingress device's own IPv6 forwarding flag.
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    ns.sysctl(&format!("net.ipv6.conf.{LAB_INTERFACE}.forwarding"), "1")?;
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

/// The transport part of a [`Frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP with these flag bits (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10).
    Tcp { flags: u8 },
    /// UDP; `no_checksum` sends IPv4 UDP with checksum 0 ("none").
    Udp { no_checksum: bool },
    /// ICMP (IPv4) or ICMPv6 echo request.
    EchoRequest,
    /// An ICMP or ICMPv6 error of this type and code, with `info` in the header's second
    /// word (the MTU of "fragmentation needed" / "packet too big"), quoting the payload.
    IcmpError { kind: u8, code: u8, info: u32 },
    /// Any other protocol number, with the payload as its body.
    Other(u8),
}

/// Transport bytes a first fragment carries (three 8-byte units: a whole TCP header); the
/// later fragment starts at offset `FIRST_FRAGMENT_BYTES / 8`.
pub const FIRST_FRAGMENT_BYTES: usize = 24;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// The initial sequence number both sides of a test handshake use unless told otherwise,
/// so that default frames make a valid handshake: the SYN-ACK acknowledges the SYN
/// (`DEFAULT_ISN + 1`) and the client's ACK the SYN-ACK (the same number).
pub const DEFAULT_ISN: u32 = 0x1000_0000;

/// An IPv6 fragment header, or IPv4 fragment fields: offset in 8-byte units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    pub id: u32,
    pub offset: u16,
    pub more: bool,
}

/// Any frame the data plane handles, IPv4 or IPv6 (from the addresses' family), built byte
/// by byte with checksums from [`internet_checksum`], which shares no code with lb.
#[derive(Debug, Clone)]
pub struct Frame {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub transport: Transport,
    /// TCP sequence number, and acknowledgement number (sent when the ACK flag is).
    pub seq: u32,
    pub ack: u32,
    pub ttl: u8,
    pub vlan: Option<u16>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv6 extension headers (next-header type, body after the first two bytes), in order.
    pub extensions: Vec<(u8, Vec<u8>)>,
    pub fragment: Option<Fragment>,
    pub payload: Vec<u8>,
}

/// RFC 1071 ones' complement sum over `parts`, as one byte stream (odd lengths padded).
pub fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u64 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u64::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/UDP/ICMPv6 checksum pseudo-header (RFC 793 / RFC 8200 section 8.1).
pub fn pseudo_header(
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    proto: u8,
    len: usize,
) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed address families"),
    }
    p
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const EXT_FRAGMENT: u8 = 44;

impl Frame {
    pub fn new(src: std::net::SocketAddr, dst: std::net::SocketAddr, transport: Transport) -> Self {
        Self {
            src,
            dst,
            transport,
            seq: DEFAULT_ISN,
            ack: DEFAULT_ISN.wrapping_add(1),
            ttl: 64,
            vlan: None,
            ip_options: Vec::new(),
            extensions: Vec::new(),
            fragment: None,
            payload: Vec::new(),
        }
    }

    /// A TCP SYN.
    pub fn syn(src: impl Into<std::net::SocketAddr>, dst: impl Into<std::net::SocketAddr>) -> Self {
        Self::tcp(src, dst, TCP_SYN)
    }

    /// A TCP segment with these flags.
    pub fn tcp(
        src: impl Into<std::net::SocketAddr>,
        dst: impl Into<std::net::SocketAddr>,
        flags: u8,
    ) -> Self {
        Self::new(src.into(), dst.into(), Transport::Tcp { flags })
    }

    fn proto(&self) -> u8 {
        match self.transport {
            Transport::Tcp { .. } => PROTO_TCP,
            Transport::Udp { .. } => PROTO_UDP,
            Transport::EchoRequest | Transport::IcmpError { .. } if self.src.is_ipv4() => {
                PROTO_ICMP
            }
            Transport::EchoRequest | Transport::IcmpError { .. } => PROTO_ICMPV6,
            Transport::Other(p) => p,
        }
    }

    /// The transport header and payload with a correct checksum over the whole datagram.
    fn transport_bytes(&self) -> Vec<u8> {
        let (sp, dp) = (self.src.port().to_be_bytes(), self.dst.port().to_be_bytes());
        let mut t = match self.transport {
            Transport::Tcp { flags } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sp);
                h[2..4].copy_from_slice(&dp);
                h[4..8].copy_from_slice(&self.seq.to_be_bytes());
                if flags & TCP_ACK != 0 {
                    h[8..12].copy_from_slice(&self.ack.to_be_bytes());
                }
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            Transport::Udp { .. } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sp);
                h[2..4].copy_from_slice(&dp);
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h
            }
            Transport::EchoRequest => {
                let request = if self.src.is_ipv4() { 8 } else { 128 };
                vec![request, 0, 0, 0, 0x12, 0x34, 0, 1]
            }
            Transport::IcmpError { kind, code, info } => {
                let mut h = vec![kind, code, 0, 0];
                h.extend_from_slice(&info.to_be_bytes());
                h
            }
            Transport::Other(_) => Vec::new(),
        };
        t.extend_from_slice(&self.payload);
        let pseudo = pseudo_header(self.src.ip(), self.dst.ip(), self.proto(), t.len());
        let check_at = match self.transport {
            Transport::Tcp { .. } => Some(16),
            Transport::Udp { no_checksum: false } => Some(6),
            Transport::Udp { no_checksum: true } | Transport::Other(_) => None,
            Transport::EchoRequest | Transport::IcmpError { .. } => Some(2),
        };
        if let Some(at) = check_at {
            let icmpv4 = self.proto() == PROTO_ICMP;
            let mut sum = if icmpv4 {
                internet_checksum(&[&t])
            } else {
                internet_checksum(&[&pseudo, &t])
            };
            if sum == 0 && matches!(self.transport, Transport::Udp { .. }) {
                sum = 0xffff;
            }
            t[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        t
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = self.transport_bytes();
        // A fragment carries its slice of the datagram: the first 8-byte units, or the rest.
        if let Some(f) = self.fragment {
            let start = usize::from(f.offset) * 8;
            let end = if f.more {
                (start + FIRST_FRAGMENT_BYTES).min(l4.len())
            } else {
                l4.len()
            };
            l4 = l4.get(start..end).map(<[u8]>::to_vec).unwrap_or_default();
        }
        let mut frame = Vec::new();
        frame.extend_from_slice(&LB_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        if let Some(tag) = self.vlan {
            frame.extend_from_slice(&ETHERTYPE_VLAN);
            frame.extend_from_slice(&tag.to_be_bytes());
        }
        match (self.src.ip(), self.dst.ip()) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                frame.extend_from_slice(&ETHERTYPE_IPV4);
                assert_eq!(self.ip_options.len() % 4, 0, "IPv4 options length");
                let header_len = 20 + self.ip_options.len();
                let ihl = 0x40 | (header_len / 4) as u8;
                let mut ip = vec![ihl, 0, 0, 0, 0, 0, 0, 0, self.ttl, self.proto(), 0, 0];
                ip[2..4].copy_from_slice(&((header_len + l4.len()) as u16).to_be_bytes());
                let (id, frags) = match self.fragment {
                    Some(f) => (f.id as u16, (u16::from(f.more) << 13) | f.offset),
                    None => (0x1c46, 0x4000),
                };
                ip[4..6].copy_from_slice(&id.to_be_bytes());
                ip[6..8].copy_from_slice(&frags.to_be_bytes());
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&self.ip_options);
                let check = internet_checksum(&[&ip]);
                ip[10..12].copy_from_slice(&check.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                frame.extend_from_slice(&[0x86, 0xdd]);
                let mut chain: Vec<(u8, Vec<u8>)> = self.extensions.clone();
                if let Some(f) = self.fragment {
                    let mut body = vec![0u8; 6];
                    body[0..2]
                        .copy_from_slice(&((f.offset << 3) | u16::from(f.more)).to_be_bytes());
                    body[2..6].copy_from_slice(&f.id.to_be_bytes());
                    chain.push((EXT_FRAGMENT, body));
                }
                let mut ext_bytes = Vec::new();
                for (i, (_, body)) in chain.iter().enumerate() {
                    let next = chain.get(i + 1).map_or(self.proto(), |(t, _)| *t);
                    let units = (2 + body.len()) / 8;
                    assert_eq!((2 + body.len()) % 8, 0, "extension header length");
                    ext_bytes.push(next);
                    ext_bytes.push(if chain[i].0 == EXT_FRAGMENT {
                        0
                    } else {
                        (units - 1) as u8
                    });
                    ext_bytes.extend_from_slice(body);
                }
                let first = chain.first().map_or(self.proto(), |(t, _)| *t);
                let mut ip = vec![0x60, 0, 0, 0];
                ip.extend_from_slice(&((ext_bytes.len() + l4.len()) as u16).to_be_bytes());
                ip.push(first);
                ip.push(self.ttl);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                frame.extend_from_slice(&ip);
                frame.extend_from_slice(&ext_bytes);
            }
            _ => panic!("mixed address families"),
        }
        frame.extend_from_slice(&l4);
        frame
    }
}

/// A frame read back by [`verify_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    /// IPv4 options as they left (empty for IPv6).
    pub ip_options: Vec<u8>,
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub ttl: u8,
    pub proto: u8,
    /// First transport header byte (ICMP type); 0 for fragments without one.
    pub first_transport_byte: u8,
}

/// Parses an IPv4 or IPv6 frame and checks every checksum it carries by recomputing it
/// from scratch (IPv4 header; TCP, UDP, ICMP, ICMPv6 over the pseudo-header). Transport
/// checksums of fragments are not checked (they cover bytes the frame does not hold).
pub fn verify_frame(frame: &[u8]) -> Result<Seen> {
    ensure!(frame.len() >= ETH_LEN, "shorter than Ethernet");
    let dst_mac: [u8; 6] = frame[0..6].try_into()?;
    let (mut ethertype, mut at, mut vlan) =
        (u16::from_be_bytes([frame[12], frame[13]]), ETH_LEN, None);
    if ethertype == 0x8100 {
        ensure!(frame.len() >= ETH_LEN + 4, "VLAN tag cut short");
        vlan = Some(u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff);
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        at += 4;
    }
    let get = |r: std::ops::Range<usize>| frame.get(r).context("frame cut short");
    let (src, dst, proto, ttl, l4_start, l4_end, fragmented);
    let mut ip_options = Vec::new();
    match ethertype {
        0x0800 => {
            let ihl = usize::from(get(at..at + 1)?[0] & 0x0f) * 4;
            ensure!(ihl >= 20, "IPv4 IHL below 5");
            let header = get(at..at + ihl)?;
            ip_options = header[20..].to_vec();
            ensure!(
                internet_checksum(&[header]) == 0,
                "bad IPv4 header checksum"
            );
            let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
            src = std::net::IpAddr::from(<[u8; 4]>::try_from(&header[12..16])?);
            dst = std::net::IpAddr::from(<[u8; 4]>::try_from(&header[16..20])?);
            (proto, ttl) = (header[9], header[8]);
            fragmented = u16::from_be_bytes([header[6], header[7]]) & 0x3fff != 0;
            (l4_start, l4_end) = (at + ihl, at + total);
        }
        0x86dd => {
            let header = get(at..at + 40)?;
            src = std::net::IpAddr::from(<[u8; 16]>::try_from(&header[8..24])?);
            dst = std::net::IpAddr::from(<[u8; 16]>::try_from(&header[24..40])?);
            ttl = header[7];
            let mut next = header[6];
            let mut offset = at + 40;
            let mut frag = false;
            while matches!(next, 0 | 43 | 44 | 60) {
                let ext = get(offset..offset + 2)?;
                frag |= next == EXT_FRAGMENT;
                let len = if next == EXT_FRAGMENT {
                    8
                } else {
                    (usize::from(ext[1]) + 1) * 8
                };
                next = ext[0];
                offset += len;
            }
            proto = next;
            fragmented = frag;
            (l4_start, l4_end) = (
                offset,
                at + 40 + usize::from(u16::from_be_bytes([header[4], header[5]])),
            );
        }
        other => anyhow::bail!("not IP: ethertype {other:#06x}"),
    }
    let l4 = get(l4_start..l4_end)?;
    let ports = |l4: &[u8]| -> (u16, u16) {
        if l4.len() >= 4 && (proto == PROTO_TCP || proto == PROTO_UDP) {
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        } else {
            (0, 0)
        }
    };
    let (sp, dp) = if fragmented && l4_start == l4_end {
        (0, 0)
    } else {
        ports(l4)
    };
    let whole = !fragmented;
    let udp_without_checksum = proto == PROTO_UDP && src.is_ipv4() && l4.get(6..8) == Some(&[0, 0]);
    if whole && matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMPV6) && !udp_without_checksum {
        let pseudo = pseudo_header(src, dst, proto, l4.len());
        ensure!(
            internet_checksum(&[&pseudo, l4]) == 0,
            "bad transport checksum (protocol {proto})"
        );
    }
    if whole && proto == PROTO_ICMP {
        ensure!(internet_checksum(&[l4]) == 0, "bad ICMP checksum");
    }
    Ok(Seen {
        dst_mac,
        vlan,
        ip_options,
        src: std::net::SocketAddr::new(src, sp),
        dst: std::net::SocketAddr::new(dst, dp),
        ttl,
        proto,
        first_transport_byte: if fragmented {
            0
        } else {
            l4.first().copied().unwrap_or(0)
        },
    })
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The lab's config: TCP and UDP services on an IPv4 and an IPv6 VIP, one server each.
pub const LAB_CONFIG: &str = r#"
[daemon]
interfaces = ["t0"]
snat_addresses = ["10.2.0.100", "fd00:2::100"]
max_flows = 4096
max_half_open = 4096
max_affinities = 4096

[[service]]
name = "web"
vip = "10.100.0.1"
port = 443
backend_port = 4443
backends = [{ address = "10.2.0.11" }]

[[service]]
name = "turn"
vip = "10.100.0.1"
port = 3478
protocol = "udp"
backends = [{ address = "10.2.0.11" }]

[[service]]
name = "web6"
vip = "fd00:100::1"
port = 443
backend_port = 4443
backends = [{ address = "fd00:2::11" }]

[[service]]
name = "turn6"
vip = "fd00:100::1"
port = 3478
protocol = "udp"
backends = [{ address = "fd00:2::11" }]
"#;

/// The real data plane, loaded (not attached) inside the lab namespace and filled from a
/// config, for BPF_PROG_TEST_RUN.
pub struct PacketLab {
    pub dp: lb::dataplane::Dataplane,
    pub ingress: u32,
}

/// What one run did.
pub struct Outcome {
    pub action: u32,
    pub output: Vec<u8>,
    /// The verdict counters that moved, with their increments.
    pub verdicts: Vec<(lb_common::Counter, u64)>,
}

impl PacketLab {
    /// Loads the data plane for `config` (call inside the lab namespace).
    pub fn new(config: &str) -> Result<Self> {
        let config = lb::config::Config::parse(config)?;
        let d = &config.daemon;
        let capacity = lb::dataplane::Capacity {
            max_flows: d.max_flows,
            max_half_open: d.max_half_open,
            max_affinities: d.max_affinities,
        };
        let mut dp = lb::dataplane::Dataplane::load(capacity, None)?;
        lb::daemon::pool::Pool::new(config, lb::daemon::runtime::Overlay::default(), None)
            .sync(&mut dp)?;
        Ok(Self {
            dp,
            ingress: lb::dataplane::ifindex(LAB_INTERFACE)?,
        })
    }

    /// Runs one frame, without reading counters.
    pub fn run_fast(&self, frame: &[u8], output: &mut Vec<u8>) -> Result<u32> {
        output.resize(frame.len() + 256, 0);
        let result = run_once(self.dp.program()?, frame, self.ingress, output)?;
        output.truncate(result.data_size_out as usize);
        Ok(result.return_value)
    }

    /// Runs one frame and reports which verdict counters it moved.
    pub fn run(&self, frame: &[u8]) -> Result<Outcome> {
        let before = self.dp.counters()?;
        let mut output = Vec::new();
        let action = self.run_fast(frame, &mut output)?;
        let after = self.dp.counters()?;
        let packets = after[lb_common::Counter::Packets as usize].1
            - before[lb_common::Counter::Packets as usize].1;
        ensure!(packets == 1, "packets counter moved by {packets}");
        let verdicts = before
            .iter()
            .zip(&after)
            .filter(|((c, _), _)| c.is_verdict())
            .filter(|((_, b), (_, a))| a != b)
            .map(|((c, b), (_, a))| (*c, a - b))
            .collect();
        Ok(Outcome {
            action,
            output,
            verdicts,
        })
    }

    /// Runs `frame` and checks the action and that exactly `counter` moved, by one.
    pub fn expect(
        &self,
        what: &str,
        frame: &[u8],
        action: u32,
        counter: lb_common::Counter,
    ) -> Result<Outcome> {
        let outcome = self.run(frame).with_context(|| what.to_string())?;
        ensure!(
            outcome.action == action,
            "{what}: action {} instead of {action} (counters {:?})",
            outcome.action,
            outcome.verdicts
        );
        ensure!(
            outcome.verdicts == [(counter, 1)],
            "{what}: counters {:?} instead of [{counter:?} +1]",
            outcome.verdicts
        );
        Ok(outcome)
    }
}
