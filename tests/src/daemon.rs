//! The real `lb` binary running as a daemon inside the lb namespace.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use lb::api::{self, Request, Response, StatusReport};

use crate::{topology::Topology, wait::until};

/// Where a daemon runs: its namespace, the interfaces it attaches to, its SNAT addresses,
/// and a name unique to this test (for its files and pin directory).
#[derive(Debug, Clone)]
pub struct Site {
    pub name: String,
    pub netns: String,
    pub interfaces: Vec<String>,
    pub snat: Vec<IpAddr>,
}

impl From<&Topology> for Site {
    fn from(t: &Topology) -> Self {
        Self {
            name: t.prefix.clone(),
            netns: t.lb.name().to_string(),
            interfaces: t.lb_interfaces.clone(),
            snat: t
                .snat_addresses
                .iter()
                .map(|&a| IpAddr::from(a))
                .chain(t.snat_addresses6.iter().map(|&a| IpAddr::from(a)))
                .collect(),
        }
    }
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// The `lb` binary: `LB_BIN` if set, else next to the running test binary's target dir.
pub fn lb_binary() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("LB_BIN") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("lb");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("lb binary not found next to {}; build it first (`cargo build -p lb-user`, which `cargo xtask test` does) or set LB_BIN", exe.display())
}

pub struct Daemon {
    child: Child,
    binary: PathBuf,
    dir: PathBuf,
    site: Site,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    /// This test's own bpffs pin directory (removed on drop, which detaches the program).
    pub pin_dir: PathBuf,
    /// Extra `[daemon]` keys, kept for rewrites of the config.
    daemon_extra: String,
    sandbox: Option<Sandbox>,
}

/// Fails with the list of drop counters that moved, except those in `expected`.
pub fn ensure_no_drops(status: &StatusReport, expected: &[&str]) -> Result<()> {
    let drops: Vec<_> = status
        .counters
        .iter()
        .filter(|(k, v)| k.starts_with("drop_") && !expected.contains(&k.as_str()) && **v > 0)
        .collect();
    if !drops.is_empty() {
        bail!("unexpected drops: {drops:?}");
    }
    Ok(())
}

/// The `[daemon]` section for a site plus `extra` keys, with small tables (so tests load
/// quickly) unless `extra` sizes them.
pub fn daemon_section(site: &Site, socket: &Path, pin_dir: &Path, extra: &str) -> String {
    let quoted = |items: Vec<String>| -> String {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sized = extra
        .lines()
        .any(|l| l.trim_start().starts_with("max_flows"));
    format!(
        "[daemon]\ninterfaces = [{}]\nsnat_addresses = [{}]\ncontrol_socket = {:?}\npin_dir = {:?}\n{}{extra}\n",
        quoted(site.interfaces.clone()),
        quoted(site.snat.iter().map(ToString::to_string).collect()),
        socket.display().to_string(),
        pin_dir.display().to_string(),
        if sized { "" } else { "max_flows = 65536\nmax_affinities = 65536\n" },
    )
}

/// The packaged unit's confinement, as far as a process started without systemd can have
/// it: the unit's capability bounding set and no new privileges (by setpriv), its umask,
/// and the environment systemd gives a `Type=notify` unit with a watchdog and a state
/// directory.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Capability names as setpriv spells them (`bpf`, `net_admin`, ...).
    pub capabilities: Vec<String>,
    pub umask: u32,
    pub env: Vec<(String, String)>,
}

fn spawn(
    binary: &Path,
    lb_netns: &str,
    config_path: &Path,
    log_path: &Path,
    sandbox: Option<&Sandbox>,
) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    // nsenter, not `ip netns exec`: the latter remounts /sys, hiding the bpffs at
    // /sys/fs/bpf where the data plane is pinned (a restart could not adopt it).
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{lb_netns}"))
        .arg("--");
    if let Some(sandbox) = sandbox {
        let keep: String = sandbox
            .capabilities
            .iter()
            .map(|c| format!(",+{c}"))
            .collect();
        command
            .args(["setpriv", "--no-new-privs", "--inh-caps=-all"])
            .arg(format!("--bounding-set=-all{keep}"))
            .arg("--")
            .envs(sandbox.env.iter().map(|(k, v)| (k, v)));
        let umask = sandbox.umask as libc::mode_t;
        // SAFETY: umask(2) is async-signal-safe and touches no memory.
        unsafe {
            command.pre_exec(move || {
                libc::umask(umask);
                Ok(())
            })
        };
    }
    command
        .arg(binary)
        .args(["daemon", "--config"])
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawn lb daemon")
}

impl Daemon {
    /// Writes `services` (TOML `[[service]]` tables) with the topology's daemon section and
    /// starts the daemon; returns when it answers on its control socket.
    pub fn start(topology: &Topology, services: &str) -> Result<Self> {
        Self::start_with(topology, "", services)
    }

