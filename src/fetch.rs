//! The fetcher: gets the groups a reader needs from whichever peers have them.
//!
//! - **Providers** come from connected peers (asked directly) and a DHT lookup, in parallel;
//!   they are remembered per blob. A provider that cannot be reached (a stale record, a
//!   peer gone away) is set aside for a backoff that doubles with each failure.
//! - **Size**: up to `SIZE_ASKS` providers are asked for the first group at once; the first
//!   answer tells the size, and the last group, verified, confirms it.
//! - **Units**: missing groups are fetched in units of `UNIT` groups (256 KiB), aligned. Each
//!   unit goes to the reachable provider with the least work queued, at most `PER_PEER`
//!   requests in flight per provider. Two readers that want the same unit share one fetch.
//! - **Priority**: units a reader waits for go before read-ahead. A read-ahead unit still
//!   queued is promoted when a reader comes to need it.
//! - **Failures**: each request has a timeout; a failed unit is retried on another provider.
//!   A provider that sent bad data is banned by `net` and dropped here.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::hash::Hash;
use crate::net::{FetchError, Net};
use crate::store::Store;
use crate::tree::Tree;

mod fill;

/// Groups per transfer unit: 16 × 16 KiB = 256 KiB.
pub const UNIT: u64 = 16;
/// Requests in flight per provider to start with; the window then follows the provider's
/// measured bandwidth × round-trip time, between `PER_PEER` and `MAX_PER_PEER`.
const PER_PEER: usize = 4;
const MAX_PER_PEER: usize = 48;
/// Units fetched in random order by `fill` before it turns to rarest first.
const RANDOM_FIRST: usize = 4;
/// Providers asked at once for a blob's first group.
const SIZE_ASKS: usize = 8;
/// The first backoff of an unreachable provider; it doubles up to `MAX_BACKOFF`.
const BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a lookup that found nobody is remembered (unless a provider may have appeared).
const MISS_TTL: Duration = Duration::from_secs(60);

/// What the fetcher knows of one provider.
#[derive(Default)]
struct PeerState {
    /// Requests in flight.
    busy: usize,
    /// Units waiting for a slot, each with its priority (raised while it waits).
    waiting: VecDeque<(Arc<AtomicBool>, oneshot::Sender<()>)>,
    /// Set aside until then, after failures to reach it.
    down_until: Option<Instant>,
    failures: u32,
    /// The shortest time a request took to its response's head: the round trip.
    rtt: Option<Duration>,
    /// Bytes per second received from it, over about the last second.
    rate: crate::swarm::Rate<1000>,
    /// Requests allowed in flight.
    window: usize,
}

impl PeerState {
    fn is_down(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|t| now < t)
    }

    fn window(&self) -> usize {
        self.window.max(PER_PEER)
    }

    /// A request brought `bytes` after `latency` to its head: update the round trip, the
    /// rate and the window (twice the bandwidth-delay product in units, plus two).
    fn measured(&mut self, bytes: u64, latency: Duration) {
        let now = std::time::Instant::now();
        self.rtt = Some(self.rtt.map_or(latency, |r| r.min(latency)));
        self.rate.add(bytes, now);
        let bdp = self.rate.get(now) * self.rtt.unwrap_or_default().as_secs_f64();
        let unit_bytes = (UNIT * crate::tree::GROUP_SIZE) as f64;
        self.window = ((2.0 * bdp / unit_bytes).ceil() as usize + 2).clamp(PER_PEER, MAX_PER_PEER);
    }
}

/// A unit being fetched: waiters watch for `true`; `urgent` is raised when a reader needs it.
#[derive(Clone)]
struct Inflight {
    done: watch::Receiver<bool>,
    urgent: Arc<AtomicBool>,
}

/// Fetches blobs from the network into the store.
pub struct Fetcher {
    net: Net,
    store: Arc<Store>,
    providers: Mutex<HashMap<Hash, Vec<PeerId>>>,
    inflight: Mutex<HashMap<(Hash, u64), Inflight>>,
    peers: Mutex<HashMap<PeerId, PeerState>>,
    /// Set when the daemon shuts down: waits on the network end at once.
    stopping: watch::Sender<bool>,
    /// Lookups that found nobody: when, and the peers connected then.
    misses: Mutex<HashMap<Hash, (Instant, Vec<PeerId>)>>,
}

