//! Swarm streams: have-maps and peer exchange between the peers of one blob's swarm.
//!
//! A node that fetches a blob *joins* each provider it knows (a JOIN on `/swarmfs/blobs/1`,
//! `docs/protocol.md`); the provider answers with the blob's size. Then both sides send their
//! have-maps (HAVE messages, then SYNCED), the members of the swarm each knows (PEERS), and
//! from then on a HAVE for every run of groups that arrives. A PEERS message makes the
//! receiver dial the peers named in it and join them too, so leechers find each other without
//! waiting for the DHT. The stream ends when both sides hold the whole blob, when either
//! closes it, or when it breaks; `Swarms` forgets the member then.

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::{peer_of, Cmd, Net, OPEN_TIMEOUT};
use crate::hash::Hash;
use crate::protocol::{self, Status, SwarmMsg};
use crate::store::Present;
use crate::swarm::have_messages;
use crate::tree::Tree;

/// How long a failed or refused join keeps a peer from being joined again for that blob.
const JOIN_RETRY: Duration = Duration::from_secs(30);
/// A peer that answers a join with "not found" or "busy" may be a leecher that has not
/// learned the blob's size yet (a crowd starts at once): asked again this often, ...
const JOIN_AGAIN: Duration = Duration::from_millis(500);
/// ... this many times, while this node still lacks groups of the blob.
const JOIN_TRIES: u32 = 20;
/// How long to wait for a new member's addresses (identify) before telling others of it.
const ADDR_WAIT: Duration = Duration::from_secs(2);
/// How often a stream checks whether both sides are done.
const DONE_CHECK: Duration = Duration::from_secs(1);

/// What a peer holds of a blob, as `swarmfs providers` shows it.
#[derive(Clone, Debug)]
pub struct Holding {
    pub size: u64,
    pub groups: u64,
    pub groups_held: u64,
}

impl Net {
    /// Called once groups of `h` are verified and stored: announce the blob (the first time),
    /// and tell the swarm.
    pub(super) fn got_groups(&self, h: Hash, ranges: &[std::ops::Range<u64>]) {
        let first = self.announced.lock().unwrap_or_else(|e| e.into_inner()).insert(h);
        if first {
            super::provide_soon(&self.tx, h);
        }
        if !ranges.is_empty() {
            for m in have_messages(ranges.to_vec()) {
                self.swarms.broadcast(&h, m, None);
            }
        }
    }

