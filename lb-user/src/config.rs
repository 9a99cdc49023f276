//! The TOML configuration: parsing, defaults and validation. Every error names the key
//! that caused it (`service[1] "web".backends[2].address: ...`).
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::addr::SourcePrefix;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb/lb.sock";
/// Maps and links are pinned below this directory (on bpffs), in a subdirectory named after
/// the map layout version, so a restarted daemon adopts the running data plane.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// Microsoft's affinity garbage-collection guidance for Lync pools.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 1800;
/// Above the 1800 s TCP idle timeout Lync expects, so a UCWA long-poll idle for exactly
/// 1800 s is never evicted.
pub const DEFAULT_IDLE_TIMEOUT_S: u32 = 3600;
pub const DEFAULT_CLOSING_TIMEOUT_S: u32 = 10;
/// A connection must finish its handshake (UDP: get a reply) within this, or its SNAT port
/// is given back: what spoofed SYNs cost is bounded by it.
pub const DEFAULT_HANDSHAKE_TIMEOUT_S: u32 = 10;
/// Like the kernel's `ipfrag_time`.
pub const DEFAULT_FRAGMENT_TIMEOUT_S: u32 = 30;
pub const DEFAULT_MAX_HALF_OPEN: u32 = lb_common::MAX_HALF_OPEN;
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 20;
pub const DEFAULT_MAX_AFFINITIES: u32 = 1 << 20;
/// Weights are relative; the cap keeps the Maglev fill loop short.
pub const MAX_WEIGHT: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Interfaces the XDP program attaches to (front and back, or the one arm).
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpModeConfig,
    /// Source addresses for the server-side connections; must be local addresses of this
    /// box on the server-facing side so the kernel answers ARP for them.
    pub snat_addresses: Vec<IpAddr>,
    #[serde(default = "default_snat_port_min")]
    pub snat_port_min: u16,
    #[serde(default = "default_snat_port_max")]
    pub snat_port_max: u16,
    #[serde(default = "default_control_socket")]
    pub control_socket: String,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: String,
    #[serde(default = "default_closing_timeout")]
    pub closing_timeout: u32,
    /// Seconds a new flow may stay unconfirmed (TCP: handshake; UDP: first reply).
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: u32,
    /// Seconds the later fragments of a datagram may trail its first.
    #[serde(default = "default_fragment_timeout")]
    pub fragment_timeout: u32,
    /// Answer pings to VIPs (true) or leave them to the kernel (false).
    #[serde(default = "default_true")]
    pub echo_reply: bool,
    /// Unconfirmed flows tracked at once (both directions count); a SYN flood churns only
    /// this table.
    #[serde(default = "default_max_half_open")]
    pub max_half_open: u32,
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    #[serde(default = "default_max_affinities")]
    pub max_affinities: u32,
    /// Prometheus endpoint (`/metrics`), e.g. "127.0.0.1:9120"; off when absent.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Seconds between garbage collections of expired flows and affinities.
    #[serde(default = "default_gc_interval")]
    pub gc_interval: u32,
    /// Route announcement of the VIPs through BIRD; off when absent.
    pub announce: Option<AnnounceConfig>,
    /// Flow and affinity sync with the other nodes of an HA pair or ECMP group
    /// (docs/ha.md); off when absent.
    pub sync: Option<SyncConfig>,
}

impl DaemonConfig {
    /// The keys (`daemon.NAME`) whose value differs between `self` and `running`.
    pub fn changed_keys(&self, running: &DaemonConfig) -> Vec<String> {
        let (Ok(serde_json::Value::Object(new)), Ok(serde_json::Value::Object(old))) =
            (serde_json::to_value(self), serde_json::to_value(running))
        else {
            return vec!["daemon".into()];
        };
        new.iter()
            .filter(|(key, value)| old.get(*key) != Some(*value))
            .map(|(key, _)| format!("daemon.{key}"))
            .collect()
    }
}

/// lb announces a VIP while this node serves it (not drained, not stopping, at least one
/// server taking new clients) by writing a BIRD config fragment with static routes for
/// the announced VIPs (protocols `lb_vips4` and `lb_vips6`; bird.conf includes the
/// fragment and exports those protocols over BGP) and telling BIRD to reload it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceConfig {
    pub bird_fragment: std::path::PathBuf,
    /// Run after each change of the fragment.
    #[serde(default = "default_bird_reload")]
    pub reload_command: Vec<String>,
}

/// This node sends every flow it confirms, and every affinity, to each peer, and installs
/// theirs; see docs/ha.md.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Address and TCP port this node receives its peers' state on.
    pub listen: std::net::SocketAddr,
    /// The other nodes' `listen` addresses.
    pub peers: Vec<std::net::SocketAddr>,
    /// The group's shared key: 64 hex digits (`openssl rand -hex 32`), the same file on
    /// every node, readable by root only.
    pub key_file: std::path::PathBuf,
    /// keepalived's `track_file` for this node (docs/ha.md): lb writes 1 until it holds a
    /// peer's snapshot, so keepalived gives it no address while it is cold, then 0.
    pub track_file: Option<std::path::PathBuf>,
    /// Seconds a starting node waits for a peer's snapshot before it declares itself ready
    /// alone (no peer is up).
    #[serde(default = "default_bulk_sync_timeout")]
    pub bulk_sync_timeout: u32,
    /// Active/active behind ECMP: the peers' SNAT addresses this node takes over when their
    /// node dies (keepalived moves them here); their flows' return traffic is then this
    /// node's. Never used for new connections.
    #[serde(default)]
    pub backup_snat_addresses: Vec<IpAddr>,
}

