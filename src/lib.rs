//! swarmfs: a peer-to-peer, content-addressed filesystem.
//!
//! # Layout
//!
//! - [`hash`]: `Hash`, the BLAKE3 hash of a blob, in the hex form `b3sum` prints.
//! - [`tree`]: the BLAKE3 tree over 16 KiB groups, the outboard, and verified walks.
//! - [`bao`]: the verified encoding of group ranges, for partial writes and the wire.
//! - [`store`]: blobs on disk with a sled index: import, verified reads, partial blobs,
//!   pins, LRU eviction, crash recovery.
//! - [`api`]: one typed API for every operation; the CLI renders it, the control socket
//!   runs it in the daemon, [`http`] serves it (gateway, JSON, events, dashboard, metrics).
//! - [`cli`]: the command line; `main.rs` only parses and maps errors to exit codes.
//!
//! Invariant: no byte reaches a reader, the cache or a peer unless it verified against its
//! hash. See `docs/ARCHITECTURE.md`.

// A `Vec<Range<u64>>` of one range is a request for one run of groups, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

pub mod api;
pub mod bao;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod fetch;
pub mod folder;
pub mod folder_io;
pub mod fs;
pub mod hash;
pub mod http;
pub mod metrics;
pub mod names;
pub mod net;
pub mod protocol;
pub mod rate;
pub mod store;
pub mod swarm;
pub mod ticket;
pub mod tree;
pub mod upload;

pub use hash::Hash;
pub use store::Store;
