//! The Debian package round trip: install the .deb that `cargo xtask test` built (LB_DEB),
//! check what it installed, verify the systemd unit (`systemd-analyze verify`: systemd is
//! not PID 1 here, so the unit is checked, not started), run the unit's ExecStart command
//! against a namespace setup with real traffic, and remove the package without leftovers.
//! Needs root; installs and removes the package `lb` on this machine.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context, Result};
use harness::{
    client,
    daemon::Daemon,
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

/// The unit's `ExecStart=` command line, split on whitespace (the unit quotes nothing).
fn exec_start(unit: &str) -> Result<Vec<String>> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("no ExecStart= in the unit")?;
    Ok(line.split_whitespace().map(str::to_string).collect())
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
    run_cmd(
        BINARY,
        &[
            "config",
            "check",
            "--strict",
            "/usr/share/doc/lb/examples/lync-fe-pool.toml",
        ],
    )?;
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

    // The unit's command, with the config it names replaced by one for a namespace setup.
    let command = exec_start(&std::fs::read_to_string(UNIT)?)?;
    ensure!(
        command == [BINARY, "daemon", "--config", UNIT_CONFIG],
        "unexpected ExecStart {command:?}"
    );
    check_installed_daemon_forwards(Path::new(&command[0]))?;

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

/// The installed binary, run as the unit runs it, balances real connections.
fn check_installed_daemon_forwards(binary: &Path) -> Result<()> {
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
    let daemon = Daemon::start_binary(
        &(&t).into(),
        binary,
        "",
        &service.toml(&Fixture::addresses(&t)),
    )?;
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
    Ok(())
}
