//! Which toolchain builds and lints `lb-ebpf` for `bpfel-unknown-none` (see README
//! "Building"): `LB_EBPF_CARGO`/`LB_EBPF_RUSTC` if set; else a rustup nightly that has
//! `rust-src`; else Debian's `rustc-web` (`/usr/bin/rustc`, which ships its library source)
//! with `RUSTC_BOOTSTRAP=1`. All need `bpf-linker` on PATH.
//!
//! Shared by lb-user's build script (the build) and xtask (`cargo clippy` on the eBPF crate).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

pub struct EbpfToolchain {
    cargo: Vec<String>,
    rustc: Option<PathBuf>,
    bootstrap: bool,
    /// Put first on PATH, so `cargo clippy` finds this toolchain's clippy, not rustup's.
    bin_dir: Option<PathBuf>,
    pub describe: String,
}

impl EbpfToolchain {
    pub fn find() -> Result<Self, String> {
        if let Ok(cargo) = env::var("LB_EBPF_CARGO") {
            return Ok(Self {
                rustc: env::var("LB_EBPF_RUSTC").ok().map(PathBuf::from),
                bootstrap: true,
                bin_dir: Path::new(&cargo).parent().map(Path::to_path_buf),
                describe: format!("LB_EBPF_CARGO={cargo}"),
                cargo: vec![cargo],
            });
        }
        if nightly_has_rust_src() {
            return Ok(Self {
                cargo: ["rustup", "run", "nightly", "cargo"]
                    .map(String::from)
                    .to_vec(),
                rustc: None,
                bootstrap: false,
                bin_dir: None,
                describe: "rustup nightly".into(),
            });
        }
        if !Path::new("/usr/lib/rustlib/src/rust/library").exists() {
            return Err(
                "no toolchain can build the eBPF program: need a rustup nightly with \
                        rust-src, or Debian's rustc-web + rust-web-src; run `cargo xtask setup`"
                    .into(),
            );
        }
        Ok(Self {
            cargo: vec!["/usr/bin/cargo".into()],
            rustc: Some("/usr/bin/rustc".into()),
            bootstrap: true,
            bin_dir: Some("/usr/bin".into()),
            describe: "Debian rustc-web (/usr/bin/cargo)".into(),
        })
    }

    /// `cargo <subcommand>` on the crate in `ebpf_dir` for the BPF target, building into
    /// `target_dir` with the release profile the verifier-tuned code expects.
    pub fn cargo(&self, subcommand: &str, ebpf_dir: &Path, target_dir: &Path) -> Command {
        let mut cmd = Command::new(&self.cargo[0]);
        cmd.args(&self.cargo[1..]);
        // The calling build's variables describe a host build and must not leak into this one.
        for (key, _) in env::vars() {
            if key.starts_with("CARGO") || key.starts_with("RUST") {
                cmd.env_remove(&key);
            }
        }
        if let Some(rustc) = &self.rustc {
            cmd.env("RUSTC", rustc);
        }
        if self.bootstrap {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        if let Some(bin_dir) = &self.bin_dir {
            let path = env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", bin_dir.display()));
        }
        cmd.current_dir(ebpf_dir)
            .env("CARGO_TARGET_DIR", target_dir)
            .args([
                subcommand,
                "--release",
                "--locked",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core"])
            // The workspace's release profile is the host's; the eBPF object wants one unit,
            // whole-program optimisation and no unwinding.
            .args(["--config", "profile.release.lto=true"])
            .args(["--config", "profile.release.codegen-units=1"])
            .args(["--config", "profile.release.panic=\"abort\""])
            // BTF, which bpf-linker makes from the debug information: the kernel takes a
            // callback (`bpf_for_each_map_elem` in lb-ebpf's `sweep`) only from a program
            // that describes its functions.
            .args(["--config", "profile.release.debug=2"])
            .args([
                "--config",
                "target.bpfel-unknown-none.rustflags=[\"-C\", \"link-arg=--btf\"]",
            ]);
        cmd
    }
}

pub fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        })
}
