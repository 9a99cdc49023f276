//! `cargo xtask package`: the Debian package, built with `dpkg-deb` from a staging tree:
//! the binary, the systemd unit, shell completions and the man page (both generated from
//! lb's clap definition by lb itself), and one example config per preset.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{cargo, output, run, workspace};

/// Where the unit and the example configs go; the package layout.
const UNIT: &str = "lib/systemd/system/lb.service";
const BINARY: &str = "usr/bin/lb";
const MAN_PAGE: &str = "usr/share/man/man1/lb.1.gz";
const EXAMPLES: &str = "usr/share/doc/lb/examples";
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "usr/share/bash-completion/completions/lb"),
    ("zsh", "usr/share/zsh/vendor-completions/_lb"),
    ("fish", "usr/share/fish/vendor_completions.d/lb.fish"),
];
const PRESETS: [&str; 4] = [
    "lync-web-external",
    "lync-web-internal",
    "lync-fe-pool",
    "lync-director",
];

/// Builds lb optimised and writes `target/lb_<version>_<arch>.deb`; returns its path.
pub fn build() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "lb-user", "--bin", "lb"]))?;
    let lb = workspace().join("target/release/lb");
    let version = capture(Command::new(&lb).arg("--version"))?
        .trim()
        .trim_start_matches("lb ")
        .to_string();
    let arch = output("dpkg", &["--print-architecture"])
        .context("dpkg --print-architecture")?
        .trim()
        .to_string();
    let name = format!("lb_{version}_{arch}");
    let root = workspace().join("target/package").join(&name);
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let put = |relative: &str, bytes: &[u8]| -> Result<()> {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().context("no parent")?)?;
        std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))
    };

    put(BINARY, &std::fs::read(&lb)?)?;
    set_mode(&root.join(BINARY), 0o755)?;
    put(
        UNIT,
        &std::fs::read(workspace().join("packaging/lb.service"))?,
    )?;
    for (shell, path) in COMPLETIONS {
        put(
            path,
            capture(Command::new(&lb).args(["completions", shell]))?.as_bytes(),
        )?;
    }
    let man = capture(Command::new(&lb).arg("man"))?;
    put(MAN_PAGE, &gzip(man.as_bytes())?)?;
    for preset in PRESETS {
        let config = capture(Command::new(&lb).args(["init", "--preset", preset]))?;
        put(&format!("{EXAMPLES}/{preset}.toml"), config.as_bytes())?;
    }
    put(
        "usr/share/doc/lb/grafana-dashboard.json",
        &std::fs::read(workspace().join("packaging/grafana-dashboard.json"))
            .context("read packaging/grafana-dashboard.json")?,
    )?;
    let installed_kib = dir_size(&root)? / 1024;
    put(
        "DEBIAN/control",
        format!(
            "Package: lb\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: lb developers <lb@localhost>\n\
             Installed-Size: {installed_kib}\n\
             Section: net\n\
             Priority: optional\n\
             Depends: iproute2\n\
             Description: XDP load balancer for Lync / Skype for Business pools\n \
             Source-address affinity, port translation, full NAT, health checks and drain,\n \
             at line rate in an XDP program. Write /etc/lb/lb.toml (lb init --preset ...),\n \
             then enable lb.service.\n"
        )
        .as_bytes(),
    )?;
    let deb = workspace().join(format!("target/{name}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb))?;
    eprintln!("xtask: wrote {}", deb.display());
    Ok(deb)
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `gzip -9n`: reproducible (no name, no timestamp), as Debian wants man pages.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-9n")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run gzip")?;
    child.stdin.take().context("gzip stdin")?.write_all(bytes)?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "gzip failed");
    Ok(out.stdout)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(mode),
    )?)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
