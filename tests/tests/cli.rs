//! The CLI in scripts: a reader that goes away ends `lb` quietly (no panic), `lb top`
//! without a terminal refuses with a clear message instead of panicking, and `--json`
//! errors are JSON.
use std::{
    io::Read,
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
};

use anyhow::{ensure, Context, Result};
use harness::daemon::lb_binary;

/// Rust's exit code for a panic.
const PANIC_EXIT: i32 = 101;

#[test]
fn a_closed_pipe_ends_lb_quietly() -> Result<()> {
    // `lb man` writes far more than a pipe holds, so it is still writing when the reader
    // goes away after a few bytes.
    let mut lb = Command::new(lb_binary()?)
        .arg("man")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run lb man")?;
    let mut stdout = lb.stdout.take().context("stdout")?;
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first)?;
    drop(stdout);
    let out = lb.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() != Some(PANIC_EXIT) && !stderr.contains("panicked"),
        "lb man into a closed pipe: {:?}, {stderr}",
        out.status
    );
    ensure!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "lb man into a closed pipe ended with {:?}",
        out.status
    );
    Ok(())
}

#[test]
fn top_without_a_terminal_refuses_clearly() -> Result<()> {
    let out = Command::new(lb_binary()?)
        .arg("top")
        .stdin(Stdio::null())
        .output()
        .context("run lb top")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "lb top without a terminal: {:?}, {stderr}",
        out.status
    );
    ensure!(
        stderr.contains("not one") && stderr.contains("lb status"),
        "unclear refusal: {stderr}"
    );
    Ok(())
}

#[test]
fn json_errors_are_json_on_stdout() -> Result<()> {
    let no_daemon = std::env::temp_dir().join(format!("lb-no-daemon-{}.sock", std::process::id()));
    for args in [
        vec![
            "--socket",
            no_daemon.to_str().context("path")?,
            "--json",
            "status",
        ],
        vec!["--json", "config", "check", "/nonexistent/lb.toml"],
        vec!["--json", "completions", "bash"],
    ] {
        let out = Command::new(lb_binary()?).args(&args).output()?;
        let error: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "lb {}: not JSON: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        ensure!(
            out.status.code() == Some(1) && error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "lb {}: {:?} {error}",
            args.join(" "),
            out.status
        );
    }
    Ok(())
}
