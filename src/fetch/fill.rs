//! Whole-blob fetches (`get`, `cat`): which unit to ask of which peer.
//!
//! Mount reads fetch what the reader needs and then read ahead in order (`Fetcher::ensure`).
//! A whole-blob fill instead keeps every provider's window full with the units that help the
//! swarm most:
//! - the first `RANDOM_FIRST` units are picked at random, so that a new leecher soon has
//!   something the others lack and can trade;
//! - then *rarest first*: the unit held by the fewest members of the swarm (have-maps), ties
//!   broken at random, so that leechers spread over different units and a seeder's upload is
//!   spent on units nobody else has;
//! - units that another member said it is fetching (FETCHING) count as held there, and are
//!   not asked of a seeder: that member will pass them on, and the seeder's upload goes to
//!   units nobody has yet; this fill tells the members what it asks for in the same way;
//! - a peer is asked only for units its have-map shows (a peer that sent no map, such as an
//!   old node, may be asked for anything);
//! - *endgame*: once every missing unit is asked of someone, idle peers are asked for units
//!   already in flight elsewhere (at most `ENDGAME_COPIES` askers per unit); the first answer
//!   wins and the other requests are dropped. Only peers still fetching are asked for these
//!   copies, never a peer that holds the whole blob: a seeder's upload is what a crowd is
//!   short of, and a duplicate from it delays everyone's unique units.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{AbortHandle, Abortable};
use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Fetcher, GetError, Inflight, Slot, RANDOM_FIRST, UNIT};
use crate::hash::Hash;
use crate::net::FetchError;
use crate::protocol::SwarmMsg;
use crate::tree::Tree;

/// Most peers asked for one unit at once in the endgame.
const ENDGAME_COPIES: usize = 2;
/// How often the DHT is asked again for providers while a fill runs (new leechers announce
/// themselves there).
const LOOKUP_EVERY: Duration = Duration::from_secs(5);
/// How long a peer that failed a unit is not asked for it again.
const FAILED_FOR: Duration = Duration::from_secs(2);

