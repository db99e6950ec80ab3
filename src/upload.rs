//! Fair upload: a bounded number of response bodies are sent at once, and when a slot frees
//! it goes to the next peer in turn that is waiting, round-robin, so that no one peer with
//! many requests in flight starves the others.
//!
//! This is BitTorrent's unchoke reduced to its core: a peer is "unchoked" while it holds a
//! slot; every waiting peer gets one in turn. A slot is held while the body is written to the
//! stream, so a slow link holds it longer: the slots share the uplink by time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use tokio::sync::oneshot;

/// Bodies sent at once.
pub const SLOTS: usize = 8;

#[derive(Default)]
struct State {
    active: usize,
    /// Peers with someone waiting, in the order they get the next slots.
    turn: VecDeque<PeerId>,
    waiting: HashMap<PeerId, VecDeque<oneshot::Sender<()>>>,
}

/// The upload slots of one node.
pub struct Uploads {
    slots: usize,
    state: Mutex<State>,
}

/// An upload slot, handed to the next peer in turn when dropped.
pub struct Slot {
    up: Arc<Uploads>,
}

impl Uploads {
    pub fn new(slots: usize) -> Uploads {
        Uploads {
            slots,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a slot for a body to `peer`.
    pub async fn acquire(self: &Arc<Self>, peer: PeerId) -> Slot {
        let rx = {
            let mut st = self.lock();
            if st.active < self.slots {
                st.active += 1;
                return Slot { up: self.clone() };
            }
            let (tx, rx) = oneshot::channel();
            let q = st.waiting.entry(peer).or_default();
            q.push_back(tx);
            if q.len() == 1 {
                st.turn.push_back(peer);
            }
            rx
        };
        let mut guard = Waiting {
            up: self.clone(),
            rx: Some(rx),
        };
        let r = guard.rx.as_mut().expect("set").await;
        guard.rx = None;
        debug_assert!(r.is_ok(), "a waiter's sender is only dropped after sending");
        Slot { up: self.clone() }
    }

    /// A slot was freed: hand it to the next peer in turn, or return it.
    fn release(&self) {
        let mut st = self.lock();
        while let Some(p) = st.turn.pop_front() {
            let Some(q) = st.waiting.get_mut(&p) else { continue };
            let mut handed = false;
            while let Some(tx) = q.pop_front() {
                if tx.send(()).is_ok() {
                    handed = true;
                    break;
                }
            }
            if q.is_empty() {
                st.waiting.remove(&p);
            } else {
                st.turn.push_back(p);
            }
            if handed {
                return;
            }
        }
        st.active -= 1;
    }

    /// Bodies being sent now.
    pub fn active(&self) -> usize {
        self.lock().active
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.up.release();
    }
}

/// A wait for a slot; if it is abandoned after the slot was handed over, the slot is passed on.
struct Waiting {
    up: Arc<Uploads>,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.up.release();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn slots_go_round_robin_between_waiting_peers() {
        let up = Arc::new(Uploads::new(1));
        let (greedy, other) = (PeerId::random(), PeerId::random());
        let held = up.acquire(greedy).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // The greedy peer queues three requests before the other peer queues one.
        for (i, p) in [greedy, greedy, greedy, other].into_iter().enumerate() {
            let (up, order) = (up.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _s = up.acquire(p).await;
                order.lock().unwrap().push(if p == greedy { "greedy" } else { "other" });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            tokio::time::sleep(Duration::from_millis(5 + i as u64)).await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["greedy", "other", "greedy", "greedy"]);
        assert_eq!(up.active(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_wait_loses_no_slot() {
        let up = Arc::new(Uploads::new(1));
        let p = PeerId::random();
        let held = up.acquire(p).await;
        assert!(tokio::time::timeout(Duration::from_millis(10), up.acquire(p))
            .await
            .is_err());
        drop(held);
        assert_eq!(up.active(), 0);
        let _again = tokio::time::timeout(Duration::from_millis(100), up.acquire(p))
            .await
            .unwrap();
    }
}
