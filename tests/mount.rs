//! The mount, end to end: real daemons, real FUSE mounts, the tools people use.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::util::*;

struct Env {
    _tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    mnt: std::path::PathBuf,
    src: std::path::PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let (data, mnt, src) = (tmp.path().join("data"), tmp.path().join("mnt"), tmp.path().join("src"));
    fs::create_dir_all(&src).unwrap();
    Env {
        _tmp: tmp,
        data,
        mnt,
        src,
    }
}

/// The name's hash is b3sum's of `source`, and `MNT/<hash>` has the same bytes.
fn assert_stored(mnt: &Path, name: &Path, source: &Path) {
    let want = b3(source);
    assert_eq!(xattr_hash(name), want, "{} vs {}", name.display(), source.display());
    let mut c = std::process::Command::new("cmp");
    c.arg(mnt.join(&want)).arg(source);
    ok(c);
}

#[test]
fn copying_in_with_common_tools() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let (m, s) = (&e.mnt, &e.src);
    for &n in &[0u64, 1, 16385, (1 << 20) + 1, 5 << 20] {
        write_file(s, &format!("f{n}"), &data(n, n + 1));
    }
    fs::create_dir_all(s.join("tree/sub")).unwrap();
    write_file(&s.join("tree"), "a", &data(3000, 1));
    write_file(&s.join("tree/sub"), "b", &data(70000, 2));
    let f = s.join(format!("f{}", (1 << 20) + 1));

    // cp, and cp -a (which must keep the mtime and mode)
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    sh(&format!(
        "cp {} {}/cp && cp -a {} {}/cpa",
        f.display(),
        m.display(),
        f.display(),
        m.display()
    ));
    assert_stored(m, &m.join("cp"), &f);
    assert_stored(m, &m.join("cpa"), &f);
    let (src_meta, cpa_meta) = (fs::metadata(&f).unwrap(), fs::metadata(m.join("cpa")).unwrap());
    assert_eq!(cpa_meta.mtime(), src_meta.mtime(), "cp -a keeps the mtime");
    assert_eq!(cpa_meta.mode() & 0o7777, 0o640, "cp -a keeps the mode");

    // Every size, with plain cp
    for &n in &[0u64, 1, 16385, 5 << 20] {
        let p = s.join(format!("f{n}"));
        sh(&format!("cp {} {}/", p.display(), m.display()));
        assert_stored(m, &m.join(format!("f{n}")), &p);
    }

    // cp -r and rsync -a of a tree
    sh(&format!("cp -r {}/tree {}/tree_r", s.display(), m.display()));
    sh(&format!("rsync -a {}/tree/ {}/tree_rsync/", s.display(), m.display()));
    for t in ["tree_r", "tree_rsync"] {
        assert_stored(m, &m.join(t).join("a"), &s.join("tree/a"));
        assert_stored(m, &m.join(t).join("sub/b"), &s.join("tree/sub/b"));
    }
    let rs = fs::metadata(m.join("tree_rsync/sub/b")).unwrap();
    assert_eq!(
        rs.mtime(),
        fs::metadata(s.join("tree/sub/b")).unwrap().mtime(),
        "rsync -a keeps mtimes"
    );

    // mv in from another filesystem
    let mv_src = write_file(s, "moved", &data(40000, 9));
    let keep = write_file(s, "moved.orig", &data(40000, 9));
    sh(&format!("mv {} {}/moved", mv_src.display(), m.display()));
    assert!(!mv_src.exists());
    assert_stored(m, &m.join("moved"), &keep);

    // An editor: write a temp file, rename it over the old name.
    let v1 = write_file(s, "v1", b"first version\n");
    let v2 = write_file(s, "v2", b"second version, longer\n");
    sh(&format!("cp {} {}/doc.txt", v1.display(), m.display()));
    sh(&format!(
        "cp {} {m}/.doc.txt.swp && mv {m}/.doc.txt.swp {m}/doc.txt",
        v2.display(),
        m = m.display()
    ));
    assert_stored(m, &m.join("doc.txt"), &v2);
    assert!(!m.join(".doc.txt.swp").exists());

    // dd with seek: 64 KiB blocks written last to first (random writes)
    let big = s.join(format!("f{}", 5 << 20));
    let mut script = String::new();
    for i in (0..80).rev() {
        script += &format!(
            "dd if={} of={}/dd bs=65536 skip={i} seek={i} count=1 conv=notrunc status=none\n",
            big.display(),
            m.display()
        );
    }
    sh(&script);
    assert_stored(m, &m.join("dd"), &big);

    // truncate, shorter and longer
    sh(&format!(
        "cp {} {m}/t && truncate -s 10000 {m}/t",
        big.display(),
        m = m.display()
    ));
    let short = write_file(s, "short", &data(5 << 20, (5 << 20) + 1)[..10000]);
    assert_stored(m, &m.join("t"), &short);
    sh(&format!("truncate -s 20000 {}/t", m.display()));
    let mut longer = data(5 << 20, (5 << 20) + 1)[..10000].to_vec();
    longer.resize(20000, 0);
    let longer = write_file(s, "longer", &longer);
    assert_stored(m, &m.join("t"), &longer);

    // Folders, symlinks, chmod, unlink, rmdir, listing
    fs::create_dir(m.join("dir")).unwrap();
    std::os::unix::fs::symlink("../doc.txt", m.join("dir/link")).unwrap();
    assert_eq!(fs::read(m.join("dir/link")).unwrap(), fs::read(&v2).unwrap());
    fs::set_permissions(m.join("doc.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(m.join("doc.txt")).unwrap().mode() & 0o777, 0o600);
    assert_eq!(fs::remove_dir(m.join("dir")).unwrap_err().raw_os_error(), Some(39)); // ENOTEMPTY
    fs::remove_file(m.join("dir/link")).unwrap();
    fs::remove_dir(m.join("dir")).unwrap();
    let names: Vec<String> = fs::read_dir(m)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.contains(&"doc.txt".to_string()) && names.contains(&b3(&v2)),
        "{names:?}"
    );
    drop(d);
}

