//! The CLI against real files: b3sum agreement, round trips, tampering and errors.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::util::*;
use swarmfs::Hash;

#[test]
fn add_matches_b3sum_and_cat_round_trips() {
    let src = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let paths: Vec<_> = INTERESTING_SIZES
        .iter()
        .map(|&n| write_file(src.path(), &format!("f{n}"), &data(n, n)))
        .collect();
    let mut add = swarmfs(store.path(), &["add"]);
    add.args(&paths);
    let sums = ok(add);
    assert_eq!(sums, b3sum(&paths), "add prints exactly what b3sum prints");

    // `swarmfs add f > sums && b3sum -c sums`
    let sums_file = write_file(src.path(), "sums", sums.as_bytes());
    let mut check = std::process::Command::new("b3sum");
    check.arg("-c").arg(&sums_file);
    ok(check);

    for (line, path) in sums.lines().zip(&paths) {
        let hash = &line[..64];
        let out = run(swarmfs(store.path(), &["cat", hash]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            out.stdout == fs::read(path).unwrap(),
            "cat of {} differs",
            path.display()
        );
        // Upper case is accepted on the command line.
        let out = run(swarmfs(store.path(), &["cat", &hash.to_uppercase()]));
        assert!(out.status.success());
    }

    let ls = ok(swarmfs(store.path(), &["ls", "--json"]));
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let ls = ls.as_array().unwrap();
    assert_eq!(ls.len(), INTERESTING_SIZES.len());
    assert!(ls
        .iter()
        .all(|b| b["pinned"] == true && b["complete"] == true && b["size"] == b["present"]));
}

#[test]
fn tampered_byte_is_named_and_never_printed() {
    let src = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let bytes = data((3 << 20) + 5, 7);
    let path = write_file(src.path(), "f", &bytes);
    let mut add = swarmfs(store.path(), &["add"]);
    add.arg(&path);
    let hash = ok(add)[..64].to_string();

    // Flip one byte in block 70 (bytes 1146880..1163264) of the blob file on disk.
    let blob = store.path().join("blobs").join(&hash);
    let mut on_disk = fs::read(&blob).unwrap();
    assert_eq!(on_disk, bytes, "a complete blob's file is exactly its content");
    let at = 70 * 16384 + 1234;
    on_disk[at] ^= 0x01;
    fs::write(&blob, &on_disk).unwrap();

    let out = run(swarmfs(store.path(), &["cat", &hash]));
    assert!(!out.status.success(), "cat must fail on a corrupt blob");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("block 70 ") && err.contains("failed verification"),
        "{err}"
    );
    assert!(out.stdout.len() <= at, "bytes at and after the bad block were printed");
    assert!(out.stdout[..] == bytes[..out.stdout.len()], "what was printed is good");

    let out = run(swarmfs(store.path(), &["verify", &hash]));
    assert_eq!(out.status.code(), Some(1), "verify exits 1 on corruption");
    let report = String::from_utf8_lossy(&out.stdout);
    let corrupt: Vec<_> = report.lines().filter(|l| l.contains("CORRUPT")).collect();
    assert_eq!(corrupt.len(), 1, "exactly one block named: {report}");
    assert!(corrupt[0].contains("block 70 "), "{report}");

    // The block was dropped: what is left verifies, and ls shows 16 KiB fewer bytes.
    ok(swarmfs(store.path(), &["verify", &hash]));
    let ls: serde_json::Value = serde_json::from_str(&ok(swarmfs(store.path(), &["ls", "--json"]))).unwrap();
    assert_eq!(ls[0]["present"], bytes.len() as u64 - 16384);
    assert_eq!(ls[0]["complete"], false);
    let err = fails(swarmfs(store.path(), &["cat", &hash]));
    assert!(err.contains("block 70 ") && err.contains("not held locally"), "{err}");
}

