//! The control protocol: one JSON request per line on a Unix socket, one JSON response line.
//! Both halves live here: `call` for the CLI, `bind` and `answer` for the daemon.
use std::{
    collections::BTreeMap, future::Future, net::IpAddr, os::unix::fs::DirBuilderExt, path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use lb_common::hash;

use crate::addr::SourcePrefix;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

/// A request line longer than this is refused (and the connection closed).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A client must send its request within this time, so a hung client cannot hold a task.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Re-read the config file and apply it.
    Reload,
    BackendAdd {
        service: String,
        address: IpAddr,
        port: Option<u16>,
        weight: Option<u32>,
    },
    BackendRemove {
        service: String,
        address: IpAddr,
    },
    /// No new clients; after `deadline_s` (if given) remaining flows and affinities are cut.
    BackendDrain {
        service: String,
        address: IpAddr,
        deadline_s: Option<u64>,
    },
    BackendUndrain {
        service: String,
        address: IpAddr,
    },
    BackendWeight {
        service: String,
        address: IpAddr,
        weight: u32,
    },
    AffinityList {
        service: String,
        client: Option<IpAddr>,
    },
    AffinityFlush {
        service: String,
        client: Option<IpAddr>,
        backend: Option<IpAddr>,
    },
    /// Data-plane debug logging (new flows and drops) on or off.
    DebugLog {
        enabled: bool,
    },
    /// Withdraw (drained) or announce again this node's VIPs; flows continue either way.
    NodeDrain {
        drained: bool,
    },
    /// Tell keepalived (through the sync track file) that this node must not be active;
    /// refused while no peer is connected unless `force`.
    HaHandover {
        force: bool,
    },
    /// Undo `HaHandover`.
    HaResume,
    /// The live Maglev table of a service, to compare nodes.
    MaglevTable {
        service: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(StatusReport),
    /// The request was applied.
    Done,
    Affinities {
        entries: Vec<AffinityRecord>,
    },
    Flushed {
        removed: usize,
    },
    MaglevTable(MaglevTable),
    Error {
        message: String,
    },
}

/// A Maglev table by server, not by the node-local backend ids: comparable across nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaglevTable {
    /// The servers in the table, sorted ("address:port", or the address alone for a
    /// multi-port service).
    pub servers: Vec<String>,
    /// Per slot, the index of its server in `servers`; `EMPTY_SLOT` if none.
    pub slots: Vec<u16>,
}

pub const EMPTY_SLOT: u16 = u16::MAX;

impl MaglevTable {
    /// FNV-1a over the servers of every slot in order: equal on two nodes exactly when their
    /// tables send every client to the same server.
    pub fn digest(&self) -> u64 {
        self.slots.iter().fold(hash::FNV1A_BASIS, |digest, &slot| {
            let server = self
                .servers
                .get(usize::from(slot))
                .map_or("-", String::as_str);
            hash::fnv1a(digest, server.bytes().chain([0]))
        })
    }

    /// The server the table picks for a new client at `client` (source affinity: the port
    /// is not hashed), as the data plane does.
    pub fn server_for(&self, client: IpAddr) -> Option<&str> {
        let words = crate::addr::addr_words(client);
        let hash = hash::client_hash(&words, 0);
        let slot = *self.slots.get(hash as usize % self.slots.len().max(1))?;
        self.servers.get(usize::from(slot)).map(String::as_str)
    }

