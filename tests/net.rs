//! The peer network in one process: real libp2p nodes on 127.0.0.1, port 0, no mDNS.

use std::sync::Arc;
use std::time::Duration;

use swarmfs::net::{FetchError, Net, NetOptions};
use swarmfs::store::{Options, Store};
use swarmfs::tree::Tree;
use swarmfs::Hash;

use crate::util::*;

struct Node {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    net: Net,
    addr: String,
}

async fn node(bootstrap: &[&str], corrupt: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), Options::default()).unwrap());
    let key = swarmfs::net::load_identity(dir.path()).unwrap();
    let opts = NetOptions {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: bootstrap.iter().map(|a| a.parse().unwrap()).collect(),
        mdns: false,
        corrupt_responses: corrupt,
    };
    let net = Net::start(store.clone(), key, opts).await.unwrap();
    let mut addr = None;
    for _ in 0..200 {
        if let Some(a) = net.info().await.listen.first() {
            addr = Some(a.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Node {
        _dir: dir,
        store,
        net,
        addr: addr.expect("the node listens"),
    }
}

/// Fetches a whole blob from `peer`: the first group tells the size, then the rest.
async fn fetch_all(net: &Net, peer: libp2p::PeerId, h: Hash) -> Result<(), FetchError> {
    let first = net.fetch(peer, h, vec![0..1]).await?;
    let groups = Tree::new(first.size).groups();
    let mut g = 1;
    while g < groups {
        let end = (g + 1024).min(groups);
        net.fetch(peer, h, vec![g..end]).await?;
        g = end;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_found_through_the_dht_and_fetched_verified() {
    let b = node(&[], false).await;
    let a = node(&[&b.addr], false).await;
    let bytes = data((5 << 20) + 77, 61);
    let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
    a.net.provide(h).await;
    let c = node(&[&b.addr], false).await;

    // C knows only B; the DHT must lead it to A.
    let mut providers = Vec::new();
    for _ in 0..50 {
        providers = c.net.providers(h, Duration::from_secs(5)).await;
        if providers.contains(&a.net.peer_id()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(providers.contains(&a.net.peer_id()), "A not found: {providers:?}");
    fetch_all(&c.net, a.net.peer_id(), h).await.unwrap();
    let info = c.store.info(&h).unwrap().unwrap();
    assert!(info.complete);
    let mut out = Vec::new();
    c.store.cat(&h, &mut out).unwrap();
    assert!(out == bytes);
    assert!(c.net.counters.received.load(std::sync::atomic::Ordering::Relaxed) >= bytes.len() as u64);
    // A node asked for something it does not have says so.
    let unknown = Hash::of(b"nobody has this");
    assert!(matches!(
        c.net.fetch(b.net.peer_id(), unknown, vec![0..1]).await,
        Err(FetchError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_bad_bytes_is_banned_and_nothing_bad_is_stored() {
    let bad = node(&[], true).await;
    let good = node(&[], false).await;
    let bytes = data(3 << 20, 62);
    let (h, _) = bad.store.import_reader(&bytes[..], true).unwrap();
    good.store.import_reader(&bytes[..], true).unwrap();
    let reader = node(&[&bad.addr, &good.addr], false).await;
    let err = fetch_all(&reader.net, bad.net.peer_id(), h).await.unwrap_err();
    assert!(matches!(err, FetchError::Bad { .. }), "{err}");
    // Nothing that failed is stored: what is there verifies.
    if reader.store.info(&h).unwrap().is_some() {
        assert!(reader.store.verify(&h).unwrap().is_empty());
    }
    // The honest peer completes it; the bad one stays banned.
    fetch_all(&reader.net, good.net.peer_id(), h).await.unwrap();
    let mut out = Vec::new();
    reader.store.cat(&h, &mut out).unwrap();
    assert!(out == bytes);
    assert!(!reader.net.connected().await.contains(&bad.net.peer_id()));
}
