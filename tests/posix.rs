//! POSIX semantics of the mount, as programs rely on them: folder times and link counts,
//! other users, every kind of name. pjdfstest is the broad check (`docs/posix.md`); these
//! are the regressions it found, each on a real mount.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

struct Env {
    tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    mnt: std::path::PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let (data, mnt) = (tmp.path().join("data"), tmp.path().join("mnt"));
    Env { tmp, data, mnt }
}

/// Runs a Python script with `args`, printing what it prints.
fn python(script: &str, args: &[&Path]) -> String {
    let mut c = Command::new("python3");
    c.arg("-c").arg(script).args(args);
    ok(c)
}

/// Runs a Python script as user and group 65534 (nobody); prints what it prints.
fn python_as_nobody(script: &str, args: &[&Path]) -> String {
    let script = format!("import os\nos.setgroups([])\nos.setgid(65534)\nos.setuid(65534)\n{script}");
    python(&script, args)
}

#[test]
fn python_imports_a_module_created_after_a_failed_import() {
    let e = env();
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    let lib = e.mnt.join("lib");
    fs::create_dir(&lib).unwrap();
    // The import system caches a folder's listing until the folder's mtime changes.
    let out = python(
        "import sys, time\nsys.path.insert(0, sys.argv[1])\ntry:\n    import fresh_module\n    print('found too early')\nexcept ImportError:\n    pass\ntime.sleep(0.05)\nopen(sys.argv[1] + '/fresh_module.py', 'w').write('X = 42\\n')\nimport fresh_module\nprint(fresh_module.X)\n",
        &[&lib],
    );
    assert_eq!(out.trim(), "42");
    drop(d);
}

fn times(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).unwrap();
    (
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    )
}

/// Runs `f` and asserts that it moved `dir`'s mtime and ctime forward.
fn changes_times(dir: &Path, what: &str, f: impl FnOnce()) {
    let before = times(dir);
    std::thread::sleep(Duration::from_millis(20));
    f();
    let after = times(dir);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "{what}: {} times {before:?} -> {after:?}",
        dir.display()
    );
}

#[test]
fn folder_times_link_counts_and_long_names_follow_posix() {
    let e = env();
    let mut d = Daemon::start(&e.data, &e.mnt, &[]);
    let (a, b) = (e.mnt.join("a"), e.mnt.join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    changes_times(&a, "create", || fs::write(a.join("f"), b"x").unwrap());
    changes_times(&a, "mkdir", || fs::create_dir(a.join("sub")).unwrap());
    changes_times(&a, "symlink", || std::os::unix::fs::symlink("f", a.join("l")).unwrap());
    changes_times(&a, "rename out", || fs::rename(a.join("f"), b.join("f")).unwrap());
    changes_times(&b, "rename in", || fs::rename(a.join("l"), b.join("l")).unwrap());
    changes_times(&b, "unlink", || fs::remove_file(b.join("l")).unwrap());
    // Link counts: 2 + sub-folders.
    let nlink = |p: &Path| fs::metadata(p).unwrap().nlink();
    assert_eq!(nlink(&a), 3, "a holds one folder");
    fs::create_dir(a.join("sub2")).unwrap();
    assert_eq!(nlink(&a), 4);
    fs::rename(a.join("sub2"), b.join("sub2")).unwrap();
    assert_eq!((nlink(&a), nlink(&b)), (3, 3), "a folder moved between folders");
    changes_times(&a, "rmdir", || fs::remove_dir(a.join("sub")).unwrap());
    assert_eq!(nlink(&a), 2);
    // A file's mtime moves at the write, not at the close.
    let f = b.join("f");
    let file = fs::OpenOptions::new().append(true).open(&f).unwrap();
    let before = times(&f).0;
    std::thread::sleep(Duration::from_millis(20));
    std::io::Write::write_all(&mut &file, b"more").unwrap();
    assert!(times(&f).0 > before, "mtime did not move at the write");
    let written = times(&f).0;
    drop(file);
    assert_eq!(times(&f).0, written, "the close moved the mtime again");
    // Names: 255 bytes fit, 256 give ENAMETOOLONG everywhere.
    let long = "n".repeat(256);
    fs::write(b.join("n".repeat(255)), b"ok").unwrap();
    for (what, r) in [
        ("create", fs::write(b.join(&long), b"x").map(drop)),
        ("mkdir", fs::create_dir(b.join(&long))),
        ("stat", fs::metadata(b.join(&long)).map(drop)),
        ("rename", fs::rename(&f, b.join(&long))),
        ("link", fs::hard_link(&f, b.join(&long))),
    ] {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENAMETOOLONG), "{what}");
    }
    // A set-group-ID folder passes on its group, and the bit to new folders.
    let g = e.mnt.join("g");
    fs::create_dir(&g).unwrap();
    sh(&format!("chown :4242 {0} && chmod 2775 {0}", g.display()));
    fs::write(g.join("f"), b"x").unwrap();
    fs::create_dir(g.join("d")).unwrap();
    assert_eq!(fs::metadata(g.join("f")).unwrap().gid(), 4242);
    assert_eq!(fs::metadata(g.join("d")).unwrap().gid(), 4242);
    assert_ne!(fs::metadata(g.join("d")).unwrap().mode() & 0o2000, 0);
    // `df -i`: used inodes are the names, never negative.
    let df = sh(&format!("df --output=iused {} | tail -1", e.mnt.display()));
    let used: i64 = df.trim().parse().unwrap();
    assert!(used > 0, "df -i used {used}");
    // All of it survives a restart.
    d.stop_with("INT");
    drop(d);
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    assert_eq!((nlink(&a), nlink(&b)), (2, 3));
    assert_eq!(fs::read(&f).unwrap(), b"xmore");
    drop(d);
}

