//! The HTTP server against real daemons: the gateway with curl (a real HTTP client) and raw
//! sockets, the token, bad input, `/metrics`.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

struct Host {
    data: PathBuf,
    mnt: PathBuf,
}

fn host(root: &Path, name: &str) -> Host {
    Host {
        data: root.join(name),
        mnt: root.join(format!("{name}-mnt")),
    }
}

fn addr_of(data: &Path) -> String {
    status(data)["listen"][0]
        .as_str()
        .expect("a listen address")
        .to_string()
}

/// What curl got: status, headers (lowercase names), body.
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `curl` with `args` against `url`; never follows redirects.
fn curl(url: &str, args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let (h, b) = (dir.path().join("h"), dir.path().join("b"));
    let mut c = Command::new("curl");
    c.args(["-s", "--max-time", "60", "-D"])
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(url);
    let out = run_with_timeout(&mut c, Duration::from_secs(90));
    let status = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    let headers = fs::read_to_string(&h)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Got {
        status,
        headers,
        body: fs::read(&b).unwrap_or_default(),
    }
}

#[test]
fn the_gateway_serves_blobs_whole_in_ranges_and_by_etag() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (host(root.path(), "a"), host(root.path(), "b"));
    let da = Daemon::start(&a.data, &a.mnt, &[]);
    let want = data((3 << 20) + 12345, 7);
    let src = write_file(root.path(), "f.bin", &want);
    let hash = add_file(&a.data, &src);
    let db = Daemon::start(&b.data, &b.mnt, &["--bootstrap", &addr_of(&a.data)]);
    let (ua, ub) = (da.http(), db.http());
    let url = format!("{ua}/blob/{hash}");

    let full = curl(&url, &[]);
    assert_eq!(full.status, 200);
    assert!(full.body == want, "the body differs");
    assert_eq!(full.header("etag"), Some(format!("\"{hash}\"").as_str()));
    assert_eq!(full.header("content-length"), Some(want.len().to_string().as_str()));
    assert!(full.header("cache-control").unwrap().contains("immutable"));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));

    // HEAD: the headers and no body (curl -I writes the headers where the body would go).
    let head = curl(&url, &["-I"]);
    assert_eq!(head.status, 200);
    assert!(head.body.starts_with(b"HTTP/1.1 200") && head.body.len() < 2000);
    assert_eq!(head.header("content-length"), Some(want.len().to_string().as_str()));

    let one = curl(&url, &["-r", "1000-1999"]);
    assert_eq!(one.status, 206);
    assert_eq!(one.body, &want[1000..2000]);
    assert_eq!(
        one.header("content-range"),
        Some(format!("bytes 1000-1999/{}", want.len()).as_str())
    );
    let tail = curl(&url, &["-H", "Range: bytes=-100"]);
    assert_eq!(tail.body, &want[want.len() - 100..]);

    // Two ranges: multipart/byteranges, each part with its own Content-Range.
    let two = curl(&url, &["-r", "0-9,2000000-2000009"]);
    assert_eq!(two.status, 206);
    let ct = two.header("content-type").unwrap().to_string();
    let boundary = ct.split("boundary=").nth(1).expect("a boundary");
    let body = String::from_utf8_lossy(&two.body).into_owned();
    assert_eq!(body.matches(&format!("--{boundary}")).count(), 3, "{body}");
    assert!(body.contains(&format!("Content-Range: bytes 0-9/{}", want.len())));
    assert!(body.contains(&format!("Content-Range: bytes 2000000-2000009/{}", want.len())));
    let at = |needle: &[u8]| two.body.windows(needle.len()).position(|w| w == needle).is_some();
    assert!(at(&want[0..10]) && at(&want[2000000..2000010]));

    // A cached copy is still good: 304 without a body.
    let again = curl(&url, &["-H", &format!("If-None-Match: \"{hash}\"")]);
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    // ?filename names the download; the type comes from the bytes, else the name.
    let named = curl(&format!("{url}?filename=talk.mkv"), &["-I"]);
    assert_eq!(named.header("content-type"), Some("video/x-matroska"));
    assert!(named
        .header("content-disposition")
        .unwrap()
        .contains("filename=\"talk.mkv\""));

    // An HTML blob is a page from anyone: sandboxed, never run as the dashboard's origin.
    let page = add_file(
        &a.data,
        &write_file(
            root.path(),
            "p.html",
            b"<!doctype html><script>fetch('/api/gc',{method:'POST'})</script>",
        ),
    );
    let html = curl(&format!("{ua}/blob/{page}"), &["-I"]);
    assert_eq!(html.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(html.header("content-security-policy"), Some("sandbox"));
    assert_eq!(head.header("content-security-policy"), None);
    assert_eq!(head.header("x-content-type-options"), Some("nosniff"));

    // B holds nothing: the same URL on B fetches from A, verified, as it streams.
    let remote = curl(&format!("{ub}/blob/{hash}"), &[]);
    assert_eq!(remote.status, 200);
    assert!(remote.body == want, "the remote body differs");
    drop((db, da));
}

