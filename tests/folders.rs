//! Folders by one hash: `add -r`, the mount's `user.swarmfs.hash` on folders, `DIR/<folder
//! hash>` read lazily on another daemon, `get -o` and `ls` of a folder, and hostile manifests.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::*;

/// The first listen address of the daemon on `data`, with its peer id.
fn addr_of(data: &Path) -> String {
    status(data)["listen"][0]
        .as_str()
        .expect("a listen address")
        .to_string()
}

fn received(data: &Path) -> u64 {
    status(data)["bytes_received"].as_u64().unwrap()
}

/// A small tree with every kind of entry: nested and empty folders, an executable, an empty
/// file, a relative symlink, names in several scripts.
fn small_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("a.txt"), "hello\n").unwrap();
    fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("nothing"), "").unwrap();
    fs::write(root.join("sub/café.txt"), data(40_000, 1)).unwrap();
    fs::write(root.join("sub/deeper/日本語"), data(70_000, 2)).unwrap();
    std::os::unix::fs::symlink("../a.txt", root.join("sub/link")).unwrap();
}

/// The hash on the last line of `add -r`.
fn folder_hash_of(add_output: &str) -> String {
    let last = add_output.lines().last().expect("a line");
    assert!(last.ends_with('/'), "the folder's line ends in '/': {last}");
    last[..64].to_string()
}

#[test]
fn add_r_and_the_mount_xattr_give_the_same_hash() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("tree");
    small_tree(&src);
    // Offline, on a store of its own.
    let out = ok(swarmfs(
        &root.path().join("offline"),
        &["add", "-r", src.to_str().unwrap()],
    ));
    let want = folder_hash_of(&out);
    // One line per file, as b3sum prints it, then the folder.
    assert_eq!(out.lines().count(), 6, "{out}");
    for l in out.lines().take(5) {
        let (h, p) = l.split_once("  ").unwrap();
        assert_eq!(b3(Path::new(p)), h, "{l}");
    }
    let (data, mnt) = (root.path().join("data"), root.path().join("mnt"));
    let _d = Daemon::start(&data, &mnt, &[]);
    sh(&format!("cp -a {} {}/photos", src.display(), mnt.display()));
    assert_eq!(xattr_hash(&mnt.join("photos")), want);
    // The folder's hash is a folder in the mount, holding the same tree.
    let view = mnt.join(&want);
    sh(&format!("diff -r {} {}", src.display(), view.display()));
    assert!(fs::metadata(view.join("run.sh")).unwrap().permissions().mode() & 0o111 != 0);
    assert_eq!(fs::read_link(view.join("sub/link")).unwrap(), PathBuf::from("../a.txt"));
    // A change moves the hash; undoing it brings the old one back.
    fs::write(mnt.join("photos/new"), "x").unwrap();
    assert_ne!(xattr_hash(&mnt.join("photos")), want);
    fs::remove_file(mnt.join("photos/new")).unwrap();
    assert_eq!(xattr_hash(&mnt.join("photos")), want);
    // A sub-folder's hash is the one in its parent's manifest.
    let listed = ok(swarmfs(&data, &["ls", "--json", &want]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let sub = listed.as_array().unwrap().iter().find(|e| e["name"] == "sub").unwrap();
    assert_eq!(sub["kind"], "folder");
    assert_eq!(sub["hash"].as_str().unwrap(), xattr_hash(&mnt.join("photos/sub")));
    // Inside a published folder nothing can be written.
    for script in [
        format!("touch {}/x", view.display()),
        format!("mkdir {}/y", view.display()),
        format!("echo hi > {}/a.txt", view.display()),
        format!("rm {}/a.txt", view.display()),
    ] {
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{script} worked");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("Read-only"),
            "{script}: {o:?}"
        );
    }
}

#[test]
fn add_without_r_names_the_option_and_absolute_symlinks_are_left_out() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("tree");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "f").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("abs")).unwrap();
    let data = root.path().join("data");
    let e = fails(swarmfs(&data, &["add", src.to_str().unwrap()]));
    assert!(e.contains("add -r"), "{e}");
    let o = run(swarmfs(&data, &["add", "-r", src.to_str().unwrap()]));
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("left out") && err.contains("abs"), "{err}");
    let h = folder_hash_of(&String::from_utf8_lossy(&o.stdout));
    let listed = ok(swarmfs(&data, &["ls", &h]));
    assert_eq!(listed.lines().count(), 1, "{listed}");
}

