//! The command line: argument definitions (clap) and the commands that run on the store.
//!
//! Every command opens the store directly (there is no daemon yet). Output for people goes to
//! stdout; errors are one line on stderr; `--json` gives machine-readable output.

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::api::{human, Added, Api, ApiError, Call, ErrorKind, Progress, Reply};
use crate::folder::EntryKind;
use crate::hash::Hash;
use crate::store::{self, Store, StoreError};
use crate::ticket::Ticket;

const EXAMPLES: &str = "\
Examples:
  swarmfs add photo.jpg notes.txt > sums   store and pin two files
  b3sum -c sums                            the printed hashes are b3sum's
  swarmfs cat af1349b9...3262 > copy       write a blob to stdout
  swarmfs ls --json                        list local blobs for a script
  swarmfs pin HASH / swarmfs unpin HASH    keep a blob, or let gc evict it
  swarmfs --cache-size 20G gc              evict unpinned blobs beyond 20 GiB
  swarmfs verify                           re-hash everything held locally
  swarmfs mount ~/swarm                    mount; copy files in, open blobs by hash

While a daemon runs, every command goes through its control socket.

Logs go to stderr; set RUST_LOG=debug (or info, warn) for more or less.";

/// swarmfs: a peer-to-peer filesystem where every file is named by its BLAKE3 hash.
#[derive(Debug, Parser)]
#[command(name = "swarmfs", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Data directory [default: $XDG_DATA_HOME/swarmfs, or ~/.local/share/swarmfs]
    #[arg(long, global = true, value_name = "DIR", env = "SWARMFS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print machine-readable JSON
    #[arg(long, global = true)]
    pub json: bool,
    /// Show progress on stderr (set by a client whose stderr is a terminal)
    #[arg(long, global = true, hide = true)]
    pub progress: bool,
    /// The client's working directory, for relative paths run inside the daemon
    #[arg(long, global = true, hide = true, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Cache cap, e.g. 500M or 20G; remembered in the data directory [default: 10G]
    #[arg(long, global = true, value_name = "BYTES", value_parser = parse_size)]
    pub cache_size: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store files and pin them; prints "<hash>  <path>" per file, exactly as b3sum does
    #[command(
        after_help = "Example:\n  swarmfs add a.iso b.txt > sums && b3sum -c sums\n  swarmfs add -r photos | tail -1     (the folder's hash)"
    )]
    Add {
        /// Add folders and everything in them; the last line is the folder's hash
        #[arg(short, long)]
        recursive: bool,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Write a blob to stdout, verified
    #[command(after_help = "Example:\n  swarmfs cat 1f0e...9a3c > film.mkv")]
    Cat { hash: String },
    /// List local blobs (hash, size, bytes present, pinned), or the entries of folder HASH
    #[command(
        after_help = "Example:\n  swarmfs ls\n  swarmfs ls --json | jq '.[] | select(.pinned)'\n  swarmfs ls 1f0e...9a3c     (a folder: hash, size, kind, name)"
    )]
    Ls {
        #[arg(value_name = "HASH|TICKET")]
        hash: Option<String>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Pin blobs so that gc never evicts them
    #[command(after_help = "Example:\n  swarmfs pin 1f0e...9a3c")]
    Pin {
        #[arg(required = true, value_name = "HASH")]
        hashes: Vec<String>,
    },
    /// Unpin blobs so that gc may evict them
    #[command(after_help = "Example:\n  swarmfs unpin 1f0e...9a3c")]
    Unpin {
        #[arg(required = true, value_name = "HASH")]
        hashes: Vec<String>,
    },
    /// Evict unpinned blobs, least recently used first, until the cache fits its cap
    #[command(after_help = "Example:\n  swarmfs --cache-size 5G gc")]
    Gc,
    /// Fetch a blob or a folder from the network, verified, and write it to OUT (or a blob to
    /// stdout); resumes
    #[command(
        after_help = "Example:\n  swarmfs get 1f0e...9a3c -o film.mkv\n  swarmfs get 7c2d...01be -o photos     (a folder)"
    )]
    Get {
        hash: String,
        /// Write the blob (or make the folder) here instead of stdout
        #[arg(short, long, value_name = "OUT")]
        out: Option<PathBuf>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// List the peers that provide a blob
    #[command(after_help = "Example:\n  swarmfs providers 1f0e...9a3c")]
    Providers {
        hash: String,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Connect to a peer (or the peers in a ticket) and keep it connected; needs a running daemon
    #[command(after_help = "Example:\n  swarmfs connect /ip4/192.0.2.7/tcp/4701/p2p/12D3KooW...")]
    Connect {
        #[arg(value_name = "MULTIADDR|TICKET")]
        addr: String,
    },
    /// Private swarms: `swarm-key new` writes DATA_DIR/swarm.key (0600); nodes with the same
    /// key talk only to each other
    #[command(
        name = "swarm-key",
        after_help = "Example:\n  swarmfs swarm-key new && scp ~/.local/share/swarmfs/swarm.key other:.local/share/swarmfs/"
    )]
    SwarmKey {
        #[command(subcommand)]
        action: SwarmKeyAction,
    },
    /// Print a ticket for a blob, file or folder: one line holding its hash and this node's addresses
    #[command(after_help = "Example:\n  swarmfs share ~/swarm/talk.mkv\n  swarmfs share 1f0e...9a3c")]
    Share {
        #[arg(value_name = "HASH|PATH")]
        target: String,
    },
    /// Dial the peers in a ticket and print the path of its blob in the mount
    #[command(after_help = "Example:\n  mpv \"$(swarmfs open swarmfs1...)\"")]
    Open {
        #[arg(value_name = "TICKET")]
        ticket: String,
    },
    /// List connected peers: id, direct or relayed, address, round-trip time (needs a running daemon)
    #[command(after_help = "Example:\n  swarmfs peers\n  swarmfs peers --json")]
    Peers,
    /// Show the node: peer id, addresses, peers, cache, transfers (needs a running daemon)
    #[command(after_help = "Example:\n  swarmfs status --json")]
    Status,
    /// Run the daemon in the foreground with DIR mounted (same as `daemon --mount DIR`)
    #[command(
        after_help = "Example:\n  mkdir -p ~/swarm && swarmfs mount ~/swarm\n  (then, in another shell) cp film.mkv ~/swarm/ && getfattr -n user.swarmfs.hash ~/swarm/film.mkv"
    )]
    Mount {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        #[command(flatten)]
        opts: DaemonArgs,
    },
    /// Run the daemon in the foreground; CLI commands go through it while it runs
    #[command(after_help = "Example:\n  swarmfs daemon --mount ~/swarm")]
    Daemon {
        /// Mount the filesystem at DIR
        #[arg(long, value_name = "DIR")]
        mount: Option<PathBuf>,
        #[command(flatten)]
        opts: DaemonArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Example:\n  swarmfs completions bash > /etc/bash_completion.d/swarmfs\n  swarmfs completions zsh > \"${fpath[1]}/_swarmfs\""
    )]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff)
    #[command(after_help = "Example:\n  swarmfs man > /usr/local/share/man/man1/swarmfs.1 && man swarmfs")]
    Man,
    /// Re-hash local data, report corrupt blocks and drop them; exits 1 if any were corrupt
    #[command(after_help = "Example:\n  swarmfs verify            (every blob)\n  swarmfs verify 1f0e...9a3c")]
    Verify {
        #[arg(value_name = "HASH")]
        hashes: Vec<String>,
    },
}

