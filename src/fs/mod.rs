//! The FUSE filesystem: `DIR/<hash>` for every local blob, and the user's own names.
//!
//! - `mod.rs` (this file): the state and the logic, as methods returning `Result<_, Errno>`.
//! - `ops.rs`: the `fuser::Filesystem` impl, a thin layer that replies exactly once.
//!
//! Callbacks never wait on slow work: reads, writes, commits and anything else that touches
//! blob bytes run on the tokio blocking pool and reply from there. Index lookups (sled, held
//! in memory) are answered inline.
//!
//! Inode numbers: the root is 1, the user's names take numbers from the names table, blobs
//! get numbers from `HASH_INO_BASE` up, and the entries inside published folders
//! (`DIR/<folder hash>/...`) from `TREE_INO_BASE` up, each handed out as it is first looked up.
//!
//! A blob whose content is a folder manifest (see `folder.rs`) is a read-only folder: looking
//! it up or listing it fetches only manifests; its files are fetched as they are read.

mod ops;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{BackingId, Errno, FileAttr, FileType, INodeNo};

use crate::folder::{self, Entry, EntryKind, FolderError, Manifest, ManifestSource, Reader};
use crate::hash::Hash;
use crate::names::{self, Kind, Names, NamesError, Node, ROOT};
use crate::store::{BlobReader, Staging, Store, StoreError};

/// Blob inode numbers start here, far above any the names table will reach.
const HASH_INO_BASE: u64 = 1 << 48;
/// Entries inside published folders take numbers from here up.
const TREE_INO_BASE: u64 = 1 << 56;
/// Parsed manifests kept in memory (each at most 1 MiB on disk).
const MANIFESTS_KEPT: usize = 128;
/// Blobs never change, so the kernel may keep their entries and attributes for long.
const HASH_TTL: Duration = Duration::from_secs(24 * 3600);
/// The user's names change only through us; a short TTL keeps other views honest.
const NAME_TTL: Duration = Duration::from_secs(1);
/// The first read-ahead window, in groups (256 KiB), and the largest (8 MiB).
const UNIT_GROUPS: u64 = 16;
const MAX_AHEAD: u64 = 512;
/// The extended attribute that tells a user file's hash.
pub const HASH_XATTR: &str = "user.swarmfs.hash";

/// Where blobs that are not local come from. The peer network fills this in; until then the
/// answer is always "nobody has it".
pub trait BlobSource: Send + Sync + 'static {
    /// Finds blob `hash` elsewhere and returns its verified size, or `None` after at most
    /// `timeout`.
    fn find(&self, hash: &Hash, timeout: Duration) -> Option<u64>;

    /// Makes the groups in `want` of a blob this source found present locally, waiting at
    /// most the read timeout, and starts fetching `readahead` in the background. True when
    /// `want` is present.
    fn fetch(&self, hash: &Hash, want: std::ops::Range<u64>, readahead: std::ops::Range<u64>) -> bool;

    /// Blob `hash` verified, but its content is hostile (a malformed folder manifest): the
    /// peers that provide it are banned.
    fn refuse(&self, _hash: &Hash, _why: &str) {}
}

/// The source with no peers: every unknown hash is ENOENT at once.
pub struct NoSource;

impl BlobSource for NoSource {
    fn find(&self, _hash: &Hash, _timeout: Duration) -> Option<u64> {
        None
    }

    fn fetch(&self, _hash: &Hash, _want: std::ops::Range<u64>, _readahead: std::ops::Range<u64>) -> bool {
        false
    }
}

/// Options for the mount.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// How long a lookup of an unknown hash may wait for `BlobSource::find`.
    pub lookup_timeout: Duration,
    /// Try FUSE passthrough for complete blobs.
    pub passthrough: bool,
}

/// What an open file handle refers to.
enum Handle {
    /// `DIR/<hash>`; the reader is opened on the first read, off the FUSE thread.
    Blob {
        hash: Hash,
        reader: Mutex<Option<BlobReader>>,
        _backing: Option<Arc<BackingId>>,
        /// Read-ahead: the offset a sequential read would come next, and the window in
        /// groups, which doubles while reads stay sequential.
        ahead: Mutex<(u64, u64)>,
        /// An open blob is never evicted under its reader.
        _hold: Holding,
        /// For a file inside a published folder: the size its folder says, and that folder.
        expect: Option<(u64, Hash)>,
    },
    /// A user file; `write` if opened for writing.
    File {
        ino: u64,
        write: bool,
        reader: Mutex<Option<(Hash, BlobReader)>>,
    },
}

/// Holds a blob against eviction for as long as a handle lives.
struct Holding(Arc<Store>, Hash);

impl Holding {
    fn new(store: &Arc<Store>, h: Hash) -> Holding {
        store.hold(&h);
        Holding(store.clone(), h)
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.unhold(&self.1);
    }
}

/// A user file with at least one handle open for writing.
struct OpenFile {
    /// The new content, started on the first write or truncate.
    staging: Option<Staging>,
    /// Written since the last explicit mtime, so the commit stamps the time of writing.
    touched: bool,
    /// Bytes were written since the last commit (not only a truncation).
    written: bool,
    /// A write or truncate failed (a full disk): the staged content is not what the program
    /// wrote, so it must never be published.
    failed: bool,
}

/// The map's entry for a file open for writing. The handle count lives outside the mutex so
/// that open and release never wait for a commit in progress.
struct OpenEntry {
    writers: AtomicUsize,
    state: Mutex<OpenFile>,
}

