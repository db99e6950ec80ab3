//! The control socket: while a daemon runs, CLI commands run inside it.
//!
//! `DATA_DIR/control.sock`, mode 0600. The client sends one line of JSON, a request:
//!
//! - `{"kind": "call", "call": {...}}`: a typed `api::Call` (status, peers, blobs, providers,
//!   pin, unpin, gc, verify, connect). The answer is one frame, tag 5, the JSON of
//!   `Result<api::Reply, api::ApiError>`; the client renders it.
//! - `{"kind": "run", "args": [[bytes], ...]}`: a command that streams (add, cat, get, ls of a
//!   folder, share, open), as its command line, each argument as bytes (paths made absolute;
//!   a name need not be UTF-8). The daemon runs it on its `Api` with the same code the offline
//!   CLI runs (the runner it was given: this module knows nothing of the command line) and
//!   streams back frames, `[tag: u8][len: u32 LE][bytes]`:
//!
//! - tag 1: bytes for stdout
//! - tag 2: bytes for stderr
//! - tag 3: the exit code (one byte); the last frame
//! - tag 4: progress, a JSON `api::Progress` (only to a client whose stderr is a terminal)
//!
//! So output, errors and exit codes are exactly those of the offline CLI.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use serde::{Deserialize, Serialize};

use crate::api::{Api, ApiError, Call, Progress, Reply};

const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const EXIT: u8 = 3;
const PROGRESS: u8 = 4;
const REPLY: u8 = 5;
/// Largest request line accepted.
const MAX_REQUEST: u64 = 1 << 20;

/// A request: a typed call, or a command line to run (each argument as bytes).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Request {
    Call { call: Call },
    Run { args: Vec<Vec<u8>> },
}

/// Runs a command line on the API, writing to stdout and stderr; returns the exit code.
pub type Runner = Arc<
    dyn Fn(&Api, Vec<OsString>, &mut (dyn Write + Send), &mut dyn Write, &mut dyn FnMut(&Progress)) -> u8 + Send + Sync,
>;

/// The socket's path in a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Writes one stream of frames.
struct FrameWriter {
    stream: UnixStream,
    tag: u8,
}

impl Write for FrameWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(u32::MAX as usize);
        let mut head = [0u8; 5];
        head[0] = self.tag;
        head[1..].copy_from_slice(&(n as u32).to_le_bytes());
        self.stream.write_all(&head)?;
        self.stream.write_all(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Serves the socket until the listener is closed; one thread per connection.
pub struct Server {
    path: PathBuf,
    /// Set when the server is dropped; the accepting thread then ends (and lets go of the API,
    /// and so of the store).
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Disconnected when the accepting thread has let go of the API.
    ended: std::sync::mpsc::Receiver<()>,
}

impl Server {
    /// Binds `DATA_DIR/control.sock` (replacing a stale one: the caller holds the store lock,
    /// so no live daemon owns it) and starts running requests on `api` with `run`.
    pub fn start(api: Arc<Api>, run: Runner) -> io::Result<Server> {
        let path = socket_path(api.store().dir());
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let (end, ended) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("control".into()).spawn(move || {
            // Dropped when this thread ends, after `api` (a later local, dropped first): the
            // server's drop waits for that.
            let _end = end;
            let api = api;
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                match conn {
                    Ok(conn) => {
                        let (api, run) = (api.clone(), run.clone());
                        let _ = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || serve(conn, &api, &run));
                    }
                    Err(e) => tracing::warn!("control socket: {e}"),
                }
            }
        })?;
        Ok(Server { path, stop, ended })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accepting thread, which sees the flag and ends.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
        // Wait (not for ever) until it has let go of the API, so that a daemon that returned
        // has let go of its store: another can open the data directory at once.
        let waited = self.ended.recv_timeout(std::time::Duration::from_secs(2));
        if waited == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            tracing::warn!("the control socket's thread did not end within 2 s");
        }
    }
}

