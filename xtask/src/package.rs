//! `cargo xtask package`: the Debian package, built with `dpkg-deb` from a staging tree:
//! the stripped binary, the systemd unit and maintainer scripts (packaging/), shell
//! completions and the man pages (lb's generated from its clap definition by lb itself,
//! lb.toml's from packaging/), one
//! example config per preset, the copyright and changelog, `/etc/lb` for the operator's
//! config and `/var/lib/lb` for the runtime changes; dependencies computed by
//! dpkg-shlibdeps.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{cargo, output, run, workspace};

/// Where the unit and the example configs go; the package layout.
const UNIT: &str = "lib/systemd/system/lb.service";
const BINARY: &str = "usr/bin/lb";
const MAN_PAGES: &str = "usr/share/man/man1";
/// The config file's page, written by hand (packaging/lb.toml.5; a unit test in lb-user
/// checks it describes every key).
const CONFIG_MAN_PAGE: &str = "usr/share/man/man5/lb.toml.5.gz";
const EXAMPLES: &str = "usr/share/doc/lb/examples";
const DOC: &str = "usr/share/doc/lb";
const MAINTAINER_SCRIPTS: [&str; 3] = ["postinst", "prerm", "postrm"];
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

    // Debian's own variables for who builds a package, else the author of the commit built.
    let maintainer = match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(name), Ok(email)) => format!("{name} <{email}>"),
        _ => output("git", &["log", "-1", "--format=%an <%ae>"])
            .context("git log for the maintainer")?
            .trim()
            .to_string(),
    };
    put(BINARY, &std::fs::read(&lb)?)?;
    set_mode(&root.join(BINARY), 0o755)?;
    run(Command::new("strip")
        .args(["--strip-unneeded", "--remove-section=.comment"])
        .arg(root.join(BINARY)))?;
    // /var/lib/lb as the unit's StateDirectory= makes it; the state file in it is 0600.
    for (dir, mode) in [("etc/lb", 0o755), ("var/lib/lb", 0o755)] {
        std::fs::create_dir_all(root.join(dir))?;
        set_mode(&root.join(dir), mode)?;
    }
    for script in MAINTAINER_SCRIPTS {
        let path = format!("DEBIAN/{script}");
        put(
            &path,
            &std::fs::read(workspace().join("packaging/debian").join(script))?,
        )?;
        set_mode(&root.join(path), 0o755)?;
    }
    put(
        &format!("{DOC}/copyright"),
        &std::fs::read(workspace().join("packaging/copyright"))?,
    )?;
    put(
        &format!("{DOC}/changelog.gz"),
        &gzip(changelog(&version, &maintainer)?.as_bytes())?,
    )?;
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
    let pages = workspace().join("target/package/man");
    if pages.exists() {
        std::fs::remove_dir_all(&pages)?;
    }
    run(Command::new(&lb).arg("man").arg("--dir").arg(&pages))?;
    for page in std::fs::read_dir(&pages)? {
        let page = page?;
        let name = page.file_name().to_string_lossy().into_owned();
        put(
            &format!("{MAN_PAGES}/{name}.gz"),
            &gzip(&std::fs::read(page.path())?)?,
        )?;
    }
    put(
        CONFIG_MAN_PAGE,
        &gzip(&std::fs::read(workspace().join("packaging/lb.toml.5"))?)?,
    )?;
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
    put("DEBIAN/md5sums", md5sums(&root)?.as_bytes())?;
    let depends = format!("{}, iproute2", shared_library_depends(&root.join(BINARY))?);
    put(
        "DEBIAN/control",
        format!(
            "Package: lb\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: {maintainer}\n\
             Installed-Size: {installed_kib}\n\
             Section: net\n\
             Priority: optional\n\
             Depends: {depends}\n\
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

/// The binary's library dependencies with their minimum versions, as dpkg-shlibdeps
/// computes them (it wants a debian/control beside it).
fn shared_library_depends(binary: &Path) -> Result<String> {
    let scratch = workspace().join("target/package/shlibdeps");
    std::fs::create_dir_all(scratch.join("debian"))?;
    std::fs::write(
        scratch.join("debian/control"),
        "Source: lb\n\nPackage: lb\nArchitecture: any\n",
    )?;
    let out = capture(
        Command::new("dpkg-shlibdeps")
            .args(["-O", "-e"])
            .arg(binary)
            .current_dir(&scratch),
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

/// A native package's changelog: one entry for the version built, by `maintainer`, dated
/// by the last commit.
fn changelog(version: &str, maintainer: &str) -> Result<String> {
    let date =
        output("git", &["log", "-1", "--format=%aD"]).context("git log for the changelog date")?;
    Ok(format!(
        "lb ({version}) unstable; urgency=medium\n\n  * Built from the lb repository; see its git history.\n\n -- {maintainer}  {}\n",
        date.trim()
    ))
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

/// `md5sum` of every file the package installs, paths relative to the root (DEBIAN/ left
/// out), as dpkg expects in `DEBIAN/md5sums`.
fn md5sums(root: &Path) -> Result<String> {
    let mut files = Vec::new();
    collect_files(root, root, &mut files)?;
    files.retain(|f| !f.starts_with("DEBIAN/"));
    files.sort();
    capture(Command::new("md5sum").args(&files).current_dir(root))
}

fn collect_files(root: &Path, dir: &Path, into: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(root, &path, into)?;
        } else {
            let relative = path.strip_prefix(root)?;
            into.push(relative.to_str().context("non-UTF-8 path")?.to_string());
        }
    }
    Ok(())
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
