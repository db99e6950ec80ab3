//! Helpers shared by the integration tests: data, temp stores, and running the real binary
//! with a timeout.

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
pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
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
pub fn run(cmd: Command) -> Output {
    run_with_timeout(cmd, Duration::from_secs(60))
}

/// Runs and insists on success; returns stdout as text.
pub fn ok(cmd: Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{desc} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and insists on failure; returns stderr as text.
pub fn fails(cmd: Command) -> String {
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
