//! The Debian package round trip: lintian it, install the .deb that `cargo xtask test` built (LB_DEB),
//! check what it installed, verify the systemd unit (`systemd-analyze verify`, and its
//! `security` exposure: systemd is not PID 1 here, so the unit is checked, not started),
//! run the unit's ExecStart command confined as the unit confines it (capabilities, no new
//! privileges, umask, the notify socket, watchdog and state directory systemd would give
//! it) against a namespace setup with real traffic, upgrade it to a newer build under
//! traffic, and remove the package without leftovers.
//! Needs root; installs and removes the package `lb` on this machine.
use std::{
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use harness::{
    client,
    daemon::{Daemon, Sandbox},
    fixture::{Fixture, ServiceSpec},
    heartbeat::{Heartbeat, Held},
    netns::run_cmd,
    server::Server,
    topology::{Spec, Topology, VIP},
    wait::until,
};

const UNIT: &str = "/lib/systemd/system/lb.service";
const BINARY: &str = "/usr/bin/lb";
const INSTALLED: [&str; 8] = [
    BINARY,
    UNIT,
    "/usr/share/man/man1/lb.1.gz",
    "/usr/share/man/man5/lb.toml.5.gz",
    "/usr/share/bash-completion/completions/lb",
    "/usr/share/zsh/vendor-completions/_lb",
    "/usr/share/fish/vendor_completions.d/lb.fish",
    "/usr/share/doc/lb/examples/lync-fe-pool.toml",
];
/// What enabling the unit (postinst, through deb-systemd-helper) creates.
const ENABLED_LINK: &str = "/etc/systemd/system/multi-user.target.wants/lb.service";
/// The config path the unit runs with.
const UNIT_CONFIG: &str = "/etc/lb/lb.toml";
/// The bound on `systemd-analyze security`'s exposure level.
const EXPOSURE_LIMIT: f64 = 4.0;
/// The watchdog the confined daemon is given here (the unit's is longer: 30 s).
const TEST_WATCHDOG: Duration = Duration::from_secs(1);
/// Connections held open through the upgrade, each asking every `UPGRADE_BEAT`.
const UPGRADE_CONNECTIONS: usize = 24;
const UPGRADE_BEAT: Duration = Duration::from_millis(200);

fn deb() -> Result<PathBuf> {
    let path = std::env::var("LB_DEB").context(
        "LB_DEB is not set: run the tests with `cargo xtask test`, which builds the package",
    )?;
    Ok(path.into())
}

/// Purges the package when dropped, so a failed test leaves nothing installed.
struct Installed;

impl Installed {
    fn install(deb: &Path) -> Result<Self> {
        run_cmd("dpkg", &["-i", deb.to_str().context("LB_DEB path")?])?;
        Ok(Self)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run_cmd("dpkg", &["--purge", "lb"]);
    }
}

/// The value of the unit's `key=` line.
fn unit_value<'a>(unit: &'a str, key: &str) -> Result<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key}= in the unit"))
}

/// The unit's `ExecStart=` command line, split on whitespace (the unit quotes nothing).
fn exec_start(unit: &str) -> Result<Vec<String>> {
    Ok(unit_value(unit, "ExecStart")?
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// A directory removed on drop, also when the test fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `systemd-analyze security`'s overall exposure of the installed unit.
fn exposure() -> Result<f64> {
    let out = run_cmd(
        "systemd-analyze",
        &["security", "--offline=yes", "--no-pager", UNIT],
    )?;
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .with_context(|| format!("no exposure level in: {out}"))?;
    let level = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("unreadable: {line}"))?;
    Ok(level.parse()?)
}

/// Each page lists its subcommands' pages (`lb-status(1)`, ...) or the config file's
/// (`lb.toml(5)`): every page any of them names is there.
fn every_man_page_named_is_installed() -> Result<()> {
    const MAN_ROOT: &str = "/usr/share/man";
    let mut pages = Vec::new();
    for section in ["1", "5"] {
        for entry in std::fs::read_dir(format!("{MAN_ROOT}/man{section}"))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with("lb") && name.ends_with(&format!(".{section}.gz")) {
                pages.push(format!("{MAN_ROOT}/man{section}/{name}"));
            }
        }
    }
    ensure!(
        pages.iter().any(|p| p.ends_with("/lb-backend-drain.1.gz")),
        "no page per subcommand: {pages:?}"
    );
    let mut names_config_page = false;
    for page in &pages {
        let text = run_cmd("sh", &["-c", &format!("zcat {page}")])?
            .replace("\\-", "-")
            .replace("\\fR", "")
            .replace("\\fB", "");
        for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == ';') {
            let word = word.trim_end_matches(['.', ')']);
            let Some((name, section)) = word
                .strip_suffix("(1")
                .map(|n| (n, "1"))
                .or_else(|| word.strip_suffix("(5").map(|n| (n, "5")))
            else {
                continue;
            };
            if !name.starts_with("lb") {
                continue;
            }
            names_config_page |= name == "lb.toml";
            let target = format!("{MAN_ROOT}/man{section}/{name}.{section}.gz");
            ensure!(
                Path::new(&target).is_file(),
                "{page} names {name}({section}), which is not installed"
            );
        }
    }
    ensure!(names_config_page, "no page points to lb.toml(5)");
    Ok(())
}

