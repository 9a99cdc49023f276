//! Flow and affinity sync between the nodes of an HA pair or ECMP group (docs/ha.md), so
//! that a node that takes over a dead one's traffic already holds its connections.
//!
//! - Out: the data plane writes every flow it confirms to `LB_SYNC`; every
//!   `DRAIN_INTERVAL` the producer turns those into records and queues them for each
//!   connected peer, with the removals the daemon makes (closed and expired flows) and,
//!   every `RECONCILE_INTERVAL`, the flows and affinities that saw traffic since the last
//!   round (their timers, sequence numbers and closing state; a record lost on the way is
//!   made good there). Each peer has a dialer task: it connects, sends a full snapshot,
//!   then its two lanes (`Lanes`). A peer too slow for its bounded live queue gets a fresh
//!   snapshot instead.
//! - In: a listener takes up to `MAX_SESSIONS` peers' sessions (`session`) and installs
//!   their records (`directory`) through table handles of its own, never the daemon's
//!   lock. Anything that does not authenticate, decode or resolve changes nothing and is
//!   counted.
//! - Readiness: with `track_file`, keepalived keeps this node's VRRP instances out of
//!   MASTER until it holds a peer's snapshot (or none answered in `bulk_sync_timeout`).
pub mod directory;
pub mod latency;
pub mod session;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use lb_common::{is_fresh, FlowEntry, FlowKey, SyncEvent, FLOW_F_REVERSE, NS_PER_SEC};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch, Semaphore},
    time::timeout,
};
use tracing::{info, warn};

use self::{
    directory::{tuple, tuple_key, Directory},
    session::{refusal, Refusal, Sealer, SharedKey},
    wire::{Record, RECORDS_PER_FRAME},
};
use crate::{
    api::{unix_now, SyncPeer, SyncStatus},
    config::SyncConfig,
    daemon::{installation::Installation, off_the_workers},
    dataplane::{monotonic_ns, ring_record, PeerTables, TableReader},
};

/// How often confirmed flows leave for the peers: well inside the 100 ms a peer may lag.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// How often the flows and affinities that saw traffic are sent again (far below any idle
/// timeout, so a peer's copies never expire while the flow lives here).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);
/// Live batches (new connections, removals) queued per peer; beyond that the peer is too
/// slow and gets a new snapshot.
const PEER_QUEUE: usize = 256;
/// A reconciliation round's pieces are spaced over this part of the interval.
const ROUND_SPREAD: Duration = Duration::from_secs(5);
const _: () = assert!(ROUND_SPREAD.as_millis() < RECONCILE_INTERVAL.as_millis());
/// Pieces of reconciliation rounds queued per peer; beyond that the rest of the round is
/// dropped (the next round sends it again).
const BULK_QUEUE: usize = 2048;
/// Records per piece of a round: small, so that the peer installs one in a few
/// milliseconds and a new connection queued behind it waits no longer.
const BULK_RECORDS: usize = 256;
/// Removal batches the daemon may have waiting for the producer.
const REMOVAL_QUEUE: usize = 1024;
/// Peers' sessions open at once; more are refused (a flood of connections costs a count).
const MAX_SESSIONS: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A dialer sends an empty frame this often, so a listener can tell a quiet peer from a
/// dead one.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// A session without a frame for this long is over.
const SESSION_IDLE: Duration = Duration::from_secs(5);
/// A frame a peer does not take within this time ends the session.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY: Duration = Duration::from_secs(1);
/// A live flow record sent within this many milliseconds of its connection's last packet
/// counts as a new connection's for the latency figures (a drain interval is 20 ms).
const FRESH_MS: u32 = 100;

/// Records bound for every connected peer, shared by their queues.
type Batch = Arc<Vec<Record>>;
/// A piece of a reconciliation round, and when the round read the tables.
#[derive(Clone)]
struct BulkPiece {
    read_at: Instant,
    records: Batch,
}