#[test]
fn a_second_user_is_served_with_allow_other_under_the_kernel_s_permission_checks() {
    let e = env();
    // The way down to the mount must be open to the other user.
    fs::set_permissions(e.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(&e.data, &e.mnt, &["--allow-other"]);
    let m = &e.mnt;
    fs::write(m.join("public"), b"for all\n").unwrap();
    fs::write(m.join("private"), b"mine\n").unwrap();
    fs::set_permissions(m.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.join("shared")).unwrap();
    fs::set_permissions(m.join("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(m.join("shared/roots"), b"root's\n").unwrap();
    let out = python_as_nobody(
        r#"import sys, os, errno
m = sys.argv[1]
def err(f):
    try:
        f()
        return 0
    except OSError as e:
        return e.errno
print(open(m + '/public').read().strip())
print(err(lambda: open(m + '/private').read()))
print(err(lambda: open(m + '/public', 'a').write('x')))
print(err(lambda: os.chmod(m + '/public', 0o777)))
print(err(lambda: os.mkdir(m + '/mine')))
open(m + '/shared/nobodys', 'w').write('hi\n')
print(os.stat(m + '/shared/nobodys').st_uid)
print(err(lambda: os.unlink(m + '/shared/roots')))
os.unlink(m + '/shared/nobodys')
print('done')
"#,
        &[m],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "for all", "13", // EACCES: 0600, not the owner
            "13", // EACCES: 0644, no write for others
            "1",  // EPERM: chmod of another's file
            "13", // EACCES: the root folder is 0755
            "65534", "1", // EPERM: the sticky bit guards root's file
            "done"
        ],
        "{out}"
    );
    assert_eq!(fs::read(m.join("shared/roots")).unwrap(), b"root's\n");
    drop(d);
}

#[test]
fn hard_links_fifos_sockets_and_device_nodes_are_names() {
    let e = env();
    let mut d = Daemon::start(&e.data, &e.mnt, &[]);
    let m = &e.mnt;
    // Hard links: one file, two names.
    fs::write(m.join("a"), b"one\n").unwrap();
    fs::hard_link(m.join("a"), m.join("b")).unwrap();
    let (ma, mb) = (fs::metadata(m.join("a")).unwrap(), fs::metadata(m.join("b")).unwrap());
    assert_eq!((ma.ino(), ma.nlink()), (mb.ino(), 2));
    fs::write(m.join("b"), b"two\n").unwrap();
    assert_eq!(
        fs::read(m.join("a")).unwrap(),
        b"two\n",
        "a write through one name shows in the other"
    );
    fs::remove_file(m.join("a")).unwrap();
    assert_eq!(fs::metadata(m.join("b")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.join("b")).unwrap(), b"two\n");
    assert_eq!(
        fs::hard_link(m, m.join("dirlink")).unwrap_err().raw_os_error(),
        Some(libc::EPERM),
        "a folder has no hard links"
    );
    // cp -al and rsync -aH, which make links.
    fs::create_dir_all(m.join("tree/sub")).unwrap();
    fs::write(m.join("tree/sub/x"), b"x\n").unwrap();
    fs::hard_link(m.join("tree/sub/x"), m.join("tree/y")).unwrap();
    sh(&format!("cp -al {0}/tree {0}/linked", m.display()));
    assert_eq!(
        fs::metadata(m.join("linked/sub/x")).unwrap().nlink(),
        4,
        "tree/sub/x, tree/y and their copies"
    );
    let src = e.tmp.path().join("src");
    sh(&format!(
        "mkdir {0} && echo h > {0}/h1 && ln {0}/h1 {0}/h2 && rsync -aH {0}/ {1}/rs/",
        src.display(),
        m.display()
    ));
    let (h1, h2) = (
        fs::metadata(m.join("rs/h1")).unwrap(),
        fs::metadata(m.join("rs/h2")).unwrap(),
    );
    assert_eq!((h1.ino(), h1.nlink()), (h2.ino(), 2), "rsync -H kept the link");
    // A FIFO carries bytes from a writer to a reader.
    sh(&format!("mkfifo {}/fifo", m.display()));
    assert!(fs::metadata(m.join("fifo")).unwrap().file_type().is_fifo());
    let out = sh(&format!("(echo through > {0}/fifo &) ; cat {0}/fifo", m.display()));
    assert_eq!(out, "through\n");
    // A unix socket can be bound and connected to.
    let out = python(
        "import socket, sys\np = sys.argv[1] + '/sock'\ns = socket.socket(socket.AF_UNIX)\ns.bind(p)\ns.listen(1)\nc = socket.socket(socket.AF_UNIX)\nc.connect(p)\nc.sendall(b'hi')\nprint(s.accept()[0].recv(2).decode())\n",
        &[m],
    );
    assert_eq!(out.trim(), "hi");
    assert!(fs::metadata(m.join("sock")).unwrap().file_type().is_socket());
    // A device node keeps its number (the same as /dev/null's).
    sh(&format!("mknod {}/null c 1 3", m.display()));
    let null = fs::metadata(m.join("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), fs::metadata("/dev/null").unwrap().rdev());
    // fallocate grows a file; punching holes is refused with a clear errno.
    sh(&format!("fallocate -l 1M {}/big", m.display()));
    assert_eq!(fs::metadata(m.join("big")).unwrap().len(), 1 << 20);
    let err = fails({
        let mut c = Command::new("fallocate");
        c.args(["--punch-hole", "-o", "0", "-l", "4096"]).arg(m.join("big"));
        c
    });
    assert!(err.contains("unsupported") || err.contains("not supported"), "{err}");
    // All of them survive a restart.
    d.stop_with("INT");
    drop(d);
    let d = Daemon::start(&e.data, &e.mnt, &[]);
    assert_eq!(
        fs::metadata(m.join("linked/sub/x")).unwrap().nlink(),
        4,
        "tree/sub/x, tree/y and their copies"
    );
    assert_eq!(fs::read(m.join("linked/y")).unwrap(), b"x\n");
    assert!(fs::metadata(m.join("fifo")).unwrap().file_type().is_fifo());
    assert_eq!(fs::metadata(m.join("null")).unwrap().rdev(), null.rdev());
    assert_eq!(fs::read(m.join("big")).unwrap(), vec![0u8; 1 << 20]);
    drop(d);
}