/// lintian finds neither errors nor warnings in the package.
fn lintian_is_clean(deb: &Path) -> Result<()> {
    let out = std::process::Command::new("lintian")
        .args(["--fail-on", "error,warning"])
        .arg(deb)
        .output()
        .context("cannot run lintian")?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "lintian {}: {report}{}",
        deb.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn deb_installs_verifies_runs_and_removes_cleanly() -> Result<()> {
    let deb = deb()?;
    lintian_is_clean(&deb)?;
    let installed = Installed::install(&deb)?;
    for path in INSTALLED {
        ensure!(Path::new(path).is_file(), "{path} not installed");
    }
    ensure!(
        Path::new(ENABLED_LINK).exists(),
        "the install did not enable lb.service ({ENABLED_LINK})"
    );
    let version = run_cmd(BINARY, &["--version"])?;
    ensure!(version.starts_with("lb "), "lb --version: {version}");
    let man = run_cmd("sh", &["-c", "zcat /usr/share/man/man1/lb.1.gz"])?;
    ensure!(man.contains(".TH lb 1") && man.contains("init"), "man page");
    every_man_page_named_is_installed()?;
    // The example names another machine's interfaces and addresses: those are the only
    // warnings it may get here (`lb config check` warns of what this host lacks).
    let checked = run_cmd(
        BINARY,
        &[
            "config",
            "check",
            "/usr/share/doc/lb/examples/lync-fe-pool.toml",
        ],
    )?;
    let other = checked
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .find(|l| {
            !l.starts_with("warning: daemon.interfaces[")
                && !l.starts_with("warning: daemon.snat_addresses[")
        });
    ensure!(other.is_none(), "the example config: {checked}");
    // From a neutral directory: verify also looks at unit files in the working directory.
    let verify = std::process::Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .current_dir("/")
        .output()?;
    let complaints = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify {UNIT}: {complaints}"
    );
    let exposure = exposure()?;
    eprintln!("systemd-analyze security {UNIT}: exposure {exposure}");
    ensure!(
        exposure <= EXPOSURE_LIMIT,
        "{UNIT} is exposed at {exposure} (limit {EXPOSURE_LIMIT})"
    );

    // The unit's command, with the config it names replaced by one for a namespace setup.
    let command = exec_start(&std::fs::read_to_string(UNIT)?)?;
    ensure!(
        command == [BINARY, "daemon", "--config", UNIT_CONFIG],
        "unexpected ExecStart {command:?}"
    );
    installed_daemon_runs_confined_and_is_detached_on_removal(
        &deb,
        Path::new(&command[0]),
        &std::fs::read_to_string(UNIT)?,
    )?;

    drop(installed);
    let left: Vec<&str> = INSTALLED
        .iter()
        .copied()
        .filter(|p| Path::new(p).exists())
        .collect();
    ensure!(left.is_empty(), "left after removal: {left:?}");
    ensure!(
        !Path::new(ENABLED_LINK).exists(),
        "{ENABLED_LINK} left after purge"
    );
    let status = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "lb"])
        .output()?;
    if status.status.success() && String::from_utf8_lossy(&status.stdout).contains("installed") {
        bail!("dpkg still lists lb as installed");
    }
    Ok(())
}

/// Waits for a notification that contains `message` on the notify socket; returns when.
fn notified(socket: &UnixDatagram, message: &str, within: Duration) -> Result<Instant> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == message)
            {
                return Ok(Instant::now());
            }
        }
    }
    bail!("no {message} on the notify socket within {within:?}")
}

