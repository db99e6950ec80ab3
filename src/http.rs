//! The HTTP server: the gateway (`/blob/HASH`, with ranges, and folder paths), the JSON API
//! on [`Api`] (`/api/...`), the live event stream (`/api/events`, server-sent events), the
//! dashboard (`/`, built into the binary), `/metrics` and `/health`. See `docs/http.md`.
//!
//! Bound to loopback by default. On any other address, everything but `GET /blob` needs the
//! token in `DATA_DIR/api.token`. On loopback, requests must name a loopback host (no DNS
//! rebinding) and a browser's cross-site POST is refused (no CSRF from other pages).

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, BoxStream, StreamExt};
use serde::Deserialize;

use crate::api::{Api, ApiError, ApiResult, ErrorKind, Event};
use crate::folder_io::Resolved;
use crate::hash::Hash;
use crate::tree::{Tree, GROUP_SIZE};

/// The dashboard: one page, no outside assets.
const DASHBOARD: &str = include_str!("dashboard.html");
/// Bytes per body chunk of a blob.
const CHUNK: u64 = 1 << 20;
/// How far ahead of a remote blob's stream groups are fetched.
const AHEAD: u64 = 8 << 20;
/// Most ranges in one request.
const MAX_RANGES: usize = 32;
/// Bytes sniffed for the content type.
const SNIFF: usize = 512;

/// A running server; stops when dropped.
pub struct Server {
    /// The address it listens on (the port chosen, for port 0).
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[derive(Clone)]
struct Gw {
    api: Arc<Api>,
    token: Arc<String>,
    /// Bound to loopback: no token needed, but the Host must be a loopback name.
    loopback: bool,
}

/// The API token in `DATA_DIR/api.token` (mode 0600), made on first use.
pub fn token(dir: &Path) -> io::Result<String> {
    let path = dir.join("api.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let t: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join("api.token.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    io::Write::write_all(&mut f, format!("{t}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(t)
}

/// Binds `addr` and serves `api` until the returned `Server` is dropped.
pub async fn start(api: Arc<Api>, addr: SocketAddr) -> anyhow::Result<Server> {
    let token = token(api.store().dir())?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let gw = Gw {
        api,
        token: Arc::new(token),
        loopback: addr.ip().is_loopback(),
    };
    let app = router(gw);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let stop = async move {
            let _ = rx.await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!("HTTP server: {e}");
        }
    });
    Ok(Server { addr, stop: Some(tx) })
}

fn router(gw: Gw) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/blob/{hash}", get(blob))
        .route("/blob/{hash}/", get(blob_path))
        .route("/blob/{hash}/{*path}", get(blob_path))
        .route("/api/status", get(status))
        .route("/api/peers", get(peers))
        .route("/api/blobs", get(blobs))
        .route("/api/blobs/{hash}", get(blob_info))
        .route("/api/transfers", get(transfers))
        .route("/api/providers/{target}", get(providers))
        .route("/api/add", post(add))
        .route("/api/open", post(open))
        .route("/api/pin/{hash}", post(pin))
        .route("/api/unpin/{hash}", post(unpin))
        .route("/api/gc", post(gc))
        .route("/api/events", get(events))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(gw.clone(), guard))
        .with_state(gw)
}

/// An API error as a response: its status and `{"kind", "message"}`.
struct Fail(ApiError);

impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Fail {
        Fail(e)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!("HTTP {status}: {}", self.0.message);
        }
        let mut r = (status, Json(self.0)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

type Answer<T> = Result<T, Fail>;

/// Runs a blocking API call off the runtime's threads.
async fn blocking<T: Send + 'static>(gw: &Gw, f: impl FnOnce(&Api) -> ApiResult<T> + Send + 'static) -> Answer<T> {
    let api = gw.api.clone();
    Ok(tokio::task::spawn_blocking(move || f(&api))
        .await
        .map_err(|e| ApiError::internal(format!("the request's task failed: {e}")))??)
}

