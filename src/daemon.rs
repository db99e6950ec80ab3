//! The daemon: owns the store, the mount and the control socket, and shuts them down in order.
//!
//! Start-up: take the store (one daemon per data directory), clean up a stale mount that a
//! killed daemon left, mount, serve the control socket and HTTP (all on one `Api`).
//!
//! Shutdown, when the future given to `run_until` ends (`run`: SIGINT or SIGTERM): stop
//! serving HTTP and the control socket, unmount (lazily if a process still has a file open,
//! so the daemon never hangs on it), then flush the names and the store. A second SIGINT
//! exits at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fuser::{Config, MountOption};

use crate::api::{Api, NetCtx};
use crate::control;
use crate::fetch::{Fetcher, NetSource};
use crate::fs::{FsOptions, SwarmFs};
use crate::names::Names;
use crate::net::Net;
use crate::store::{self, Store};

/// How the daemon runs.
#[derive(Clone)]
pub struct DaemonOptions {
    /// Serve HTTP here (gateway, API, dashboard, metrics); `None`: no HTTP.
    pub http: Option<std::net::SocketAddr>,
    /// Runs the command lines the control socket receives (the CLI's `run_args`).
    pub control: control::Runner,
    pub data_dir: PathBuf,
    pub mount: Option<PathBuf>,
    pub cache_size: Option<u64>,
    pub lookup_timeout: Duration,
    pub read_timeout: Duration,
    pub passthrough: bool,
    /// Other users may use the mount (FUSE's allow_other); the kernel checks their access
    /// against each name's mode and owner.
    pub allow_other: bool,
    /// Tests only: a slower shutdown.
    pub shutdown_delay: Duration,
    pub net: crate::net::NetOptions,
}

/// What is at the mount point before we mount.
enum MountPoint {
    Ready,
    /// A FUSE mount whose daemon is gone: `stat` fails with ENOTCONN.
    Stale,
}

fn check_mount_point(dir: &Path) -> Result<MountPoint> {
    const ENOTCONN: i32 = 107;
    match std::fs::metadata(dir) {
        Err(e) if e.raw_os_error() == Some(ENOTCONN) => return Ok(MountPoint::Stale),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "mount point {} does not exist; create it first (mkdir -p {0})",
                dir.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot use mount point {}", dir.display())),
        Ok(m) if !m.is_dir() => bail!("mount point {} is not a directory", dir.display()),
        Ok(_) => {}
    }
    let Some(fstype) = mounted_at(dir)? else {
        return Ok(MountPoint::Ready);
    };
    // The kernel may answer `stat` of a dead FUSE mount's root from its cache; a lookup of a
    // name nobody has asked for must reach the daemon, and fails with ENOTCONN if it is gone.
    let probe = dir.join(format!(".swarmfs-probe-{}", std::process::id()));
    if fstype.starts_with("fuse") && std::fs::symlink_metadata(probe).is_err_and(|e| e.raw_os_error() == Some(ENOTCONN))
    {
        return Ok(MountPoint::Stale);
    }
    bail!(
        "{} is already a mount point ({fstype}); unmount it first or pick another directory",
        dir.display()
    )
}

/// The filesystem type mounted at `dir`, if something is.
fn mounted_at(dir: &Path) -> Result<Option<String>> {
    let dir = std::fs::canonicalize(dir)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        // Field 4 is the mount point (octal-escaped); the type follows the " - " separator.
        let Some(sep) = f.iter().position(|&x| x == "-") else {
            continue;
        };
        let point = unescape(f.get(4).copied().unwrap_or_default());
        if Path::new(&point) == dir {
            return Ok(Some(f.get(sep + 1).copied().unwrap_or("unknown").to_string()));
        }
    }
    Ok(None)
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts `dir` with fusermount3; `lazy` detaches even if files are open.
fn fusermount_u(dir: &Path, lazy: bool) -> bool {
    let mut c = Command::new("fusermount3");
    c.arg(if lazy { "-uz" } else { "-u" }).arg(dir);
    c.stderr(std::process::Stdio::null());
    c.status().is_ok_and(|s| s.success())
}

/// Runs the daemon in the foreground until SIGINT or SIGTERM; a second SIGINT during the
/// shutdown exits at once.
pub fn run(opts: DaemonOptions) -> Result<()> {
    run_until(opts, |_| async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("swarmfs: shutting down (Ctrl-C again to force)");
        drop(int);
        force_exit_on_sigint();
    })
}