/// A Python program that reads 200 random ranges of `a` and checks them against `b`.
const PY_RANDOM_READS: &str = r#"
import os, random, sys
a, b = sys.argv[1], sys.argv[2]
size = os.path.getsize(b)
assert os.path.getsize(a) == size, (os.path.getsize(a), size)
random.seed(7)
with open(a, 'rb') as fa, open(b, 'rb') as fb:
    for _ in range(200):
        off = random.randrange(0, max(size, 1))
        n = random.randrange(0, 300000)
        fa.seek(off); fb.seek(off)
        assert fa.read(n) == fb.read(n), off
print("ok")
"#;

fn reading(extra: &[&str]) {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, extra);
    let sizes = [1u64, 16384, 16385, (3 << 20) + 333, 9 << 20];
    let mut blobs = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let p = write_file(&e.src, &format!("r{i}"), &data(n, 40 + i as u64));
        blobs.push((add_file(&e.data, &p), p));
    }
    for (h, p) in &blobs {
        let hp = e.mnt.join(h);
        assert_eq!(fs::metadata(&hp).unwrap().len(), fs::metadata(p).unwrap().len());
        assert_eq!(fs::metadata(&hp).unwrap().mode() & 0o777, 0o444);
        let mut c = std::process::Command::new("cmp");
        c.arg(&hp).arg(p);
        ok(c);
        assert_eq!(
            sh(&format!("cat {} | b3sum --no-names", hp.display())).trim(),
            h.as_str()
        );
        let mut py = std::process::Command::new("python3");
        py.args(["-c", PY_RANDOM_READS]).arg(&hp).arg(p);
        assert_eq!(ok(py).trim(), "ok");
    }
    // 16 readers at once, on different blobs and offsets.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (h, p) = blobs[1 + i % (blobs.len() - 1)].clone();
            let path = e.mnt.join(&h);
            std::thread::spawn(move || {
                let want = fs::read(&p).unwrap();
                let mut f = fs::File::open(&path).unwrap();
                let mut rng = Rng(i as u64 + 1);
                for _ in 0..30 {
                    let off = rng.below(want.len() as u64);
                    let mut buf = vec![0u8; 1 + rng.below(200_000) as usize];
                    f.seek(SeekFrom::Start(off)).unwrap();
                    let mut got = 0;
                    while got < buf.len() {
                        let n = f.read(&mut buf[got..]).unwrap();
                        if n == 0 {
                            break;
                        }
                        got += n;
                    }
                    let end = (off as usize + got).min(want.len());
                    assert_eq!(&buf[..got], &want[off as usize..end]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a reader got wrong bytes");
    }
    drop(d);
}

#[test]
fn reading_hash_entries_with_passthrough() {
    reading(&[]);
}

#[test]
fn reading_hash_entries_through_the_daemon() {
    reading(&["--no-passthrough"]);
}

#[test]
fn restart_keeps_names_pins_and_content() {
    let e = env();
    let f = write_file(&e.src, "f", &data(200_000, 3));
    let mut d = Daemon::start(&e.data, &e.mnt, &[]);
    fs::create_dir(e.mnt.join("docs")).unwrap();
    sh(&format!("cp {} {}/docs/f", f.display(), e.mnt.display()));
    std::os::unix::fs::symlink("docs/f", e.mnt.join("link")).unwrap();
    fs::set_permissions(e.mnt.join("docs/f"), fs::Permissions::from_mode(0o751)).unwrap();
    assert_eq!(d.stop_with("INT"), Some(0), "Ctrl-C exits cleanly");
    assert!(!is_mounted(&e.mnt), "Ctrl-C unmounts");
    assert!(!e.data.join("control.sock").exists());

    let d = Daemon::start(&e.data, &e.mnt, &[]);
    assert_stored(&e.mnt, &e.mnt.join("docs/f"), &f);
    assert_eq!(fs::read_link(e.mnt.join("link")).unwrap(), Path::new("docs/f"));
    assert_eq!(fs::metadata(e.mnt.join("docs/f")).unwrap().mode() & 0o7777, 0o751);
    let ls: serde_json::Value = serde_json::from_str(&ok(swarmfs(&e.data, &["ls", "--json"]))).unwrap();
    let entry = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["hash"] == b3(&f))
        .expect("blob listed");
    assert_eq!(entry["name"], "docs/f", "the name holds its blob across a restart");
    drop(d);
}

#[test]
fn kill_9_during_a_copy_leaves_nothing_half_written() {
    let e = env();
    let big = write_file(&e.src, "big", &data(96 << 20, 5));
    let old = write_file(&e.src, "old", b"the old content\n");
    let mut d = Daemon::start(&e.data, &e.mnt, &[]);
    sh(&format!("cp {} {}/over", old.display(), e.mnt.display()));
    let mut cp = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cp {b} {m}/new; cp {b} {m}/over",
            b = big.display(),
            m = e.mnt.display()
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    d.kill9();
    let _ = cp.wait();
    assert!(is_mounted(&e.mnt), "a killed daemon leaves a stale mount");
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    // The copy never finished: the new name is gone or whole, the old name is old or whole.
    if e.mnt.join("new").exists() {
        assert_stored(&e.mnt, &e.mnt.join("new"), &big);
    }
    let over = xattr_hash(&e.mnt.join("over"));
    assert!(over == b3(&old) || over == b3(&big), "half-written content published");
    let v = run(swarmfs(&e.data, &["verify"]));
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    // Every blob listed in the mount is whole.
    for entry in fs::read_dir(&e.mnt).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.len() == 64 {
            assert_eq!(b3(&e.mnt.join(&name)), name);
        }
    }
    // And the mount works.
    sh(&format!("cp {} {}/after", old.display(), e.mnt.display()));
    assert_stored(&e.mnt, &e.mnt.join("after"), &old);
    drop(d);
}