async fn not_found() -> Fail {
    Fail(ApiError::not_found(
        "no such page; see /api/status, /blob/HASH, /metrics",
    ))
}

fn equal(a: &[u8], b: &[u8]) -> bool {
    // Constant time for equal lengths: a guess learns nothing from the timing.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request carries: `Authorization: Bearer T`, or `?token=T` (for a page or an
/// event stream, which cannot set headers).
fn token_of(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token=").map(str::to_string))
}

/// A loopback host name, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    matches!(name, "localhost" | "::1") || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

async fn guard(State(gw): State<Gw>, req: Request, next: Next) -> Response {
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let public = read && req.uri().path().starts_with("/blob/");
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    if gw.loopback {
        // A page from elsewhere whose name resolves to 127.0.0.1 (DNS rebinding) names its
        // own host; a cross-site form or fetch carries its own origin.
        if !loopback_host(&host) {
            return Fail(ApiError::new(
                ErrorKind::Unauthorized,
                format!("host {host:?} is not a loopback name; use http://127.0.0.1 or http://localhost"),
            ))
            .into_response();
        }
        if !read {
            if let Some(origin) = req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
                if origin != format!("http://{host}") {
                    return Fail(ApiError::new(
                        ErrorKind::Unauthorized,
                        format!("a request from {origin} may not change this node"),
                    ))
                    .into_response();
                }
            }
        }
    } else if !public {
        match token_of(&req) {
            Some(t) if equal(t.as_bytes(), gw.token.as_bytes()) => {}
            Some(_) => {
                return Fail(ApiError::new(ErrorKind::Unauthorized, "wrong API token")).into_response();
            }
            None => {
                return Fail(ApiError::new(
                    ErrorKind::Unauthorized,
                    "this needs the API token in DATA_DIR/api.token: send `Authorization: Bearer TOKEN` or add ?token=TOKEN",
                ))
                .into_response();
            }
        }
    }
    next.run(req).await
}

