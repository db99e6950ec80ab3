//! One typed API for every operation on a node: the CLI renders its results, the control
//! socket runs it inside the daemon, the HTTP server (`http.rs`) calls it, and tests call it
//! in-process. Serde types in and out; one error type, [`ApiError`], that carries an exit code
//! and an HTTP status. Nothing here knows about clap or terminals.
//!
//! The methods block (they may wait on the network through `NetCtx::rt`): async callers run
//! them with `tokio::task::spawn_blocking`.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::fetch::{Fetcher, GetError};
use crate::hash::{Hash, ParseHashError};
use crate::store::{BlobInfo, Store, StoreError};
use crate::ticket::Ticket;
use crate::tree::Tree;

/// The node, for operations that use the network.
#[derive(Clone)]
pub struct NetCtx {
    pub fetcher: Arc<Fetcher>,
    /// The daemon's mount point, if it has one (for `open`).
    pub mount: Option<PathBuf>,
    pub rt: tokio::runtime::Handle,
    pub lookup_timeout: Duration,
    pub read_timeout: Duration,
}

/// What kind of failure an [`ApiError`] is; it decides the exit code and the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed input: a hash, a ticket, an address, a range.
    BadRequest,
    /// Unknown content: not held here, or nobody has it.
    NotFound,
    /// A missing or wrong API token.
    Unauthorized,
    /// Not possible right now: no daemon, the daemon is stopping, the data directory is busy.
    Unavailable,
    /// The network did not answer in time.
    Timeout,
    /// Something broke here: an I/O error, a corrupt local copy.
    Internal,
}

/// Every failure of the API: a kind and a message a user can act on.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Internal, message)
    }

    /// The process exit code: 2 for bad input (as for a bad command line), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            ErrorKind::BadRequest => 2,
            _ => 1,
        }
    }

    /// The HTTP status.
    pub fn http_status(&self) -> u16 {
        match self.kind {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::Internal => 500,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let kind = match &e {
            StoreError::NotFound(_) | StoreError::Missing { .. } => ErrorKind::NotFound,
            StoreError::Busy { .. } => ErrorKind::Unavailable,
            StoreError::IsDir { .. } | StoreError::SizeMismatch { .. } | StoreError::BadData { .. } => {
                ErrorKind::BadRequest
            }
            StoreError::Corrupt { .. } | StoreError::Io { .. } | StoreError::Db { .. } => ErrorKind::Internal,
        };
        ApiError::new(kind, format!("{:#}", anyhow::Error::from(e)))
    }
}

impl From<GetError> for ApiError {
    fn from(e: GetError) -> ApiError {
        match e {
            GetError::NoProviders(_) => ApiError::not_found(e.to_string()),
            GetError::Timeout { .. } => ApiError::new(ErrorKind::Timeout, e.to_string()),
            GetError::Stopped => ApiError::unavailable(e.to_string()),
            GetError::Store(s) => s.into(),
        }
    }
}

impl From<ParseHashError> for ApiError {
    fn from(e: ParseHashError) -> ApiError {
        ApiError::bad(e.to_string())
    }
}