fn default_bulk_sync_timeout() -> u32 {
    10
}

fn default_bird_reload() -> Vec<String> {
    vec!["birdc".into(), "configure".into()]
}

impl SyncConfig {
    fn validate(&self, own_snat: &[IpAddr]) -> Result<()> {
        if self.peers.is_empty() {
            bail!("daemon.sync.peers: name at least one other node's sync address");
        }
        let mut seen = HashSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            if *peer == self.listen {
                bail!("daemon.sync.peers[{i}]: {peer} is this node's own daemon.sync.listen");
            }
            if !seen.insert(peer) {
                bail!("daemon.sync.peers[{i}]: duplicate peer {peer}");
            }
        }
        if !self.key_file.is_absolute() {
            bail!(
                "daemon.sync.key_file: must be an absolute path, got {:?}",
                self.key_file
            );
        }
        if self.bulk_sync_timeout == 0 {
            bail!("daemon.sync.bulk_sync_timeout: must be at least 1 second");
        }
        let mut backed = HashSet::new();
        for (i, address) in self.backup_snat_addresses.iter().enumerate() {
            if own_snat.contains(address) {
                bail!("daemon.sync.backup_snat_addresses[{i}]: {address} is this node's own SNAT address (daemon.snat_addresses)");
            }
            if unusable_address(*address) {
                bail!(
                    "daemon.sync.backup_snat_addresses[{i}]: {address} cannot be a source address"
                );
            }
            if !backed.insert(address) {
                bail!("daemon.sync.backup_snat_addresses[{i}]: duplicate address {address}");
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Native (driver) mode, falling back to generic with a log line.
    #[default]
    Auto,
    Driver,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

/// The data plane's family code of an address.
/// Addresses that can be neither a VIP nor a server.
fn unusable_address(addr: IpAddr) -> bool {
    addr.is_unspecified()
        || addr.is_multicast()
        || addr.is_loopback()
        || matches!(addr, IpAddr::V4(a) if a.is_broadcast())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Affinity {
    None,
    Source,
    SourcePort,
}

impl Affinity {
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Source => "source",
            Affinity::SourcePort => "source-port",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: IpAddr,
    pub port: Ports,
    /// Port on the servers; defaults to `port` (443 -> 4443 for the external web VIP). Only
    /// for a single port: with several, each connection keeps the port it asked for.
    pub backend_port: Option<u16>,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default = "default_affinity")]
    pub affinity: Affinity,
    #[serde(default = "default_affinity_timeout")]
    pub affinity_timeout: u32,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u32,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Health checks; without this section every server counts as up.
    pub health: Option<HealthConfig>,
    /// Client prefixes that may open connections; with any, all others are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<SourcePrefix>,
    /// Client prefixes that may not. Where prefixes of both lists match a client, the
    /// longest decides (allow 10.0.0.0/8 with deny 10.9.0.0/16 refuses only 10.9.x.x).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<SourcePrefix>,
    /// Mixed into the Maglev permutations: the table depends only on the servers, their
    /// weights and this seed, so nodes with the same service config pick the same server
    /// for every client. Change it to reshuffle the whole table.
    #[serde(default)]
    pub seed: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// TCP connect.
    Tcp,
    /// HTTP GET `path`, status in `expect`.
    Http,
    /// HTTPS GET `path` without certificate verification, status in `expect`.
    Https,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// Existing connections to a failed server stay until they fail by themselves.
    Keep,
    /// Existing connections to a failed server are dropped from the flow table.
    Reset,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub kind: HealthKind,
    /// Monitor port, which may differ from the balanced port (Lync: 5061); default: the
    /// server's port.
    pub port: Option<u16>,
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_expect")]
    pub expect: Vec<u16>,
    /// Server name for HTTPS (SNI and Host); default: none, the address is used.
    pub sni: Option<String>,
    /// HTTP(S): the response body must contain this text (within its first 64 KiB).
    pub expect_body: Option<String>,
    /// HTTPS: verify the server's certificate, and its name (`sni`, else the address),
    /// against the CA certificates in this PEM file. Without it any certificate passes:
    /// pools present internal certificates, and the check is about liveness.
    pub ca_file: Option<String>,
    /// Seconds between checks of one server.
    #[serde(default = "default_interval")]
    pub interval: f64,
    /// Seconds a check may take.
    #[serde(default = "default_check_timeout")]
    pub timeout: f64,
    /// Consecutive successes that bring a down server back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a server out.
    #[serde(default = "default_fall")]
    pub fall: u32,
    #[serde(default = "default_on_down")]
    pub on_down: OnDown,
}

fn default_health_path() -> String {
    "/".into()
}
fn default_expect() -> Vec<u16> {
    vec![200]
}
fn default_interval() -> f64 {
    2.0
}
fn default_check_timeout() -> f64 {
    1.0
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_on_down() -> OnDown {
    OnDown::Keep
}

/// A service's VIP port: `port = 443`, or a list of ports and "first-last" ranges,
/// `port = [5061, 444, "5070-5073"]`, so a Front End pool VIP is one service (one server
/// choice, one affinity per client across all its ports).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a port number (port = 443) or a list of ports and \"first-last\" ranges (port = [5061, 444, \"5070-5073\"])"
)]
pub enum Ports {
    One(u16),
    List(Vec<PortItem>),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortItem {
    Port(u16),
    /// "first-last", both included.
    Range(String),
}

/// At most this many ports in one service (the data plane holds `MAX_SERVICE_PORTS` over
/// all services).
pub const MAX_PORTS_PER_SERVICE: usize = 1024;

impl Ports {
    /// Every port, in the order given, ranges expanded; an error names the bad item.
    pub fn expand(&self) -> Result<Vec<u16>> {
        let items = match self {
            Ports::One(port) => vec![PortItem::Port(*port)],
            Ports::List(items) => items.clone(),
        };
        let mut ports = Vec::new();
        for item in &items {
            match item {
                PortItem::Port(port) => ports.push(*port),
                PortItem::Range(text) => {
                    let (first, last) = text
                        .split_once('-')
                        .and_then(|(a, b)| {
                            Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                        })
                        .with_context(|| {
                            format!("{text:?} is not a port range like \"5070-5073\"")
                        })?;
                    if first > last {
                        bail!("{text:?}: the range ends before it starts");
                    }
                    ports.extend(first..=last);
                }
            }
            if ports.len() > MAX_PORTS_PER_SERVICE {
                bail!("more than {MAX_PORTS_PER_SERVICE} ports");
            }
        }
        if ports.is_empty() {
            bail!("no port given");
        }
        if ports.contains(&0) {
            bail!("must not be 0");
        }
        let mut seen = HashSet::new();
        if let Some(dup) = ports.iter().find(|p| !seen.insert(**p)) {
            bail!("port {dup} is listed twice");
        }
        Ok(ports)
    }
}

impl std::fmt::Display for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ports::One(port) => write!(f, "{port}"),
            Ports::List(items) => {
                let shown: Vec<String> = items
                    .iter()
                    .map(|i| match i {
                        PortItem::Port(p) => p.to_string(),
                        PortItem::Range(r) => r.clone(),
                    })
                    .collect();
                write!(f, "{}", shown.join(","))
            }
        }
    }
}