async fn dashboard() -> Response {
    let mut r = Html(DASHBOARD).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn health(State(gw): State<Gw>) -> Response {
    let store_ok = gw.api.store().info(&Hash::EMPTY).is_ok();
    let node_ok = match gw.api.net() {
        Some(n) => tokio::time::timeout(Duration::from_secs(2), n.fetcher.net().info())
            .await
            .is_ok(),
        None => true,
    };
    if store_ok && node_ok {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let why = if store_ok {
            "the node does not answer\n"
        } else {
            "the store does not answer\n"
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn metrics(State(gw): State<Gw>) -> Answer<Response> {
    let text = blocking(&gw, |api| {
        let n = api.node()?;
        let m = &n.fetcher.net().metrics;
        let blobs = api.store().list()?.len();
        let peers = n.rt.block_on(n.fetcher.net().connected()).len();
        m.set_state(
            api.store().used(),
            api.store().cache_size(),
            blobs,
            n.fetcher.active(),
            peers,
        );
        Ok(m.encode())
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

fn parse_hash(s: &str) -> Result<Hash, Fail> {
    Ok(s.parse::<Hash>().map_err(ApiError::from)?)
}

async fn status(State(gw): State<Gw>) -> Answer<Response> {
    Ok(Json(blocking(&gw, |a| a.status()).await?).into_response())
}

async fn peers(State(gw): State<Gw>) -> Answer<Response> {
    Ok(Json(blocking(&gw, |a| a.peers()).await?).into_response())
}

async fn blobs(State(gw): State<Gw>) -> Answer<Response> {
    Ok(Json(blocking(&gw, |a| a.blobs()).await?).into_response())
}

async fn blob_info(State(gw): State<Gw>, UrlPath(h): UrlPath<String>) -> Answer<Response> {
    let h = parse_hash(&h)?;
    Ok(Json(blocking(&gw, move |a| a.blob(&h)).await?).into_response())
}

async fn transfers(State(gw): State<Gw>) -> Answer<Response> {
    Ok(Json(blocking(&gw, |a| a.transfers()).await?).into_response())
}

async fn providers(State(gw): State<Gw>, UrlPath(t): UrlPath<String>) -> Answer<Response> {
    Ok(Json(blocking(&gw, move |a| a.providers(&t)).await?).into_response())
}

async fn pin(State(gw): State<Gw>, UrlPath(h): UrlPath<String>) -> Answer<Response> {
    let h = parse_hash(&h)?;
    blocking(&gw, move |a| {
        // Only what is held can be pinned.
        a.blob(&h)?;
        a.pin(&[h])
    })
    .await?;
    Ok(Json(serde_json::json!({ "hash": h, "pinned": true })).into_response())
}

async fn unpin(State(gw): State<Gw>, UrlPath(h): UrlPath<String>) -> Answer<Response> {
    let h = parse_hash(&h)?;
    let done = blocking(&gw, move |a| {
        a.blob(&h)?;
        a.unpin(&[h])
    })
    .await?;
    Ok(Json(done).into_response())
}

/// `POST /api/open`, the body a hash or a ticket: dials the ticket's peers, finds the blob.
async fn open(State(gw): State<Gw>, body: String) -> Answer<Response> {
    let (h, size) = blocking(&gw, move |a| a.open(&body)).await?;
    Ok(Json(serde_json::json!({ "hash": h, "size": size })).into_response())
}

async fn gc(State(gw): State<Gw>) -> Answer<Response> {
    Ok(Json(blocking(&gw, |a| a.gc()).await?).into_response())
}

#[derive(Deserialize)]
struct AddQuery {
    name: Option<String>,
}

/// `POST /api/add?name=NAME`: the body is the file; it is hashed and stored as it arrives.
async fn add(State(gw): State<Gw>, Query(q): Query<AddQuery>, body: Body) -> Answer<Response> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(8);
    let name = q.name.unwrap_or_else(|| "upload".into());
    let task = blocking(&gw, move |a| {
        let r = ChannelRead { rx, buf: Bytes::new() };
        a.add_reader(r, Path::new(&name))
    });
    let feed = async move {
        let mut s = body.into_data_stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| io::Error::other(format!("the upload broke off: {e}")));
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
    };
    let (added, ()) = tokio::join!(task, feed);
    Ok(Json(added?).into_response())
}

/// The body of an upload, read on a blocking thread.
struct ChannelRead {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, io::Error>>,
    buf: Bytes,
}

impl Read for ChannelRead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

/// `GET /api/events`: server-sent events, each a JSON `Event` (`blob`, `peer`, `transfers`).
async fn events(State(gw): State<Gw>) -> Response {
    struct St {
        gw: Gw,
        rx: tokio::sync::broadcast::Receiver<Event>,
        tick: tokio::time::Interval,
        peers: Option<HashSet<String>>,
        moving: bool,
        pending: VecDeque<Event>,
    }
    let st = St {
        rx: gw.api.subscribe(),
        tick: tokio::time::interval(Duration::from_secs(1)),
        gw,
        peers: None,
        moving: false,
        pending: VecDeque::new(),
    };
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                let name = match &e {
                    Event::Blob { .. } => "blob",
                    Event::Peer { .. } => "peer",
                    Event::Transfers { .. } => "transfers",
                };
                let ev = SseEvent::default()
                    .event(name)
                    .json_data(&e)
                    .unwrap_or_else(|_| SseEvent::default().comment("unencodable"));
                return Some((Ok(ev), st));
            }
            tokio::select! {
                r = st.rx.recv() => match r {
                    Ok(e) => st.pending.push_back(e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
                _ = st.tick.tick() => {
                    let now = blocking(&st.gw, |a| Ok((a.peers()?, a.transfers()?))).await;
                    let Ok((peers, transfers)) = now else { continue };
                    let ids: HashSet<String> = peers.into_iter().map(|p| p.peer).collect();
                    if let Some(before) = &st.peers {
                        for p in ids.difference(before) {
                            st.pending.push_back(Event::Peer { peer: p.clone(), connected: true });
                        }
                        for p in before.difference(&ids) {
                            st.pending.push_back(Event::Peer { peer: p.clone(), connected: false });
                        }
                    }
                    st.peers = Some(ids);
                    // Every second while something moves, and once when it stops.
                    let moving = !transfers.is_empty();
                    if moving || st.moving {
                        st.pending.push_back(Event::Transfers { transfers });
                    }
                    st.moving = moving;
                }
            }
        }
    });
    let s: BoxStream<'static, Result<SseEvent, Infallible>> = s.boxed();
    Sse::new(s).keep_alive(KeepAlive::default()).into_response()
}

#[derive(Deserialize, Default)]
struct BlobQuery {
    filename: Option<String>,
    /// `raw`: a folder's manifest as bytes, not its listing.
    format: Option<String>,
}

async fn blob(
    State(gw): State<Gw>,
    UrlPath(h): UrlPath<String>,
    Query(q): Query<BlobQuery>,
    method: Method,
    headers: HeaderMap,
) -> Answer<Response> {
    let h = parse_hash(&h)?;
    let size = gw.api.size(h).await?;
    let mut head = None;
    if q.format.as_deref() != Some("raw") && size <= crate::folder::PART_BYTES as u64 {
        let first = head_bytes(&gw, h, size).await?;
        if crate::folder::looks_like_manifest(&first) {
            let to = format!("/blob/{h}/");
            return Ok((StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, to)]).into_response());
        }
        head = Some(first);
    }
    serve_blob(&gw, h, size, head, q.filename.as_deref(), &method, &headers).await
}

/// `/blob/FOLDER/` and `/blob/FOLDER/a/b`: one handler for both routes. The path is taken
/// from the URI as it came and decoded to bytes here, as names in a folder need not be UTF-8
/// (axum's `Path` refuses those).
async fn blob_path(
    State(gw): State<Gw>,
    uri: axum::http::Uri,
    Query(q): Query<BlobQuery>,
    method: Method,
    headers: HeaderMap,
) -> Answer<Response> {
    let rest = uri.path().strip_prefix("/blob/").unwrap_or_default();
    let (h, raw) = rest.split_once('/').unwrap_or((rest, ""));
    in_folder(gw, h.to_string(), raw.to_string(), q, method, headers).await
}

/// `/blob/FOLDER/a/b`: a file in a folder (served as a blob), or a folder's HTML listing.
/// `raw` is the path after the folder's hash, still percent-encoded.
async fn in_folder(
    gw: Gw,
    h: String,
    raw: String,
    q: BlobQuery,
    method: Method,
    headers: HeaderMap,
) -> Answer<Response> {
    let root = parse_hash(&h)?;
    let names: Vec<Vec<u8>> = raw
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_encoding::percent_decode_str(s).collect())
        .collect();
    if names.iter().any(|n| n == b"." || n == b"..") {
        return Err(ApiError::bad("a path in a folder has no '.' or '..'").into());
    }
    // For messages, titles and the file's name: the path as text (lossy where not UTF-8).
    let path = names
        .iter()
        .map(|n| String::from_utf8_lossy(n))
        .collect::<Vec<_>>()
        .join("/");
    let found = blocking(&gw, move |a| {
        let parts: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        Ok(crate::folder_io::resolve(a.store(), a.net(), root, &parts)?)
    })
    .await?;
    match found {
        None => Err(ApiError::not_found(format!("folder {root} has no file or folder {path:?}")).into()),
        Some(Resolved::File(e)) => {
            let size = gw.api.size(e.hash).await?;
            if size != e.size {
                return Err(ApiError::internal(format!(
                    "{path:?}: its folder says {} bytes, the blob has {size}",
                    e.size
                ))
                .into());
            }
            let name = q
                .filename
                .clone()
                .or_else(|| path.rsplit('/').next().map(str::to_string));
            serve_blob(&gw, e.hash, size, None, name.as_deref(), &method, &headers).await
        }
        Some(Resolved::Folder(_, entries)) => {
            // A folder's relative links need its URL to end in '/'.
            if !raw.is_empty() && !raw.ends_with('/') {
                let to = format!("/blob/{root}/{raw}/");
                return Ok((StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, to)]).into_response());
            }
            Ok(Html(listing(root, &path, &entries)).into_response())
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Percent-encodes a path segment: all but letters, digits and `-._~`.
fn encode_segment(s: &[u8]) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::percent_encode(s, SEGMENT).to_string()
}