#[test]
fn errors_are_one_plain_line() {
    let store = tempfile::tempdir().unwrap();
    let d = store.path();
    let one_line = |err: &str| assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");

    let err = fails(swarmfs(d, &["cat", "not-a-hash"]));
    assert!(err.contains("malformed hash \"not-a-hash\""), "{err}");
    one_line(&err);

    let unknown = "AB".repeat(32);
    let err = fails(swarmfs(d, &["cat", &unknown]));
    assert!(
        err.contains(&format!("unknown blob {}", unknown.to_lowercase())),
        "{err}"
    );
    one_line(&err);
    let err = fails(swarmfs(d, &["pin", &unknown]));
    assert!(err.contains("unknown blob"), "{err}");

    let err = fails(swarmfs(d, &["add", "/nonexistent/file"]));
    assert!(
        err.contains("cannot read /nonexistent/file") && err.contains("No such file"),
        "{err}"
    );
    one_line(&err);

    let err = fails(swarmfs(d, &["add", "/tmp"]));
    assert!(err.contains("/tmp: is a directory"), "{err}");

    // Hold the store in this process: the CLI must name us.
    let held = swarmfs::Store::open(d, Default::default()).unwrap();
    let err = fails(swarmfs(d, &["ls"]));
    assert!(
        err.contains("in use by another swarmfs process") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    one_line(&err);
    drop(held);
    // Released with the store, though a child that another test forks at that moment holds
    // the lock's descriptor until its exec closes it: a moment, longer under load.
    assert!(eventually(Duration::from_secs(5), || run(swarmfs(d, &["ls"]))
        .status
        .success()));
}

#[test]
fn pin_unpin_gc_through_the_cli() {
    let src = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let d = store.path();
    let a = write_file(src.path(), "a", &data(1 << 20, 1));
    let b = write_file(src.path(), "b", &data(1 << 20, 2));
    let mut add = swarmfs(d, &["add"]);
    add.arg(&a).arg(&b);
    let sums = ok(add);
    let (ha, hb) = (&sums[..64], &sums.lines().nth(1).unwrap()[..64]);
    ok(swarmfs(d, &["unpin", ha]));
    // A cap of 1.5 MiB: gc must evict a (unpinned) and keep b (pinned).
    let out = ok(swarmfs(d, &["--cache-size", "1536K", "gc"]));
    assert!(out.contains(&format!("evicted {ha}")), "{out}");
    let ls = ok(swarmfs(d, &["ls"]));
    assert!(!ls.contains(ha) && ls.contains(hb), "{ls}");
    // The cap is remembered.
    let out = ok(swarmfs(d, &["gc"]));
    assert!(out.contains("of 1.5 MiB used"), "{out}");
}

#[test]
fn ls_into_a_pipe_prints_sizes_in_bytes() {
    let store = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let f = write_file(src.path(), "f", &data((1 << 20) + 5, 3));
    let mut add = swarmfs(store.path(), &["add"]);
    add.arg(&f);
    let h = ok(add)[..64].to_string();
    // For scripts: bytes, not "1.0 MiB", and no header.
    let ls = ok(swarmfs(store.path(), &["ls"]));
    let row: Vec<&str> = ls.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(row[..3], [h.as_str(), "1048581", "1048581"], "{ls}");
}

#[test]
fn help_shows_an_example_for_each_command() {
    let help = ok({
        let mut c = bin();
        c.arg("--help");
        c
    });
    for cmd in ["add", "cat", "ls", "pin", "unpin", "gc", "verify"] {
        assert!(
            help.contains(&format!("swarmfs {cmd}")) || help.contains(&format!("swarmfs --cache-size 20G {cmd}")),
            "no example for {cmd}"
        );
        let sub = ok({
            let mut c = bin();
            c.args([cmd, "--help"]);
            c
        });
        assert!(sub.contains("Example:"), "{cmd} --help has no example");
    }
}

#[test]
fn verify_checks_every_blob_and_drops_every_bad_one() {
    let store = tempfile::tempdir().unwrap();
    let d = store.path();
    let src = tempfile::tempdir().unwrap();
    let mut hashes = Vec::new();
    for i in 0..4u64 {
        let p = write_file(src.path(), &format!("f{i}"), &data(300_000 + i, 90 + i));
        let mut add = swarmfs(d, &["add"]);
        add.arg(&p);
        hashes.push(ok(add)[..64].to_string());
    }
    // With a daemon running, as a user runs verify (a store opened afresh would drop a blob
    // whose file is gone before verify sees it).
    let mnt = src.path().join("mnt");
    let daemon = Daemon::start(d, &mnt, &[]);
    let blob = |h: &str| d.join("blobs").join(h);
    fs::remove_file(blob(&hashes[0])).unwrap(); // missing
    fs::OpenOptions::new()
        .write(true)
        .open(blob(&hashes[1]))
        .unwrap()
        .set_len(100_000)
        .unwrap(); // truncated
    fs::write(blob(&hashes[2]), b"").unwrap(); // emptied
    let out = run(swarmfs(d, &["verify"]));
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    for h in &hashes[..3] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(h.as_str()) && l.contains("CORRUPT")),
            "{h} not reported: {report}"
        );
    }
    assert!(
        report.contains(&format!("{}: OK", hashes[3])),
        "the good blob was not checked: {report}"
    );
    // What was bad is dropped: a second run finds nothing wrong, and nothing bad is held.
    let again = run(swarmfs(d, &["verify"]));
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    let ls: serde_json::Value = serde_json::from_str(&ok(swarmfs(d, &["ls", "--json"]))).unwrap();
    for b in ls.as_array().unwrap() {
        let h = b["hash"].as_str().unwrap();
        if h == hashes[1] {
            assert_eq!(b["complete"], false);
            assert!(b["present"].as_u64().unwrap() <= 100_000, "{b}");
        } else if h != hashes[3] {
            assert_eq!(b["present"], 0, "{b}");
        }
    }
    let good = run(swarmfs(d, &["cat", &hashes[3]]));
    assert!(good.status.success() && good.stdout == data(300_003, 93));
    drop(daemon);
}