/// Reads the notify socket until dropped, as systemd does (a daemon whose notifications
/// no one reads blocks once the socket's queue is full), counting `READY=1`s.
struct NotifyReader {
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifyReader {
    fn start(socket: UnixDatagram) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, ready) = (stop.clone(), ready.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                // The socket's read timeout bounds each wait, so the flag is seen.
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        if String::from_utf8_lossy(&buf[..n])
                            .lines()
                            .any(|l| l == "READY=1")
                        {
                            ready.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Self {
            stop,
            ready,
            thread: Some(thread),
        }
    }

    fn ready_count(&self) -> u64 {
        self.ready.load(Ordering::Relaxed)
    }
}

impl Drop for NotifyReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The operator's config at the unit's path, for the test's run; removed on drop.
struct UnitConfig;

impl UnitConfig {
    fn write(config: &Path) -> Result<Self> {
        ensure!(
            !Path::new(UNIT_CONFIG).exists(),
            "{UNIT_CONFIG} exists on this machine; the test will not overwrite it"
        );
        std::fs::create_dir_all("/etc/lb")?;
        std::fs::copy(config, UNIT_CONFIG)?;
        Ok(Self)
    }
}

impl Drop for UnitConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(UNIT_CONFIG);
    }
}

/// The package's version (`dpkg-deb -f`).
fn deb_version(deb: &Path) -> Result<String> {
    let deb = deb.to_str().context("package path")?;
    Ok(run_cmd("dpkg-deb", &["-f", deb, "Version"])?
        .trim()
        .to_string())
}

/// The same package as a newer version, for dpkg to upgrade to: unpacked, its version
/// raised, packed again.
fn newer_build(deb: &Path, scratch: &Path) -> Result<(PathBuf, String)> {
    let version = format!("{}+1", deb_version(deb)?);
    let tree = scratch.join("newer");
    let tree_str = tree.to_str().context("scratch path")?;
    run_cmd(
        "dpkg-deb",
        &["-R", deb.to_str().context("package path")?, tree_str],
    )?;
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control)?;
    let raised: Vec<String> = text
        .lines()
        .map(|l| match l.strip_prefix("Version: ") {
            Some(_) => format!("Version: {version}"),
            None => l.to_string(),
        })
        .collect();
    std::fs::write(&control, raised.join("\n") + "\n")?;
    let newer = scratch.join(format!("lb_{version}.deb"));
    run_cmd(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "--build",
            tree_str,
            newer.to_str().context("scratch path")?,
        ],
    )?;
    Ok((newer, version))
}

/// `dpkg -i` of a newer build under traffic, as an upgrade on a server runs: the old
/// prerm (`upgrade`) leaves the data plane attached, the new files replace the running
/// binary, and the daemon restarted as postinst's `systemctl try-restart` restarts it
/// adopts the data plane. Connections held through all of it keep answering, each from
/// its server.
fn upgrade_under_traffic(
    deb: &Path,
    scratch: &Path,
    daemon: &mut Daemon,
    t: &Topology,
    vip: SocketAddr,
    attached: impl Fn() -> Result<bool>,
) -> Result<()> {
    let (newer, version) = newer_build(deb, scratch)?;
    let held = Held::open_many(&t.client, &t.client_addresses, vip, UPGRADE_CONNECTIONS)?;
    let heartbeat = Heartbeat::start(held, UPGRADE_BEAT);
    heartbeat.wait_rounds(1, Duration::from_secs(10))?;
    run_cmd("dpkg", &["-i", newer.to_str().context("scratch path")?])?;
    ensure!(
        attached()?,
        "the upgrade (prerm upgrade, postinst configure) detached the data plane"
    );
    heartbeat.wait_rounds(1, Duration::from_secs(10))?;
    daemon
        .stop()
        .with_context(|| format!("daemon log:\n{}", daemon.log()))?;
    daemon.restart()?;
    heartbeat.wait_rounds(2, Duration::from_secs(10))?;
    let beats = heartbeat.stop()?;
    ensure!(
        beats.broken == 0,
        "{} of {} connections broke during the upgrade: {:?}",
        beats.broken,
        beats.connections,
        beats.breaks
    );
    eprintln!(
        "upgrade to {version} under traffic: {} connections, none broken, longest silence {:?}",
        beats.connections, beats.longest_silence
    );
    let installed = run_cmd("dpkg-query", &["-W", "-f=${Version}", "lb"])?;
    ensure!(
        installed.trim() == version,
        "dpkg lists lb {installed} after the upgrade to {version}"
    );
    Ok(())
}

