//! The peer network: a libp2p node (TCP + noise + yamux, identify, ping, Kademlia, mDNS) and
//! the blob protocol on libp2p streams.
//!
//! One task owns the `Swarm` (the event loop); everything else talks to it through `Net`, a
//! cloneable handle that sends commands with a oneshot for the reply, as in rust-libp2p's
//! file-sharing example. Blob streams go through `libp2p_stream::Control` and never touch the
//! swarm.
//!
//! Serving: only verified local groups are sent (`Store::encode` re-verifies them), a peer may
//! have `MAX_REQUESTS_PER_PEER` requests in flight, and the rest are told "busy".
//! Fetching: every byte is verified as it arrives (`Store::write_encoded`); a peer that sends
//! a bad block is disconnected and banned for the session.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore, store::MemoryStoreConfig, GetProvidersOk, QueryResult};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

mod reach;
#[cfg(test)]
mod scale;
mod session;

pub(crate) use reach::is_circuit;

pub use session::Holding;

use crate::hash::Hash;
use crate::metrics::Metrics;
use crate::protocol::{self, Request, ResponseHead, Status};
use crate::store::{Store, StoreError, Written};
use crate::swarm::Swarms;
use crate::tree::Tree;
use crate::upload::Uploads;

/// The Kademlia protocol name: our own DHT, apart from IPFS's.
pub const KAD_PROTOCOL: &str = "/swarmfs/kad/1.0.0";
/// The default TCP port; `--listen` overrides it.
pub const DEFAULT_PORT: u16 = 4701;
/// Streams a peer may have open with us at once (requests in flight and swarm streams)
/// before it is told "busy". The fetcher's window per peer stays below it.
const MAX_REQUESTS_PER_PEER: usize = 64;
/// How long opening a stream (and dialing the peer, if need be) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one blob request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// A blob stream carries requests one after another; the server ends one idle this long.
const STREAM_IDLE: Duration = Duration::from_secs(60);
/// The fetcher keeps an idle stream at most this long before it drops it.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle streams kept per peer.
const POOL_PER_PEER: usize = 16;
/// Bytes handed between a stream and the store at a time.
const CHUNK: usize = 128 * 1024;
/// Chunk buffers kept for reuse (fresh large buffers cost page faults).
const SPARE_BUFFERS: usize = 64;
/// How often peers are pinged, and how long a ping may take.
const PING_EVERY: Duration = Duration::from_secs(4);
/// How long a new connection may take to finish its handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection limits: a flood of connections (idle sockets, or many peers at once) is turned
/// away at accept, so it cannot use up the daemon's descriptors, which the mount, the store
/// and the control socket need too.
fn limits() -> libp2p::connection_limits::ConnectionLimits {
    libp2p::connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(128))
        .with_max_established_incoming(Some(256))
        .with_max_established(Some(512))
        .with_max_established_per_peer(Some(4))
}

/// The first wait before a kept peer (bootstrap, `connect`) that went away is dialed again;
/// it doubles at each failure up to `MAX_REDIAL`.
const REDIAL_FIRST: Duration = Duration::from_secs(1);
const MAX_REDIAL: Duration = Duration::from_secs(60);

/// An address whose peer is kept connected.
struct Kept {
    addr: Multiaddr,
    /// Known once connected (or from the address's /p2p).
    peer: Option<PeerId>,
    next: Instant,
    backoff: Duration,
}

impl Kept {
    fn new(addr: Multiaddr) -> Kept {
        Kept {
            peer: peer_of(&addr),
            addr,
            next: Instant::now(),
            backoff: REDIAL_FIRST,
        }
    }
}

/// An open connection, as the event loop keeps it.
struct Conn {
    peer: PeerId,
    addr: Multiaddr,
    /// When it last answered a ping, or opened.
    heard: Instant,
    rtt: Option<Duration>,
    /// This node dialed it.
    dialed: bool,
}

/// A connection that answered no ping for this long is closed: its peer is gone.
const SILENT_AFTER: Duration = Duration::from_secs(12);

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    // The limits come first: a connection they deny costs the others nothing.
    limits: libp2p::connection_limits::Behaviour,
    memory: libp2p::memory_connection_limits::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
    /// Whether this node can be dialed from outside: peers dial its candidate addresses back.
    autonat: libp2p::autonat::v2::client::Behaviour,
    autonat_server: libp2p::autonat::v2::server::Behaviour,
    /// The relay service for peers behind NATs (`--no-relay-service` turns it off).
    relay: Toggle<libp2p::relay::Behaviour>,
    relay_client: libp2p::relay::client::Behaviour,
    /// Hole punching: a relayed connection is upgraded to a direct one.
    dcutr: libp2p::dcutr::Behaviour,
    upnp: Toggle<libp2p::upnp::tokio::Behaviour>,
}

/// The behaviours of a node, as the daemon runs them (the in-process DHT test builds the
/// same on the memory transport).
pub(crate) fn behaviour(
    key: &Keypair,
    relay_client: libp2p::relay::client::Behaviour,
    opts: &NetOptions,
) -> std::result::Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let mut cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    cfg.set_query_timeout(Duration::from_secs(30));
    // Provider records live 48 h and are republished every 12 h (libp2p's defaults, spelled
    // out): well before they expire.
    cfg.set_provider_record_ttl(Some(Duration::from_secs(48 * 3600)));
    cfg.set_provider_publication_interval(Some(Duration::from_secs(12 * 3600)));
    let kstore = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            // No cap of 1024 keys: a node provides every blob it holds.
            max_provided_keys: usize::MAX,
            max_records: 1 << 20,
            ..Default::default()
        },
    );
    // Kademlia's mode follows reachability (see `reach`): a server from the start, a client
    // once AutoNAT finds the node unreachable.
    let mut kad = kad::Behaviour::with_config(peer_id, kstore, cfg);
    kad.set_mode(Some(kad::Mode::Server));
    let mdns = if opts.mdns {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?)
    } else {
        None
    };
    let relay = opts.relay_service.then(|| {
        libp2p::relay::Behaviour::new(
            peer_id,
            libp2p::relay::Config {
                max_reservations: 128,
                max_reservations_per_peer: 4,
                max_circuits: 64,
                max_circuits_per_peer: 8,
                // A relayed connection carries blobs when hole punching fails (a NAT that
                // gives every destination a new port), so it is not cut at libp2p's 2 min
                // and 128 KiB.
                max_circuit_duration: RELAY_CIRCUIT_TIME,
                max_circuit_bytes: RELAY_CIRCUIT_BYTES,
                // The counts above bound the load; per-peer rate limits would refuse a peer
                // that restarts and reconnects.
                reservation_rate_limiters: Vec::new(),
                circuit_src_rate_limiters: Vec::new(),
                ..Default::default()
            },
        )
    });
    Ok(Behaviour {
        limits: libp2p::connection_limits::Behaviour::new(limits()),
        memory: libp2p::memory_connection_limits::Behaviour::with_max_percentage(MEMORY_LIMIT),
        kad,
        identify: identify::Behaviour::new(identify::Config::new("/swarmfs/1.0.0".into(), key.public())),
        // A peer that went silent (a pulled cable) is noticed within about 15 s and its
        // connection closed (see `SILENT_AFTER`).
        ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_EVERY).with_timeout(PING_EVERY)),
        mdns: Toggle::from(mdns),
        stream: libp2p_stream::Behaviour::new(),
        // Candidates are tested every 5 s (libp2p's default).
        autonat: libp2p::autonat::v2::client::Behaviour::default(),
        autonat_server: libp2p::autonat::v2::server::Behaviour::default(),
        relay: Toggle::from(relay),
        relay_client,
        dcutr: libp2p::dcutr::Behaviour::new(peer_id),
        upnp: Toggle::from(opts.upnp.then(libp2p::upnp::tokio::Behaviour::default)),
    })
}