/// A small xorshift generator: random enough to spread leechers over units.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64);
        Rng(h.finish() | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

impl Fetcher {
    /// A request slot with `p` if its window has room and no ranked wait is queued for it.
    fn try_slot(&self, p: PeerId) -> Option<Slot<'_>> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let st = peers.entry(p).or_default();
        if st.busy < st.window() && st.waiting.is_empty() {
            st.busy += 1;
            return Some(Slot { fetcher: self, peer: p });
        }
        None
    }

    /// Fetches every missing group of blob `h` of `size` bytes from the swarm; fails if no
    /// unit arrives for `stall`. Calls `progress` after each unit.
    pub async fn fill(
        self: &Arc<Self>,
        h: Hash,
        size: u64,
        stall: Duration,
        progress: &mut dyn FnMut(),
    ) -> Result<(), GetError> {
        let groups = Tree::new(size).groups();
        let units = groups.div_ceil(UNIT);
        let range = |u: u64| u * UNIT..((u + 1) * UNIT).min(groups);
        let mut rng = Rng::new();
        let mut running = FuturesUnordered::new();
        // Per unit in flight: who is asked, and how to drop the request.
        let mut asked: HashMap<u64, Vec<(PeerId, AbortHandle)>> = HashMap::new();
        // Units this fill entered in `inflight`, so that mount reads wait for them.
        let mut owned: HashMap<u64, watch::Sender<bool>> = HashMap::new();
        let mut failed: HashMap<(u64, PeerId), Instant> = HashMap::new();
        let mut got = 0usize;
        let mut last_progress = Instant::now();
        let mut last_lookup: Option<Instant> = None;
        let mut counts: (u64, Vec<(u32, bool)>) = (u64::MAX, Vec::new());
        let mut last_count = Instant::now();
        let release = |owned: &mut HashMap<u64, watch::Sender<bool>>, u: u64| {
            if let Some(tx) = owned.remove(&u) {
                self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&(h, u));
                let _ = tx.send(true);
            }
        };
        let result = loop {
            let present = self.store.present_groups(&h)?;
            let missing: Vec<u64> = (0..units).filter(|&u| !present.missing(range(u)).is_empty()).collect();
            if missing.is_empty() {
                break Ok(());
            }
            if last_progress.elapsed() > stall {
                let first = missing[0];
                break Err(GetError::Timeout {
                    hash: h,
                    groups: range(first),
                });
            }
            if last_lookup.is_none_or(|t| t.elapsed() > LOOKUP_EVERY) {
                last_lookup = Some(Instant::now());
                let me = self.clone();
                tokio::spawn(async move {
                    let found = me.find_providers(h, Duration::from_secs(5)).await;
                    me.remember(h, &found);
                });
            }
            // How many members hold each unit or said they are fetching it, recounted when a
            // have-map or hint changed, and every second (hints lapse with age).
            let version = self.net.swarms.version();
            if counts.0 != version || last_count.elapsed() > Duration::from_secs(1) {
                last_count = Instant::now();
                let maps = self.net.swarms.maps(&h);
                let fetching = self.net.swarms.fetching(&h);
                let c = (0..units)
                    .map(|u| {
                        let r = range(u);
                        let held = maps.iter().filter(|(_, m)| m.missing(r.clone()).is_empty()).count() as u32;
                        let coming = fetching.iter().any(|f| f.start < r.end && r.start < f.end);
                        (held + coming as u32, coming)
                    })
                    .collect();
                counts = (version, c);
            }
            let now = Instant::now();
            failed.retain(|_, t| now - *t < FAILED_FOR);
            let busy_elsewhere: HashSet<u64> = {
                let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                missing
                    .iter()
                    .copied()
                    .filter(|u| !owned.contains_key(u) && inflight.contains_key(&(h, *u)))
                    .collect()
            };
            let mut idle: Vec<u64> = missing
                .iter()
                .copied()
                .filter(|u| !asked.contains_key(u) && !busy_elsewhere.contains(u))
                .collect();
            let mut cands = self.known(&h);
            {
                let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
                cands.retain(|p| !peers.get(p).is_some_and(|s| s.is_down(now)));
            }
            // Spread the first picks over the peers in a random order.
            for i in (1..cands.len()).rev() {
                cands.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            // Units asked for in this round, to tell the members (FETCHING).
            let mut hints: Vec<u64> = Vec::new();
            for p in cands {
                // A peer that holds the whole blob (a seeder) is not asked for what another
                // member is fetching already: that member will have it soon and can pass it
                // on, and the seeder's upload goes to units nobody has yet.
                let seeder = self.net.swarms.is_complete(&h, &p);
                loop {
                    let may_hold = |u: u64| {
                        !failed.contains_key(&(u, p))
                            && self.net.swarms.holds(&h, &p, &range(u)) != Some(false)
                            && !(seeder && counts.1.get(u as usize).is_some_and(|c| c.1))
                    };
                    let choice = if got < RANDOM_FIRST {
                        let eligible: Vec<usize> = (0..idle.len()).filter(|&i| may_hold(idle[i])).collect();
                        (!eligible.is_empty()).then(|| eligible[(rng.next() % eligible.len() as u64) as usize])
                    } else {
                        let mut best: Option<(u32, u64, usize)> = None;
                        for (i, &u) in idle.iter().enumerate() {
                            if !may_hold(u) {
                                continue;
                            }
                            let key = (counts.1.get(u as usize).map_or(0, |c| c.0), rng.next());
                            if best.is_none_or(|(c, r, _)| key < (c, r)) {
                                best = Some((key.0, key.1, i));
                            }
                        }
                        best.map(|(_, _, i)| i)
                    };
                    let u = match choice {
                        Some(i) => idle.swap_remove(i),
                        // Endgame: nothing left that nobody is asked for.
                        None if idle.is_empty() && !self.net.swarms.is_complete(&h, &p) => {
                            let Some(u) = asked
                                .iter()
                                .filter(|(u, who)| {
                                    who.len() < ENDGAME_COPIES && !who.iter().any(|(x, _)| *x == p) && may_hold(**u)
                                })
                                .min_by_key(|(_, who)| who.len())
                                .map(|(u, _)| *u)
                            else {
                                break;
                            };
                            u
                        }
                        None => break,
                    };
                    let Some(slot) = self.try_slot(p) else {
                        // No room: put the unit back for the next peer.
                        if !asked.contains_key(&u) {
                            idle.push(u);
                        }
                        break;
                    };
                    if !asked.contains_key(&u) && !owned.contains_key(&u) {
                        let (tx, rx) = watch::channel(false);
                        let entry = Inflight {
                            done: rx,
                            urgent: Arc::new(AtomicBool::new(false)),
                        };
                        self.inflight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert((h, u), entry);
                        owned.insert(u, tx);
                        hints.push(u);
                    }
                    let (handle, reg) = AbortHandle::new_pair();
                    let r = range(u);
                    let net = &self.net;
                    running.push(Abortable::new(
                        async move {
                            let res = net.fetch(p, h, vec![r]).await;
                            drop(slot);
                            (u, p, res)
                        },
                        reg,
                    ));
                    asked.entry(u).or_default().push((p, handle));
                }
            }
            if !hints.is_empty() {
                hints.sort_unstable();
                let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
                for r in hints.into_iter().map(range) {
                    match runs.last_mut() {
                        Some(last) if last.end == r.start => last.end = r.end,
                        _ => runs.push(r),
                    }
                }
                for c in runs.chunks(crate::protocol::MAX_RANGES) {
                    self.net.swarms.broadcast(&h, SwarmMsg::Fetching(c.to_vec()), None);
                }
            }
            if running.is_empty() && idle.len() == missing.len() && busy_elsewhere.is_empty() {
                // Nobody to ask: wait for providers (the lookup above) or map updates.
                let _ = tokio::time::timeout(Duration::from_millis(200), self.net.swarms.changed.notified()).await;
                continue;
            }
            let changed = self.net.swarms.changed.notified();
            tokio::select! {
                Some(done) = running.next() => {
                    let Ok((u, p, res)) = done else { continue }; // a losing endgame request
                    self.record(p, &res);
                    if let Some(who) = asked.get_mut(&u) {
                        who.retain(|(x, _)| *x != p);
                    }
                    let whole = match &res {
                        Ok(f) => {
                            let r = range(u);
                            let whole = f.ranges.iter().any(|x| x.start <= r.start && x.end >= r.end);
                            if !whole {
                                self.net.swarms.correct(&h, &p, &r, &f.ranges);
                            }
                            whole
                        }
                        Err(e) => {
                            tracing::debug!("{h}: unit {u}: {e}");
                            if matches!(e, FetchError::Bad { .. } | FetchError::NotFound(_)) {
                                self.forget(&h, &p);
                            }
                            false
                        }
                    };
                    if whole {
                        tracing::trace!(%p, "{h}: unit {u} arrived");
                        got += 1;
                        last_progress = Instant::now();
                        // The endgame's other requests for this unit lost.
                        for (_, a) in asked.remove(&u).unwrap_or_default() {
                            a.abort();
                        }
                        release(&mut owned, u);
                        progress();
                    } else {
                        failed.insert((u, p), Instant::now());
                        if asked.get(&u).is_some_and(|w| w.is_empty()) {
                            asked.remove(&u);
                            release(&mut owned, u);
                            // Withdraw the FETCHING hint, so that nobody waits on this node
                            // for the unit (LOST of what it lacks of it).
                            let lacking = self.store.present_groups(&h)?.missing(range(u));
                            if !lacking.is_empty() {
                                self.net.swarms.broadcast(&h, SwarmMsg::Lost(lacking), None);
                            }
                        }
                    }
                }
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        };
        for (_, who) in asked.drain() {
            for (_, a) in who {
                a.abort();
            }
        }
        drop(running);
        for u in owned.keys().copied().collect::<Vec<_>>() {
            release(&mut owned, u);
        }
        result
    }
}