/// errno of a Python statement run against `path` (0 if it succeeds).
fn py_errno(stmt: &str, path: &Path) -> i32 {
    let script = format!(
        "import sys\np = sys.argv[1]\ntry:\n    {stmt}\n    print(0)\nexcept OSError as e:\n    print(e.errno)\n"
    );
    let mut c = std::process::Command::new("python3");
    c.args(["-c", &script]).arg(path);
    ok(c).trim().parse().unwrap()
}

#[test]
fn errors_have_the_right_errno() {
    let e = env();
    // No peer holds the blob: a corrupt block, dropped, is not fetched again for long.
    let d = Daemon::start(
        &e.data,
        &e.mnt,
        &["--no-passthrough", "--read-timeout", "2", "--lookup-timeout", "1"],
    );
    let f = write_file(&e.src, "f", &data(100_000, 8));
    sh(&format!("cp {} {}/f", f.display(), e.mnt.display()));
    let h = b3(&f);
    let hp = e.mnt.join(&h);
    const EROFS: i32 = 30;
    assert_eq!(py_errno("open(p, 'wb')", &hp), EROFS);
    assert_eq!(py_errno("open(p, 'ab')", &hp), EROFS);
    assert_eq!(py_errno("import os; os.truncate(p, 0)", &hp), EROFS);
    assert_eq!(py_errno("import os; os.unlink(p)", &hp), EROFS);
    let unknown = "ab".repeat(32);
    assert_eq!(
        py_errno("open(p, 'w')", &e.mnt.join(&unknown)),
        EROFS,
        "blob names are read-only"
    );
    assert_eq!(
        py_errno("import os; os.stat(p)", &e.mnt.join(&unknown)),
        2,
        "unknown hash: ENOENT"
    );
    assert_eq!(py_errno("import os; os.stat(p)", &e.mnt.join("no-such-name")), 2);
    assert_eq!(
        py_errno("import os; os.stat(p)", &e.mnt.join(unknown.to_uppercase())),
        2,
        "only lowercase names blobs"
    );

    // A flipped byte on disk: EIO through the daemon, and a log line naming hash and block.
    let blob = e.data.join("blobs").join(&h);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[3 * 16384 + 7] ^= 1;
    fs::write(&blob, &bytes).unwrap();
    const EIO: i32 = 5;
    assert_eq!(py_errno("f = open(p, 'rb'); f.seek(3 * 16384); f.read(100)", &hp), EIO);
    assert_eq!(
        py_errno("f = open(p, 'rb'); f.seek(0); f.read(100)", &hp),
        0,
        "good blocks still read"
    );
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&h) && l.contains("block=3") && l.contains("failed verification")),
        "{log}"
    );
    drop(d);
}

#[test]
fn the_data_directory_is_readable_by_its_owner_alone() {
    let e = env();
    // The test's temporary directory is 0700; open it up as a home directory is.
    fs::set_permissions(e._tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let secret = e.mnt.join("secret.txt");
    fs::write(&secret, data(100_000, 80)).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let hash = xattr_hash(&secret);
    let src = write_file(&e.src, "added.bin", &data(50_000, 81));
    add_file(&e.data, &src);
    drop(d);
    // Every file the store made is the owner's alone, and so is every directory.
    let mut stack = vec![e.data.clone()];
    while let Some(dir) = stack.pop() {
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
        for entry in fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() && p != e.data.join("index") {
                stack.push(p);
            } else if m.is_dir() {
                // The index's own files are sled's; its directory keeps them private.
                let mode = m.permissions().mode() & 0o777;
                assert_eq!(mode, 0o700, "{} is {mode:o}", p.display());
            } else {
                let mode = m.permissions().mode() & 0o777;
                assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
            }
        }
    }
    // Another local user cannot read the secret's bytes through the data directory.
    let blob = e.data.join("blobs").join(&hash);
    assert!(blob.exists(), "no blob file at {}", blob.display());
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&blob);
    let out = run(c);
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "another user read the blob"
    );
}