    /// Slots per server.
    pub fn shares(&self) -> Vec<(String, usize)> {
        let mut counts = vec![0; self.servers.len()];
        for &slot in &self.slots {
            if let Some(c) = counts.get_mut(usize::from(slot)) {
                *c += 1;
            }
        }
        self.servers.iter().cloned().zip(counts).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityRecord {
    pub client: IpAddr,
    /// Only for `source-port` affinity.
    pub client_port: Option<u16>,
    pub backend: IpAddr,
    /// Seconds since the client was last seen.
    pub idle_s: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub services: Vec<ServiceStatus>,
    /// Global per-outcome counters (see `lb_common::Counter`).
    pub counters: BTreeMap<String, u64>,
    /// Table fill levels (entries counted when the report was made).
    pub tables: TableReport,
    /// Data-plane debug logging is on.
    #[serde(default)]
    pub debug_log: bool,
    /// `lb node drain` is in force: no VIP is announced.
    #[serde(default)]
    pub node_drained: bool,
    /// The VIPs BIRD announces for this node; None without `daemon.announce`.
    #[serde(default)]
    pub announced: Option<Vec<IpAddr>>,
    /// SNAT ports held by confirmed connections, per SNAT address.
    #[serde(default)]
    pub snat_ports_in_use: BTreeMap<IpAddr, u64>,
    /// State sync with the peers; None without `daemon.sync`.
    #[serde(default)]
    pub sync: Option<Box<SyncStatus>>,
}

/// `lb status`'s view of state sync (see `daemon::sync`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// This node holds a peer's snapshot, or no peer answered within
    /// `daemon.sync.bulk_sync_timeout`: keepalived may give it the addresses.
    pub ready: bool,
    /// `lb ha handover` is in force: keepalived keeps this node out of MASTER.
    #[serde(default)]
    pub handed_over: bool,
    /// Where this node's state goes, one entry per `daemon.sync.peers`.
    pub peers: Vec<SyncPeer>,
    /// Sessions in which peers send their state to this node, open now.
    pub inbound_sessions: u64,
    pub records_received: u64,
    /// Sealed bytes received on the sync port (headers included).
    #[serde(default)]
    pub bytes_received: u64,
    /// Peers' new connections installed here, and how long after their confirmation
    /// (p50 and p99, within a factor of 2).
    #[serde(default)]
    pub latency_samples: u64,
    #[serde(default)]
    pub latency_p50_ms: Option<f64>,
    #[serde(default)]
    pub latency_p99_ms: Option<f64>,
    /// Records that authenticated but could not be installed, per reason (an unknown
    /// service or server: the nodes' configs differ; a full table).
    pub records_refused: BTreeMap<String, u64>,
    /// Connections to the sync port refused, per reason (malformed, wrong_version,
    /// unauthenticated, too_many_sessions).
    pub sessions_refused: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPeer {
    pub address: std::net::SocketAddr,
    pub connected: bool,
    pub records_sent: u64,
    /// Sealed bytes sent to it (headers included).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Records not sent because the peer was too slow (its queue was full): the peer gets
    /// a new snapshot instead.
    pub records_dropped: u64,
    pub snapshots_sent: u64,
    /// When the last full snapshot to it finished (Unix seconds); 0: never.
    pub last_snapshot_unix: u64,
    /// Why the last connection attempt or session ended, if it did.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct TableReport {
    /// Confirmed connections (both directions).
    pub flows: TableFill,
    /// Connections not yet confirmed (both directions), as of the last collection: walking
    /// this table on every report would cost the most exactly under a flood, when it is
    /// full. LRU, so a flood fills it harmlessly.
    pub half_open: TableFill,
    pub affinities: TableFill,
    /// Garbage collections that found a table at 90 % or more (LRU evicting live entries).
    pub gc_passes_nearly_full: u64,
    /// Expired entries removed since the daemon started.
    pub collected_flows: u64,
    pub collected_affinities: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct TableFill {
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: IpAddr,
    /// One port, or the list as configured ("5061,444,5070-5073").
    pub port: String,
    /// None for a multi-port service: each connection keeps its port.
    pub backend_port: Option<u16>,
    pub protocol: String,
    pub affinity: String,
    pub affinity_timeout: u32,
    pub idle_timeout: u32,
    /// Client prefixes that may connect (empty: any not denied).
    #[serde(default)]
    pub allow: Vec<SourcePrefix>,
    #[serde(default)]
    pub deny: Vec<SourcePrefix>,
    /// New connections these lists refused.
    #[serde(default)]
    pub refused_flows: u64,
    /// Clients with the most new flows among live affinities (none without affinity).
    #[serde(default)]
    pub top_sources: Vec<SourceShare>,
    pub stats: Traffic,
    pub backends: Vec<BackendStatus>,
}

impl ServiceStatus {
    /// Where the servers listen: ":4443", or "same port" for a multi-port service.
    pub fn server_port(&self) -> String {
        self.backend_port
            .map_or_else(|| "same port".to_string(), |p| format!(":{p}"))
    }
}

/// One client's part of a service's new flows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceShare {
    pub client: IpAddr,
    pub new_flows: u64,
    /// Of the new flows of all live affinities of the service, 0..=1.
    pub share: f64,
    /// Large enough a share to suggest a proxy or NAT in front (see `lb status`).
    pub hot: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// In JSON, `"state": "up" | "no-new-clients" | "draining" | "drained" | "down"` with
    /// the state's own fields beside it.
    #[serde(flatten)]
    pub state: ServerState,
    /// The last health-check result, if the service is checked.
    pub last_check: Option<CheckOutcome>,
    /// Failed health checks since the daemon started.
    #[serde(default)]
    pub check_failures: u64,
    /// When health checks last moved the server in or out (Unix seconds).
    #[serde(default)]
    pub health_changed_unix: Option<u64>,
    /// Client connections not yet expired.
    pub active_flows: u64,
    /// Clients whose affinity points here and has not expired.
    pub affinities: u64,
    pub stats: Traffic,
}

/// Seconds since the Unix epoch: drain deadlines are absolute, so they survive restarts.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a server stands in selection for new clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum ServerState {
    /// Healthy and taking new clients.
    Up,
    /// Healthy, weight 0: keeps its clients, gets no new ones.
    NoNewClients,
    /// `lb backend drain`: no new clients; its flows and affinities continue until the
    /// deadline (Unix seconds), if there is one.
    Draining { deadline_unix: Option<u64> },
    /// A drain whose deadline passed: its remaining flows and affinities were cut.
    Drained,
    /// Failed its health checks; `reason` is the check that took it out.
    Down { reason: String },
}

impl ServerState {
    /// Every state's name, as in JSON (`"state"`) and in the metrics' `state` label.
    pub const NAMES: [&'static str; 5] = ["up", "no-new-clients", "draining", "drained", "down"];

    pub fn name(&self) -> &'static str {
        let index = match self {
            Self::Up => 0,
            Self::NoNewClients => 1,
            Self::Draining { .. } => 2,
            Self::Drained => 3,
            Self::Down { .. } => 4,
        };
        Self::NAMES[index]
    }