/// The longest timeout an option takes: a day.
const MAX_SECS: u64 = 86400;

/// What `swarm-key` does.
#[derive(Debug, Subcommand)]
pub enum SwarmKeyAction {
    /// Write a new random key to DATA_DIR/swarm.key; an existing key is never overwritten
    New,
}

/// Options of the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// Address to listen on (repeatable) [default: /ip4/0.0.0.0/tcp/4701 and
    /// /ip4/0.0.0.0/udp/4701/quic-v1]
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<libp2p::Multiaddr>,
    /// An address others can dial this node at, such as a port forwarded on the router
    /// (repeatable). Public listen addresses, and listen addresses that peers see this node
    /// at, count without it. These go into the node's provider records.
    #[arg(long, value_name = "MULTIADDR")]
    pub external_addr: Vec<libp2p::Multiaddr>,
    /// Seconds a lookup of a hash that is not local may wait for a peer
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub lookup_timeout: u64,
    /// Seconds a read may wait for blocks from the network before it fails with EIO
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub read_timeout: u64,
    /// Do not relay connections for peers behind NATs (the service is on by default, with
    /// limits)
    #[arg(long)]
    pub no_relay_service: bool,
    /// Do not ask the router to forward a port (UPnP)
    #[arg(long)]
    pub no_upnp: bool,
    /// Serve every read through the daemon, never by FUSE passthrough
    #[arg(long)]
    pub no_passthrough: bool,
    /// Most bytes per second that serving blobs to peers may send, all together (e.g. 10M)
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub max_upload_rate: Option<u64>,
    /// Most bytes per second that fetching blobs may receive, all together (e.g. 50M)
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub max_download_rate: Option<u64>,
    /// Let other users use the mount; the kernel checks each access against the name's mode
    /// and owner. A daemon not run as root needs `user_allow_other` in /etc/fuse.conf.
    #[arg(long)]
    pub allow_other: bool,
    /// Serve the HTTP gateway, JSON API, dashboard and metrics here. Off loopback, everything
    /// but GET /blob needs the token in DATA_DIR/api.token
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4702")]
    pub http: std::net::SocketAddr,
    /// Do not serve HTTP
    #[arg(long, conflicts_with = "http")]
    pub no_http: bool,
    /// Tests only: flip a bit in every blob this node serves
    #[arg(long, hide = true)]
    pub test_corrupt_responses: bool,
    /// Tests only: claim every group of every blob in have-maps sent to peers
    #[arg(long, hide = true)]
    pub test_lie_have: bool,
    /// Tests only: refuse swarm streams, as a node from before them does
    #[arg(long, hide = true)]
    pub test_refuse_join: bool,
    /// Tests only: take this many seconds more to shut down (to test a second Ctrl-C)
    #[arg(long, hide = true, value_name = "SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub test_shutdown_delay: u64,
}

/// How to reach the network.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NetArgs {
    /// A peer to join through, e.g. /ip4/192.0.2.7/tcp/4701/p2p/12D3KooW... (repeatable;
    /// also "bootstrap" in DATA_DIR/config.json)
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// Do not look for peers on the local network (mDNS)
    #[arg(long)]
    pub no_mdns: bool,
}

use crate::api::NetCtx;