impl From<crate::ticket::TicketError> for ApiError {
    fn from(e: crate::ticket::TicketError) -> ApiError {
        ApiError::bad(e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        let e = match e.downcast::<ApiError>() {
            Ok(a) => return a,
            Err(e) => e,
        };
        let e = match e.downcast::<StoreError>() {
            Ok(s) => return s.into(),
            Err(e) => e,
        };
        let e = match e.downcast::<GetError>() {
            Ok(g) => return g.into(),
            Err(e) => e,
        };
        let e = match e.downcast::<ParseHashError>() {
            Ok(p) => return p.into(),
            Err(e) => e,
        };
        let e = match e.downcast::<crate::folder::FolderError>() {
            Ok(f) => {
                use crate::folder::FolderError as F;
                let kind = match f {
                    F::NotAFolder(_) => ErrorKind::BadRequest,
                    F::Unavailable { .. } => ErrorKind::NotFound,
                    F::Malformed { .. } | F::Escapes { .. } => ErrorKind::Internal,
                };
                return ApiError::new(kind, f.to_string());
            }
            Err(e) => e,
        };
        ApiError::internal(format!("{e:#}"))
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> ApiError {
        ApiError::internal(e.to_string())
    }
}

/// The API's result type.
pub type ApiResult<T> = Result<T, ApiError>;

/// The result of storing a file: a folder given where a file was expected is bad input.
fn added(r: crate::store::Result<(Hash, u64)>) -> ApiResult<(Hash, u64)> {
    match r {
        Err(e @ StoreError::IsDir { .. }) => Err(ApiError::bad(format!(
            "{:#} (add a folder and what is in it with `swarmfs add -r`)",
            anyhow::Error::from(e)
        ))),
        r => Ok(r?),
    }
}

/// Parses a hash, or a ticket (which holds one, and peers that had it).
pub fn parse_target(s: &str) -> ApiResult<(Hash, Option<Ticket>)> {
    if s.trim_start().starts_with(crate::ticket::PREFIX) {
        let t = Ticket::decode(s)?;
        return Ok((t.hash, Some(t)));
    }
    Ok((s.parse::<Hash>()?, None))
}

/// A byte count for people: 1.2 GiB, 48.0 MiB, 512 B.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// What `status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    #[serde(flatten)]
    pub net: crate::net::NetInfo,
    pub cache_used: u64,
    pub cache_size: u64,
    /// Bytes of pinned blobs.
    pub pinned: u64,
    pub blobs: usize,
    pub active_transfers: usize,
    /// Blobs moving now, per peer: bytes and rates each way.
    pub transfers: Vec<crate::swarm::Transfer>,
    /// Bytes moved with each peer since the start.
    pub traffic: Vec<crate::swarm::PeerFlow>,
    /// The mount point, if the daemon has one.
    pub mount: Option<PathBuf>,
    /// The HTTP gateway's address, if it serves one.
    pub http: Option<String>,
    /// Reachability: "public" (some address is confirmed dialable), "relayed" (reachable
    /// through a relay) or "private" (nobody outside can dial this node yet).
    pub reachability: String,
}

/// What `providers` shows per provider (unknown fields: it did not answer a swarm join).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provider {
    pub peer: String,
    pub size: Option<u64>,
    pub bytes_held: Option<u64>,
    pub complete: Option<bool>,
}

/// One blob or folder stored by `add`.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    pub hash: Hash,
    pub size: u64,
    /// As the caller named it (a file name for an upload).
    #[serde(serialize_with = "crate::api::lossy_path")]
    pub path: PathBuf,
    /// A folder: `hash` is its manifest's, `size` the bytes of files beneath.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub folder: bool,
}

/// Paths are bytes; JSON gets them lossily (a non-UTF-8 byte shows as U+FFFD).
pub fn lossy_path<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

/// What `unpin` did to one blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unpinned {
    pub hash: Hash,
    /// A name in the mount that still holds it.
    pub held_by: Option<String>,
}

/// What `gc` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcReport {
    pub evicted: Vec<BlobInfo>,
    pub cache_used: u64,
    pub cache_size: u64,
}

/// What `verify` found in one blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verified {
    pub hash: Hash,
    /// Blocks that failed, by index; each is 16 KiB at offset `16384 * index`.
    pub corrupt: Vec<u64>,
    /// Set when the blob could not be checked at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How far a long operation (`get`, `add`) is: the CLI draws it as a progress bar on a
/// terminal (through the control socket too), and prints one summary line from the last one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// "get" or "add".
    pub what: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all; 0 while not known.
    pub total: u64,
    /// Peers serving (for `get`).
    pub peers: usize,
    /// Files done and in all, for a folder.
    pub files: Option<(usize, usize)>,
    pub elapsed_ms: u64,
    /// The operation ended, and this is its summary.
    pub finished: bool,
    /// Take the bar off the screen for now: a result line is about to be printed.
    #[serde(default)]
    pub pause: bool,
}