/// New connections are refused while the daemon uses more than this share of the machine's
/// memory.
const MEMORY_LIMIT: f64 = 0.8;
/// How long, and how many bytes, one relayed connection may carry.
const RELAY_CIRCUIT_TIME: Duration = Duration::from_secs(3600);
const RELAY_CIRCUIT_BYTES: u64 = 4 << 30;

/// How the node runs.
#[derive(Clone, Debug, Default)]
pub struct NetOptions {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses others can dial this node at, known beforehand (a port forward, say).
    pub external: Vec<Multiaddr>,
    pub mdns: bool,
    /// Offer the circuit relay service to peers behind NATs.
    pub relay_service: bool,
    /// Ask the router for a port mapping (UPnP).
    pub upnp: bool,
    /// A private swarm's pre-shared key (`DATA_DIR/swarm.key`): only nodes with the same key
    /// can connect.
    pub psk: Option<libp2p::pnet::PreSharedKey>,
    /// Bytes per second all blob responses together may send, and receive.
    pub max_upload_rate: Option<u64>,
    pub max_download_rate: Option<u64>,
    /// Tests only: corrupt one byte of every response body (see the malicious-peer test).
    pub corrupt_responses: bool,
    /// Tests only: claim every group of every blob in have-maps (see the lying-peer test).
    pub lie_have: bool,
    /// Tests only: answer swarm joins as a node from before them does (status 3).
    pub refuse_join: bool,
    /// Tests only: claim, every second on every swarm stream, to be fetching every group
    /// (see the test of lapsing hints).
    pub lie_fetching: bool,
}

/// What `status` shows about the node.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NetInfo {
    pub peer_id: String,
    /// Full multiaddrs, ending in `/p2p/<peer id>`.
    pub listen: Vec<String>,
    /// Confirmed addresses others can dial this node at: what its provider records carry.
    pub external: Vec<String>,
    pub peers: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// What `swarmfs peers` shows of one connected peer.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PeerDetail {
    pub peer: String,
    /// The address of its connection (the first, if it has several).
    pub address: String,
    /// Direct, or through a relay (`/p2p-circuit`).
    pub direct: bool,
    /// The last ping's round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// Bytes moved by the blob protocol.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

enum Cmd {
    Provide(Hash),
    /// The providers found so far, and whether the lookup has ended.
    Providers(Hash, watch::Sender<Lookup>),
    /// Announce, and answer once the announcement reached the closest nodes (or failed).
    #[cfg(test)]
    ProvideWait(Hash, oneshot::Sender<bool>),
    /// Listen addresses, connected peers, confirmed external addresses.
    Info(oneshot::Sender<(Vec<Multiaddr>, Vec<PeerId>, Vec<Multiaddr>)>),
    /// The provider records for a hash in this node's own DHT store.
    Stored(Hash, oneshot::Sender<Vec<(PeerId, Vec<Multiaddr>)>>),
    /// The listen addresses each of these peers told us (identify).
    Addrs(Vec<PeerId>, oneshot::Sender<HashMap<PeerId, Vec<Multiaddr>>>),
    /// Learn addresses for a peer and dial it (peer exchange).
    Dial(PeerId, Vec<Multiaddr>),
    /// Dial an address and keep the peer there connected (redialed with backoff); answers
    /// with the peer once connected, or why not.
    Keep(Multiaddr, oneshot::Sender<Result<PeerId, String>>),
    Ban(PeerId),
    /// Each connected peer: its address, whether direct, its last round-trip time.
    Peers(oneshot::Sender<Vec<PeerDetail>>),
    Stop,
}

/// A provider lookup as it goes.
#[derive(Default)]
pub(crate) struct Lookup {
    pub found: HashSet<PeerId>,
    /// The lookup has ended.
    pub done: bool,
    /// Requests it sent to other nodes so far.
    pub requests: u32,
}

/// A handle on the running node.
#[derive(Clone)]
pub struct Net {
    tx: mpsc::Sender<Cmd>,
    control: libp2p_stream::Control,
    peer_id: PeerId,
    store: Arc<Store>,
    pub counters: Arc<Counters>,
    pub metrics: Arc<Metrics>,
    banned: Arc<Mutex<HashSet<PeerId>>>,
    /// The limits of `--max-upload-rate` and `--max-download-rate`.
    up_rate: Option<Arc<crate::rate::Rate>>,
    down_rate: Option<Arc<crate::rate::Rate>>,
    /// Peers connected (again) since the fetcher last looked: their failures are forgiven.
    reconnected: Arc<Mutex<HashSet<PeerId>>>,
    /// Open blob streams not in use, per peer, with when each went idle.
    pool: Arc<Mutex<HashMap<PeerId, Vec<Pooled>>>>,
    bufs: Buffers,
    /// Blob swarms: members, have-maps, traffic per peer.
    pub swarms: Arc<Swarms>,
    /// Blobs announced in the DHT since the start (a partial blob is announced once).
    announced: Arc<Mutex<HashSet<Hash>>>,
    /// Upload slots, shared round-robin between the peers that ask.
    uploads: Arc<Uploads>,
    pub(crate) lie_have: bool,
    refuse_join: bool,
    pub(crate) lie_fetching: bool,
}

/// Spare chunk buffers, shared by the stream tasks and the store threads.
#[derive(Clone, Default)]
struct Buffers(Arc<Mutex<Vec<Vec<u8>>>>);

impl Buffers {
    /// A buffer of `CHUNK` bytes.
    fn get(&self) -> Vec<u8> {
        let mut b = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        b.resize(CHUNK, 0);
        b
    }

    fn put(&self, b: Vec<u8>) {
        let mut spare = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_BUFFERS && b.capacity() >= CHUNK {
            spare.push(b);
        }
    }
}

/// An idle stream and when it went idle.
type Pooled = (libp2p::Stream, Instant);

/// How one attempt at a request failed.
enum Attempt {
    /// Before any byte of the response: the stream was stale, or the peer dropped it
    /// unread. Worth another try on a fresh stream.
    Early(io::Error),
    Failed(FetchError),
}

/// Why a fetch from one peer failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("peer {0} does not have it")]
    NotFound(PeerId),
    #[error("peer {0} is busy")]
    Busy(PeerId),
    #[error("peer {0} refused the request as malformed")]
    Refused(PeerId),
    #[error("peer {peer} sent data that failed verification; it is banned for this session")]
    Bad { peer: PeerId },
    #[error("peer {peer}: {source}")]
    Transfer { peer: PeerId, source: io::Error },
    #[error("peer {0} timed out")]
    Timeout(PeerId),
    #[error("peer {0} is unreachable: {1}")]
    Unreachable(PeerId, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one successful request brought.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub size: u64,
    /// From sending the request to reading the response's head.
    pub latency: Duration,
    /// Body bytes received.
    pub bytes: u64,
    /// The groups the peer sent (verified and stored).
    pub ranges: Vec<Range<u64>>,
    /// Every group of the blob is now present locally (it is marked complete, and
    /// announced, once the sync behind the reader has run).
    pub complete: bool,
}

