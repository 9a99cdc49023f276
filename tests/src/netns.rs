//! Network namespaces owned by a test: created with a unique name, deleted on drop (also
//! when the test panics), and usable from this process by running code on a thread that
//! has entered the namespace. Sockets keep the namespace they were created in, so a socket
//! made inside `Netns::run` can be used from any thread afterwards.
use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};

/// A short prefix unique to this process and call, so parallel tests and parallel runs
/// never share a namespace name. Interface names stay inside their namespaces, so only
/// namespace names need to be unique.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("lbt{}x{n}", std::process::id())
}

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn run_cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the Debian `package` unless `program --version` runs already (the tests that
/// need BIRD or keepalived install them on a machine that lacks them).
pub fn ensure_program(program: &str, package: &str) -> Result<()> {
    if run_cmd(program, &["--version"]).is_ok() {
        return Ok(());
    }
    run_cmd(
        "apt-get",
        &["install", "-y", "-qq", "--no-install-recommends", package],
    )
    .with_context(|| format!("install {package}"))
    .map(drop)
}

/// A veth pair from `a_dev` in `a` to `b_dev` in `b`, both ends up.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    run_cmd(
        "ip",
        &[
            "link",
            "add",
            a_dev,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_dev,
            "netns",
            b.name(),
        ],
    )?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"]).map(drop)
}

#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run_cmd("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run_cmd("ip", &full)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run_cmd("ip", &full)
    }

    /// Runs many `ip` commands (one per line) in one process.
    pub fn ip_batch(&self, commands: &[String]) -> Result<()> {
        let file = std::env::temp_dir().join(format!("{}-batch", self.name));
        std::fs::write(&file, commands.join("\n") + "\n")?;
        let result = self.ip(&["-batch", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(&file);
        result.map(drop)
    }

    /// Adds `addresses` (with prefix length `prefix`) to `dev`, in one `ip` process.
    pub fn add_addresses(&self, dev: &str, addresses: &[Ipv4Addr], prefix: u8) -> Result<()> {
        self.ip_batch(
            &addresses
                .iter()
                .map(|a| format!("addr add {a}/{prefix} dev {dev}"))
                .collect::<Vec<_>>(),
        )
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("open namespace {}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: valid namespace fd; setns only affects this new thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_cmd("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}