impl ServiceConfig {
    /// The VIP ports (valid once the config is validated).
    pub fn ports(&self) -> Vec<u16> {
        self.port.expand().unwrap_or_default()
    }

    /// Where health checks probe a server that listens on `server_port`
    /// (`BACKEND_PORT_KEEP` for a multi-port service): the monitor port if set, else the
    /// server's port, else (multi-port) the service's first port.
    pub fn health_port(&self, server_port: u16) -> u16 {
        let fixed = (server_port != lb_common::BACKEND_PORT_KEEP).then_some(server_port);
        self.health
            .as_ref()
            .and_then(|h| h.port)
            .or(fixed)
            .or(self.ports().first().copied())
            .unwrap_or_default()
    }

    /// The servers' port, or `None` for a multi-port service, whose connections keep the
    /// port they asked for.
    pub fn backend_port(&self) -> Option<u16> {
        match (&self.port, self.backend_port) {
            (_, Some(port)) => Some(port),
            (Ports::One(port), None) => Some(*port),
            (Ports::List(_), None) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    /// Server-side port of this server; default: the service's `backend_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_snat_port_min() -> u16 {
    1024
}
fn default_snat_port_max() -> u16 {
    65535
}
fn default_control_socket() -> String {
    DEFAULT_CONTROL_SOCKET.into()
}
fn default_pin_dir() -> String {
    DEFAULT_PIN_DIR.into()
}
fn default_closing_timeout() -> u32 {
    DEFAULT_CLOSING_TIMEOUT_S
}
fn default_handshake_timeout() -> u32 {
    DEFAULT_HANDSHAKE_TIMEOUT_S
}
fn default_fragment_timeout() -> u32 {
    DEFAULT_FRAGMENT_TIMEOUT_S
}
fn default_true() -> bool {
    true
}
fn default_max_half_open() -> u32 {
    DEFAULT_MAX_HALF_OPEN
}
fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}
fn default_max_affinities() -> u32 {
    DEFAULT_MAX_AFFINITIES
}
fn default_gc_interval() -> u32 {
    10
}
fn default_protocol() -> Protocol {
    Protocol::Tcp
}
fn default_affinity() -> Affinity {
    Affinity::Source
}
fn default_affinity_timeout() -> u32 {
    DEFAULT_AFFINITY_TIMEOUT_S
}
fn default_idle_timeout() -> u32 {
    DEFAULT_IDLE_TIMEOUT_S
}
fn default_weight() -> u32 {
    1
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every section; the first problem is an error naming its key.
    pub fn validate(&self) -> Result<()> {
        self.daemon.validate()?;
        if self.services.len() > lb_common::MAX_SERVICES as usize {
            bail!("service: at most {} services", lb_common::MAX_SERVICES);
        }
        let mut names = HashSet::new();
        let mut endpoints = HashSet::new();
        let vips: HashSet<IpAddr> = self.services.iter().map(|s| s.vip).collect();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("service[{i}] {:?}", s.name);
            if s.name.is_empty() {
                bail!("service[{i}].name: must not be empty");
            }
            if !names.insert(&s.name) {
                bail!("{at}.name: duplicate service name");
            }
            let ports = s.port.expand().with_context(|| format!("{at}.port"))?;
            for port in ports {
                if !endpoints.insert((s.vip, port, s.protocol)) {
                    bail!(
                        "{at}: another service already uses {}:{port} {}",
                        s.vip,
                        s.protocol.as_str()
                    );
                }
            }
            if endpoints.len() > lb_common::MAX_SERVICE_PORTS as usize {
                bail!(
                    "service: at most {} ports over all services",
                    lb_common::MAX_SERVICE_PORTS
                );
            }
            s.validate(&at, &self.daemon, &vips)?;
        }
        let rules: usize = self
            .services
            .iter()
            .map(|s| s.allow.len() + s.deny.len())
            .sum();
        if rules > lb_common::MAX_SOURCE_RULES as usize {
            bail!(
                "service: at most {} allow and deny prefixes over all services, got {rules}",
                lb_common::MAX_SOURCE_RULES
            );
        }
        Ok(())
    }
}