    /// Like `start`, with extra `[daemon]` keys (TOML lines).
    pub fn start_with(topology: &Topology, daemon_extra: &str, services: &str) -> Result<Self> {
        Self::start_binary(&topology.into(), &lb_binary()?, daemon_extra, services)
    }

    /// Like `start_with`, running `binary daemon --config FILE` (e.g. an installed lb).
    pub fn start_binary(
        site: &Site,
        binary: &Path,
        daemon_extra: &str,
        services: &str,
    ) -> Result<Self> {
        Self::start_sandboxed(site, binary, daemon_extra, services, None)
    }

    /// Like `start_binary`, confined as `sandbox` says.
    pub fn start_sandboxed(
        site: &Site,
        binary: &Path,
        daemon_extra: &str,
        services: &str,
        sandbox: Option<Sandbox>,
    ) -> Result<Self> {
        let socket = Self::socket_of(site);
        let dir = socket.parent().expect("a directory").to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("lb.toml");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&site.name);
        let config = format!(
            "{}{services}",
            daemon_section(site, &socket, &pin_dir, daemon_extra)
        );
        std::fs::write(&config_path, config)?;
        let child = spawn(
            binary,
            &site.netns,
            &config_path,
            &dir.join("daemon.log"),
            sandbox.as_ref(),
        )?;
        let daemon_extra = daemon_extra.to_string();
        let mut daemon = Self {
            child,
            binary: binary.to_path_buf(),
            dir,
            site: site.clone(),
            config_path,
            socket,
            pin_dir,
            daemon_extra,
            sandbox,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// Where the daemon of `site` has its control socket.
    pub fn socket_of(site: &Site) -> PathBuf {
        std::env::temp_dir()
            .join(format!("{}-lb", site.name))
            .join("lb.sock")
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon as `systemctl stop` would (SIGTERM) and waits for it to exit; the
    /// data plane stays, pinned.
    pub fn stop(&mut self) -> Result<()> {
        self.signal(libc::SIGTERM)?;
        until(STOP_TIMEOUT, POLL, "the lb daemon to stop", || {
            Ok(self.child.try_wait()?.is_some())
        })
        .map(drop)
    }

    /// Kills the daemon with SIGKILL (no chance to clean up); the data plane stays.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Kills the daemon with SIGKILL (no chance to clean up) and starts a new one with the
    /// same config; returns when the new one answers.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        self.kill()?;
        self.restart()
    }

    /// Starts the daemon again with the same config after it was killed; returns when it
    /// answers.
    pub fn restart(&mut self) -> Result<()> {
        self.child = spawn(
            &self.binary,
            &self.site.netns,
            &self.config_path,
            &self.dir.join("daemon.log"),
            self.sandbox.as_ref(),
        )?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let ready = until(READY_TIMEOUT, POLL, "the lb daemon to answer", || {
            if let Some(status) = self.child.try_wait()? {
                bail!("lb daemon exited ({status}) during start-up");
            }
            Ok(self.status().is_ok())
        });
        ready
            .map(drop)
            .with_context(|| format!("lb daemon log:\n{}", self.log()))
    }

    /// Sends a signal to the daemon process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: plain kill(2) on our own child.
        if unsafe { libc::kill(self.child.id() as i32, signal) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Rewrites the config file (daemon section kept) without telling the daemon.
    pub fn write_services(&self, services: &str) -> Result<()> {
        let section = daemon_section(&self.site, &self.socket, &self.pin_dir, &self.daemon_extra);
        Ok(std::fs::write(
            &self.config_path,
            format!("{section}\n{services}"),
        )?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn call(&self, request: Request) -> Result<Response> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(api::call(&self.socket, &request))
    }

    pub fn status(&self) -> Result<StatusReport> {
        match self.call(Request::Status)? {
            Response::Status(report) => Ok(report),
            other => Err(anyhow!("unexpected response {other:?}")),
        }
    }

    /// Rewrites the `[[service]]` part of the config and asks the daemon to apply it.
    pub fn reload(&self, services: &str) -> Result<()> {
        self.write_services(services)?;
        match self.call(Request::Reload)? {
            Response::Done => Ok(()),
            other => Err(anyhow!("reload failed: {other:?}")),
        }
    }

    /// Runs the `lb` CLI and returns its stdout, failing with its stderr on a non-zero exit.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "`lb {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the `lb` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(lb_binary()?)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first so the daemon stops cleanly; SIGKILL if it hangs. The pin directory
        // is removed below, which detaches the program.
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // Killed below whether it stopped in time or not.
        let _ = until(STOP_TIMEOUT, POLL, "the lb daemon to stop", || {
            Ok(self.child.try_wait()?.is_some())
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("lb daemon log:\n{}", self.log());
        }
        // The data plane outlives the daemon by design; this detaches it.
        let _ = lb::dataplane::remove_pins(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