/// Runs the daemon until `shutdown` ends, then stops it in order. `ready` gets the API once
/// everything is up (tests run a whole daemon in-process this way).
pub fn run_until<F, Fut>(opts: DaemonOptions, shutdown: F) -> Result<()>
where
    F: FnOnce(Arc<Api>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let store = Arc::new(Store::open(
        &opts.data_dir,
        store::Options {
            cache_size: opts.cache_size,
        },
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("swarmfs")
        .build()
        .context("cannot start the runtime")?;

    let (uid, gid) = crate::fs::own_ids();
    let names = Arc::new(Names::open(store.open_tree("names")?, uid, gid).context("cannot open the names table")?);
    let swept = names.sweep_unfinished().context("cannot sweep the names table")?;
    if swept > 0 {
        tracing::warn!(
            files = swept,
            "removed files that a killed daemon never finished writing"
        );
    }

    // Check the mount point before anything starts, so a mistake costs nothing.
    if let Some(dir) = &opts.mount {
        if let MountPoint::Stale = check_mount_point(dir)? {
            tracing::warn!(dir = %dir.display(), "cleaning up a stale mount left by a daemon that was killed");
            if !fusermount_u(dir, true) {
                bail!(
                    "{} is a stale mount and `fusermount3 -uz` could not remove it",
                    dir.display()
                );
            }
            check_mount_point(dir)?;
        }
    }
    let key = crate::net::load_identity(&opts.data_dir)?;
    let node = rt
        .block_on(Net::start(store.clone(), key, opts.net.clone()))
        .context("cannot start the node")?;
    let ctx = NetCtx {
        fetcher: Fetcher::new(node, store.clone()),
        mount: opts.mount.clone(),
        rt: rt.handle().clone(),
        lookup_timeout: opts.lookup_timeout,
        read_timeout: opts.read_timeout,
    };
    let mut session = None;
    let mut fs_state = None;
    if let Some(dir) = &opts.mount {
        let fs = SwarmFs::new(
            store.clone(),
            names.clone(),
            Arc::new(NetSource::new(
                ctx.fetcher.clone(),
                rt.handle().clone(),
                opts.read_timeout,
            )),
            rt.handle().clone(),
            FsOptions {
                lookup_timeout: opts.lookup_timeout,
                passthrough: opts.passthrough,
            },
        );
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("swarmfs".into()),
            MountOption::Subtype("swarmfs".into()),
            MountOption::DefaultPermissions,
            MountOption::CUSTOM("max_read=1048576".into()),
        ];
        if opts.allow_other {
            cfg.acl = fuser::SessionACL::All;
        }
        cfg.n_threads = Some(2);
        fs_state = Some(fs.inner());
        let s = fuser::Session::new(fs, dir, &cfg)
            .and_then(|s| s.spawn())
            .with_context(|| format!("cannot mount {}", dir.display()))?;
        session = Some(s);
        raise_readahead(dir);
        eprintln!(
            "swarmfs: mounted {} (data in {}); Ctrl-C to unmount",
            dir.display(),
            opts.data_dir.display()
        );
    }
    let info = rt.block_on(ctx.fetcher.net().info());
    eprintln!("swarmfs: peer id {}", info.peer_id);
    let fetcher = ctx.fetcher.clone();
    let api = Api::new(store.clone(), Some(ctx));
    let control =
        control::Server::start(api.clone(), opts.control.clone()).context("cannot serve the control socket")?;
    let http = match opts.http {
        None => None,
        Some(addr) => match rt.block_on(crate::http::start(api.clone(), addr)) {
            Ok(s) => {
                eprintln!("swarmfs: dashboard and gateway on http://{}/", s.addr);
                api.set_http(Some(s.addr.to_string()));
                Some(s)
            }
            // A port in use is no reason to leave the files unshared.
            Err(e) => {
                tracing::warn!("not serving HTTP on {addr}: {e:#} (choose another with --http ADDR, or --no-http)");
                None
            }
        },
    };

    rt.block_on(shutdown(api.clone()));
    tracing::info!("shutting down");
    let stopping = std::time::Instant::now();
    // Lookups and reads waiting on the network give up now, so the unmount is not held up.
    fetcher.stop();
    std::thread::sleep(opts.shutdown_delay);

    drop(http);
    drop(control);
    tracing::debug!(ms = stopping.elapsed().as_millis(), "control socket closed");
    // Files still open for writing are committed as they stand: a clean stop loses nothing.
    if let Some(fs) = &fs_state {
        let n = fs.commit_all_open();
        if n > 0 {
            tracing::info!(files = n, "committed files that were open at shutdown");
        }
    }
    tracing::debug!(ms = stopping.elapsed().as_millis(), "open files committed");
    if let (Some(s), Some(dir)) = (session, &opts.mount) {
        // Unmount and wait for the FUSE threads, but never for long: a reader stuck on a
        // file (or a request still in flight) must not keep the daemon from stopping.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(s.umount_and_join());
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!("unmount: {e}; detaching lazily");
                fusermount_u(dir, true);
            }
            Err(_) => {
                tracing::warn!("unmount is taking too long; detaching lazily");
                fusermount_u(dir, true);
            }
        }
    }
    tracing::debug!(ms = stopping.elapsed().as_millis(), "unmounted");
    names.flush().context("cannot flush the names table")?;
    store.flush()?;
    tracing::debug!(ms = stopping.elapsed().as_millis(), "flushed");
    rt.shutdown_timeout(Duration::from_secs(2));
    tracing::info!(ms = stopping.elapsed().as_millis(), "stopped");
    eprintln!("swarmfs: stopped");
    Ok(())
}

/// A second Ctrl-C means "now", at any point of the shutdown, even once the runtime (and its
/// signal handling) is gone: a plain handler that writes one line and exits with 130.
fn force_exit_on_sigint() {
    extern "C" fn now(_: libc::c_int) {
        const MSG: &[u8] = b"swarmfs: forced exit\n";
        // Only async-signal-safe calls here.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(130);
        }
    }
    let handler: extern "C" fn(libc::c_int) = now;
    // SAFETY: the handler makes only async-signal-safe calls.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

/// The kernel caps FUSE read-ahead at 128 KiB at init; as root we can raise the mount's own
/// limit to 1 MiB through sysfs. Best effort: without it reads are just smaller.
fn raise_readahead(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(dir) else {
        return;
    };
    let dev = m.dev();
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&path, "1024") {
        Ok(()) => tracing::info!("read-ahead raised to 1 MiB ({path})"),
        Err(e) => tracing::info!("read-ahead stays at the kernel's default ({path}: {e})"),
    }
}
