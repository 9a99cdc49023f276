//! Builds the XDP program (`lb-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! OUT_DIR, from where `dataplane/mod.rs` embeds it. The toolchain is chosen in
//! `ebpf_toolchain.rs`.
use std::{env, path::PathBuf};

#[path = "ebpf_toolchain.rs"]
mod ebpf_toolchain;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("lb-ebpf");
    for watched in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "Cargo.lock",
        "lb-common/src",
        "lb-user/ebpf_toolchain.rs",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_CARGO");
    println!("cargo:rerun-if-env-changed=LB_EBPF_RUSTC");

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = root.join("target").join("ebpf");
    let toolchain = ebpf_toolchain::EbpfToolchain::find().unwrap_or_else(|e| panic!("{e}"));
    let status = toolchain
        .cargo("build", &ebpf_dir, &target_dir)
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
