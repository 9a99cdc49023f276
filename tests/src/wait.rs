//! Bounded polling, the harness's one way to wait for a condition: never a bare sleep.
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Checks `check` every `every` until it holds and returns how long that took; fails,
/// naming `what`, once `limit` has passed.
pub fn until(
    limit: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}