/// The private swarm's key from `DATA_DIR/swarm.key`, if there is one (Kubo's format:
/// `/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
pub fn load_swarm_key(data_dir: &Path) -> Result<Option<libp2p::pnet::PreSharedKey>> {
    let path = data_dir.join("swarm.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let psk: libp2p::pnet::PreSharedKey = text.parse().map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a swarm key ({e}); make one with `swarmfs swarm-key new`",
                    path.display()
                )
            })?;
            tracing::info!(fingerprint = %psk.fingerprint(), "private swarm: only nodes with this key connect");
            Ok(Some(psk))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes a new random swarm key to `DATA_DIR/swarm.key` (0600); never overwrites one.
pub fn new_swarm_key(data_dir: &Path) -> Result<PathBuf> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("swarm.key");
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {} (a swarm key is never overwritten)", path.display()))?;
    writeln!(f, "{}", libp2p::pnet::PreSharedKey::new(bytes))?;
    f.sync_all()?;
    Ok(path)
}

/// Loads the node's key from `DATA_DIR/identity.key` (mode 0600), creating it the first time,
/// so the peer id is the same across restarts.
pub fn load_identity(data_dir: &Path) -> Result<Keypair> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = data_dir.join("identity.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            Keypair::from_protobuf_encoding(&bytes).with_context(|| format!("{} is not a valid key", path.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            f.write_all(&key.to_protobuf_encoding()?)?;
            f.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Queues an announcement from any thread, without waiting.
fn provide_soon(tx: &mpsc::Sender<Cmd>, h: Hash) {
    if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(Cmd::Provide(h)) {
        let tx = tx.clone();
        std::thread::spawn(move || tx.blocking_send(cmd));
    }
}

fn record_key(h: &Hash) -> kad::RecordKey {
    kad::RecordKey::new(h.as_bytes())
}

/// `a` without the `/p2p/ID` it ends in. A relay's own `/p2p` inside a circuit address
/// (`.../p2p/RELAY/p2p-circuit/p2p/ID`) stays.
pub fn without_peer(a: &Multiaddr) -> Multiaddr {
    let mut a = a.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// The peer id a multiaddr ends in, if any (not a relay's, inside a circuit address).
fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(id)) => Some(id),
        _ => None,
    }
}

/// Listens, learns the bootstrap peers and the addresses known to be external, and starts the
/// event loop; returns its command channel.
fn run_swarm(
    mut swarm: Swarm<Behaviour>,
    opts: &NetOptions,
    banned: Arc<Mutex<HashSet<PeerId>>>,
    reconnected: Arc<Mutex<HashSet<PeerId>>>,
    metrics: Arc<Metrics>,
) -> Result<mpsc::Sender<Cmd>> {
    for addr in &opts.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
    }
    // Bootstrap peers are dialed by the event loop at once, and again whenever they go.
    for addr in &opts.bootstrap {
        if let Some(p) = peer_of(addr) {
            swarm.behaviour_mut().kad.add_address(&p, addr.clone());
        }
    }
    for addr in &opts.external {
        confirm(&mut swarm, addr.clone());
    }
    let (tx, rx) = mpsc::channel(256);
    let kept = opts.bootstrap.iter().map(|a| Kept::new(a.clone())).collect();
    tokio::spawn(event_loop(swarm, rx, banned, reconnected, kept, metrics));
    Ok(tx)
}

