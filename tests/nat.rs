//! Peers behind home NATs. The test builds an "internet" (a bridge in a namespace, on
//! 198.18.0.0/24, the range set aside for such test beds) with a public relay node R on it,
//! and two home networks, each behind its own router: a namespace that forwards and
//! masquerades with nftables. A shares a file by ticket; B, behind the other router, reads it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

/// R's address on the internet, and the routers' (their WAN side).
const R_IP: &str = "198.18.0.10";

struct Internet {
    /// inet (the bridge), r, nat1, a, nat2, b.
    names: Vec<String>,
}

impl Internet {
    /// `random`: routers that give every new connection a new port (hole punching cannot
    /// work through them).
    fn new(tag: &str, random: bool) -> Internet {
        let id = std::process::id() % 100_000;
        let names: Vec<String> = ["inet", "r", "nat1", "a", "nat2", "b"]
            .iter()
            .map(|n| format!("sfn-{n}-{tag}-{id}"))
            .collect();
        let net = Internet { names };
        let [inet, r, nat1, a, nat2, b] = [0, 1, 2, 3, 4, 5].map(|i| net.names[i].as_str());
        for n in &net.names {
            sh(&format!("ip netns add {n} && ip -n {n} link set lo up"));
        }
        sh(&format!(
            "ip -n {inet} link add br0 type bridge && ip -n {inet} link set br0 up"
        ));
        // R and the routers' WAN ends on the bridge.
        for (i, (ns, ip)) in [(r, R_IP), (nat1, "198.18.0.1"), (nat2, "198.18.0.2")]
            .iter()
            .enumerate()
        {
            let (v, p) = (format!("sw{i}{tag}{id}"), format!("sp{i}{tag}{id}"));
            sh(&format!(
                "ip link add {v} type veth peer name {p} && ip link set {v} netns {ns} && ip link set {p} netns {inet} && \
                 ip -n {inet} link set {p} master br0 up && ip -n {ns} link set {v} name wan && \
                 ip -n {ns} addr add {ip}/24 dev wan && ip -n {ns} link set wan up"
            ));
        }
        // Each home: a host on 192.168.N.2 behind its router on 192.168.N.1. The router
        // masquerades what goes out, and drops what comes in unasked, as home routers do
        // (without the drop its kernel would answer a stray SYN with a reset).
        for (n, (router, host)) in [(nat1, a), (nat2, b)].iter().enumerate() {
            let n = n + 1;
            let (v, p) = (format!("sl{n}{tag}{id}"), format!("sh{n}{tag}{id}"));
            sh(&format!(
                "ip link add {v} type veth peer name {p} && ip link set {v} netns {router} && ip link set {p} netns {host} && \
                 ip -n {router} link set {v} name lan && ip -n {router} addr add 192.168.{n}.1/24 dev lan && ip -n {router} link set lan up && \
                 ip -n {host} link set {p} name eth0 && ip -n {host} addr add 192.168.{n}.2/24 dev eth0 && ip -n {host} link set eth0 up && \
                 ip -n {host} route add default via 192.168.{n}.1 && \
                 ip netns exec {router} sysctl -qw net.ipv4.ip_forward=1 && \
                 ip netns exec {router} nft add table ip nat && \
                 ip netns exec {router} nft 'add chain ip nat post {{ type nat hook postrouting priority 100 ; }}' && \
                 ip netns exec {router} nft add rule ip nat post oifname wan masquerade {} && \
                 ip netns exec {router} nft add table ip filter && \
                 ip netns exec {router} nft 'add chain ip filter input {{ type filter hook input priority 0 ; }}' && \
                 ip netns exec {router} nft add rule ip filter input iifname wan ct state new drop",
                if random { "random" } else { "" }
            ));
        }
        net
    }