/// A peer as the producer feeds it: its live and bulk queues and its counters.
struct PeerFeed {
    live: mpsc::Sender<Batch>,
    bulk: mpsc::Sender<BulkPiece>,
    counters: Arc<PeerCounters>,
}

impl PeerFeed {
    /// Queues `batch` on `lane` (one of this peer's) while the peer is connected; a full
    /// lane counts the batch as dropped. False only when it was dropped.
    fn offer<T: Clone>(&self, lane: &mpsc::Sender<T>, item: &T, records: usize) -> bool {
        if !self.counters.connected.load(Ordering::Relaxed) {
            return true;
        }
        let queued = lane.try_send(item.clone()).is_ok();
        if !queued {
            self.counters
                .dropped
                .fetch_add(records as u64, Ordering::Relaxed);
        }
        queued
    }
}

/// Flows the dialer sent removals of since the oldest reconciliation piece it has still
/// to send was read: that piece's copies of them are stale, and sent after the removal
/// they would bring a closed connection back at the peer.
#[derive(Default)]
struct Tombstones(HashMap<wire::Tuple, Instant>);

impl Tombstones {
    fn bury(&mut self, sent: &[Record]) {
        let now = Instant::now();
        for record in sent {
            if let Record::FlowRemoved(tuple) = record {
                self.0.insert(*tuple, now);
            }
        }
    }

    /// `piece`'s records without the flows removed after it was read. Pieces come in the
    /// order they were read (rounds never overlap), so older removals are forgotten.
    fn unburied(&mut self, piece: &BulkPiece) -> Vec<Record> {
        self.0.retain(|_, removed| *removed >= piece.read_at);
        let removed = |protocol: u8, source: SocketAddr, destination: SocketAddr| {
            self.0.contains_key(&wire::Tuple {
                protocol,
                source,
                destination,
            })
        };
        piece
            .records
            .iter()
            .filter(|record| match record {
                Record::Flow(f) => {
                    !removed(f.protocol, f.client, f.vip) && !removed(f.protocol, f.server, f.snat)
                }
                _ => true,
            })
            .cloned()
            .collect()
    }
}

/// What a dialer sends: the live lane (new connections and removals) always first, the
/// bulk lane (reconciliation rounds, a piece at a time as `spread_bulk` queues them) in
/// between, so that a round of thousands of records never holds a new connection back.
struct Lanes {
    live: mpsc::Receiver<Batch>,
    bulk: mpsc::Receiver<BulkPiece>,
    /// Kept across sessions: a round read before a reconnection may still be queued after.
    tombstones: Tombstones,
}

impl Lanes {
    /// Empties both lanes; the removals dropped unsent are buried as if sent (the snapshot
    /// that follows has none of them).
    fn clear(&mut self) {
        while let Ok(batch) = self.live.try_recv() {
            self.tombstones.bury(&batch);
        }
        while self.bulk.try_recv().is_ok() {}
    }
}

#[derive(Default)]
struct PeerCounters {
    connected: AtomicBool,
    /// Set when the queue overflowed: the dialer starts over with a snapshot.
    resnapshot: AtomicBool,
    sent: AtomicU64,
    /// Sealed bytes on the link, headers included.
    bytes: AtomicU64,
    dropped: AtomicU64,
    snapshots: AtomicU64,
    last_snapshot_unix: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What the sync service counts, for `lb status` and the metrics.
#[derive(Default)]
pub struct Stats {
    ready: AtomicBool,
    /// `lb ha handover` is in force.
    handed_over: AtomicBool,
    peers: Vec<(SocketAddr, Arc<PeerCounters>)>,
    inbound_sessions: AtomicU64,
    received: AtomicU64,
    bytes_received: AtomicU64,
    /// Confirmation to installation here, of the peers' new connections.
    latency: latency::Latency,
    refused_records: Mutex<BTreeMap<String, u64>>,
    refused_sessions: Mutex<BTreeMap<String, u64>>,
}

fn count(map: &Mutex<BTreeMap<String, u64>>, reason: &str) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    *map.entry(reason.to_string()).or_default() += 1;
}