/// Where progress goes: a bar, a control socket frame, or nowhere.
pub type ProgressSink<'a> = &'a mut dyn FnMut(&Progress);

/// Calls `sink` at most every 250 ms, and always for a forced (final) report.
pub struct Throttle {
    last: Option<std::time::Instant>,
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle { last: None }
    }

    pub fn report(&mut self, sink: &mut dyn FnMut(&Progress), p: impl FnOnce() -> Progress, force: bool) {
        if !force && self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(250)) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        sink(&p());
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

/// Cells in a transfer's map of groups.
pub const MAP_CELLS: u64 = 100;

/// A blob being moved, as the dashboard draws it.
#[derive(Debug, Clone, Serialize)]
pub struct TransferView {
    pub hash: Hash,
    pub size: u64,
    /// Bytes held here, verified.
    pub present: u64,
    pub complete: bool,
    pub name: Option<String>,
    pub down_rate: u64,
    pub up_rate: u64,
    /// Seconds left at the current rate (none when complete or not moving).
    pub eta_secs: Option<u64>,
    pub members: usize,
    pub availability: f64,
    pub peers: Vec<crate::swarm::PeerFlow>,
    /// `MAP_CELLS` cells (fewer for a small blob), each the percentage of its groups held
    /// here: the torrent client's picture of pieces.
    pub map: Vec<u8>,
}

/// Something that happened, for the live event stream.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A blob became complete here: added, written through the mount, or fetched.
    Blob { hash: Hash, size: u64 },
    /// A peer connected or went away.
    Peer { peer: String, connected: bool },
    /// The transfers under way, every second while any is.
    Transfers { transfers: Vec<TransferView> },
}

/// An operation as data: what the control socket carries for the commands that answer with
/// one value (the CLI renders the `Reply`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    Status,
    Peers,
    Blobs,
    Providers {
        target: String,
    },
    Pin {
        hashes: Vec<Hash>,
    },
    Unpin {
        hashes: Vec<Hash>,
    },
    Gc,
    Verify {
        hashes: Vec<Hash>,
    },
    Connect {
        addr: String,
    },
    /// The entries of a folder (a hash or a ticket).
    List {
        target: String,
    },
    /// A hash or ticket, found on the network, as a path in the daemon's mount.
    Open {
        target: String,
    },
    /// A ticket for a blob held whole here: a hash or ticket, a file or folder in the mount,
    /// or any other file or folder (added first); a relative path is read from `cwd`.
    Share {
        target: String,
        cwd: Option<PathBuf>,
    },
}

/// What a `Call` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", content = "value", rename_all = "snake_case")]
pub enum Reply {
    Status(Box<Status>),
    Peers(Vec<crate::net::PeerDetail>),
    Blobs(Vec<BlobInfo>),
    Providers(Vec<Provider>),
    Pinned(Vec<Hash>),
    Unpinned(Vec<Unpinned>),
    Gc(GcReport),
    Verified(Vec<Verified>),
    Connected {
        peers: Vec<String>,
        failed: Vec<String>,
    },
    Entries(Vec<crate::folder::Entry>),
    /// `unanswered`: the ticket named peers and none answered (the network was asked).
    Opened {
        hash: Hash,
        path: PathBuf,
        unanswered: bool,
    },
    Shared {
        hash: Hash,
        ticket: String,
    },
}

/// The API over one store, and the node if one runs.
pub struct Api {
    store: Arc<Store>,
    net: Option<NetCtx>,
    events: broadcast::Sender<Event>,
    http: Mutex<Option<String>>,
}

impl Api {
    /// The API over `store`, with the node `net` if one runs (the daemon, or a short-lived one).
    pub fn new(store: Arc<Store>, net: Option<NetCtx>) -> Arc<Api> {
        let (events, _) = broadcast::channel(1024);
        let api = Arc::new(Api {
            store: store.clone(),
            net,
            events: events.clone(),
            http: Mutex::new(None),
        });
        let weak = Arc::downgrade(&api);
        store.on_complete(move |h| {
            if let Some(api) = weak.upgrade() {
                api.completed(h);
            }
        });
        api
    }