#[test]
fn option_values_out_of_range_are_refused_with_a_clear_error() {
    let store = tempfile::tempdir().unwrap();
    let d = store.path();
    let mnt = tempfile::tempdir().unwrap();
    let mnt = mnt.path().to_str().unwrap();
    for (flag, value) in [
        ("--lookup-timeout", "18446744073709551615"),
        ("--lookup-timeout", "0"),
        ("--read-timeout", "18446744073709551615"),
        ("--read-timeout", "0"),
    ] {
        let err = fails(swarmfs(d, &["mount", mnt, "--no-mdns", "--no-upnp", flag, value]));
        assert!(
            err.contains(flag) && err.contains("not in 1..=86400"),
            "{flag} {value}: {err}"
        );
    }
    let err = fails(swarmfs(d, &["--cache-size", "99999999999T", "ls"]));
    assert!(err.contains("is not a size"), "{err}");
}

#[test]
fn paths_travel_as_bytes_through_the_daemon() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("d");
    let daemon = Daemon::start(&d, &root.path().join("m"), &[]);
    // A name that is not UTF-8: add goes through the control socket, and the line it prints
    // names the file byte for byte, as b3sum does.
    let name = OsStr::from_bytes(b"caf\xe9.txt");
    std::fs::write(root.path().join(name), b"not utf-8 named").unwrap();
    let mut add = swarmfs(&d, &["add"]);
    add.current_dir(root.path()).arg(name);
    let out = run(add);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hash = Hash::of(b"not utf-8 named").to_string();
    let mut want = format!("{hash}  ").into_bytes();
    want.extend_from_slice(b"caf\xe9.txt\n");
    assert_eq!(out.stdout, want);
    // get -o to a name that is not UTF-8 writes exactly that name.
    let target = OsStr::from_bytes(b"out\xe9");
    let mut get = swarmfs(&d, &["get", &hash, "-o"]);
    get.current_dir(root.path()).arg(target);
    ok(get);
    assert_eq!(std::fs::read(root.path().join(target)).unwrap(), b"not utf-8 named");
    drop(daemon);
}

#[test]
fn every_command_answers_json_with_the_http_fields() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("d");
    let daemon = Daemon::start(&d, &root.path().join("m"), &[]);
    let f = write_file(root.path(), "f", b"json please");
    let hash = add_file(&d, &f);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = run(swarmfs(&d, &all));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    };
    assert!(json(&["peers"]).is_array());
    assert!(json(&["providers", &hash]).is_array());
    assert_eq!(json(&["pin", &hash])[0], hash.as_str());
    assert_eq!(json(&["unpin", &hash])[0]["hash"], hash.as_str());
    assert_eq!(json(&["ls"])[0]["hash"], hash.as_str());
    let st = json(&["status"]);
    for field in [
        "peer_id",
        "cache_used",
        "cache_size",
        "transfers",
        "reachability",
        "http",
    ] {
        assert!(st.get(field).is_some(), "status has no {field}: {st}");
    }
    // The same fields as the HTTP API's.
    let http = daemon.http();
    let mut c = std::process::Command::new("curl");
    c.args(["-s", &format!("{http}/api/status")]);
    let over_http: serde_json::Value = serde_json::from_str(&ok(c)).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&st), keys(&over_http));
    assert!(json(&["gc"]).is_array());
    assert!(json(&["verify"]).is_array());
    drop(daemon);
}