/// A folder's HTML listing.
fn listing(root: Hash, path: &str, entries: &[crate::folder::Entry]) -> String {
    use crate::folder::EntryKind;
    let title = escape(&format!("{root}/{path}"));
    let mut rows = String::new();
    if !path.is_empty() {
        rows.push_str("<tr><td><a href=\"../\">../</a></td><td></td><td></td></tr>\n");
    }
    for e in entries {
        let name = String::from_utf8_lossy(&e.name);
        let link = encode_segment(&e.name);
        let row = match e.kind {
            EntryKind::Folder => format!(
                "<tr><td><a href=\"{link}/\">{}/</a></td><td>{}</td><td><code>{}</code></td></tr>\n",
                escape(&name),
                crate::api::human(e.size),
                e.hash
            ),
            EntryKind::File => format!(
                "<tr><td><a href=\"{link}\">{}</a></td><td>{}</td><td><code>{}</code></td></tr>\n",
                escape(&name),
                crate::api::human(e.size),
                e.hash
            ),
            EntryKind::Symlink => format!(
                "<tr><td>{} &rarr; {}</td><td></td><td></td></tr>\n",
                escape(&name),
                escape(&String::from_utf8_lossy(&e.target))
            ),
        };
        rows.push_str(&row);
    }
    format!(
        "<!doctype html><meta charset=utf-8><title>{title}</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em}}td{{padding:2px 12px}}code{{color:#777;font-size:11px}}</style>\
         <h1>{title}</h1><table>\n{rows}</table>"
    )
}

