//! A minimal HTTP/1.1 server standing in for a Front End server: every response names the
//! server and the peer address it saw, so a test can tell where a connection landed and
//! whether the source was translated. Keep-alive is supported for long-lived connections;
//! with TLS (`Server::start_tls`) it speaks HTTPS, as the Front Ends' 4443 does.
//! [`UdpServer`] answers each datagram the same way.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::netns::Netns;

/// How long the accept loop waits for a connection before it looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
const IDLE_LIMIT: Duration = Duration::from_secs(30);

pub struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    pub name: String,
    pub address: SocketAddr,
}

impl Server {
    /// Starts listening inside `ns`; returns once the socket is bound (ready).
    pub fn start(ns: &Netns, name: &str, address: impl Into<IpAddr>, port: u16) -> Result<Self> {
        Self::listen(ns, name, address.into(), port, None)
    }

    /// Like `start`, speaking HTTPS with `tls`.
    pub fn start_tls(
        ns: &Netns,
        name: &str,
        address: impl Into<IpAddr>,
        port: u16,
        tls: Arc<ServerConfig>,
    ) -> Result<Self> {
        Self::listen(ns, name, address.into(), port, Some(tls))
    }

    fn listen(
        ns: &Netns,
        name: &str,
        address: IpAddr,
        port: u16,
        tls: Option<Arc<ServerConfig>>,
    ) -> Result<Self> {
        let bind = SocketAddr::new(address, port);
        let listener = ns
            .run(|| TcpListener::bind(bind))?
            .with_context(|| format!("bind {bind} in {}", ns.name()))?;
        // Blocking accept with a timeout: a connection is taken the moment it arrives (a
        // polled non-blocking accept adds up to a poll interval to every connection), and
        // the loop still sees its stop flag every ACCEPT_POLL.
        socket2::SockRef::from(&listener).set_read_timeout(Some(ACCEPT_POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, accepted, name) = (stop.clone(), accepted.clone(), name.to_string());
            std::thread::spawn(move || accept_loop(listener, &name, tls, &stop, &accepted))
        };
        Ok(Self {
            stop,
            accepted,
            thread: Some(thread),
            name: name.to_string(),
            address: bind,
        })
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    name: &str,
    tls: Option<Arc<ServerConfig>>,
    stop: &AtomicBool,
    accepted: &AtomicU64,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let (name, tls) = (name.to_string(), tls.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, peer, &name, tls);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    tls: Option<Arc<ServerConfig>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_LIMIT))?;
    match tls {
        None => answer(stream, peer, name),
        Some(config) => {
            let session = ServerConnection::new(config).map_err(std::io::Error::other)?;
            answer(StreamOwned::new(session, stream), peer, name)
        }
    }
}

/// Answers each request on `stream` until the client closes it or goes idle.
fn answer(stream: impl Read + Write, peer: SocketAddr, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        // Read one request head; the body (if any) is not used.
        let mut saw_request = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            saw_request = true;
        }
        if !saw_request {
            continue;
        }
        let body = identify(name, peer);
        let writer = reader.get_mut();
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        writer.flush()?;
    }
}

/// The reply body both servers send: who answered, and whom it saw.
fn identify(name: &str, peer: SocketAddr) -> String {
    format!("server={name} peer={peer}\n")
}

/// A UDP server that answers every datagram with [`identify`], from the address it was
/// sent to (the socket is bound to one address).
pub struct UdpServer {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    pub address: SocketAddr,
}

impl UdpServer {
    /// Binds inside `ns`; returns once the socket is bound (ready).
    pub fn start(ns: &Netns, name: &str, address: impl Into<IpAddr>, port: u16) -> Result<Self> {
        let bind = SocketAddr::new(address.into(), port);
        let socket = ns
            .run(|| UdpSocket::bind(bind))?
            .with_context(|| format!("bind UDP {bind} in {}", ns.name()))?;
        // The stop flag is checked between reads.
        socket.set_read_timeout(Some(ACCEPT_POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, answered, name) = (stop.clone(), answered.clone(), name.to_string());
            std::thread::spawn(move || {
                let mut buffer = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buffer) {
                        if socket
                            .send_to(identify(&name, peer).as_bytes(), peer)
                            .is_ok()
                        {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Ok(Self {
            stop,
            answered,
            thread: Some(thread),
            address: bind,
        })
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