/// Reads an HTTP/1.1 response's head from `s`; returns it and the body bytes read with it.
#[test]
fn a_remote_folder_is_listed_and_its_files_served_by_path_whatever_their_names() {
    use std::os::unix::ffi::OsStrExt;
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (host(root.path(), "a"), host(root.path(), "b"));
    let da = Daemon::start(&a.data, &a.mnt, &[]);
    let dir = root.path().join("share");
    fs::create_dir_all(dir.join("docs")).unwrap();
    let readme = b"read me\n".to_vec();
    fs::write(dir.join("docs/readme.txt"), &readme).unwrap();
    // A name that is not UTF-8, and one that needs escaping in a URL and in HTML.
    let latin1 = data(70_000, 5);
    fs::write(dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9.bin")), &latin1).unwrap();
    let odd = data(1000, 6);
    fs::write(dir.join("with space & <tag>.txt"), &odd).unwrap();
    std::os::unix::fs::symlink("docs/readme.txt", dir.join("link")).unwrap();
    let mut add = swarmfs(&a.data, &["add", "-r"]);
    add.arg(&dir);
    let added = String::from_utf8_lossy(&ok_bytes(add)).into_owned();
    let folder = &added.lines().last().unwrap()[..64];
    let db = Daemon::start(&b.data, &b.mnt, &["--bootstrap", &addr_of(&a.data)]);
    let base = format!("{}/blob/{folder}", db.http());

    // The folder's own URL goes to its listing, whose links are relative.
    let bare = curl(&base, &[]);
    assert_eq!(bare.status, 301);
    assert_eq!(bare.header("location"), Some(format!("/blob/{folder}/").as_str()));
    let list = curl(&format!("{base}/"), &[]);
    assert_eq!(list.status, 200);
    assert!(list.header("content-type").unwrap().starts_with("text/html"));
    let html = String::from_utf8_lossy(&list.body);
    for href in [
        "href=\"docs/\"",
        "href=\"caf%E9.bin\"",
        "href=\"with%20space%20%26%20%3Ctag%3E.txt\"",
    ] {
        assert!(html.contains(href), "{href} not in {html}");
    }
    assert!(
        html.contains("with space &amp; &lt;tag&gt;.txt") && !html.contains("<tag>"),
        "{html}"
    );
    assert!(html.contains("link &rarr; docs/readme.txt"), "{html}");

    // A folder inside, without its slash, is sent to it; with it, listed.
    let docs = curl(&format!("{base}/docs"), &[]);
    assert_eq!(docs.status, 301);
    assert_eq!(docs.header("location"), Some(format!("/blob/{folder}/docs/").as_str()));
    let docs = curl(&format!("{base}/docs/"), &[]);
    assert!(String::from_utf8_lossy(&docs.body).contains("href=\"readme.txt\""));

    // Files by path, each fetched from A and verified: plain, not UTF-8, escaped.
    let got = curl(&format!("{base}/docs/readme.txt"), &[]);
    assert_eq!(got.status, 200);
    assert_eq!(got.body, readme);
    assert!(got.header("content-type").unwrap().starts_with("text/plain"));
    let got = curl(&format!("{base}/caf%E9.bin"), &[]);
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert!(got.body == latin1, "the body differs");
    let got = curl(&format!("{base}/with%20space%20%26%20%3Ctag%3E.txt"), &["-r", "10-19"]);
    assert_eq!(got.status, 206);
    assert_eq!(got.body, odd[10..20]);

    // What is not there, and what climbs out.
    assert_eq!(curl(&format!("{base}/docs/nothing"), &[]).status, 404);
    assert_eq!(curl(&format!("{base}/docs/%2E%2E/docs/readme.txt"), &[]).status, 400);
    assert_eq!(curl(&format!("{base}/../x"), &["--path-as-is"]).status, 400);
    drop((db, da));
}

fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the connection closed before the head ended");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            return (head, buf[i + 4..].to_vec());
        }
    }
}