/// The first bytes of blob `h` (for sniffing), fetched if need be.
async fn head_bytes(gw: &Gw, h: Hash, size: u64) -> Answer<Vec<u8>> {
    let n = (SNIFF as u64).min(size);
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(read_range(gw.api.clone(), h, size, 0..n).await?)
}

/// Makes the groups under `bytes` present, then reads them, verified.
async fn read_range(api: Arc<Api>, h: Hash, size: u64, bytes: Range<u64>) -> ApiResult<Vec<u8>> {
    let tree = Tree::new(size);
    let groups = tree.groups_for_bytes(bytes.clone());
    if !api.store().missing(&h, groups.clone()).is_ok_and(|m| m.is_empty()) {
        let ahead = groups.end..(groups.end + AHEAD / GROUP_SIZE).min(tree.groups());
        api.ensure(h, groups, ahead).await?;
    }
    tokio::task::spawn_blocking(move || {
        // A file that verified whole in this daemon's life and has not changed since is read
        // as it is, by the rule FUSE passthrough follows (`store/trust.rs`); any other is read
        // group by group, verified.
        if let Some(path) = api.store().passthrough_file(&h) {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; (bytes.end - bytes.start) as usize];
            let f = std::fs::File::open(&path)?;
            f.read_exact_at(&mut buf, bytes.start)?;
            return Ok(buf);
        }
        let mut r = api.store().reader(&h)?;
        Ok(r.read_at(bytes.start, (bytes.end - bytes.start) as usize)?)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// The bytes of `range`, a chunk at a time, each verified before it is sent: a chunk that
/// cannot be had (or fails verification) ends the stream with an error, which aborts the
/// response. The first chunk is one group, and each next one twice the last, up to `CHUNK`:
/// the first byte goes out as soon as its group verified.
fn body_of(api: Arc<Api>, h: Hash, size: u64, range: Range<u64>) -> BoxStream<'static, Result<Bytes, io::Error>> {
    stream::try_unfold((range.start, GROUP_SIZE), move |(off, step)| {
        let api = api.clone();
        let end = range.end;
        async move {
            if off >= end {
                return Ok(None);
            }
            // Aligned to `step`, so that chunks after the first fall on group boundaries.
            let to = ((off / step + 1) * step).min(end);
            match read_range(api, h, size, off..to).await {
                Ok(data) => Ok(Some((Bytes::from(data), (to, (step * 2).min(CHUNK))))),
                Err(e) => {
                    tracing::warn!(hash = %h, "HTTP: ending the response at byte {off}: {}", e.message);
                    Err(io::Error::other(e.message))
                }
            }
        }
    })
    .boxed()
}

/// Parses a `Range` header against `size`: `None` to serve the whole blob (no header, or
/// one this server ignores, as RFC 9110 allows), `Err` when nothing in it can be served.
fn parse_ranges(v: &str, size: u64) -> Result<Option<Vec<Range<u64>>>, ()> {
    let Some(specs) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    let mut out = Vec::new();
    let mut count = 0;
    for spec in specs.split(',') {
        count += 1;
        if count > MAX_RANGES {
            return Err(());
        }
        let spec = spec.trim();
        let Some((a, b)) = spec.split_once('-') else {
            return Ok(None);
        };
        let r = if a.is_empty() {
            let Ok(n) = b.parse::<u64>() else { return Ok(None) };
            if n == 0 {
                continue;
            }
            size.saturating_sub(n)..size
        } else {
            let Ok(start) = a.parse::<u64>() else { return Ok(None) };
            let end = if b.is_empty() {
                size
            } else {
                let Ok(last) = b.parse::<u64>() else { return Ok(None) };
                if last < start {
                    return Ok(None);
                }
                last.saturating_add(1).min(size)
            };
            if start >= size {
                continue;
            }
            start..end
        };
        if r.start < r.end {
            out.push(r);
        }
    }
    if out.is_empty() {
        return Err(());
    }
    Ok(Some(out))
}

/// A blob as an HTTP response: 200, 206 (one range, or several as multipart/byteranges),
/// 304 or 416; `HEAD` without a body. `head`: its first bytes, if the caller read them.
async fn serve_blob(
    gw: &Gw,
    h: Hash,
    size: u64,
    head: Option<Vec<u8>>,
    filename: Option<&str>,
    method: &Method,
    headers: &HeaderMap,
) -> Answer<Response> {
    let etag = format!("\"{h}\"");
    let mut common = HeaderMap::new();
    let hv = |s: &str| HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    common.insert(header::ETAG, hv(&etag));
    common.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    common.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    common.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    if let Some(inm) = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        if inm.split(',').any(|t| t.trim() == etag || t.trim() == "*") {
            return Ok((StatusCode::NOT_MODIFIED, common).into_response());
        }
    }
    let head = match head {
        Some(b) => b,
        None => head_bytes(gw, h, size).await?,
    };
    let ctype = content_type(&head, filename);
    // A blob is anyone's content: a page (HTML, SVG, XML) runs in a sandbox, never as this
    // origin (whose API it could otherwise call). Other types are shown as what they are
    // (nosniff), so a PDF or a video still opens in the browser's own viewer.
    if ["html", "svg", "xml"].iter().any(|t| ctype.contains(t)) {
        common.insert("content-security-policy", HeaderValue::from_static("sandbox"));
    }
    if let Some(name) = filename {
        common.insert(header::CONTENT_DISPOSITION, hv(&disposition(name)));
    }
    let ranges = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(v) => match parse_ranges(v, size) {
            Ok(r) => r,
            Err(()) => {
                common.insert(header::CONTENT_RANGE, hv(&format!("bytes */{size}")));
                return Ok((StatusCode::RANGE_NOT_SATISFIABLE, common).into_response());
            }
        },
    };
    let head_only = method == Method::HEAD;
    let api = gw.api.clone();
    let (status, len, body) = match ranges.as_deref() {
        None => (StatusCode::OK, size, body_of(api, h, size, 0..size)),
        Some([r]) => {
            common.insert(
                header::CONTENT_RANGE,
                hv(&format!("bytes {}-{}/{size}", r.start, r.end - 1)),
            );
            (
                StatusCode::PARTIAL_CONTENT,
                r.end - r.start,
                body_of(api, h, size, r.clone()),
            )
        }
        Some(rs) => {
            let boundary = format!("swarmfs-{}", &h.to_string()[..16]);
            let mut parts: Vec<BoxStream<'static, Result<Bytes, io::Error>>> = Vec::new();
            let mut len = 0;
            for r in rs {
                let part_head = format!(
                    "\r\n--{boundary}\r\nContent-Type: {ctype}\r\nContent-Range: bytes {}-{}/{size}\r\n\r\n",
                    r.start,
                    r.end - 1
                );
                len += part_head.len() as u64 + (r.end - r.start);
                parts.push(stream::once(async move { Ok(Bytes::from(part_head)) }).boxed());
                parts.push(body_of(api.clone(), h, size, r.clone()));
            }
            let tail = format!("\r\n--{boundary}--\r\n");
            len += tail.len() as u64;
            parts.push(stream::once(async move { Ok(Bytes::from(tail)) }).boxed());
            common.insert(
                header::CONTENT_TYPE,
                hv(&format!("multipart/byteranges; boundary={boundary}")),
            );
            (StatusCode::PARTIAL_CONTENT, len, stream::iter(parts).flatten().boxed())
        }
    };
    if !common.contains_key(header::CONTENT_TYPE) {
        common.insert(header::CONTENT_TYPE, hv(ctype));
    }
    common.insert(header::CONTENT_LENGTH, hv(&len.to_string()));
    let body = if head_only {
        Body::empty()
    } else {
        Body::from_stream(body)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().extend(common);
    Ok(r)
}

