//! Blob swarms: for each blob, the peers this node exchanges have-maps with, what each of them
//! holds, and the bytes moved per peer.
//!
//! A *member* of a blob's swarm is a peer with an open swarm stream for that blob (`net.rs`
//! runs the streams; `docs/protocol.md` specifies them). Its have-map starts empty and grows
//! with each HAVE it sends. The fetcher reads the maps to pick units a peer holds and to count
//! how rare each unit is; the maps are hints, never trusted for data: what a peer sends is
//! still verified, and a peer that claimed a group it does not hold costs only a retry (its map
//! is corrected by what it actually served).
//!
//! Nothing here does I/O; every method takes a short lock.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use libp2p::PeerId;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use crate::hash::Hash;
use crate::protocol::SwarmMsg;
use crate::store::Present;

/// Most members of one blob's swarm (streams opened or accepted).
pub const MAX_MEMBERS: usize = 32;
/// How fast the per-transfer rates forget, in milliseconds.
const RATE_TAU_MS: u64 = 2000;
/// How long a member's FETCHING hint counts, unless a HAVE settles it sooner.
const FETCHING_FOR: std::time::Duration = std::time::Duration::from_secs(8);
/// Most FETCHING hints kept per member (the oldest go first).
const MAX_FETCHING: usize = 4096;

/// One member of a blob's swarm.
struct Member {
    /// What it told us it holds.
    have: Present,
    /// True once it sent its whole map (SYNCED).
    synced: bool,
    /// Runs it said it is fetching (FETCHING), and when; settled by HAVE or LOST, or lapsed.
    fetching: std::collections::VecDeque<(Range<u64>, Instant)>,
    /// True once a hint of its lapsed unsettled: its hints are ignored from then on, so that
    /// a member cannot keep others off a seeder by claiming to fetch what it never delivers.
    hints_lapsed: bool,
    /// Messages for it (the stream's writer drains this).
    tx: mpsc::UnboundedSender<SwarmMsg>,
    /// Which stream this is, so that a closed older stream does not remove a newer one.
    session: u64,
    /// True if the stream is the one both sides keep when two were opened at once.
    preferred: bool,
}

#[derive(Default)]
struct Blob {
    groups: u64,
    members: HashMap<PeerId, Member>,
}

/// Bytes moved with one peer, for one blob or in all.
#[derive(Default, Clone, Copy)]
struct Flow {
    received: u64,
    sent: u64,
    down: Rate<RATE_TAU_MS>,
    up: Rate<RATE_TAU_MS>,
}

/// A rate that decays exponentially: bytes per second over roughly the last `TAU_MS`.
#[derive(Default, Clone, Copy, Debug)]
pub struct Rate<const TAU_MS: u64> {
    value: f64,
    at: Option<Instant>,
}

impl<const TAU_MS: u64> Rate<TAU_MS> {
    const TAU: f64 = TAU_MS as f64 / 1000.0;

    /// Counts `bytes` arriving at `now`.
    pub fn add(&mut self, bytes: u64, now: Instant) {
        self.value = self.get(now) + bytes as f64 / Self::TAU;
        self.at = Some(now);
    }

    /// Bytes per second as of `now`.
    pub fn get(&self, now: Instant) -> f64 {
        match self.at {
            Some(t) => self.value * (-now.saturating_duration_since(t).as_secs_f64() / Self::TAU).exp(),
            None => 0.0,
        }
    }
}

/// What `status` shows per peer of a transfer.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PeerFlow {
    pub peer: String,
    pub received: u64,
    pub sent: u64,
    /// Bytes per second, over the last few seconds.
    pub down_rate: u64,
    pub up_rate: u64,
    /// Groups the peer told us it holds, if it is a member of the swarm.
    pub groups_held: Option<u64>,
}

/// What `status` shows per blob being moved.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Transfer {
    pub hash: Hash,
    pub members: usize,
    /// Copies of the blob the members hold between them, by their have-maps (BitTorrent's
    /// "distributed copies"): 1.0 or more means that together they hold every group.
    pub availability: f64,
    pub peers: Vec<PeerFlow>,
}

