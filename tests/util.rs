//! Helpers shared by the integration tests: data, temp stores, and running the real binary
//! with a timeout.

use std::borrow::BorrowMut;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Sizes around chunk (1 KiB) and group (16 KiB) boundaries, where bugs live.
pub const INTERESTING_SIZES: &[u64] = &[
    0,
    1,
    1023,
    1024,
    1025,
    16383,
    16384,
    16385,
    1 << 20,
    (1 << 20) + 1,
    (32 << 20) + 7,
];

/// Deterministic pseudo-random bytes; `seed` tells blobs apart.
pub fn data(size: u64, seed: u64) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64 ^ seed.wrapping_mul(0x2545f4914f6cdd1d) ^ size;
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size as usize);
    out
}

/// A tiny deterministic generator for random offsets.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            self.0 % n
        }
    }
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The `swarmfs` binary under test.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_swarmfs"));
    c.env_remove("RUST_LOG");
    c
}

/// `swarmfs --data-dir DIR args...`
pub fn swarmfs(dir: &Path, args: &[&str]) -> Command {
    let mut c = bin();
    c.arg("--data-dir").arg(dir).args(args);
    c
}

/// Runs a command to completion, killing it if it takes longer than `limit`.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).unwrap();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        stderr.read_to_end(&mut v).unwrap();
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{cmd:?} took longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Runs with a one-minute limit.
pub fn run(mut cmd: impl BorrowMut<Command>) -> Output {
    run_with_timeout(cmd.borrow_mut(), Duration::from_secs(60))
}

