//! The swarm, with real daemons: each host in a network namespace of its own on one bridge,
//! the seeder's uplink shaped by `tc tbf`, so that leechers must trade to finish soon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A bridge and `n` hosts on it (10.79.0.1, .2, ...), made and removed by the test.
struct Lan {
    bridge: String,
    hosts: Vec<String>,
}

impl Lan {
    fn new(tag: &str, n: usize) -> Lan {
        let id = std::process::id() % 100_000;
        let lan = Lan {
            bridge: format!("swb-{tag}-{id}"),
            hosts: (1..=n).map(|i| format!("swh{i}-{tag}-{id}")).collect(),
        };
        sh(&format!(
            "ip netns add {b} && ip -n {b} link add br0 type bridge && ip -n {b} link set br0 up",
            b = lan.bridge
        ));
        for (i, h) in lan.hosts.iter().enumerate() {
            let (v, p) = (format!("v{i}{tag}{id}"), format!("p{i}{tag}{id}"));
            sh(&format!(
                "ip netns add {h} && ip link add {v} type veth peer name {p} && \
                 ip link set {v} netns {h} && ip link set {p} netns {b} && \
                 ip -n {b} link set {p} master br0 up && \
                 ip -n {h} link set {v} name eth0 && ip -n {h} addr add {ip}/24 dev eth0 && \
                 ip -n {h} link set eth0 up && ip -n {h} link set lo up",
                b = lan.bridge,
                ip = Lan::ip(i),
            ));
        }
        lan
    }

    fn ip(i: usize) -> String {
        format!("10.79.0.{}", i + 1)
    }

    /// Shapes host `i`'s uplink to `rate` (e.g. "40mbit").
    fn shape(&self, i: usize, rate: &str) {
        sh(&format!(
            "ip netns exec {} tc qdisc add dev eth0 root tbf rate {rate} burst 64kb latency 50ms",
            self.hosts[i]
        ));
    }