#[test]
fn completions_and_the_man_page_come_from_the_command_line_definitions() {
    let bash = ok(bin().args(["completions", "bash"]));
    assert!(bash.contains("_swarmfs()") && bash.contains("providers"), "{bash}");
    let zsh = ok(bin().args(["completions", "zsh"]));
    assert!(zsh.contains("#compdef swarmfs"));
    let man = ok(bin().arg("man"));
    assert!(man.contains(".TH swarmfs") && man.contains("completions"), "{man}");
    let bad = run(bin().args(["completions", "nosuchshell"]));
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn get_draws_a_progress_bar_on_a_terminal_and_nothing_but_the_result_when_piped() {
    let root = tempfile::tempdir().unwrap();
    let a = root.path().join("a");
    let da = Daemon::start(&a, &root.path().join("ma"), &[]);
    let f = write_file(root.path(), "f", &data(3 << 20, 8));
    let hash = add_file(&a, &f);
    let addr = status(&a)["listen"][0].as_str().unwrap().to_string();
    let b = root.path().join("b");
    let out = root.path().join("piped");
    let mut get = swarmfs(&b, &["get", "--no-mdns", "--bootstrap", &addr, &hash, "-o"]);
    get.arg(&out);
    let piped = run(get);
    assert!(piped.status.success());
    assert!(piped.stdout.is_empty() && piped.stderr.is_empty(), "{piped:?}");
    assert_eq!(b3(&out), hash);
    // On a terminal (script(1) gives it one): a bar, then one summary line.
    let c = root.path().join("c");
    let tty_out = root.path().join("tty");
    let line = format!(
        "{} --data-dir {} get --no-mdns --bootstrap {addr} {hash} -o {}",
        env!("CARGO_BIN_EXE_swarmfs"),
        c.display(),
        tty_out.display()
    );
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &line, "/dev/null"]).env_remove("RUST_LOG");
    let shown = String::from_utf8_lossy(&ok_bytes(script)).into_owned();
    assert!(shown.contains("swarmfs: get 3.0 MiB in "), "{shown}");
    assert!(shown.contains("from 1 peer"), "{shown}");
    assert_eq!(b3(&tty_out), hash);
    drop(da);
}

#[test]
fn the_control_socket_carries_typed_calls_and_replies() {
    use std::io::{Read, Write};
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("d");
    let daemon = Daemon::start(&d, &root.path().join("m"), &[]);
    let hash = add_file(&d, &write_file(root.path(), "f", b"typed"));
    let ask = |req: &str| -> serde_json::Value {
        let mut s = std::os::unix::net::UnixStream::connect(d.join("control.sock")).unwrap();
        s.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 5, "a reply frame");
        let mut body = vec![0u8; u32::from_le_bytes(head[1..].try_into().unwrap()) as usize];
        s.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    };
    let blobs = ask(r#"{"kind":"call","call":{"call":"blobs"}}"#);
    assert_eq!(blobs["Ok"]["reply"], "blobs", "{blobs}");
    assert_eq!(blobs["Ok"]["value"][0]["hash"], hash.as_str());
    let missing = "0".repeat(64);
    let err = ask(&format!(
        r#"{{"kind":"call","call":{{"call":"pin","hashes":["{missing}"]}}}}"#
    ));
    assert_eq!(err["Err"]["kind"], "not_found", "{err}");
    // The CLI renders the same reply, and its exit code follows the error's kind.
    let out = run(swarmfs(&d, &["pin", &missing]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the local store"));
    let bad = run(swarmfs(&d, &["pin", "xyz"]));
    assert_eq!(bad.status.code(), Some(2), "a malformed hash is bad input");

    // A folder's entries and a path in the mount are typed calls too.
    let dir = root.path().join("folder");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("inside"), b"typed").unwrap();
    let mut add = swarmfs(&d, &["add", "-r"]);
    add.arg(&dir);
    let folder = ok(add).lines().last().unwrap()[..64].to_string();
    let listed = ask(&format!(
        r#"{{"kind":"call","call":{{"call":"list","target":"{folder}"}}}}"#
    ));
    assert_eq!(listed["Ok"]["reply"], "entries", "{listed}");
    assert_eq!(listed["Ok"]["value"][0]["name"], "inside");
    assert_eq!(listed["Ok"]["value"][0]["hash"], hash.as_str());
    let not_folder = ask(&format!(
        r#"{{"kind":"call","call":{{"call":"list","target":"{hash}"}}}}"#
    ));
    assert_eq!(not_folder["Err"]["kind"], "bad_request", "{not_folder}");
    let opened = ask(&format!(
        r#"{{"kind":"call","call":{{"call":"open","target":"{hash}"}}}}"#
    ));
    assert_eq!(opened["Ok"]["reply"], "opened", "{opened}");
    let path = opened["Ok"]["value"]["path"].as_str().unwrap().to_string();
    assert_eq!(fs::read(&path).unwrap(), b"typed");
    // Rendered by the CLI as before.
    let line = ok(swarmfs(&d, &["ls", &folder]));
    assert_eq!(line.trim_end(), format!("{hash}               5  file   inside"));
    assert_eq!(ok(swarmfs(&d, &["open", &hash])).trim_end(), path);
    let json: serde_json::Value = serde_json::from_str(&ok(swarmfs(&d, &["--json", "ls", &folder]))).unwrap();
    assert_eq!(json[0]["kind"], "file");
    assert_eq!(
        run(swarmfs(&d, &["ls", &hash])).status.code(),
        Some(2),
        "not a folder: bad input"
    );
    // share: a relative path is read from the cwd the call names (the client's).
    fs::write(root.path().join("new"), b"shared by path").unwrap();
    let cwd = root.path().to_str().unwrap();
    let shared = ask(&format!(
        r#"{{"kind":"call","call":{{"call":"share","target":"new","cwd":"{cwd}"}}}}"#
    ));
    assert_eq!(shared["Ok"]["reply"], "shared", "{shared}");
    let ticket = shared["Ok"]["value"]["ticket"].as_str().unwrap();
    let t = swarmfs::ticket::Ticket::decode(ticket).unwrap();
    assert_eq!(t.hash, Hash::of(b"shared by path"));
    let mut share = swarmfs(&d, &["share", "new"]);
    share.current_dir(root.path());
    assert_eq!(ok(share).trim(), ticket);
    let nothing = ask(r#"{"kind":"call","call":{"call":"share","target":"nothing-here","cwd":"/"}}"#);
    assert_eq!(nothing["Err"]["kind"], "bad_request", "{nothing}");
    drop(daemon);
}

/// `swarmfs add FLAGS PATH` under script(1), which gives it a terminal: what it drew.
fn add_on_a_terminal(data: &Path, flags: &str, path: &Path) -> String {
    let line = format!(
        "{} --data-dir {} add {flags} {}",
        env!("CARGO_BIN_EXE_swarmfs"),
        data.display(),
        path.display()
    );
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &line, "/dev/null"]).env_remove("RUST_LOG");
    String::from_utf8_lossy(&ok_bytes(script)).into_owned()
}

