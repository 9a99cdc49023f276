//! Test clients: real TCP connections from a chosen source address inside the client
//! namespace, speaking HTTP/1.1 (or HTTPS) to the VIP, and UDP exchanges with the same
//! answer.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{netns::Netns, tls};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What a server said about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub server: String,
    /// The peer address the server saw (the SNAT address, if lb translated the source).
    pub peer: SocketAddr,
}

/// A connection's byte stream: TCP, or TLS over it.
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct Connection {
    stream: BufReader<Box<dyn Stream>>,
    pub local: SocketAddr,
}

impl Connection {
    /// Opens a connection from `source` (port chosen by the kernel unless `source_port`).
    pub fn open(
        ns: &Netns,
        source: impl Into<IpAddr>,
        source_port: u16,
        target: impl Into<SocketAddr>,
    ) -> Result<Self> {
        Self::open_within(ns, source, source_port, target, CONNECT_TIMEOUT)
    }

    /// Like `open`, giving up on the handshake after `timeout`.
    pub fn open_within(
        ns: &Netns,
        source: impl Into<IpAddr>,
        source_port: u16,
        target: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<Self> {
        let stream = connect(ns, source.into(), source_port, target.into(), timeout)?;
        let local = stream.local_addr()?;
        Ok(Self {
            stream: BufReader::new(Box::new(stream)),
            local,
        })
    }

    /// Like `open`, then a TLS handshake with `server_name` (SNI and the name its
    /// certificate must carry), trusting what `config` trusts.
    pub fn open_tls(
        ns: &Netns,
        source: impl Into<IpAddr>,
        target: impl Into<SocketAddr>,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<Self> {
        let target = target.into();
        let mut stream = connect(ns, source.into(), 0, target, CONNECT_TIMEOUT)?;
        let local = stream.local_addr()?;
        let mut session = ClientConnection::new(config, tls::server_name(server_name)?)?;
        while session.is_handshaking() {
            session
                .complete_io(&mut stream)
                .with_context(|| format!("TLS handshake with {target} as {server_name}"))?;
        }
        Ok(Self {
            stream: BufReader::new(Box::new(StreamOwned::new(session, stream))),
            local,
        })
    }

    /// One request / response on this connection.
    pub fn ask(&mut self) -> Result<Reply> {
        let writer = self.stream.get_mut();
        writer
            .write_all(b"GET / HTTP/1.1\r\nHost: lb-test\r\n\r\n")
            .context("send request")?;
        writer.flush().context("send request")?;
        let mut content_length = None;
        loop {
            let mut line = String::new();
            if self
                .stream
                .read_line(&mut line)
                .context("read response head")?
                == 0
            {
                bail!("connection closed before a response");
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = Some(v.trim().parse::<usize>()?);
            }
        }
        let mut body = vec![0; content_length.ok_or_else(|| anyhow!("no Content-Length"))?];
        self.stream
            .read_exact(&mut body)
            .context("read response body")?;
        parse_body(&String::from_utf8_lossy(&body))
    }
}

/// A TCP connection from `source` (port chosen by the kernel unless `source_port`) inside
/// `ns`, with the harness's timeouts.
fn connect(
    ns: &Netns,
    source: IpAddr,
    source_port: u16,
    target: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let socket = ns.run(|| {
        Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )
    })??;
    socket.set_reuse_address(true)?;
    socket
        .bind(&SocketAddr::new(source, source_port).into())
        .with_context(|| format!("bind {source}:{source_port}"))?;
    socket
        .connect_timeout(&target.into(), timeout)
        .with_context(|| format!("connect {source} -> {target}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn parse_body(body: &str) -> Result<Reply> {
    let mut server = None;
    let mut peer = None;
    for field in body.split_whitespace() {
        if let Some(v) = field.strip_prefix("server=") {
            server = Some(v.to_string());
        } else if let Some(v) = field.strip_prefix("peer=") {
            peer = Some(v.parse()?);
        }
    }
    Ok(Reply {
        server: server.ok_or_else(|| anyhow!("no server in {body:?}"))?,
        peer: peer.ok_or_else(|| anyhow!("no peer in {body:?}"))?,
    })
}

/// One connection, one request, closed.
pub fn request(
    ns: &Netns,
    source: impl Into<IpAddr>,
    target: impl Into<SocketAddr>,
) -> Result<Reply> {
    Connection::open(ns, source, 0, target)?.ask()
}

/// A connected UDP socket from `source` (port chosen by the kernel unless `source_port`).
pub fn udp_socket(ns: &Netns, source: SocketAddr, target: SocketAddr) -> Result<UdpSocket> {
    let socket = ns
        .run(|| UdpSocket::bind(source))?
        .with_context(|| format!("bind UDP {source}"))?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(UDP_TRY_TIMEOUT))?;
    Ok(socket)
}

/// How long one UDP try waits for its answer, and how many tries there are: the first
/// datagram toward a new server may wait for neighbour resolution, as in any network.
pub const UDP_TRY_TIMEOUT: Duration = Duration::from_secs(1);
const UDP_TRIES: usize = 5;

/// Sends one datagram on `socket` and returns the server's answer, retrying a lost one.
/// A "port unreachable" that comes back ends it with the socket's `ConnectionRefused`.
pub fn udp_ask(socket: &UdpSocket) -> Result<Reply> {
    let mut buffer = [0u8; 512];
    for _ in 0..UDP_TRIES {
        socket.send(b"binding request")?;
        match socket.recv(&mut buffer) {
            Ok(n) => return parse_body(&String::from_utf8_lossy(&buffer[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("UDP answer"),
        }
    }
    bail!("no UDP answer after {UDP_TRIES} tries of {UDP_TRY_TIMEOUT:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_parsed() {
        let r = parse_body("server=fe2 peer=10.2.0.100:40000\n").unwrap();
        assert_eq!(r.server, "fe2");
        assert_eq!(r.peer, "10.2.0.100:40000".parse().unwrap());
        assert!(parse_body("nothing").is_err());
    }
}