impl DaemonConfig {
    fn validate(&self) -> Result<()> {
        let d = self;
        if d.interfaces.is_empty() {
            bail!("daemon.interfaces: at least one interface is required");
        }
        for (i, name) in d.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains('/') {
                bail!("daemon.interfaces[{i}]: {name:?} is not a valid interface name");
            }
        }
        if d.snat_addresses.is_empty() {
            bail!("daemon.snat_addresses: at least one SNAT address is required (full NAT)");
        }
        for (name, is_v6) in [("IPv4", false), ("IPv6", true)] {
            let n = d
                .snat_addresses
                .iter()
                .filter(|a| a.is_ipv6() == is_v6)
                .count();
            if n > lb_common::MAX_SNAT_PER_FAMILY as usize {
                bail!(
                    "daemon.snat_addresses: at most {} {name} addresses, got {n}",
                    lb_common::MAX_SNAT_PER_FAMILY
                );
            }
        }
        let mut snat_seen = HashSet::new();
        for (i, a) in d.snat_addresses.iter().enumerate() {
            if unusable_address(*a) {
                bail!("daemon.snat_addresses[{i}]: {a} cannot be a source address");
            }
            if !snat_seen.insert(a) {
                bail!("daemon.snat_addresses[{i}]: duplicate address {a}");
            }
        }
        if d.announce
            .as_ref()
            .is_some_and(|a| a.reload_command.is_empty())
        {
            bail!("daemon.announce.reload_command: must name a program");
        }
        if let Some(sync) = &d.sync {
            sync.validate(&d.snat_addresses)?;
        }
        if d.snat_port_min == 0 || d.snat_port_min > d.snat_port_max {
            bail!(
                "daemon.snat_port_min/snat_port_max: need 1 <= min <= max, got {}..{}",
                d.snat_port_min,
                d.snat_port_max
            );
        }
        if !d.pin_dir.starts_with('/') {
            bail!(
                "daemon.pin_dir: must be an absolute path on bpffs, got {:?}",
                d.pin_dir
            );
        }
        for (key, value) in [
            ("closing_timeout", d.closing_timeout),
            ("handshake_timeout", d.handshake_timeout),
            ("fragment_timeout", d.fragment_timeout),
        ] {
            if value == 0 {
                bail!("daemon.{key}: must be at least 1 second");
            }
        }
        if d.max_half_open < 1024 {
            bail!("daemon.max_half_open: must be at least 1024");
        }
        if d.gc_interval == 0 {
            bail!("daemon.gc_interval: must be at least 1 second");
        }
        if d.max_flows < 1024 || d.max_affinities < 1024 {
            bail!("daemon.max_flows/max_affinities: must be at least 1024");
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// One service's own keys, its health check and its servers (`at` names it in errors;
    /// `vips` are every service's).
    fn validate(&self, at: &str, d: &DaemonConfig, vips: &HashSet<IpAddr>) -> Result<()> {
        let s = self;
        if matches!(s.port, Ports::List(_)) && s.backend_port.is_some() {
            bail!("{at}.backend_port: only for a single port; with several, each connection keeps the port it asked for");
        }
        if unusable_address(s.vip) {
            bail!("{at}.vip: {} cannot be a VIP", s.vip);
        }
        if !d
            .snat_addresses
            .iter()
            .any(|a| a.is_ipv6() == s.vip.is_ipv6())
        {
            bail!(
                "{at}.vip: {} is {}, but daemon.snat_addresses has no address of that family",
                s.vip,
                if s.vip.is_ipv6() { "IPv6" } else { "IPv4" }
            );
        }
        if s.backend_port == Some(0) {
            bail!("{at}.backend_port: must not be 0");
        }
        if s.affinity_timeout == 0 {
            bail!("{at}.affinity_timeout: must be at least 1 second");
        }
        if s.idle_timeout == 0 {
            bail!("{at}.idle_timeout: must be at least 1 second");
        }
        if let Some(k) = d.snat_addresses.iter().position(|a| *a == s.vip) {
            bail!(
                "{at}.vip: {} is also daemon.snat_addresses[{k}]: a VIP cannot be a SNAT address",
                s.vip
            );
        }
        if let Some(h) = &s.health {
            h.validate(at)?;
        }
        s.validate_source_rules(at)?;
        s.validate_backends(at, d, vips)
    }

    fn validate_source_rules(&self, at: &str) -> Result<()> {
        let mut seen = HashMap::new();
        for (list, prefixes) in [("allow", &self.allow), ("deny", &self.deny)] {
            for (j, p) in prefixes.iter().enumerate() {
                let key = format!("{at}.{list}[{j}]");
                if let Some(network) = p.without_host_bits() {
                    bail!("{key}: {p} has host bits set (did you mean {network}?)");
                }
                if p.addr().is_ipv6() != self.vip.is_ipv6() {
                    bail!(
                        "{key}: {p} is not of the VIP's address family ({}): clients reach a VIP in its own family",
                        self.vip
                    );
                }
                if let Some(first) = seen.insert(*p, key.clone()) {
                    bail!("{key}: {p} is also {first}");
                }
            }
        }
        Ok(())
    }

    fn validate_backends(&self, at: &str, d: &DaemonConfig, vips: &HashSet<IpAddr>) -> Result<()> {
        let s = self;
        let mut seen = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            if !seen.insert(b.address) {
                bail!(
                    "{at}.backends[{j}].address: duplicate backend {}",
                    b.address
                );
            }
            if unusable_address(b.address) {
                bail!(
                    "{at}.backends[{j}].address: {} cannot be a server",
                    b.address
                );
            }
            if vips.contains(&b.address) {
                bail!(
                    "{at}.backends[{j}].address: {} is a VIP: a server must be a real host",
                    b.address
                );
            }
            if let Some(k) = d.snat_addresses.iter().position(|a| *a == b.address) {
                bail!(
                    "{at}.backends[{j}].address: {} is also daemon.snat_addresses[{k}]",
                    b.address
                );
            }
            if b.address.is_ipv6() != s.vip.is_ipv6() {
                bail!(
                    "{at}.backends[{j}].address: {} is not of the VIP's address family ({}): lb translates v4 -> v4 and v6 -> v6 only",
                    b.address,
                    s.vip
                );
            }
            if b.port == Some(0) {
                bail!("{at}.backends[{j}].port: must not be 0");
            }
            if b.port.is_some() && matches!(s.port, Ports::List(_)) {
                bail!("{at}.backends[{j}].port: a service with several ports sends each connection to the port it asked for");
            }
            if b.weight > MAX_WEIGHT {
                bail!(
                    "{at}.backends[{j}].weight: must be 0..={MAX_WEIGHT}, got {}",
                    b.weight
                );
            }
        }
        Ok(())
    }
}

