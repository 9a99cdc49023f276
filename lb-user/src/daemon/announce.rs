//! Route announcement through BIRD: lb writes a config fragment with a static route per VIP
//! this node serves, and has BIRD re-read its config. bird.conf includes the fragment and
//! exports the protocols `lb_vips4` / `lb_vips6` to the router over BGP (see
//! docs/scale-out.md), which spreads clients over the nodes by ECMP.
//!
//! A daemon killed outright leaves its routes announced, which is right: the pinned data
//! plane keeps forwarding without it. A daemon that stops on purpose withdraws them first.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::config::AnnounceConfig;

/// How long BIRD may take to re-read its config.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The fragment for `vips`: both protocols always exist (possibly empty), so bird.conf can
/// refer to them whatever is announced.
pub fn fragment(vips: &BTreeSet<IpAddr>) -> String {
    let routes = |v6: bool| -> String {
        vips.iter()
            .filter(|v| v.is_ipv6() == v6)
            .map(|v| {
                let len = if v6 { 128 } else { 32 };
                format!("  route {v}/{len} blackhole;\n")
            })
            .collect()
    };
    format!(
        "# Written by lb: the VIPs this node announces. Do not edit; include it from bird.conf\n\
         # and export protocols lb_vips4 and lb_vips6 over BGP with `next hop self`.\n\
         protocol static lb_vips4 {{\n  ipv4;\n{}}}\n\
         protocol static lb_vips6 {{\n  ipv6;\n{}}}\n",
        routes(false),
        routes(true)
    )
}

pub struct Announcer {
    config: AnnounceConfig,
    /// What BIRD was last told successfully; None until the first update succeeds.
    announced: Option<BTreeSet<IpAddr>>,
}

impl Announcer {
    pub fn new(config: AnnounceConfig) -> Self {
        Self {
            config,
            announced: None,
        }
    }

    pub fn announced(&self) -> Vec<IpAddr> {
        self.announced.iter().flatten().copied().collect()
    }

    /// Makes BIRD announce exactly `wanted`; does nothing if it already does. A failure is
    /// returned and retried on the next call.
    pub async fn update(&mut self, wanted: BTreeSet<IpAddr>) -> Result<()> {
        if self.announced.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let path = &self.config.bird_fragment;
        let staging = path.with_extension("lb-new");
        std::fs::write(&staging, fragment(&wanted))
            .with_context(|| format!("write {}", staging.display()))?;
        // Renamed into place, so BIRD never reads half a file.
        std::fs::rename(&staging, path).with_context(|| format!("replace {}", path.display()))?;
        self.reload().await?;
        let before = self.announced.replace(wanted.clone()).unwrap_or_default();
        for vip in wanted.difference(&before) {
            info!(%vip, "announcing VIP");
        }
        for vip in before.difference(&wanted) {
            info!(%vip, "withdrawing VIP");
        }
        Ok(())
    }

    async fn reload(&self) -> Result<()> {
        let (program, args) = self
            .config
            .reload_command
            .split_first()
            .context("empty reload_command")?;
        let run = tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(RELOAD_TIMEOUT, run)
            .await
            .with_context(|| format!("{program} did not finish within {RELOAD_TIMEOUT:?}"))?
            .with_context(|| format!("cannot run {program}"))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                self.config.reload_command.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // birdc reports configuration errors on stdout with a zero exit status.
        let said = String::from_utf8_lossy(&out.stdout);
        if said
            .lines()
            .any(|l| l.contains("error") || l.contains("Error"))
        {
            bail!(
                "{} reported: {}",
                self.config.reload_command.join(" "),
                said.trim()
            );
        }
        Ok(())
    }

    /// Withdraws everything (the daemon is stopping). Logged, not returned: stopping goes on.
    pub async fn withdraw_all(&mut self) {
        if let Err(e) = self.update(BTreeSet::new()).await {
            warn!(error = %format!("{e:#}"), "could not withdraw the VIPs; BIRD keeps announcing them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_lists_each_family_in_its_protocol() {
        let vips: BTreeSet<IpAddr> = ["10.100.0.1", "fd00:100::1", "10.100.0.2"]
            .iter()
            .map(|v| v.parse().unwrap())
            .collect();
        let text = fragment(&vips);
        let (v4_at, v6_at) = (
            text.find("protocol static lb_vips4").unwrap(),
            text.find("protocol static lb_vips6").unwrap(),
        );
        let v4 = &text[v4_at..v6_at];
        assert!(v4.contains("route 10.100.0.1/32 blackhole;"));
        assert!(v4.contains("route 10.100.0.2/32 blackhole;"));
        assert!(!v4.contains("fd00"));
        assert!(text[v6_at..].contains("route fd00:100::1/128 blackhole;"));
        let empty = fragment(&BTreeSet::new());
        assert!(
            empty.contains("protocol static lb_vips4 {\n  ipv4;\n}"),
            "{empty}"
        );
    }

    #[tokio::test]
    async fn a_failing_reload_is_reported_and_retried() {
        let dir = std::env::temp_dir().join(format!("lb-announce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fragment_path = dir.join("vips.conf");
        let mut announcer = Announcer::new(AnnounceConfig {
            bird_fragment: fragment_path.clone(),
            reload_command: vec!["false".into()],
        });
        let wanted: BTreeSet<IpAddr> = ["10.100.0.1".parse().unwrap()].into();
        assert!(announcer.update(wanted.clone()).await.is_err());
        assert!(
            announcer.announced().is_empty(),
            "not announced until BIRD took it"
        );
        announcer.config.reload_command = vec!["true".into()];
        announcer.update(wanted).await.unwrap();
        assert_eq!(
            announcer.announced(),
            ["10.100.0.1".parse::<IpAddr>().unwrap()]
        );
        assert!(std::fs::read_to_string(&fragment_path)
            .unwrap()
            .contains("10.100.0.1/32"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