#[test]
fn a_remote_blob_streams_over_http_while_it_is_fetched() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (host(root.path(), "a"), host(root.path(), "b"));
    // 16 MiB at 4 MiB/s: the fetch takes about four seconds.
    let da = Daemon::start(&a.data, &a.mnt, &["--max-upload-rate", "4M"]);
    let want = data(16 << 20, 3);
    let hash = add_file(&a.data, &write_file(root.path(), "f", &want));
    let db = Daemon::start(&b.data, &b.mnt, &["--bootstrap", &addr_of(&a.data)]);
    let base = db.http();
    let mut s = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /blob/{hash} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let t = Instant::now();
    let (head, mut body) = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut chunk = vec![0u8; 1 << 16];
    while body.len() < 1 << 20 {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        body.extend_from_slice(&chunk[..n]);
    }
    let first_mib = t.elapsed();
    // The first MiB is here, and B does not hold the whole blob yet.
    let held: serde_json::Value = serde_json::from_str(&ok(swarmfs(&b.data, &["ls", "--json"]))).unwrap();
    let me = held
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["hash"] == hash.as_str())
        .expect("B holds part of the blob");
    assert_eq!(me["complete"], false, "first MiB after {first_mib:?}, but B had it all");
    assert!(me["present"].as_u64().unwrap() < want.len() as u64);
    s.read_to_end(&mut body).unwrap();
    assert_eq!(body.len(), want.len());
    assert!(body == want, "the streamed body differs");
    drop((db, da));
}

#[test]
fn a_corrupt_provider_never_gets_a_wrong_byte_through_http() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (host(root.path(), "a"), host(root.path(), "b"));
    let da = Daemon::start(&a.data, &a.mnt, &["--test-corrupt-responses"]);
    let want = data(2 << 20, 5);
    let hash = add_file(&a.data, &write_file(root.path(), "f", &want));
    let db = Daemon::start(
        &b.data,
        &b.mnt,
        &[
            "--bootstrap",
            &addr_of(&a.data),
            "--read-timeout",
            "3",
            "--lookup-timeout",
            "3",
        ],
    );
    let got = curl(&format!("{}/blob/{hash}", db.http()), &[]);
    // Nothing that did not verify: an error status, or at most a true prefix.
    assert!(
        got.status != 200 || got.body.len() < want.len(),
        "status {}",
        got.status
    );
    assert!(
        want.starts_with(&got.body) || got.status != 200,
        "a wrong byte was served"
    );
    if got.status != 200 {
        assert!(got.status >= 400, "status {}", got.status);
    }
    assert!(
        eventually(Duration::from_secs(10), || db.log_text().contains("banned")),
        "{}",
        db.log_text()
    );
    drop((db, da));
}