    fn ns(&self, name: &str) -> &str {
        let i = ["inet", "r", "nat1", "a", "nat2", "b"]
            .iter()
            .position(|n| *n == name)
            .unwrap();
        &self.names[i]
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// The relay R, A behind NAT 1 with a reservation on R, and the hash of a file A holds and
/// the ticket it shares it with. B is left to the test.
struct Homes {
    net: Internet,
    _r: NsDaemon,
    a: NsDaemon,
    /// How A was started, to start it again.
    a_args: Vec<String>,
    r_addr: String,
    a_data: std::path::PathBuf,
    hash: String,
    ticket: String,
}

fn homes(root: &Path, tag: &str, random: bool) -> Homes {
    let net = Internet::new(tag, random);
    let r_data = root.join("r");
    let r = ns_daemon(net.ns("r"), &r_data, R_IP, &["--no-mdns"]);
    let r_addr = status(&r_data)["listen"][0].as_str().unwrap().to_string();
    let a_data = root.join("a");
    let a_args: Vec<String> = [
        "--no-mdns",
        "--bootstrap",
        &r_addr,
        "--listen",
        "/ip4/192.168.1.2/udp/0/quic-v1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let a = start_a(&net, &a_data, &a_args);
    let src = root.join("f");
    random_file(&src, 3);
    let hash = add_file(&a_data, &src);
    let ticket = ok(swarmfs(&a_data, &["share", &hash])).trim().to_string();
    Homes {
        net,
        _r: r,
        a,
        a_args,
        r_addr,
        a_data,
        hash,
        ticket,
    }
}

/// Starts A behind NAT 1 and waits until it holds a reservation on R.
fn start_a(net: &Internet, a_data: &Path, args: &[String]) -> NsDaemon {
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let a = ns_daemon(net.ns("a"), a_data, "192.168.1.2", &args);
    // A finds that no one can dial it, and reserves a slot on R.
    let deadline = Instant::now() + Duration::from_secs(40);
    while !status(a_data)["external"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a.as_str().unwrap().contains("/p2p-circuit"))
    {
        assert!(
            Instant::now() < deadline,
            "A never got a relayed address:\n{}",
            log_of(a_data)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a
}

fn log_of(data: &Path) -> String {
    std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
}

/// How `data`'s daemon is connected to `peer`: Some(direct) once it is.
fn link(data: &Path, peer: &str) -> Option<bool> {
    let list: serde_json::Value = serde_json::from_str(&ok(swarmfs(data, &["peers", "--json"]))).unwrap();
    list.as_array()?
        .iter()
        .find(|p| p["peer"] == peer)
        .map(|p| p["direct"].as_bool().unwrap())
}

/// B behind NAT 2 reads A's file by the ticket from B's mount; returns B's daemon.
fn read_by_ticket(root: &Path, h: &Homes) -> (Daemon, std::path::PathBuf) {
    let (b_data, b_mnt) = (root.join("b"), root.join("bm"));
    let b = Daemon::start_in_netns(
        h.net.ns("b"),
        &b_data,
        &b_mnt,
        &[
            "--bootstrap",
            &h.r_addr,
            "--listen",
            "/ip4/192.168.2.2/tcp/0",
            "--listen",
            "/ip4/192.168.2.2/udp/0/quic-v1",
        ],
    );
    let out = run(&mut swarmfs(&b_data, &["open", &h.ticket]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "open failed: {err}");
    // The ticket's addresses are dialed even while Kademlia is dialing A at the private
    // addresses it learned from R (they were dropped as "a dial is under way", and open fell
    // back to a DHT lookup).
    assert!(
        !err.contains("no peer in the ticket answered"),
        "the ticket's peer was not reached through its addresses: {err}"
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(path, b_mnt.join(&h.hash).to_string_lossy());
    assert_eq!(b3(Path::new(&path)), h.hash, "B read the wrong bytes");
    (b, b_data)
}

/// A behind one NAT shares a file by ticket; B behind another reads it from its mount. The
/// ticket takes B to A through the relay, and hole punching makes the connection direct.
#[test]
fn peers_behind_two_nats_share_by_ticket_and_end_up_hole_punched() {
    let root = tempfile::tempdir().unwrap();
    let h = homes(root.path(), "p", false);
    assert!(h.ticket.starts_with("swarmfs1"), "{}", h.ticket);
    let (b, b_data) = read_by_ticket(root.path(), &h);
    let a_id = status(&h.a_data)["peer_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while link(&b_data, &a_id) != Some(true) {
        assert!(
            Instant::now() < deadline,
            "B's connection to A never became direct: {:?}\nB's log:\n{}\nA's log:\n{}",
            link(&b_data, &a_id),
            b.log_text(),
            log_of(&h.a_data)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The direct connection goes through the routers' public addresses.
    let list: serde_json::Value = serde_json::from_str(&ok(swarmfs(&b_data, &["peers", "--json"]))).unwrap();
    let to_a = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == a_id.as_str())
        .unwrap()
        .clone();
    assert!(to_a["address"].as_str().unwrap().contains("198.18.0.1"), "{to_a}");
}

/// Routers that give each connection a new port defeat hole punching: the read still
/// succeeds, through the relay, and the connection stays relayed.
#[test]
fn behind_nats_that_defeat_hole_punching_a_read_goes_through_the_relay() {
    let root = tempfile::tempdir().unwrap();
    let h = homes(root.path(), "q", true);
    let (b, b_data) = read_by_ticket(root.path(), &h);
    let a_id = status(&h.a_data)["peer_id"].as_str().unwrap().to_string();
    // Hole punching has had its attempts (three dials, each given up after the 10 s
    // handshake timeout, since the routers drop what they were not asked for).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b.log_text().contains("staying relayed") && !log_of(&h.a_data).contains("staying relayed") {
        assert!(
            Instant::now() < deadline,
            "no hole punching attempt ended:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        link(&b_data, &a_id),
        Some(false),
        "B should reach A only through the relay"
    );
}

/// A restarts behind its NAT: B, which added A with `connect TICKET`, reaches it again by
/// itself through the relay (A's relayed address stays the same; its direct one does not),
/// and a read that failed while A was away works without restarting B.
#[test]
fn a_peer_behind_a_nat_that_restarts_is_reached_again_and_a_failed_read_works() {
    let root = tempfile::tempdir().unwrap();
    let mut h = homes(root.path(), "s", false);
    let (b, b_data) = read_by_ticket(root.path(), &h);
    ok(swarmfs(&b_data, &["connect", &h.ticket]));
    let a_id = status(&h.a_data)["peer_id"].as_str().unwrap().to_string();
    h.a.kill9();
    // While A is away it gets a file B has never seen.
    let src = root.path().join("g");
    random_file(&src, 2);
    let second = add_file(&h.a_data, &src);
    assert!(
        eventually(Duration::from_secs(30), || link(&b_data, &a_id).is_none()),
        "B still lists A after it was killed"
    );
    assert!(
        std::fs::read(b.mnt.join(&second)).is_err(),
        "a read of a blob no one reachable holds should fail"
    );
    h.a = start_a(&h.net, &h.a_data, &h.a_args);
    assert!(
        eventually(Duration::from_secs(60), || link(&b_data, &a_id).is_some()),
        "B never reconnected to A after A restarted:\n{}",
        b.log_text()
    );
    assert_eq!(b3(&b.mnt.join(&second)), second, "B read the wrong bytes");
}