/// Runs and insists on success; returns stdout as text.
pub fn ok(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{desc} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `ok` for output that need not be UTF-8 (names as bytes, terminal drawing).
pub fn ok_bytes(mut cmd: impl BorrowMut<Command>) -> Vec<u8> {
    let out = run(cmd.borrow_mut());
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

/// Runs and insists on failure; returns stderr as text.
pub fn fails(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    assert!(!out.status.success(), "{desc} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

/// `b3sum` of the files, as it prints them.
pub fn b3sum(paths: &[PathBuf]) -> String {
    let mut c = Command::new("b3sum");
    c.args(paths);
    ok(c)
}

/// A running `swarmfs mount`: started with a fresh or given data directory, stopped (SIGINT,
/// then SIGKILL and a lazy unmount if it must) when dropped, so no test leaves a mount behind.
pub struct Daemon {
    pub mnt: PathBuf,
    pub log: PathBuf,
    child: Option<std::process::Child>,
}

/// True if something is mounted at `dir`.
pub fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&*dir))
}

impl Daemon {
    /// Starts `swarmfs --data-dir DATA mount MNT EXTRA...` and waits until it is mounted.
    pub fn start(data: &Path, mnt: &Path, extra: &[&str]) -> Daemon {
        Daemon::launch(swarmfs(data, &["mount"]), data, mnt, extra)
    }

    /// `start` without RUST_LOG: the daemon logs what it logs by default.
    pub fn start_default_log(data: &Path, mnt: &Path, extra: &[&str]) -> Daemon {
        let mut cmd = swarmfs(data, &["mount"]);
        cmd.env("SWARMFS_TEST_DEFAULT_LOG", "1");
        Daemon::launch(cmd, data, mnt, extra)
    }

    /// `start`, with the daemon in network namespace `ns` (`nsenter --net`): its mount is
    /// still in this process's mount namespace, where the test can read it.
    pub fn start_in_netns(ns: &str, data: &Path, mnt: &Path, extra: &[&str]) -> Daemon {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg(env!("CARGO_BIN_EXE_swarmfs"))
            .arg("--data-dir")
            .arg(data)
            .arg("mount");
        Daemon::launch(c, data, mnt, extra)
    }

    /// `start`, with the daemon's descriptors limited to `nofile` (soft and hard).
    pub fn start_limited(nofile: u32, data: &Path, mnt: &Path, extra: &[&str]) -> Daemon {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_swarmfs"))
            .arg("--data-dir")
            .arg(data)
            .arg("mount");
        Daemon::launch(c, data, mnt, extra)
    }

    fn launch(mut cmd: Command, data: &Path, mnt: &Path, extra: &[&str]) -> Daemon {
        // A stale mount (a killed daemon) answers ENOTCONN, which create_dir_all takes for
        // "missing"; the daemon cleans it up.
        if !is_mounted(mnt) {
            std::fs::create_dir_all(mnt).unwrap();
        }
        let log = data.with_extension(format!("log{}", std::process::id()));
        // Never mDNS outside a namespace of our own, and never a fixed port (HTTP included).
        cmd.arg(mnt)
            .args(["--no-mdns", "--no-upnp", "--listen", "/ip4/127.0.0.1/tcp/0"]);
        if !extra.iter().any(|a| a.starts_with("--http") || *a == "--no-http") {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        let default_log = cmd.get_envs().any(|(k, _)| k == "SWARMFS_TEST_DEFAULT_LOG");
        if !default_log {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            mnt: mnt.to_owned(),
            log,
            child: Some(child),
        };
        let start = Instant::now();
        // Mounted, and the control socket answers (CLI commands go through it).
        let sock = data.join("control.sock");
        while !d.log_text().contains("swarmfs: mounted") || !sock.exists() {
            if let Some(s) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({s}) before mounting: {}", d.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "mount timed out: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The HTTP server's base URL, `http://127.0.0.1:PORT`, once the daemon says it serves.
    pub fn http(&self) -> String {
        const SAYS: &str = "swarmfs: dashboard and gateway on ";
        let start = Instant::now();
        loop {
            let log = self.log_text();
            // Only a whole line: the daemon may be half way through writing it.
            let whole = log.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n'));
            if let Some(line) = whole.into_iter().find_map(|l| l.strip_prefix(SAYS)) {
                return line.trim_end_matches('/').to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no HTTP server: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` (e.g. "INT") and waits for the exit; returns its code.
    pub fn stop_with(&mut self, sig: &str) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code();
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.mnt).status();
                // Never a second panic while a failed test unwinds: that would abort the run.
                if !std::thread::panicking() {
                    panic!("daemon did not stop on SIG{sig}: {}", self.log_text());
                }
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: leaves the mount stale, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let code = self.stop_with("INT");
            if code != Some(0) && !std::thread::panicking() {
                panic!("daemon exited with {code:?} on SIGINT: {}", self.log_text());
            }
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.mnt).status();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Checks `cond` every 100 ms until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `getfattr --only-values -n user.swarmfs.hash PATH`
pub fn xattr_hash(path: &Path) -> String {
    let mut c = Command::new("getfattr");
    c.args(["--only-values", "-n", "user.swarmfs.hash"]).arg(path);
    ok(c)
}

/// `swarmfs --data-dir DATA add PATH`; returns the hash it printed.
pub fn add_file(data: &Path, path: &Path) -> String {
    let mut add = swarmfs(data, &["add"]);
    add.arg(path);
    ok(add)[..64].to_string()
}

/// b3sum of one file, the hex only.
pub fn b3(path: &Path) -> String {
    let mut c = Command::new("b3sum");
    c.arg("--no-names").arg(path);
    ok(c).trim().to_string()
}

/// Runs a shell command line; insists on success.
pub fn sh(script: &str) -> String {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script);
    ok(c)
}

/// A daemon (no mount) inside a network namespace, stopped when dropped; its log is kept
/// beside its data directory (`DATA.log`).
pub struct NsDaemon(pub std::process::Child);

impl NsDaemon {
    /// SIGKILL, as a crash or a pulled plug would end it.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-INT").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `swarmfs daemon` in namespace `ns`, listening on `ip` (port 0), with `extra` options.
pub fn ns_daemon(ns: &str, data: &Path, ip: &str, extra: &[&str]) -> NsDaemon {
    let _ = std::fs::remove_file(data.join("control.sock"));
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_swarmfs"))
        .arg("--data-dir")
        .arg(data)
        .args(["daemon", "--no-upnp", "--listen", &format!("/ip4/{ip}/tcp/0")])
        .args(extra)
        .env("RUST_LOG", std::env::var("NS_LOG").unwrap_or("swarmfs=debug".into()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(data.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data.join("control.sock").exists() {
        assert!(Instant::now() < deadline, "the daemon in {ns} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    NsDaemon(child)
}

/// `swarmfs status --json` of the daemon on `data`.
pub fn status(data: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(swarmfs(data, &["status", "--json"]))).unwrap()
}

/// A file of `mib` MiB of random bytes (from /dev/urandom).
pub fn random_file(path: &Path, mib: u64) {
    sh(&format!("head -c {mib}M /dev/urandom > {}", path.display()));
}