    fn completed(&self, h: Hash) {
        let size = self.store.info(&h).ok().flatten().map_or(0, |i| i.size);
        if let Some(n) = &self.net {
            // Not for a blob added here: only one that came from peers.
            let peers = n.fetcher.net().swarms.peers_of(&h);
            if peers > 0 {
                tracing::info!(hash = %h, size, peers, "transfer finished: blob complete and verified");
            }
        }
        let _ = self.events.send(Event::Blob { hash: h, size });
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn net(&self) -> Option<&NetCtx> {
        self.net.as_ref()
    }

    /// The node, or the error a command that needs one gives without it.
    pub fn node(&self) -> ApiResult<&NetCtx> {
        self.net.as_ref().ok_or_else(|| {
            ApiError::unavailable(
                "no daemon is running for this data directory; start one with `swarmfs daemon` or `swarmfs mount DIR`",
            )
        })
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Where the HTTP gateway listens, once it does.
    pub fn set_http(&self, addr: Option<String>) {
        *self.http.lock().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// Sets the cache cap (remembered in the data directory).
    pub fn set_cache_size(&self, cap: u64) -> ApiResult<()> {
        Ok(self.store.set_cache_size(cap)?)
    }

    /// Runs a `Call`.
    pub fn call(&self, c: Call) -> ApiResult<Reply> {
        Ok(match c {
            Call::Status => Reply::Status(Box::new(self.status()?)),
            Call::Peers => Reply::Peers(self.peers()?),
            Call::Blobs => Reply::Blobs(self.blobs()?),
            Call::Providers { target } => Reply::Providers(self.providers(&target)?),
            Call::Pin { hashes } => {
                self.pin(&hashes)?;
                Reply::Pinned(hashes)
            }
            Call::Unpin { hashes } => Reply::Unpinned(self.unpin(&hashes)?),
            Call::Gc => Reply::Gc(self.gc()?),
            Call::Verify { hashes } => Reply::Verified(self.verify(&hashes)?),
            Call::Connect { addr } => {
                let (peers, failed) = self.connect(&addr)?;
                Reply::Connected { peers, failed }
            }
            Call::List { target } => Reply::Entries(self.list(&target)?),
            Call::Share { target, cwd } => {
                let t = self.share(&target, cwd.as_deref())?;
                Reply::Shared {
                    hash: t.hash,
                    ticket: t.encode(),
                }
            }
            Call::Open { target } => {
                let (hash, path, unanswered) = self.open_in_mount(&target)?;
                Reply::Opened { hash, path, unanswered }
            }
        })
    }

    /// A ticket for `target` (see `Call::Share`), which must be held whole here.
    pub fn share(&self, target: &str, cwd: Option<&Path>) -> ApiResult<Ticket> {
        let n = self.net.as_ref().ok_or_else(|| {
            ApiError::unavailable(
                "no daemon is running for this data directory; a ticket carries the daemon's addresses: start one with `swarmfs mount DIR`",
            )
        })?;
        let h = share_target(&self.store, target, cwd)?;
        if !self.store.info(&h)?.is_some_and(|i| i.complete) {
            return Err(ApiError::not_found(format!(
                "blob {h} is not held whole here, so it cannot be shared from here"
            )));
        }
        let info = n.rt.block_on(n.fetcher.net().info());
        let peer = info
            .peer_id
            .parse()
            .map_err(|e| ApiError::internal(format!("this node's peer id: {e}")))?;
        Ok(Ticket {
            hash: h,
            peers: vec![(peer, ticket_addrs(&info))],
        })
    }

    /// The entries of folder `target` (a hash, or a ticket whose peers are asked first).
    pub fn list(&self, target: &str) -> ApiResult<Vec<crate::folder::Entry>> {
        let (h, t) = parse_target(target.trim())?;
        if let Some(t) = &t {
            self.introduce(t);
        }
        Ok(crate::folder_io::entries(&self.store, self.net.as_ref(), &h)?)
    }

    /// `target` (a hash or a ticket) as a path in the mount, once someone is found to hold it;
    /// true with it if the ticket named peers and none of them answered.
    pub fn open_in_mount(&self, target: &str) -> ApiResult<(Hash, PathBuf, bool)> {
        let n = self.node()?;
        let mount = n
            .mount
            .as_ref()
            .ok_or_else(|| ApiError::unavailable("the daemon has no mount; start it with `swarmfs mount DIR`"))?;
        let (h, t) = parse_target(target.trim())?;
        let unanswered = t
            .as_ref()
            .is_some_and(|t| self.introduce(t).is_empty() && !t.peers.is_empty());
        if n.rt.block_on(n.fetcher.size(h, n.lookup_timeout)).is_none() {
            return Err(ApiError::not_found(format!(
                "nobody has blob {h}: neither the ticket's peers nor the network answered within {} s",
                n.lookup_timeout.as_secs()
            )));
        }
        Ok((h, mount.join(h.to_string()), unanswered))
    }

    /// The node: identity, addresses, cache, transfers.
    pub fn status(&self) -> ApiResult<Status> {
        let n = self.node()?;
        let net = n.rt.block_on(n.fetcher.net().info());
        let swarms = &n.fetcher.net().swarms;
        let list = self.store.list()?;
        let reachability = if net.external.iter().any(|a| !a.contains("/p2p-circuit")) {
            "public"
        } else if net.external.iter().any(|a| a.contains("/p2p-circuit")) {
            "relayed"
        } else {
            "private"
        };
        Ok(Status {
            cache_used: self.store.used(),
            cache_size: self.store.cache_size(),
            pinned: list.iter().filter(|b| b.pinned).map(|b| b.present).sum(),
            blobs: list.len(),
            active_transfers: n.fetcher.active(),
            transfers: swarms.transfers(),
            traffic: swarms.totals(),
            mount: n.mount.clone(),
            http: self.http.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            reachability: reachability.into(),
            net,
        })
    }

    /// Connected peers: address, direct or relayed, round-trip time.
    pub fn peers(&self) -> ApiResult<Vec<crate::net::PeerDetail>> {
        let n = self.node()?;
        Ok(n.rt.block_on(n.fetcher.net().peer_details()))
    }

    /// Every blob held here, whole or in part, with the name that holds it in the mount.
    pub fn blobs(&self) -> ApiResult<Vec<BlobInfo>> {
        let mut list = self.store.list()?;
        for b in &mut list {
            b.name = self.store.named(&b.hash)?;
        }
        list.sort_by_key(|b| b.hash);
        Ok(list)
    }

    /// One blob held here.
    pub fn blob(&self, h: &Hash) -> ApiResult<BlobInfo> {
        let mut b = self.store.info(h)?.ok_or(StoreError::NotFound(*h))?;
        b.name = self.store.named(h)?;
        Ok(b)
    }

    /// The blobs moving now, with rates, ETA and a map of the groups held here.
    pub fn transfers(&self) -> ApiResult<Vec<TransferView>> {
        let n = self.node()?;
        let mut out = Vec::new();
        for t in n.fetcher.net().swarms.transfers() {
            let Some(info) = self.store.info(&t.hash)? else {
                continue;
            };
            let down: u64 = t.peers.iter().map(|p| p.down_rate).sum();
            let up: u64 = t.peers.iter().map(|p| p.up_rate).sum();
            let left = info.size - info.present.min(info.size);
            out.push(TransferView {
                hash: t.hash,
                size: info.size,
                present: info.present,
                complete: info.complete,
                name: self.store.named(&t.hash)?,
                down_rate: down,
                up_rate: up,
                eta_secs: (!info.complete && down > 0).then(|| left.div_ceil(down)),
                members: t.members,
                availability: t.availability,
                peers: t.peers,
                map: self.group_map(&t.hash, info.size)?,
            });
        }
        Ok(out)
    }

    /// The percentage of groups held in each of up to `MAP_CELLS` cells of blob `h`.
    fn group_map(&self, h: &Hash, size: u64) -> ApiResult<Vec<u8>> {
        let groups = Tree::new(size).groups();
        let present = self.store.present_groups(h)?;
        let cells = MAP_CELLS.min(groups.max(1));
        Ok((0..cells)
            .map(|c| {
                let r: Range<u64> = c * groups / cells..(c + 1) * groups / cells;
                let held: u64 = present.present(r.clone()).iter().map(|x| x.end - x.start).sum();
                (100 * held / (r.end - r.start).max(1)) as u8
            })
            .collect())
    }

    /// The peers that provide `target` (a hash or a ticket), and what each holds.
    pub fn providers(&self, target: &str) -> ApiResult<Vec<Provider>> {
        let n = self.node()?;
        let (h, t) = parse_target(target)?;
        if let Some(t) = t {
            self.introduce(&t);
        }
        let net = n.fetcher.net();
        let found = n.rt.block_on(net.all_providers(h, n.lookup_timeout));
        // Ask each what it holds, all at once.
        let held =
            n.rt.block_on(futures::future::join_all(found.iter().map(|p| net.holding(*p, h))));
        Ok(found
            .iter()
            .zip(held)
            .map(|(p, r)| Provider {
                peer: p.to_string(),
                size: r.as_ref().ok().map(|x| x.size),
                bytes_held: r
                    .as_ref()
                    .ok()
                    .map(|x| (x.groups_held * crate::tree::GROUP_SIZE).min(x.size)),
                complete: r.as_ref().ok().map(|x| x.groups_held == x.groups),
            })
            .collect())
    }

    /// Dials the peers in `t` (each at most the lookup timeout) and tells the fetcher they
    /// hold its blob. Returns the peers that connected (none without a node).
    pub fn introduce(&self, t: &Ticket) -> Vec<libp2p::PeerId> {
        let Some(n) = &self.net else { return Vec::new() };
        let net = n.fetcher.net();
        let timeout = n.lookup_timeout;
        let tries = t
            .dial_addrs()
            .into_iter()
            .map(|(p, addrs)| async move { (p, net.dial_wait(p, addrs, timeout).await) });
        let reached: Vec<_> =
            n.rt.block_on(futures::future::join_all(tries))
                .into_iter()
                .filter(|(_, ok)| *ok)
                .map(|(p, _)| p)
                .collect();
        // Joining the blob's swarm starts tasks on the node's runtime.
        let _rt = n.rt.enter();
        n.fetcher.remember(t.hash, &reached);
        reached
    }

    /// A hash, or the hash of a ticket whose peers are dialed first; checks that someone has
    /// it. Returns the hash and the blob's size.
    pub fn open(&self, target: &str) -> ApiResult<(Hash, u64)> {
        let (h, t) = parse_target(target.trim())?;
        if let Some(t) = &t {
            self.introduce(t);
        }
        if let Some(i) = self.store.info(&h)?.filter(|i| i.size_verified) {
            return Ok((h, i.size));
        }
        let n = self.node()?;
        let size = n.rt.block_on(self.size(h))?;
        Ok((h, size))
    }

    /// Stores a file and pins it.
    pub fn add_file(&self, path: &Path) -> ApiResult<(Hash, u64)> {
        added(self.store.import_file(path, true))
    }

    /// `add_file`, telling `progress` the bytes read so far, looked at every 20 ms (the import
    /// runs on a thread of its own meanwhile).
    pub fn add_file_progress(&self, path: &Path, progress: &mut dyn FnMut(u64)) -> ApiResult<(Hash, u64)> {
        let read = std::sync::atomic::AtomicU64::new(0);
        let res = std::thread::scope(|s| {
            let job = s.spawn(|| self.store.import_file_counted(path, true, &read));
            // Reported when it moved: a report of nothing read yet would only hold back the
            // next (a bar is drawn at most every 250 ms).
            let mut shown = 0;
            while !job.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
                let now = read.load(std::sync::atomic::Ordering::Relaxed);
                if now > shown {
                    shown = now;
                    progress(now);
                }
            }
            job.join().expect("the import thread")
        });
        added(res)
    }

    /// Stores what `r` yields and pins it (an upload).
    pub fn add_reader(&self, r: impl Read + Send, name: &Path) -> ApiResult<Added> {
        let (hash, size) = self.store.import_reader(r, true)?;
        Ok(Added {
            hash,
            size,
            path: name.to_owned(),
            folder: false,
        })
    }

    /// Pins blobs so that gc never evicts them.
    pub fn pin(&self, hashes: &[Hash]) -> ApiResult<()> {
        for h in hashes {
            self.store.set_pinned(h, true)?;
        }
        Ok(())
    }

    /// Unpins blobs; says which are still held by a name in the mount.
    pub fn unpin(&self, hashes: &[Hash]) -> ApiResult<Vec<Unpinned>> {
        let mut out = Vec::new();
        for h in hashes {
            self.store.set_pinned(h, false)?;
            out.push(Unpinned {
                hash: *h,
                held_by: self.store.named(h)?,
            });
        }
        Ok(out)
    }

    /// Evicts unpinned blobs, least recently used first, until the cache fits its cap.
    pub fn gc(&self) -> ApiResult<GcReport> {
        let evicted = self.store.gc()?;
        Ok(GcReport {
            evicted,
            cache_used: self.store.used(),
            cache_size: self.store.cache_size(),
        })
    }

    /// Re-hashes blobs (every one if `hashes` is empty), dropping corrupt blocks.
    pub fn verify(&self, hashes: &[Hash]) -> ApiResult<Vec<Verified>> {
        let hashes = if hashes.is_empty() {
            self.store.list()?.into_iter().map(|b| b.hash).collect()
        } else {
            hashes.to_vec()
        };
        Ok(hashes
            .into_iter()
            .map(|h| match self.store.verify(&h) {
                Ok(corrupt) => Verified {
                    hash: h,
                    corrupt,
                    error: None,
                },
                Err(e) => {
                    tracing::error!(hash = %h, "cannot verify: {e}");
                    Verified {
                        hash: h,
                        corrupt: Vec::new(),
                        error: Some(e.to_string()),
                    }
                }
            })
            .collect())
    }

    /// Connects to a peer (or the peers of a ticket) and keeps it connected. Returns the peers
    /// reached and, per address that failed, why.
    pub fn connect(&self, addr: &str) -> ApiResult<(Vec<String>, Vec<String>)> {
        let n = self.node()?;
        let addrs: Vec<libp2p::Multiaddr> = if addr.trim_start().starts_with(crate::ticket::PREFIX) {
            let t = Ticket::decode(addr)?;
            t.dial_addrs().into_iter().flat_map(|(_, a)| a).collect()
        } else {
            vec![addr.parse().map_err(|e| {
                ApiError::bad(format!(
                    "{addr:?} is not a multiaddr ({e}); try /ip4/192.0.2.7/tcp/4701/p2p/12D3KooW..."
                ))
            })?]
        };
        let net = n.fetcher.net();
        let tries = addrs
            .iter()
            .map(|a| async move { (a, net.keep(a.clone(), n.lookup_timeout).await) });
        let (mut reached, mut failed) = (Vec::new(), Vec::new());
        for (a, r) in n.rt.block_on(futures::future::join_all(tries)) {
            match r {
                Ok(p) if !reached.contains(&p.to_string()) => reached.push(p.to_string()),
                Ok(_) => {}
                Err(e) => failed.push(format!("cannot connect to {a}: {e}")),
            }
        }
        Ok((reached, failed))
    }

    /// Makes the groups `groups` of blob `h` present (fetching what is missing), waiting at
    /// most the read timeout. Starts fetching `ahead` too, without waiting for it.
    pub async fn ensure(&self, h: Hash, groups: Range<u64>, ahead: Range<u64>) -> ApiResult<()> {
        let n = self.node()?;
        if !ahead.is_empty() {
            let f = n.fetcher.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                let _ = f.ensure(h, ahead, deadline, false).await;
            });
        }
        let deadline = tokio::time::Instant::now() + n.read_timeout;
        Ok(n.fetcher.ensure(h, groups, deadline, true).await?)
    }