fn serve(conn: UnixStream, api: &Api, run: &Runner) {
    let res = (|| -> io::Result<()> {
        let mut line = String::new();
        BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line)?;
        let args = match serde_json::from_str(&line).map_err(io::Error::other)? {
            Request::Call { call } => {
                let reply: Result<Reply, ApiError> = api.call(call);
                let body = serde_json::to_vec(&reply).map_err(io::Error::other)?;
                let mut w = FrameWriter {
                    stream: conn.try_clone()?,
                    tag: REPLY,
                };
                return w.write_all(&body);
            }
            Request::Run { args } => args,
        };
        let mut out = FrameWriter {
            stream: conn.try_clone()?,
            tag: STDOUT,
        };
        let mut err = FrameWriter {
            stream: conn.try_clone()?,
            tag: STDERR,
        };
        let args = args.into_iter().map(OsString::from_vec).collect();
        let mut bar = FrameWriter {
            stream: conn.try_clone()?,
            tag: PROGRESS,
        };
        let mut progress = |p: &Progress| {
            if let Ok(j) = serde_json::to_vec(p) {
                let _ = bar.write(&j);
            }
        };
        let code = run(api, args, &mut out, &mut err, &mut progress);
        out.flush()?;
        let mut s = conn;
        s.write_all(&[EXIT, 1, 0, 0, 0, code])?;
        Ok(())
    })();
    if let Err(e) = res {
        tracing::debug!("control connection ended: {e}");
    }
}

/// A connection to the daemon's control socket; `None` when no daemon listens.
fn connect(data_dir: &Path) -> io::Result<Option<UnixStream>> {
    match UnixStream::connect(socket_path(data_dir)) {
        Ok(c) => Ok(Some(c)),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sends a typed call to the daemon that serves `data_dir` and returns its reply; `None`
/// when no daemon answers.
pub fn call(data_dir: &Path, call: &Call) -> io::Result<Option<Result<Reply, ApiError>>> {
    let Some(conn) = connect(data_dir)? else {
        return Ok(None);
    };
    let mut line = serde_json::to_string(&Request::Call { call: call.clone() }).map_err(io::Error::other)?;
    line.push('\n');
    (&conn).write_all(line.as_bytes())?;
    let mut r = BufReader::new(&conn);
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the daemon closed the control connection without a reply ({e})"),
        )
    })?;
    if head[0] != REPLY {
        return Err(io::Error::other(format!(
            "unexpected frame {} from the daemon",
            head[0]
        )));
    }
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(serde_json::from_slice(&body).map_err(io::Error::other)?))
}

/// Runs `args` in the daemon that serves `data_dir`, relaying its output. Returns `None` when
/// no daemon answers, so the caller opens the store itself.
pub fn forward(data_dir: &Path, args: Vec<OsString>, progress: &mut dyn FnMut(&Progress)) -> io::Result<Option<u8>> {
    let Some(conn) = connect(data_dir)? else {
        return Ok(None);
    };
    let mut w = &conn;
    let args = args.iter().map(|a| a.as_bytes().to_vec()).collect();
    let mut line = serde_json::to_string(&Request::Run { args }).map_err(io::Error::other)?;
    line.push('\n');
    w.write_all(line.as_bytes())?;
    let mut r = BufReader::with_capacity(1 << 20, &conn);
    let mut stdout = io::stdout().lock();
    let mut buf = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if let Err(e) = r.read_exact(&mut head) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Err(io::Error::other(
                    "the daemon closed the control connection without an exit code",
                ));
            }
            return Err(e);
        }
        let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        buf.resize(len, 0);
        r.read_exact(&mut buf)?;
        match head[0] {
            STDOUT => {
                if let Err(e) = stdout.write_all(&buf) {
                    // `swarmfs cat H | head`: stop quietly, as the offline CLI does.
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        return Ok(Some(0));
                    }
                    return Err(e);
                }
            }
            STDERR => {
                stdout.flush()?;
                io::stderr().write_all(&buf)?;
            }
            PROGRESS => {
                if let Ok(p) = serde_json::from_slice::<Progress>(&buf) {
                    progress(&p);
                }
            }
            EXIT => {
                stdout.flush()?;
                return Ok(Some(buf.first().copied().unwrap_or(1)));
            }
            t => return Err(io::Error::other(format!("unknown frame {t} from the daemon"))),
        }
    }
}