fn refusal_name(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::Malformed => "malformed",
        Refusal::WrongVersion => "wrong_version",
        Refusal::Unauthenticated => "unauthenticated",
    }
}

impl Stats {
    pub fn report(&self) -> SyncStatus {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SyncStatus {
            ready: self.ready.load(Ordering::Relaxed),
            handed_over: self.handed_over.load(Ordering::Relaxed),
            peers: self
                .peers
                .iter()
                .map(|(address, c)| SyncPeer {
                    address: *address,
                    connected: c.connected.load(Ordering::Relaxed),
                    records_sent: load(&c.sent),
                    bytes_sent: load(&c.bytes),
                    records_dropped: load(&c.dropped),
                    snapshots_sent: load(&c.snapshots),
                    last_snapshot_unix: load(&c.last_snapshot_unix),
                    last_error: c
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                })
                .collect(),
            inbound_sessions: load(&self.inbound_sessions),
            records_received: load(&self.received),
            bytes_received: load(&self.bytes_received),
            latency_samples: self.latency.samples(),
            latency_p50_ms: self.latency.quantile(0.5).map(|us| us as f64 / 1000.0),
            latency_p99_ms: self.latency.quantile(0.99).map(|us| us as f64 / 1000.0),
            records_refused: self
                .refused_records
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            sessions_refused: self
                .refused_sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// The daemon's side of the sync service.
pub struct Handle {
    directory: watch::Sender<Arc<Directory>>,
    /// Ifindex of each `daemon.interfaces` entry, resolved once (they change only with a
    /// restart).
    interfaces: Vec<u32>,
    removals: mpsc::Sender<Vec<FlowKey>>,
    stats: Arc<Stats>,
    readiness: Readiness,
}

impl Handle {
    /// The ids and names as `installation` has them now; the sync tasks see a new
    /// directory only when they changed.
    pub fn set_directory(&self, installation: &Installation) {
        let directory = Directory::of(installation, self.interfaces.clone());
        self.directory.send_if_modified(|current| {
            let changed = **current != directory;
            if changed {
                *current = Arc::new(directory);
            }
            changed
        });
    }

    /// Flows this node removed (closed or expired): the peers remove them too.
    pub fn removed(&self, keys: Vec<FlowKey>) {
        if !keys.is_empty() && self.removals.try_send(keys).is_err() {
            // The peers' copies then expire on their own timers.
            warn!("sync removal queue full; peers keep those flows until they expire");
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// `lb ha handover`: keepalived must not keep or make this node active. Refused while
    /// no peer takes this node's state, unless `force`: the peer would be cold or absent.
    pub fn hand_over(&self, force: bool) -> Result<()> {
        let connected = self
            .stats
            .peers
            .iter()
            .any(|(_, c)| c.connected.load(Ordering::Relaxed));
        if !connected && !force {
            anyhow::bail!("no peer is connected, so none holds this node's connections; handing over would break them (lb ha shows the peers; --force hands over anyway)");
        }
        if self.readiness.track_file.is_none() {
            anyhow::bail!(
                "daemon.sync.track_file is not set, so keepalived cannot hear of a handover"
            );
        }
        self.stats.handed_over.store(true, Ordering::Relaxed);
        self.readiness.update()
    }

    /// `lb ha resume`: undoes a handover.
    pub fn resume(&self) -> Result<()> {
        self.stats.handed_over.store(false, Ordering::Relaxed);
        self.readiness.update()
    }
}

/// Everything the sync service needs from the data plane.
pub struct Tables {
    pub events: RingBuf<MapData>,
    pub reader: Arc<TableReader>,
    pub peer_tables: PeerTables,
}

/// Reads the shared key, naming the config key when it cannot.
pub fn read_key(path: &Path) -> Result<SharedKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("daemon.sync.key_file: read {}", path.display()))?;
    SharedKey::parse(&text).with_context(|| format!("daemon.sync.key_file: {}", path.display()))
}

/// Starts the listener, the producer and a dialer per peer; `interfaces` are the ifindexes
/// of `daemon.interfaces`, in order.
pub async fn start(
    config: &SyncConfig,
    installation: &Installation,
    interfaces: Vec<u32>,
    tables: Tables,
) -> Result<Handle> {
    let directory = Directory::of(installation, interfaces.clone());
    let key = read_key(&config.key_file)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("daemon.sync.listen: bind {}", config.listen))?;
    let stats = Arc::new(Stats {
        peers: config
            .peers
            .iter()
            .map(|p| (*p, Arc::new(PeerCounters::default())))
            .collect(),
        ..Stats::default()
    });
    let readiness = Readiness::new(config.track_file.clone(), stats.clone())?;
    let (directory_tx, directory_rx) = watch::channel(Arc::new(directory));
    let (removals_tx, removals_rx) = mpsc::channel(REMOVAL_QUEUE);
    let mut feeds = Vec::new();
    for (address, counters) in &stats.peers {
        let (live, live_rx) = mpsc::channel(PEER_QUEUE);
        let (bulk, bulk_rx) = mpsc::channel(BULK_QUEUE);
        feeds.push(PeerFeed {
            live,
            bulk,
            counters: counters.clone(),
        });
        let dialer = Dialer {
            address: *address,
            key: key.clone(),
            counters: counters.clone(),
            reader: tables.reader.clone(),
            directory: directory_rx.clone(),
        };
        tokio::spawn(dialer.run(Lanes {
            live: live_rx,
            bulk: bulk_rx,
            tombstones: Tombstones::default(),
        }));
    }
    tokio::spawn(produce(
        tables.events,
        tables.reader,
        directory_rx.clone(),
        removals_rx,
        Arc::new(feeds),
    ));
    let inbound = Inbound {
        key,
        stats: stats.clone(),
        tables: Arc::new(Mutex::new(tables.peer_tables)),
        directory: directory_rx,
        readiness: readiness.clone(),
    };
    tokio::spawn(inbound.listen(listener));
    tokio::spawn(
        readiness
            .clone()
            .deadline(Duration::from_secs(u64::from(config.bulk_sync_timeout))),
    );
    info!(listen = %config.listen, peers = config.peers.len(), "state sync started");
    Ok(Handle {
        directory: directory_tx,
        interfaces,
        removals: removals_tx,
        stats,
        readiness,
    })
}

/// Whether this node may take addresses, as keepalived's track file says (0: may).
#[derive(Clone)]
struct Readiness {
    track_file: Option<PathBuf>,
    stats: Arc<Stats>,
}

impl Readiness {
    fn new(track_file: Option<PathBuf>, stats: Arc<Stats>) -> Result<Self> {
        let readiness = Self { track_file, stats };
        readiness.update()?;
        Ok(readiness)
    }

    /// Writes what keepalived should know now: 0 when this node may be active.
    fn update(&self) -> Result<()> {
        let Some(path) = &self.track_file else {
            return Ok(());
        };
        let ready = self.stats.ready.load(Ordering::Relaxed)
            && !self.stats.handed_over.load(Ordering::Relaxed);
        // Written whole, then renamed: keepalived never reads half a file.
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, if ready { "0\n" } else { "1\n" })
            .and_then(|()| std::fs::rename(&temporary, path))
            .with_context(|| format!("daemon.sync.track_file: write {}", path.display()))
    }

    fn set_ready(&self, why: &str) {
        if self.stats.ready.swap(true, Ordering::Relaxed) {
            return;
        }
        info!(why, "sync ready: this node may take over addresses");
        if let Err(e) = self.update() {
            warn!(error = %format!("{e:#}"), "telling keepalived this node is ready");
        }
    }

    /// After `wait`, a node that no peer has started a session with is alone: ready.
    async fn deadline(self, wait: Duration) {
        tokio::time::sleep(wait).await;
        while !self.stats.ready.load(Ordering::Relaxed) {
            if self.stats.inbound_sessions.load(Ordering::Relaxed) == 0 {
                self.set_ready("no peer sent a snapshot in bulk_sync_timeout");
                return;
            }
            // A session is under way: its snapshot decides.
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Every flow (with both directions) this node carried and affinity seen since `since_ns`
/// and still live, as records. Blocking: it walks the tables.
fn records_since(tables: &TableReader, directory: &Directory, since_ns: u64) -> Vec<Record> {
    let now = monotonic_ns();
    let live = |e: &FlowEntry| is_fresh(e.last_seen_ns, u64::from(e.timeout_s) * NS_PER_SEC, now);
    let flows: HashMap<FlowKey, FlowEntry> = tables.flows().collect();
    let mut records = Vec::new();
    for (key, forward) in &flows {
        if forward.flags & FLOW_F_REVERSE != 0 || !live(forward) {
            continue;
        }
        let Some(reverse) = flows.get(&forward.other_direction(key)) else {
            continue;
        };
        if forward.last_seen_ns.max(reverse.last_seen_ns) < since_ns {
            continue;
        }
        // A flow a peer sent and this node never carried (no next hop was ever cached
        // here) is the peer's to send: sent back, it would overwrite the peer's own, newer
        // state (a closing flow would come back open).
        if forward.next_hop.generation == 0 && reverse.next_hop.generation == 0 {
            continue;
        }
        if let Some(flow) = directory.flow_record(key, forward, reverse, now) {
            records.push(Record::Flow(flow));
        }
    }
    for (key, entry) in tables.affinities() {
        if entry.last_seen_ns < since_ns || entry.last_seen_ns == 0 {
            continue;
        }
        if let Some(affinity) = directory.affinity_record(&key, &entry, now) {
            records.push(Record::Affinity(affinity));
        }
    }
    records
}

/// Turns the data plane's events, the daemon's removals and the reconciliation rounds into
/// batches for every connected peer.
async fn produce(
    mut events: RingBuf<MapData>,
    reader: Arc<TableReader>,
    directory: watch::Receiver<Arc<Directory>>,
    mut removals: mpsc::Receiver<Vec<FlowKey>>,
    feeds: Arc<Vec<PeerFeed>>,
) {
    let fan_out = |records: Vec<Record>| {
        if records.is_empty() {
            return;
        }
        let batch = Arc::new(records);
        for peer in feeds.iter() {
            if !peer.offer(&peer.live, &batch, batch.len()) {
                peer.counters.resnapshot.store(true, Ordering::Relaxed);
            }
        }
    };
    let round_running = Arc::new(AtomicBool::new(false));
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    let mut reconcile = tokio::time::interval(RECONCILE_INTERVAL);
    reconcile.tick().await;
    let mut last_round = monotonic_ns();
    loop {
        tokio::select! {
            _ = drain.tick() => {
                let directory = directory.borrow().clone();
                let now = monotonic_ns();
                let mut records = Vec::new();
                while let Some(item) = events.next() {
                    let Some(event) = ring_record::<SyncEvent>(&item) else { continue };
                    if let Some(flow) = directory.flow_record(&event.key, &event.forward, &event.reverse, now) {
                        records.push(Record::Flow(flow));
                    }
                }
                fan_out(records);
            }
            Some(keys) = removals.recv() => {
                fan_out(keys.iter().map(|k| Record::FlowRemoved(tuple(k))).collect());
            }
            _ = reconcile.tick() => {
                // A task of its own: the walk takes long at many flows, and the drain goes on.
                if round_running.swap(true, Ordering::Relaxed) {
                    continue;
                }
                let (reader, since) = (reader.clone(), last_round);
                let directory = directory.borrow().clone();
                last_round = monotonic_ns();
                let (feeds, running) = (feeds.clone(), round_running.clone());
                tokio::spawn(async move {
                    let read_at = Instant::now();
                    match off_the_workers(move || Ok(records_since(&reader, &directory, since))).await {
                        Ok(records) => spread_bulk(&feeds, &records, read_at, ROUND_SPREAD).await,
                        Err(e) => warn!(error = %format!("{e:#}"), "sync reconciliation"),
                    }
                    running.store(false, Ordering::Relaxed);
                });
            }
        }
    }
}

/// Queues a reconciliation round for every connected peer in `BULK_RECORDS` pieces, evenly
/// spaced over `spread`: a round queued at once reaches the peer's socket back to back, and
/// every new connection's record behind it waits until the peer has installed all of it.
/// What does not fit the queue waits for the next round.
async fn spread_bulk(feeds: &[PeerFeed], records: &[Record], read_at: Instant, spread: Duration) {
    let pieces = records.len().div_ceil(BULK_RECORDS);
    let gap = spread / u32::try_from(pieces.max(1)).unwrap_or(u32::MAX);
    let mut next = tokio::time::interval(gap.max(Duration::from_millis(1)));
    for chunk in records.chunks(BULK_RECORDS) {
        next.tick().await;
        let piece = BulkPiece {
            read_at,
            records: Arc::new(chunk.to_vec()),
        };
        for peer in feeds {
            peer.offer(&peer.bulk, &piece, chunk.len());
        }
    }
}

/// Sends this node's state to one peer, reconnecting for as long as the daemon runs.
struct Dialer {
    address: SocketAddr,
    key: SharedKey,
    counters: Arc<PeerCounters>,
    reader: Arc<TableReader>,
    directory: watch::Receiver<Arc<Directory>>,
}

impl Dialer {
    async fn run(self, mut lanes: Lanes) {
        let mut logged: Option<String> = None;
        loop {
            let result = self.session(&mut lanes).await;
            self.counters.connected.store(false, Ordering::Relaxed);
            let error = format!(
                "{:#}",
                result.err().unwrap_or_else(|| anyhow::anyhow!("closed"))
            );
            if logged.as_ref() != Some(&error) {
                warn!(peer = %self.address, error = %error, "sync session to peer ended; retrying every second");
                logged = Some(error.clone());
            }
            *self
                .counters
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(error);
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn send(
        &self,
        sealer: &mut Sealer,
        stream: &mut TcpStream,
        records: &[Record],
        bulk: bool,
    ) -> Result<()> {
        for chunk in records.chunks(RECORDS_PER_FRAME) {
            let body = wire::encode(chunk, bulk)?;
            timeout(SEND_TIMEOUT, sealer.send(stream, &body))
                .await
                .context("peer stopped taking frames")??;
            self.counters
                .sent
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(session::sealed_size(body.len()) as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn snapshot(&self, sealer: &mut Sealer, stream: &mut TcpStream) -> Result<()> {
        let (reader, directory) = (self.reader.clone(), self.directory.borrow().clone());
        let mut records =
            off_the_workers(move || Ok(records_since(&reader, &directory, 0))).await?;
        records.push(Record::SnapshotDone);
        self.send(sealer, stream, &records, true).await?;
        self.counters.snapshots.fetch_add(1, Ordering::Relaxed);
        self.counters
            .last_snapshot_unix
            .store(unix_now(), Ordering::Relaxed);
        Ok(())
    }

    async fn session(&self, lanes: &mut Lanes) -> Result<()> {
        let mut stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(self.address))
            .await
            .context("connect timed out")?
            .context("connect")?;
        stream.set_nodelay(true)?;
        let mut sealer = timeout(HANDSHAKE_TIMEOUT, session::dial(&mut stream, &self.key))
            .await
            .context("handshake timed out")??;
        // Queue from now on; what was queued before the snapshot is in it.
        lanes.clear();
        self.counters.resnapshot.store(false, Ordering::Relaxed);
        self.counters.connected.store(true, Ordering::Relaxed);
        self.snapshot(&mut sealer, &mut stream).await?;
        info!(peer = %self.address, "sync session to peer up; snapshot sent");
        *self
            .counters
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        loop {
            if self.counters.resnapshot.swap(false, Ordering::Relaxed) {
                lanes.clear();
                self.snapshot(&mut sealer, &mut stream).await?;
            }
            tokio::select! {
                biased;
                batch = lanes.live.recv() => {
                    let Some(batch) = batch else { return Ok(()) };
                    lanes.tombstones.bury(&batch);
                    self.send(&mut sealer, &mut stream, &batch, false).await?;
                }
                piece = lanes.bulk.recv() => {
                    let Some(piece) = piece else { return Ok(()) };
                    let records = lanes.tombstones.unburied(&piece);
                    self.send(&mut sealer, &mut stream, &records, true).await?;
                }
                _ = keepalive.tick() => self.send(&mut sealer, &mut stream, &[], false).await?,
            }
        }
    }
}

/// Takes peers' sessions and installs what they send.
#[derive(Clone)]
struct Inbound {
    key: SharedKey,
    stats: Arc<Stats>,
    tables: Arc<Mutex<PeerTables>>,
    directory: watch::Receiver<Arc<Directory>>,
    readiness: Readiness,
}

impl Inbound {
    async fn listen(self, listener: TcpListener) {
        let sessions = Arc::new(Semaphore::new(MAX_SESSIONS));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept on the sync port");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let Ok(permit) = sessions.clone().try_acquire_owned() else {
                count(&self.stats.refused_sessions, "too_many_sessions");
                continue;
            };
            let inbound = self.clone();
            tokio::spawn(async move {
                inbound
                    .stats
                    .inbound_sessions
                    .fetch_add(1, Ordering::Relaxed);
                if let Err(e) = inbound.session(stream).await {
                    match refusal(&e) {
                        Some(r) => {
                            count(&inbound.stats.refused_sessions, refusal_name(r));
                            warn!(%peer, error = %format!("{e:#}"), "sync session refused");
                        }
                        None => {
                            info!(%peer, error = %format!("{e:#}"), "sync session from peer ended")
                        }
                    }
                }
                inbound
                    .stats
                    .inbound_sessions
                    .fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }

    /// A new connection's record (in a live frame, confirmed less than `FRESH_MS` before it
    /// was sent) tells how long it took to get here: its wait at the sender plus the
    /// frame's transit.
    fn record_latency(&self, frame: &wire::Frame) {
        if frame.bulk {
            return;
        }
        let transit_us = wire::unix_now_us().saturating_sub(frame.sent_unix_us);
        for record in &frame.records {
            if let Record::Flow(flow) = record {
                if flow.forward.idle_ms < FRESH_MS {
                    let waited_us = u64::from(flow.forward.idle_ms) * 1000;
                    self.stats.latency.record(waited_us + transit_us);
                }
            }
        }
    }

    async fn session(&self, mut stream: TcpStream) -> Result<()> {
        let mut opener = timeout(HANDSHAKE_TIMEOUT, session::accept(&mut stream, &self.key))
            .await
            .context("handshake timed out")??;
        loop {
            let Some(body) = timeout(SESSION_IDLE, opener.receive(&mut stream))
                .await
                .context("peer silent")??
            else {
                return Ok(());
            };
            self.stats
                .bytes_received
                .fetch_add(session::sealed_size(body.len()) as u64, Ordering::Relaxed);
            let frame = match wire::decode(&body) {
                Ok(frame) => frame,
                Err(e) => {
                    count(&self.stats.refused_sessions, "undecodable");
                    return Err(e);
                }
            };
            self.record_latency(&frame);
            self.stats
                .received
                .fetch_add(frame.records.len() as u64, Ordering::Relaxed);
            let snapshot_done = frame.records.contains(&Record::SnapshotDone);
            let (tables, directory, stats) = (
                self.tables.clone(),
                self.directory.borrow().clone(),
                self.stats.clone(),
            );
            off_the_workers(move || {
                let mut tables = tables.lock().unwrap_or_else(|e| e.into_inner());
                install(&mut tables, &directory, &frame, &stats);
                Ok(())
            })
            .await?;
            if snapshot_done {
                self.readiness.set_ready("holds a peer's snapshot");
            }
        }
    }
}

/// Applies a frame's records to this node's tables, in order; flows go in batches (one
/// syscall for many), flushed before a removal so that a removal never precedes the
/// install it follows.
fn install(tables: &mut PeerTables, directory: &Directory, frame: &wire::Frame, stats: &Stats) {
    let now = monotonic_ns();
    let mut pending: Vec<(FlowKey, FlowEntry)> = Vec::new();
    let flush = |tables: &mut PeerTables, pending: &mut Vec<(FlowKey, FlowEntry)>| {
        let refused = pending.len() - tables.install_flows(pending);
        for _ in 0..refused.div_ceil(2) {
            count(&stats.refused_records, "flow table full");
        }
        pending.clear();
    };
    for record in &frame.records {
        let result = match record {
            Record::Flow(flow) => directory.flow_entries(flow, now).map(|directions| {
                let (key, forward) = &directions[0];
                // A snapshot or round carries the affinities themselves.
                let implied = (!frame.bulk)
                    .then(|| directory.flow_affinity(key, forward))
                    .flatten();
                if let Some((akey, aentry)) = implied {
                    if !tables.install_affinity(&akey, &aentry) {
                        count(&stats.refused_records, "affinity table refused");
                    }
                }
                pending.extend(directions);
            }),
            Record::FlowRemoved(t) => tuple_key(t).map(|key| {
                flush(tables, &mut pending);
                tables.remove_flow(&key);
            }),
            Record::Affinity(affinity) => {
                directory
                    .affinity_entry(affinity, now)
                    .and_then(|(key, entry)| {
                        if tables.install_affinity(&key, &entry) {
                            Ok(())
                        } else {
                            Err("affinity table refused")
                        }
                    })
            }
            Record::SnapshotDone => Ok(()),
        };
        if let Err(reason) = result {
            count(&stats.refused_records, reason);
        }
    }
    flush(tables, &mut pending);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reconciliation_round_reaches_the_queue_spread_over_its_time() {
        let (live, _live_rx) = mpsc::channel(1);
        let (bulk, mut bulk_rx) = mpsc::channel(BULK_QUEUE);
        let counters = Arc::new(PeerCounters::default());
        counters.connected.store(true, Ordering::Relaxed);
        let feeds = vec![PeerFeed {
            live,
            bulk,
            counters,
        }];
        let records = vec![Record::SnapshotDone; 4 * BULK_RECORDS];
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            spread_bulk(&feeds, &records, Instant::now(), Duration::from_secs(4)).await
        });
        let mut arrivals = Vec::new();
        while let Some(piece) = bulk_rx.recv().await {
            assert_eq!(piece.records.len(), BULK_RECORDS);
            arrivals.push(started.elapsed().as_secs());
        }
        assert_eq!(arrivals, [0, 1, 2, 3]);
    }

    fn flow(port: u16) -> wire::Flow {
        let mut flow = wire::tests::flow();
        flow.client.set_port(port);
        flow.snat.set_port(port);
        flow
    }

    #[test]
    fn a_round_read_before_a_removal_does_not_bring_the_flow_back() {
        let (closed, open) = (flow(40000), flow(40001));
        let piece = BulkPiece {
            read_at: Instant::now(),
            records: Arc::new(vec![
                Record::Flow(closed.clone()),
                Record::Flow(open.clone()),
            ]),
        };
        let mut tombstones = Tombstones::default();
        // Removed after the read, by either direction's tuple.
        for tuple in [
            wire::Tuple {
                protocol: 6,
                source: closed.client,
                destination: closed.vip,
            },
            wire::Tuple {
                protocol: 6,
                source: closed.server,
                destination: closed.snat,
            },
        ] {
            tombstones.0.clear();
            tombstones.bury(&[Record::FlowRemoved(tuple)]);
            assert_eq!(tombstones.unburied(&piece), [Record::Flow(open.clone())]);
        }
        // A round read after the removal sends the flow (the tuple was reused).
        let later = BulkPiece {
            read_at: Instant::now() + Duration::from_millis(1),
            ..piece
        };
        assert_eq!(tombstones.unburied(&later).len(), 2);
        assert!(tombstones.0.is_empty(), "older removals are forgotten");
    }
}