impl Net {
    /// Starts the node on the current tokio runtime.
    pub async fn start(store: Arc<Store>, key: Keypair, opts: NetOptions) -> Result<Net> {
        let peer_id = key.public().to_peer_id();
        let quic = opts.psk.is_none();
        let mut registry = prometheus_client::registry::Registry::default();
        let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|key| {
                use libp2p::core::{muxing::StreamMuxerBox, upgrade::Version};
                use libp2p::Transport;
                let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
                // In a private swarm every connection first proves the key (libp2p's pnet,
                // Kubo's format), and only then runs noise and yamux.
                let base = match opts.psk {
                    Some(psk) => either::Either::Left(
                        tcp.and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket)),
                    ),
                    None => either::Either::Right(tcp),
                };
                let tcp = base
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default())
                    // A connection that does not finish its handshake goes (a flood of
                    // idle sockets holds no descriptors for long).
                    .timeout(HANDSHAKE_TIMEOUT)
                    .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                    .boxed();
                // QUIC beside TCP; not in a private swarm, whose key only TCP can prove
                // (Kubo does the same).
                if !quic {
                    return Ok(tcp);
                }
                let mut qcfg = libp2p::quic::Config::new(key);
                qcfg.handshake_timeout = HANDSHAKE_TIMEOUT;
                let udp = libp2p::quic::tokio::Transport::new(qcfg).map(|(peer, c), _| (peer, StreamMuxerBox::new(c)));
                Ok(tcp
                    .or_transport(udp)
                    .map(|either, _| match either {
                        futures::future::Either::Left(x) | futures::future::Either::Right(x) => x,
                    })
                    .boxed())
            })?
            // Circuits through relays, for peers that no one can dial directly.
            .with_relay_client(noise::Config::new, yamux::Config::default)?
            .with_bandwidth_metrics(&mut registry)
            .with_behaviour(|key, relay_client| behaviour(key, relay_client, &opts))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        let metrics = Metrics::new(registry);
        let control = swarm.behaviour().stream.new_control();
        let (banned, reconnected) = (Arc::new(Mutex::new(HashSet::new())), Arc::default());
        let tx = run_swarm(
            swarm,
            &opts,
            Arc::clone(&banned),
            Arc::clone(&reconnected),
            metrics.clone(),
        )?;
        let net = Net {
            tx,
            control,
            peer_id,
            store,
            counters: Arc::new(Counters::default()),
            metrics,
            banned,
            reconnected,
            up_rate: opts.max_upload_rate.map(|r| Arc::new(crate::rate::Rate::new(r))),
            down_rate: opts.max_download_rate.map(|r| Arc::new(crate::rate::Rate::new(r))),
            pool: Arc::default(),
            bufs: Buffers::default(),
            swarms: Arc::default(),
            announced: Arc::default(),
            uploads: Arc::new(Uploads::new(crate::upload::SLOTS)),
            lie_have: opts.lie_have,
            refuse_join: opts.refuse_join,
            lie_fetching: opts.lie_fetching,
        };
        // Every blob that becomes complete is announced: added, written, or fetched (so
        // fetched content is seeded). The hook holds only the command channel, not the store.
        let tx = net.tx.clone();
        net.store.on_complete(move |h| provide_soon(&tx, h));
        net.clone().serve(opts.corrupt_responses)?;
        // Announce what is already held.
        for b in net.store.list()? {
            if b.complete {
                net.provide(b.hash).await;
            }
        }
        Ok(net)
    }

    /// Stops the node: its connections and listeners close. Other handles stop working.
    pub async fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop).await;
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Dials `addr` and keeps its peer connected from now on (redialed with backoff when it
    /// goes). Returns the peer, or why it could not be reached within `timeout`.
    pub async fn keep(&self, addr: Multiaddr, timeout: Duration) -> Result<PeerId, String> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Keep(addr, tx)).await.is_err() {
            return Err("the node is stopping".into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the node is stopping".into()),
            Err(_) => Err(format!(
                "no answer within {} s (it will be dialed again)",
                timeout.as_secs()
            )),
        }
    }

    /// Dials `peer` at `addrs` (ending in its /p2p) and waits until it is connected or
    /// `timeout` passes; returns whether it is connected.
    pub async fn dial_wait(&self, peer: PeerId, addrs: Vec<Multiaddr>, timeout: Duration) -> bool {
        if self.tx.send(Cmd::Dial(peer, addrs)).await.is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.connected().await.contains(&peer) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Peers connected since the last call (the fetcher forgives their failures).
    pub fn take_reconnected(&self) -> HashSet<PeerId> {
        std::mem::take(&mut *self.reconnected.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Announces that this node provides blob `h`.
    pub async fn provide(&self, h: Hash) {
        let _ = self.tx.send(Cmd::Provide(h)).await;
    }

    /// Peers that provide `h`, from the DHT: the first ones found, as soon as there are any
    /// (what a reader wants), waiting at most `timeout`.
    pub async fn providers(&self, h: Hash, timeout: Duration) -> Vec<PeerId> {
        self.lookup(h, timeout, false).await
    }

    /// Every provider of `h` the DHT lookup finds before it ends or `timeout` passes (what
    /// `swarmfs providers` shows).
    pub async fn all_providers(&self, h: Hash, timeout: Duration) -> Vec<PeerId> {
        self.lookup(h, timeout, true).await
    }

    async fn lookup(&self, h: Hash, timeout: Duration, all: bool) -> Vec<PeerId> {
        let (tx, mut rx) = watch::channel(Lookup::default());
        if self.tx.send(Cmd::Providers(h, tx)).await.is_err() {
            return Vec::new();
        }
        let _ = tokio::time::timeout(timeout, rx.wait_for(|l| l.done || (!all && !l.found.is_empty()))).await;
        let found = rx.borrow().found.clone();
        let banned = self.banned.lock().unwrap_or_else(|e| e.into_inner()).clone();
        found
            .into_iter()
            .filter(|p| *p != self.peer_id && !banned.contains(p))
            .collect()
    }

    /// The provider records for `h` that this node stores for the DHT: each provider, with
    /// the addresses its record carries.
    pub async fn stored_providers(&self, h: Hash) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Stored(h, tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The node's addresses and connected peers.
    pub async fn info(&self) -> NetInfo {
        let (tx, rx) = oneshot::channel();
        let (listen, peers, external) = match self.tx.send(Cmd::Info(tx)).await {
            Ok(()) => rx.await.unwrap_or_default(),
            Err(_) => Default::default(),
        };
        NetInfo {
            peer_id: self.peer_id.to_string(),
            listen: listen.iter().map(|a| format!("{a}/p2p/{}", self.peer_id)).collect(),
            external: external.iter().map(|a| format!("{a}/p2p/{}", self.peer_id)).collect(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            bytes_sent: self.counters.sent.load(Ordering::Relaxed),
            bytes_received: self.counters.received.load(Ordering::Relaxed),
        }
    }

    /// Each connected peer with its address, whether it is direct, and its round-trip time.
    pub async fn peer_details(&self) -> Vec<PeerDetail> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Peers(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Connected peers, not banned.
    pub async fn connected(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Info(tx)).await.is_err() {
            return Vec::new();
        }
        let banned = self.banned.lock().unwrap_or_else(|e| e.into_inner()).clone();
        rx.await
            .map(|(_, p, _)| p)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| !banned.contains(p))
            .collect()
    }

    fn is_banned(&self, p: &PeerId) -> bool {
        self.banned.lock().unwrap_or_else(|e| e.into_inner()).contains(p)
    }

    async fn ban(&self, p: PeerId) {
        self.ban_for(p, "it sent data that failed verification").await
    }

    /// Bans `p` for this session: it is disconnected, never asked again, and not served.
    pub async fn ban_for(&self, p: PeerId, why: &str) {
        tracing::warn!(peer = %p, "banned for this session: {why}");
        self.banned.lock().unwrap_or_else(|e| e.into_inner()).insert(p);
        let _ = self.tx.send(Cmd::Ban(p)).await;
    }

    /// Accepts blob streams and serves them.
    fn serve(self, corrupt: bool) -> Result<()> {
        let mut incoming = self
            .control
            .clone()
            .accept(StreamProtocol::new(protocol::PROTOCOL))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let inflight: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                if self.is_banned(&peer) {
                    continue;
                }
                let me = self.clone();
                let inflight = inflight.clone();
                tokio::spawn(async move {
                    let busy = {
                        let mut m = inflight.lock().unwrap_or_else(|e| e.into_inner());
                        let n = m.entry(peer).or_insert(0);
                        *n += 1;
                        *n > MAX_REQUESTS_PER_PEER
                    };
                    if let Err(e) = me.serve_stream(peer, stream, busy, corrupt).await {
                        tracing::debug!(%peer, "blob stream ended: {e}");
                    }
                    let mut m = inflight.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(n) = m.get_mut(&peer) {
                        *n -= 1;
                        if *n == 0 {
                            m.remove(&peer);
                        }
                    }
                });
            }
        });
        Ok(())
    }

    /// Serves the requests on one stream, one after another, until the peer closes it, it
    /// stays idle for `STREAM_IDLE`, or a request is malformed.
    async fn serve_stream(
        &self,
        peer: PeerId,
        mut stream: libp2p::Stream,
        busy: bool,
        corrupt: bool,
    ) -> io::Result<()> {
        loop {
            let req = match tokio::time::timeout(STREAM_IDLE, read_request(&mut stream)).await {
                Err(_) | Ok(Ok(None)) => return stream.close().await,
                Ok(Ok(Some(protocol::Incoming::Get(r)))) => r,
                Ok(Ok(Some(protocol::Incoming::Join(h)))) => {
                    if self.refuse_join {
                        stream.write_all(&refuse(Status::BadRequest)?).await?;
                        return stream.close().await;
                    }
                    if busy {
                        stream.write_all(&refuse(Status::Busy)?).await?;
                        return stream.close().await;
                    }
                    return self.accept_join(peer, h, stream).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "malformed request: {e}");
                    stream.write_all(&refuse(Status::BadRequest)?).await?;
                    return stream.close().await;
                }
            };
            if busy {
                stream.write_all(&refuse(Status::Busy)?).await?;
                return stream.close().await;
            }
            match tokio::time::timeout(REQUEST_TIMEOUT * 3, self.serve_one(peer, &mut stream, req, corrupt)).await {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "the response timed out")),
            }
        }
    }

    /// Answers one request.
    async fn serve_one(
        &self,
        peer: PeerId,
        stream: &mut libp2p::Stream,
        req: Request,
        corrupt: bool,
    ) -> io::Result<()> {
        // A partial blob is served once its size verified (its last group did): groups
        // verified under a wrong size would be sent with that size.
        let (size, present) = match (self.store.info(&req.hash), self.store.present_groups(&req.hash)) {
            (Ok(Some(info)), Ok(p)) if info.size_verified => (info.size, p),
            _ => return stream.write_all(&refuse(Status::NotFound)?).await,
        };
        // Serve what we hold of what was asked, clamped to the blob.
        let groups = Tree::new(size).groups();
        let served: Vec<Range<u64>> = req
            .ranges
            .iter()
            .flat_map(|r| present.present(r.start.min(groups)..r.end.min(groups)))
            .collect();
        let head = ResponseHead {
            status: Status::Ok,
            size,
            ranges: served.clone(),
        };
        // The body waits for an upload slot; slots go round-robin between the peers waiting.
        let _slot = if served.is_empty() {
            None
        } else {
            Some(self.uploads.acquire(peer).await)
        };
        stream.write_all(&head.encode().map_err(io::Error::other)?).await?;
        // The store encodes (and re-verifies) on a blocking thread; chunks cross a channel.
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(2);
        let store = self.store.clone();
        let hash = req.hash;
        let bufs = self.bufs.clone();
        let enc = tokio::task::spawn_blocking(move || {
            let mut w = ChannelWriter { tx, buf: None, bufs };
            let r = store.encode(&hash, &served, &mut w);
            let _ = w.flush();
            r
        });
        let mut first = true;
        while let Some(mut chunk) = rx.recv().await {
            if corrupt && first && !chunk.is_empty() {
                let i = chunk.len() - 1;
                chunk[i] ^= 0x01;
                first = false;
            }
            if let Some(r) = &self.up_rate {
                r.take(chunk.len() as u64).await;
            }
            stream.write_all(&chunk).await?;
            self.counters.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            self.metrics.bytes_served.inc_by(chunk.len() as u64);
            self.swarms.sent(hash, peer, chunk.len() as u64);
            self.bufs.put(chunk);
        }
        match enc.await {
            Ok(Ok(_)) => stream.flush().await,
            // The peer cannot tell where this response ends: the stream must end.
            Ok(Err(e)) => {
                tracing::error!(%peer, "serving {hash}: {e}");
                Err(io::Error::other(e.to_string()))
            }
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Asks `peer` for the groups in `ranges` of blob `h`, verifies what arrives and stores it.
    pub async fn fetch(&self, peer: PeerId, h: Hash, ranges: Vec<Range<u64>>) -> Result<Fetched, FetchError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.fetch_inner(peer, h, ranges)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(peer)),
        }
    }

    /// An idle stream to `peer` from the pool, or a new one.
    async fn stream_to(&self, peer: PeerId) -> Result<(libp2p::Stream, bool), FetchError> {
        {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = pool.get_mut(&peer) {
                list.retain(|(_, since)| since.elapsed() < POOL_IDLE);
                if let Some((s, _)) = list.pop() {
                    return Ok((s, true));
                }
            }
        }
        let mut control = self.control.clone();
        let open = control.open_stream(peer, StreamProtocol::new(protocol::PROTOCOL));
        match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Ok(Ok(s)) => Ok((s, false)),
            Ok(Err(e)) => Err(FetchError::Unreachable(peer, e.to_string())),
            Err(_) => Err(FetchError::Unreachable(peer, "no stream within 5 s".into())),
        }
    }

    /// Gives a stream whose last response was read to the end back to the pool.
    fn put_back(&self, peer: PeerId, s: libp2p::Stream) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let list = pool.entry(peer).or_default();
        if list.len() < POOL_PER_PEER {
            list.push((s, Instant::now()));
        }
    }

    async fn fetch_inner(&self, peer: PeerId, h: Hash, ranges: Vec<Range<u64>>) -> Result<Fetched, FetchError> {
        let req = Request { hash: h, ranges }.encode().map_err(|e| FetchError::Transfer {
            peer,
            source: io::Error::other(e),
        })?;
        // A pooled stream may have been closed by the peer while idle, and a new one may be
        // dropped unread by a peer that gets many at once (libp2p-stream hands inbound
        // streams over one at a time): both fail before the response starts, and are tried
        // again on a fresh stream.
        let mut fresh_tries = 0;
        loop {
            let (stream, reused) = self.stream_to(peer).await?;
            match self.request(peer, h, stream, &req).await {
                Ok(f) => return Ok(f),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Early(e)) => {
                    tracing::debug!(%peer, reused, "blob stream failed before the response: {e}");
                    if !reused {
                        fresh_tries += 1;
                        if fresh_tries == 5 {
                            return Err(FetchError::Transfer { peer, source: e });
                        }
                        tokio::time::sleep(Duration::from_millis(5 * fresh_tries)).await;
                    }
                }
            }
        }
    }

    /// One request on one stream.
    async fn request(&self, peer: PeerId, h: Hash, mut stream: libp2p::Stream, req: &[u8]) -> Result<Fetched, Attempt> {
        let transfer = |source| Attempt::Failed(FetchError::Transfer { peer, source });
        let sent_at = Instant::now();
        stream.write_all(req).await.map_err(Attempt::Early)?;
        stream.flush().await.map_err(Attempt::Early)?;
        let head = read_head(&mut stream).await.map_err(Attempt::Early)?;
        let latency = sent_at.elapsed();
        match head.status {
            Status::Ok => {}
            Status::NotFound => {
                self.put_back(peer, stream);
                return Err(Attempt::Failed(FetchError::NotFound(peer)));
            }
            Status::Busy => return Err(Attempt::Failed(FetchError::Busy(peer))),
            Status::BadRequest => return Err(Attempt::Failed(FetchError::Refused(peer))),
        }
        let body_len = crate::bao::encoded_len(Tree::new(head.size), &head.ranges);
        // The body goes through a channel to a blocking thread that verifies and stores it.
        // An async channel: a full one makes this task wait, never a runtime thread.
        let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
        let store = self.store.clone();
        let (size, served) = (head.size, head.ranges.clone());
        let bufs = self.bufs.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut r = ChannelReader {
                rx,
                buf: Vec::new(),
                at: 0,
                bufs,
            };
            store.write_verified(&h, size, &served, &mut r)
        });
        // Whole chunks go to the verifier (a frame at a time would wake it for every 16 KiB).
        let mut left = body_len;
        let mut read_err = None;
        while left > 0 && read_err.is_none() {
            let mut buf = self.bufs.get();
            let want = (left as usize).min(CHUNK);
            let mut got = 0;
            while got < want {
                match stream.read(&mut buf[got..want]).await {
                    Ok(0) => {
                        read_err = Some(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended early"));
                        break;
                    }
                    Ok(k) => got += k,
                    Err(e) => {
                        read_err = Some(e);
                        break;
                    }
                }
            }
            self.counters.received.fetch_add(got as u64, Ordering::Relaxed);
            self.metrics.bytes_fetched.inc_by(got as u64);
            if let Some(r) = &self.down_rate {
                // Reading slower slows the sender (flow control).
                r.take(got as u64).await;
            }
            self.swarms.received(h, peer, got as u64);
            left -= got as u64;
            buf.truncate(got);
            if got > 0 && tx.send(buf).await.is_err() {
                break; // the verifier stopped: its result says why
            }
        }
        drop(tx);
        let stored = writer.await.map_err(|e| transfer(io::Error::other(e)))?;
        match stored {
            Ok(written) => {
                if written != Written::Partial {
                    // The fsync (and, for the last groups, marking the blob complete) runs
                    // behind the reader: the groups are readable now.
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = store.sync_partial(&h) {
                            tracing::error!("{e}");
                        }
                    });
                }
                if let Some(e) = read_err {
                    return Err(transfer(e));
                }
                self.put_back(peer, stream);
                self.got_groups(h, &head.ranges);
                let groups: u64 = head.ranges.iter().map(|r| r.end - r.start).sum();
                self.metrics.groups_verified.inc_by(groups);
                self.metrics.fetch_latency.observe(latency.as_secs_f64());
                Ok(Fetched {
                    size: head.size,
                    latency,
                    bytes: body_len,
                    ranges: head.ranges,
                    complete: written == Written::AllPresent,
                })
            }
            Err(StoreError::BadData { .. }) => {
                self.metrics.groups_failed.inc();
                self.ban(peer).await;
                Err(Attempt::Failed(FetchError::Bad { peer }))
            }
            Err(e) => match read_err {
                Some(re) => Err(transfer(re)),
                None => Err(Attempt::Failed(e.into())),
            },
        }
    }
}

