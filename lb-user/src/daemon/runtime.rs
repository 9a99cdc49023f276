//! Changes made at run time (`lb backend add/remove/drain/undrain/weight`), kept as an
//! overlay on top of the config file and persisted (see `state_path`), so they survive
//! daemon restarts and config reloads.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, Config};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    #[serde(default)]
    pub services: BTreeMap<String, ServiceOverlay>,
    /// `lb node drain`: this node announces no VIP, so the router sends new clients to
    /// the other nodes; the flows it carries continue.
    #[serde(default)]
    pub node_drained: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceOverlay {
    /// Servers added with `lb backend add`.
    #[serde(default)]
    pub added: BTreeMap<IpAddr, BackendConfig>,
    /// Configured servers taken out with `lb backend remove`.
    #[serde(default)]
    pub removed: BTreeSet<IpAddr>,
    #[serde(default)]
    pub weights: BTreeMap<IpAddr, u32>,
    #[serde(default)]
    pub draining: BTreeMap<IpAddr, Drain>,
}

/// A drain in progress: no new clients; existing flows and affinities continue until the
/// optional deadline (Unix seconds), after which they are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    pub deadline_unix: Option<u64>,
    /// The deadline passed and the remaining flows and affinities were removed.
    #[serde(default)]
    pub cut: bool,
}

/// One server as it is now: config plus runtime changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveBackend {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub drain: Option<Drain>,
}

impl Overlay {
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "state file {} is unreadable; move it away to start from the config alone",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    /// Loads the overlay from `path`; the first time, from `earlier` (where a release
    /// before the state directory kept it, next to the config), written to `path` at once.
    /// The earlier file stays: /etc may be read-only to the daemon.
    pub fn load_or_migrate(path: &Path, earlier: &Path) -> Result<Self> {
        if path == earlier || path.exists() || !earlier.exists() {
            return Self::load(path);
        }
        let overlay = Self::load(earlier)?;
        overlay.save(path)?;
        tracing::info!(from = %earlier.display(), to = %path.display(), "runtime changes moved to the state directory");
        Ok(overlay)
    }

    /// Writes atomically (temporary file, then rename), so a crash never leaves half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))
    }

    pub fn service_mut(&mut self, name: &str) -> &mut ServiceOverlay {
        self.services.entry(name.to_string()).or_default()
    }

    /// The servers of `service` after runtime changes, in config order then added order.
    pub fn backends(&self, config: &Config, service: &str) -> Vec<EffectiveBackend> {
        let Some(svc) = config.services.iter().find(|s| s.name == service) else {
            return Vec::new();
        };
        let empty = ServiceOverlay::default();
        let o = self.services.get(service).unwrap_or(&empty);
        svc.backends
            .iter()
            .filter(|b| !o.removed.contains(&b.address) && !o.added.contains_key(&b.address))
            .chain(o.added.values())
            .map(|b| EffectiveBackend {
                address: b.address,
                port: b
                    .port
                    .or(svc.backend_port())
                    .unwrap_or(lb_common::BACKEND_PORT_KEEP),
                weight: o.weights.get(&b.address).copied().unwrap_or(b.weight),
                drain: o.draining.get(&b.address).copied(),
            })
            .collect()
    }

    /// Drops entries for services the config no longer has, so a stale overlay cannot
    /// resurrect them.
    pub fn retain_services(&mut self, config: &Config) {
        self.services
            .retain(|name, _| config.services.iter().any(|s| &s.name == name));
    }
}

/// `<config name>.state.json` in `state_directory` (systemd's `StateDirectory=`, which
/// the packaged unit sets to /var/lib/lb; `$STATE_DIRECTORY` lists it first), else next to
/// the config file.
pub fn state_path(config_path: &Path, state_directory: Option<&Path>) -> PathBuf {
    let mut name = config_path.file_name().unwrap_or_default().to_os_string();
    name.push(".state.json");
    match state_directory {
        Some(dir) => dir.join(name),
        None => config_path.with_file_name(name),
    }
}

/// The first directory of systemd's `$STATE_DIRECTORY` (colon-separated).
pub fn state_directory() -> Option<PathBuf> {
    let dirs = std::env::var_os("STATE_DIRECTORY")?;
    let first = dirs.to_str()?.split(':').next()?;
    (!first.is_empty()).then(|| PathBuf::from(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(crate::config::tests::MINIMAL).unwrap()
    }

    #[test]
    fn overlay_adds_removes_reweights_and_drains() {
        let config = config();
        let mut o = Overlay::default();
        let s = o.service_mut("web-ext");
        s.added.insert(
            "10.2.0.13".parse().unwrap(),
            BackendConfig {
                address: "10.2.0.13".parse().unwrap(),
                port: Some(8443),
                weight: 2,
            },
        );
        s.removed.insert("10.2.0.11".parse().unwrap());
        s.weights.insert("10.2.0.12".parse().unwrap(), 5);
        s.draining.insert(
            "10.2.0.12".parse().unwrap(),
            Drain {
                deadline_unix: Some(9),
                cut: false,
            },
        );
        let b = o.backends(&config, "web-ext");
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].address.to_string(), b[0].port, b[0].weight),
            ("10.2.0.12".into(), 4443, 5)
        );
        assert!(b[0].drain.is_some());
        assert_eq!(
            (b[1].address.to_string(), b[1].port, b[1].weight),
            ("10.2.0.13".into(), 8443, 2)
        );
    }

    #[test]
    fn state_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("lb-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = state_path(&dir.join("lb.toml"), None);
        assert_eq!(path, dir.join("lb.toml.state.json"));
        assert_eq!(Overlay::load(&path).unwrap(), Overlay::default());
        let mut o = Overlay::default();
        o.service_mut("web-ext")
            .removed
            .insert("10.2.0.11".parse().unwrap());
        o.save(&path).unwrap();
        assert_eq!(Overlay::load(&path).unwrap(), o);
        std::fs::write(&path, "{ not json").unwrap();
        assert!(format!("{:#}", Overlay::load(&path).unwrap_err()).contains("unreadable"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_services_are_forgotten() {
        let mut o = Overlay::default();
        o.service_mut("gone")
            .removed
            .insert("10.2.0.11".parse().unwrap());
        o.service_mut("web-ext");
        o.retain_services(&config());
        assert_eq!(o.services.keys().collect::<Vec<_>>(), ["web-ext"]);
    }

    #[test]
    fn state_moves_from_beside_the_config_to_the_state_directory_once() {
        let dir = std::env::temp_dir().join(format!("lb-state-move-{}", std::process::id()));
        let (etc, var) = (dir.join("etc"), dir.join("var"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&var).unwrap();
        let config = etc.join("lb.toml");
        let (earlier, path) = (state_path(&config, None), state_path(&config, Some(&var)));
        assert_eq!(path, var.join("lb.toml.state.json"));
        let mut o = Overlay::default();
        o.service_mut("web-ext")
            .removed
            .insert("10.2.0.11".parse().unwrap());
        o.save(&earlier).unwrap();
        assert_eq!(Overlay::load_or_migrate(&path, &earlier).unwrap(), o);
        assert_eq!(
            Overlay::load(&path).unwrap(),
            o,
            "written to the state directory"
        );
        // From then on the state directory's copy rules, whatever the earlier file says.
        Overlay::default().save(&path).unwrap();
        assert_eq!(
            Overlay::load_or_migrate(&path, &earlier).unwrap(),
            Overlay::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
