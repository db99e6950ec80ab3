//! The DHT at scale, in one process: 300 nodes on libp2p's memory transport, each with the
//! daemon's behaviours and event loop (`behaviour`, `run_swarm`), only the transport differs.
//!
//! The default run has 100 nodes. The 300-node test runs with `cargo test --lib scale --
//! --ignored --nocapture` (`SWARMFS_SCALE_N` sets its size): on a 2-core machine 300 nodes
//! saturate both cores and Kademlia's requests time out (docs/bench.md).
//!
//! The daemon confirms a listen address when a peer sees it there, which TCP's port reuse
//! makes happen at a node's first outgoing connection. The memory transport has no port
//! reuse, so each node is given its listen address as `--external-addr` would.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::core::{muxing::StreamMuxerBox, transport::MemoryTransport, upgrade::Version};
use libp2p::{identity::Keypair, noise, yamux, Multiaddr, PeerId, Transport};
use tokio::sync::{mpsc, oneshot, watch};

use super::{behaviour, run_swarm, Cmd, Lookup, NetOptions};
use crate::hash::Hash;

const N: usize = 300;

struct Node {
    peer: PeerId,
    tx: mpsc::Sender<Cmd>,
}

async fn node(port: u64, bootstrap: Vec<Multiaddr>) -> Node {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let addr: Multiaddr = format!("/memory/{port}").parse().unwrap();
    let opts = NetOptions {
        listen: vec![addr.clone()],
        external: vec![addr],
        bootstrap,
        relay_service: true,
        ..Default::default()
    };
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            Ok(MemoryTransport::default()
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .map(|(p, m), _| (p, StreamMuxerBox::new(m))))
        })
        .unwrap()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|key, relay| behaviour(key, relay, &opts))
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    let metrics = crate::metrics::Metrics::new(Default::default());
    let tx = run_swarm(swarm, &opts, Default::default(), Default::default(), metrics).unwrap();
    Node { peer, tx }
}

/// Looks `h` up from `from`: whether `want` was found, and the requests the lookup sent.
async fn lookup(from: &Node, h: Hash, want: PeerId) -> (bool, u32) {
    let t0 = std::time::Instant::now();
    let (tx, mut rx) = watch::channel(Lookup::default());
    from.tx.send(Cmd::Providers(h, tx)).await.unwrap();
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        rx.wait_for(|l| l.done || l.found.contains(&want)),
    )
    .await;
    let l = rx.borrow();
    if !l.found.contains(&want) {
        eprintln!(
            "miss: done {} after {:?}, {} requests, {} found",
            l.done,
            t0.elapsed(),
            l.requests,
            l.found.len()
        );
    }
    (l.found.contains(&want), l.requests)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Looks up every key from a random other live node; returns the share found and the
/// requests per lookup, sorted.
async fn round(nodes: &[Option<Node>], keys: &[(Hash, usize)], seed: &mut u64) -> (f64, Vec<u32>) {
    let live: Vec<usize> = (0..nodes.len()).filter(|i| nodes[*i].is_some()).collect();
    let mut found = 0;
    let mut requests = Vec::new();
    for chunk in keys.chunks(25) {
        let mut asks = Vec::new();
        for (h, owner) in chunk {
            let from = loop {
                let i = live[next(seed) as usize % live.len()];
                if i != *owner {
                    break i;
                }
            };
            asks.push(lookup(
                nodes[from].as_ref().unwrap(),
                *h,
                nodes[*owner].as_ref().unwrap().peer,
            ));
        }
        for (ok, n) in futures::future::join_all(asks).await {
            found += ok as usize;
            requests.push(n);
        }
    }
    requests.sort();
    (found as f64 / keys.len() as f64, requests)
}