#[test]
fn hash_look_alike_names_are_refused_in_the_root() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let f = write_file(&e.src, "f", &data(100_000, 82));
    sh(&format!("cp {} {}/f", f.display(), e.mnt.display()));
    let h = b3(&f);
    const EROFS: i32 = 30;
    let upper = h.to_uppercase();
    let mixed: String = h
        .chars()
        .enumerate()
        .map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c })
        .collect();
    for name in [&upper, &mixed] {
        let p = e.mnt.join(name);
        assert_eq!(py_errno("open(p, 'w').write('other')", &p), EROFS, "create {name}");
        assert_eq!(py_errno("import os; os.mkdir(p)", &p), EROFS, "mkdir {name}");
        assert_eq!(py_errno("import os; os.symlink('f', p)", &p), EROFS, "symlink {name}");
        assert_eq!(
            py_errno(&format!("import os; os.rename('{}', p)", e.mnt.join("f").display()), &p),
            EROFS,
            "rename onto {name}"
        );
        assert!(!p.exists());
    }
    // In a folder, such a name is an ordinary name.
    fs::create_dir(e.mnt.join("d")).unwrap();
    fs::write(e.mnt.join("d").join(&upper), b"fine").unwrap();
    assert_eq!(fs::read(e.mnt.join("d").join(&upper)).unwrap(), b"fine");
    drop(d);
}

/// Reads `MNT/<hash>` whole; returns the bytes, or the errno.
fn read_whole(p: &Path) -> Result<Vec<u8>, i32> {
    fs::read(p).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

#[test]
fn passthrough_never_hands_out_bytes_that_fail_verification() {
    // No peer holds these blobs: a dropped block's fetch fails fast.
    const QUICK: &[&str] = &["--read-timeout", "2", "--lookup-timeout", "1"];
    let e = env();
    let mut d = Daemon::start(&e.data, &e.mnt, QUICK);
    let contents: Vec<Vec<u8>> = (0..5).map(|i| data(400_000 + i, 84 + i)).collect();
    let hashes: Vec<String> = contents
        .iter()
        .enumerate()
        .map(|(i, c)| add_file(&e.data, &write_file(&e.src, &format!("f{i}"), c)))
        .collect();
    // Each verified in this daemon's life (added through it): reads are right, by passthrough.
    for (h, c) in hashes.iter().zip(&contents) {
        assert!(read_whole(&e.mnt.join(h)).unwrap() == *c);
    }
    let blob = |i: usize| e.data.join("blobs").join(&hashes[i]);
    // Damaged on disk, each in its own way.
    let mut b = fs::read(blob(0)).unwrap();
    b[5 * 16384 + 3] ^= 1;
    fs::OpenOptions::new()
        .write(true)
        .open(blob(0))
        .unwrap()
        .write_all_at(&b[5 * 16384..5 * 16384 + 16], 5 * 16384)
        .unwrap(); // flipped in place
    fs::OpenOptions::new()
        .write(true)
        .open(blob(1))
        .unwrap()
        .set_len(200_000)
        .unwrap(); // truncated
    fs::write(blob(2), b"").unwrap(); // emptied
    let other = e.src.join("other");
    fs::write(&other, data(400_002, 99)).unwrap();
    fs::rename(&other, blob(3)).unwrap(); // replaced
    for i in 0..4 {
        let p = e.mnt.join(&hashes[i]);
        match read_whole(&p) {
            Ok(got) => assert!(
                got == contents[i],
                "blob {i}: wrong bytes ({} of {})",
                got.len(),
                contents[i].len()
            ),
            Err(errno) => assert_eq!(errno, 5, "blob {i}: EIO or the right bytes"),
        }
    }
    // A blob damaged while no daemon ran has not verified in the new daemon's life.
    drop(d);
    let mut b = fs::read(blob(4)).unwrap();
    b[2 * 16384] ^= 1;
    fs::write(blob(4), &b).unwrap();
    d = Daemon::start(&e.data, &e.mnt, QUICK);
    match read_whole(&e.mnt.join(&hashes[4])) {
        Ok(got) => assert!(got == contents[4], "wrong bytes after a restart"),
        Err(errno) => assert_eq!(errno, 5),
    }
    drop(d);
}

/// A python process that runs `script` on `path`, prints `ready` when it has done what must
/// survive, and then holds its files open until it is killed.
fn python_until_killed(script: &str, path: &Path) -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            &format!("{script}print('ready', flush=True)\nimport time\ntime.sleep(120)\n"),
        ])
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

/// Writes `len` bytes to `path`, fsyncs them (if `fsync`), and holds the file open.
fn hold_open_after_write(path: &Path, len: usize, fsync: bool) -> std::process::Child {
    let script = format!(
        "import os, sys\nf = open(sys.argv[1], 'wb')\nf.write(bytes(i % 251 for i in range({len})))\nf.flush()\n{}",
        if fsync { "os.fsync(f.fileno())\n" } else { "" }
    );
    python_until_killed(&script, path)
}