#[test]
fn off_loopback_everything_but_blobs_needs_the_token() {
    let root = tempfile::tempdir().unwrap();
    let a = host(root.path(), "a");
    // Bound to every address; reached at 127.0.0.1 only.
    let da = Daemon::start(&a.data, &a.mnt, &["--http", "0.0.0.0:0"]);
    let hash = add_file(&a.data, &write_file(root.path(), "f", b"hello"));
    let port = da.http().rsplit(':').next().unwrap().to_string();
    let base = format!("http://127.0.0.1:{port}");
    let token = fs::read_to_string(a.data.join("api.token")).unwrap();
    let token = token.trim();
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(a.data.join("api.token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    for path in ["/api/status", "/metrics", "/", "/api/events"] {
        assert_eq!(
            curl(&format!("{base}{path}"), &[]).status,
            401,
            "{path} without a token"
        );
        let wrong = curl(&format!("{base}{path}"), &["-H", "Authorization: Bearer nope"]);
        assert_eq!(wrong.status, 401, "{path} with a wrong token");
    }
    assert_eq!(curl(&format!("{base}/api/gc"), &["-X", "POST"]).status, 401);
    let good = curl(
        &format!("{base}/api/status"),
        &["-H", &format!("Authorization: Bearer {token}")],
    );
    assert_eq!(good.status, 200);
    let q = curl(&format!("{base}/api/blobs?token={token}"), &[]);
    assert_eq!(q.status, 200);
    assert!(String::from_utf8_lossy(&q.body).contains(&hash));
    // The gateway itself is open.
    let blob = curl(&format!("{base}/blob/{hash}"), &[]);
    assert_eq!((blob.status, blob.body.as_slice()), (200, &b"hello"[..]));
    drop(da);
}

#[test]
fn bad_requests_get_4xx_never_a_panic() {
    let root = tempfile::tempdir().unwrap();
    let a = host(root.path(), "a");
    let da = Daemon::start(&a.data, &a.mnt, &["--lookup-timeout", "1"]);
    let hash = add_file(&a.data, &write_file(root.path(), "f", &data(100_000, 1)));
    let u = da.http();
    let cases: Vec<(String, Vec<String>, u16)> = vec![
        (format!("{u}/blob/xyz"), vec![], 400),
        (format!("{u}/blob/{}", "g".repeat(64)), vec![], 400),
        (format!("{u}/blob/{}", "0".repeat(64)), vec![], 404),
        (format!("{u}/blob/{hash}"), vec!["-r".into(), "100000-".into()], 416),
        (
            format!("{u}/blob/{hash}"),
            vec!["-H".into(), "Range: bytes=-0".into()],
            416,
        ),
        (format!("{u}/nowhere"), vec![], 404),
        (format!("{u}/api/blobs/{}", "0".repeat(64)), vec![], 404),
        (format!("{u}/api/pin/nothex"), vec!["-X".into(), "POST".into()], 400),
        (format!("{u}/api/providers/garbage"), vec![], 400),
        (
            format!("{u}/api/status"),
            vec!["-H".into(), "Host: evil.example".into()],
            401,
        ),
        (
            format!("{u}/api/gc"),
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                "Origin: http://evil.example".into(),
            ],
            401,
        ),
        (format!("{u}/blob/{}/", "0".repeat(64)), vec![], 404),
        (format!("{u}/blob/{hash}/x"), vec![], 400),
    ];
    for (url, args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let got = curl(&url, &args);
        assert_eq!(
            got.status,
            want,
            "{url} {args:?}: {}",
            String::from_utf8_lossy(&got.body)
        );
    }
    // A 416 says how big the blob is.
    let past = curl(&format!("{u}/blob/{hash}"), &["-r", "200000-300000"]);
    assert_eq!(past.header("content-range"), Some("bytes */100000"));
    // A huge header: refused by the server, which goes on serving.
    let hdr = root.path().join("hdr");
    fs::write(&hdr, format!("X-Big: {}\r\n", "a".repeat(1 << 20))).unwrap();
    let big = curl(&format!("{u}/api/status"), &["-H", &format!("@{}", hdr.display())]);
    assert!(
        (400..500).contains(&big.status) || big.status == 0,
        "status {}",
        big.status
    );
    assert_eq!(curl(&format!("{u}/health"), &[]).status, 200);
    assert!(!da.log_text().contains("panicked"), "{}", da.log_text());
    drop(da);
}