/// MiB of the big file of the add-bar tests: enough that reading it takes several of the
/// import's 20 ms looks even on a fast machine (40 MiB was read whole within one).
const BIG_MIB: u64 = 256;

/// True if an `add` bar "add [###>---] 25.00 MiB/256.00 MiB ..." was drawn with done strictly
/// between 0 and the whole big file.
fn bar_within_big(shown: &str) -> bool {
    let whole = format!("{BIG_MIB}.00 MiB");
    shown.split(['\r', '\n']).any(|seg| {
        let done = seg
            .split("] ")
            .nth(1)
            .and_then(|p| p.split(&format!("/{whole}")).next());
        seg.contains("add [") && done.is_some_and(|d| d != "0 B" && d != whole && !d.contains('/'))
    })
}

#[test]
fn add_r_of_a_folder_reports_over_its_whole_size_and_within_its_big_files() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("folder");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    random_file(&dir.join("sub/big"), BIG_MIB);
    let shown = add_on_a_terminal(&root.path().join("d"), "-r", &dir);
    // A bar drawn within the big file, over the folder's whole size. Without the walk first
    // the whole is only what was read (done == total); without the report within the file
    // no bar comes before its end.
    assert!(
        bar_within_big(&shown),
        "no bar within the file, over the folder's size: {shown:?}"
    );
    let hash = b3(&dir.join("sub/big"));
    assert!(shown.contains(&hash), "{shown:?}");
    assert!(
        shown.contains(&format!("swarmfs: add {BIG_MIB}.0 MiB in ")),
        "{shown:?}"
    );
}

#[test]
fn add_of_a_big_file_reports_within_it_and_its_result_line_stands_alone() {
    let root = tempfile::tempdir().unwrap();
    let f = root.path().join("big");
    random_file(&f, BIG_MIB);
    let shown = add_on_a_terminal(&root.path().join("d"), "", &f);
    // A bar drawn before the file was read to its end (without the in-file report, the
    // first report comes once the whole file is stored).
    assert!(bar_within_big(&shown), "no bar within the file: {shown:?}");
    // The result line is never drawn over: the text before it on its terminal line is at
    // most the bar's clearing sequence.
    let hash = b3(&f);
    let at = shown.find(&hash).expect("the result line");
    let before = &shown[shown[..at].rfind(['\r', '\n']).map_or(0, |i| i + 1)..at];
    assert!(
        before.is_empty() || before == "\x1b[2K",
        "bar text before the result: {before:?}"
    );
    assert!(
        shown.contains(&format!("swarmfs: add {BIG_MIB}.0 MiB in ")),
        "{shown:?}"
    );
}