/// `Content-Disposition` for a file name: a plain ASCII fallback and the UTF-8 name.
fn disposition(name: &str) -> String {
    let name = name.rsplit('/').next().unwrap_or(name);
    let plain: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "inline; filename=\"{plain}\"; filename*=UTF-8''{}",
        encode_segment(name.as_bytes())
    )
}

/// The content type of a blob from its first bytes, or its file name's extension when the
/// bytes say nothing more than "text" or "binary".
pub fn content_type(head: &[u8], filename: Option<&str>) -> &'static str {
    let sniffed = sniff(head);
    if !matches!(sniffed, "application/octet-stream" | "text/plain; charset=utf-8") {
        return sniffed;
    }
    let ext = filename
        .and_then(|n| n.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase());
    let by_ext = match ext.as_deref() {
        Some("mp4" | "m4v") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mkv") => "video/x-matroska",
        Some("mp3") => "audio/mpeg",
        Some("ogg" | "oga") => "audio/ogg",
        Some("flac") => "audio/flac",
        Some("wav") => "audio/wav",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("svg") => "image/svg+xml",
        Some("pdf") => "application/pdf",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("txt" | "md") => "text/plain; charset=utf-8",
        _ => sniffed,
    };
    by_ext
}

/// The content type the first bytes of a blob show (WHATWG's sniffing, the common part).
pub fn sniff(b: &[u8]) -> &'static str {
    let starts = |m: &[u8]| b.starts_with(m);
    if starts(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if starts(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        "image/gif"
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        "image/webp"
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WAVE" {
        "audio/wav"
    } else if b.len() >= 12 && &b[4..8] == b"ftyp" {
        "video/mp4"
    } else if starts(b"\x1a\x45\xdf\xa3") {
        // Matroska; WebM says so in its DocType.
        if b.windows(4).any(|w| w == b"webm") {
            "video/webm"
        } else {
            "video/x-matroska"
        }
    } else if starts(b"OggS") {
        "audio/ogg"
    } else if starts(b"fLaC") {
        "audio/flac"
    } else if starts(b"ID3") || (b.len() >= 2 && b[0] == 0xff && b[1] & 0xe0 == 0xe0) {
        "audio/mpeg"
    } else if starts(b"%PDF-") {
        "application/pdf"
    } else if starts(b"PK\x03\x04") {
        "application/zip"
    } else if starts(b"\x1f\x8b") {
        "application/gzip"
    } else if starts(b"\xfd7zXZ\x00") {
        "application/x-xz"
    } else if starts(crate::folder::MAGIC) {
        "application/x-swarmfs-folder"
    } else {
        let t = b
            .iter()
            .skip_while(|c| c.is_ascii_whitespace())
            .take(14)
            .copied()
            .collect::<Vec<u8>>();
        let lower = t.to_ascii_lowercase();
        if lower.starts_with(b"<!doctype html") || lower.starts_with(b"<html") {
            "text/html; charset=utf-8"
        } else if lower.starts_with(b"<svg") {
            "image/svg+xml"
        } else if !b.contains(&0) && text_like(b) {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        }
    }
}