/// `DATA_DIR/config.json`: settings kept with the data.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Config {
    #[serde(default)]
    pub bootstrap: Vec<String>,
}

impl Config {
    /// Reads the config file, if there is one.
    pub fn load(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is not valid", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Bootstrap addresses from the file and the command line.
    pub fn bootstrap(&self, extra: &[libp2p::Multiaddr]) -> Result<Vec<libp2p::Multiaddr>> {
        let mut all = extra.to_vec();
        for a in &self.bootstrap {
            all.push(
                a.parse()
                    .with_context(|| format!("config.json: {a:?} is not a multiaddr"))?,
            );
        }
        Ok(all)
    }
}

/// Parses a byte count such as `1048576`, `512K`, `500M`, `20G` or `1T` (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let mult: u64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("{s:?} is not a size; try 500M or 20G")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size; try 500M or 20G"))
}

/// Sends tracing output to stderr, filtered by `RUST_LOG`. The default: for the daemon, our
/// own lines at info (peers coming and going, finished transfers) and other crates' warnings;
/// for other commands, warnings.
pub fn init_logging(cli: &Cli) {
    let daemon = matches!(cli.command, Command::Mount { .. } | Command::Daemon { .. });
    let default = if daemon { "warn,swarmfs=info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();
}

/// The default data directory.
pub fn default_data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("swarmfs"));
    }
    let home = std::env::var_os("HOME").context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/swarmfs"))
}

fn parse_hash(s: &str) -> Result<Hash> {
    Ok(s.parse::<Hash>()?)
}

fn parse_target(s: &str) -> Result<(Hash, Option<Ticket>)> {
    Ok(crate::api::parse_target(s)?)
}

/// Runs a parsed command line: the daemon, or a command (through a running daemon if there
/// is one, else on the store directly). Returns the exit code.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let dir = match &cli.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir()?,
    };
    let daemon = |mount: Option<PathBuf>, opts: &DaemonArgs| -> Result<ExitCode> {
        let config = Config::load(&dir)?;
        let psk = crate::net::load_swarm_key(&dir)?;
        let mut listen = if opts.listen.is_empty() {
            let p = crate::net::DEFAULT_PORT;
            vec![
                format!("/ip4/0.0.0.0/tcp/{p}").parse().expect("valid"),
                format!("/ip4/0.0.0.0/udp/{p}/quic-v1").parse().expect("valid"),
            ]
        } else {
            opts.listen.clone()
        };
        if psk.is_some() {
            let quic = |a: &libp2p::Multiaddr| a.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1));
            for a in listen.iter().filter(|a| quic(a)) {
                tracing::warn!("not listening on {a}: a private swarm (swarm.key) runs over TCP only");
            }
            listen.retain(|a| !quic(a));
        }
        crate::daemon::run(crate::daemon::DaemonOptions {
            http: if opts.no_http { None } else { Some(opts.http) },
            control: std::sync::Arc::new(run_args),
            data_dir: dir.clone(),
            mount,
            cache_size: cli.cache_size,
            lookup_timeout: std::time::Duration::from_secs(opts.lookup_timeout),
            read_timeout: std::time::Duration::from_secs(opts.read_timeout),
            passthrough: !opts.no_passthrough,
            allow_other: opts.allow_other,
            shutdown_delay: std::time::Duration::from_secs(opts.test_shutdown_delay),
            net: crate::net::NetOptions {
                listen,
                bootstrap: config.bootstrap(&opts.net.bootstrap)?,
                external: opts.external_addr.clone(),
                mdns: !opts.net.no_mdns,
                relay_service: !opts.no_relay_service,
                upnp: !opts.no_upnp,
                corrupt_responses: opts.test_corrupt_responses,
                lie_have: opts.test_lie_have,
                refuse_join: opts.test_refuse_join,
                lie_fetching: false,
                psk,
                max_upload_rate: opts.max_upload_rate,
                max_download_rate: opts.max_download_rate,
            },
        })?;
        Ok(ExitCode::SUCCESS)
    };
    match &cli.command {
        Command::Mount { dir: m, opts } => return daemon(Some(m.clone()), opts),
        Command::Daemon { mount, opts } => return daemon(mount.clone(), opts),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "swarmfs", &mut io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut io::stdout())?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::SwarmKey {
            action: SwarmKeyAction::New,
        } => {
            let path = crate::net::new_swarm_key(&dir)?;
            if cli.json {
                json_out(
                    &mut io::stdout(),
                    &serde_json::json!({ "path": path.to_string_lossy() }),
                )?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("{}", path.display());
            eprintln!("swarmfs: copy this file to the data directory of every node of the private swarm; restart the daemon to use it");
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    // Check hashes before anything else, so a typo costs nothing.
    hashes(&cli.command)?;
    // Typed calls go to a running daemon as such, and its reply is rendered here.
    if let (Some(call), None) = (typed_call(&cli)?, cli.cache_size) {
        let asked = crate::control::call(&dir, &call).with_context(|| {
            format!(
                "cannot talk to the daemon at {}",
                crate::control::socket_path(&dir).display()
            )
        })?;
        if let Some(reply) = asked {
            let mut out = io::stdout().lock();
            let mut err = io::stderr();
            let code = finish(
                reply
                    .map_err(anyhow::Error::from)
                    .and_then(|r| render(&cli, r, &mut out, &mut err)),
                &mut err,
            );
            return Ok(ExitCode::from(code));
        }
    }
    let mut bars = Bars::default();
    let tty = io::stderr().is_terminal();
    if let Some(code) =
        crate::control::forward(&dir, forward_args(&cli)?, &mut |p| bars.update(p)).with_context(|| {
            format!(
                "cannot talk to the daemon at {}",
                crate::control::socket_path(&dir).display()
            )
        })?
    {
        return Ok(ExitCode::from(code));
    }
    let store = Arc::new(Store::open(
        &dir,
        store::Options {
            cache_size: cli.cache_size,
        },
    )?);
    // `get` and `providers` without a daemon run a short-lived node.
    let mut _rt = None;
    let net = match &cli.command {
        Command::Get { net, .. } | Command::Providers { net, .. } | Command::Ls { hash: Some(_), net } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let opts = crate::net::NetOptions {
                listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid")],
                bootstrap: Config::load(&dir)?.bootstrap(&net.bootstrap)?,
                psk: crate::net::load_swarm_key(&dir)?,
                max_upload_rate: None,
                max_download_rate: None,
                external: Vec::new(),
                mdns: !net.no_mdns,
                // A short-lived node serves no one.
                relay_service: false,
                upnp: false,
                corrupt_responses: false,
                lie_have: false,
                refuse_join: false,
                lie_fetching: false,
            };
            let key = crate::net::load_identity(&dir)?;
            let node = rt.block_on(crate::net::Net::start(store.clone(), key, opts))?;
            let ctx = NetCtx {
                fetcher: crate::fetch::Fetcher::new(node, store.clone()),
                mount: None,
                rt: rt.handle().clone(),
                lookup_timeout: std::time::Duration::from_secs(30),
                read_timeout: std::time::Duration::from_secs(30),
            };
            _rt = Some(rt);
            Some(ctx)
        }
        _ => None,
    };
    let api = Api::new(store, net);
    // Plain files on fds 1 and 2 (dups): big writes without line buffering, and Send.
    let mut out =
        io::BufWriter::with_capacity(1 << 16, std::fs::File::from(io::stdout().as_fd().try_clone_to_owned()?));
    let mut err = std::fs::File::from(io::stderr().as_fd().try_clone_to_owned()?);
    let mut sink = |p: &Progress| {
        if tty {
            bars.update(p)
        }
    };
    let code = finish(execute(&api, &cli, &mut out, &mut err, &mut sink), &mut err);
    drop(bars);
    match out.flush() {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(ExitCode::from(code))
}

/// The exit code of a command's result; an error is written to `err` as one line.
fn finish(r: Result<u8>, err: &mut dyn Write) -> u8 {
    match r {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "swarmfs: {e:#}");
            ApiError::from(e).exit_code()
        }
    }
}

