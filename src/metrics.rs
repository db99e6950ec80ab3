//! Prometheus metrics (`GET /metrics`): libp2p's own (connections, bandwidth, Kademlia,
//! identify, ping, relay, DCUtR) and ours: bytes served and fetched, groups verified and
//! failed, request latency, cache, blobs, transfers, and FUSE operations by kind with errors.
//!
//! One `Metrics` per node. The FUSE counters are process-wide (the filesystem callbacks have
//! no node at hand); a process mounts once.

use std::sync::{Arc, LazyLock, Mutex};

use fuser::Errno;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The label of a FUSE counter: the operation's kind (no allocation per operation).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// FUSE operations and their errors, by kind.
struct Fuse {
    ops: Family<OpLabel, Counter>,
    errors: Family<OpLabel, Counter>,
}

static FUSE: LazyLock<Fuse> = LazyLock::new(|| Fuse {
    ops: Family::default(),
    errors: Family::default(),
});

/// One FUSE operation of a kind: counted when it starts, and again if it fails.
#[derive(Clone, Copy)]
pub struct Op(pub &'static str);

impl Op {
    pub fn start(kind: &'static str) -> Op {
        FUSE.ops.get_or_create(&OpLabel { op: kind }).inc();
        Op(kind)
    }

    /// Replies with `e`, counting the error.
    pub fn fail<R: ErrorReply>(self, reply: R, e: Errno) {
        FUSE.errors.get_or_create(&OpLabel { op: self.0 }).inc();
        reply.error(e);
    }
}

/// A fuser reply that can carry an error.
pub trait ErrorReply {
    fn error(self, e: Errno);
}

macro_rules! error_reply {
    ($($t:ty),*) => {$(
        impl ErrorReply for $t {
            fn error(self, e: Errno) {
                <$t>::error(self, e)
            }
        }
    )*};
}

error_reply!(
    fuser::ReplyEntry,
    fuser::ReplyAttr,
    fuser::ReplyData,
    fuser::ReplyEmpty,
    fuser::ReplyOpen,
    fuser::ReplyWrite,
    fuser::ReplyDirectory,
    fuser::ReplyStatfs,
    fuser::ReplyXattr,
    fuser::ReplyCreate
);

/// A node's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// libp2p's recorders: the event loop feeds them every swarm and protocol event.
    pub libp2p: libp2p::metrics::Metrics,
    pub bytes_served: Counter,
    pub bytes_fetched: Counter,
    pub groups_verified: Counter,
    pub groups_failed: Counter,
    /// From sending a request to a peer to the head of its answer, in seconds.
    pub fetch_latency: Histogram,
    cache_bytes: Gauge,
    cache_cap: Gauge,
    blobs: Gauge,
    active_transfers: Gauge,
    peers: Gauge,
}

impl Metrics {
    /// Our metrics and libp2p's, in `registry` (which may already hold libp2p's bandwidth
    /// counters, registered while the swarm was built).
    pub fn new(mut registry: Registry) -> Arc<Metrics> {
        let libp2p = libp2p::metrics::Metrics::new(&mut registry);
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let m = Metrics {
            libp2p,
            bytes_served: Counter::default(),
            bytes_fetched: Counter::default(),
            groups_verified: Counter::default(),
            groups_failed: Counter::default(),
            fetch_latency: latency,
            cache_bytes: Gauge::default(),
            cache_cap: Gauge::default(),
            blobs: Gauge::default(),
            active_transfers: Gauge::default(),
            peers: Gauge::default(),
            registry: Mutex::new(Registry::default()),
        };
        let r = registry.sub_registry_with_prefix("swarmfs");
        let counters = [
            ("served_bytes", "Blob bytes sent to peers", &m.bytes_served),
            ("fetched_bytes", "Blob bytes received from peers", &m.bytes_fetched),
            (
                "groups_verified",
                "16 KiB groups fetched and verified",
                &m.groups_verified,
            ),
            (
                "groups_failed",
                "Responses from peers that failed verification",
                &m.groups_failed,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register(
            "fetch_latency_seconds",
            "Time from a blob request to the head of its answer",
            m.fetch_latency.clone(),
        );
        let gauges = [
            ("cache_bytes", "Bytes held in the store", &m.cache_bytes),
            ("cache_cap_bytes", "The cache's cap", &m.cache_cap),
            ("blobs", "Blobs held, whole or in part", &m.blobs),
            (
                "active_transfers",
                "Units of blobs being fetched now",
                &m.active_transfers,
            ),
            ("peers", "Connected peers", &m.peers),
        ];
        for (name, help, g) in gauges {
            r.register(name, help, g.clone());
        }
        r.register("fuse_ops", "FUSE operations by kind", FUSE.ops.clone());
        r.register(
            "fuse_errors",
            "FUSE operations that failed, by kind",
            FUSE.errors.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        Arc::new(m)
    }

    /// Sets the gauges read at scrape time.
    pub fn set_state(&self, cache_bytes: u64, cache_cap: u64, blobs: usize, active: usize, peers: usize) {
        self.cache_bytes.set(cache_bytes as i64);
        self.cache_cap.set(cache_cap as i64);
        self.blobs.set(blobs as i64);
        self.active_transfers.set(active as i64);
        self.peers.set(peers as i64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut s, &r);
        s
    }
}
