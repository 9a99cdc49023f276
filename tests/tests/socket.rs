//! The control socket is root's from its first moment: a daemon started under umask 000,
//! while another user keeps trying to connect, never lets that user in. Its own test binary:
//! it changes the process's umask.
use std::{
    io::ErrorKind,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use harness::{
    daemon::{Daemon, Site},
    topology::{Spec, Topology, VIP},
};

/// `nobody`.
const OTHER_USER: libc::uid_t = 65534;
/// How long the other user keeps trying after the daemon is ready.
const AFTER_READY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Attempts {
    connected: AtomicU64,
    refused: AtomicU64,
}

#[test]
fn another_user_never_connects_to_the_control_socket() -> Result<()> {
    let topology = Topology::build(&Spec {
        backends: 1,
        clients: 1,
        ..Spec::default()
    })?;
    let socket = Daemon::socket_of(&Site::from(&topology));
    let attempts = Arc::new(Attempts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let (attempts, stop, socket) = (attempts.clone(), stop.clone(), socket.clone());
        std::thread::spawn(move || -> Result<()> {
            // The raw syscall changes this thread's credentials only (glibc's setresuid
            // would change every thread's).
            // SAFETY: no memory is involved; failure is checked.
            let rc =
                unsafe { libc::syscall(libc::SYS_setresuid, OTHER_USER, OTHER_USER, OTHER_USER) };
            ensure!(rc == 0, "setresuid: {}", std::io::Error::last_os_error());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match UnixStream::connect(&socket) {
                    Ok(_) => attempts.connected.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                        attempts.refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => 0,
                };
                std::thread::yield_now();
            }
            Ok(())
        })
    };
    // SAFETY: umask only swaps the file mode mask; this binary runs this one test.
    unsafe { libc::umask(0) };
    let services = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 443\nbackend_port = 4443\nbackends = [{{ address = \"{}\" }}]\n",
        topology.backends[0].address
    );
    let daemon = Daemon::start(&topology, &services);
    let ready = Instant::now();
    while daemon.is_ok() && ready.elapsed() < AFTER_READY {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let attacker = attacker.join().expect("the attacker thread");
    let daemon = daemon?;
    attacker?;
    let mode = std::fs::metadata(&daemon.socket)?.permissions().mode() & 0o777;
    let (connected, refused) = (
        attempts.connected.load(Ordering::Relaxed),
        attempts.refused.load(Ordering::Relaxed),
    );
    ensure!(connected == 0, "another user connected {connected} times");
    ensure!(
        refused > 0,
        "the other user never reached an existing socket"
    );
    ensure!(mode == 0o600, "socket mode {mode:o}");
    Ok(())
}
