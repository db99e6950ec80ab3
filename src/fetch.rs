//! The fetcher: gets the groups a reader needs from whichever peers have them.
//!
//! - **Providers** come from connected peers (asked directly) and a DHT lookup, in parallel;
//!   they are remembered per blob.
//! - **Size**: the first group tells the size; the last group, verified, confirms it.
//! - **Units**: missing groups are fetched in units of `UNIT` groups (256 KiB), aligned, spread
//!   over providers, `PER_PEER` at a time per provider. Two readers that want the same unit
//!   share one fetch.
//! - **Failures**: each request has a timeout; a failed unit is retried on another provider.
//!   A provider that sent bad data is banned by `net` and dropped here.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::hash::Hash;
use crate::net::{FetchError, Net};
use crate::store::Store;
use crate::tree::Tree;

/// Groups per transfer unit: 16 × 16 KiB = 256 KiB.
pub const UNIT: u64 = 16;
/// Requests in flight per provider.
const PER_PEER: usize = 4;

/// Fetches blobs from the network into the store.
pub struct Fetcher {
    net: Net,
    store: Arc<Store>,
    providers: Mutex<HashMap<Hash, Vec<PeerId>>>,
    /// Units being fetched; waiters watch for `true`.
    inflight: Mutex<HashMap<(Hash, u64), watch::Receiver<bool>>>,
    next_peer: std::sync::atomic::AtomicUsize,
    per_peer: Mutex<HashMap<PeerId, Arc<tokio::sync::Semaphore>>>,
}

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no peer has blob {0}")]
    NoProviders(Hash),
    #[error("blob {hash}: groups {}..{} could not be fetched in time", groups.start, groups.end)]
    Timeout { hash: Hash, groups: Range<u64> },
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
            next_peer: Default::default(),
            per_peer: Mutex::new(HashMap::new()),
        })
    }

    /// The node.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Known providers of `h`: connected peers first, then the DHT, asked in parallel.
    async fn find_providers(&self, h: Hash, timeout: Duration) -> Vec<PeerId> {
        let dht = self.net.providers(h, timeout);
        let connected = self.net.connected();
        let (dht, connected) = tokio::join!(dht, connected);
        let mut all = dht;
        for p in connected {
            if !all.contains(&p) {
                all.push(p);
            }
        }
        all
    }

    fn remember(&self, h: Hash, peers: &[PeerId]) {
        let mut m = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        let list = m.entry(h).or_default();
        for p in peers {
            if !list.contains(p) {
                list.push(*p);
            }
        }
    }

    fn forget(&self, h: &Hash, p: &PeerId) {
        if let Some(list) = self.providers.lock().unwrap_or_else(|e| e.into_inner()).get_mut(h) {
            list.retain(|x| x != p);
        }
    }

    fn known(&self, h: &Hash) -> Vec<PeerId> {
        self.providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(h)
            .cloned()
            .unwrap_or_default()
    }

    /// Finds blob `h` on the network and verifies its size: the first group from a provider,
    /// then the last group. Returns the size, or `None` if nobody has it within `timeout`.
    pub async fn size(&self, h: Hash, timeout: Duration) -> Option<u64> {
        if let Ok(Some(info)) = self.store.info(&h) {
            if info.size_verified {
                return Some(info.size);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let peers = self.find_providers(h, left.min(Duration::from_secs(5))).await;
            // Every candidate is worth a try later: units are spread over all of them.
            self.remember(h, &peers);
            for p in peers {
                let first = match self.net.fetch(p, h, vec![0..1]).await {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!("size of {h} from {p}: {e}");
                        continue;
                    }
                };
                let last = Tree::new(first.size).groups() - 1;
                if last > 0 && self.net.fetch(p, h, vec![last..last + 1]).await.is_err() {
                    continue;
                }
                return Some(first.size);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }

    /// Makes the groups in `want` of blob `h` present, fetching what is missing; gives up at
    /// `deadline`.
    pub async fn ensure(self: &Arc<Self>, h: Hash, want: Range<u64>, deadline: Instant) -> Result<(), GetError> {
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
                tokio::spawn(async move { me.unit(h, u, r, deadline).await })
            })
            .collect();
        let mut ok = true;
        for t in tasks {
            ok &= matches!(t.await, Ok(true));
        }
        if ok && self.store.missing(&h, want.clone())?.is_empty() {
            Ok(())
        } else {
            Err(GetError::Timeout { hash: h, groups: want })
        }
    }

    /// Fetches one unit, or waits for the fetch already under way. True when it is present.
    async fn unit(self: &Arc<Self>, h: Hash, u: u64, r: Range<u64>, deadline: Instant) -> bool {
        let (mine, mut rx) = {
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&(h, u)) {
                Some(rx) => (None, rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(false);
                    m.insert((h, u), rx.clone());
                    (Some(tx), rx)
                }
            }
        };
        let Some(tx) = mine else {
            let _ = tokio::time::timeout_at(deadline, rx.wait_for(|done| *done)).await;
            return self.store.missing(&h, r).is_ok_and(|m| m.is_empty());
        };
        let done = self.fetch_unit(h, r, deadline).await;
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&(h, u));
        let _ = tx.send(true);
        done
    }

    async fn fetch_unit(&self, h: Hash, r: Range<u64>, deadline: Instant) -> bool {
        let mut tried: Vec<PeerId> = Vec::new();
        let mut strikes: HashMap<PeerId, u32> = HashMap::new();
        loop {
            if self.store.missing(&h, r.clone()).is_ok_and(|m| m.is_empty()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let mut peers = self.known(&h);
            if peers.iter().all(|p| tried.contains(p)) {
                let left = deadline.saturating_duration_since(Instant::now());
                let found = self.find_providers(h, left.min(Duration::from_secs(5))).await;
                self.remember(h, &found);
                peers = self.known(&h);
                tried.clear();
                strikes.clear();
                if peers.is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            // Spread units over providers, skipping the ones that already failed this unit.
            let start = self.next_peer.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(p) = (0..peers.len())
                .map(|i| peers[(start + i) % peers.len()])
                .find(|p| !tried.contains(p))
            else {
                continue;
            };
            let permit = self.permit(p).await;
            let res = tokio::time::timeout_at(deadline, self.net.fetch(p, h, vec![r.clone()])).await;
            drop(permit);
            match res {
                Ok(Ok(f)) if f.ranges.iter().any(|x| x.start <= r.start && x.end >= r.end) => return true,
                Ok(Ok(_)) => {
                    tracing::debug!(peer = %p, "{h}: peer holds only part of {}..{}", r.start, r.end);
                    tried.push(p);
                }
                Ok(Err(e @ (FetchError::Bad { .. } | FetchError::NotFound(_)))) => {
                    tracing::debug!("{e}");
                    self.forget(&h, &p);
                    tried.push(p);
                }
                Ok(Err(e)) => {
                    // A stream that broke or a busy peer: try it again shortly, a few times,
                    // before moving on to other providers.
                    tracing::debug!("{e}");
                    *strikes.entry(p).or_insert(0) += 1;
                    if strikes[&p] >= 3 {
                        tried.push(p);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => return false,
            }
        }
    }

    /// Bounds the requests in flight to one provider.
    async fn permit(&self, p: PeerId) -> tokio::sync::OwnedSemaphorePermit {
        let sem = self
            .per_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(p)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(PER_PEER)))
            .clone();
        sem.acquire_owned().await.expect("never closed")
    }
}

/// The mount's `BlobSource` on the network: lookups find and size-check a blob, reads fetch
/// the groups they need (and start read-ahead) and wait at most the read timeout.
pub struct NetSource {
    pub fetcher: Arc<Fetcher>,
    pub rt: tokio::runtime::Handle,
    pub read_timeout: Duration,
}

impl crate::fs::BlobSource for NetSource {
    fn find(&self, hash: &Hash, timeout: Duration) -> Option<u64> {
        self.rt.block_on(self.fetcher.size(*hash, timeout))
    }

    fn fetch(&self, hash: &Hash, want: Range<u64>, readahead: Range<u64>) -> bool {
        if !readahead.is_empty() {
            let (f, h) = (self.fetcher.clone(), *hash);
            self.rt.spawn(async move {
                let _ = f.ensure(h, readahead, Instant::now() + Duration::from_secs(120)).await;
            });
        }
        let deadline = Instant::now() + self.read_timeout;
        match self.rt.block_on(self.fetcher.ensure(*hash, want, deadline)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("{e}");
                false
            }
        }
    }
}

