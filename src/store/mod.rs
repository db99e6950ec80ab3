//! The blob store: verified blobs on disk, indexed by sled.
//!
//! Layout of a data directory:
//!
//! ```text
//! lock              held (flock) by the one process that has the store open; holds its pid
//! index/            sled: metadata, present-sets, pins, LRU order, small blobs inline
//! blobs/<hex>       a blob's bytes, exactly its content once complete (sparse while partial)
//! blobs/<hex>.obao  its outboard: the tree's pairs, see `tree.rs`
//! tmp/              imports in progress; emptied on open
//! ```
//!
//! Crash safety rests on two orders. An import is written under `tmp/`, fsynced, renamed into
//! `blobs/`, and only then entered in the index, so a blob in the index is whole. A partial
//! blob's groups are fsynced before the present-set that lists them is written, so the index
//! never claims bytes that a crash could lose. Whatever a crash strands (files in `tmp/`,
//! files in `blobs/` with no index entry) is swept on the next open.

mod import;
mod index;
mod meta;
mod partial;
mod present;
mod read;
mod staging;
mod trust;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::hash::Hash;
use crate::tree::{Tree, GROUP_SIZE};
pub use index::{Index, Table};
use meta::{key, lru_key, Meta, TAG_INLINE, TAG_LRU, TAG_META, TAG_PRESENT};
pub use partial::Written;
pub use present::Present;
pub use read::BlobReader;
pub use staging::Staging;

/// Blobs up to this size are kept inline in the index rather than in files.
pub const INLINE_MAX: u64 = GROUP_SIZE;
/// The cache cap when none was ever given.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;
const CFG_CACHE_SIZE: &[u8] = b"cfg/cache_size";

/// Everything that can go wrong in the store, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {dir} is in use by another swarmfs process (pid {pid})")]
    Busy { dir: PathBuf, pid: String },
    #[error("unknown blob {0}: it is not in the local store")]
    NotFound(Hash),
    #[error("blob {hash}: block {group} (bytes {}..{}) failed verification; the local copy is corrupt (run `swarmfs verify {hash}`)", bytes.start, bytes.end)]
    Corrupt {
        hash: Hash,
        group: u64,
        bytes: std::ops::Range<u64>,
    },
    #[error("blob {hash}: block {group} (bytes {}..{}) is not held locally", bytes.start, bytes.end)]
    Missing {
        hash: Hash,
        group: u64,
        bytes: std::ops::Range<u64>,
    },
    #[error("blob {hash}: the data sent does not verify")]
    BadData {
        hash: Hash,
        #[source]
        source: crate::bao::VerifyError,
    },
    #[error("blob {hash} is already known with size {known}, not {claimed}")]
    SizeMismatch { hash: Hash, known: u64, claimed: u64 },
    #[error("{path}: is a directory")]
    IsDir { path: PathBuf },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("index database in {dir}")]
    Db {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
}

/// The store's result type.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Attaches a description to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| StoreError::Io { what: what(), source })
    }
}

/// What `ls` shows for one blob.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BlobInfo {
    pub hash: Hash,
    pub size: u64,
    /// Bytes held and verified locally.
    pub present: u64,
    pub pinned: bool,
    pub complete: bool,
    /// The size shapes the tree, so a claimed size is only trusted once the blob's last group
    /// verified under it; true for every complete blob.
    pub size_verified: bool,
    /// A name in the mount that holds the blob (filled in by `ls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// How to open a store.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A new cache cap, remembered in the index; `None` keeps the remembered one.
    pub cache_size: Option<u64>,
}

/// The blob store. All methods take `&self`; it is shared between threads.
pub struct Store {
    dir: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    /// The default tree of the index (see `index.rs` for how it survives a full disk).
    db: Table,
    index: Arc<Index>,
    /// Flushes the index every second; stopped before the store goes.
    _flusher: index::Flusher,
    cap: AtomicU64,
    /// Bytes held locally, complete and partial, pinned or not.
    used: AtomicU64,
    /// Serialises changes to index entries, so that read-modify-write of a `Meta` is atomic.
    write: Mutex<()>,
    partials: Mutex<HashMap<Hash, Arc<Mutex<partial::Partial>>>>,
    tmp_seq: AtomicU64,
    /// Called with every blob that becomes complete (the node announces it).
    on_complete: Mutex<Vec<CompleteHook>>,
    /// Blob files that verified whole in this process's life, as they were then (`trust.rs`).
    verified: Mutex<HashMap<Hash, trust::Stamp>>,
    /// The mount's names (`crate::names`): a blob a name holds is never evicted.
    names: Table,
    /// Blobs in use in this process (open readers, a commit naming its blob), with counts:
    /// never evicted while held.
    held: Mutex<HashMap<Hash, usize>>,
}

