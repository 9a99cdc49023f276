//! Test clients: real TCP connections from a chosen source address inside the client
//! namespace, speaking HTTP/1.1 to the VIP.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What a server said about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub server: String,
    /// The peer address the server saw (the SNAT address, if lb translated the source).
    pub peer: SocketAddr,
}

pub struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pub local: SocketAddr,
}

impl Connection {
    /// Opens a connection from `source` (port chosen by the kernel unless `source_port`).
    pub fn open(
        ns: &Netns,
        source: Ipv4Addr,
        source_port: u16,
        target: SocketAddrV4,
    ) -> Result<Self> {
        let socket = ns.run(|| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))??;
        socket.set_reuse_address(true)?;
        socket
            .bind(&SocketAddr::from(SocketAddrV4::new(source, source_port)).into())
            .with_context(|| format!("bind {source}:{source_port}"))?;
        socket
            .connect_timeout(&SocketAddr::from(target).into(), CONNECT_TIMEOUT)
            .with_context(|| format!("connect {source} -> {target}"))?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            local,
        })
    }

    /// One request / response on this connection.
    pub fn ask(&mut self) -> Result<Reply> {
        self.writer
            .write_all(b"GET / HTTP/1.1\r\nHost: lb-test\r\n\r\n")
            .context("send request")?;
        let mut content_length = None;
        loop {
            let mut line = String::new();
            if self
                .reader
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
        self.reader
            .read_exact(&mut body)
            .context("read response body")?;
        parse_body(&String::from_utf8_lossy(&body))
    }
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
pub fn request(ns: &Netns, source: Ipv4Addr, target: SocketAddrV4) -> Result<Reply> {
    Connection::open(ns, source, 0, target)?.ask()
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
