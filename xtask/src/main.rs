//! `cargo xtask`: set up a bare machine, build, run the demo, the tests, the benchmarks.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod package;

#[path = "../../lb-user/ebpf_toolchain.rs"]
mod ebpf_toolchain;

#[derive(Parser)]
#[command(about = "lb's build and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a bare machine lacks (Debian packages, bpf-linker, bpffs). Idempotent.
    Setup,
    /// Set up, then build the daemon (with its embedded XDP program) and the harness.
    Build,
    /// Build, then run the demo: a Front End pool in namespaces with real traffic.
    Demo,
    /// Build the Debian package (target/lb_<version>_<arch>.deb): binary, systemd unit,
    /// completions, man page, example configs.
    Package,
    /// Check formatting and lints (every crate, the eBPF one for its own target), build,
    /// then run every test: unit tests, packet tests, the veth harness and the package round
    /// trip.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The long fuzz run: random and mutated frames through the real XDP program (the test
    /// suite runs 1,000,000).
    Fuzz {
        /// Frames to send.
        #[arg(long, default_value_t = 50_000_000)]
        packets: u64,
        /// Random seed (printed on failure, to reproduce).
        #[arg(long, default_value_t = 0x1b_5eed)]
        seed: u64,
    },
    /// Set up (plus nginx, nftables, HAProxy), build optimised, run the benchmarks and write
    /// BENCHMARKS.md, bench/results.json and bench/packet-cost.png.
    Bench {
        /// A shorter run (under 3 minutes) with fewer rounds and calls.
        #[arg(long)]
        quick: bool,
    },
}

/// Packages the harness and the demo run (iproute2: namespaces and veth; ethtool: veth
/// offloads; iputils-ping: the non-VIP test; bpftool: inspecting maps by hand).
const RUNTIME_PACKAGES: &[&str] = &["iproute2", "ethtool", "iputils-ping", "bpftool"];
/// Debian's Rust toolchain that ships its own library source (`-Z build-std=core` needs it).
const DEBIAN_RUST_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "rust-web-clippy",
    "zlib1g-dev",
    "libzstd-dev",
];
/// What the tests need beyond the runtime: systemd-analyze to verify the packaged unit, man
/// to resolve its Documentation= line, lintian to check the package, BIRD for the scale-out
/// test's BGP, keepalived for the HA tests' VRRP.
const TEST_PACKAGES: &[&str] = &["systemd", "man-db", "lintian", "bird2", "keepalived"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// What the benchmarks compare lb with, load and serve from, the HA pair's VRRP, plus the
/// plot's font.
const BENCH_PACKAGES: &[&str] = &[
    "wrk",
    "nginx",
    "nftables",
    "conntrack",
    "haproxy",
    "keepalived",
    "fonts-dejavu-core",
];

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup().map(drop),
        Task::Build => {
            setup()?;
            build()
        }
        Task::Demo => {
            setup()?;
            build()?;
            run(Command::new(workspace().join("target/debug/lb-demo")).env("LB_BIN", lb_binary()))
        }
        Task::Package => {
            setup()?;
            package::build().map(drop)
        }
        Task::Test { args } => {
            setup()?.ensure(TEST_PACKAGES)?;
            gates()?;
            build()?;
            let deb = package::build()?;
            run(cargo()
                .args(["test", "--workspace", "--exclude", "lb-ebpf"])
                .args(&args)
                .env("LB_BIN", lb_binary())
                .env("LB_DEB", deb))
        }
        Task::Fuzz { packets, seed } => {
            setup()?;
            build()?;
            run(cargo()
                .args([
                    "test",
                    "--release",
                    "-p",
                    "lb-tests",
                    "--test",
                    "hostile",
                    "a_million",
                    "--",
                    "--nocapture",
                ])
                .env("LB_FUZZ_PACKETS", packets.to_string())
                .env("LB_FUZZ_SEED", seed.to_string()))
        }
        Task::Bench { quick } => {
            setup()?.ensure(BENCH_PACKAGES)?;
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "lb-user",
                "-p",
                "lb-tests",
                "--bins",
            ]))?;
            let release = workspace().join("target/release");
            let mut bench = Command::new(release.join("lb-bench"));
            bench
                .current_dir(workspace())
                .env("LB_BIN", release.join("lb"));
            if quick {
                bench.arg("--quick");
            }
            run(&mut bench)
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn lb_binary() -> PathBuf {
    workspace().join("target/debug/lb")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo fmt --check` and `cargo clippy -D warnings` on every crate. lb-ebpf is linted
/// for the BPF target with the toolchain that builds it (it does not build for the host).
fn gates() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let toolchain = ebpf_toolchain::EbpfToolchain::find().map_err(anyhow::Error::msg)?;
    let root = workspace();
    run(toolchain
        .cargo(
            "clippy",
            &root.join("lb-ebpf"),
            &root.join("target/ebpf-clippy"),
        )
        .args(["--", "-D", "warnings"]))
    .with_context(|| format!("linting lb-ebpf with {}", toolchain.describe))
}

fn build() -> Result<()> {
    run(cargo().args(["build", "-p", "lb-user", "-p", "lb-tests", "--bins"]))
}

/// Returns the package installer, for tasks that need more packages.
fn setup() -> Result<Apt> {
    let mut apt = Apt::default();
    apt.ensure(RUNTIME_PACKAGES)?;
    if ebpf_toolchain::nightly_has_rust_src() {
        // The usual aya path (developer machines with internet): rustup nightly + rust-src.
        if output("bpf-linker", &["--version"]).is_none() {
            run(Command::new("cargo").args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ]))?;
        }
    } else {
        apt.ensure(DEBIAN_RUST_PACKAGES)?;
        let llvm = debian_rustc_llvm_major()?;
        apt.ensure(&[&format!("llvm-{llvm}-dev"), &format!("libpolly-{llvm}-dev")])?;
        ensure_bpf_linker(llvm)?;
    }
    ensure_bpffs()?;
    Ok(apt)
}

/// The LLVM major version Debian's rustc was built with ("LLVM version: 22.1.8").
fn debian_rustc_llvm_major() -> Result<u32> {
    let info = output("/usr/bin/rustc", &["-vV"]).context("/usr/bin/rustc -vV failed")?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("no LLVM version in `rustc -vV`")?;
    version
        .split('.')
        .next()
        .unwrap_or_default()
        .parse()
        .context("unreadable LLVM version")
}

/// bpf-linker must be built against the same LLVM major as the rustc that feeds it; a stamp
/// file records which one the installed copy was built for.
fn ensure_bpf_linker(llvm: u32) -> Result<()> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    let stamp = home.join(".lb-bpf-linker-llvm");
    let stamped = std::fs::read_to_string(&stamp).ok();
    let installed = output("bpf-linker", &["--version"]).is_some();
    if installed
        && stamped
            .as_deref()
            .is_none_or(|s| s.trim() == llvm.to_string())
    {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
    );
    let llvm_dir = format!("/usr/lib/llvm-{llvm}");
    let path = format!(
        "{llvm_dir}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm}"),
        ])
        .env("PATH", path)
        .env(format!("LLVM_SYS_{llvm}1_PREFIX"), &llvm_dir))?;
    std::fs::write(&stamp, llvm.to_string()).context("write bpf-linker stamp")
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Installs Debian packages that are missing; `apt-get update` runs at most once.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn ensure(&mut self, packages: &[&str]) -> Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|p| {
                !output("dpkg-query", &["-W", "-f=${Status}", p])
                    .is_some_and(|s| s.contains("install ok installed"))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        if !self.updated {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            self.updated = true;
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    }
}
