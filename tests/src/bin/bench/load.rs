//! The load client: many client addresses, a fixed number of concurrent workers, HTTP/1.1
//! requests to a small nginx response. Either one request per connection (the client
//! closes first, as browsers and wrk do) or a stream of requests on kept-alive connections.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: lync.example\r\n\r\n";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy)]
pub enum Mode {
    /// One request per connection.
    NewConnections,
    /// Requests back to back on connections opened once.
    KeepAlive,
}

pub struct Load {
    pub target: SocketAddrV4,
    pub sources: Vec<Ipv4Addr>,
    pub concurrency: usize,
    pub duration: Duration,
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// Completed requests (= connections in `NewConnections` mode).
    pub completed: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

/// Runs `load` from the calling thread's network namespace (the runtime's threads are
/// created from it and inherit it).
pub fn run(load: &Load) -> Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(drive(load))
}

async fn drive(load: &Load) -> Result<Outcome> {
    let completed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut workers = Vec::new();
    for w in 0..load.concurrency {
        let (completed, errors) = (completed.clone(), errors.clone());
        let sources: Vec<Ipv4Addr> = load
            .sources
            .iter()
            .copied()
            .skip(w)
            .step_by(load.concurrency)
            .collect();
        let sources = if sources.is_empty() {
            vec![load.sources[w % load.sources.len()]]
        } else {
            sources
        };
        let (target, mode) = (load.target, load.mode);
        workers.push(tokio::spawn(async move {
            let mut turn = 0usize;
            while Instant::now() < deadline {
                let source = sources[turn % sources.len()];
                turn += 1;
                let result = match mode {
                    Mode::NewConnections => one_connection(source, target).await.map(|()| 1),
                    Mode::KeepAlive => kept_alive(source, target, deadline).await,
                };
                match result {
                    Ok(n) => completed.fetch_add(n, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for worker in workers {
        worker.await?;
    }
    Ok(Outcome {
        completed: completed.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

async fn connect(source: Ipv4Addr, target: SocketAddrV4) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // Pick the source port at connect time, per destination: a few client addresses can
    // then open far more than 28k connections to one VIP.
    let on: libc::c_int = 1;
    // SAFETY: valid socket fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
    }
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = tokio::time::timeout(IO_TIMEOUT, socket.connect(target.into())).await??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn one_connection(source: Ipv4Addr, target: SocketAddrV4) -> Result<()> {
    let mut stream = connect(source, target).await?;
    let mut buf = [0u8; 1024];
    exchange(&mut stream, &mut buf).await
}

async fn kept_alive(source: Ipv4Addr, target: SocketAddrV4, deadline: Instant) -> Result<u64> {
    let mut stream = connect(source, target).await?;
    let mut buf = [0u8; 1024];
    let mut done = 0;
    while Instant::now() < deadline {
        exchange(&mut stream, &mut buf).await?;
        done += 1;
    }
    Ok(done)
}

/// One request and its complete response (headers plus Content-Length bytes of body).
async fn exchange(stream: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(REQUEST).await?;
        let mut have = 0;
        loop {
            let n = stream.read(&mut buf[have..]).await?;
            if n == 0 {
                bail!("server closed the connection mid-response");
            }
            have += n;
            if let Some(total) = response_length(&buf[..have]) {
                if have >= total {
                    return Ok(());
                }
            }
            if have == buf.len() {
                bail!("response larger than {} bytes", buf.len());
            }
        }
    })
    .await?
}

/// Length of the whole response once its headers are in, from Content-Length.
fn response_length(data: &[u8]) -> Option<usize> {
    let header_end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let headers = std::str::from_utf8(&data[..header_end]).ok()?;
    let length = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("Content-Length: ")
                .or_else(|| l.strip_prefix("content-length: "))
        })?
        .trim()
        .parse::<usize>()
        .ok()?;
    Some(header_end + length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_length_needs_headers_and_reads_content_length() {
        assert_eq!(
            response_length(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"),
            None
        );
        let full = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\n\r\nok\n";
        assert_eq!(response_length(full), Some(full.len()));
    }
}