#[test]
fn fsync_of_a_file_held_open_survives_kill_9_and_a_clean_stop_commits_open_files() {
    let e = env();
    let want = |len: usize| (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
    // fsync, then kill -9 while the file is still open.
    let mut d = Daemon::start(&e.data, &e.mnt, &[]);
    let mut holder = hold_open_after_write(&e.mnt.join("db"), 300_000, true);
    d.kill9();
    let _ = holder.kill();
    let _ = holder.wait();
    drop(d); // (its stale mount goes now, not after the next daemon mounted)
    let mut d = Daemon::start(&e.data, &e.mnt, &[]);
    assert!(
        fs::read(e.mnt.join("db")).unwrap() == want(300_000),
        "fsynced content lost after kill -9"
    );
    // No fsync, then a clean stop while the file is still open: committed as it stands.
    let mut holder = hold_open_after_write(&e.mnt.join("open"), 200_000, false);
    assert_eq!(d.stop_with("INT"), Some(0));
    let _ = holder.kill();
    let _ = holder.wait();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    assert!(
        !d.log_text().contains("never finished writing"),
        "a clean stop left unfinished files: {}",
        d.log_text()
    );
    assert!(
        fs::read(e.mnt.join("open")).unwrap() == want(200_000),
        "an open file was lost at a clean stop"
    );
    drop(d);
}

#[test]
fn a_blob_read_after_a_restart_is_checked_in_the_background_for_passthrough() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let c = data(500_000, 95);
    let h = add_file(&e.data, &write_file(&e.src, "f", &c));
    drop(d);
    // Not verified in the new daemon's life: the first read goes through it, and starts the
    // check that lets later opens use passthrough.
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    assert!(read_whole(&e.mnt.join(&h)).unwrap() == c);
    assert!(
        eventually(Duration::from_secs(10), || d.log_text().contains("verified whole")),
        "no background check: {}",
        d.log_text()
    );
    assert!(read_whole(&e.mnt.join(&h)).unwrap() == c);
    drop(d);
}

/// A 24 MiB tmpfs mounted on `dir` until the guard drops.
fn small_disk(dir: &Path) -> impl Drop + '_ {
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    fs::create_dir_all(dir).unwrap();
    sh(&format!("mount -t tmpfs -o size=24m swarmfs-test {}", dir.display()));
    Unmount(dir)
}

#[test]
fn full_disk_gives_enospc_and_publishes_nothing() {
    let e = env();
    let _tmpfs = small_disk(&e.data);
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let small = write_file(&e.src, "small", b"fits\n");
    sh(&format!("cp {} {}/keep", small.display(), e.mnt.display()));
    let big = write_file(&e.src, "big", &data(40 << 20, 6));
    let out = run({
        let mut c = std::process::Command::new("cp");
        c.arg(&big).arg(e.mnt.join("keep"));
        c
    });
    assert!(!out.status.success(), "the copy must fail on a full disk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    // The name keeps its old content; no blob of the big file appears.
    assert_stored(&e.mnt, &e.mnt.join("keep"), &small);
    assert!(!e.mnt.join(b3(&big)).exists());
    let v = run(swarmfs(&e.data, &["verify"]));
    assert!(v.status.success());
    drop(d);
}

#[test]
fn daemon_start_errors_are_clear() {
    let e = env();
    let err = fails(swarmfs(&e.data, &["mount"]).arg(e.mnt.join("missing")).args([
        "--no-mdns",
        "--no-upnp",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]));
    assert!(err.contains("does not exist"), "{err}");
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    // Another daemon on the same data directory names the one that holds it.
    let other = e.src.join("mnt2");
    fs::create_dir_all(&other).unwrap();
    let err = fails(swarmfs(&e.data, &["mount"]).arg(&other).args([
        "--no-mdns",
        "--no-upnp",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]));
    assert!(
        err.contains(&format!("in use by another swarmfs process (pid {})", d.pid())),
        "{err}"
    );
    // A second daemon on the same mount point.
    let err = fails(swarmfs(&e.src.join("data2"), &["mount"]).arg(&e.mnt).args([
        "--no-mdns",
        "--no-upnp",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]));
    assert!(err.contains("already a mount point"), "{err}");
    drop(d);
}

#[test]
fn cli_goes_through_the_daemon_and_stale_mounts_are_cleaned() {
    let e = env();
    let mut d = Daemon::start(&e.data, &e.mnt, &["--lookup-timeout", "2"]);
    let sock = fs::metadata(e.data.join("control.sock")).unwrap();
    assert_eq!(sock.mode() & 0o777, 0o600);
    // The store is held by the daemon, so these can only work through the socket.
    let f = write_file(&e.src, "f", &data(50_000, 4));
    let mut add = swarmfs(&e.data, &["add"]);
    add.current_dir(&e.src).arg("f");
    let line = ok(add);
    assert_eq!(line, format!("{}  f\n", b3(&f)));
    assert!(e.mnt.join(b3(&f)).exists(), "added blobs appear in the mount");
    let out = run(swarmfs(&e.data, &["cat", &b3(&f)]));
    assert!(out.status.success() && out.stdout == fs::read(&f).unwrap());
    let out = run(swarmfs(&e.data, &["cat", &"cd".repeat(32)]));
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(msg.contains(&format!("no peer has blob {}", "cd".repeat(32))), "{msg}");
    let out = run(swarmfs(&e.data, &["verify"]));
    assert_eq!(out.status.code(), Some(0));
    let df = sh(&format!("df -B1 --output=size {}", e.mnt.display()));
    assert!(
        df.lines().nth(1).is_some_and(|l| l.trim().parse::<u64>().unwrap() > 0),
        "{df}"
    );

    // kill -9 leaves a stale mount; the next start cleans it up.
    d.kill9();
    assert!(is_mounted(&e.mnt));
    let probe = fs::metadata(e.mnt.join("probe")).unwrap_err();
    assert_eq!(probe.raw_os_error(), Some(107), "the stale mount answers ENOTCONN");
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    assert!(d.log_text().contains("stale mount"), "{}", d.log_text());
    assert_eq!(fs::read(e.mnt.join(b3(&f))).unwrap(), fs::read(&f).unwrap());
    drop(d);
}

#[test]
fn a_second_ctrl_c_forces_the_exit() {
    let e = env();
    // A slow shutdown (the hidden test flag), as a stuck disk or peer would make it.
    let mut d = Daemon::start(
        &e.data,
        &e.mnt,
        &["--lookup-timeout", "20", "--test-shutdown-delay", "20"],
    );
    // A lookup of a hash nobody has waits on the network; the shutdown ends it at once.
    let mnt = e.mnt.clone();
    let probe = std::thread::spawn(move || fs::metadata(mnt.join("ab".repeat(32))).map(|_| ()));
    std::thread::sleep(Duration::from_millis(300));
    sh(&format!("kill -INT {}", d.pid()));
    let t = std::time::Instant::now();
    let looked = probe.join().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the pending lookup ended with the shutdown"
    );
    assert_eq!(looked.unwrap_err().raw_os_error(), Some(2), "ENOENT");
    std::thread::sleep(Duration::from_millis(300));
    let code = d.stop_with("INT");
    assert_eq!(code, Some(130), "{}", d.log_text());
    assert!(d.log_text().contains("swarmfs: forced exit"), "{}", d.log_text());
    // Dropping `d` cleans up whatever mount the forced exit left.
    drop(d);
    assert!(!is_mounted(&e.mnt));
}