/// What this host lacks for `config`, one line per key: an interface that does not exist,
/// a SNAT address on none of its interfaces (then the servers' replies never come back;
/// not checked with `daemon.sync`, where keepalived moves the SNAT addresses). The daemon
/// refuses to start with any of them; `lb config check` warns, since it may run on
/// another machine than the balancer.
pub fn host_mismatches(config: &Config) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for (i, name) in config.daemon.interfaces.iter().enumerate() {
        if crate::dataplane::ifindex(name).is_err() {
            found.push(format!(
                "daemon.interfaces[{i}]: no interface {name:?} on this host"
            ));
        }
    }
    if config.daemon.sync.is_none() {
        let local = crate::addr::local_addresses().context("list this host's addresses")?;
        for (i, address) in config.daemon.snat_addresses.iter().enumerate() {
            if !local.contains(address) {
                found.push(format!(
                    "daemon.snat_addresses[{i}]: {address} is on no interface of this host, so the servers' replies to it would never come back; add it on the server-side interface (ip addr add {address}/32 dev IFACE) or fix the config"
                ));
            }
        }
    }
    Ok(found)
}

/// The CA certificates of a PEM file; at least one.
pub fn ca_certificates(path: &str) -> Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path).with_context(|| format!("read {path}"))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("{path}: not PEM certificates"))?;
    if certificates.is_empty() {
        bail!("{path}: no certificate in it");
    }
    Ok(certificates)
}