/// The next request on a stream, or `None` if the peer closed it instead.
async fn read_request(s: &mut libp2p::Stream) -> Result<Option<protocol::Incoming>, protocol::ProtocolError> {
    let mut head = [0u8; 35];
    if s.read(&mut head[..1]).await? == 0 {
        return Ok(None);
    }
    s.read_exact(&mut head[1..]).await?;
    let n = u16::from_le_bytes([head[33], head[34]]) as usize;
    if n > protocol::MAX_RANGES {
        return Err(protocol::ProtocolError::TooManyRanges(n));
    }
    let mut rest = vec![0u8; n * 16];
    s.read_exact(&mut rest).await?;
    let mut all = head.to_vec();
    all.extend_from_slice(&rest);
    protocol::read_incoming(&mut &all[..]).map(Some)
}

/// The encoded response head that refuses a request with `s`.
fn refuse(s: Status) -> io::Result<Vec<u8>> {
    ResponseHead::refuse(s).encode().map_err(io::Error::other)
}

async fn read_head(s: &mut libp2p::Stream) -> io::Result<ResponseHead> {
    let mut status = [0u8; 1];
    s.read_exact(&mut status).await?;
    if status[0] != Status::Ok as u8 {
        return ResponseHead::read(&mut &status[..]).map_err(io::Error::other);
    }
    let mut fixed = [0u8; 10];
    s.read_exact(&mut fixed).await?;
    let n = u16::from_le_bytes([fixed[8], fixed[9]]) as usize;
    if n > protocol::MAX_RANGES {
        return Err(io::Error::other(protocol::ProtocolError::TooManyRanges(n)));
    }
    let mut rest = vec![0u8; n * 16];
    s.read_exact(&mut rest).await?;
    let mut all = status.to_vec();
    all.extend_from_slice(&fixed);
    all.extend_from_slice(&rest);
    ResponseHead::read(&mut &all[..]).map_err(io::Error::other)
}

