//! SIGKILL at many moments during an import and during range writes; every reopen must find
//! a consistent store: nothing listed complete that does not verify, no temp files left.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use swarmfs::store::{Options, Store};
use swarmfs::tree::{Tree, GROUP_SIZE};
use swarmfs::Hash;

use crate::util::*;

/// Opens the store after a crash and checks everything it claims.
fn check_consistent(dir: &Path, expect: &Hash) {
    let store = Store::open(dir, Options::default()).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.join("tmp")).unwrap().count(),
        0,
        "temp files survived the reopen"
    );
    for b in store.list().unwrap() {
        assert_eq!(&b.hash, expect, "a blob that was never written appeared");
        assert!(
            store.verify(&b.hash).unwrap().is_empty(),
            "a recorded block does not verify"
        );
        if b.complete {
            let mut sink = Vec::new();
            store.cat(&b.hash, &mut sink).unwrap();
            assert_eq!(Hash::of(&sink), b.hash);
        }
    }
    // Every file in blobs/ belongs to a listed blob.
    let listed: Vec<String> = store.list().unwrap().iter().map(|b| b.hash.to_string()).collect();
    for e in std::fs::read_dir(dir.join("blobs")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(listed.iter().any(|h| name.starts_with(h)), "orphan file {name}");
    }
}

#[test]
fn kill_9_during_add() {
    let src = tempfile::tempdir().unwrap();
    let bytes = data(256 << 20, 5);
    let hash = Hash::of(&bytes);
    let path = write_file(src.path(), "big", &bytes);
    drop(bytes);
    for delay_ms in [0, 15, 40, 80, 130, 200, 300, 500] {
        let store = tempfile::tempdir().unwrap();
        let mut child = swarmfs(store.path(), &["add"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        check_consistent(store.path(), &hash);
        // The store still works: the add completes.
        let mut add = swarmfs(store.path(), &["add"]);
        add.arg(&path);
        assert!(ok(add).starts_with(&hash.to_string()));
        check_consistent(store.path(), &hash);
    }
}

const CHILD_ENV: &str = "SWARMFS_TEST_RANGE_WRITER";
const SIZE: u64 = 64 << 20;

/// Not a test on its own: the child process of `kill_9_during_range_writes`, which writes
/// verified ranges into the store named by `SWARMFS_TEST_RANGE_WRITER` until it is killed.
#[test]
#[ignore]
fn range_writer_child() {
    let Ok(dst) = std::env::var(CHILD_ENV) else {
        return;
    };
    let src_dir = tempfile::tempdir().unwrap();
    let src = Store::open(src_dir.path(), Options::default()).unwrap();
    let bytes = data(SIZE, 6);
    let (h, _) = src.import_reader(&bytes[..], true).unwrap();
    let dst = Store::open(Path::new(&dst), Options::default()).unwrap();
    let n = Tree::new(SIZE).groups();
    let mut rng = Rng(std::process::id() as u64);
    println!("ready");
    loop {
        let start = rng.below(n);
        let want = [start..(start + 1 + rng.below(32)).min(n)];
        let mut enc = Vec::new();
        src.encode(&h, &want, &mut enc).unwrap();
        if dst.write_encoded(&h, SIZE, &want, &mut &enc[..]).unwrap() {
            // Complete: start again on a fresh copy would need a new blob; just idle.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn kill_9_during_range_writes() {
    let hash = Hash::of(&data(SIZE, 6));
    for delay_ms in [0, 20, 60, 150, 400] {
        let store = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash::range_writer_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, store.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        while !line.contains("ready") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "child died before writing");
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        check_consistent(store.path(), &hash);
        let s = Store::open(store.path(), Options::default()).unwrap();
        if let Some(info) = s.info(&hash).unwrap() {
            assert!(info.present <= SIZE && info.present % GROUP_SIZE == 0 || info.complete);
        }
    }
}