    /// The size of blob `h`: held here, or found on the network (which checks it).
    pub async fn size(&self, h: Hash) -> ApiResult<u64> {
        if let Some(i) = self.store.info(&h)?.filter(|i| i.size_verified) {
            return Ok(i.size);
        }
        let n = self.node()?;
        n.fetcher.size(h, n.lookup_timeout).await.ok_or_else(|| {
            ApiError::not_found(format!(
                "nobody has blob {h}: the network did not answer within {} s",
                n.lookup_timeout.as_secs()
            ))
        })
    }
}

/// The hash that `swarmfs share` shares: a hash as given, a file or folder in the mount by its
/// `user.swarmfs.hash`, or any other file or folder, added to the store (and pinned) first.
fn share_target(store: &Store, s: &str, cwd: Option<&Path>) -> ApiResult<Hash> {
    if let Ok((h, _)) = parse_target(s) {
        return Ok(h);
    }
    let path = cwd.map_or_else(|| PathBuf::from(s), |c| c.join(s));
    if let Some(v) = xattr_hash(&path) {
        return Ok(v);
    }
    if !path.exists() {
        return Err(ApiError::bad(format!(
            "{s:?} is neither a hash, a ticket, a file nor a folder"
        )));
    }
    if path.is_dir() {
        let mut skip = |p: &Path, why: &str| tracing::warn!("share: left out {}: {why}", p.display());
        let import = &mut |p: &Path| Ok(store.import_file(p, true)?);
        return Ok(crate::folder_io::add_dir(store, &path, &path, import, &mut |_, _, _| Ok(()), &mut skip)?.0);
    }
    Ok(store.import_file(&path, true)?.0)
}