/// A `Write` on a blocking thread that hands full chunks to an async task.
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Option<Vec<u8>>,
    bufs: Buffers,
}

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let buf = self.buf.get_or_insert_with(|| {
            let mut v = self.bufs.get();
            v.clear();
            v
        });
        let n = b.len().min(CHUNK - buf.len());
        buf.extend_from_slice(&b[..n]);
        if buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(chunk) = self.buf.take().filter(|b| !b.is_empty()) {
            self.tx
                .blocking_send(chunk)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))?;
        }
        Ok(())
    }
}

/// A `Read` on a blocking thread fed with chunks by an async task.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
    bufs: Buffers,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.bufs.put(std::mem::replace(&mut self.buf, b));
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The task that owns the swarm.
/// The swarm's next event, recorded in the metrics.
async fn next_event(swarm: &mut Swarm<Behaviour>, m: &Metrics) -> SwarmEvent<BehaviourEvent> {
    use libp2p::metrics::Recorder;
    let ev = swarm.select_next_some().await;
    m.libp2p.record(&ev);
    if let SwarmEvent::Behaviour(b) = &ev {
        match b {
            BehaviourEvent::Kad(e) => m.libp2p.record(e),
            BehaviourEvent::Identify(e) => m.libp2p.record(e),
            BehaviourEvent::Ping(e) => m.libp2p.record(e),
            BehaviourEvent::Relay(e) => m.libp2p.record(e),
            BehaviourEvent::Dcutr(e) => m.libp2p.record(e),
            _ => {}
        }
    }
    ev
}