/// A small deterministic generator (xorshift), so that a failure can be rerun alike.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The size. 300 nodes in one process saturate a 2-core machine (docs/bench.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "300 nodes in one process saturate a 2-core machine (docs/bench.md)"]
async fn dht_lookups_find_the_provider_among_300_nodes_and_again_after_a_fifth_leave() {
    scale(
        std::env::var("SWARMFS_SCALE_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(N),
    )
    .await;
}

/// The size a 2-core machine holds, in the default run: a record that carries no address, or
/// a routing table that loses the nodes that left, shows here too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_lookups_find_the_provider_among_100_nodes_and_again_after_a_fifth_leave() {
    scale(100).await;
}

async fn scale(n: usize) {
    // Memory ports are global to the process: a base of our own.
    let base = 1_000_000 + (std::process::id() as u64 % 1000) * 1000;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    // Each node joins through two earlier ones, as a real network has several bootstrap
    // nodes: one node alone would turn newcomers away beyond its 256 incoming connections.
    let t0 = std::time::Instant::now();
    let mut nodes: Vec<Option<Node>> = Vec::new();
    let mut addrs: Vec<Multiaddr> = Vec::new();
    for i in 0..n {
        let mut boot = Vec::new();
        if i > 0 {
            boot.push(addrs[next(&mut seed) as usize % i].clone());
            boot.push(addrs[next(&mut seed) as usize % i].clone());
            boot.dedup();
        }
        let n = node(base + i as u64, boot).await;
        addrs.push(format!("/memory/{}/p2p/{}", base + i as u64, n.peer).parse().unwrap());
        nodes.push(Some(n));
        // Joins spread a little, as they would.
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Every node has bootstrapped (it does at its first connection) and its routing table
    // has filled from the lookups of the others.
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("{:?}: {n} nodes up", t0.elapsed());
    // Each node provides one key, and the announcement has reached the closest nodes.
    // Nodes announce a few at a time, as they would join and add content over time.
    let mut keys = Vec::new();
    let mut failed = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(25) {
        let mut done = Vec::new();
        for &i in chunk {
            let h = Hash::of(format!("key {i} {base}").as_bytes());
            let (tx, rx) = oneshot::channel();
            nodes[i]
                .as_ref()
                .unwrap()
                .tx
                .send(Cmd::ProvideWait(h, tx))
                .await
                .unwrap();
            keys.push((h, i));
            done.push(rx);
        }
        for rx in done {
            let ok = tokio::time::timeout(Duration::from_secs(60), rx).await;
            failed += !matches!(ok, Ok(Ok(true))) as usize;
        }
    }
    eprintln!("{:?}: {failed} of {n} announcements ended in an error", t0.elapsed());
    let (share, req) = round(&nodes, &keys, &mut seed).await;
    eprintln!(
        "{n} nodes: {:.2}% of {} lookups found the provider; requests per lookup p50 {} p95 {} ({:?})",
        share * 100.0,
        keys.len(),
        percentile(&req, 0.5),
        percentile(&req, 0.95),
        t0.elapsed(),
    );
    assert!(share >= 0.999, "only {:.2}% found", share * 100.0);
    // A fifth of the nodes leave at once; the keys they provided leave with them.
    let mut gone = HashSet::new();
    while gone.len() < n / 5 {
        gone.insert(next(&mut seed) as usize % n);
    }
    for i in &gone {
        let n = nodes[*i].take().unwrap();
        let _ = n.tx.send(Cmd::Stop).await;
    }
    let left: Vec<(Hash, usize)> = keys.into_iter().filter(|(_, i)| !gone.contains(i)).collect();
    let (share, req) = round(&nodes, &left, &mut seed).await;
    eprintln!(
        "after {} left: {:.2}% of {} lookups found the provider; requests per lookup p50 {} p95 {} ({:?})",
        gone.len(),
        share * 100.0,
        left.len(),
        percentile(&req, 0.5),
        percentile(&req, 0.95),
        t0.elapsed(),
    );
    assert!(
        share >= 0.999,
        "only {:.2}% found after a fifth of the nodes left",
        share * 100.0
    );
    for n in nodes.into_iter().flatten() {
        let _ = n.tx.send(Cmd::Stop).await;
    }
}