/// Every blob swarm this node is in, and its traffic.
#[derive(Default)]
pub struct Swarms {
    blobs: Mutex<HashMap<Hash, Blob>>,
    /// Joins already tried (or under way), so that a peer is not asked again and again.
    tried: Mutex<HashMap<(Hash, PeerId), Instant>>,
    flows: Mutex<HashMap<(Hash, PeerId), Flow>>,
    totals: Mutex<HashMap<PeerId, Flow>>,
    /// Woken whenever a member joins, leaves or sends a map update.
    pub changed: Notify,
    /// Bumped on every change, so a reader can tell whether to recount.
    version: AtomicU64,
    next_session: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Swarms {
    fn bump(&self) {
        self.version.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// A counter that changes whenever any have-map or membership does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// True if a join with `p` for `h` should be tried now (it is not a member, and no join
    /// was tried in the last `within`); the try is recorded.
    pub fn should_try(&self, h: Hash, p: PeerId, within: std::time::Duration) -> bool {
        if self.is_member(&h, &p) {
            return false;
        }
        let mut t = lock(&self.tried);
        let now = Instant::now();
        if t.len() > 100_000 {
            t.retain(|_, at| now - *at < within);
        }
        match t.get(&(h, p)) {
            Some(at) if now - *at < within => false,
            _ => {
                t.insert((h, p), now);
                true
            }
        }
    }

    /// Registers a stream with `p` for `h` (of `groups` groups); returns its session number,
    /// or `None` if the swarm is full, or if `p` has a `preferred` stream already and this
    /// one is not (the two peers opened one each at once). A newer stream otherwise replaces
    /// an older one.
    pub fn join(
        &self,
        h: Hash,
        groups: u64,
        p: PeerId,
        tx: mpsc::UnboundedSender<SwarmMsg>,
        preferred: bool,
    ) -> Option<u64> {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        {
            let mut blobs = lock(&self.blobs);
            let b = blobs.entry(h).or_default();
            b.groups = groups;
            match b.members.get(&p) {
                Some(m) if m.preferred && !preferred => return None,
                None if b.members.len() >= MAX_MEMBERS => return None,
                _ => {}
            }
            b.members.insert(
                p,
                Member {
                    have: Present::new(groups),
                    synced: false,
                    fetching: Default::default(),
                    hints_lapsed: false,
                    tx,
                    session,
                    preferred,
                },
            );
        }
        self.bump();
        Some(session)
    }

    /// The stream `session` with `p` for `h` ended.
    pub fn leave(&self, h: &Hash, p: &PeerId, session: u64) {
        {
            let mut blobs = lock(&self.blobs);
            let Some(b) = blobs.get_mut(h) else { return };
            if b.members.get(p).is_some_and(|m| m.session == session) {
                b.members.remove(p);
            }
            if b.members.is_empty() {
                blobs.remove(h);
            }
        }
        self.bump();
    }

    /// Applies a HAVE, LOST or SYNCED from `p`.
    pub fn update(&self, h: &Hash, p: &PeerId, msg: &SwarmMsg) {
        {
            let mut blobs = lock(&self.blobs);
            let Some(m) = blobs.get_mut(h).and_then(|b| b.members.get_mut(p)) else {
                return;
            };
            match msg {
                SwarmMsg::Have(rs) => {
                    rs.iter().for_each(|r| m.have.insert(r.clone()));
                    let have = &m.have;
                    m.fetching.retain(|(r, _)| !have.missing(r.clone()).is_empty());
                }
                SwarmMsg::Fetching(_) if m.hints_lapsed => return,
                SwarmMsg::Fetching(rs) => {
                    let now = Instant::now();
                    m.fetching.extend(rs.iter().map(|r| (r.clone(), now)));
                    while m.fetching.len() > MAX_FETCHING {
                        m.fetching.pop_front();
                    }
                }
                SwarmMsg::Lost(rs) => {
                    rs.iter().flat_map(|r| r.clone()).for_each(|g| m.have.remove(g));
                    // It is not fetching them any more either (its request failed).
                    m.fetching
                        .retain(|(f, _)| !rs.iter().any(|r| r.start < f.end && f.start < r.end));
                }
                SwarmMsg::Synced => m.synced = true,
                SwarmMsg::Peers(_) => return,
            }
        }
        self.bump();
    }

    /// `p` did not serve all of `asked` (it may have lied in its map, or lost the groups):
    /// its map now says it holds only what it `served` of them.
    pub fn correct(&self, h: &Hash, p: &PeerId, asked: &Range<u64>, served: &[Range<u64>]) {
        let mut blobs = lock(&self.blobs);
        if let Some(m) = blobs.get_mut(h).and_then(|b| b.members.get_mut(p)) {
            for g in asked.clone() {
                if !served.iter().any(|r| r.contains(&g)) {
                    m.have.remove(g);
                }
            }
        }
    }

    /// Sends `msg` to every member of `h`'s swarm but `except`.
    pub fn broadcast(&self, h: &Hash, msg: SwarmMsg, except: Option<&PeerId>) {
        let blobs = lock(&self.blobs);
        if let Some(b) = blobs.get(h) {
            for (p, m) in &b.members {
                if Some(p) != except {
                    let _ = m.tx.send(msg.clone());
                }
            }
        }
    }

    /// Sends `msg` to member `p` of `h`'s swarm.
    pub fn send(&self, h: &Hash, p: &PeerId, msg: SwarmMsg) {
        if let Some(m) = lock(&self.blobs).get(h).and_then(|b| b.members.get(p)) {
            let _ = m.tx.send(msg);
        }
    }

    pub fn is_member(&self, h: &Hash, p: &PeerId) -> bool {
        lock(&self.blobs).get(h).is_some_and(|b| b.members.contains_key(p))
    }

    /// The members of `h`'s swarm.
    pub fn members(&self, h: &Hash) -> Vec<PeerId> {
        lock(&self.blobs)
            .get(h)
            .map(|b| b.members.keys().copied().collect())
            .unwrap_or_default()
    }

    /// How many peers blob `h` moved with: members of its swarm, and any peer bytes of it
    /// came from or went to (a fetch may end before the swarm is joined).
    pub fn peers_of(&self, h: &Hash) -> usize {
        let mut peers: HashSet<PeerId> = self.members(h).into_iter().collect();
        peers.extend(lock(&self.flows).keys().filter(|(x, _)| x == h).map(|(_, p)| *p));
        peers.len()
    }

    /// Whether `p` holds every group of `r`: `None` if it is not a member (an old peer, or one
    /// not joined yet), whose holdings are unknown.
    pub fn holds(&self, h: &Hash, p: &PeerId, r: &Range<u64>) -> Option<bool> {
        let blobs = lock(&self.blobs);
        let m = blobs.get(h)?.members.get(p)?;
        Some(m.have.missing(r.clone()).is_empty())
    }

    /// The members' have-maps, for counting how rare each group is.
    pub fn maps(&self, h: &Hash) -> Vec<(PeerId, Present)> {
        lock(&self.blobs)
            .get(h)
            .map(|b| b.members.iter().map(|(p, m)| (*p, m.have.clone())).collect())
            .unwrap_or_default()
    }

    /// Runs that members said they are fetching, lately and not yet settled by a HAVE: they
    /// will soon be held there, so a seeder's upload is better spent on other groups. A
    /// member whose oldest hint has lapsed unsettled is found out here, and its hints are
    /// ignored from then on.
    pub fn fetching(&self, h: &Hash) -> Vec<Range<u64>> {
        let now = Instant::now();
        let mut blobs = lock(&self.blobs);
        let Some(b) = blobs.get_mut(h) else { return Vec::new() };
        let mut out = Vec::new();
        for (p, m) in b.members.iter_mut() {
            if m.fetching.front().is_some_and(|(_, t)| now - *t > FETCHING_FOR) {
                tracing::debug!(%p, "a FETCHING hint for {h} lapsed: its hints are ignored from now on");
                m.fetching.clear();
                m.hints_lapsed = true;
            }
            out.extend(m.fetching.iter().map(|(r, _)| r.clone()));
        }
        out
    }

    /// True if `p` told us (with SYNCED, or by its HAVEs) that it holds every group of `h`.
    pub fn is_complete(&self, h: &Hash, p: &PeerId) -> bool {
        lock(&self.blobs)
            .get(h)
            .and_then(|b| b.members.get(p))
            .is_some_and(|m| m.have.is_full())
    }

    /// Counts bytes received from `p` for blob `h`.
    pub fn received(&self, h: Hash, p: PeerId, bytes: u64) {
        let now = Instant::now();
        for f in [
            lock(&self.flows).entry((h, p)).or_default(),
            lock(&self.totals).entry(p).or_default(),
        ] {
            f.received += bytes;
            f.down.add(bytes, now);
        }
    }

    /// Counts bytes sent to `p` for blob `h`.
    pub fn sent(&self, h: Hash, p: PeerId, bytes: u64) {
        let now = Instant::now();
        let mut flows = lock(&self.flows);
        let f = flows.entry((h, p)).or_default();
        f.sent += bytes;
        f.up.add(bytes, now);
        drop(flows);
        let mut totals = lock(&self.totals);
        let t = totals.entry(p).or_default();
        t.sent += bytes;
        t.up.add(bytes, now);
    }

    /// Bytes received from and sent to each peer since the node started.
    pub fn totals(&self) -> Vec<PeerFlow> {
        let now = Instant::now();
        let mut v: Vec<PeerFlow> = lock(&self.totals).iter().map(|(p, f)| flow(p, f, now, None)).collect();
        v.sort_by(|a, b| a.peer.cmp(&b.peer));
        v
    }

    /// The blobs moving now (a member, or bytes in the last ~30 s), with their peers and rates.
    pub fn transfers(&self) -> Vec<Transfer> {
        let now = Instant::now();
        let blobs = lock(&self.blobs);
        let flows = lock(&self.flows);
        let mut hashes: HashSet<Hash> = blobs.keys().copied().collect();
        for ((h, _), f) in flows.iter() {
            if f.down.get(now) + f.up.get(now) >= 1.0 {
                hashes.insert(*h);
            }
        }
        let mut out: Vec<Transfer> = hashes
            .into_iter()
            .map(|h| {
                let b = blobs.get(&h);
                let mut peers: HashSet<PeerId> = b.map(|b| b.members.keys().copied().collect()).unwrap_or_default();
                peers.extend(flows.keys().filter(|(x, _)| *x == h).map(|(_, p)| *p));
                let mut peers: Vec<PeerFlow> = peers
                    .into_iter()
                    .map(|p| {
                        let held = b.and_then(|b| b.members.get(&p)).map(|m| m.have.count());
                        flow(&p, &flows.get(&(h, p)).copied().unwrap_or_default(), now, held)
                    })
                    .collect();
                peers.sort_by(|a, b| a.peer.cmp(&b.peer));
                Transfer {
                    hash: h,
                    availability: b.map_or(0.0, availability),
                    members: b.map_or(0, |b| b.members.len()),
                    peers,
                }
            })
            .collect();
        out.sort_by_key(|t| t.hash.to_string());
        out
    }
}

/// Distributed copies among the members of `b`: the fewest holders of any group, plus the
/// share of groups held by more than that.
fn availability(b: &Blob) -> f64 {
    if b.groups == 0 || b.members.is_empty() {
        return 0.0;
    }
    let counts: Vec<usize> = (0..b.groups)
        .map(|g| b.members.values().filter(|m| m.have.contains(g)).count())
        .collect();
    let min = counts.iter().copied().min().unwrap_or(0);
    let above = counts.iter().filter(|&&c| c > min).count();
    min as f64 + above as f64 / b.groups as f64
}

fn flow(p: &PeerId, f: &Flow, now: Instant, held: Option<u64>) -> PeerFlow {
    PeerFlow {
        peer: p.to_string(),
        received: f.received,
        sent: f.sent,
        down_rate: f.down.get(now) as u64,
        up_rate: f.up.get(now) as u64,
        groups_held: held,
    }
}

/// A have-map as HAVE messages of at most `MAX_RANGES` runs each.
pub fn have_messages(runs: Vec<Range<u64>>) -> Vec<SwarmMsg> {
    runs.chunks(crate::protocol::MAX_RANGES)
        .map(|c| SwarmMsg::Have(c.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_grow_with_have_shrink_with_lost_are_corrected_by_what_was_served_and_hints_settle() {
        let s = Swarms::default();
        let (h, p) = (Hash::of(b"x"), PeerId::random());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let id = s.join(h, 100, p, tx, false).unwrap();
        assert_eq!(s.holds(&h, &p, &(0..16)), Some(false));
        assert_eq!(s.holds(&h, &PeerId::random(), &(0..16)), None);
        s.update(&h, &p, &SwarmMsg::Have(vec![0..32]));
        assert_eq!(s.holds(&h, &p, &(0..16)), Some(true));
        s.update(&h, &p, &SwarmMsg::Lost(vec![3..4]));
        assert_eq!(s.holds(&h, &p, &(0..16)), Some(false));
        s.correct(&h, &p, &(16..32), &[16..20]);
        assert_eq!(s.holds(&h, &p, &(16..20)), Some(true));
        assert_eq!(s.holds(&h, &p, &(20..21)), Some(false));
        assert!(s.transfers()[0].availability < 1.0);
        // FETCHING hints count until a HAVE covers them.
        s.update(&h, &p, &SwarmMsg::Fetching(vec![40..48, 60..64]));
        assert_eq!(s.fetching(&h), vec![40..48, 60..64]);
        s.update(&h, &p, &SwarmMsg::Have(vec![40..48]));
        assert_eq!(s.fetching(&h), vec![60..64]);
        s.update(&h, &p, &SwarmMsg::Fetching(vec![80..88]));
        s.update(&h, &p, &SwarmMsg::Lost(vec![84..85]));
        assert_eq!(s.fetching(&h), vec![60..64]);
        s.update(&h, &p, &SwarmMsg::Have(vec![0..100]));
        assert_eq!(s.transfers()[0].availability, 1.0);
        assert!(s.fetching(&h).is_empty());
        s.broadcast(&h, SwarmMsg::Synced, None);
        assert_eq!(rx.try_recv().unwrap(), SwarmMsg::Synced);
        // An older stream's end does not remove a newer one.
        let (tx2, _rx2) = mpsc::unbounded_channel();
        let id2 = s.join(h, 100, p, tx2, true).unwrap();
        s.leave(&h, &p, id);
        assert!(s.is_member(&h, &p));
        // Of two streams opened at once, the preferred one stays.
        let (tx3, _rx3) = mpsc::unbounded_channel();
        assert_eq!(s.join(h, 100, p, tx3, false), None);
        s.leave(&h, &p, id2);
        assert!(!s.is_member(&h, &p));
    }

    #[test]
    fn a_blob_fetched_before_its_swarm_was_joined_still_counts_its_peer() {
        // The daemon logs "transfer finished" for a blob that moved with peers; a small fetch
        // can end before any swarm stream is up, so bytes received count as well.
        let s = Swarms::default();
        let (h, p) = (Hash::of(b"x"), PeerId::random());
        assert_eq!(s.peers_of(&h), 0);
        s.received(h, p, 1000);
        assert!(s.members(&h).is_empty());
        assert_eq!(s.peers_of(&h), 1);
        assert_eq!(s.peers_of(&Hash::of(b"y")), 0);
    }

    #[test]
    fn rates_decay_and_totals_add_up() {
        let s = Swarms::default();
        let (h, p) = (Hash::of(b"x"), PeerId::random());
        s.received(h, p, 1000);
        s.sent(h, p, 500);
        let t = s.totals();
        assert_eq!((t[0].received, t[0].sent), (1000, 500));
        let tr = s.transfers();
        assert_eq!(tr.len(), 1);
        assert!(tr[0].peers[0].down_rate > 0);
        let mut r = Rate::<RATE_TAU_MS>::default();
        let t0 = Instant::now();
        r.add(1000, t0);
        assert!(r.get(t0 + std::time::Duration::from_secs(20)) < 1.0);
    }
}