    /// How `lb status` and `lb top` show it, at `now_unix`.
    pub fn describe(&self, now_unix: u64) -> String {
        match self {
            Self::Draining {
                deadline_unix: Some(deadline),
            } => format!("draining ({} s left)", deadline.saturating_sub(now_unix)),
            other => other.name().into(),
        }
    }
}

/// One health check's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum CheckOutcome {
    Passed { latency_ms: f64 },
    Failed { reason: String },
}

impl std::fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Passed { latency_ms } => write!(f, "ok in {latency_ms:.1} ms"),
            Self::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

impl BackendStatus {
    pub fn endpoint(&self) -> String {
        crate::addr::endpoint(self.address, self.port)
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
    pub affinity_hits: u64,
    pub affinity_misses: u64,
}

impl From<lb_common::TrafficStats> for Traffic {
    fn from(s: lb_common::TrafficStats) -> Self {
        Self {
            packets_in: s.fwd_packets,
            bytes_in: s.fwd_bytes,
            packets_out: s.rev_packets,
            bytes_out: s.rev_bytes,
            new_flows: s.new_flows,
            affinity_hits: s.affinity_hits,
            affinity_misses: s.affinity_misses,
        }
    }
}

/// Sends one request to the daemon and returns its response.
pub async fn call(socket: &Path, request: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the lb daemon at {} (is it running?)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .context("send request")?;
    let mut reply = String::new();
    let n = tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(read).read_line(&mut reply),
    )
    .await
    .context("the daemon did not answer within 30 s")?
    .context("read response")?;
    if n == 0 {
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&reply).context("the daemon sent an unreadable response")
}

/// The daemon's socket at `path`, root's alone from its first moment: its directory is
/// created 0755, and the socket is bound under a umask that leaves it 0600, so no other user
/// can connect in a window before its permissions are set.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        // A live daemon answers; a stale socket file from a crash is replaced.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another lb daemon is already serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    // SAFETY: umask only swaps the process's file mode mask; restored right after.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    bound.with_context(|| format!("bind {}", path.display()))
}