impl Fetcher {
    /// Units being fetched right now.
    pub fn active(&self) -> usize {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Fetches the whole of blob `h` into the store (what is already there is kept: an
/// interrupted fetch resumes), with a progress line on `err` if `progress`.
pub fn fetch_all(
    ctx: &crate::cli::NetCtx,
    store: &Store,
    h: Hash,
    progress: bool,
    err: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let f = &ctx.fetcher;
    let size = ctx
        .rt
        .block_on(f.size(h, ctx.lookup_timeout))
        .ok_or(GetError::NoProviders(h))?;
    let groups = Tree::new(size).groups();
    let started = std::time::Instant::now();
    let had = store.info(&h)?.map_or(0, |i| i.present);
    // Windows of 16 MiB, each fetched in parallel units, in order, so progress is honest.
    const WINDOW: u64 = 1024;
    let mut g = 0;
    while g < groups {
        let w = g..(g + WINDOW).min(groups);
        let deadline = Instant::now() + ctx.read_timeout;
        ctx.rt.block_on(f.ensure(h, w.clone(), deadline))?;
        if progress {
            let got = store.info(&h)?.map_or(0, |i| i.present);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let peers = f.known(&h).len();
            let _ = write!(
                err,
                "\r{:5.1}%  {} / {} MiB  {:.1} MiB/s  {} peer{}   ",
                100.0 * got as f64 / size.max(1) as f64,
                got >> 20,
                size >> 20,
                (got - had.min(got)) as f64 / secs / 1048576.0,
                peers,
                if peers == 1 { "" } else { "s" }
            );
        }
        g = w.end;
    }
    if progress {
        let _ = writeln!(err);
    }
    Ok(())
}