/// The spec's encoding, written again here from docs/folders.md (not with the crate's
/// encoder), so that the tests can also write what the encoder never would.
mod raw {
    pub const FILE: u8 = 0;
    pub const FOLDER: u8 = 1;
    pub const SYMLINK: u8 = 2;

    pub fn manifest(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut m = b"swarmfs-folder 1\n".to_vec();
        m.push(0);
        m.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            m.extend_from_slice(e);
        }
        m
    }

    pub fn entry(kind: u8, exec: bool, size: u64, hash: &str, name: &[u8], target: Option<&[u8]>) -> Vec<u8> {
        let mut e = vec![kind, exec as u8];
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&hex(hash));
        e.extend_from_slice(&(name.len() as u16).to_le_bytes());
        e.extend_from_slice(name);
        if let Some(t) = target {
            e.extend_from_slice(&(t.len() as u16).to_le_bytes());
            e.extend_from_slice(t);
        }
        e
    }

    pub fn hex(h: &str) -> Vec<u8> {
        (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }
}

#[test]
fn the_crates_manifest_is_the_one_the_spec_spells_out() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("tree");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("b.sh"), "echo\n").unwrap();
    fs::set_permissions(src.join("b.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(src.join("d/x"), "xx").unwrap();
    std::os::unix::fs::symlink("d/x", src.join("l")).unwrap();
    let data = root.path().join("data");
    let h = folder_hash_of(&ok(swarmfs(&data, &["add", "-r", src.to_str().unwrap()])));
    let sub = raw::manifest(&[raw::entry(raw::FILE, false, 2, &b3(&src.join("d/x")), b"x", None)]);
    let sub_hash = hash_bytes(root.path(), &sub);
    let want = raw::manifest(&[
        raw::entry(raw::FILE, true, 5, &b3(&src.join("b.sh")), b"b.sh", None),
        raw::entry(raw::FOLDER, false, 2, &sub_hash, b"d", None),
        raw::entry(
            raw::SYMLINK,
            false,
            3,
            &hash_bytes(root.path(), b"d/x"),
            b"l",
            Some(b"d/x"),
        ),
    ]);
    assert_eq!(hash_bytes(root.path(), &want), h);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_swarmfs"))
        .arg("--data-dir")
        .arg(&data)
        .args(["cat", &h])
        .output()
        .unwrap();
    assert_eq!(out.stdout, want);
}

/// The b3sum of some bytes.
fn hash_bytes(dir: &Path, bytes: &[u8]) -> String {
    let p = dir.join(format!("bytes-{}", std::process::id()));
    fs::write(&p, bytes).unwrap();
    let h = b3(&p);
    fs::remove_file(&p).unwrap();
    h
}

/// A tree of `n` files, sizes 0..`max` bytes, spread over 10 sub-folders.
fn big_tree(root: &Path, n: usize, max: u64) -> u64 {
    let mut rng = Rng(7);
    let mut total = 0;
    for i in 0..n {
        let dir = root.join(format!("d{}", i % 10));
        fs::create_dir_all(&dir).unwrap();
        let size = rng.below(max);
        total += size;
        fs::write(dir.join(format!("file-{i:04}")), data(size, i as u64)).unwrap();
    }
    total
}

#[test]
fn a_folder_of_1000_files_is_listed_with_manifests_only_copied_out_and_fetched_whole() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("tree");
    let total = big_tree(&src, 1000, 400 << 10);
    assert!(total > 150 << 20, "a few hundred MiB: {total}");
    let (a_data, a_mnt) = (root.path().join("a-data"), root.path().join("a-mnt"));
    let (b_data, b_mnt) = (root.path().join("b-data"), root.path().join("b-mnt"));
    let _da = Daemon::start(&a_data, &a_mnt, &[]);
    sh(&format!("cp -a {} {}/shared", src.display(), a_mnt.display()));
    let h = xattr_hash(&a_mnt.join("shared"));
    let _db = Daemon::start(&b_data, &b_mnt, &["--bootstrap", &addr_of(&a_data)]);
    let before = received(&b_data);
    let listing = sh(&format!("cd {}/{h} && ls -lR", b_mnt.display()));
    assert_eq!(listing.matches("file-").count(), 1000, "{listing}");
    assert!(
        sh(&format!("du -sb --apparent-size {}/{h}", b_mnt.display())).starts_with(&format!("{}", total + 11 * 4096))
    );
    let listed = received(&b_data) - before;
    assert!(
        listed < 256 << 10,
        "ls -lR and du of a {total}-byte folder received {listed} bytes: more than its manifests"
    );
    // Copied out with cp -a, read lazily, verified.
    let out = root.path().join("copy");
    sh(&format!("cp -a {}/{h} {}", b_mnt.display(), out.display()));
    sh(&format!("diff -r {} {}", src.display(), out.display()));
    // `get -o` gives the same tree (from the store, where the copy left every blob).
    let got = root.path().join("got");
    let o = run(swarmfs(&b_data, &["get", &h, "-o", got.to_str().unwrap()]));
    assert!(o.status.success(), "{o:?}");
    sh(&format!("diff -r {} {}", src.display(), got.display()));
    // Without -o, `get` of a folder says what to do.
    let e = fails(swarmfs(&b_data, &["get", &h]));
    assert!(e.contains("-o DIR"), "{e}");
}