impl HealthConfig {
    fn validate(&self, at: &str) -> Result<()> {
        let h = self;
        let valid = |v: f64| v.is_finite() && (0.05..=3600.0).contains(&v);
        if !valid(h.interval) {
            bail!(
                "{at}.health.interval: must be 0.05..=3600 seconds, got {}",
                h.interval
            );
        }
        if !valid(h.timeout) {
            bail!(
                "{at}.health.timeout: must be 0.05..=3600 seconds, got {}",
                h.timeout
            );
        }
        if h.rise == 0 || h.fall == 0 {
            bail!("{at}.health.rise/fall: must be at least 1");
        }
        if h.port == Some(0) {
            bail!("{at}.health.port: must not be 0");
        }
        if h.kind != HealthKind::Tcp && (h.expect.is_empty() || !h.path.starts_with('/')) {
            bail!("{at}.health: http(s) checks need a path starting with / and a non-empty expect list");
        }
        if h.sni.is_some() && h.kind != HealthKind::Https {
            bail!("{at}.health.sni: only for kind = \"https\"");
        }
        if h.expect_body.is_some() && h.kind == HealthKind::Tcp {
            bail!("{at}.health.expect_body: only for kind = \"http\" or \"https\"");
        }
        if let Some(path) = &h.ca_file {
            if h.kind != HealthKind::Https {
                bail!("{at}.health.ca_file: only for kind = \"https\"");
            }
            ca_certificates(path).with_context(|| format!("{at}.health.ca_file"))?;
        }
        if h.timeout > h.interval {
            bail!(
                "{at}.health.timeout: {} s is longer than the interval ({} s): checks would overlap",
                h.timeout,
                h.interval
            );
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One service, two servers (10.2.0.11, and 10.2.0.12 with weight 2), 443 -> 4443.
    pub(crate) const MINIMAL: &str = r#"
        [daemon]
        interfaces = ["eth0"]
        snat_addresses = ["10.2.0.100"]

        [[service]]
        name = "web-ext"
        vip = "10.100.0.1"
        port = 443
        backend_port = 4443
        backends = [{ address = "10.2.0.11" }, { address = "10.2.0.12", weight = 2 }]
    "#;

    #[test]
    fn what_this_host_lacks_is_named_by_key() {
        // Every host has lo; none has an interface of that name or a documentation address.
        let elsewhere = MINIMAL
            .replace(
                "interfaces = [\"eth0\"]",
                "interfaces = [\"lo\", \"lb-missing0\"]",
            )
            .replace("10.2.0.100", "192.0.2.100");
        let found = host_mismatches(&Config::parse(&elsewhere).unwrap()).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(
            found[0],
            "daemon.interfaces[1]: no interface \"lb-missing0\" on this host"
        );
        assert!(
            found[1].starts_with("daemon.snat_addresses[0]: 192.0.2.100 is on no interface"),
            "{found:?}"
        );
    }

    #[test]
    fn changed_daemon_keys_are_named() {
        let running = Config::parse(MINIMAL).unwrap().daemon;
        assert!(running.changed_keys(&running).is_empty());
        let changed = Config::parse(&MINIMAL.replace(
            "snat_addresses = [\"10.2.0.100\"]",
            "snat_addresses = [\"10.2.0.101\"]\ngc_interval = 7",
        ))
        .unwrap()
        .daemon;
        assert_eq!(
            changed.changed_keys(&running),
            ["daemon.gc_interval", "daemon.snat_addresses"]
        );
    }

    #[test]
    fn minimal_config_gets_lync_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        let s = &c.services[0];
        assert_eq!(s.affinity, Affinity::Source);
        assert_eq!(s.affinity_timeout, 1800);
        assert!(
            s.idle_timeout > 1800,
            "a 1800 s idle long-poll must survive"
        );
        assert_eq!(s.backend_port(), Some(4443));
        assert_eq!(s.backends[0].weight, 1);
        assert_eq!(c.daemon.xdp_mode, XdpModeConfig::Auto);
        assert_eq!(c.daemon.control_socket, DEFAULT_CONTROL_SOCKET);
    }

    fn error_of(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn addresses_that_would_break_traffic_are_named() {
        let e = error_of(&MINIMAL.replace(
            "snat_addresses = [\"10.2.0.100\"]",
            "snat_addresses = [\"10.2.0.100\", \"10.100.0.1\"]",
        ));
        assert!(
            e.contains("service[0] \"web-ext\".vip") && e.contains("daemon.snat_addresses[1]"),
            "{e}"
        );
        let e = error_of(&MINIMAL.replace("10.2.0.12", "10.2.0.100"));
        assert!(
            e.contains(".backends[1].address") && e.contains("daemon.snat_addresses[0]"),
            "{e}"
        );
        let e = error_of(&MINIMAL.replace("10.2.0.12", "10.100.0.1"));
        assert!(
            e.contains(".backends[1].address") && e.contains("is a VIP"),
            "{e}"
        );
    }

    #[test]
    fn source_lists_that_cannot_mean_what_they_say_are_named() {
        let with_lists = |lists: &str| {
            MINIMAL.replace(
                "backend_port = 4443",
                &format!("backend_port = 4443\n{lists}"),
            )
        };
        let c = Config::parse(&with_lists(
            "allow = [\"10.0.0.0/8\", \"192.0.2.7\"]\ndeny = [\"10.9.0.0/16\"]",
        ))
        .unwrap();
        assert_eq!(c.services[0].allow[1].to_string(), "192.0.2.7/32");
        for (lists, expected) in [
            (
                "allow = [\"10.1.2.3/16\"]",
                "service[0] \"web-ext\".allow[0]: 10.1.2.3/16 has host bits set (did you mean 10.1.0.0/16?)",
            ),
            (
                "deny = [\"fd00::/64\"]",
                "service[0] \"web-ext\".deny[0]: fd00::/64 is not of the VIP's address family",
            ),
            (
                "allow = [\"10.0.0.0/8\"]\ndeny = [\"10.0.0.0/8\"]",
                "service[0] \"web-ext\".deny[0]: 10.0.0.0/8 is also service[0] \"web-ext\".allow[0]",
            ),
            (
                "allow = [\"10.0.0.0/8\", \"10.0.0.0/8\"]",
                ".allow[1]: 10.0.0.0/8 is also service[0] \"web-ext\".allow[0]",
            ),
            ("allow = [\"10.0.0.0/33\"]", "expected 10.0.0.0/8, fd00:1::/64 or an address"),
        ] {
            let e = error_of(&with_lists(lists));
            assert!(e.contains(expected), "{lists}: {e}");
        }
    }

    /// The keys of the table `toml` opens, as serde lists them when it meets an unknown one.
    fn keys_of(toml: &str) -> Vec<String> {
        let e = error_of(&format!("{toml}\nlb_no_such_key = 1\n"));
        let expected = e
            .split_once("unknown field `lb_no_such_key`, expected ")
            .map(|(_, list)| list)
            .unwrap_or_else(|| panic!("no key list in {e}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// lb.toml(5) describes every key of every table, and its example is a valid config.
    #[test]
    fn the_config_man_page_documents_every_key() {
        let page = include_str!("../../packaging/lb.toml.5");
        let documented = |key: &str| {
            page.lines().any(|l| {
                let l = l.replace("\\-", "-");
                l == format!(".B {key}")
                    || (l.starts_with(".BR ") && l.split('"').any(|w| w.trim() == key))
                    || (l.starts_with(".BR ") && l.split_whitespace().nth(1) == Some(key))
                    || l.contains(&format!("\\fB{key}\\fR"))
                    || (l.starts_with(".SH [") && l.ends_with(&format!(".{key}]")))
            })
        };
        for table in [
            "[daemon]",
            "[daemon.announce]",
            "[daemon.sync]",
            "[[service]]",
            "[[service]]\n[service.health]",
        ] {
            let keys = keys_of(table);
            assert!(keys.len() > 1, "{table}: {keys:?}");
            for key in keys {
                assert!(
                    documented(&key),
                    "lb.toml(5) does not describe {table} {key}"
                );
            }
        }
        for key in ["address", "port", "weight"] {
            assert!(
                documented(key),
                "lb.toml(5) does not describe backends' {key}"
            );
        }
        let example = page
            .split_once(".EX\n")
            .and_then(|(_, rest)| rest.split_once(".EE"))
            .map(|(example, _)| example)
            .expect("an EXAMPLE section");
        Config::parse(example).unwrap();
    }

    #[test]
    fn sync_settings_that_cannot_work_are_named() {
        let with_sync = |table: &str| {
            MINIMAL.replace(
                "\n        [[service]]",
                &format!("\n        [daemon.sync]\n{table}\n        [[service]]"),
            )
        };
        let good = "listen = \"10.2.0.2:7946\"\npeers = [\"10.2.0.3:7946\"]\nkey_file = \"/etc/lb/sync.key\"\n";
        let c = Config::parse(&with_sync(good)).unwrap();
        assert_eq!(c.daemon.sync.unwrap().bulk_sync_timeout, 10);
        for (table, named) in [
            (good.replace("\"10.2.0.3:7946\"", ""), "daemon.sync.peers"),
            (
                good.replace("10.2.0.3:7946", "10.2.0.2:7946"),
                "daemon.sync.peers[0]",
            ),
            (
                good.replace("/etc/lb/sync.key", "sync.key"),
                "daemon.sync.key_file",
            ),
            (
                format!("{good}backup_snat_addresses = [\"10.2.0.100\"]\n"),
                "daemon.sync.backup_snat_addresses[0]",
            ),
        ] {
            let e = error_of(&with_sync(&table));
            assert!(e.contains(named), "{named}: {e}");
        }
    }

    #[test]
    fn a_port_of_the_wrong_type_says_what_is_expected() {
        let e = error_of(&MINIMAL.replace("port = 443", "port = \"443\""));
        assert!(e.contains("a port number (port = 443)"), "{e}");
    }

    #[test]
    fn a_health_timeout_longer_than_its_interval_is_refused() {
        let e = error_of(&MINIMAL.replace(
            "port = 443",
            "port = 443\nhealth = { kind = \"tcp\", interval = 1.0, timeout = 2.0 }",
        ));
        assert!(
            e.contains(".health.timeout") && e.contains("longer than the interval"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = error_of(&MINIMAL.replace("port = 443", "port = 443\nbogus_key = 1"));
        assert!(e.contains("bogus_key"), "{e}");
    }

    #[test]
    fn bad_address_is_named() {
        let e = error_of(&MINIMAL.replace("10.2.0.12", "10.2.0.999"));
        assert!(e.contains("address") || e.contains("10.2.0.999"), "{e}");
    }

    #[test]
    fn duplicate_backend_is_named_with_its_path() {
        let e = error_of(&MINIMAL.replace("10.2.0.12", "10.2.0.11"));
        assert!(
            e.contains("service[0] \"web-ext\".backends[1].address"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_endpoint_is_rejected() {
        let twice =
            format!("{MINIMAL}\n[[service]]\nname = \"b\"\nvip = \"10.100.0.1\"\nport = 443\n");
        assert!(error_of(&twice).contains("already uses 10.100.0.1:443"));
    }

    #[test]
    fn missing_snat_is_rejected() {
        let e =
            error_of(&MINIMAL.replace("snat_addresses = [\"10.2.0.100\"]", "snat_addresses = []"));
        assert!(e.contains("daemon.snat_addresses"), "{e}");
    }

    #[test]
    fn bad_affinity_value_is_named() {
        let e = error_of(&MINIMAL.replace("port = 443", "port = 443\naffinity = \"cookie\""));
        assert!(e.contains("affinity") && e.contains("cookie"), "{e}");
    }

    #[test]
    fn health_section_is_validated() {
        let with =
            |h: &str| MINIMAL.replace("port = 443", &format!("port = 443\nhealth = {{ {h} }}"));
        let c = Config::parse(&with("kind = \"tcp\", port = 5061")).unwrap();
        let h = c.services[0].health.as_ref().unwrap();
        assert_eq!(
            (h.port, h.rise, h.fall, h.on_down),
            (Some(5061), 2, 3, OnDown::Keep)
        );
        assert!(error_of(&with("kind = \"tcp\", interval = 0")).contains(".health.interval"));
        assert!(error_of(&with("kind = \"tcp\", fall = 0")).contains(".health.rise/fall"));
        assert!(error_of(&with("kind = \"http\", path = \"x\"")).contains("path starting with /"));
        assert!(error_of(&with("kind = \"tcp\", sni = \"a\"")).contains(".health.sni"));
        assert!(
            error_of(&with("kind = \"tcp\", expect_body = \"ok\"")).contains(".health.expect_body")
        );
        assert!(error_of(&with("kind = \"http\", ca_file = \"/etc/hosts\""))
            .contains(".health.ca_file"));
        let e = error_of(&with("kind = \"https\", ca_file = \"/nonexistent/ca.pem\""));
        assert!(
            e.contains(".health.ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let e = error_of(&with("kind = \"https\", ca_file = \"/etc/hostname\""));
        assert!(e.contains(".health.ca_file"), "{e}");
        assert!(error_of(&with("kind = \"icmp\"")).contains("icmp"));
    }

    /// The Front End pool VIP as one service.
    const FE_POOL: &str = r#"
        [daemon]
        interfaces = ["eth0"]
        snat_addresses = ["10.2.0.100"]

        [[service]]
        name = "fe-pool"
        vip = "10.100.0.2"
        port = [5061, 444, "5070-5073", 135]
        backends = [{ address = "10.2.0.11" }]
    "#;

    #[test]
    fn port_lists_and_ranges_expand() {
        let c = Config::parse(FE_POOL).unwrap();
        let s = &c.services[0];
        assert_eq!(s.ports(), [5061, 444, 5070, 5071, 5072, 5073, 135]);
        assert_eq!(s.backend_port(), None, "each connection keeps its port");
        assert_eq!(s.port.to_string(), "5061,444,5070-5073,135");
    }

    #[test]
    fn bad_port_lists_are_named() {
        let with = |ports: &str| FE_POOL.replace(r#"[5061, 444, "5070-5073", 135]"#, ports);
        for (ports, expect) in [
            (r#"["5073-5070"]"#, "ends before it starts"),
            (r#"["50x0-5073"]"#, "not a port range"),
            (r#"[5061, "5060-5062"]"#, "5061 is listed twice"),
            ("[]", "no port given"),
            ("[0]", "must not be 0"),
        ] {
            let e = error_of(&with(ports));
            assert!(e.contains(".port") && e.contains(expect), "{ports}: {e}");
        }
        let e = error_of(&FE_POOL.replace("port = [", "backend_port = 4443\nport = ["));
        assert!(e.contains(".backend_port: only for a single port"), "{e}");
        let e = error_of(&FE_POOL.replace(
            r#"{ address = "10.2.0.11" }"#,
            r#"{ address = "10.2.0.11", port = 5061 }"#,
        ));
        assert!(e.contains(".backends[0].port"), "{e}");
        let overlapping =
            format!("{FE_POOL}\n[[service]]\nname = \"sip\"\nvip = \"10.100.0.2\"\nport = 5072\n");
        assert!(error_of(&overlapping).contains("already uses 10.100.0.2:5072 tcp"));
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let e = error_of(&MINIMAL.replace("port = 443", "port = 443\naffinity_timeout = 0"));
        assert!(e.contains(".affinity_timeout"), "{e}");
    }
}
