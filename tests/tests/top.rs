//! `lb top` under a pseudo-terminal, as over ssh: the rendered screen (through a terminal
//! emulator) shows the pool, follows a drain within its refresh, and `q` quits cleanly.
//! Needs root (the daemon).
use std::{
    fs::File,
    io::{Read, Write},
    os::fd::{FromRawFd, OwnedFd},
    os::unix::process::CommandExt,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use harness::{
    client::Connection,
    daemon::lb_binary,
    fixture::{Fixture, ServiceSpec},
    topology::Spec,
    wait::until,
};

const ROWS: u16 = 40;
const COLUMNS: u16 = 140;
const SCREEN_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

/// A program on the slave side of a new pseudo-terminal; what it draws is fed to a vt100
/// emulator, whose screen the test reads.
struct Terminal {
    child: Child,
    master: File,
    screen: Arc<Mutex<vt100::Parser>>,
}

impl Terminal {
    fn spawn(command: &mut Command) -> Result<Self> {
        let size = libc::winsize {
            ws_row: ROWS,
            ws_col: COLUMNS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty fills two fds; the name and termios arguments may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        if rc != 0 {
            bail!("openpty: {}", std::io::Error::last_os_error());
        }
        // SAFETY: both fds were just opened by openpty and are owned here only.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        command
            .stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave))
            .env("TERM", "xterm-256color");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // A session of its own, with the pty as its controlling terminal.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("spawn under a pty")?;
        let master = File::from(master);
        let screen = Arc::new(Mutex::new(vt100::Parser::new(
            ROWS.try_into()?,
            COLUMNS.try_into()?,
            0,
        )));
        let mut reader = master.try_clone()?;
        let feed = screen.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            // Ends with EIO once the child has exited and the slave is closed.
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                feed.lock().unwrap().process(&buffer[..n]);
            }
        });
        Ok(Self {
            child,
            master,
            screen,
        })
    }

    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Waits until every one of `texts` is on the screen; returns the screen.
    fn wait_for(&self, texts: &[&str]) -> Result<String> {
        let mut screen = String::new();
        let shown = until(SCREEN_TIMEOUT, POLL, "the screen", || {
            screen = self.contents();
            Ok(texts.iter().all(|t| screen.contains(t)))
        });
        shown.with_context(|| format!("{texts:?} not all on screen:\n{screen}"))?;
        Ok(screen)
    }

    fn type_keys(&mut self, keys: &[u8]) -> Result<()> {
        Ok(self.master.write_all(keys)?)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut status = None;
        let exited = until(timeout, POLL, "lb top to exit", || {
            status = self.child.try_wait()?;
            Ok(status.is_some())
        });
        exited.with_context(|| format!("still running:\n{}", self.contents()))?;
        status.context("exited without a status")
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lb_top_shows_the_pool_follows_a_drain_and_quits() -> Result<()> {
    let f = Fixture::start(
        &Spec {
            clients: 3,
            ..Spec::default()
        },
        ServiceSpec::default(),
    )?;
    // Live connections, so flows and affinities show.
    let mut open = Vec::new();
    for &c in &f.topology.client_addresses {
        let mut conn = Connection::open(&f.topology.client, c, 0, f.vip())?;
        conn.ask()?;
        open.push(conn);
    }
    let mut top = Terminal::spawn(
        Command::new(lb_binary()?)
            .arg("--socket")
            .arg(&f.daemon.socket)
            .arg("top"),
    )?;
    let backends: Vec<String> = f
        .topology
        .backends
        .iter()
        .map(|b| format!("{}:4443", b.address))
        .collect();
    let mut expected = vec!["web-ext 10.100.0.1:443 tcp", "hottest clients", "up"];
    expected.extend(backends.iter().map(String::as_str));
    top.wait_for(&expected)?;

    let victim = f.topology.backends[0].address.to_string();
    f.daemon.cli_ok(&["backend", "drain", "web-ext", &victim])?;
    let screen = top.wait_for(&["draining"])?;
    let victim_row = screen
        .lines()
        .find(|l| l.contains(&backends[0]))
        .context("victim row")?;
    if !victim_row.contains("draining") {
        bail!("the drained server's row: {victim_row}");
    }

    top.type_keys(b"q")?;
    let status = top.wait_exit(Duration::from_secs(5))?;
    if !status.success() {
        bail!("lb top exited with {status}");
    }
    Ok(())
}