async fn event_loop(
    mut swarm: Swarm<Behaviour>,
    mut rx: mpsc::Receiver<Cmd>,
    banned: Arc<Mutex<HashSet<PeerId>>>,
    reconnected: Arc<Mutex<HashSet<PeerId>>>,
    mut kept: Vec<Kept>,
    metrics: Arc<Metrics>,
) {
    // Dials of kept addresses in flight, and `connect` requests waiting for theirs.
    let mut dials: HashMap<libp2p::swarm::ConnectionId, usize> = HashMap::new();
    let mut waiting: HashMap<libp2p::swarm::ConnectionId, oneshot::Sender<Result<PeerId, String>>> = HashMap::new();
    let mut pending: HashMap<kad::QueryId, watch::Sender<Lookup>> = HashMap::new();
    #[cfg(test)]
    let mut providing: HashMap<kad::QueryId, oneshot::Sender<bool>> = HashMap::new();
    let mut listen: Vec<Multiaddr> = Vec::new();
    // What each peer said it listens on (identify), for peer exchange.
    let mut addrs: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
    let mut bootstrapped = false;
    // When to announce every provided blob again, so that the records carry an address that
    // was confirmed after they were first announced (debounced: confirmations come in bursts).
    let mut reannounce: Option<tokio::time::Instant> = None;
    // Each open connection: its peer, its remote address, when it last answered a ping (or
    // opened) and that ping's round trip. One silent for `SILENT_AFTER` is closed, so a peer
    // whose cable was pulled leaves within about 15 s (libp2p's ping reports the first failure
    // of a connection silently, and a second only after a stream upgrade times out).
    let mut conns: HashMap<libp2p::swarm::ConnectionId, Conn> = HashMap::new();
    let mut liveness = tokio::time::interval(Duration::from_secs(1));
    let mut reach = reach::Reach::new();
    loop {
        tokio::select! {
            _ = liveness.tick() => {
                let now = Instant::now();
                conns.retain(|id, c| {
                    let silent = now.duration_since(c.heard) > SILENT_AFTER;
                    if silent {
                        tracing::info!(peer = %c.peer, "no answer to pings for {} s: closing the connection", SILENT_AFTER.as_secs());
                        swarm.close_connection(*id);
                    }
                    !silent
                });
                // Bootstrap peers and peers added with `connect` are dialed again when they go.
                for (i, k) in kept.iter_mut().enumerate() {
                    if k.peer.is_some_and(|p| swarm.is_connected(&p)) || now < k.next || dials.values().any(|&d| d == i) {
                        continue;
                    }
                    tracing::debug!("dialing {} again", k.addr);
                    let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id().address(k.addr.clone()).build();
                    dials.insert(opts.connection_id(), i);
                    let _ = swarm.dial(opts);
                    k.next = now + k.backoff;
                    k.backoff = (k.backoff * 2).min(MAX_REDIAL);
                }
                reach.tick(&mut swarm);
            }
            _ = tokio::time::sleep_until(reannounce.unwrap_or_else(tokio::time::Instant::now)), if reannounce.is_some() => {
                reannounce = None;
                let kad = &mut swarm.behaviour_mut().kad;
                let keys: Vec<kad::RecordKey> = {
                    use libp2p::kad::store::RecordStore;
                    kad.store_mut().provided().map(|r| r.key.clone()).collect()
                };
                tracing::debug!("announcing {} blobs again with the new addresses", keys.len());
                for k in keys {
                    let _ = kad.start_providing(k);
                }
            }
            cmd = rx.recv() => match cmd {
                Some(Cmd::Provide(h)) => {
                    if let Err(e) = swarm.behaviour_mut().kad.start_providing(record_key(&h)) {
                        tracing::warn!(hash = %h, "cannot announce: {e:?}");
                    }
                }
                #[cfg(test)]
                Some(Cmd::ProvideWait(h, tx)) => {
                    if let Ok(q) = swarm.behaviour_mut().kad.start_providing(record_key(&h)) {
                        providing.insert(q, tx);
                    }
                }
                Some(Cmd::Providers(h, tx)) => {
                    let q = swarm.behaviour_mut().kad.get_providers(record_key(&h));
                    pending.insert(q, tx);
                }
                Some(Cmd::Info(tx)) => {
                    let peers = swarm.connected_peers().copied().collect();
                    let _ = tx.send((listen.clone(), peers, swarm.external_addresses().cloned().collect()));
                }
                Some(Cmd::Stored(h, tx)) => {
                    use libp2p::kad::store::RecordStore;
                    let records = swarm.behaviour_mut().kad.store_mut().providers(&record_key(&h));
                    let _ = tx.send(records.into_iter().map(|r| (r.provider, r.addresses)).collect());
                }
                Some(Cmd::Addrs(peers, tx)) => {
                    let _ = tx.send(peers.iter().filter_map(|p| Some((*p, addrs.get(p)?.clone()))).collect());
                }
                Some(Cmd::Dial(p, list)) => {
                    for a in &list {
                        swarm.behaviour_mut().kad.add_address(&p, a.clone());
                    }
                    if !swarm.is_connected(&p) {
                        // Dialed even while another dial to the peer is under way: that one
                        // may be Kademlia's, with only the peer's private addresses (a QUIC
                        // dial to them waits out its handshake timeout), while these are a
                        // ticket's or a peer exchange's, relayed ones among them.
                        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(p)
                            .condition(libp2p::swarm::dial_opts::PeerCondition::Disconnected)
                            .addresses(list)
                            .build();
                        if let Err(e) = swarm.dial(opts) {
                            tracing::debug!(peer = %p, "cannot dial a peer from peer exchange: {e}");
                        }
                    }
                }
                Some(Cmd::Keep(addr, tx)) => {
                    let i = match kept.iter().position(|k| k.addr == addr) {
                        Some(i) => i,
                        None => {
                            kept.push(Kept::new(addr.clone()));
                            kept.len() - 1
                        }
                    };
                    if let Some(p) = kept[i].peer.filter(|p| swarm.is_connected(p)) {
                        let _ = tx.send(Ok(p));
                        continue;
                    }
                    let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id().address(addr).build();
                    let id = opts.connection_id();
                    match swarm.dial(opts) {
                        Ok(()) => {
                            dials.insert(id, i);
                            waiting.insert(id, tx);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    }
                }
                Some(Cmd::Peers(tx)) => {
                    let mut list: Vec<PeerDetail> = Vec::new();
                    let mut ids: Vec<_> = conns.keys().copied().collect();
                    ids.sort();
                    for id in ids {
                        let c = &conns[&id];
                        if list.iter().any(|d| d.peer == c.peer.to_string()) {
                            continue;
                        }
                        list.push(PeerDetail {
                            peer: c.peer.to_string(),
                            address: without_peer(&c.addr).to_string(),
                            direct: !is_circuit(&c.addr),
                            rtt_ms: c.rtt.map(|d| d.as_secs_f64() * 1000.0),
                        });
                    }
                    list.sort_by(|a, b| a.peer.cmp(&b.peer));
                    let _ = tx.send(list);
                }
                Some(Cmd::Ban(p)) => {
                    let _ = swarm.disconnect_peer_id(p);
                    swarm.behaviour_mut().kad.remove_peer(&p);
                }
                // Dropping the swarm closes every connection and listener.
                Some(Cmd::Stop) | None => return,
            },
            ev = next_event(&mut swarm, &metrics) => match ev {
                SwarmEvent::NewListenAddr { address, .. } => {
                    // A relay's circuit address comes with this node's /p2p on the end.
                    let address = without_peer(&address);
                    tracing::info!("listening on {address}/p2p/{}", swarm.local_peer_id());
                    // A public address needs no one to confirm it; nor does a relay's circuit
                    // address, once the relay accepted the reservation.
                    if (is_public(&address) || is_circuit(&address)) && confirm(&mut swarm, address.clone()) {
                        reannounce = Some(tokio::time::Instant::now() + REANNOUNCE_AFTER);
                    }
                    listen.push(address);
                }
                SwarmEvent::ExpiredListenAddr { address, .. } => {
                    let address = without_peer(&address);
                    listen.retain(|a| *a != address);
                    swarm.remove_external_address(&address);
                }
                SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                    if let Err(e) = reason {
                        tracing::debug!("listener closed: {e}");
                    }
                    reach.listener_closed(listener_id);
                }
                SwarmEvent::NewExternalAddrCandidate { address } => {
                    // A peer saw this node at one of its own listen addresses: no NAT stands
                    // between them, so the address can be dialed (from that peer's side at
                    // least). Confirmed, it goes into the provider records this node
                    // announces. Addresses behind a NAT are for AutoNAT to confirm.
                    let bare = without_peer(&address);
                    if listen.contains(&bare) && confirm(&mut swarm, bare) {
                        reannounce = Some(tokio::time::Instant::now() + REANNOUNCE_AFTER);
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                    conns.insert(
                        connection_id,
                        Conn {
                            peer: peer_id,
                            addr: endpoint.get_remote_address().clone(),
                            heard: Instant::now(),
                            rtt: None,
                            dialed: endpoint.is_dialer(),
                        },
                    );
                    // Once a direct connection stands beside a relayed one (hole punching
                    // worked), the relayed one goes: streams would pick either.
                    if !is_circuit(endpoint.get_remote_address()) {
                        let relayed: Vec<_> = conns
                            .iter()
                            .filter(|(_, c)| c.peer == peer_id && is_circuit(&c.addr))
                            .map(|(id, _)| *id)
                            .collect();
                        for id in relayed {
                            tracing::info!(peer = %peer_id, "direct connection up: closing the relayed one");
                            swarm.close_connection(id);
                        }
                    }
                    reconnected.lock().unwrap_or_else(|e| e.into_inner()).insert(peer_id);
                    if let Some(i) = dials.remove(&connection_id) {
                        kept[i].peer = Some(peer_id);
                    }
                    for k in kept.iter_mut().filter(|k| k.peer == Some(peer_id)) {
                        k.backoff = REDIAL_FIRST;
                    }
                    if let Some(tx) = waiting.remove(&connection_id) {
                        let _ = tx.send(Ok(peer_id));
                    }
                    if banned.lock().unwrap_or_else(|e| e.into_inner()).contains(&peer_id) {
                        let _ = swarm.disconnect_peer_id(peer_id);
                        continue;
                    }
                    if num_established.get() == 1 {
                        let how = if is_circuit(endpoint.get_remote_address()) { "relayed" } else { "direct" };
                        tracing::info!(peer = %peer_id, address = %without_peer(endpoint.get_remote_address()), how, "peer connected");
                    } else {
                        tracing::debug!(peer = %peer_id, "another connection");
                    }
                    if endpoint.is_dialer() {
                        swarm.behaviour_mut().kad.add_address(&peer_id, endpoint.get_remote_address().clone());
                    }
                    if !bootstrapped {
                        bootstrapped = swarm.behaviour_mut().kad.bootstrap().is_ok();
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, connection, result })) => match result {
                    Ok(rtt) => {
                        if let Some(c) = conns.get_mut(&connection) {
                            c.heard = Instant::now();
                            c.rtt = Some(rtt);
                        }
                    }
                    // One late pong (a busy link, a busy machine) is no reason to drop the
                    // connection and the requests on it: one silent for `SILENT_AFTER` is
                    // closed by the check below.
                    Err(e) => tracing::debug!(%peer, "ping: {e}"),
                },
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    dials.remove(&connection_id);
                    if let Some(tx) = waiting.remove(&connection_id) {
                        let _ = tx.send(Err(error.to_string()));
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, cause, num_established, .. } => {
                    conns.remove(&connection_id);
                    if num_established == 0 {
                        reach.peer_gone(&peer_id);
                        tracing::info!(peer = %peer_id, "peer disconnected");
                    }
                    tracing::debug!(peer = %peer_id, remaining = num_established, "connection closed: {cause:?}");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, connection_id, info, .. })) => {
                    if info.protocols.contains(&libp2p::relay::HOP_PROTOCOL_NAME) {
                        if let Some(c) = conns.get(&connection_id).filter(|c| c.dialed && !is_circuit(&c.addr)) {
                            reach.relay_found(peer_id, c.addr.clone());
                        }
                    }
                    // Only DHT servers go into the routing table: a Kademlia client (a node
                    // behind a NAT) lists no DHT protocol and could not be asked.
                    if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) {
                        for a in &info.listen_addrs {
                            swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                        }
                    }
                    if addrs.len() > 10_000 {
                        addrs.clear();
                    }
                    let mut list = info.listen_addrs;
                    list.truncate(protocol::MAX_PEX_ADDRS);
                    addrs.insert(peer_id, list);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Autonat(ev)) => {
                    reach.tested(&ev.tested_addr, ev.result.is_ok());
                }
                SwarmEvent::Behaviour(BehaviourEvent::RelayClient(ev)) => {
                    tracing::info!("relay: {ev:?}");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Relay(ev)) => {
                    tracing::debug!("relay service: {ev:?}");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Dcutr(ev)) => match ev.result {
                    Ok(_) => tracing::info!(peer = %ev.remote_peer_id, "hole punched: direct connection"),
                    Err(e) => tracing::info!(peer = %ev.remote_peer_id, "{e}: staying relayed"),
                },
                SwarmEvent::Behaviour(BehaviourEvent::Upnp(ev)) => {
                    tracing::info!("UPnP: {ev:?}");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    for (p, a) in found {
                        tracing::info!(peer = %p, "found on the local network: {a}");
                        swarm.behaviour_mut().kad.add_address(&p, a.clone());
                        let _ = swarm.dial(a);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                    id, result: QueryResult::GetProviders(res), step, stats, ..
                })) => {
                    // Our own record (a blob we hold) is no answer.
                    let me = *swarm.local_peer_id();
                    let done = step.last || res.is_err() || !matches!(res, Ok(GetProvidersOk::FoundProviders { .. }));
                    if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = &res {
                        // Dial each provider now, while the query still holds the addresses
                        // its record carried (Kademlia forgets them when the query ends).
                        let far: Vec<PeerId> =
                            providers.iter().filter(|p| **p != me && !swarm.is_connected(p)).copied().collect();
                        for p in far {
                            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(p)
                                .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                                .build();
                            if let Err(e) = swarm.dial(opts) {
                                tracing::debug!(peer = %p, "cannot dial a provider: {e}");
                            }
                        }
                    }
                    if let Some(tx) = pending.get(&id) {
                        tx.send_modify(|l| {
                            if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = res {
                                l.found.extend(providers.into_iter().filter(|p| *p != me));
                            }
                            l.done = done;
                            l.requests = stats.num_requests();
                        });
                    }
                    if done {
                        pending.remove(&id);
                    }
                }
                #[cfg(test)]
                SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                    id, result: QueryResult::StartProviding(r), step, ..
                })) if step.last => {
                    if let Some(tx) = providing.remove(&id) {
                        let _ = tx.send(r.is_ok());
                    }
                }
                _ => {}
            }
        }
    }
}