/// The installed binary, run as the unit runs it and confined as the unit confines it,
/// tells systemd it is ready, feeds the watchdog, balances real connections and keeps its
/// runtime changes in the state directory; upgraded to a newer build under traffic, it
/// breaks no connection. Stopped, it leaves the data plane attached; removing the package
/// (its prerm) detaches it.
fn installed_daemon_runs_confined_and_is_detached_on_removal(
    deb: &Path,
    binary: &Path,
    unit: &str,
) -> Result<()> {
    ensure!(
        unit_value(unit, "Type")? == "notify",
        "the unit is not Type=notify"
    );
    let scratch = Scratch::new("lb-unit")?;
    let (notify_path, state_dir) = (scratch.0.join("notify"), scratch.0.join("state"));
    std::fs::create_dir_all(&state_dir)?;
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(100)))?;
    let sandbox = Sandbox {
        capabilities: unit_value(unit, "CapabilityBoundingSet")?
            .split_whitespace()
            .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
            .collect(),
        umask: u32::from_str_radix(unit_value(unit, "UMask")?, 8)?,
        env: vec![
            ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
            (
                "WATCHDOG_USEC".into(),
                TEST_WATCHDOG.as_micros().to_string(),
            ),
            ("STATE_DIRECTORY".into(), state_dir.display().to_string()),
        ],
    };
    let t = Topology::build(&Spec {
        clients: 3,
        ..Spec::default()
    })?;
    let service = ServiceSpec::default();
    let _servers = t
        .backends
        .iter()
        .map(|b| Server::start(&b.ns, &b.name, b.address, service.backend_port))
        .collect::<Result<Vec<_>>>()?;
    let mut daemon = Daemon::start_sandboxed(
        &(&t).into(),
        binary,
        "",
        &service.toml(&Fixture::addresses(&t)),
        Some(sandbox),
    )?;
    notified(&notify, "READY=1", Duration::from_secs(10))?;
    let first = notified(&notify, "WATCHDOG=1", 2 * TEST_WATCHDOG)?;
    let second = notified(&notify, "WATCHDOG=1", 2 * TEST_WATCHDOG)?;
    ensure!(
        second - first <= TEST_WATCHDOG,
        "watchdog fed every {:?}, its timeout is {TEST_WATCHDOG:?}",
        second - first
    );
    let notifications = NotifyReader::start(notify);
    for &c in &t.client_addresses {
        let reply = client::request(&t.client, c, SocketAddr::new(VIP.into(), service.port))?;
        ensure!(
            t.snat_addresses.iter().any(|a| reply.peer.ip() == *a),
            "server saw {}",
            reply.peer
        );
    }
    let new_flows = daemon.status()?.counters["new_flows"];
    ensure!(
        new_flows == t.client_addresses.len() as u64,
        "new_flows {new_flows}"
    );
    let server = t.backends[0].address.to_string();
    daemon.cli_ok(&["backend", "weight", &service.name, &server, "2"])?;
    let state = state_dir.join("lb.toml.state.json");
    let mode = std::fs::metadata(&state)
        .with_context(|| format!("runtime changes not kept in {}", state.display()))?
        .permissions()
        .mode();
    ensure!(mode & 0o077 == 0, "{} has mode {mode:o}", state.display());

    let attached = || -> Result<bool> { Ok(t.lb.ip(&["link", "show"])?.contains("xdp")) };
    let vip = SocketAddr::new(VIP.into(), service.port);
    upgrade_under_traffic(deb, &scratch.0, &mut daemon, &t, vip, attached)?;
    until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        "READY=1 from the restarted daemon",
        || Ok(notifications.ready_count() >= 1),
    )?;

    // systemctl stop, then dpkg -r: the prerm detaches what the stopped daemon left.
    let _config = UnitConfig::write(&daemon.config_path)?;
    daemon.stop()?;
    ensure!(
        attached()? && daemon.pin_dir.exists(),
        "a stopped daemon must leave the data plane running"
    );
    run_cmd("dpkg", &["--remove", "lb"])?;
    ensure!(
        !attached()? && !daemon.pin_dir.exists(),
        "the data plane is still attached or pinned after dpkg --remove"
    );
    Ok(())
}