#[test]
fn a_file_open_for_reading_does_not_block_a_writer() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let f = e.mnt.join("log");
    let orig = data(100_000, 41);
    fs::write(&f, &orig).unwrap();
    // Read once so that the next open could use passthrough.
    assert!(fs::read(&f).unwrap() == orig);
    // `exec 3< f; echo x >> f`, then truncation, seen through the reader's descriptor.
    let script = r#"
import os, sys
f = sys.argv[1]
r = os.open(f, os.O_RDONLY)
before = os.pread(r, 1 << 20, 0)
with open(f, 'ab') as w:
    w.write(b'x\n')
after = os.pread(r, 1 << 20, 0)
assert after == before + b'x\n', ('append not seen', len(before), len(after))
with open(f, 'r+b') as w:
    w.truncate(10)
assert os.pread(r, 1 << 20, 0) == before[:10], 'truncation not seen'
assert os.fstat(r).st_size == 10
print('ok')
"#;
    let mut c = std::process::Command::new("python3");
    c.args(["-c", script]).arg(&f);
    assert_eq!(ok(c).trim(), "ok");
    // tail -f while appending.
    fs::write(&f, &orig).unwrap();
    let mut tail = std::process::Command::new("tail")
        .args(["-n", "0", "-f"])
        .arg(&f)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    sh(&format!("echo appended-line >> {}", f.display()));
    let out = tail.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = tail.kill();
    let _ = tail.wait();
    assert_eq!(line.trim(), "appended-line", "tail -f did not see the append");
    // rsync --inplace over a file another descriptor holds open.
    let mut changed = orig.clone();
    changed[50_000..50_100].fill(7);
    let src = write_file(&e.src, "log", &changed);
    let holder = fs::File::open(&f).unwrap();
    sh(&format!(
        "rsync --inplace --no-whole-file {} {}",
        src.display(),
        f.display()
    ));
    assert!(fs::read(&f).unwrap() == changed, "rsync --inplace gave other content");
    drop(holder);
    drop(d);
}

/// `swarmfs ls --json` of the daemon on `data`: (hash, bytes present, pinned) per blob.
fn blobs(data: &Path) -> Vec<(String, u64, bool)> {
    let ls: serde_json::Value = serde_json::from_str(&ok(swarmfs(data, &["ls", "--json"]))).unwrap();
    ls.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["hash"].as_str().unwrap().to_string(),
                b["present"].as_u64().unwrap(),
                b["pinned"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn names_release_the_blobs_they_held_and_gc_frees_them() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &["--cache-size", "1000000"]);
    let f = e.mnt.join("doc");
    let mut last = Vec::new();
    for i in 0..10 {
        last = data(2 << 20, 700 + i);
        fs::write(&f, &last).unwrap();
    }
    ok(swarmfs(&e.data, &["gc"]));
    let held: u64 = blobs(&e.data).iter().map(|b| b.1).sum();
    assert_eq!(
        held,
        2 << 20,
        "ten saves then gc: only the current content stays: {:?}",
        blobs(&e.data)
    );
    assert!(blobs(&e.data).iter().all(|b| !b.2), "a name is not a pin");
    assert!(fs::read(&f).unwrap() == last);
    // Removing the name releases its blob too.
    fs::remove_file(&f).unwrap();
    ok(swarmfs(&e.data, &["gc"]));
    let held: u64 = blobs(&e.data).iter().map(|b| b.1).sum();
    assert_eq!(held, 0, "a removed name's blob is evictable: {:?}", blobs(&e.data));
    // A rename over a name releases the replaced one's blob.
    fs::write(e.mnt.join("a"), data(2 << 20, 1)).unwrap();
    fs::write(e.mnt.join("b"), data(2 << 20, 2)).unwrap();
    fs::rename(e.mnt.join("a"), e.mnt.join("b")).unwrap();
    ok(swarmfs(&e.data, &["gc"]));
    let held: u64 = blobs(&e.data).iter().map(|b| b.1).sum();
    assert_eq!(held, 2 << 20);
    assert!(fs::read(e.mnt.join("b")).unwrap() == data(2 << 20, 1));
    drop(d);
}