/// How long after an address is confirmed the node announces its blobs again (confirmations
/// come in bursts).
const REANNOUNCE_AFTER: Duration = Duration::from_secs(2);

/// Adds `a` to the node's confirmed external addresses; true if it is new.
fn confirm(swarm: &mut Swarm<Behaviour>, a: Multiaddr) -> bool {
    if swarm.external_addresses().any(|x| *x == a) {
        return false;
    }
    tracing::info!("reachable at {a}");
    swarm.add_external_address(a);
    true
}

/// True if `a` is an IP address reachable from the whole internet: not private, loopback,
/// link-local, shared (CGNAT), documentation or multicast.
fn is_public(a: &Multiaddr) -> bool {
    match a.iter().next() {
        Some(Protocol::Ip4(ip)) => {
            let o = ip.octets();
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_multicast()
                || ip.is_documentation()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] == 0
                || o[0] >= 240)
        }
        Some(Protocol::Ip6(ip)) => {
            let s = ip.segments();
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8
                || ip.to_ipv4_mapped().is_some())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_public;

    #[test]
    fn a_circuit_address_keeps_its_relay_when_the_peer_is_taken_off() {
        let (relay, peer) = (
            libp2p::PeerId::random().to_string(),
            libp2p::PeerId::random().to_string(),
        );
        let a: libp2p::Multiaddr = format!("/ip4/198.18.0.10/tcp/4701/p2p/{relay}/p2p-circuit/p2p/{peer}")
            .parse()
            .unwrap();
        assert_eq!(
            super::without_peer(&a).to_string(),
            format!("/ip4/198.18.0.10/tcp/4701/p2p/{relay}/p2p-circuit")
        );
        assert_eq!(super::peer_of(&a).unwrap().to_string(), peer);
        let direct: libp2p::Multiaddr = format!("/ip4/10.0.0.1/tcp/1/p2p/{peer}").parse().unwrap();
        assert_eq!(super::without_peer(&direct).to_string(), "/ip4/10.0.0.1/tcp/1");
        assert!(super::peer_of(&super::without_peer(&a)).is_none());
    }

    #[test]
    fn only_internet_addresses_count_as_public() {
        for a in [
            "/ip4/192.0.1.7/tcp/4701",
            "/ip4/8.8.8.8/tcp/1",
            "/ip6/2a01:4f8::1/tcp/4701",
        ] {
            assert!(is_public(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/172.16.0.1/tcp/1",
            "/ip4/192.168.1.1/tcp/1",
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip4/169.254.1.1/tcp/1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip4/192.0.2.1/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/ip6/2001:db8::1/tcp/1",
            "/dns4/example.org/tcp/1",
        ] {
            assert!(!is_public(&a.parse().unwrap()), "{a}");
        }
    }
}