/// Runs a command line inside the daemon (the control socket's requests): parses it, runs it
/// on `api`, and returns the exit code. A bad command line gets clap's message and 2.
pub fn run_args(
    api: &Api,
    args: Vec<OsString>,
    out: &mut (dyn Write + Send),
    err: &mut dyn Write,
    progress: &mut dyn FnMut(&Progress),
) -> u8 {
    match Cli::try_parse_from(std::iter::once(OsString::from("swarmfs")).chain(args)) {
        Ok(cli) => {
            // Progress goes back only to a client whose stderr is a terminal.
            let mut gated = |p: &Progress| {
                if cli.progress {
                    progress(p)
                }
            };
            finish(execute(api, &cli, out, err, &mut gated), err)
        }
        Err(e) => {
            let _ = write!(err, "{}", e.render());
            2
        }
    }
}

/// The command line to send to the daemon: the same command, with paths made absolute.
fn forward_args(cli: &Cli) -> Result<Vec<OsString>> {
    let mut a: Vec<OsString> = Vec::new();
    // Paths travel as bytes: a name that is not UTF-8 reaches the daemon as it is.
    let joined = |flag: &str, p: &Path| -> OsString {
        let mut o = OsString::from(flag);
        o.push(p.as_os_str());
        o
    };
    if cli.json {
        a.push("--json".into());
    }
    if io::stderr().is_terminal() {
        a.push("--progress".into());
    }
    if let Some(c) = cli.cache_size {
        a.push(format!("--cache-size={c}").into());
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    a.push(joined("--cwd=", &cwd));
    match &cli.command {
        Command::Add { paths, recursive } => {
            a.push("add".into());
            if *recursive {
                a.push("-r".into());
            }
            a.push("--".into());
            a.extend(paths.iter().map(|p| p.as_os_str().to_owned()));
        }
        Command::Cat { hash } => a.extend(["cat".into(), "--".into(), hash.into()]),
        Command::Get { hash, out, .. } => {
            a.push("get".into());
            if let Some(o) = out {
                a.push(joined("--out=", &cwd.join(o)));
            }
            a.extend(["--".into(), hash.into()]);
        }
        Command::Providers { hash, .. } => a.extend(["providers".into(), "--".into(), hash.into()]),
        Command::Peers => a.push("peers".into()),
        Command::Connect { addr } => a.extend(["connect".into(), "--".into(), addr.into()]),
        Command::Share { target } => a.extend(["share".into(), "--".into(), target.into()]),
        Command::Open { ticket } => a.extend(["open".into(), "--".into(), ticket.into()]),
        Command::Status => a.push("status".into()),
        Command::Ls { hash, .. } => {
            a.push("ls".into());
            if let Some(h) = hash {
                a.extend(["--".into(), h.into()]);
            }
        }
        Command::Gc => a.push("gc".into()),
        Command::Pin { hashes } | Command::Unpin { hashes } | Command::Verify { hashes } => {
            a.push(
                match cli.command {
                    Command::Pin { .. } => "pin",
                    Command::Unpin { .. } => "unpin",
                    _ => "verify",
                }
                .into(),
            );
            a.push("--".into());
            a.extend(hashes.iter().map(OsString::from));
        }
        Command::Mount { .. }
        | Command::Daemon { .. }
        | Command::SwarmKey { .. }
        | Command::Completions { .. }
        | Command::Man => unreachable!("handled before"),
    }
    Ok(a)
}

/// The hashes a command names, parsed.
fn hashes(cmd: &Command) -> Result<Vec<Hash>> {
    match cmd {
        Command::Cat { hash }
        | Command::Get { hash, .. }
        | Command::Providers { hash, .. }
        | Command::Ls { hash: Some(hash), .. } => Ok(vec![parse_target(hash)?.0]),
        Command::Open { ticket } => Ok(vec![parse_target(ticket)?.0]),
        Command::Pin { hashes } | Command::Unpin { hashes } | Command::Verify { hashes } => {
            hashes.iter().map(|h| parse_hash(h)).collect()
        }
        _ => Ok(Vec::new()),
    }
}

/// Writes `v` as pretty JSON and a newline: the same fields the HTTP API gives.
fn json_out(out: &mut dyn Write, v: &impl Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Runs a command on the API with output to `out` and per-item errors to `err`; the offline
/// CLI and the daemon's control socket both call this. Returns the exit code.
pub fn execute(
    api: &Api,
    cli: &Cli,
    out: &mut (dyn Write + Send),
    err: &mut dyn Write,
    progress: &mut dyn FnMut(&Progress),
) -> Result<u8> {
    let store = api.store();
    let net = api.net();
    let hashes = hashes(&cli.command)?;
    if let Some(c) = cli.cache_size {
        api.set_cache_size(c)?;
    }
    // A ticket's peers are dialed first, and asked before any others.
    // (`ls HASH` and `open` are typed calls: the API does it.)
    if let Command::Cat { hash: t } | Command::Get { hash: t, .. } = &cli.command {
        if let (_, Some(ticket)) = parse_target(t)? {
            api.introduce(&ticket);
        }
    }
    match &cli.command {
        Command::Add { paths, recursive } => add(api, cli, paths, *recursive, out, err, progress),
        Command::Cat { .. } => {
            let complete = store.info(&hashes[0])?.is_some_and(|i| i.complete);
            if let Some(n) = net.filter(|_| !complete) {
                crate::fetch::fetch_all(n, store, hashes[0], progress)?;
            }
            cat(store, &hashes[0], out)
        }
        Command::Get { out: path, .. } => {
            let n = net.context("no node to fetch with")?;
            if crate::folder_io::is_folder(store, Some(n), &hashes[0])? {
                let dir = path
                    .as_ref()
                    .with_context(|| format!("{} is a folder: say where to put it with -o DIR", hashes[0]))?;
                return crate::folder_io::get(store, n, hashes[0], dir, progress, err);
            }
            let started = std::time::Instant::now();
            crate::fetch::fetch_all(n, store, hashes[0], progress)?;
            match path {
                Some(p) => {
                    let mut f = std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?;
                    let size = store.cat(&hashes[0], &mut f)?;
                    // A regular file is made durable; /dev/null and friends cannot be.
                    if f.metadata()?.is_file() {
                        f.sync_all()?;
                    }
                    let secs = started.elapsed().as_secs_f64();
                    if cli.json {
                        json_out(
                            out,
                            &serde_json::json!({ "hash": hashes[0], "size": size, "path": p.to_string_lossy(), "seconds": secs }),
                        )?;
                    }
                    Ok(0)
                }
                None => cat(store, &hashes[0], out),
            }
        }
        Command::Providers { .. }
        | Command::Connect { .. }
        | Command::Peers
        | Command::Status
        | Command::Ls { .. }
        | Command::Open { .. }
        | Command::Share { .. }
        | Command::Pin { .. }
        | Command::Unpin { .. }
        | Command::Gc
        | Command::Verify { .. } => {
            let call = typed_call(cli)?.expect("a typed command");
            render(cli, api.call(call)?, out, err)
        }
        Command::Mount { .. }
        | Command::Daemon { .. }
        | Command::SwarmKey { .. }
        | Command::Completions { .. }
        | Command::Man => {
            bail!("a daemon is already running for this data directory")
        }
    }
}

/// The typed call a command is, if it is one: these go to the daemon as `api::Call`s and come
/// back as `api::Reply`s, rendered here.
fn typed_call(cli: &Cli) -> Result<Option<Call>> {
    let cmd = &cli.command;
    let hashes = || -> Result<Vec<Hash>> { hashes(cmd) };
    Ok(Some(match cmd {
        Command::Status => Call::Status,
        Command::Peers => Call::Peers,
        Command::Ls { hash: None, .. } => Call::Blobs,
        Command::Ls { hash: Some(t), .. } => Call::List { target: t.clone() },
        Command::Open { ticket } => Call::Open { target: ticket.clone() },
        // A path is read from the client's working directory (given in the daemon as --cwd).
        Command::Share { target } => Call::Share {
            target: target.clone(),
            cwd: Some(match &cli.cwd {
                Some(c) => c.clone(),
                None => std::env::current_dir().context("cannot read the current directory")?,
            }),
        },
        Command::Providers { hash, .. } => Call::Providers { target: hash.clone() },
        Command::Pin { .. } => Call::Pin { hashes: hashes()? },
        Command::Unpin { .. } => Call::Unpin { hashes: hashes()? },
        Command::Gc => Call::Gc,
        Command::Verify { .. } => Call::Verify { hashes: hashes()? },
        Command::Connect { addr } => Call::Connect { addr: addr.clone() },
        _ => return Ok(None),
    }))
}

/// A typed reply for people (or as JSON); returns the exit code.
fn render(cli: &Cli, reply: Reply, out: &mut dyn Write, err: &mut dyn Write) -> Result<u8> {
    if cli.json {
        match &reply {
            Reply::Status(v) => json_out(out, v)?,
            Reply::Peers(v) => json_out(out, v)?,
            Reply::Blobs(v) => json_out(out, v)?,
            Reply::Providers(v) => json_out(out, v)?,
            Reply::Pinned(v) => json_out(out, v)?,
            Reply::Unpinned(v) => json_out(out, v)?,
            Reply::Gc(v) => json_out(out, &v.evicted)?,
            Reply::Verified(v) => json_out(out, v)?,
            Reply::Connected { peers, failed } => {
                json_out(out, &serde_json::json!({ "peers": peers, "failed": failed }))?
            }
            Reply::Entries(v) => json_out(out, v)?,
            Reply::Shared { hash, ticket } => json_out(out, &serde_json::json!({ "hash": hash, "ticket": ticket }))?,
            Reply::Opened { hash, path, .. } => json_out(
                out,
                &serde_json::json!({ "hash": hash, "path": path.to_string_lossy() }),
            )?,
        }
    }
    match reply {
        Reply::Providers(rows) => {
            for r in rows.iter().filter(|_| !cli.json) {
                match (r.size, r.bytes_held) {
                    (Some(size), Some(held)) => writeln!(
                        out,
                        "{}  {:5.1}%  {} of {}",
                        r.peer,
                        100.0 * held as f64 / size.max(1) as f64,
                        human(held),
                        human(size)
                    )?,
                    _ => writeln!(out, "{}  (did not say what it holds)", r.peer)?,
                }
            }
            Ok(if rows.is_empty() { 1 } else { 0 })
        }
        Reply::Connected { peers, failed } => {
            for f in &failed {
                writeln!(err, "swarmfs: {f}")?;
            }
            for p in peers.iter().filter(|_| !cli.json) {
                writeln!(out, "{p}")?;
            }
            Ok(if peers.is_empty() { 1 } else { 0 })
        }
        Reply::Verified(report) => {
            for r in report.iter().filter(|_| !cli.json) {
                let h = r.hash;
                if let Some(e) = &r.error {
                    writeln!(out, "{h}: cannot verify: {e}")?;
                } else if r.corrupt.is_empty() {
                    writeln!(out, "{h}: OK")?;
                }
                for &g in &r.corrupt {
                    let s = g * crate::tree::GROUP_SIZE;
                    writeln!(out, "{h}: block {g} (bytes {s}..) CORRUPT, dropped")?;
                }
            }
            let bad = report.iter().any(|r| r.error.is_some() || !r.corrupt.is_empty());
            Ok(bad as u8)
        }
        Reply::Opened { hash, path, unanswered } => {
            if unanswered {
                writeln!(
                    err,
                    "swarmfs: no peer in the ticket answered; {hash} was found on the network"
                )?;
            }
            if !cli.json {
                writeln!(out, "{}", path.display())?;
            }
            Ok(0)
        }
        _ if cli.json => Ok(0),
        Reply::Shared { ticket, .. } => {
            writeln!(out, "{ticket}")?;
            Ok(0)
        }
        Reply::Entries(entries) => {
            for e in &entries {
                let name = String::from_utf8_lossy(&e.name);
                let (h, size) = (e.hash, e.size);
                match e.kind {
                    EntryKind::File => {
                        let kind = if e.exec { "file*" } else { "file " };
                        writeln!(out, "{h}  {size:>14}  {kind}  {name}")?
                    }
                    EntryKind::Folder => writeln!(out, "{h}  {size:>14}  dir    {name}/")?,
                    EntryKind::Symlink => {
                        let target = String::from_utf8_lossy(&e.target);
                        writeln!(out, "{h}  {size:>14}  link   {name} -> {target}")?
                    }
                }
            }
            Ok(0)
        }
        Reply::Peers(peers) => {
            for p in &peers {
                let rtt = p.rtt_ms.map_or("-".to_string(), |r| format!("{r:.1} ms"));
                let how = if p.direct { "direct" } else { "relayed" };
                writeln!(out, "{}  {how}  {}  {rtt}", p.peer, p.address)?;
            }
            Ok(0)
        }
        Reply::Status(status) => {
            render_status(&status, out)?;
            Ok(0)
        }
        Reply::Blobs(list) => {
            // Human sizes for people; bytes, as before, for scripts reading a pipe.
            let tty = io::stdout().is_terminal();
            let size = |n: u64| if tty { human(n) } else { n.to_string() };
            if tty {
                writeln!(out, "{:<64}  {:>10}  {:>10}  PINNED  NAME", "HASH", "SIZE", "PRESENT")?;
            }
            for b in list {
                let pinned = if b.pinned { "pinned" } else { "-" };
                let name = b.name.as_deref().unwrap_or("-");
                writeln!(
                    out,
                    "{}  {:>10}  {:>10}  {pinned:<6}  {name}",
                    b.hash,
                    size(b.size),
                    size(b.present)
                )?;
            }
            Ok(0)
        }
        Reply::Pinned(_) => Ok(0),
        Reply::Unpinned(done) => {
            // Unpinned, but a name in the mount still holds it: say which.
            for u in done {
                if let Some(name) = u.held_by {
                    writeln!(
                        out,
                        "{}: unpinned; still held by the name {name:?} in the mount",
                        u.hash
                    )?;
                }
            }
            Ok(0)
        }
        Reply::Gc(r) => {
            for b in &r.evicted {
                writeln!(out, "evicted {}  {}", b.hash, human(b.present))?;
            }
            writeln!(out, "cache: {} of {} used", human(r.cache_used), human(r.cache_size))?;
            Ok(0)
        }
    }
}

/// `status` for people.
fn render_status(status: &crate::api::Status, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "peer id    {}", status.net.peer_id)?;
    for a in &status.net.listen {
        writeln!(out, "listening  {a}")?;
    }
    for a in &status.net.external {
        writeln!(out, "reachable  {a}")?;
    }
    writeln!(out, "reach      {}", status.reachability)?;
    if let Some(m) = &status.mount {
        writeln!(out, "mount      {}", m.display())?;
    }
    if let Some(h) = &status.http {
        writeln!(out, "gateway    http://{h}/")?;
    }
    writeln!(out, "peers      {}", status.net.peers.len())?;
    writeln!(
        out,
        "cache      {} of {} ({} pinned, {} blobs)",
        human(status.cache_used),
        human(status.cache_size),
        human(status.pinned),
        status.blobs
    )?;
    writeln!(out, "transfers  {} active", status.active_transfers)?;
    writeln!(out, "sent       {}", human(status.net.bytes_sent))?;
    writeln!(out, "received   {}", human(status.net.bytes_received))?;
    for t in &status.transfers {
        writeln!(out, "blob       {}  ({} in its swarm)", t.hash, t.members)?;
        for p in &t.peers {
            let held = p.groups_held.map_or(String::new(), |g| format!("  holds {g} groups"));
            writeln!(
                out,
                "  {}  down {}/s  up {}/s  received {}  sent {}{held}",
                p.peer,
                human(p.down_rate),
                human(p.up_rate),
                human(p.received),
                human(p.sent)
            )?;
        }
    }
    Ok(())
}

/// Progress bars on stderr (indicatif): bytes, rate, ETA, peers; one summary line at the end.
#[derive(Default)]
pub struct Bars {
    bar: Option<indicatif::ProgressBar>,
}

impl Bars {
    pub fn update(&mut self, p: &Progress) {
        if p.pause {
            if let Some(b) = self.bar.take() {
                b.finish_and_clear();
            }
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            // At its position from the first draw: a bar drawn again after a result line
            // does not flash back to 0.
            let b = indicatif::ProgressBar::new(p.total).with_position(p.done);
            let style = indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes}{msg}")
                .map(|s| s.progress_chars("#>-"))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            b.set_style(style);
            b.set_prefix(p.what.clone());
            b
        });
        if bar.length() != Some(p.total) {
            bar.set_length(p.total);
        }
        bar.set_position(p.done);
        // Rate and ETA from the operation's own clock: a bar taken down for a result line
        // and drawn again keeps them.
        let secs = (p.elapsed_ms as f64 / 1000.0).max(0.001);
        let rate = p.done as f64 / secs;
        let mut msg = format!("  {}/s", human(rate as u64));
        if rate > 0.0 && p.total > p.done {
            msg.push_str(&format!("  ETA {:.0} s", (p.total - p.done) as f64 / rate));
        }
        if let Some((d, t)) = p.files {
            msg.push_str(&format!("  {d}/{t} files"));
        }
        if p.what == "get" {
            msg.push_str(&format!("  {} peer{}", p.peers, if p.peers == 1 { "" } else { "s" }));
        }
        bar.set_message(msg);
        if p.finished {
            bar.finish_and_clear();
            self.bar = None;
            let rate = human(rate as u64);
            let files = p.files.map_or(String::new(), |(d, _)| format!(", {d} files"));
            let peers = if p.what == "get" {
                format!(" from {} peer{}", p.peers, if p.peers == 1 { "" } else { "s" })
            } else {
                String::new()
            };
            let secs = if secs < 10.0 {
                format!("{secs:.2}")
            } else {
                format!("{secs:.1}")
            };
            eprintln!(
                "swarmfs: {} {}{files} in {secs} s ({rate}/s){peers}",
                p.what,
                human(p.done)
            );
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The line b3sum prints for a file, including its escaping of `\` and newlines in names.
/// Names are bytes: a byte that is not UTF-8 is written as it is, as b3sum does.
pub fn b3sum_line(h: &Hash, path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let p = path.as_os_str().as_bytes();
    let mut line = Vec::with_capacity(p.len() + 70);
    if p.iter().any(|&b| b == b'\\' || b == b'\n') {
        line.push(b'\\');
        line.extend_from_slice(h.to_string().as_bytes());
        line.extend_from_slice(b"  ");
        for &b in p {
            match b {
                b'\\' => line.extend_from_slice(b"\\\\"),
                b'\n' => line.extend_from_slice(b"\\n"),
                b => line.push(b),
            }
        }
    } else {
        line.extend_from_slice(h.to_string().as_bytes());
        line.extend_from_slice(b"  ");
        line.extend_from_slice(p);
    }
    line.push(b'\n');
    line
}

/// What `add` tells its progress bar.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Say {
    Progress,
    /// A result line follows: off the screen for now.
    Pause,
    Done,
}

/// Adds files (and with `recursive`, folders); relative paths are read from `cwd` when given
/// (the client's, in the daemon) and printed as they were given.
fn add(
    api: &Api,
    cli: &Cli,
    paths: &[PathBuf],
    recursive: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
    progress: &mut dyn FnMut(&Progress),
) -> Result<u8> {
    let (cwd, json) = (cli.cwd.as_deref(), cli.json);
    let store = api.store();
    let mut failed = false;
    let mut added = Vec::new();
    // Progress over the bytes of the files named and of the files beneath the folders named
    // (walked first: a stat is cheap beside hashing), a file of 32 MiB or more as it is read.
    let started = std::time::Instant::now();
    let mut total: u64 = paths
        .iter()
        .map(|p| {
            let real = cwd.map_or_else(|| p.clone(), |c| c.join(p));
            match std::fs::metadata(&real) {
                Ok(m) if m.is_file() => m.len(),
                Ok(m) if m.is_dir() && recursive => crate::folder_io::bytes_beneath(&real),
                _ => 0,
            }
        })
        .sum();
    let mut done = 0u64;
    let mut throttle = crate::api::Throttle::new();
    // `size` more bytes are stored; `reading`: bytes of the file being stored now.
    let mut report = |size: u64, reading: u64, say: Say| {
        done += size;
        total = total.max(done + reading);
        if say == Say::Pause {
            progress(&Progress {
                what: "add".into(),
                pause: true,
                ..Progress::default()
            });
            return;
        }
        let at = done + reading;
        let finished = say == Say::Done;
        let now = || Progress {
            what: "add".into(),
            done: at,
            total,
            elapsed_ms: started.elapsed().as_millis() as u64,
            finished,
            ..Progress::default()
        };
        throttle.report(progress, now, finished);
    };
    let mut line = |a: Added, out: &mut dyn Write, report: &mut dyn FnMut(u64, u64, Say)| -> Result<()> {
        if !a.folder {
            report(a.size, 0, Say::Progress);
        }
        if !json {
            // The bar leaves the screen to the result line; the next report brings it back.
            report(0, 0, Say::Pause);
        }
        if json {
            added.push(a);
        } else {
            let shown = if a.folder { a.path.join("") } else { a.path.clone() };
            out.write_all(&b3sum_line(&a.hash, &shown))?;
            out.flush()?;
        }
        Ok(())
    };
    // A big file reports as it is read (a thread polls the import); a small one just goes.
    let import = |path: &Path, report: &mut dyn FnMut(u64, u64, Say)| {
        let big = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() >= 32 << 20);
        if big {
            api.add_file_progress(path, &mut |reading| report(0, reading, Say::Progress))
        } else {
            api.add_file(path)
        }
    };
    for p in paths {
        let real = cwd.map_or_else(|| p.clone(), |c| c.join(p));
        if recursive && real.is_dir() {
            let mut skipped = Vec::new();
            // Both the import (bytes read) and each result line report: one at a time.
            let shared = std::cell::RefCell::new(&mut report);
            let res = crate::folder_io::add_dir(
                store,
                &real,
                p,
                &mut |path| Ok(import(path, &mut **shared.borrow_mut())?),
                &mut |h, size, shown| {
                    line(
                        Added {
                            hash: *h,
                            size,
                            path: shown.to_owned(),
                            folder: false,
                        },
                        &mut *out,
                        &mut **shared.borrow_mut(),
                    )
                },
                &mut |shown, why| skipped.push(format!("swarmfs: left out {}: {why}", shown.display())),
            );
            for s in skipped {
                writeln!(err, "{s}")?;
            }
            match res {
                Ok((hash, size)) => line(
                    Added {
                        hash,
                        size,
                        path: p.clone(),
                        folder: true,
                    },
                    &mut *out,
                    &mut report,
                )?,
                Err(e) => {
                    writeln!(err, "swarmfs: {e:#}")?;
                    failed = true;
                }
            }
            continue;
        }
        match import(&real, &mut report) {
            Ok((h, size)) => line(
                Added {
                    hash: h,
                    size,
                    path: p.clone(),
                    folder: false,
                },
                &mut *out,
                &mut report,
            )?,
            Err(e) if matches!(e.kind, ErrorKind::BadRequest | ErrorKind::Internal) => {
                writeln!(err, "swarmfs: {e}")?;
                failed = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
    report(0, 0, Say::Done);
    if json {
        json_out(out, &added)?;
    }
    Ok(failed as u8)
}

fn cat(store: &Store, h: &Hash, out: &mut (dyn Write + Send)) -> Result<u8> {
    match store.cat(h, out) {
        Ok(_) => Ok(0),
        // The reader went away (`swarmfs cat H | head`): not an error worth a word.
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e.into()),
    }
}