/// UTF-8 but for a character cut at the end of the sample, with no control bytes besides
/// whitespace.
fn text_like(b: &[u8]) -> bool {
    let valid = match std::str::from_utf8(b) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    };
    valid
        && b.iter()
            .all(|&c| c >= 0x20 || matches!(c, b'\n' | b'\r' | b'\t' | 0x0c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_as_rfc_9110_says() {
        assert_eq!(parse_ranges("bytes=0-9", 100), Ok(Some(vec![0..10])));
        assert_eq!(parse_ranges("bytes=90-", 100), Ok(Some(vec![90..100])));
        assert_eq!(parse_ranges("bytes=-10", 100), Ok(Some(vec![90..100])));
        assert_eq!(parse_ranges("bytes=-1000", 100), Ok(Some(vec![0..100])));
        assert_eq!(parse_ranges("bytes=95-200", 100), Ok(Some(vec![95..100])));
        assert_eq!(parse_ranges("bytes=0-0, 10-19", 100), Ok(Some(vec![0..1, 10..20])));
        // Past the end, alone: 416; beside a good one: skipped.
        assert_eq!(parse_ranges("bytes=100-", 100), Err(()));
        assert_eq!(parse_ranges("bytes=0-1,200-300", 100), Ok(Some(vec![0..2])));
        assert_eq!(parse_ranges("bytes=-0", 100), Err(()));
        assert_eq!(parse_ranges("bytes=0-", 0), Err(()));
        // Malformed: ignored, the whole blob is served.
        assert_eq!(parse_ranges("bytes=9-1", 100), Ok(None));
        assert_eq!(parse_ranges("bytes=x-y", 100), Ok(None));
        assert_eq!(parse_ranges("items=0-1", 100), Ok(None));
        let many = format!("bytes={}", vec!["0-0"; 40].join(","));
        assert_eq!(parse_ranges(&many, 100), Err(()));
    }

    #[test]
    fn content_types_come_from_bytes_then_names() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), "image/png");
        assert_eq!(sniff(b"\x00\x00\x00\x18ftypmp42"), "video/mp4");
        assert_eq!(sniff(b"  <!DOCTYPE html><p>"), "text/html; charset=utf-8");
        assert_eq!(sniff("héllo\n".as_bytes()), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"\x00\x01\x02"), "application/octet-stream");
        assert_eq!(content_type(b"\x00\x01", Some("film.mkv")), "video/x-matroska");
        assert_eq!(content_type(b"\x89PNG\r\n\x1a\n", Some("x.txt")), "image/png");
    }

    #[test]
    fn only_loopback_names_pass_on_loopback() {
        for ok in [
            "127.0.0.1:4702",
            "localhost:4702",
            "[::1]:4702",
            "localhost",
            "127.5.6.7",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in ["evil.example:4702", "192.168.1.2:4702", "", "localhost.evil.example"] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn file_names_in_headers_cannot_break_out() {
        let d = disposition("a\"b\r\nSet-Cookie: x.txt");
        assert!(!d.contains('\r') && !d.contains('\n'), "{d}");
        assert!(d.starts_with("inline; filename=\"a_b__Set-Cookie: x.txt\""), "{d}");
    }
}