/// The value of the first sample of `name` (no labels) in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Checks the exposition's shape: comments, `name{labels} value` samples, `# EOF` last.
fn parses_as_prometheus_text(text: &str) {
    assert!(text.trim_end().ends_with("# EOF"), "no # EOF");
    for l in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {l}"));
        let bare = name.split('{').next().unwrap();
        assert!(
            !bare.is_empty() && bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {l}"
        );
        if name.contains('{') {
            assert!(name.ends_with('}'), "unclosed labels: {l}");
        }
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {l}"
        );
    }
}

#[test]
fn metrics_parse_and_move_when_a_blob_is_fetched() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (host(root.path(), "a"), host(root.path(), "b"));
    let da = Daemon::start(&a.data, &a.mnt, &[]);
    let want = data(1 << 20, 9);
    let hash = add_file(&a.data, &write_file(root.path(), "f", &want));
    let db = Daemon::start(&b.data, &b.mnt, &["--bootstrap", &addr_of(&a.data)]);
    let url = format!("{}/metrics", db.http());
    let before = String::from_utf8(curl(&url, &[]).body).unwrap();
    parses_as_prometheus_text(&before);
    assert_eq!(sample(&before, "swarmfs_fetched_bytes_total"), 0.0);
    assert_eq!(sample(&before, "swarmfs_groups_verified_total"), 0.0);
    // A read through B's mount fetches the blob (and counts FUSE operations).
    assert!(fs::read(b.mnt.join(&hash)).unwrap() == want);
    let after = String::from_utf8(curl(&url, &[]).body).unwrap();
    parses_as_prometheus_text(&after);
    assert!(sample(&after, "swarmfs_fetched_bytes_total") >= want.len() as f64);
    // Every group at least once (the end game may ask for a few twice).
    assert!(sample(&after, "swarmfs_groups_verified_total") >= 64.0);
    assert!(sample(&after, "swarmfs_fetch_latency_seconds_count") >= 1.0);
    assert!(sample(&after, "swarmfs_blobs") >= 1.0);
    for family in [
        "swarmfs_fuse_ops_total{op=\"read\"}",
        "libp2p_swarm_connections_established_total",
        "libp2p_bandwidth_bytes_total",
        "libp2p_identify",
        "libp2p_kad",
    ] {
        assert!(after.contains(family), "no {family} in:\n{after}");
    }
    // A's counters moved the other way.
    let served = String::from_utf8(curl(&format!("{}/metrics", da.http()), &[]).body).unwrap();
    assert!(sample(&served, "swarmfs_served_bytes_total") >= want.len() as f64);
    drop((db, da));
}

#[test]
fn the_daemon_logs_peers_and_finished_transfers_by_default() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (host(root.path(), "a"), host(root.path(), "b"));
    let da = Daemon::start(&a.data, &a.mnt, &[]);
    let want = data(1 << 20, 12);
    let hash = add_file(&a.data, &write_file(root.path(), "f", &want));
    // No RUST_LOG: the defaults.
    let db = Daemon::start_default_log(&b.data, &b.mnt, &["--bootstrap", &addr_of(&a.data)]);
    assert!(fs::read(b.mnt.join(&hash)).unwrap() == want);
    let peer_a = status(&a.data)["peer_id"].as_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(10), || {
            let log = db.log_text();
            log.contains("peer connected") && log.contains(&peer_a) && log.contains("transfer finished")
        }),
        "{}",
        db.log_text()
    );
    assert!(!db.log_text().contains("DEBUG"), "debug lines at the default level");
    drop(da);
    assert!(
        eventually(Duration::from_secs(10), || db.log_text().contains("peer disconnected")),
        "{}",
        db.log_text()
    );
    drop(db);
}