    /// Joins `peer` in the swarm of `h`, in the background, unless it is a member already or
    /// a join was tried lately.
    pub fn join(&self, h: Hash, peer: PeerId) {
        if peer == self.peer_id || self.is_banned(&peer) || !self.swarms.should_try(h, peer, JOIN_RETRY) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for _ in 0..JOIN_TRIES {
                match me.open_join(peer, h).await {
                    Ok((stream, size)) => return me.session(peer, h, size, stream, true).await,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(JOIN_AGAIN).await;
                        let complete = me.store.info(&h).ok().flatten().is_some_and(|i| i.complete);
                        if complete || me.swarms.is_member(&h, &peer) {
                            return; // it joins us once it has something, or did already
                        }
                    }
                    Err(e) => return tracing::debug!(%peer, "no swarm stream for {h}: {e}"),
                }
            }
            tracing::debug!(%peer, "no swarm stream for {h}: it never had the blob");
        });
    }

    /// Opens a swarm stream with `peer` for `h`; returns it with the size the peer gave.
    async fn open_join(&self, peer: PeerId, h: Hash) -> io::Result<(libp2p::Stream, u64)> {
        let mut control = self.control.clone();
        let open = control.open_stream(peer, StreamProtocol::new(protocol::PROTOCOL));
        let mut s = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(io::Error::other(e.to_string())),
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no stream within 5 s")),
        };
        s.write_all(&protocol::encode_join(&h)).await?;
        s.flush().await?;
        let mut status = [0u8; 1];
        tokio::time::timeout(OPEN_TIMEOUT, s.read_exact(&mut status)).await??;
        match status[0] {
            0 => {}
            // An old node answers kind 2 with "bad request": plain GETs still work with it.
            3 => return Err(io::Error::other("the peer does not speak swarm streams")),
            // Not found or busy: perhaps not yet.
            x @ (1 | 2) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("the peer answered status {x}"),
                ))
            }
            x => return Err(io::Error::other(format!("the peer answered status {x}"))),
        }
        let mut size = [0u8; 8];
        tokio::time::timeout(OPEN_TIMEOUT, s.read_exact(&mut size)).await??;
        let size = u64::from_le_bytes(size);
        if let Ok(Some(info)) = self.store.info(&h) {
            if info.size != size {
                return Err(io::Error::other(format!(
                    "the peer says the size is {size}, not {}",
                    info.size
                )));
            }
        }
        Ok((s, size))
    }

    /// Answers a JOIN for `h` from `peer`, then runs the stream.
    pub(super) async fn accept_join(&self, peer: PeerId, h: Hash, mut s: libp2p::Stream) -> io::Result<()> {
        let size = match self.store.info(&h) {
            Ok(Some(info)) if info.size_verified => info.size,
            _ => {
                s.write_all(&protocol::encode_join_answer(Status::NotFound, 0)).await?;
                return s.close().await;
            }
        };
        s.write_all(&protocol::encode_join_answer(Status::Ok, size)).await?;
        s.flush().await?;
        self.session(peer, h, size, s, false).await;
        Ok(())
    }

    /// Runs one swarm stream until it ends; `opened` if this node opened it.
    async fn session(&self, peer: PeerId, h: Hash, size: u64, stream: libp2p::Stream, opened: bool) {
        let groups = Tree::new(size).groups();
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Two peers that join each other at once open two streams. Both keep the one that the
        // peer with the lower id opened, so that neither closes the stream the other kept.
        let preferred = opened == (self.peer_id < peer);
        // Registered before the map is read, so no update falls between the two (a HAVE sent
        // twice is harmless).
        let Some(session) = self.swarms.join(h, groups, peer, tx, preferred) else {
            tracing::debug!(%peer, "no room for another stream in the swarm of {h}");
            return;
        };
        tracing::debug!(%peer, "swarm stream for {h}");
        let (mut rd, mut wr) = stream.split();
        let mine = if self.lie_have {
            Present::full(groups)
        } else {
            self.store.present_groups(&h).unwrap_or_else(|_| Present::new(groups))
        };
        let mut first = have_messages(mine.present(0..groups));
        first.push(SwarmMsg::Synced);
        let me = self.clone();
        tokio::spawn(async move { me.exchange_peers(h, peer).await });
        let writer = async {
            for m in first {
                write_msg(&mut wr, &m).await?;
            }
            if self.lie_fetching {
                loop {
                    write_msg(&mut wr, &SwarmMsg::Fetching(vec![0..groups])).await?;
                    while let Ok(m) = rx.try_recv() {
                        write_msg(&mut wr, &m).await?;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
            while let Some(m) = rx.recv().await {
                write_msg(&mut wr, &m).await?;
            }
            Ok::<_, io::Error>(())
        };
        let reader = async {
            loop {
                let msg = read_msg(&mut rd).await?;
                match &msg {
                    SwarmMsg::Peers(list) => self.learned_peers(h, list),
                    m => self.swarms.update(&h, &peer, m),
                }
            }
            #[allow(unreachable_code)]
            Ok::<_, io::Error>(())
        };
        let done = async {
            loop {
                tokio::time::sleep(DONE_CHECK).await;
                let complete = self.store.info(&h).ok().flatten().is_some_and(|i| i.complete);
                if complete && self.swarms.is_complete(&h, &peer) {
                    return;
                }
            }
        };
        let why = tokio::select! {
            r = writer => format!("{r:?}"),
            r = reader => format!("{r:?}"),
            _ = done => "both hold the whole blob".to_string(),
        };
        tracing::debug!(%peer, "swarm stream for {h} ended: {why}");
        self.swarms.leave(&h, &peer, session);
    }

    /// Tells `peer` of the other members of `h`'s swarm, and them of it.
    async fn exchange_peers(&self, h: Hash, peer: PeerId) {
        let others: Vec<PeerId> = self.swarms.members(&h).into_iter().filter(|p| *p != peer).collect();
        let mut addrs = self.addrs_of(others.iter().copied().chain([peer]).collect()).await;
        let start = std::time::Instant::now();
        while !addrs.contains_key(&peer) && start.elapsed() < ADDR_WAIT {
            tokio::time::sleep(Duration::from_millis(100)).await;
            addrs.extend(self.addrs_of(vec![peer]).await);
        }
        let entry = |p: &PeerId, a: &Vec<Multiaddr>| (p.to_bytes(), a.iter().map(|a| a.to_vec()).collect());
        let list: Vec<_> = others
            .iter()
            .filter_map(|p| Some(entry(p, addrs.get(p)?)))
            .take(protocol::MAX_PEX_PEERS)
            .collect();
        if !list.is_empty() {
            self.swarms.send(&h, &peer, SwarmMsg::Peers(list));
        }
        if let Some(a) = addrs.get(&peer) {
            self.swarms
                .broadcast(&h, SwarmMsg::Peers(vec![entry(&peer, a)]), Some(&peer));
        }
    }

    /// Dials and joins the peers a PEERS message named.
    fn learned_peers(&self, h: Hash, list: &[(Vec<u8>, Vec<Vec<u8>>)]) {
        for (id, addrs) in list {
            let Ok(p) = PeerId::from_bytes(id) else { continue };
            if p == self.peer_id || self.swarms.is_member(&h, &p) {
                continue;
            }
            let addrs: Vec<Multiaddr> = addrs
                .iter()
                .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                .filter(|a| peer_of(a).is_none_or(|x| x == p))
                .collect();
            if !addrs.is_empty() {
                let _ = self.tx.try_send(Cmd::Dial(p, addrs));
            }
            self.join(h, p);
        }
    }

    /// The listen addresses these peers told us.
    async fn addrs_of(&self, peers: Vec<PeerId>) -> HashMap<PeerId, Vec<Multiaddr>> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Addrs(peers, tx)).await.is_err() {
            return HashMap::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Asks `peer` what it holds of `h` (a swarm stream, closed after its map arrived).
    pub async fn holding(&self, peer: PeerId, h: Hash) -> io::Result<Holding> {
        let (mut s, size) = self.open_join(peer, h).await?;
        let groups = Tree::new(size).groups();
        let mut have = Present::new(groups);
        let read_map = async {
            loop {
                match read_msg(&mut s).await? {
                    SwarmMsg::Have(rs) => rs.into_iter().for_each(|r| have.insert(r)),
                    SwarmMsg::Synced => return Ok::<_, io::Error>(()),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(OPEN_TIMEOUT, read_map).await??;
        let _ = s.close().await;
        Ok(Holding {
            size,
            groups,
            groups_held: have.count(),
        })
    }
}

async fn write_msg<W: futures::AsyncWrite + Unpin>(w: &mut W, m: &SwarmMsg) -> io::Result<()> {
    w.write_all(&m.encode().map_err(io::Error::other)?).await?;
    w.flush().await
}

/// Reads one swarm message: its bytes are gathered as the format says, then parsed (and
/// checked) by `SwarmMsg::read`.
async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<SwarmMsg> {
    async fn take<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
        let at = buf.len();
        buf.resize(at + n, 0);
        r.read_exact(&mut buf[at..]).await
    }
    let mut buf = Vec::new();
    take(r, &mut buf, 1).await?;
    match buf[0] {
        1 | 4 | 5 => {
            take(r, &mut buf, 2).await?;
            let n = u16::from_le_bytes([buf[1], buf[2]]) as usize;
            if n > protocol::MAX_RANGES {
                return Err(io::Error::other(protocol::ProtocolError::TooManyRanges(n)));
            }
            take(r, &mut buf, 16 * n).await?;
        }
        3 => {
            take(r, &mut buf, 1).await?;
            let n = buf[1] as usize;
            if n > protocol::MAX_PEX_PEERS {
                return Err(io::Error::other(protocol::ProtocolError::TooManyPeers(n)));
            }
            for _ in 0..n {
                take(r, &mut buf, 1).await?;
                let idlen = buf[buf.len() - 1] as usize;
                take(r, &mut buf, idlen + 1).await?;
                let k = buf[buf.len() - 1] as usize;
                if k > protocol::MAX_PEX_ADDRS {
                    return Err(io::Error::other(protocol::ProtocolError::TooManyPeers(k)));
                }
                for _ in 0..k {
                    take(r, &mut buf, 1).await?;
                    let alen = buf[buf.len() - 1] as usize;
                    take(r, &mut buf, alen).await?;
                }
            }
        }
        _ => {}
    }
    SwarmMsg::read(&mut &buf[..]).map_err(io::Error::other)
}