/// Blob inode numbers, both ways.
#[derive(Default)]
struct HashInos {
    by_hash: HashMap<Hash, u64>,
    by_ino: HashMap<u64, Hash>,
}

/// An entry inside a published folder (`DIR/<folder hash>/...`).
struct TreeNode {
    /// The inode of the folder that lists it.
    parent: u64,
    entry: Entry,
    /// Folders between it and the `DIR/<hash>` it was reached from (0: listed there).
    depth: usize,
    /// The folder that lists it: its providers answer for what the entry says.
    from: Hash,
}

/// Inode numbers of entries inside published folders, both ways.
#[derive(Default)]
struct TreeInos {
    nodes: HashMap<u64, Arc<TreeNode>>,
    by_key: HashMap<(u64, Vec<u8>), u64>,
}

/// Parsed manifests, the last `MANIFESTS_KEPT` used.
#[derive(Default)]
struct Parsed {
    map: HashMap<Hash, Arc<Manifest>>,
    order: std::collections::VecDeque<Hash>,
}

/// The filesystem's state, shared by the FUSE threads and the tasks they start.
pub struct Inner {
    store: Arc<Store>,
    names: Arc<Names>,
    source: Arc<dyn BlobSource>,
    rt: tokio::runtime::Handle,
    opts: FsOptions,
    uid: u32,
    gid: u32,
    hash_inos: Mutex<HashInos>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    open: Mutex<HashMap<u64, Arc<OpenEntry>>>,
    /// The length of each staged file, and when it was last written, readable without
    /// waiting for its `OpenFile` (which a commit holds while it fsyncs).
    staged: Mutex<HashMap<u64, Staged>>,
    backing: Mutex<HashMap<u64, Weak<BackingId>>>,
    /// The kernel agreed to passthrough (set in `init`).
    passthrough: AtomicBool,
    /// Blobs being verified whole in the background, before passthrough may read them.
    checking: Mutex<std::collections::HashSet<Hash>>,
    /// Files removed from the names (unlink, rename over) while descriptors had them open:
    /// kept in memory, with their blob held, until the last of those is released. Nothing
    /// written to them is published.
    orphans: Mutex<HashMap<u64, (Node, Option<Holding>)>>,
    /// Entries inside published folders.
    tree_inos: Mutex<TreeInos>,
    /// Blobs looked up by hash: true if the blob is a folder. Content never changes, so
    /// neither does the answer.
    kinds: Mutex<HashMap<Hash, bool>>,
    parsed: Mutex<Parsed>,
}

/// What `getattr` shows of a file with staged changes.
#[derive(Clone, Copy)]
struct Staged {
    len: u64,
    /// The time of the last write or truncate; `None` after an explicit mtime (`cp -a`).
    mtime: Option<u64>,
}

/// Forgets a file's staged length once its commit is over, whatever the outcome: by then the
/// name holds the size again.
struct Unstage<'a>(&'a Inner, u64);

impl Drop for Unstage<'_> {
    fn drop(&mut self) {
        lock(&self.0.staged).remove(&self.1);
    }
}