    /// Starts a daemon on host `i`.
    fn daemon(&self, i: usize, data: &Path, extra: &[&str]) -> NsDaemon {
        let mut args = vec!["--no-mdns"];
        args.extend_from_slice(extra);
        ns_daemon(&self.hosts[i], data, &Lan::ip(i), &args)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in self.hosts.iter().chain([&self.bridge]) {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A seeder on host 0 holding `mib` MiB of random bytes, its uplink shaped to `rate`.
struct Seeder {
    daemon: NsDaemon,
    addr: String,
    peer_id: String,
    hash: String,
}

fn seeder(lan: &Lan, root: &Path, mib: u64, rate: &str) -> Seeder {
    lan.shape(0, rate);
    let data = root.join("seed");
    let daemon = lan.daemon(0, &data, &[]);
    let src = root.join("src");
    sh(&format!("head -c {mib}M /dev/urandom > {}", src.display()));
    let hash = add_file(&data, &src);
    let st = status(&data);
    Seeder {
        daemon,
        addr: st["listen"][0].as_str().unwrap().to_string(),
        peer_id: st["peer_id"].as_str().unwrap().to_string(),
        hash,
    }
}

/// `swarmfs get HASH -o OUT` on the daemon of `data`, started now.
fn start_get(data: &Path, hash: &str, out: &Path) -> Child {
    swarmfs(data, &["get", hash, "-o"])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for every get; panics (with the daemons' logs' tails) if one fails or takes longer
/// than `limit`.
fn finish_all(gets: Vec<Child>, limit: Duration, logs: &[PathBuf]) {
    let deadline = Instant::now() + limit;
    for mut g in gets {
        loop {
            if let Some(st) = g.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(g.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert!(st.success(), "get failed: {err}\n{}", tails(logs));
                break;
            }
            if Instant::now() > deadline {
                let _ = g.kill();
                panic!("a get did not finish in {limit:?}\n{}", tails(logs));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn tails(logs: &[PathBuf]) -> String {
    logs.iter()
        .map(|l| {
            let t = std::fs::read_to_string(l).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            format!(
                "--- {}\n{}",
                l.display(),
                lines[lines.len().saturating_sub(15)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Leechers on hosts 1..=n, bootstrapped from the seeder.
fn leechers(lan: &Lan, root: &Path, s: &Seeder, n: usize, extra: &[&str]) -> (Vec<NsDaemon>, Vec<PathBuf>) {
    let mut ds = Vec::new();
    let mut dirs = Vec::new();
    for i in 1..=n {
        let data = root.join(format!("leech{i}"));
        let mut args = vec!["--bootstrap", &s.addr];
        args.extend_from_slice(extra);
        ds.push(lan.daemon(i, &data, &args));
        dirs.push(data);
    }
    (ds, dirs)
}

fn logs(root: &Path, n: usize) -> Vec<PathBuf> {
    let mut v = vec![root.join("seed.log")];
    v.extend((1..=n).map(|i| root.join(format!("leech{i}.log"))));
    v
}

#[test]
fn four_leechers_all_finish_and_trade_with_each_other() {
    let root = tempfile::tempdir().unwrap();
    let lan = Lan::new("t4", 5);
    let s = seeder(&lan, root.path(), 16, "40mbit");
    let (_ls, dirs) = leechers(&lan, root.path(), &s, 4, &[]);
    let outs: Vec<PathBuf> = (1..=4).map(|i| root.path().join(format!("out{i}"))).collect();
    let gets = dirs.iter().zip(&outs).map(|(d, o)| start_get(d, &s.hash, o)).collect();
    finish_all(gets, Duration::from_secs(120), &logs(root.path(), 4));
    for o in &outs {
        assert_eq!(b3(o), s.hash);
    }
    // Someone received bytes from a peer that is not the seeder.
    let from_leechers: u64 = dirs
        .iter()
        .flat_map(|d| status(d)["traffic"].as_array().unwrap().clone())
        .filter(|t| t["peer"] != s.peer_id.as_str())
        .map(|t| t["received"].as_u64().unwrap())
        .sum();
    assert!(from_leechers > 0, "no leecher received anything from another leecher");
    drop(s.daemon);
}

#[test]
fn the_crowd_finishes_after_the_seeder_leaves() {
    let root = tempfile::tempdir().unwrap();
    let lan = Lan::new("tk", 5);
    let mut s = seeder(&lan, root.path(), 16, "16mbit");
    let (_ls, dirs) = leechers(&lan, root.path(), &s, 4, &[]);
    let outs: Vec<PathBuf> = (1..=4).map(|i| root.path().join(format!("out{i}"))).collect();
    let gets = dirs.iter().zip(&outs).map(|(d, o)| start_get(d, &s.hash, o)).collect();
    // The seeder leaves as soon as the leechers between them hold every group.
    let seed_dir = root.path().join("seed");
    let together = eventually(Duration::from_secs(90), || {
        status(&seed_dir)["transfers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["hash"] == s.hash.as_str() && t["availability"].as_f64().unwrap() >= 1.0)
    });
    assert!(together, "the leechers never held every group between them");
    s.daemon.kill9();
    finish_all(gets, Duration::from_secs(90), &logs(root.path(), 4));
    for o in &outs {
        assert_eq!(b3(o), s.hash);
    }
}

#[test]
fn a_leecher_that_lies_in_its_have_map_costs_only_retries() {
    let root = tempfile::tempdir().unwrap();
    let lan = Lan::new("tl", 4);
    let s = seeder(&lan, root.path(), 8, "40mbit");
    // Host 1 claims every group of every blob; hosts 2 and 3 are honest.
    let liar_dir = root.path().join("leech1");
    let _liar = lan.daemon(1, &liar_dir, &["--bootstrap", &s.addr, "--test-lie-have"]);
    let mut honest = Vec::new();
    let mut dirs = Vec::new();
    for i in 2..=3 {
        let d = root.path().join(format!("leech{i}"));
        honest.push(lan.daemon(i, &d, &["--bootstrap", &s.addr]));
        dirs.push(d);
    }
    let liar_out = root.path().join("liar-out");
    let mut gets = vec![start_get(&liar_dir, &s.hash, &liar_out)];
    std::thread::sleep(Duration::from_millis(300));
    let outs: Vec<PathBuf> = (2..=3).map(|i| root.path().join(format!("out{i}"))).collect();
    gets.extend(dirs.iter().zip(&outs).map(|(d, o)| start_get(d, &s.hash, o)));
    finish_all(gets, Duration::from_secs(90), &logs(root.path(), 3));
    for o in outs.iter().chain([&liar_out]) {
        assert_eq!(b3(o), s.hash);
    }
}