#[test]
fn get_o_of_a_folder_on_a_fresh_node_fetches_it_whole_and_a_ticket_names_a_folder() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("tree");
    small_tree(&src);
    big_tree(&src.join("more"), 50, 64 << 10);
    let (a_data, a_mnt) = (root.path().join("a-data"), root.path().join("a-mnt"));
    let _da = Daemon::start(&a_data, &a_mnt, &[]);
    sh(&format!("cp -a {} {}/t", src.display(), a_mnt.display()));
    let h = xattr_hash(&a_mnt.join("t"));
    // A short-lived node, no daemon: fetched, verified, written. Then a rerun over the same
    // folder, with a file gone from it, puts it back from the store.
    let got = root.path().join("got");
    let c_data = root.path().join("c-data");
    for pass in 0..2 {
        let o = run(swarmfs(
            &c_data,
            &[
                "get",
                "--no-mdns",
                "--bootstrap",
                &addr_of(&a_data),
                &h,
                "-o",
                got.to_str().unwrap(),
            ],
        ));
        assert!(o.status.success(), "pass {pass}: {o:?}");
        sh(&format!("diff -r {} {}", src.display(), got.display()));
        assert!(fs::metadata(got.join("run.sh")).unwrap().permissions().mode() & 0o111 != 0);
        fs::remove_file(got.join("sub/café.txt")).unwrap();
    }
    // share of a folder in the mount gives a ticket; open on another daemon names the folder.
    let ticket = ok(swarmfs(&a_data, &["share", a_mnt.join("t").to_str().unwrap()]));
    let (b_data, b_mnt) = (root.path().join("b-data"), root.path().join("b-mnt"));
    let _db = Daemon::start(&b_data, &b_mnt, &[]);
    let path = ok(swarmfs(&b_data, &["open", ticket.trim()]));
    assert_eq!(path.trim(), b_mnt.join(&h).to_str().unwrap());
    sh(&format!("diff -r {} {}", src.display(), path.trim()));
    let listed = ok(swarmfs(&b_data, &["ls", ticket.trim()]));
    assert!(listed.contains("run.sh") && listed.contains("more/"), "{listed}");
}

