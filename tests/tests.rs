//! The integration tests: one binary, real files in temp directories, the real CLI.
// A request for one run of groups is a list of one range.
#![allow(clippy::single_range_in_vec_init)]

mod util;

mod api;
mod cli;
mod crash;
mod dashboard;
mod e2e;
mod folders;
mod gateway;
mod mount;
mod nat;
mod net;
mod posix;
mod store;
mod swarm;
