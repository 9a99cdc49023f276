//! Builds the XDP program (`lb-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! OUT_DIR, from where `dataplane.rs` embeds it.
//!
//! Toolchain choice (see README "Building"): `LB_EBPF_CARGO`/`LB_EBPF_RUSTC` if set; else a
//! rustup nightly that has `rust-src`; else Debian's `rustc-web` (`/usr/bin/rustc`, which
//! ships its library source) with `RUSTC_BOOTSTRAP=1`. All need `bpf-linker` on PATH.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("lb-ebpf");
    for watched in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-ebpf/Cargo.lock",
        "lb-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_CARGO");
    println!("cargo:rerun-if-env-changed=LB_EBPF_RUSTC");

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = root.join("target").join("ebpf");
    let (mut cmd, toolchain) = ebpf_cargo();
    // The outer build's variables describe the host build and must not leak into this one.
    for (key, _) in env::vars() {
        if key.starts_with("CARGO") || key.starts_with("RUST") {
            cmd.env_remove(&key);
        }
    }
    if let Some(rustc) = &toolchain.rustc {
        cmd.env("RUSTC", rustc);
    }
    if toolchain.bootstrap {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd.current_dir(&ebpf_dir)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core"]);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run the eBPF build ({}): {e}", toolchain.describe));
    assert!(
        status.success(),
        "building lb-ebpf with {} failed; run `cargo xtask setup` to install the toolchain",
        toolchain.describe
    );
    for (built, embedded) in [("lb", "lb.bpf.o"), ("lb-baseline", "baseline.bpf.o")] {
        let object = target_dir.join("bpfel-unknown-none/release").join(built);
        std::fs::copy(&object, out_dir.join(embedded))
            .unwrap_or_else(|e| panic!("copy {}: {e}", object.display()));
    }
}

struct Toolchain {
    rustc: Option<PathBuf>,
    bootstrap: bool,
    describe: String,
}

fn ebpf_cargo() -> (Command, Toolchain) {
    if let Ok(cargo) = env::var("LB_EBPF_CARGO") {
        let rustc = env::var("LB_EBPF_RUSTC").ok().map(PathBuf::from);
        return (
            Command::new(&cargo),
            Toolchain {
                rustc,
                bootstrap: true,
                describe: format!("LB_EBPF_CARGO={cargo}"),
            },
        );
    }
    if nightly_has_rust_src() {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo"]);
        return (
            cmd,
            Toolchain {
                rustc: None,
                bootstrap: false,
                describe: "rustup nightly".into(),
            },
        );
    }
    let debian_src = Path::new("/usr/lib/rustlib/src/rust/library");
    assert!(
        debian_src.exists(),
        "no toolchain can build the eBPF program: need a rustup nightly with rust-src, or \
         Debian's rustc-web + rust-web-src; run `cargo xtask setup`"
    );
    (
        Command::new("/usr/bin/cargo"),
        Toolchain {
            rustc: Some("/usr/bin/rustc".into()),
            bootstrap: true,
            describe: "Debian rustc-web (/usr/bin/cargo)".into(),
        },
    )
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        })
}
