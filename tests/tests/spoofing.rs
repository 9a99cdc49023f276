//! Blind spoofers against real TCP through the veth harness: a sender on the clients' side
//! that never sees the traffic sends forged handshakes, RSTs and server-side RSTs with a
//! raw socket. Real connections opened and kept through it must all keep answering after
//! idling past the handshake and closing timeouts. Needs root.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use harness::{
    client::Connection,
    fixture::{Fixture, ServiceSpec},
    netns::Netns,
    packet::{Frame, Transport, ETH_LEN, TCP_ACK, TCP_RST, TCP_SYN},
    rng::Rng,
    topology::Spec,
};

/// Short timeouts, so that idling past them fits in a test.
const HANDSHAKE_TIMEOUT_S: u64 = 2;
const CLOSING_TIMEOUT_S: u64 = 2;
const REAL_CONNECTIONS: usize = 20;
const POLL: Duration = Duration::from_millis(100);

/// A raw IPv4 socket in `ns` that sends whole IP packets with any source address.
struct Spoofer {
    fd: OwnedFd,
}

impl Spoofer {
    fn open(ns: &Netns) -> Result<Self> {
        let fd = ns.run(|| {
            // SAFETY: plain socket(2); the result is checked.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) }
        })?;
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: a socket we just opened and own.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends the IP packet of `frame` (its Ethernet header left off).
    fn send(&self, frame: &Frame) -> Result<()> {
        let bytes = frame.bytes();
        let packet = &bytes[ETH_LEN..];
        let IpAddr::V4(dst) = frame.dst.ip() else {
            anyhow::bail!("IPv4 only");
        };
        // SAFETY: all-zero is a valid sockaddr_in.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as u16;
        to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        // SAFETY: `packet` and `to` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        ensure!(
            sent == packet.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8, seq: u32, ack: u32) -> Frame {
    Frame {
        seq,
        ack,
        ..Frame::new(src, dst, Transport::Tcp { flags })
    }
}

/// A pause every few packets, so that the veth queues between the namespaces (1,000
/// packets) never overflow on a busy machine: every spoofed packet must reach lb.
fn pace(sent: u64) {
    if sent % 64 == 63 {
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn counter(f: &Fixture, name: &str) -> Result<u64> {
    Ok(f.daemon.status()?.counters.get(name).copied().unwrap_or(0))
}

#[test]
fn blind_spoofers_break_no_real_connection() -> Result<()> {
    let f = Fixture::start_with(
        &Spec {
            clients: REAL_CONNECTIONS,
            ..Spec::default()
        },
        ServiceSpec::default(),
        &format!(
            "handshake_timeout = {HANDSHAKE_TIMEOUT_S}\nclosing_timeout = {CLOSING_TIMEOUT_S}"
        ),
    )?;
    let vip = SocketAddr::V4(f.vip());
    let spoofer = Spoofer::open(&f.topology.client)?;
    let mut rng = Rng::new(0x5b00f);

    // 2,000 spoofed handshakes: a SYN, then a bare ACK with a guessed acknowledgement.
    let confirmed = counter(&f, "flows_confirmed")?;
    let refused = counter(&f, "drop_tcp_bad_ack")?;
    const SPOOFED: u64 = 2_000;
    for i in 0..SPOOFED {
        let source = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(
                10,
                1,
                200 + (i / 250) as u8,
                (i % 250) as u8 + 1,
            )),
            1024 + (rng.next_u64() % 60_000) as u16,
        );
        let isn = rng.next_u64() as u32;
        spoofer.send(&tcp(source, vip, TCP_SYN, isn, 0))?;
        spoofer.send(&tcp(
            source,
            vip,
            TCP_ACK,
            isn.wrapping_add(1),
            rng.next_u64() as u32,
        ))?;
        pace(i);
    }
    harness::wait::until(
        Duration::from_secs(10),
        POLL,
        "the spoofed ACKs counted",
        || Ok(counter(&f, "drop_tcp_bad_ack")? >= refused + SPOOFED),
    )?;
    ensure!(
        counter(&f, "flows_confirmed")? == confirmed,
        "spoofed handshakes confirmed flows"
    );

    // Real connections, kept open through everything that follows.
    let clients = &f.topology.client_addresses[..REAL_CONNECTIONS];
    let mut connections = Vec::new();
    let mut servers = Vec::new();
    for &client in clients {
        let mut c = Connection::open(&f.topology.client, client, 0, vip)?;
        servers.push(c.ask()?.server);
        connections.push(c);
    }
    std::thread::sleep(Duration::from_secs(HANDSHAKE_TIMEOUT_S + 1));
    for (c, server) in connections.iter_mut().zip(&servers) {
        ensure!(
            c.ask()?.server == *server,
            "a connection moved after the handshake timeout"
        );
    }

    // One blind RST per connection: its addresses and ports, a guessed sequence number.
    let out_of_window = counter(&f, "drop_tcp_out_of_window")?;
    for c in &connections {
        spoofer.send(&tcp(c.local, vip, TCP_RST, rng.next_u64() as u32, 0))?;
    }
    // RSTs from every server's address and port to every SNAT port, sent into the
    // clients' side.
    let wrong_side = counter(&f, "drop_wrong_side")?;
    for backend in &f.topology.backends {
        let from = SocketAddr::V4(SocketAddrV4::new(backend.address, f.service.backend_port));
        for snat_address in &f.topology.snat_addresses {
            for port in 1024..=65535u16 {
                let to = SocketAddr::V4(SocketAddrV4::new(*snat_address, port));
                spoofer.send(&tcp(from, to, TCP_RST | TCP_ACK, rng.next_u64() as u32, 0))?;
                pace(u64::from(port));
            }
        }
    }
    harness::wait::until(
        Duration::from_secs(10),
        POLL,
        "the blind RSTs counted",
        || {
            Ok(
                counter(&f, "drop_tcp_out_of_window")? >= out_of_window + REAL_CONNECTIONS as u64
                    && counter(&f, "drop_wrong_side")? >= wrong_side + REAL_CONNECTIONS as u64,
            )
        },
    )?;
    std::thread::sleep(Duration::from_secs(CLOSING_TIMEOUT_S + 1));
    for (c, server) in connections.iter_mut().zip(&servers) {
        let reply = c.ask().context("a connection died after the blind RSTs")?;
        ensure!(
            reply.server == *server,
            "a connection moved after the blind RSTs"
        );
    }
    Ok(())
}
