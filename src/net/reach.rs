//! Reachability: whether peers can dial this node, and what it does when they cannot.
//!
//! A node is reachable once one of its direct addresses is confirmed: by AutoNAT v2 (a peer
//! dialed it back), by identify (a peer saw it at one of its own listen addresses), by UPnP,
//! or by hand (`--external-addr`). A node that AutoNAT found unreachable, with no direct
//! address confirmed, is a Kademlia client, as in Kubo; the rest are servers. A node that is not reachable, once AutoNAT found an address of its
//! unreachable (or a while passed with no verdict), reserves a slot on up to `RELAYS` relays
//! among the peers it dialed directly, and listens (and advertises) at their `/p2p-circuit`
//! addresses. Peers then reach it through the relay, and DCUtR upgrades such a connection to
//! a direct one where the NATs allow hole punching.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{kad, Multiaddr, PeerId, Swarm};

use super::Behaviour;

/// Relays a private node keeps a reservation on.
const RELAYS: usize = 2;
/// With no verdict from AutoNAT this long after the start, a node without a confirmed direct
/// address takes it to be private.
const NO_VERDICT: Duration = Duration::from_secs(10);
/// A relay that refused or lost a reservation is asked again after this long.
const RELAY_RETRY: Duration = Duration::from_secs(30);

pub(super) struct Reach {
    started: Instant,
    /// Peers that offer the relay service and that this node dialed directly, with the
    /// address it dialed.
    relays: HashMap<PeerId, Multiaddr>,
    /// Reservations: the relay, and the circuit listener on it.
    reserved: HashMap<PeerId, ListenerId>,
    /// When each relay last failed.
    failed: HashMap<PeerId, Instant>,
    /// An AutoNAT server could not dial one of this node's addresses back.
    unreachable_seen: bool,
    mode: Option<kad::Mode>,
}

/// True if the address goes through a relay.
pub(crate) fn is_circuit(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

impl Reach {
    pub(super) fn new() -> Reach {
        Reach {
            started: Instant::now(),
            relays: HashMap::new(),
            reserved: HashMap::new(),
            failed: HashMap::new(),
            unreachable_seen: false,
            mode: None,
        }
    }

    /// A peer offers the relay service; `addr` is the direct address this node dialed it at.
    pub(super) fn relay_found(&mut self, peer: PeerId, addr: Multiaddr) {
        if self.relays.len() < 64 {
            self.relays.insert(peer, super::without_peer(&addr));
        }
    }

    pub(super) fn peer_gone(&mut self, peer: &PeerId) {
        self.relays.remove(peer);
    }

    /// AutoNAT's verdict on one of this node's addresses.
    pub(super) fn tested(&mut self, addr: &Multiaddr, reachable: bool) {
        if reachable {
            tracing::info!("AutoNAT: reachable at {addr}");
        } else {
            tracing::info!("AutoNAT: not reachable at {addr}");
            self.unreachable_seen = true;
        }
    }

    /// A listener closed: if it was a reservation, the relay is asked again later.
    pub(super) fn listener_closed(&mut self, id: ListenerId) {
        if let Some(relay) = self.reserved.iter().find(|(_, l)| **l == id).map(|(p, _)| *p) {
            tracing::info!(%relay, "relay reservation ended");
            self.reserved.remove(&relay);
            self.failed.insert(relay, Instant::now());
        }
    }

    /// Whether this node has a confirmed direct address.
    fn reachable(swarm: &Swarm<Behaviour>) -> bool {
        swarm.external_addresses().any(|a| !is_circuit(a))
    }

    /// Called every second: sets Kademlia's mode, and takes or drops reservations.
    pub(super) fn tick(&mut self, swarm: &mut Swarm<Behaviour>) {
        let reachable = Self::reachable(swarm);
        // A client only once AutoNAT found this node unreachable: until then (a LAN, or no
        // AutoNAT server among the peers) it answers queries, as all nodes of Kubo's LAN
        // DHT do.
        let mode = if reachable || !self.unreachable_seen {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        };
        if self.mode != Some(mode) {
            tracing::info!("DHT mode: {mode}");
            swarm.behaviour_mut().kad.set_mode(Some(mode));
            self.mode = Some(mode);
        }
        if reachable {
            for (relay, id) in self.reserved.drain() {
                tracing::info!(%relay, "reachable directly: dropping the relay reservation");
                swarm.remove_listener(id);
            }
            return;
        }
        if !(self.unreachable_seen || self.started.elapsed() > NO_VERDICT) {
            return;
        }
        let now = Instant::now();
        self.failed.retain(|_, t| now.duration_since(*t) < RELAY_RETRY);
        let mut candidates: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(p, _)| !self.reserved.contains_key(p) && !self.failed.contains_key(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        candidates.sort();
        for (relay, addr) in candidates {
            if self.reserved.len() >= RELAYS {
                break;
            }
            let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::info!("not reachable directly: reserving a slot on relay {circuit}");
                    self.reserved.insert(relay, id);
                }
                Err(e) => {
                    tracing::warn!("cannot listen through relay {circuit}: {e}");
                    self.failed.insert(relay, now);
                }
            }
        }
    }
}