#[test]
fn a_blob_a_name_holds_is_never_evicted() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &["--cache-size", "1000"]);
    fs::create_dir(e.mnt.join("photos")).unwrap();
    let f = e.mnt.join("photos/cat.jpg");
    let c = data(3 << 20, 77);
    fs::write(&f, &c).unwrap();
    let h = xattr_hash(&f);
    ok(swarmfs(&e.data, &["pin", &h]));
    let out = ok(swarmfs(&e.data, &["unpin", &h]));
    assert!(
        out.contains("photos/cat.jpg"),
        "unpin names the name that holds it: {out}"
    );
    ok(swarmfs(&e.data, &["gc"]));
    assert!(fs::read(&f).unwrap() == c, "gc removed the data behind a name");
    assert!(read_whole(&e.mnt.join(&h)).unwrap() == c);
    let ls = ok(swarmfs(&e.data, &["ls"]));
    assert!(ls.contains("photos/cat.jpg"), "ls shows the name: {ls}");
    // And after a restart (the holds are in the index, not in memory).
    drop(d);
    let d = Daemon::start(&e.data, &e.mnt, &["--cache-size", "1000"]);
    ok(swarmfs(&e.data, &["gc"]));
    assert!(
        fs::read(&f).unwrap() == c,
        "gc after a restart removed the data behind a name"
    );
    drop(d);
}

#[test]
fn a_save_survives_kill_9_right_after_it_returns() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    fs::write(e.mnt.join("note"), "old\n").unwrap();
    drop(d);
    let sync_script = "import os, sys\np = sys.argv[1]\nf = open(p, 'wb')\nf.write(bytes(i % 253 for i in range(10 << 20)))\nf.flush()\nos.fsync(f.fileno())\nf.close()\nd = os.open(os.path.dirname(p), os.O_RDONLY)\nos.fsync(d)\nos.sync()\n";
    let synced: Vec<u8> = (0..10 << 20).map(|i| (i % 253) as u8).collect();
    for round in 0..3u64 {
        let big = write_file(&e.src, "big", &data(3 << 20, 40 + round));
        let mut d = Daemon::start(&e.data, &e.mnt, &[]);
        let mut py = std::process::Command::new("python3");
        py.args(["-c", sync_script]).arg(e.mnt.join(format!("synced{round}")));
        ok(py);
        // Each save in turn is the last thing before the kill.
        let (echo, cp) = (
            format!("echo text{round} > {}/note", e.mnt.display()),
            format!("cp {} {}/big{round}", big.display(), e.mnt.display()),
        );
        if round % 2 == 0 {
            sh(&format!("{cp} && {echo}"));
        } else {
            sh(&format!("{echo} && {cp}"));
        }
        d.kill9();
        drop(d);
        let d = Daemon::start(&e.data, &e.mnt, &[]);
        assert_eq!(
            fs::read_to_string(e.mnt.join("note")).unwrap(),
            format!("text{round}\n"),
            "echo text > file, then kill -9 (round {round})"
        );
        assert!(
            fs::read(e.mnt.join(format!("big{round}"))).ok() == Some(fs::read(&big).unwrap()),
            "a cp that exited 0, then kill -9 (round {round})"
        );
        assert!(
            fs::read(e.mnt.join(format!("synced{round}"))).ok() == Some(synced.clone()),
            "fsync(file), close, fsync(folder), sync(), then kill -9 (round {round})"
        );
        drop(d);
    }
}

#[test]
fn unlinked_and_renamed_over_files_stay_usable_through_open_descriptors() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let script = r#"
import os, sys, tempfile
m = sys.argv[1]
# tempfile.TemporaryFile: created, unlinked at once, then used.
with tempfile.TemporaryFile(dir=m) as t:
    t.write(b'hello' * 20000)
    t.seek(0)
    assert t.read() == b'hello' * 20000, 'TemporaryFile read'
    assert os.fstat(t.fileno()).st_size == 100000
# A committed file, unlinked while open for reading and writing.
p = os.path.join(m, 'u')
with open(p, 'wb') as f:
    f.write(bytes(range(256)) * 400)
fd = os.open(p, os.O_RDWR)
os.unlink(p)
assert not os.path.exists(p)
assert os.pread(fd, 1 << 20, 0) == bytes(range(256)) * 400, 'read after unlink'
os.pwrite(fd, b'tail', 102400)
st = os.fstat(fd)
assert st.st_size == 102404 and st.st_nlink == 0, (st.st_size, st.st_nlink)
assert os.pread(fd, 4, 102400) == b'tail'
os.close(fd)
# Renamed over: the old descriptor keeps the old content.
a, b = os.path.join(m, 'a'), os.path.join(m, 'b')
with open(a, 'wb') as f: f.write(b'A' * 50000)
with open(b, 'wb') as f: f.write(b'B' * 50000)
fd = os.open(b, os.O_RDONLY)
os.rename(a, b)
assert os.pread(fd, 1 << 20, 0) == b'B' * 50000, 'read after rename over'
os.fstat(fd)
os.close(fd)
with open(b, 'rb') as f: assert f.read() == b'A' * 50000
print('ok')
"#;
    let mut c = std::process::Command::new("python3");
    c.args(["-c", script]).arg(&e.mnt);
    assert_eq!(ok(c).trim(), "ok");
    // Nothing of the unlinked files is left behind as a name.
    let names: Vec<_> = fs::read_dir(&e.mnt)
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() != 64)
        .collect();
    assert_eq!(names, vec!["b".to_string()]);
    drop(d);
}