/// The `user.swarmfs.hash` of a file in a swarmfs mount.
fn xattr_hash(path: &Path) -> Option<Hash> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: valid NUL-terminated strings and a buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"user.swarmfs.hash".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n != 64 {
        return None;
    }
    std::str::from_utf8(&buf).ok()?.parse().ok()
}

/// The addresses a ticket gives for this node: direct ones first (confirmed ones, then every
/// listen address), then relayed ones (`/p2p-circuit`), loopback last; without the node's own
/// `/p2p` (the ticket holds the peer id once).
fn ticket_addrs(info: &crate::net::NetInfo) -> Vec<libp2p::Multiaddr> {
    use libp2p::multiaddr::Protocol;
    let loopback = |a: &libp2p::Multiaddr| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_loopback(),
            Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    let parsed = |list: &[String]| -> Vec<libp2p::Multiaddr> {
        list.iter()
            .filter_map(|a| a.parse::<libp2p::Multiaddr>().ok())
            // A relay client confirms its circuit address with this node's /p2p on the end.
            .map(|a| crate::net::without_peer(&crate::net::without_peer(&a)))
            .collect()
    };
    let listen = parsed(&info.listen);
    let mut out: Vec<libp2p::Multiaddr> = Vec::new();
    let all: Vec<_> = parsed(&info.external)
        .into_iter()
        .chain(listen.iter().cloned())
        .collect();
    let circuit = crate::net::is_circuit;
    let ordered = all
        .iter()
        .filter(|a| !loopback(a) && !circuit(a))
        .chain(all.iter().filter(|a| circuit(a)))
        .chain(all.iter().filter(|a| loopback(a) && !circuit(a)))
        .cloned();
    for a in ordered {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out.truncate(crate::ticket::MAX_ADDRS);
    out
}