/// Holds a blob against eviction until dropped (see `Store::hold`).
pub struct Held<'a> {
    store: &'a Store,
    hash: Hash,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.store.unhold(&self.hash);
    }
}

type CompleteHook = Arc<dyn Fn(Hash) + Send + Sync>;

impl Store {
    /// Opens (creating if needed) the store in `dir`, takes its lock, and sweeps whatever a
    /// crash left behind.
    pub fn open(dir: &Path, opts: Options) -> Result<Store> {
        let blobs = dir.join("blobs");
        let tmp = dir.join("tmp");
        for d in [dir, &blobs, &tmp] {
            fs::create_dir_all(d).ctx(|| format!("cannot create {}", d.display()))?;
            owner_only(d)?;
        }
        let lock = take_lock(dir)?;
        let db_err = |source| StoreError::Db {
            dir: dir.to_owned(),
            source,
        };
        // The index keeps the lock: it is let go when the last user of the database has gone.
        let index = Index::open_holding(&dir.join("index"), 8 << 20, lock).map_err(db_err)?;
        // sled makes its files as the umask says; their directory keeps them private.
        owner_only(&dir.join("index"))?;
        let db = index.table(None).map_err(db_err)?;
        let names = index.table(Some("names")).map_err(db_err)?;
        let store = Store {
            dir: dir.to_owned(),
            blobs,
            tmp,
            db,
            _flusher: index.start_flusher(),
            index,
            cap: AtomicU64::new(DEFAULT_CACHE_SIZE),
            used: AtomicU64::new(0),
            write: Mutex::new(()),
            partials: Mutex::new(HashMap::new()),
            tmp_seq: AtomicU64::new(0),
            on_complete: Mutex::new(Vec::new()),
            verified: Mutex::new(HashMap::new()),
            names,
            held: Mutex::new(HashMap::new()),
        };
        match opts.cache_size {
            Some(cap) => store.set_cache_size(cap)?,
            None => {
                if let Some(v) = store.db.get(CFG_CACHE_SIZE).map_err(|e| store.db_err(e))? {
                    if let Ok(b) = <[u8; 8]>::try_from(&v[..]) {
                        store.cap.store(u64::from_le_bytes(b), Ordering::Relaxed);
                    }
                }
            }
        }
        store.recover()?;
        Ok(store)
    }

    /// Another tree in the same index database, for state that lives beside the blobs (the
    /// mount's names).
    pub fn open_tree(&self, name: &str) -> Result<Table> {
        self.index.table(Some(name)).map_err(|e| self.db_err(e))
    }