/// A hostile manifest, added on A as a plain file: B refuses it, writes nothing outside the
/// folder it was asked to fill, and bans A.
fn refused_by_a_fresh_node(root: &Path, a_data: &Path, manifest: &[u8], case: &str) {
    let m = root.join(format!("{case}.manifest"));
    fs::write(&m, manifest).unwrap();
    let h = add_file(a_data, &m);
    let place = root.join(format!("{case}-place"));
    fs::create_dir_all(&place).unwrap();
    let target = place.join("target");
    let o = run_with_timeout(
        swarmfs(&root.join(format!("{case}-data")), &[])
            .args(["get", "--no-mdns", "--bootstrap", &addr_of(a_data), &h, "-o"])
            .arg(&target)
            .env("RUST_LOG", "warn"),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{case}: accepted: {err}");
    assert!(err.contains("banned"), "{case}: A not banned: {err}");
    // Nothing beside the target, nor in it but folders.
    let beside: Vec<_> = fs::read_dir(&place).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(beside.iter().all(|n| n == "target"), "{case}: wrote {beside:?}");
    if target.exists() {
        let inside = sh(&format!("find {} -not -type d", target.display()));
        assert!(inside.trim().is_empty(), "{case}: wrote {inside}");
    }
}

#[test]
fn hostile_manifests_are_refused_nothing_is_written_outside_and_the_peer_is_banned() {
    let root = tempfile::tempdir().unwrap();
    let (a_data, a_mnt) = (root.path().join("a-data"), root.path().join("a-mnt"));
    let _da = Daemon::start(&a_data, &a_mnt, &[]);
    let x = write_file(root.path(), "x", b"payload");
    let xh = add_file(&a_data, &x);
    let file = |name: &[u8]| raw::entry(raw::FILE, false, 7, &xh, name, None);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("slash", raw::manifest(&[file(b"../../escaped")])),
        ("dotdot", raw::manifest(&[file(b"..")])),
        (
            "absolute-symlink",
            raw::manifest(&[raw::entry(
                raw::SYMLINK,
                false,
                11,
                &hash_bytes(root.path(), b"/etc/passwd"),
                b"l",
                Some(b"/etc/passwd"),
            )]),
        ),
        ("duplicate", raw::manifest(&[file(b"a"), file(b"a")])),
        (
            "size-lies",
            raw::manifest(&[raw::entry(raw::FILE, false, 3, &xh, b"short", None)]),
        ),
    ];
    for (case, m) in &cases {
        refused_by_a_fresh_node(root.path(), &a_data, m, case);
    }
    // A chain of folders deeper than any reader follows (a loop cannot be written: a
    // manifest names its children by hash).
    let mut h = hash_bytes(root.path(), &raw::manifest(&[]));
    let mut manifests = vec![raw::manifest(&[])];
    for _ in 0..300 {
        let m = raw::manifest(&[raw::entry(raw::FOLDER, false, 0, &h, b"d", None)]);
        h = hash_bytes(root.path(), &m);
        manifests.push(m);
    }
    let top = manifests.pop().unwrap();
    let paths: Vec<String> = manifests
        .iter()
        .enumerate()
        .map(|(i, m)| {
            write_file(root.path(), &format!("chain-{i}"), m)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut args = vec!["add"];
    args.extend(paths.iter().map(String::as_str));
    ok(swarmfs(&a_data, &args));
    refused_by_a_fresh_node(root.path(), &a_data, &top, "too-deep");

    // Through a mount: the folder is refused with EIO, and A is banned.
    let (b_data, b_mnt) = (root.path().join("b-data"), root.path().join("b-mnt"));
    let db = Daemon::start(&b_data, &b_mnt, &["--bootstrap", &addr_of(&a_data)]);
    let m = write_file(root.path(), "slash-again", &cases[0].1);
    let bad = add_file(&a_data, &m);
    let o = std::process::Command::new("ls").arg(b_mnt.join(&bad)).output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Input/output error"),
        "{o:?}"
    );
    assert_banned_a_peer(&db);
    assert!(!fs::exists(root.path().join("escaped")).unwrap());
}

/// Waits for the daemon's log to say it banned a peer.
fn assert_banned_a_peer(d: &Daemon) {
    assert!(
        eventually(Duration::from_secs(5), || d
            .log_text()
            .contains("banned for this session")),
        "{}",
        d.log_text()
    );
}

#[test]
fn a_file_whose_size_its_folder_misstates_is_refused_in_the_mount() {
    let root = tempfile::tempdir().unwrap();
    let (a_data, a_mnt) = (root.path().join("a-data"), root.path().join("a-mnt"));
    let _da = Daemon::start(&a_data, &a_mnt, &[]);
    let x = write_file(root.path(), "x", &data(50_000, 3));
    let xh = add_file(&a_data, &x);
    let m = raw::manifest(&[raw::entry(raw::FILE, false, 10, &xh, b"f", None)]);
    let h = add_file(&a_data, &write_file(root.path(), "m", &m));
    let (b_data, b_mnt) = (root.path().join("b-data"), root.path().join("b-mnt"));
    let db = Daemon::start(&b_data, &b_mnt, &["--bootstrap", &addr_of(&a_data)]);
    // Listed with the size the manifest says, and refused when read.
    assert_eq!(fs::metadata(b_mnt.join(&h).join("f")).unwrap().len(), 10);
    let e = fs::read(b_mnt.join(&h).join("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_banned_a_peer(&db);
}

#[test]
fn ls_of_a_remote_file_too_big_to_be_a_manifest_says_so_and_bans_nobody() {
    let root = tempfile::tempdir().unwrap();
    let (a_data, a_mnt) = (root.path().join("a-data"), root.path().join("a-mnt"));
    let _da = Daemon::start(&a_data, &a_mnt, &[]);
    let big = root.path().join("big");
    random_file(&big, 2);
    let h = add_file(&a_data, &big);
    let (b_data, b_mnt) = (root.path().join("b-data"), root.path().join("b-mnt"));
    let db = Daemon::start(&b_data, &b_mnt, &["--bootstrap", &addr_of(&a_data)]);
    let e = fails(swarmfs(&b_data, &["ls", &h]));
    assert!(e.contains("is not a folder"), "{e}");
    // A did nothing wrong: it is still there to read the file from.
    assert!(!db.log_text().contains("banned"), "{}", db.log_text());
    assert_eq!(b3(&b_mnt.join(&h)), h);
}

#[test]
fn a_symlink_climbing_out_of_the_folder_read_is_refused_without_a_ban() {
    let root = tempfile::tempdir().unwrap();
    let (a_data, a_mnt) = (root.path().join("a-data"), root.path().join("a-mnt"));
    let _da = Daemon::start(&a_data, &a_mnt, &[]);
    let link = |name: &[u8], target: &[u8]| {
        raw::entry(
            raw::SYMLINK,
            false,
            target.len() as u64,
            &hash_bytes(root.path(), target),
            name,
            Some(target),
        )
    };
    // d/up -> ../x stays inside; d/out -> ../../x climbs out of the folder.
    let sub = raw::manifest(&[link(b"out", b"../../x"), link(b"up", b"../x")]);
    let sub_h = add_file(&a_data, &write_file(root.path(), "sub", &sub));
    let top = raw::manifest(&[raw::entry(raw::FOLDER, false, 0, &sub_h, b"d", None)]);
    let h = add_file(&a_data, &write_file(root.path(), "top", &top));
    let (b_data, b_mnt) = (root.path().join("b-data"), root.path().join("b-mnt"));
    let db = Daemon::start(&b_data, &b_mnt, &["--bootstrap", &addr_of(&a_data)]);
    let d = b_mnt.join(&h).join("d");
    assert_eq!(
        sh(&format!("ls {}", d.display()))
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["out", "up"]
    );
    assert_eq!(fs::read_link(d.join("up")).unwrap(), PathBuf::from("../x"));
    let e = fs::read_link(d.join("out")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let target = root.path().join("target");
    let err = fails(swarmfs(&b_data, &["get", &h, "-o", target.to_str().unwrap()]));
    assert!(err.contains("climbs out"), "{err}");
    assert!(!target.exists(), "get wrote before it refused");
    // The same manifest is sound read from elsewhere: nobody is banned for it.
    assert!(!db.log_text().contains("banned"), "{}", db.log_text());
}

#[test]
fn a_folders_manifests_are_held_by_the_folder_against_gc_until_it_changes() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("tree");
    small_tree(&src);
    let (data, mnt) = (root.path().join("data"), root.path().join("mnt"));
    let _d = Daemon::start(&data, &mnt, &[]);
    sh(&format!("cp -a {} {}/photos", src.display(), mnt.display()));
    let h = xattr_hash(&mnt.join("photos"));
    let held = |h: &str| {
        let ls: serde_json::Value = serde_json::from_str(&ok(swarmfs(&data, &["ls", "--json"]))).unwrap();
        ls.as_array().unwrap().iter().any(|b| b["hash"] == h)
    };
    // A cap of one byte: gc evicts everything it may.
    ok(swarmfs(&data, &["--cache-size", "1", "gc"]));
    assert!(held(&h), "gc evicted the manifest of a folder in the mount");
    // Changed and asked again, the folder holds its new manifest and lets the old one go.
    fs::write(mnt.join("photos/new"), "x").unwrap();
    let h2 = xattr_hash(&mnt.join("photos"));
    ok(swarmfs(&data, &["--cache-size", "1", "gc"]));
    assert!(held(&h2));
    assert!(!held(&h), "the old manifest is still held");
}