/// A request slot with one provider, given back (to the most urgent waiter) on drop.
struct Slot<'a> {
    fetcher: &'a Fetcher,
    peer: PeerId,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut peers = self.fetcher.peers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(st) = peers.get_mut(&self.peer) else { return };
        loop {
            let next = st
                .waiting
                .iter()
                .position(|(u, _)| u.load(Ordering::Relaxed))
                .or(if st.waiting.is_empty() { None } else { Some(0) });
            let Some(i) = next else {
                st.busy -= 1;
                return;
            };
            let (_, tx) = st.waiting.remove(i).expect("in range");
            // A waiter that gave up is skipped; the slot goes to the next one.
            if tx.send(()).is_ok() {
                return;
            }
        }
    }
}

/// Waits for a slot that `Slot::drop` hands over; if the wait is abandoned after the hand-over,
/// the slot is passed on rather than lost.
struct Waiter<'a> {
    fetcher: &'a Fetcher,
    peer: PeerId,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                drop(Slot {
                    fetcher: self.fetcher,
                    peer: self.peer,
                });
            }
        }
    }
}

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no peer has blob {0}")]
    NoProviders(Hash),
    #[error("blob {hash}: groups {}..{} could not be fetched in time", groups.start, groups.end)]
    Timeout { hash: Hash, groups: Range<u64> },
    #[error("the daemon is shutting down")]
    Stopped,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl Fetcher {
    /// A fetcher over `net` into `store`.
    pub fn new(net: Net, store: Arc<Store>) -> Arc<Fetcher> {
        Arc::new(Fetcher {
            net,
            store,
            providers: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            stopping: watch::channel(false).0,
            misses: Mutex::new(HashMap::new()),
        })
    }

    /// Ends every wait on the network (lookups give "not found", reads fail): the daemon is
    /// shutting down, and nothing should hold up the unmount.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Runs `f`, or gives `otherwise` as soon as the fetcher is stopped.
    async fn unless_stopped<T>(&self, f: impl std::future::Future<Output = T>, otherwise: T) -> T {
        let mut stopping = self.stopping.subscribe();
        tokio::select! {
            r = f => r,
            _ = stopping.wait_for(|s| *s) => otherwise,
        }
    }

    /// The node.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Units being fetched right now.
    pub fn active(&self) -> usize {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Known providers of `h`: connected peers first, then the DHT, asked in parallel.
    async fn find_providers(&self, h: Hash, timeout: Duration) -> Vec<PeerId> {
        let dht = self.net.providers(h, timeout);
        let connected = self.net.connected();
        let (dht, connected) = tokio::join!(dht, connected);
        let mut all: Vec<PeerId> = connected.iter().filter(|p| dht.contains(p)).copied().collect();
        for p in dht.into_iter().chain(connected) {
            if !all.contains(&p) {
                all.push(p);
            }
        }
        all
    }

    /// Adds providers of `h` (found, or named by a ticket), and joins each in the blob's
    /// swarm (have-maps and peers).
    pub fn remember(&self, h: Hash, peers: &[PeerId]) {
        {
            let mut m = self.providers.lock().unwrap_or_else(|e| e.into_inner());
            let list = m.entry(h).or_default();
            for p in peers {
                if !list.contains(p) {
                    list.push(*p);
                }
            }
        }
        for p in peers {
            self.net.join(h, *p);
        }
    }

    fn forget(&self, h: &Hash, p: &PeerId) {
        if let Some(list) = self.providers.lock().unwrap_or_else(|e| e.into_inner()).get_mut(h) {
            list.retain(|x| x != p);
        }
    }

    /// The providers of `h` found so far, and the members of its swarm.
    pub fn known(&self, h: &Hash) -> Vec<PeerId> {
        let mut all = self
            .providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(h)
            .cloned()
            .unwrap_or_default();
        for p in self.net.swarms.members(h) {
            if !all.contains(&p) {
                all.push(p);
            }
        }
        all
    }

    /// Blob `h` verified but its content is hostile (a malformed folder manifest): every peer
    /// known to provide it is banned for the session, and forgotten as its provider.
    pub async fn refuse(&self, h: &Hash, why: &str) {
        for p in self.known(h) {
            self.forget(h, &p);
            self.net.ban_for(p, &format!("it provides {h}, which {why}")).await;
        }
    }

    /// Providers set aside right now, after failures to reach them.
    pub fn set_aside(&self) -> Vec<PeerId> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        peers.iter().filter(|(_, s)| s.is_down(now)).map(|(p, _)| *p).collect()
    }

    /// Forgets the failures of peers that connected again since (a restarted provider is
    /// asked at once, not after its backoff).
    fn forgive_reconnected(&self, peers: &mut HashMap<PeerId, PeerState>) {
        for p in self.net.take_reconnected() {
            if let Some(st) = peers.get_mut(&p) {
                st.failures = 0;
                st.down_until = None;
            }
        }
    }

    /// True while `p` is set aside after failures to reach it.
    fn is_down(&self, p: &PeerId) -> bool {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        self.forgive_reconnected(&mut peers);
        peers.get(p).is_some_and(|s| s.is_down(Instant::now()))
    }

    /// Records how a request to `p` went: reaching it clears its backoff; failing to reach
    /// it (or a timeout) doubles it.
    fn record(&self, p: PeerId, res: &Result<crate::net::Fetched, FetchError>) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let st = peers.entry(p).or_default();
        match res {
            Err(e @ (FetchError::Unreachable(..) | FetchError::Timeout(_))) => {
                st.failures += 1;
                let wait = BACKOFF.saturating_mul(1 << st.failures.min(8)).min(MAX_BACKOFF);
                st.down_until = Some(Instant::now() + wait);
                tracing::debug!("{e}; set aside for {wait:?}");
            }
            other => {
                st.failures = 0;
                st.down_until = None;
                if let Ok(f) = other {
                    st.measured(f.bytes, f.latency);
                }
            }
        }
    }

    /// The reachable provider of `h` not in `skip` that may hold the groups `r` (its
    /// have-map says so, or it sent none) with the least work queued for its window.
    fn pick(&self, h: &Hash, skip: &[PeerId], r: &Range<u64>) -> Option<PeerId> {
        let known = self.known(h);
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        self.forgive_reconnected(&mut peers);
        let now = Instant::now();
        known
            .into_iter()
            .filter(|p| !skip.contains(p))
            .filter(|p| !peers.get(p).is_some_and(|s| s.is_down(now)))
            .filter(|p| self.net.swarms.holds(h, p, r) != Some(false))
            .min_by_key(|p| {
                peers.get(p).map_or(0, |s| {
                    // Load relative to the window, so a fast peer with a wide window takes more.
                    (s.busy + s.waiting.len()) * MAX_PER_PEER / s.window()
                })
            })
    }

    /// A request slot with `p`, in priority order.
    async fn slot(&self, p: PeerId, urgent: &Arc<AtomicBool>) -> Slot<'_> {
        let rx = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let st = peers.entry(p).or_default();
            if st.busy < st.window() {
                st.busy += 1;
                return Slot { fetcher: self, peer: p };
            }
            let (tx, rx) = oneshot::channel();
            st.waiting.push_back((urgent.clone(), tx));
            rx
        };
        let mut w = Waiter {
            fetcher: self,
            peer: p,
            rx: Some(rx),
        };
        let got = w.rx.as_mut().expect("set").await;
        w.rx = None;
        debug_assert!(got.is_ok(), "a waiter's sender is only dropped after sending");
        Slot { fetcher: self, peer: p }
    }

    /// Finds blob `h` on the network and verifies its size: the first group, asked of up to
    /// `SIZE_ASKS` reachable providers at once, then the last group from the first that answered. Returns
    /// the size, or `None` if nobody has it within `timeout`.
    ///
    /// A lookup that found nobody is answered at once for a minute after, unless a provider
    /// may have appeared (`missed_lately`): `ls MNT/<typo>` costs the timeout once.
    pub async fn size(&self, h: Hash, timeout: Duration) -> Option<u64> {
        if let Ok(Some(info)) = self.store.info(&h) {
            if info.size_verified {
                return Some(info.size);
            }
        }
        if self.missed_lately(&h).await {
            tracing::debug!(hash = %h, "nobody had it a moment ago, and no provider has appeared since");
            return None;
        }
        let connected = self.net.connected().await;
        let size = self.size_from_peers(h, timeout).await;
        let mut misses = self.misses.lock().unwrap_or_else(|e| e.into_inner());
        match size {
            None => {
                misses.retain(|_, (at, _)| at.elapsed() < MISS_TTL);
                misses.insert(h, (Instant::now(), connected));
            }
            Some(_) => {
                misses.remove(&h);
            }
        }
        size
    }

    /// True if a lookup of `h` found nobody within `MISS_TTL` and no provider may have
    /// appeared since: no new peer connected, none joined the blob's swarm, and no provider
    /// record for it reached this node.
    async fn missed_lately(&self, h: &Hash) -> bool {
        let Some((at, then)) = self.misses.lock().unwrap_or_else(|e| e.into_inner()).get(h).cloned() else {
            return false;
        };
        let fresh = at.elapsed() < MISS_TTL
            && self.net.connected().await.iter().all(|p| then.contains(p))
            && self.net.swarms.members(h).is_empty()
            && self.net.stored_providers(*h).await.is_empty();
        if !fresh {
            self.misses.lock().unwrap_or_else(|e| e.into_inner()).remove(h);
        }
        fresh
    }

    async fn size_from_peers(&self, h: Hash, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let peers = self.find_providers(h, left.min(Duration::from_secs(5))).await;
            // Every candidate is worth a try later: units are spread over all of them.
            self.remember(h, &peers);
            // A popular blob may have thousands of providers: ask a few (connected ones come
            // first), not all.
            let mut asks: FuturesUnordered<_> = peers
                .into_iter()
                .filter(|p| !self.is_down(p))
                .take(SIZE_ASKS)
                .map(|p| async move {
                    let res = self.net.fetch(p, h, vec![0..1]).await;
                    self.record(p, &res);
                    (p, res)
                })
                .collect();
            let asking = async {
                while let Some((p, res)) = asks.next().await {
                    let first = match res {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::debug!("size of {h} from {p}: {e}");
                            continue;
                        }
                    };
                    let last = Tree::new(first.size).groups() - 1;
                    if last > 0 {
                        if let Err(e) = self.net.fetch(p, h, vec![last..last + 1]).await {
                            tracing::debug!("size of {h} from {p}: the last group: {e}");
                            if matches!(e, FetchError::Bad { .. }) {
                                // The size it claimed is false: keep nothing stored under it.
                                let _ = self.store.forget_unverified(&h);
                            }
                            continue;
                        }
                    }
                    return Some(first.size);
                }
                None
            };
            if let Ok(Some(size)) = tokio::time::timeout_at(deadline, asking).await {
                return Some(size);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }

    /// Makes the groups in `want` of blob `h` present, fetching what is missing; gives up at
    /// `deadline`. `urgent` units (a reader waits for them) go before read-ahead.
    pub async fn ensure(
        self: &Arc<Self>,
        h: Hash,
        want: Range<u64>,
        deadline: Instant,
        urgent: bool,
    ) -> Result<(), GetError> {
        let missing = self.store.missing(&h, want.clone())?;
        if missing.is_empty() {
            return Ok(());
        }
        // Whole aligned units covering what is missing.
        let mut units: Vec<u64> = Vec::new();
        for r in &missing {
            for u in r.start / UNIT..r.end.div_ceil(UNIT) {
                if units.last() != Some(&u) {
                    units.push(u);
                }
            }
        }
        let groups = self.store.info(&h)?.map_or(0, |i| Tree::new(i.size).groups());
        let tasks: Vec<_> = units
            .into_iter()
            .map(|u| {
                let me = self.clone();
                let r = u * UNIT..((u + 1) * UNIT).min(groups);
                tokio::spawn(async move { me.unit(h, u, r, deadline, urgent).await })
            })
            .collect();
        // Done as soon as `want` is present, though a unit may still be busy: one bad group
        // on a peer must not hold back the healthy groups of its unit that the caller wants
        // (its unit goes on looking for that group until the deadline).
        let present = || self.store.missing(&h, want.clone()).is_ok_and(|m| m.is_empty());
        for mut t in tasks {
            loop {
                tokio::select! {
                    _ = &mut t => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                        if present() {
                            return Ok(());
                        }
                    }
                }
            }
        }
        if present() {
            Ok(())
        } else {
            Err(GetError::Timeout { hash: h, groups: want })
        }
    }

    /// Fetches one unit, or waits for the fetch already under way (raising its priority if
    /// this wait is urgent). True when it is present.
    async fn unit(self: &Arc<Self>, h: Hash, u: u64, r: Range<u64>, deadline: Instant, urgent: bool) -> bool {
        let (mine, mut entry) = {
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&(h, u)) {
                Some(e) => (None, e.clone()),
                None => {
                    let (tx, rx) = watch::channel(false);
                    let e = Inflight {
                        done: rx,
                        urgent: Arc::new(AtomicBool::new(urgent)),
                    };
                    m.insert((h, u), e.clone());
                    (Some(tx), e)
                }
            }
        };
        let Some(tx) = mine else {
            if urgent {
                entry.urgent.store(true, Ordering::Relaxed);
            }
            let _ = tokio::time::timeout_at(deadline, entry.done.wait_for(|done| *done)).await;
            return self.store.missing(&h, r).is_ok_and(|m| m.is_empty());
        };
        let done = self.fetch_unit(h, r, deadline, &entry.urgent).await;
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&(h, u));
        let _ = tx.send(true);
        done
    }

    async fn fetch_unit(&self, h: Hash, r: Range<u64>, deadline: Instant, urgent: &Arc<AtomicBool>) -> bool {
        let mut tried: Vec<PeerId> = Vec::new();
        let mut strikes: HashMap<PeerId, u32> = HashMap::new();
        let mut looked: Option<Instant> = None;
        loop {
            if self.store.missing(&h, r.clone()).is_ok_and(|m| m.is_empty()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let Some(p) = self.pick(&h, &tried, &r) else {
                // Every known provider failed this unit or is set aside: look again, at most
                // once a second.
                if looked.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let found = self.find_providers(h, left.min(Duration::from_secs(5))).await;
                self.remember(h, &found);
                looked = Some(Instant::now());
                tried.clear();
                strikes.clear();
                continue;
            };
            let slot = match tokio::time::timeout_at(deadline, self.slot(p, urgent)).await {
                Ok(s) => s,
                Err(_) => return false,
            };
            let res = tokio::time::timeout_at(deadline, self.net.fetch(p, h, vec![r.clone()])).await;
            drop(slot);
            let Ok(res) = res else { return false };
            self.record(p, &res);
            match res {
                Ok(f) if f.ranges.iter().any(|x| x.start <= r.start && x.end >= r.end) => return true,
                Ok(f) => {
                    tracing::debug!(peer = %p, "{h}: peer holds only part of {}..{}", r.start, r.end);
                    self.net.swarms.correct(&h, &p, &r, &f.ranges);
                    tried.push(p);
                }
                Err(e @ (FetchError::Bad { .. } | FetchError::NotFound(_))) => {
                    tracing::debug!("{e}");
                    self.forget(&h, &p);
                    tried.push(p);
                }
                Err(FetchError::Unreachable(..) | FetchError::Timeout(_)) => tried.push(p),
                Err(e) => {
                    // A stream that broke or a busy peer: try it again shortly, a few times,
                    // before moving on to other providers.
                    tracing::debug!("{e}");
                    *strikes.entry(p).or_insert(0) += 1;
                    if strikes[&p] >= 3 {
                        tried.push(p);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// The mount's `BlobSource` on the network: lookups find and size-check a blob, reads fetch
/// the groups they need (and start read-ahead) and wait at most the read timeout.
pub struct NetSource {
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    read_timeout: Duration,
    /// Groups whose fetch just failed (a read waited the whole timeout for them), with when.
    /// The kernel turns one read call into several requests, and when one fails it asks
    /// again for the page the caller wants: those retries fail at once instead of waiting
    /// another timeout, so the read timeout bounds the call. A read after `RETRY_GRACE` gets
    /// a full timeout again.
    failed: Mutex<HashMap<Hash, Vec<FailedGroups>>>,
}

/// Groups a read gave up on, and when.
type FailedGroups = (Range<u64>, Instant);

/// How long after a read timed out a request for the same groups fails at once: the
/// kernel's retries of the same call come well within this.
const RETRY_GRACE: Duration = Duration::from_secs(2);

impl NetSource {
    pub fn new(fetcher: Arc<Fetcher>, rt: tokio::runtime::Handle, read_timeout: Duration) -> NetSource {
        NetSource {
            fetcher,
            rt,
            read_timeout,
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// True if groups of `want` failed to come within the last `RETRY_GRACE`.
    fn just_failed(&self, h: &Hash, want: &Range<u64>) -> bool {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = failed.get_mut(h) else {
            return false;
        };
        list.retain(|(_, at)| at.elapsed() < RETRY_GRACE);
        let hit = list.iter().any(|(r, _)| r.start < want.end && want.start < r.end);
        if list.is_empty() {
            failed.remove(h);
        }
        hit
    }

    /// Remembers the groups of `want` still missing after a read gave up on them.
    fn gave_up(&self, h: &Hash, want: Range<u64>) {
        let missing = self
            .fetcher
            .store
            .missing(h, want.clone())
            .unwrap_or_else(|_| vec![want]);
        let now = Instant::now();
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.retain(|_, list| list.iter().any(|(_, at)| at.elapsed() < RETRY_GRACE));
        failed
            .entry(*h)
            .or_default()
            .extend(missing.into_iter().map(|r| (r, now)));
    }
}

impl crate::fs::BlobSource for NetSource {
    fn find(&self, hash: &Hash, timeout: Duration) -> Option<u64> {
        let f = &self.fetcher;
        self.rt.block_on(f.unless_stopped(f.size(*hash, timeout), None))
    }

    fn refuse(&self, hash: &Hash, why: &str) {
        self.rt.block_on(self.fetcher.refuse(hash, why));
    }

    fn fetch(&self, hash: &Hash, want: Range<u64>, readahead: Range<u64>) -> bool {
        if !readahead.is_empty() {
            let (f, h) = (self.fetcher.clone(), *hash);
            self.rt.spawn(async move {
                let _ = f
                    .ensure(h, readahead, Instant::now() + Duration::from_secs(120), false)
                    .await;
            });
        }
        if self.just_failed(hash, &want) {
            tracing::debug!(hash = %hash, "groups {}..{} failed a moment ago", want.start, want.end);
            return false;
        }
        let deadline = Instant::now() + self.read_timeout;
        let f = &self.fetcher;
        let stopped = Err(GetError::Stopped);
        match self
            .rt
            .block_on(f.unless_stopped(f.ensure(*hash, want.clone(), deadline, true), stopped))
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("{e}");
                self.gave_up(hash, want);
                false
            }
        }
    }
}

/// The peers that sent bytes of `h` lately: what a progress bar calls "peers".
pub fn serving(f: &Fetcher, h: &Hash) -> usize {
    f.net()
        .swarms
        .transfers()
        .into_iter()
        .find(|t| t.hash == *h)
        .map_or(0, |t| t.peers.iter().filter(|p| p.received > 0).count())
}

/// Fetches the whole of blob `h` into the store (what is already there is kept: an
/// interrupted fetch resumes), reporting to `progress` as it goes and once at the end.
pub fn fetch_all(
    ctx: &crate::api::NetCtx,
    store: &Store,
    h: Hash,
    progress: &mut dyn FnMut(&crate::api::Progress),
) -> anyhow::Result<()> {
    let f = &ctx.fetcher;
    let size = ctx
        .rt
        .block_on(f.size(h, ctx.lookup_timeout))
        .ok_or(GetError::NoProviders(h))?;
    let started = std::time::Instant::now();
    let mut throttle = crate::api::Throttle::new();
    let mut show = |finished: bool| {
        let now = || crate::api::Progress {
            what: "get".into(),
            done: store.info(&h).ok().flatten().map_or(0, |i| i.present),
            total: size,
            peers: serving(f, &h),
            files: None,
            elapsed_ms: started.elapsed().as_millis() as u64,
            finished,
            pause: false,
        };
        throttle.report(progress, now, finished);
    };
    show(false);
    let stopped = Err(GetError::Stopped);
    ctx.rt
        .block_on(f.unless_stopped(f.fill(h, size, ctx.read_timeout, &mut || show(false)), stopped))?;
    // Durable and complete (and announced) before `get` says it is done.
    store.sync_partial(&h)?;
    show(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    const U0: Range<u64> = 0..UNIT;

    async fn fetcher() -> (tempfile::TempDir, Arc<Fetcher>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), crate::store::Options::default()).unwrap());
        let opts = crate::net::NetOptions {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            ..Default::default()
        };
        let key = libp2p::identity::Keypair::generate_ed25519();
        let net = Net::start(store.clone(), key, opts).await.unwrap();
        (dir, Fetcher::new(net, store))
    }

    fn busy(f: &Fetcher, p: &PeerId) -> usize {
        f.peers.lock().unwrap().get(p).map_or(0, |s| s.busy)
    }

    #[tokio::test]
    async fn urgent_units_get_the_next_slot_and_no_slot_is_lost() {
        let (_d, f) = fetcher().await;
        let p = PeerId::random();
        let (bg, urgent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(true)));
        let held: Vec<_> = futures::future::join_all((0..PER_PEER).map(|_| f.slot(p, &bg))).await;
        assert_eq!(busy(&f, &p), PER_PEER);
        // Queued in this order: read-ahead, read-ahead that a reader then needs, urgent.
        let order = Arc::new(Mutex::new(Vec::new()));
        let promoted = Arc::new(AtomicBool::new(false));
        let mut waiters = Vec::new();
        for (name, flag) in [
            ("ahead", bg.clone()),
            ("promoted", promoted.clone()),
            ("urgent", urgent.clone()),
        ] {
            let (f, order) = (f.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _s = f.slot(p, &flag).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        promoted.store(true, Ordering::Relaxed);
        // A waiter that gives up leaves the queue without taking a slot with it.
        let gives_up = tokio::time::timeout(Duration::from_millis(10), f.slot(p, &urgent)).await;
        assert!(gives_up.is_err());
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["promoted", "urgent", "ahead"]);
        assert_eq!(busy(&f, &p), 0);
    }

    #[test]
    fn the_window_follows_bandwidth_times_round_trip() {
        let unit = UNIT * crate::tree::GROUP_SIZE;
        // Fast and near (loopback): the floor.
        let mut near = PeerState::default();
        assert_eq!(near.window(), PER_PEER);
        near.measured(unit, Duration::from_micros(500));
        assert_eq!(near.window(), PER_PEER);
        // 40 units a second at 50 ms: 2 units in flight carry it, twice that plus 2 is asked.
        let mut far = PeerState::default();
        for _ in 0..40 {
            far.measured(unit, Duration::from_millis(50));
        }
        let w = far.window();
        assert!(w > PER_PEER && w < MAX_PER_PEER, "{w}");
        // The shortest round trip counts: a slow answer does not shrink the pipe estimate.
        far.measured(unit, Duration::from_millis(400));
        assert!(far.window() >= w);
        // Never more than the cap, however long the path.
        let mut huge = PeerState::default();
        for _ in 0..1000 {
            huge.measured(unit, Duration::from_secs(2));
        }
        assert_eq!(huge.window(), MAX_PER_PEER);
    }

    #[test]
    fn unreachable_providers_are_set_aside_and_the_least_loaded_is_picked() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (_d, f) = fetcher().await;
            let h = Hash::of(b"x");
            let (p1, p2, p3) = (PeerId::random(), PeerId::random(), PeerId::random());
            f.remember(h, &[p1, p2, p3]);
            let never = Arc::new(AtomicBool::new(false));
            let _a = f.slot(p1, &never).await;
            let _b = f.slot(p1, &never).await;
            let _c = f.slot(p2, &never).await;
            assert_eq!(f.pick(&h, &[], &U0), Some(p3));
            f.record(p3, &Err(FetchError::Unreachable(p3, "refused".into())));
            assert_eq!(f.set_aside(), vec![p3]);
            assert_eq!(f.pick(&h, &[], &U0), Some(p2));
            assert_eq!(f.pick(&h, &[p2], &U0), Some(p1));
            assert_eq!(f.pick(&h, &[p1, p2], &U0), None);
            // Reaching it again clears the backoff.
            f.record(p3, &Err(FetchError::NotFound(p3)));
            assert!(f.set_aside().is_empty());
        });
    }
}