    /// Calls `f` with every blob that becomes complete from now on: imported, written
    /// through the mount, or fetched (beside the hooks already set: the node announces, the
    /// API tells its event stream).
    pub fn on_complete(&self, f: impl Fn(Hash) + Send + Sync + 'static) {
        self.on_complete
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(f));
    }

    fn verified_lock(&self) -> MutexGuard<'_, HashMap<Hash, trust::Stamp>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blob `h` just became complete, every byte of it verified on the way in.
    pub(crate) fn completed(&self, h: Hash) {
        self.mark_verified(&h);
        let hooks = self.on_complete.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for f in hooks {
            f(h);
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache cap in bytes.
    pub fn cache_size(&self) -> u64 {
        self.cap.load(Ordering::Relaxed)
    }

    /// Bytes held locally.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Sets and remembers the cache cap. It is enforced by the next import or `gc`.
    pub fn set_cache_size(&self, cap: u64) -> Result<()> {
        self.cap.store(cap, Ordering::Relaxed);
        self.db
            .insert(CFG_CACHE_SIZE, &cap.to_le_bytes())
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Empties `tmp/`, drops files in `blobs/` that the index does not know, drops index
    /// entries whose files are gone, and totals the bytes held.
    fn recover(&self) -> Result<()> {
        for e in fs::read_dir(&self.tmp).ctx(|| format!("cannot list {}", self.tmp.display()))? {
            let p = e.ctx(|| "cannot list tmp".into())?.path();
            tracing::info!(path = %p.display(), "removing an import a crash left behind");
            let _ = fs::remove_file(&p);
        }
        let mut used = 0;
        let mut known = HashMap::new();
        for (h, m) in self.metas()? {
            used += m.present;
            known.insert(h, m);
        }
        for e in fs::read_dir(&self.blobs).ctx(|| format!("cannot list {}", self.blobs.display()))? {
            let e = e.ctx(|| "cannot list blobs".into())?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            let hex = name.strip_suffix(".obao").unwrap_or(&name);
            let keep = Hash::parse_lowercase(hex)
                .and_then(|h| known.get(&h))
                .is_some_and(|m| !m.inline);
            if !keep {
                tracing::info!(file = %name, "removing a blob file the index does not list");
                let _ = fs::remove_file(e.path());
            }
        }
        for (h, m) in known {
            if !m.inline && !self.data_path(&h).exists() {
                tracing::warn!(hash = %h, "blob file is gone; dropping it from the index");
                used -= m.present;
                self.remove_entry(&h, &m)?;
            }
        }
        self.used.store(used, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn db_err(&self, source: sled::Error) -> StoreError {
        StoreError::Db {
            dir: self.dir.clone(),
            source,
        }
    }

    pub(crate) fn data_path(&self, h: &Hash) -> PathBuf {
        self.blobs.join(h.to_string())
    }

    pub(crate) fn ob_path(&self, h: &Hash) -> PathBuf {
        self.blobs.join(format!("{h}.obao"))
    }

    /// The path of a complete blob's data file, which holds exactly its content; `None` for
    /// blobs that are partial or kept inline.
    pub fn complete_file(&self, h: &Hash) -> Result<Option<PathBuf>> {
        Ok(match self.meta(h)? {
            Some(m) if m.complete && !m.inline => Some(self.data_path(h)),
            _ => None,
        })
    }

    pub(crate) fn lock_write(&self) -> MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn meta(&self, h: &Hash) -> Result<Option<Meta>> {
        let v = self.db.get(key(TAG_META, h)).map_err(|e| self.db_err(e))?;
        Ok(v.and_then(|v| Meta::decode(&v)))
    }

    fn metas(&self) -> Result<Vec<(Hash, Meta)>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([TAG_META]) {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            if let (Ok(h), Some(m)) = (<[u8; 32]>::try_from(&k[1..]), Meta::decode(&v)) {
                out.push((Hash::from_bytes(h), m));
            }
        }
        Ok(out)
    }

    /// Everything held locally, complete or partial.
    pub fn list(&self) -> Result<Vec<BlobInfo>> {
        Ok(self
            .metas()?
            .into_iter()
            .map(|(hash, m)| self.blob_info(hash, &m))
            .collect())
    }

    /// What `ls` shows for one blob, or `None` if it is not held.
    pub fn info(&self, h: &Hash) -> Result<Option<BlobInfo>> {
        Ok(self.meta(h)?.map(|m| self.blob_info(*h, &m)))
    }

    /// The index entry as shown to users; an open partial blob counts the groups written
    /// since its last flush too.
    fn blob_info(&self, hash: Hash, m: &Meta) -> BlobInfo {
        let last = Tree::new(m.size).groups() - 1;
        let (present, size_verified) = match self.open_partial(&hash) {
            Some(p) => {
                let p = p.lock().unwrap_or_else(|e| e.into_inner());
                (p.present_bytes(), p.has(last))
            }
            None if m.complete => (m.present, true),
            None => (m.present, self.present_groups(&hash).is_ok_and(|p| p.contains(last))),
        };
        BlobInfo {
            hash,
            size: m.size,
            present,
            pinned: m.pinned,
            complete: m.complete,
            size_verified,
            name: None,
        }
    }

    /// Pins or unpins a blob. Pinned blobs are never evicted.
    pub fn set_pinned(&self, h: &Hash, pinned: bool) -> Result<()> {
        let _w = self.lock_write();
        let mut m = self.meta(h)?.ok_or(StoreError::NotFound(*h))?;
        m.pinned = pinned;
        self.db
            .insert(&key(TAG_META, h)[..], &m.encode()[..])
            .map_err(|e| self.db_err(e))?;
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Holds blob `h` (present or not yet) against eviction until `unhold`; holds count.
    pub fn hold(&self, h: &Hash) {
        *self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*h)
            .or_default() += 1;
    }

    /// `hold` for as long as the guard lives.
    pub fn hold_guard(&self, h: Hash) -> Held<'_> {
        self.hold(&h);
        Held { store: self, hash: h }
    }

    /// Ends one `hold` of `h`.
    pub fn unhold(&self, h: &Hash) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(h) {
            *n -= 1;
            if *n == 0 {
                held.remove(h);
            }
        }
    }

    /// The path in the mount of a name that holds blob `h`, if any.
    pub fn named(&self, h: &Hash) -> Result<Option<String>> {
        let Some(ino) = crate::names::held_by(&self.names, h).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        let p = crate::names::path_of(&self.names, ino).map_err(|e| self.db_err(e))?;
        Ok(Some(String::from_utf8_lossy(&p).into_owned()))
    }

    /// Why blob `h` may not be evicted, if it may not: pinned, held by a name, or in use.
    fn kept(&self, h: &Hash, m: &Meta) -> Result<bool> {
        Ok(m.pinned
            || self.held.lock().unwrap_or_else(|e| e.into_inner()).contains_key(h)
            || crate::names::held_by(&self.names, h)
                .map_err(|e| self.db_err(e))?
                .is_some())
    }

    /// Marks a blob as just used, for the LRU order.
    pub fn touch(&self, h: &Hash) -> Result<()> {
        let _w = self.lock_write();
        let Some(mut m) = self.meta(h)? else {
            return Ok(());
        };
        let tick = self.index.generate_id().map_err(|e| self.db_err(e))?;
        let mut b = sled::Batch::default();
        b.remove(&lru_key(m.tick, h)[..]);
        m.tick = tick;
        b.insert(&lru_key(m.tick, h)[..], &[][..]);
        b.insert(&key(TAG_META, h)[..], &m.encode()[..]);
        self.db.apply_batch(b).map_err(|e| self.db_err(e))
    }

    /// Writes a new or changed index entry, keeping the LRU key in step. The caller holds
    /// the write lock.
    pub(crate) fn put_meta(&self, h: &Hash, old: Option<&Meta>, m: &mut Meta, b: sled::Batch) -> Result<()> {
        self.put_meta_lazy(h, old, m, b)?;
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// `put_meta` without waiting for the disk: durable with the index's next flush.
    pub(crate) fn put_meta_lazy(&self, h: &Hash, old: Option<&Meta>, m: &mut Meta, mut b: sled::Batch) -> Result<()> {
        if let Some(old) = old {
            b.remove(&lru_key(old.tick, h)[..]);
        }
        m.tick = self.index.generate_id().map_err(|e| self.db_err(e))?;
        b.insert(&lru_key(m.tick, h)[..], &[][..]);
        b.insert(&key(TAG_META, h)[..], &m.encode()[..]);
        self.db.apply_batch(b).map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Removes a blob's index entry. Files go after the entry, so a crash in between leaves
    /// only orphans for the next open to sweep, never an entry without its bytes.
    fn remove_entry(&self, h: &Hash, m: &Meta) -> Result<()> {
        self.unmark_verified(h);
        let mut b = sled::Batch::default();
        b.remove(&key(TAG_META, h)[..]);
        b.remove(&key(TAG_PRESENT, h)[..]);
        b.remove(&key(TAG_INLINE, h)[..]);
        b.remove(&lru_key(m.tick, h)[..]);
        self.db.apply_batch(b).map_err(|e| self.db_err(e))?;
        self.db.flush().map_err(|e| self.db_err(e))?;
        self.partials_lock().remove(h);
        if !m.inline {
            let _ = fs::remove_file(self.data_path(h));
            let _ = fs::remove_file(self.ob_path(h));
        }
        Ok(())
    }

    /// Drops a partial blob whose size never verified (its last group is not held), unless it
    /// is pinned: what a peer claimed and could not back up leaves nothing behind. Returns
    /// whether it was dropped.
    pub fn forget_unverified(&self, h: &Hash) -> Result<bool> {
        let Some(info) = self.info(h)? else { return Ok(false) };
        if info.complete || info.size_verified || info.pinned {
            return Ok(false);
        }
        let _w = self.lock_write();
        let Some(m) = self.meta(h)? else { return Ok(false) };
        tracing::info!(hash = %h, size = m.size, "dropping a partial blob whose claimed size did not verify");
        self.remove_entry(h, &m)?;
        self.used.fetch_sub(info.present.min(self.used()), Ordering::Relaxed);
        Ok(true)
    }

    /// Drops a blob from the store, pinned or not.
    pub fn remove(&self, h: &Hash) -> Result<()> {
        let _w = self.lock_write();
        let m = self.meta(h)?.ok_or(StoreError::NotFound(*h))?;
        self.remove_entry(h, &m)?;
        self.used.fetch_sub(m.present, Ordering::Relaxed);
        Ok(())
    }

    /// Evicts blobs that are not kept (pinned, held by a name, or in use), least recently
    /// used first, until the store fits its cap (or nothing else is left). Returns what was
    /// evicted.
    pub fn gc(&self) -> Result<Vec<BlobInfo>> {
        let _w = self.lock_write();
        let cap = self.cache_size();
        let mut evicted = Vec::new();
        if self.used() <= cap {
            return Ok(evicted);
        }
        let mut order = Vec::new();
        for kv in self.db.scan_prefix([TAG_LRU]) {
            let (k, _) = kv.map_err(|e| self.db_err(e))?;
            if let Ok(h) = <[u8; 32]>::try_from(&k[9..]) {
                order.push(Hash::from_bytes(h));
            }
        }
        for h in order {
            if self.used() <= cap {
                break;
            }
            let Some(m) = self.meta(&h)? else { continue };
            if self.kept(&h, &m)? {
                continue;
            }
            tracing::info!(hash = %h, bytes = m.present, "evicting");
            // From the index entry alone: a partial blob's own lock is never taken under the
            // write lock (its sync takes them the other way round).
            evicted.push(BlobInfo {
                hash: h,
                size: m.size,
                present: m.present,
                pinned: m.pinned,
                complete: m.complete,
                size_verified: m.complete,
                name: None,
            });
            self.remove_entry(&h, &m)?;
            self.used.fetch_sub(m.present, Ordering::Relaxed);
        }
        Ok(evicted)
    }

    /// Makes every recorded change durable: partial blobs' bytes, then the index.
    pub fn flush(&self) -> Result<()> {
        let partials: Vec<Hash> = self.partials_lock().keys().copied().collect();
        for h in partials {
            self.sync_partial(&h)?;
        }
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// The open partial blob for `h`, if any. The map's lock is released before the caller
    /// locks the blob, so the map is never held while waiting.
    pub(crate) fn open_partial(&self, h: &Hash) -> Option<Arc<Mutex<partial::Partial>>> {
        self.partials_lock().get(h).cloned()
    }

    fn partials_lock(&self) -> MutexGuard<'_, HashMap<Hash, Arc<Mutex<partial::Partial>>>> {
        self.partials.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh path under `tmp/`.
    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}-{n}.{what}", std::process::id()))
    }

    /// fsyncs `blobs/`, so renames into it survive a crash.
    fn sync_blobs_dir(&self) -> Result<()> {
        File::open(&self.blobs)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("cannot sync {}", self.blobs.display()))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!("flushing the store on close: {e}");
        }
    }
}

/// Makes directory `d` the owner's alone (0700): blob files hold the content of files that
/// may be private in the mount, and the index names them. Files inside are made 0600 too.
fn owner_only(d: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(d)
        .ctx(|| format!("cannot stat {}", d.display()))?
        .permissions()
        .mode();
    if mode & 0o777 != 0o700 {
        tracing::info!(
            "making {} readable by its owner alone (was {:o})",
            d.display(),
            mode & 0o777
        );
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).ctx(|| format!("cannot chmod {}", d.display()))?;
    }
    Ok(())
}

/// Opening options for a file of the store: readable by the owner alone.
pub(crate) fn private_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Takes the data directory's lock, or names the process that holds it.
fn take_lock(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let mut f = private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .ctx(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StoreError::Busy {
                dir: dir.to_owned(),
                pid: if pid.is_empty() { "unknown".into() } else { pid.into() },
            });
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).ctx(|| format!("cannot lock {}", path.display()));
        }
    }
    f.set_len(0).ctx(|| format!("cannot write {}", path.display()))?;
    write!(f, "{}", std::process::id()).ctx(|| format!("cannot write {}", path.display()))?;
    Ok(f)
}
