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
    let switches = NetOptions {
        corrupt_responses: corrupt,
        ..Default::default()
    };
    node_with(bootstrap, switches).await
}

/// A node with the test switches of `switches` (its other fields are ignored).
async fn node_with(bootstrap: &[&str], switches: NetOptions) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), Options::default()).unwrap());
    let key = swarmfs::net::load_identity(dir.path()).unwrap();
    let opts = NetOptions {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: bootstrap.iter().map(|a| a.parse().unwrap()).collect(),
        mdns: false,
        ..switches
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

/// Asks the DHT for providers of `h` until `p` is among them (at most about 10 s); returns
/// the last answer.
async fn until_found(node: &Node, h: Hash, p: libp2p::PeerId) -> Vec<libp2p::PeerId> {
    let mut found = Vec::new();
    for _ in 0..100 {
        found = node.net.all_providers(h, Duration::from_secs(5)).await;
        if found.contains(&p) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    found
}

/// Fetches a whole blob from `peer`: the first group tells the size, then the rest; then
/// makes it durable (the network path leaves the fsync to a background task).
/// Fills blob `h` on `node` from the swarm with `Fetcher::fill` (at most `limit`), then checks
/// that the store holds exactly `bytes`; returns the units that arrived.
async fn fill_whole(node: &Node, h: Hash, bytes: &[u8], limit: Duration) -> usize {
    let f = swarmfs::fetch::Fetcher::new(node.net.clone(), node.store.clone());
    let size = f
        .size(h, Duration::from_secs(20))
        .await
        .expect("a provider gives the size");
    let mut units = 0;
    tokio::time::timeout(limit, f.fill(h, size, Duration::from_secs(20), &mut || units += 1))
        .await
        .expect("the fill did not hang")
        .expect("the fill completed");
    node.store.sync_partial(&h).unwrap();
    let mut out = Vec::new();
    node.store.cat(&h, &mut out).unwrap();
    assert!(out == bytes);
    units
}

async fn fetch_all(node: &Node, peer: libp2p::PeerId, h: Hash) -> Result<(), FetchError> {
    let net = &node.net;
    let first = net.fetch(peer, h, vec![0..1]).await?;
    let groups = Tree::new(first.size).groups();
    let mut g = 1;
    while g < groups {
        let end = (g + 1024).min(groups);
        net.fetch(peer, h, vec![g..end]).await?;
        g = end;
    }
    node.store.flush()?;
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
    let providers = until_found(&c, h, a.net.peer_id()).await;
    assert!(providers.contains(&a.net.peer_id()), "A not found: {providers:?}");
    fetch_all(&c, a.net.peer_id(), h).await.unwrap();
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
    let err = fetch_all(&reader, bad.net.peer_id(), h).await.unwrap_err();
    assert!(matches!(err, FetchError::Bad { .. }), "{err}");
    // Nothing that failed is stored: what is there verifies.
    if reader.store.info(&h).unwrap().is_some() {
        assert!(reader.store.verify(&h).unwrap().is_empty());
    }
    // The honest peer completes it; the bad one stays banned.
    fetch_all(&reader, good.net.peer_id(), h).await.unwrap();
    let mut out = Vec::new();
    reader.store.cat(&h, &mut out).unwrap();
    assert!(out == bytes);
    assert!(!reader.net.connected().await.contains(&bad.net.peer_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_on_a_new_connection_all_succeed() {
    // libp2p-stream drops inbound streams that arrive together; the fetcher must not see it.
    let a = node(&[], false).await;
    let bytes = data(4 << 20, 63);
    let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
    let c = node(&[&a.addr], false).await;
    for _ in 0..100 {
        if c.net.connected().await.contains(&a.net.peer_id()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peer = a.net.peer_id();
    // As many at once as a peer may have in flight, then many more over reused streams.
    let burst: Vec<_> = (0..8u64)
        .map(|u| {
            let net = c.net.clone();
            tokio::spawn(async move { net.fetch(peer, h, vec![u * 16..u * 16 + 16]).await })
        })
        .collect();
    for t in burst {
        t.await.unwrap().unwrap();
    }
    let rounds: Vec<_> = (0..4u64)
        .map(|k| {
            let net = c.net.clone();
            tokio::spawn(async move {
                for i in 0..40u64 {
                    let g = (k * 40 + i) % 256;
                    net.fetch(peer, h, vec![g..g + 1]).await?;
                }
                Ok::<_, FetchError>(())
            })
        })
        .collect();
    for t in rounds {
        t.await.unwrap().unwrap();
    }
    fetch_all(&c, peer, h).await.unwrap();
    let mut out = Vec::new();
    c.store.cat(&h, &mut out).unwrap();
    assert!(out == bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_went_away_is_set_aside_and_the_fetch_completes() {
    let b = node(&[], false).await;
    let bytes = data((6 << 20) + 5, 64);
    let gone = node(&[&b.addr], false).await;
    let (h, _) = gone.store.import_reader(&bytes[..], true).unwrap();
    gone.net.provide(h).await;
    let a = node(&[&b.addr], false).await;
    a.store.import_reader(&bytes[..], true).unwrap();
    a.net.provide(h).await;
    let c = node(&[&b.addr], false).await;
    // Both are on record before one of them goes away.
    for _ in 0..100 {
        let p = c.net.providers(h, Duration::from_secs(5)).await;
        if p.contains(&a.net.peer_id()) && p.contains(&gone.net.peer_id()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gone.net.stop().await;
    let f = swarmfs::fetch::Fetcher::new(c.net.clone(), c.store.clone());
    let size = f.size(h, Duration::from_secs(20)).await.expect("A has it");
    assert_eq!(size, bytes.len() as u64);
    let groups = Tree::new(size).groups();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    f.ensure(h, 0..groups, deadline, true).await.unwrap();
    let mut out = Vec::new();
    c.store.cat(&h, &mut out).unwrap();
    assert!(out == bytes);
    // If the lookups turned up the peer that left, it was tried once and set aside.
    if f.known(&h).contains(&gone.net.peer_id()) {
        assert!(f.set_aside().contains(&gone.net.peer_id()), "{:?}", f.set_aside());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_holds_a_blob_still_finds_the_other_providers() {
    // Its own record answers first; that must not end the lookup with nobody.
    let a = node(&[], false).await;
    let bytes = data(100_000, 65);
    let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
    a.net.provide(h).await;
    let b = node(&[&a.addr], false).await;
    b.store.import_reader(&bytes[..], true).unwrap();
    b.net.provide(h).await;
    let mut found = Vec::new();
    for _ in 0..50 {
        found = b.net.providers(h, Duration::from_secs(5)).await;
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found, vec![a.net.peer_id()]);
    let all = b.net.all_providers(h, Duration::from_secs(5)).await;
    assert_eq!(all, vec![a.net.peer_id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_holder_announces_itself_and_serves_what_it_holds() {
    let a = node(&[], false).await;
    let bytes = data((4 << 20) + 9, 66);
    let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
    a.net.provide(h).await;
    // B fetches the first half (and the last group, which verifies the size) from A.
    let b = node(&[&a.addr], false).await;
    let groups = Tree::new(bytes.len() as u64).groups();
    b.net.fetch(a.net.peer_id(), h, vec![groups - 1..groups]).await.unwrap();
    b.net.fetch(a.net.peer_id(), h, vec![0..128]).await.unwrap();
    assert!(!b.store.info(&h).unwrap().unwrap().complete);
    // C finds B in the DHT although B is not complete, and B serves the half it holds.
    let c = node(&[&a.addr], false).await;
    let found = until_found(&c, h, b.net.peer_id()).await;
    assert!(found.contains(&b.net.peer_id()), "B was not announced: {found:?}");
    let got = c.net.fetch(b.net.peer_id(), h, vec![0..128]).await.unwrap();
    assert_eq!(got.ranges, vec![0..128]);
    let part = c.net.fetch(b.net.peer_id(), h, vec![120..200]).await.unwrap();
    assert_eq!(part.ranges, vec![120..128], "B answers with the part it holds");
    // What B holds, as `swarmfs providers` asks it.
    let held = c.net.holding(b.net.peer_id(), h).await.unwrap();
    assert_eq!((held.groups, held.groups_held), (groups, 129));
    let whole = c.net.holding(a.net.peer_id(), h).await.unwrap();
    assert_eq!(whole.groups_held, groups);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_completes_from_a_peer_that_speaks_only_the_old_requests() {
    // The old peer answers JOIN with "bad request", as nodes from before swarm streams do.
    let switches = NetOptions {
        refuse_join: true,
        ..Default::default()
    };
    let old = node_with(&[], switches).await;
    let bytes = data((3 << 20) + 1, 67);
    let (h, _) = old.store.import_reader(&bytes[..], true).unwrap();
    old.net.provide(h).await;
    let c = node(&[&old.addr], false).await;
    assert!(c.net.holding(old.net.peer_id(), h).await.is_err());
    assert!(fill_whole(&c, h, &bytes, Duration::from_secs(40)).await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_claims_to_fetch_everything_keeps_nobody_off_the_seeder() {
    // A seeds; B holds a part and, once a second, claims to be fetching every group.
    let a = node(&[], false).await;
    let bytes = data((4 << 20) + 5, 68);
    let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
    a.net.provide(h).await;
    let switches = NetOptions {
        lie_fetching: true,
        ..Default::default()
    };
    let b = node_with(&[&a.addr], switches).await;
    let groups = Tree::new(bytes.len() as u64).groups();
    b.net.fetch(a.net.peer_id(), h, vec![groups - 1..groups]).await.unwrap();
    b.net.fetch(a.net.peer_id(), h, vec![0..64]).await.unwrap();
    // C fills from both. B's claims keep C off the seeder only until one of them lapses
    // unsettled; from then on B's claims are ignored and C takes the rest from A.
    let c = node(&[&a.addr], false).await;
    until_found(&c, h, b.net.peer_id()).await;
    // C learns the size and joins both before it fills, so that it knows A for a seeder and
    // has B's claims from its first round (else it may ask A for everything at once, before
    // A's map arrives, and never put B's claims to the test).
    c.net.fetch(a.net.peer_id(), h, vec![groups - 1..groups]).await.unwrap();
    let joined = std::time::Instant::now();
    c.net.join(h, a.net.peer_id());
    c.net.join(h, b.net.peer_id());
    let mut ready = false;
    for _ in 0..100 {
        ready = c.net.swarms.is_complete(&h, &a.net.peer_id()) && !c.net.swarms.fetching(&h).is_empty();
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "C did not learn A's map and B's claims");
    fill_whole(&c, h, &bytes, Duration::from_secs(40)).await;
    // The claims held C off the seeder until the first lapsed, 8 s after it came (after the join).
    assert!(
        joined.elapsed() > Duration::from_secs(7),
        "C took the claimed groups from A at once"
    );
    // B goes on claiming, and C goes on ignoring it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(c.net.swarms.is_member(&h, &b.net.peer_id()));
    assert_eq!(c.net.swarms.fetching(&h), vec![], "B's claims still count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leechers_that_start_at_once_still_join_each_other() {
    let a = node(&[], false).await;
    let bytes = data((2 << 20) + 3, 69);
    let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
    a.net.provide(h).await;
    let b = node(&[&a.addr], false).await;
    // C knows B's address (as peer exchange or the DHT would tell it).
    let c = node(&[&a.addr, &b.addr], false).await;
    // C asks B to join before B knows anything of the blob: B answers "not found" ...
    c.net.join(h, b.net.peer_id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!c.net.swarms.is_member(&h, &b.net.peer_id()));
    // ... then B learns the blob's size, as a leecher does first, and C joins it soon after.
    let groups = Tree::new(bytes.len() as u64).groups();
    b.net.fetch(a.net.peer_id(), h, vec![groups - 1..groups]).await.unwrap();
    let mut joined = false;
    for _ in 0..50 {
        joined = c.net.swarms.is_member(&h, &b.net.peer_id());
        if joined {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(joined, "C did not ask B again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_that_join_each_other_at_once_stay_members() {
    let a = node(&[], false).await;
    let b = node(&[&a.addr], false).await;
    let c = node(&[&a.addr, &b.addr], false).await;
    // Several blobs, as the race between the two streams goes either way.
    for round in 0..6u64 {
        let bytes = data((1 << 20) + 3, 70 + round);
        let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
        let groups = Tree::new(bytes.len() as u64).groups();
        for x in [&b, &c] {
            x.net.fetch(a.net.peer_id(), h, vec![groups - 1..groups]).await.unwrap();
        }
        b.net.join(h, c.net.peer_id());
        c.net.join(h, b.net.peer_id());
        let both = || b.net.swarms.is_member(&h, &c.net.peer_id()) && c.net.swarms.is_member(&h, &b.net.peer_id());
        // Joined (however long a loaded machine takes), and still joined a while later.
        let mut joined = false;
        for _ in 0..100 {
            joined = both();
            if joined {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(joined, "blob {round}: the two never became members of each other");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(both(), "blob {round}: a stream that the other side kept was closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_records_carry_an_address_the_provider_can_be_dialed_at() {
    // A announces a blob while it knows no peer and no address of its own is confirmed (as
    // at start-up, before identify has run).
    let a = node(&[], false).await;
    let bytes = data(100_000, 71);
    let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
    a.net.provide(h).await;
    // R dials A and so sees A at A's listen address: A confirms that address, and announces
    // its blobs again with it.
    let r = node(&[&a.addr], false).await;
    let listen = a.addr.split("/p2p/").next().unwrap().to_string();
    let at_listen = |x: &libp2p::Multiaddr| x.to_string().split("/p2p/").next() == Some(listen.as_str());
    let mut stored = Vec::new();
    for _ in 0..100 {
        stored = r.net.stored_providers(h).await;
        if stored
            .iter()
            .any(|(p, addrs)| *p == a.net.peer_id() && addrs.iter().any(at_listen))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stored
            .iter()
            .any(|(p, addrs)| *p == a.net.peer_id() && addrs.iter().any(at_listen)),
        "R's record for A carries no address A listens at: {stored:?}"
    );
    assert!(a.net.info().await.external.iter().any(|x| x.starts_with(&listen)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_fails_verification_leaves_no_phantom_blob() {
    // The only provider flips a byte in everything it sends.
    let bad = node(&[], true).await;
    let bytes = data(3 << 20, 83);
    let (h, _) = bad.store.import_reader(&bytes[..], true).unwrap();
    bad.net.provide(h).await;
    let reader = node(&[&bad.addr], false).await;
    let f = swarmfs::fetch::Fetcher::new(reader.net.clone(), reader.store.clone());
    assert_eq!(f.size(h, Duration::from_secs(3)).await, None);
    assert!(
        reader.store.info(&h).unwrap().is_none(),
        "a blob under the claimed size stayed: {:?}",
        reader.store.info(&h).unwrap()
    );
    assert!(reader.store.list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_drops_a_bad_group_at_the_first_failure_and_the_fill_still_completes() {
    let a = node(&[], false).await;
    let bytes = data(2 << 20, 85);
    let (h, _) = a.store.import_reader(&bytes[..], true).unwrap();
    // One group of A's copy goes bad on disk.
    let path = a.store.dir().join("blobs").join(h.to_string());
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[40 * 16384 + 5] ^= 1;
    std::fs::write(&path, &on_disk).unwrap();
    a.net.provide(h).await;
    let good = node(&[&a.addr], false).await;
    good.store.import_reader(&bytes[..], true).unwrap();
    good.net.provide(h).await;
    let reader = node(&[&a.addr, &good.addr], false).await;
    // Asked for the unit that holds the bad group, A serves what verifies and stops there ...
    let err = reader.net.fetch(a.net.peer_id(), h, vec![32..48]).await;
    assert!(err.is_err() || err.as_ref().is_ok_and(|f| f.ranges.iter().all(|r| !r.contains(&40))));
    // ... and drops the group at once: it no longer holds it, so it no longer serves it.
    assert!(
        !a.store.present_groups(&h).unwrap().contains(40),
        "A still claims the bad group"
    );
    assert!(a.store.present_groups(&h).unwrap().contains(39));
    // A whole fill from both completes, the bad group coming from the good peer.
    fill_whole(&reader, h, &bytes, Duration::from_secs(30)).await;
}
