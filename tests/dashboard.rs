//! The dashboard in a real browser: Debian's chromium, driven by playwright-core
//! (`tests/browser/dashboard.mjs`), against a running daemon pair. The screenshot is kept in
//! `target/test-artifacts/dashboard.png`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

fn addr_of(data: &Path) -> String {
    status(data)["listen"][0]
        .as_str()
        .expect("a listen address")
        .to_string()
}

#[test]
fn the_dashboard_shows_the_peer_and_a_transfer_and_shares_a_dropped_file() {
    let browser = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        Path::new("/usr/bin/chromium").exists() && browser.join("node_modules/playwright-core").exists(),
        "chromium or playwright-core is missing: run scripts/setup"
    );
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let (ma, mb) = (root.path().join("ma"), root.path().join("mb"));
    // A serves slowly, so that B's fetch is still under way while the page is looked at.
    let da = Daemon::start(&a, &ma, &["--max-upload-rate", "1M"]);
    let src = root.path().join("big");
    random_file(&src, 48);
    let hash = add_file(&a, &src);
    let db = Daemon::start(&b, &mb, &["--bootstrap", &addr_of(&a)]);
    let peer_a = status(&a)["peer_id"].as_str().unwrap().to_string();
    // A reader on B's mount: the transfer.
    let mut reader = Command::new("cat")
        .arg(mb.join(&hash))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let drop_me = write_file(root.path(), "dropped.bin", &data(300_000, 11));
    let artifacts: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mut node = Command::new("node");
    node.current_dir(&browser)
        .arg("dashboard.mjs")
        .arg(format!("{}/", db.http()))
        .arg(&peer_a)
        .arg(&drop_me)
        .arg(&shot);
    let out = run_with_timeout(&mut node, Duration::from_secs(150));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = reader.kill();
    let _ = reader.wait();
    assert!(
        out.status.success(),
        "the browser run failed: {said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("PEER listed"), "{said}");
    assert!(said.contains("TRANSFER "), "{said}");
    assert!(!said.contains("PAGE ERROR"), "{said}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "no screenshot");
    // The hash the page showed is the file's, and B's store holds it, pinned.
    let shown = said
        .lines()
        .find_map(|l| l.strip_prefix("ADDED "))
        .expect("the page showed a hash")
        .trim()
        .to_string();
    assert_eq!(shown, b3(&drop_me));
    let ls: serde_json::Value = serde_json::from_str(&ok(swarmfs(&b, &["ls", "--json"]))).unwrap();
    let held = ls.as_array().unwrap().iter().find(|x| x["hash"] == shown.as_str());
    let held = held.expect("the dropped file is in B's store");
    assert_eq!(
        (held["complete"].as_bool(), held["pinned"].as_bool()),
        (Some(true), Some(true))
    );
    drop((db, da));
}
