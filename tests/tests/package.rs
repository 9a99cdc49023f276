//! The Debian package round trip: install the .deb that `cargo xtask test` built (LB_DEB),
//! check what it installed, verify the systemd unit (`systemd-analyze verify`, and its
//! `security` exposure: systemd is not PID 1 here, so the unit is checked, not started),
//! run the unit's ExecStart command confined as the unit confines it (capabilities, no new
//! privileges, umask, the notify socket, watchdog and state directory systemd would give
//! it) against a namespace setup with real traffic, and remove the package without
//! leftovers.
//! Needs root; installs and removes the package `lb` on this machine.
use std::{
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use harness::{
    client,
    daemon::{Daemon, Sandbox},
    fixture::{Fixture, ServiceSpec},
    netns::run_cmd,
    server::Server,
    topology::{Spec, Topology, VIP},
};

const UNIT: &str = "/lib/systemd/system/lb.service";
const BINARY: &str = "/usr/bin/lb";
const INSTALLED: [&str; 7] = [
    BINARY,
    UNIT,
    "/usr/share/man/man1/lb.1.gz",
    "/usr/share/bash-completion/completions/lb",
    "/usr/share/zsh/vendor-completions/_lb",
    "/usr/share/fish/vendor_completions.d/lb.fish",
    "/usr/share/doc/lb/examples/lync-fe-pool.toml",
];
/// The config path the unit runs with.
const UNIT_CONFIG: &str = "/etc/lb/lb.toml";
/// The bound on `systemd-analyze security`'s exposure level.
const EXPOSURE_LIMIT: f64 = 4.0;
/// The watchdog the confined daemon is given here (the unit's is longer: 30 s).
const TEST_WATCHDOG: Duration = Duration::from_secs(1);

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

/// Each page lists its subcommands' pages (`lb-status(1)`, ...): every one of them is there.
fn every_man_page_named_is_installed() -> Result<()> {
    const MAN_DIR: &str = "/usr/share/man/man1";
    let pages: Vec<String> = std::fs::read_dir(MAN_DIR)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("lb") && name.ends_with(".1.gz"))
        .collect();
    ensure!(
        pages.iter().any(|p| p == "lb-backend-drain.1.gz"),
        "no page per subcommand: {pages:?}"
    );
    for page in &pages {
        let text = run_cmd("sh", &["-c", &format!("zcat {MAN_DIR}/{page}")])?.replace("\\-", "-");
        let named = text
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter_map(|word| word.strip_suffix("(1)"))
            .filter(|name| name.starts_with("lb"));
        for name in named {
            ensure!(
                Path::new(&format!("{MAN_DIR}/{name}.1.gz")).is_file(),
                "{page} names {name}(1), which is not installed"
            );
        }
    }
    Ok(())
}

#[test]
fn deb_installs_verifies_runs_and_removes_cleanly() -> Result<()> {
    let deb = deb()?;
    let installed = Installed::install(&deb)?;
    for path in INSTALLED {
        ensure!(Path::new(path).is_file(), "{path} not installed");
    }
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

/// The installed binary, run as the unit runs it and confined as the unit confines it,
/// tells systemd it is ready, feeds the watchdog, balances real connections and keeps its
/// runtime changes in the state directory. Stopped, it leaves the data plane attached;
/// removing the package (its prerm) detaches it.
fn installed_daemon_runs_confined_and_is_detached_on_removal(
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

    // systemctl stop, then dpkg -r: the prerm detaches what the stopped daemon left.
    let _config = UnitConfig::write(&daemon.config_path)?;
    daemon.stop()?;
    let attached = || -> Result<bool> { Ok(t.lb.ip(&["link", "show"])?.contains("xdp")) };
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