/// The filesystem handed to fuser.
pub struct SwarmFs(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

impl From<NamesError> for Errno {
    fn from(e: NamesError) -> Errno {
        match e {
            NamesError::NotFound => Errno::ENOENT,
            NamesError::Exists => Errno::EEXIST,
            NamesError::NotEmpty => Errno::ENOTEMPTY,
            NamesError::NotDir => Errno::ENOTDIR,
            NamesError::IsDir => Errno::EISDIR,
            NamesError::Invalid => Errno::EINVAL,
            NamesError::NameTooLong => Errno::ENAMETOOLONG,
            NamesError::DirLink => Errno::EPERM,
            NamesError::Db(e) => index_errno(e),
        }
    }
}

/// The errno for a store failure; every one that is not the caller's fault is logged.
fn store_errno(e: StoreError) -> Errno {
    match e {
        StoreError::NotFound(_) => Errno::ENOENT,
        StoreError::Db { source, .. } => index_errno(source),
        StoreError::Io { what, source } => {
            tracing::error!("{what}: {source}");
            Errno::from(source)
        }
        e @ (StoreError::Corrupt { .. } | StoreError::Missing { .. }) => {
            // The store has logged the block by name.
            tracing::debug!("{e}");
            Errno::EIO
        }
        e => {
            tracing::error!("{e}");
            Errno::EIO
        }
    }
}

/// The errno for an index failure: ENOSPC while the disk is full (the index opens again by
/// itself once there is room, see `store/index.rs`), EIO otherwise.
fn index_errno(e: sled::Error) -> Errno {
    match e {
        sled::Error::Io(e) => io_errno("index database", e),
        e => {
            tracing::error!("index database: {e}");
            Errno::EIO
        }
    }
}

fn io_errno(what: &str, e: std::io::Error) -> Errno {
    if e.kind() == std::io::ErrorKind::StorageFull {
        tracing::warn!("{what}: the disk is full");
    } else {
        tracing::error!("{what}: {e}");
    }
    Errno::from(e)
}

impl SwarmFs {
    /// A handle on the filesystem's state that outlives the FUSE session (for the shutdown).
    pub fn inner(&self) -> Arc<Inner> {
        self.0.clone()
    }

    /// A filesystem over `store` and `names`; blocking work runs on `rt`.
    pub fn new(
        store: Arc<Store>,
        names: Arc<Names>,
        source: Arc<dyn BlobSource>,
        rt: tokio::runtime::Handle,
        opts: FsOptions,
    ) -> SwarmFs {
        let (uid, gid) = own_ids();
        SwarmFs(Arc::new(Inner {
            store,
            names,
            source,
            rt,
            opts,
            uid,
            gid,
            hash_inos: Mutex::new(HashInos::default()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
            staged: Mutex::new(HashMap::new()),
            backing: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(false),
            checking: Mutex::default(),
            orphans: Mutex::default(),
            tree_inos: Mutex::default(),
            kinds: Mutex::default(),
            parsed: Mutex::default(),
        }))
    }
}

/// The daemon's own uid and gid (the owner of `/proc/self`).
pub fn own_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or((0, 0), |m| (m.uid(), m.gid()))
}

impl Inner {
    /// The inode number of blob `h`, handed out on first use.
    fn hash_ino(&self, h: &Hash) -> u64 {
        let mut t = lock(&self.hash_inos);
        if let Some(&ino) = t.by_hash.get(h) {
            return ino;
        }
        let ino = HASH_INO_BASE + t.by_hash.len() as u64;
        t.by_hash.insert(*h, ino);
        t.by_ino.insert(ino, *h);
        ino
    }

    fn ino_hash(&self, ino: u64) -> Option<Hash> {
        lock(&self.hash_inos).by_ino.get(&ino).copied()
    }

    /// The attributes of blob `h`, if it is held locally (a folder's, if it is one).
    fn hash_attr(&self, h: &Hash) -> Result<Option<FileAttr>, Errno> {
        let Some(info) = self.store.info(h).map_err(store_errno)? else {
            return Ok(None);
        };
        if lock(&self.kinds).get(h) == Some(&true) {
            return Ok(Some(self.dir_attr(self.hash_ino(h))));
        }
        Ok(Some(FileAttr {
            ino: INodeNo(self.hash_ino(h)),
            size: info.size,
            blocks: info.present.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }))
    }

    /// The attributes of a user node; an open file reports its staged length.
    fn node_attr(&self, ino: u64, n: &Node) -> FileAttr {
        let staged = lock(&self.staged).get(&ino).copied().filter(|_| n.kind == Kind::File);
        let size = match n.kind {
            Kind::File => staged.map_or(n.size, |s| s.len),
            Kind::Dir => 4096,
            Kind::Symlink => n.target.len() as u64,
            _ => 0,
        };
        // A file being written shows the time of its last write, as a local file does.
        let written = staged.and_then(|s| s.mtime);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: names::to_time(n.atime),
            mtime: names::to_time(written.unwrap_or(n.mtime)),
            ctime: names::to_time(written.unwrap_or(n.ctime).max(n.ctime)),
            crtime: names::to_time(n.ctime),
            kind: file_type(n.kind),
            perm: n.perm as u16,
            nlink: n.nlink.max(1),
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    /// Attributes and TTL for any inode.
    fn attr(&self, ino: u64) -> Result<(FileAttr, Duration), Errno> {
        if let Some(n) = self.tree_node(ino) {
            return Ok((self.tree_attr(ino, &n)?, HASH_TTL));
        }
        if let Some(h) = self.ino_hash(ino) {
            return self.hash_attr(&h)?.map(|a| (a, HASH_TTL)).ok_or(Errno::ENOENT);
        }
        if let Some(n) = self.names.get(ino)? {
            return Ok((self.node_attr(ino, &n), NAME_TTL));
        }
        let n = self.orphan_node(ino).ok_or(Errno::ENOENT)?;
        let mut a = self.node_attr(ino, &n);
        a.nlink = 0;
        Ok((a, NAME_TTL))
    }

    /// The node of a name, or of a removed file that is still open.
    fn node(&self, ino: u64) -> Result<Node, Errno> {
        match self.names.get(ino)? {
            Some(n) => Ok(n),
            None => self.orphan_node(ino).ok_or(Errno::ENOENT),
        }
    }

    fn orphan_node(&self, ino: u64) -> Option<Node> {
        lock(&self.orphans).get(&ino).map(|(n, _)| n.clone())
    }

    fn is_orphan(&self, ino: u64) -> bool {
        lock(&self.orphans).contains_key(&ino)
    }

    /// Changes a node, whether it is a name or a removed file still open.
    pub(crate) fn update_node(&self, ino: u64, f: impl FnOnce(&mut Node)) -> Result<Node, Errno> {
        if let Some((n, _)) = lock(&self.orphans).get_mut(&ino) {
            f(n);
            return Ok(n.clone());
        }
        Ok(self.names.update(ino, f)?)
    }

    /// True if a file handle on `ino` is open.
    fn has_handles(&self, ino: u64) -> bool {
        lock(&self.handles)
            .values()
            .any(|h| matches!(**h, Handle::File { ino: i, .. } if i == ino))
    }

    /// A file was just removed from the names (unlink, or renamed over): if descriptors still
    /// have it open, it lives on for them until the last is released.
    pub(crate) fn removed(&self, ino: u64, node: Node) {
        if node.kind != Kind::File || node.nlink > 0 || !self.has_handles(ino) {
            return;
        }
        let hold = node.hash.map(|h| Holding::new(&self.store, h));
        lock(&self.orphans).insert(ino, (node, hold));
    }

    /// A file handle on `ino` was released: a removed file goes with its last handle.
    pub(crate) fn released(&self, ino: u64) {
        if self.is_orphan(ino) && !self.has_handles(ino) {
            lock(&self.orphans).remove(&ino);
            lock(&self.open).remove(&ino);
            lock(&self.staged).remove(&ino);
        }
    }

    fn open_file(&self, ino: u64) -> Option<Arc<OpenEntry>> {
        lock(&self.open).get(&ino).cloned()
    }

    /// Counts a new write handle on `ino`.
    fn add_writer(&self, ino: u64, new_file: bool) {
        let mut open = lock(&self.open);
        let e = open.entry(ino).or_insert_with(|| {
            Arc::new(OpenEntry {
                writers: AtomicUsize::new(0),
                state: Mutex::new(OpenFile {
                    staging: None,
                    touched: new_file,
                    written: false,
                    failed: false,
                }),
            })
        });
        e.writers.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops a write handle; returns the entry if it was the last, for the caller to commit.
    fn remove_writer(&self, ino: u64) -> Option<Arc<OpenEntry>> {
        let mut open = lock(&self.open);
        let e = open.get(&ino)?;
        if e.writers.fetch_sub(1, Ordering::Relaxed) == 1 && !self.is_orphan(ino) {
            return open.remove(&ino);
        }
        // (A removed file keeps its staged bytes for its readers until `released`.)
        None
    }

    /// Names in the root that are blob names belong to the read-only hash namespace, and so
    /// do their look-alikes in other cases: a name `3F2A...` must not hold other content than
    /// the blob `3f2a...`. Everything inside a published folder is read-only too.
    fn reserved(parent: u64, name: &OsStr) -> bool {
        is_read_only(parent) || (parent == ROOT && name.to_str().is_some_and(|s| s.parse::<Hash>().is_ok()))
    }

    fn new_fh(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        lock(&self.handles).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// Runs `f` on the blocking pool. FUSE threads hand off every piece of slow work this way.
    fn spawn(self: &Arc<Self>, f: impl FnOnce(&Arc<Inner>) + Send + 'static) {
        let me = self.clone();
        self.rt.spawn_blocking(move || f(&me));
    }

    /// Reads from a blob handle or a user file handle.
    fn read(&self, h: &Handle, off: u64, size: u32) -> Result<Vec<u8>, Errno> {
        match h {
            Handle::Blob {
                hash,
                reader,
                ahead,
                expect,
                ..
            } => {
                for attempt in 0..2 {
                    // The reader is not held while the network is waited on: the kernel sends
                    // a read call's requests at once, and each must wait only for its own
                    // groups.
                    let (e, blob_size) = {
                        let mut r = lock(reader);
                        if r.is_none() || attempt > 0 {
                            let rd = self.blob_reader(hash)?;
                            if let Some((size, from)) = *expect {
                                if rd.size() != size {
                                    let why = format!("says {hash} is {size} bytes, and it is {}", rd.size());
                                    tracing::warn!(folder = %from, "refused: the folder's manifest {why}");
                                    self.source
                                        .refuse(&from, &format!("is a folder manifest that lies ({why})"));
                                    return Err(Errno::EIO);
                                }
                            }
                            *r = Some(rd);
                        }
                        let rd = r.as_mut().expect("just set");
                        match rd.read_at(off, size as usize) {
                            Ok(d) => return Ok(d),
                            Err(e) => (e, rd.size()),
                        }
                    };
                    match e {
                        e @ (StoreError::Missing { .. } | StoreError::Corrupt { .. }) if attempt == 0 => {
                            // A corrupt block is dropped, then fetched again like a missing one.
                            if let StoreError::Corrupt { group, .. } = e {
                                self.store.found_corrupt(hash, group);
                            }
                            let tree = crate::tree::Tree::new(blob_size);
                            let want = tree.groups_for_bytes(off..off + size as u64);
                            let readahead = {
                                let mut a = lock(ahead);
                                a.1 = if a.0 == off {
                                    (a.1 * 2).clamp(UNIT_GROUPS, MAX_AHEAD)
                                } else {
                                    UNIT_GROUPS
                                };
                                a.0 = off + size as u64;
                                want.end..(want.end + a.1).min(tree.groups())
                            };
                            if !self.source.fetch(hash, want, readahead) {
                                return Err(Errno::EIO);
                            }
                        }
                        e => return Err(store_errno(self.store.note_corrupt(e))),
                    }
                }
                Err(Errno::EIO)
            }
            Handle::File { ino, reader, .. } => {
                if let Some(o) = self.open_file(*ino) {
                    let o = lock(&o.state);
                    if let Some(s) = &o.staging {
                        let mut buf = vec![0u8; size as usize];
                        let n = s
                            .read_at(off, &mut buf)
                            .map_err(|e| io_errno("reading a staged file", e))?;
                        buf.truncate(n);
                        return Ok(buf);
                    }
                }
                let node = self.node(*ino)?;
                let Some(hash) = node.hash else {
                    return Ok(Vec::new());
                };
                let mut r = lock(reader);
                if r.as_ref().is_none_or(|(h, _)| *h != hash) {
                    *r = Some((hash, self.store.reader(&hash).map_err(store_errno)?));
                }
                let (_, r) = r.as_mut().expect("just set");
                r.read_at(off, size as usize)
                    .map_err(|e| store_errno(self.store.note_corrupt(e)))
            }
        }
    }

    /// A reader on blob `h`; a blob that is not local (evicted since it was looked up) is
    /// looked up again among peers, like any remote hash.
    fn blob_reader(&self, h: &Hash) -> Result<BlobReader, Errno> {
        match self.store.reader(h) {
            Err(StoreError::NotFound(_)) => {
                tracing::info!(hash = %h, "not held here any more; looking it up again");
                self.source.find(h, self.opts.lookup_timeout).ok_or(Errno::ENOENT)?;
                self.store.reader(h).map_err(store_errno)
            }
            r => r.map_err(store_errno),
        }
    }

    /// The attributes of blob `h`, looked up among peers if it is not local.
    fn hash_attr_or_find(&self, h: &Hash) -> Result<FileAttr, Errno> {
        if let Some(a) = self.hash_attr(h)? {
            return Ok(a);
        }
        match self.source.find(h, self.opts.lookup_timeout) {
            Some(_) => self.hash_attr(h)?.ok_or(Errno::ENOENT),
            None => Err(Errno::ENOENT),
        }
    }

    /// The staged content of an open file, started from its committed content (the first
    /// `keep` bytes of it) on the first change.
    fn staging<'a>(&self, ino: u64, o: &'a mut OpenFile, keep: u64) -> Result<&'a mut Staging, Errno> {
        if o.staging.is_none() {
            let node = self.node(ino)?;
            let s = match node.hash {
                Some(h) if node.size > 0 && keep > 0 => self.store.stage_from(&h, keep.min(node.size)),
                _ => self.store.stage(),
            }
            .map_err(store_errno)?;
            o.staging = Some(s);
        }
        Ok(o.staging.as_mut().expect("just set"))
    }

    /// Writes to an open user file.
    fn write(&self, ino: u64, off: u64, data: Vec<u8>) -> Result<(), Errno> {
        let o = self.open_file(ino).ok_or(Errno::EBADF)?;
        let mut o = lock(&o.state);
        o.touched = true;
        o.written = true;
        let res = self.staging(ino, &mut o, u64::MAX).and_then(|s| {
            s.write_owned(off, data)
                .map_err(|e| io_errno("writing a staged file", e))?;
            let written = Staged {
                len: s.len(),
                mtime: Some(names::now_ns()),
            };
            lock(&self.staged).insert(ino, written);
            Ok(())
        });
        o.failed |= res.is_err();
        res
    }

    /// Stores an open file's staged content as a blob, points the name at it (the name now
    /// holds the blob) and makes the name durable. Nothing is published if this fails.
    fn commit(&self, ino: u64, o: &mut OpenFile) -> Result<(), Errno> {
        if self.is_orphan(ino) {
            // Removed while open: no name to publish under; the staged bytes serve the
            // descriptors still open and go with the last of them.
            return Ok(());
        }
        let _unstage = Unstage(self, ino);
        if o.failed {
            // Drop the staged bytes; the name keeps what it had.
            o.staging = None;
            o.failed = false;
            tracing::warn!(ino, "a write to this file failed; its new content is not published");
            return Err(Errno::EIO);
        }
        let Some(s) = o.staging.take() else {
            // A new file closed without a write is the empty blob.
            if self.node(ino)?.hash.is_none() {
                self.name_empty_file(ino)?;
            }
            return Ok(());
        };
        o.written = false;
        let (h, size, _held) = self.store.commit_staged(s).map_err(store_errno)?;
        let touched = std::mem::take(&mut o.touched);
        let written = lock(&self.staged).get(&ino).and_then(|s| s.mtime);
        match self.names.update(ino, |n| {
            n.hash = Some(h);
            n.size = size;
            if touched {
                n.mtime = written.unwrap_or_else(names::now_ns);
                n.ctime = names::now_ns();
            }
        }) {
            Ok(_) => {
                tracing::info!(hash = %h, size, ino, "stored a written file");
                // A close that returned is a save: the name survives a crash from here on.
                self.sync_names()?;
            }
            // Unlinked while open: the blob is stored, there is just no name to point at it.
            Err(NamesError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Points a new file's name at the empty blob.
    pub(crate) fn name_empty_file(&self, ino: u64) -> Result<(), Errno> {
        let _held = self.store.hold_guard(Hash::of(&[]));
        let (h, _) = self.store.import_reader(&[][..], false).map_err(store_errno)?;
        self.names.update(ino, |n| n.hash = Some(h))?;
        Ok(())
    }

    /// `flush` (every close of a descriptor): commits what was written. A truncation with
    /// nothing written after it (`echo text > f` closes a duplicate of its descriptor between
    /// the two) waits for a write, the last release or an fsync, so that a crash never finds
    /// the name empty in between.
    pub(crate) fn flush_file(&self, ino: u64) -> Result<(), Errno> {
        let Some(o) = self.open_file(ino) else {
            return Ok(());
        };
        let mut o = lock(&o.state);
        // A handle that only truncated to nothing (an O_TRUNC open, closed by a forked child
        // before the parent writes) does not empty the name at its close; that waits for the
        // release. A truncation to another length (`truncate -s N`) is a save like a write.
        let emptied = lock(&self.staged).get(&ino).is_none_or(|s| s.len == 0);
        if o.staging.is_some() && !o.written && !o.failed && emptied && self.node(ino)?.hash.is_some() {
            return Ok(());
        }
        self.commit(ino, &mut o)
    }

    /// `fsync` of a user file: its content as it stands is committed (stored as a blob and
    /// named) even though it stays open, and the names are made durable.
    pub(crate) fn sync_file(&self, ino: u64) -> Result<(), Errno> {
        if let Some(o) = self.open_file(ino) {
            let mut o = lock(&o.state);
            if self.uncommitted(ino, &o) {
                self.commit(ino, &mut o)?;
            }
        }
        self.sync_names()
    }

    /// True if an open file holds what its name does not: staged changes, a failed write to
    /// report, or no content yet at all (a new file).
    fn uncommitted(&self, ino: u64, o: &OpenFile) -> bool {
        o.staging.is_some() || o.failed || self.node(ino).is_ok_and(|n| n.hash.is_none())
    }

    /// Makes every name change so far durable (the names share the index database, whose
    /// flush covers both; committed blobs are durable already).
    pub(crate) fn sync_names(&self) -> Result<(), Errno> {
        self.names.flush().map_err(|e| {
            tracing::error!("cannot flush the names table: {e}");
            Errno::EIO
        })
    }

    /// Commits every file open for writing as it stands (a clean stop); returns how many
    /// were committed, and logs each that could not be.
    pub fn commit_all_open(&self) -> usize {
        let open: Vec<(u64, Arc<OpenEntry>)> = lock(&self.open).iter().map(|(i, o)| (*i, o.clone())).collect();
        let mut n = 0;
        for (ino, o) in open {
            let mut o = lock(&o.state);
            if !self.uncommitted(ino, &o) {
                continue;
            }
            match self.commit(ino, &mut o) {
                Ok(()) => n += 1,
                Err(e) => tracing::error!(ino, "cannot commit a file open at shutdown: {e:?}"),
            }
        }
        n
    }

    /// Changes a user file's length, whether or not it is open.
    fn truncate(&self, ino: u64, len: u64) -> Result<(), Errno> {
        let node = self.node(ino)?;
        if node.kind != Kind::File {
            return Err(Errno::EISDIR);
        }
        let open = self.open_file(ino);
        let mut closed = OpenFile {
            staging: None,
            touched: true,
            written: false,
            failed: false,
        };
        let mut guard = open.as_ref().map(|o| lock(&o.state));
        let o = guard.as_deref_mut().unwrap_or(&mut closed);
        o.touched = true;
        let res = self.staging(ino, o, len).and_then(|s| {
            s.set_len(len).map_err(|e| io_errno("truncating a staged file", e))?;
            let truncated = Staged {
                len,
                mtime: Some(names::now_ns()),
            };
            lock(&self.staged).insert(ino, truncated);
            Ok(())
        });
        o.failed |= res.is_err();
        res?;
        if open.is_none() {
            // Nobody has the file open: publish the new length now.
            self.commit(ino, o)?;
        }
        Ok(())
    }

    /// The backing file for passthrough of a complete blob, shared by all its open handles.
    fn backing(self: &Arc<Self>, ino: u64, h: &Hash, reply: &fuser::ReplyOpen) -> Option<Arc<BackingId>> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        // Only a file that verified whole in this daemon's life and has not changed since;
        // any other is read through the daemon, verified, and checked in the background.
        let Some(path) = self.store.passthrough_file(h) else {
            lock(&self.backing).remove(&ino);
            self.check_in_background(*h);
            return None;
        };
        let mut map = lock(&self.backing);
        if let Some(id) = map.get(&ino).and_then(Weak::upgrade) {
            return Some(id);
        }
        let file = std::fs::File::open(path).ok()?;
        match reply.open_backing(&file) {
            Ok(id) => {
                let id = Arc::new(id);
                map.insert(ino, Arc::downgrade(&id));
                Some(id)
            }
            Err(e) => {
                tracing::info!("passthrough is not available ({e}); reads go through the daemon");
                self.passthrough.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// Verifies complete blob `h` whole on the blocking pool (once at a time), so that later
    /// opens may use passthrough.
    fn check_in_background(self: &Arc<Self>, h: Hash) {
        if !matches!(self.store.complete_file(&h), Ok(Some(_))) || !lock(&self.checking).insert(h) {
            return;
        }
        self.spawn(move |fs| {
            match fs.store.check_for_passthrough(&h) {
                Ok(true) => tracing::info!(hash = %h, "verified whole: passthrough from the next open"),
                Ok(false) => tracing::warn!(hash = %h, "did not verify whole: reads stay in the daemon"),
                Err(e) => tracing::warn!(hash = %h, "cannot check the blob: {e}"),
            }
            lock(&fs.checking).remove(&h);
        });
    }

    /// The entries of a folder: user names, then (in the root) the local blobs.
    fn dir_entries(&self, ino: u64) -> Result<Vec<(u64, FileType, Vec<u8>)>, Errno> {
        if is_read_only(ino) {
            return self.tree_entries(ino);
        }
        let node = self.node(ino)?;
        if node.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let mut out = vec![
            (ino, FileType::Directory, b".".to_vec()),
            (node.parent, FileType::Directory, b"..".to_vec()),
        ];
        for (cino, c) in self.names.children(ino, 0)? {
            out.push((cino, file_type(c.kind), c.name));
        }
        if ino == ROOT {
            let mut blobs = self.store.list().map_err(store_errno)?;
            blobs.sort_by_key(|b| b.hash);
            let kinds = lock(&self.kinds);
            for b in blobs {
                let kind = if kinds.get(&b.hash) == Some(&true) {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                out.push((self.hash_ino(&b.hash), kind, b.hash.to_string().into_bytes()));
            }
        }
        Ok(out)
    }

    /// Looks up `name` in `parent`; blob names in the root ask the store, then the source.
    fn lookup(&self, parent: u64, name: &OsStr) -> Result<(FileAttr, Duration), Errno> {
        if parent == ROOT {
            if let Some(h) = name.to_str().and_then(Hash::parse_lowercase) {
                let a = self.hash_attr_or_find(&h)?;
                if self.classify(&h)? {
                    return Ok((self.dir_attr(a.ino.0), HASH_TTL));
                }
                return Ok((a, HASH_TTL));
            }
        }
        if is_read_only(parent) {
            let (h, total, depth) = self.folder_at(parent)?.ok_or(Errno::ENOTDIR)?;
            let e = Reader::new(&Manifests(self))
                .find(&h, total, name.as_bytes())
                .map_err(|e| self.folder_error(e))?
                .ok_or(Errno::ENOENT)?;
            if e.kind == EntryKind::Symlink && !folder::stays_inside(&e.target, depth) {
                // Listed, but refused when looked up.
                tracing::warn!(
                    folder = %h,
                    "refused: symlink {:?} -> {:?} climbs out of the folder",
                    String::from_utf8_lossy(&e.name),
                    String::from_utf8_lossy(&e.target)
                );
                return Err(Errno::EIO);
            }
            let ino = self.tree_ino(parent, e, depth, h);
            let n = self.tree_node(ino).ok_or(Errno::ENOENT)?;
            return Ok((self.tree_attr(ino, &n)?, HASH_TTL));
        }
        let (ino, n) = self.names.lookup(parent, name.as_bytes())?.ok_or(Errno::ENOENT)?;
        Ok((self.node_attr(ino, &n), NAME_TTL))
    }

    /// The value of `user.swarmfs.hash` for an inode: a folder's is computed (and its
    /// manifests stored and announced) from what it holds now.
    fn hash_of(&self, ino: u64) -> Result<Hash, Errno> {
        if let Some(n) = self.tree_node(ino) {
            return Ok(n.entry.hash);
        }
        if let Some(h) = self.ino_hash(ino) {
            return Ok(h);
        }
        let node = self.node(ino)?;
        if node.kind == Kind::Dir {
            return Ok(self.folder_hash(ino, 0)?.0);
        }
        node.hash.ok_or(Errno::ENODATA)
    }

    /// True if `ino` has a `user.swarmfs.hash` (without computing a folder's).
    fn has_hash(&self, ino: u64) -> bool {
        is_read_only(ino)
            || self
                .node(ino)
                .is_ok_and(|n| n.kind == Kind::Dir || (n.kind == Kind::File && n.hash.is_some()))
    }

    /// The hash of user folder `ino` (`depth` below the folder asked about) and the bytes of
    /// files beneath: the manifests of it and of every folder beneath are stored, announced,
    /// and held by their folders until they change. A file not yet closed counts with its
    /// last committed content; pipes, sockets, devices and absolute symlinks are left out.
    fn folder_hash(&self, ino: u64, depth: usize) -> Result<(Hash, u64), Errno> {
        if depth > folder::MAX_DEPTH {
            tracing::warn!(ino, "folders nested deeper than {} have no hash", folder::MAX_DEPTH);
            return Err(Errno::ELOOP);
        }
        let mut entries = Vec::new();
        for (cino, c) in self.names.children(ino, 0)? {
            match c.kind {
                Kind::File => {
                    let (h, size) = c.hash.map_or((Hash::EMPTY, 0), |h| (h, c.size));
                    entries.push(Entry::file(&c.name, size, h, folder::is_exec(c.perm)));
                }
                Kind::Dir => {
                    let (h, total) = self.folder_hash(cino, depth + 1)?;
                    entries.push(Entry::folder(&c.name, total, h));
                }
                Kind::Symlink if folder::check_target(&c.target).is_ok() => {
                    entries.push(Entry::symlink(&c.name, &c.target));
                }
                _ => tracing::debug!(ino = cino, "left out of its folder's manifest"),
            }
        }
        let built = folder::build(entries).map_err(|why| {
            tracing::error!(ino, "cannot make the folder's manifest: {why}");
            Errno::EIO
        })?;
        // Held from before they are stored until their folder holds them.
        let _held: Vec<_> = built.blobs.iter().map(|(h, _)| self.store.hold_guard(*h)).collect();
        crate::folder_io::store_manifests(&self.store, &built, false).map_err(store_errno)?;
        let hashes: Vec<Hash> = built.blobs.iter().map(|(h, _)| *h).collect();
        if self.node(ino)?.manifests != hashes {
            self.names.update(ino, |n| n.manifests = hashes)?;
        }
        Ok((built.hash, built.total))
    }

    /// Attributes of a read-only folder.
    fn dir_attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 4096,
            blocks: 8,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn tree_node(&self, ino: u64) -> Option<Arc<TreeNode>> {
        if ino < TREE_INO_BASE {
            return None;
        }
        lock(&self.tree_inos).nodes.get(&ino).cloned()
    }

    /// The inode of entry `e` of the published folder at inode `parent`, handed out on first
    /// use.
    fn tree_ino(&self, parent: u64, e: Entry, depth: usize, from: Hash) -> u64 {
        let mut t = lock(&self.tree_inos);
        let key = (parent, e.name.clone());
        if let Some(&ino) = t.by_key.get(&key) {
            return ino;
        }
        let ino = TREE_INO_BASE + t.nodes.len() as u64;
        t.by_key.insert(key, ino);
        t.nodes.insert(
            ino,
            Arc::new(TreeNode {
                parent,
                entry: e,
                depth,
                from,
            }),
        );
        ino
    }

    /// Attributes of an entry inside a published folder, all from its manifest: listing
    /// never fetches file content. A file's blocks count what is held here.
    fn tree_attr(&self, ino: u64, n: &TreeNode) -> Result<FileAttr, Errno> {
        let e = &n.entry;
        let mut a = self.dir_attr(ino);
        match e.kind {
            EntryKind::Folder => {}
            EntryKind::File => {
                let held = self.store.info(&e.hash).map_err(store_errno)?.map_or(0, |i| i.present);
                a.kind = FileType::RegularFile;
                a.size = e.size;
                a.blocks = held.div_ceil(512);
                a.perm = if e.exec { 0o555 } else { 0o444 };
                a.nlink = 1;
            }
            EntryKind::Symlink => {
                a.kind = FileType::Symlink;
                a.size = e.size;
                a.blocks = 0;
                a.perm = 0o777;
                a.nlink = 1;
            }
        }
        Ok(a)
    }

    /// True if blob `h` (found, so its first group is here or on its way) is a folder: its
    /// content starts with the manifest's magic line, and its manifest is sound.
    fn classify(&self, h: &Hash) -> Result<bool, Errno> {
        if let Some(&k) = lock(&self.kinds).get(h) {
            return Ok(k);
        }
        let size = self.store.info(h).map_err(store_errno)?.map_or(0, |i| i.size);
        let head = folder::MAGIC.len();
        let folder = if (head as u64..=folder::PART_BYTES as u64).contains(&size) {
            if !self.store.missing(h, 0..1).map_err(store_errno)?.is_empty() && !self.source.fetch(h, 0..1, 0..0) {
                return Err(Errno::EIO);
            }
            let start = self.store.reader(h).and_then(|mut r| r.read_at(0, head));
            folder::looks_like_manifest(&start.map_err(|e| store_errno(self.store.note_corrupt(e)))?)
        } else {
            false
        };
        if folder {
            // A blob that starts like a manifest and is not a sound one is refused whole.
            Reader::new(&Manifests(self))
                .root(h, None)
                .map_err(|e| self.folder_error(e))?;
        }
        lock(&self.kinds).insert(*h, folder);
        Ok(folder)
    }

    /// The published folder at inode `ino`: its manifest, the bytes its parent says are
    /// beneath (none for `DIR/<hash>`), and its depth below `DIR/<hash>`.
    fn folder_at(&self, ino: u64) -> Result<Option<(Hash, Option<u64>, usize)>, Errno> {
        if let Some(n) = self.tree_node(ino) {
            return Ok((n.entry.kind == EntryKind::Folder).then(|| (n.entry.hash, Some(n.entry.size), n.depth + 1)));
        }
        match self.ino_hash(ino) {
            Some(h) => Ok(self.classify(&h)?.then_some((h, None, 0))),
            None => Ok(None),
        }
    }

    /// The entries of a published folder, with `.` and `..`.
    fn tree_entries(&self, ino: u64) -> Result<Vec<(u64, FileType, Vec<u8>)>, Errno> {
        let (h, total, depth) = self.folder_at(ino)?.ok_or(Errno::ENOTDIR)?;
        let entries = Reader::new(&Manifests(self))
            .list(&h, total)
            .map_err(|e| self.folder_error(e))?;
        let parent = self.tree_node(ino).map_or(ROOT, |n| n.parent);
        let mut out = vec![
            (ino, FileType::Directory, b".".to_vec()),
            (parent, FileType::Directory, b"..".to_vec()),
        ];
        for e in entries {
            let kind = match e.kind {
                EntryKind::File => FileType::RegularFile,
                EntryKind::Folder => FileType::Directory,
                EntryKind::Symlink => FileType::Symlink,
            };
            let name = e.name.clone();
            out.push((self.tree_ino(ino, e, depth, h), kind, name));
        }
        Ok(out)
    }

    /// The errno for a folder that cannot be read; a hostile manifest's peers are banned.
    fn folder_error(&self, e: FolderError) -> Errno {
        tracing::warn!("{e}");
        match e {
            FolderError::Malformed { hash, why } => {
                self.source
                    .refuse(&hash, &format!("is a malformed folder manifest ({why})"));
                Errno::EIO
            }
            FolderError::NotAFolder(_) => Errno::ENOTDIR,
            FolderError::Escapes { .. } | FolderError::Unavailable { .. } => Errno::EIO,
        }
    }
}

/// True for inodes of the read-only hash namespace: blobs, and what published folders hold.
fn is_read_only(ino: u64) -> bool {
    ino >= HASH_INO_BASE
}

/// Manifests for the mount: from the store, fetched through the source if need be, and kept
/// parsed.
struct Manifests<'a>(&'a Inner);

impl ManifestSource for Manifests<'_> {
    fn get(&self, h: &Hash) -> Result<Vec<u8>, FolderError> {
        let fs = self.0;
        let unavailable = |why: &str| FolderError::Unavailable {
            hash: *h,
            why: why.to_string(),
        };
        let info = fs.store.info(h).map_err(|e| unavailable(&e.to_string()))?;
        let size = match info {
            Some(i) if i.size_verified => i.size,
            _ => fs
                .source
                .find(h, fs.opts.lookup_timeout)
                .ok_or_else(|| unavailable("no peer has it"))?,
        };
        if size > folder::PART_BYTES as u64 {
            return Err(FolderError::NotAFolder(*h));
        }
        let groups = crate::tree::Tree::new(size).groups();
        let missing = fs
            .store
            .missing(h, 0..groups)
            .map_err(|e| unavailable(&e.to_string()))?;
        if !missing.is_empty() && !fs.source.fetch(h, 0..groups, 0..0) {
            return Err(unavailable("its fetch did not finish in time"));
        }
        let mut r = fs.store.reader(h).map_err(|e| unavailable(&e.to_string()))?;
        r.read_at(0, size as usize).map_err(|e| unavailable(&e.to_string()))
    }

    fn cached(&self, h: &Hash) -> Option<Arc<Manifest>> {
        lock(&self.0.parsed).map.get(h).cloned()
    }

    fn cache(&self, h: Hash, m: Arc<Manifest>) {
        let mut p = lock(&self.0.parsed);
        if p.map.insert(h, m).is_none() {
            p.order.push_back(h);
        }
        while p.order.len() > MANIFESTS_KEPT {
            if let Some(old) = p.order.pop_front() {
                p.map.remove(&old);
            }
        }
    }
}