/// Reads one request from a client and sends it `respond`'s answer. A client that sends
/// nothing in `REQUEST_TIMEOUT`, too much, or garbage gets an error or is dropped; it never
/// holds the daemon.
pub async fn answer<F, Answer>(stream: UnixStream, respond: F) -> Result<()>
where
    F: FnOnce(Request) -> Answer,
    Answer: Future<Output = Response>,
{
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
    let mut line = String::new();
    let n = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("client sent no request in time")??;
    if n == 0 {
        return Ok(());
    }
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => respond(request).await,
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write
        .write_all(out.as_bytes())
        .await
        .context("client hung up before the response")?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn server_states_are_a_string_with_their_fields_beside_it_in_json() {
        let mut backend = sample_report().services[0].backends[0].clone();
        backend.state = ServerState::Draining {
            deadline_unix: Some(1_000),
        };
        backend.last_check = Some(CheckOutcome::Failed {
            reason: "refused".into(),
        });
        let json = serde_json::to_value(&backend).unwrap();
        assert_eq!(json["state"], "draining");
        assert_eq!(json["deadline_unix"], 1_000);
        assert_eq!(json["last_check"]["result"], "failed");
        assert_eq!(json["last_check"]["reason"], "refused");
        let back: BackendStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back.state, backend.state);
        assert_eq!(back.last_check, backend.last_check);
        assert_eq!(back.state.describe(980), "draining (20 s left)");
        for state in [
            ServerState::Up,
            ServerState::NoNewClients,
            ServerState::Draining {
                deadline_unix: None,
            },
            ServerState::Drained,
        ] {
            assert_eq!(serde_json::to_value(&state).unwrap()["state"], state.name());
        }
        let down = ServerState::Down {
            reason: "timeout".into(),
        };
        let json = serde_json::to_value(&down).unwrap();
        assert_eq!(
            (json["state"].as_str(), json["reason"].as_str()),
            (Some("down"), Some("timeout"))
        );
    }

    /// A report with one service ("web", 10.100.0.1:443 -> 4443, 7 new flows), one server
    /// (10.2.0.11:4443, up, 3 flows, 2 affinities, last check 1.5 ms) and one hot client
    /// (192.0.2.7, 75 %), for the renderers' tests to adjust.
    pub(crate) fn sample_report() -> StatusReport {
        let stats = Traffic {
            new_flows: 7,
            ..Traffic::default()
        };
        StatusReport {
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "10.100.0.1".parse().unwrap(),
                port: "443".into(),
                backend_port: Some(4443),
                protocol: "tcp".into(),
                affinity: "source".into(),
                affinity_timeout: 1800,
                idle_timeout: 3600,
                allow: vec!["192.0.2.0/24".parse().unwrap()],
                deny: Vec::new(),
                refused_flows: 3,
                top_sources: vec![SourceShare {
                    client: "192.0.2.7".parse().unwrap(),
                    new_flows: 150,
                    share: 0.75,
                    hot: true,
                }],
                stats,
                backends: vec![BackendStatus {
                    address: "10.2.0.11".parse().unwrap(),
                    port: 4443,
                    weight: 1,
                    state: ServerState::Up,
                    last_check: Some(CheckOutcome::Passed { latency_ms: 1.5 }),
                    check_failures: 2,
                    health_changed_unix: Some(1_700_000_000),
                    active_flows: 3,
                    affinities: 2,
                    stats,
                }],
            }],
            counters: [("packets".to_string(), 99)].into(),
            tables: TableReport::default(),
            debug_log: false,
            node_drained: false,
            announced: None,
            snat_ports_in_use: [("10.2.0.100".parse().unwrap(), 3)].into(),
            sync: None,
        }
    }

    /// `sample_report` with sync: one connected peer, two unauthenticated sessions refused.
    pub(crate) fn sample_sync() -> SyncStatus {
        SyncStatus {
            ready: true,
            handed_over: false,
            peers: vec![SyncPeer {
                address: "10.2.0.3:7946".parse().unwrap(),
                connected: true,
                records_sent: 12,
                bytes_sent: 1200,
                records_dropped: 0,
                snapshots_sent: 1,
                last_snapshot_unix: 1_700_000_000,
                last_error: None,
            }],
            inbound_sessions: 1,
            records_received: 9,
            bytes_received: 900,
            latency_samples: 9,
            latency_p50_ms: Some(16.4),
            latency_p99_ms: Some(32.8),
            records_refused: BTreeMap::new(),
            sessions_refused: [("unauthenticated".to_string(), 2)].into(),
        }
    }

    #[test]
    fn requests_have_a_stable_wire_form() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"request":"status"}"#
        );
        let parsed: Request = serde_json::from_str(r#"{"request":"reload"}"#).unwrap();
        assert_eq!(parsed, Request::Reload);
        assert!(serde_json::from_str::<Request>(r#"{"request":"format-disk"}"#).is_err());
    }
}