#[test]
fn a_full_index_recovers_once_space_is_freed_and_loses_nothing_acknowledged() {
    let e = env();
    let _tmpfs = small_disk(&e.data);
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    // Fill the disk under the daemon, outside its reach.
    let filler = e.data.join("filler");
    let _ = run({
        let mut c = std::process::Command::new("dd");
        c.args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()));
        c
    });
    // Whatever the mount acknowledges now must survive.
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for i in 0..300 {
        let p = e.mnt.join(format!("dir{i}"));
        match fs::create_dir(&p) {
            Ok(()) => acked.push(p),
            Err(e) => refused.push(e.raw_os_error()),
        }
    }
    // The test means something only if the disk did fill; a full disk is said as such.
    assert!(!refused.is_empty(), "the disk never filled: {}", d.log_text());
    assert!(
        refused.iter().all(|&e| e == Some(libc::ENOSPC)),
        "a full disk gave {refused:?}, not ENOSPC"
    );
    let link = e.mnt.join("link");
    let link_ok = std::os::unix::fs::symlink("dir0", &link).is_ok();
    std::thread::sleep(Duration::from_secs(2));
    // Room again: the mount works without a restart.
    fs::remove_file(&filler).unwrap();
    let works = eventually(Duration::from_secs(10), || {
        fs::write(e.mnt.join("after"), b"room again\n").is_ok() && fs::create_dir(e.mnt.join("dir-after")).is_ok()
    });
    assert!(
        works,
        "the mount did not recover once space was freed: {}",
        d.log_text()
    );
    drop(d);
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let lost: Vec<_> = acked.iter().filter(|p| !p.is_dir()).collect();
    assert!(lost.is_empty(), "{} acknowledged mkdirs lost: {lost:?}", lost.len());
    if link_ok {
        assert_eq!(
            fs::read_link(&link).unwrap(),
            Path::new("dir0"),
            "an acknowledged symlink lost"
        );
    }
    assert_eq!(fs::read(e.mnt.join("after")).unwrap(), b"room again\n");
    drop(d);
}

/// Commits `rows` rows to a sqlite database at `path` (adding to what is there), and holds
/// the connection open.
fn sqlite_commit_and_hold(path: &Path, rows: u32) -> std::process::Child {
    let script = format!(
        "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.execute('create table if not exists t (i integer, s text)')\nwith c:\n    c.executemany('insert into t values (?, ?)', [(i, 'row %d' % i) for i in range({rows})])\n"
    );
    python_until_killed(&script, path)
}

/// The rows in table `t` of the database at `path`, after an integrity check.
fn sqlite_rows(path: &Path) -> String {
    let mut c = std::process::Command::new("python3");
    c.args([
        "-c",
        "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nassert c.execute('pragma integrity_check').fetchone()[0] == 'ok'\nprint(c.execute('select count(*) from t').fetchone()[0])\n",
    ])
    .arg(path);
    ok(c).trim().to_string()
}

#[test]
fn a_sqlite_database_held_open_keeps_its_commits_across_kill_9_and_a_clean_stop() {
    let e = env();
    let db = e.mnt.join("app.db");
    // Committed, then the daemon is killed while the database is still open.
    let mut d = Daemon::start(&e.data, &e.mnt, &[]);
    let mut holder = sqlite_commit_and_hold(&db, 1000);
    d.kill9();
    let _ = holder.kill();
    let _ = holder.wait();
    drop(d);
    let mut d = Daemon::start(&e.data, &e.mnt, &[]);
    assert_eq!(sqlite_rows(&db), "1000", "commits lost after kill -9");
    // Committed again, then a clean stop while it is still open.
    let mut holder = sqlite_commit_and_hold(&db, 500);
    assert_eq!(d.stop_with("INT"), Some(0));
    let _ = holder.kill();
    let _ = holder.wait();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    assert_eq!(sqlite_rows(&db), "1500", "commits lost at a clean stop");
    drop(d);
}

/// `truncate -s N f` (open, ftruncate, close) is a save: once it returns, the name's hash is
/// that of the new length, without waiting for the kernel's release, which comes later and
/// may come much later. Here another writer holds the file open, so only the close publishes.
#[test]
fn a_truncate_to_a_longer_length_is_published_when_its_close_returns() {
    let e = env();
    let _d = Daemon::start(&e.data, &e.mnt, &[]);
    let f = e.mnt.join("t");
    fs::write(&f, data(10000, 3)).unwrap();
    let _writer = fs::OpenOptions::new().write(true).open(&f).unwrap();
    sh(&format!("truncate -s 20000 {}", f.display()));
    let mut longer = data(10000, 3);
    longer.resize(20000, 0);
    let want = write_file(&e.src, "longer", &longer);
    assert_eq!(xattr_hash(&f), b3(&want), "the name still has the old content's hash");
}
