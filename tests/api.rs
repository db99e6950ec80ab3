//! The typed API in-process: each operation with its errors, on a store alone and on whole
//! daemons started and stopped in this process (shutdown is a parameter).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use swarmfs::api::{Api, ErrorKind};
use swarmfs::store::{Options, Store};
use swarmfs::Hash;

use crate::util::data;

fn offline(dir: &Path) -> Arc<Api> {
    let store = Arc::new(Store::open(dir, Options::default()).unwrap());
    Api::new(store, None)
}

#[test]
fn each_operation_on_a_store_alone_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let api = offline(&dir.path().join("d"));
    let body = data(100_000, 1);
    let added = api.add_reader(&body[..], Path::new("up.bin")).unwrap();
    assert_eq!(added.hash, Hash::of(&body));
    assert_eq!(added.size, body.len() as u64);

    let list = api.blobs().unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].pinned && list[0].complete);
    let one = api.blob(&added.hash).unwrap();
    assert_eq!(one.present, body.len() as u64);

    let unpinned = api.unpin(&[added.hash]).unwrap();
    assert_eq!(unpinned[0].held_by, None);
    assert!(!api.blob(&added.hash).unwrap().pinned);
    api.pin(&[added.hash]).unwrap();
    assert!(api.blob(&added.hash).unwrap().pinned);
    let gc = api.gc().unwrap();
    assert!(gc.evicted.is_empty(), "a pinned blob was evicted");
    let v = api.verify(&[]).unwrap();
    assert_eq!((v.len(), v[0].corrupt.is_empty()), (1, true));

    // A file from disk, and a folder given to add_file.
    let f = dir.path().join("f");
    std::fs::write(&f, b"from disk").unwrap();
    assert_eq!(api.add_file(&f).unwrap().0, Hash::of(b"from disk"));
    let e = api.add_file(dir.path()).unwrap_err();
    assert_eq!(
        (e.kind, e.http_status(), e.exit_code()),
        (ErrorKind::BadRequest, 400, 2)
    );
    assert!(e.message.contains("add -r"), "{}", e.message);

    // Unknown content: 404, exit 1.
    let e = api.blob(&Hash::of(b"never added")).unwrap_err();
    assert_eq!((e.kind, e.http_status(), e.exit_code()), (ErrorKind::NotFound, 404, 1));
    assert!(e.message.contains("not in the local store"), "{}", e.message);
    // Malformed input: 400, exit 2.
    let e = swarmfs::api::parse_target("xyz").unwrap_err();
    assert_eq!(
        (e.kind, e.http_status(), e.exit_code()),
        (ErrorKind::BadRequest, 400, 2)
    );
    let e = api.open("swarmfs1notaticket").unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRequest, "{}", e.message);
    // What needs a node says so: 503.
    for e in [
        api.status().unwrap_err(),
        api.peers().unwrap_err(),
        api.transfers().unwrap_err(),
        api.connect("/ip4/127.0.0.1/tcp/1").unwrap_err(),
        api.providers(&added.hash.to_string()).unwrap_err(),
    ] {
        assert_eq!(
            (e.kind, e.http_status()),
            (ErrorKind::Unavailable, 503),
            "{}",
            e.message
        );
    }
    // Errors are serde types too: the HTTP body and the CLI's --json.
    let json = serde_json::to_value(e_of(&api)).unwrap();
    assert_eq!(json["kind"], "not_found");
}

fn e_of(api: &Api) -> swarmfs::api::ApiError {
    api.blob(&Hash::of(b"x")).unwrap_err()
}

/// A whole daemon (no mount) on a thread of its own; stops when `stop` is sent or dropped.
struct InProcess {
    api: Arc<Api>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    fn start(dir: &Path, bootstrap: Vec<libp2p::Multiaddr>) -> InProcess {
        let opts = swarmfs::daemon::DaemonOptions {
            http: Some("127.0.0.1:0".parse().unwrap()),
            control: Arc::new(swarmfs::cli::run_args),
            data_dir: dir.to_owned(),
            mount: None,
            cache_size: None,
            lookup_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            passthrough: false,
            allow_other: false,
            shutdown_delay: Duration::ZERO,
            net: swarmfs::net::NetOptions {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                bootstrap,
                mdns: false,
                upnp: false,
                relay_service: false,
                ..Default::default()
            },
        };
        let (api_tx, api_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let stop_rx = Arc::new(std::sync::Mutex::new(stop_rx));
        let thread = std::thread::spawn(move || {
            swarmfs::daemon::run_until(opts, move |api| async move {
                api_tx.send(api).unwrap();
                // Shutdown is whatever future the caller passes: here, a message.
                let _ = tokio::task::spawn_blocking(move || stop_rx.lock().unwrap().recv()).await;
            })
        });
        let api = api_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the daemon started");
        InProcess {
            api,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        drop(self.stop.take());
        self.thread.take().map_or(Ok(()), |t| t.join().unwrap())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[test]
fn two_daemons_in_process_fetch_through_the_api_and_stop_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = InProcess::start(&dir.path().join("a"), Vec::new());
    let body = data(3 << 20, 4);
    let h = a.api.add_reader(&body[..], Path::new("three.bin")).unwrap().hash;
    let sa = a.api.status().unwrap();
    assert!(sa.http.is_some(), "the gateway runs");
    let addr: libp2p::Multiaddr = sa.net.listen[0].parse().unwrap();
    let mut b = InProcess::start(&dir.path().join("b"), vec![addr]);

    let n = b.api.net().unwrap().clone();
    let size = n.rt.block_on(b.api.size(h)).unwrap();
    assert_eq!(size, body.len() as u64);
    let providers = b.api.providers(&h.to_string()).unwrap();
    assert!(providers
        .iter()
        .any(|p| p.peer == sa.net.peer_id && p.complete == Some(true)));
    let groups = size.div_ceil(16384);
    n.rt.block_on(b.api.ensure(h, 0..groups, 0..0)).unwrap();
    let held = b.api.blob(&h).unwrap();
    assert_eq!(held.present, size);
    let peers = b.api.peers().unwrap();
    assert!(peers.iter().any(|p| p.peer == sa.net.peer_id && p.direct));
    let t = b.api.transfers().unwrap();
    let mine = t.iter().find(|x| x.hash == h).expect("the transfer is listed");
    assert!(mine.map.iter().all(|&c| c == 100), "{:?}", mine.map);

    // Errors from the network side.
    let e = b.api.connect("not an address").unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    let e = n.rt.block_on(b.api.size(Hash::of(b"nobody has this"))).unwrap_err();
    assert_eq!((e.kind, e.http_status()), (ErrorKind::NotFound, 404), "{}", e.message);

    b.stop().unwrap();
    a.stop().unwrap();
    // Stopped means stopped: once the last handle goes, the data directory is free again.
    drop((a, b, n));
    let again = Store::open(&dir.path().join("a"), Options::default()).unwrap();
    assert!(again.info(&h).unwrap().unwrap().complete);
}
