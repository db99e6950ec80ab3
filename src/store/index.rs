//! The index database: sled behind a handle that outlives sled's I/O errors.
//!
//! sled keeps the first I/O error it meets (a full disk, say) and fails every later write
//! until it is opened again; and whatever it had not yet written when the error came is lost
//! with that instance. So every change goes through this module:
//!
//! - A change is applied to sled and kept in a journal, in order, until a flush has made it
//!   durable. Flushes are explicit (a save, an fsync, an unlink) or come from this module's
//!   own timer, once a second.
//! - When a write or a flush fails, the instance is kept for reads (it still holds every
//!   change in memory) and writes fail with the error (ENOSPC for a full disk). As soon as
//!   the disk has room again (checked at the next write, and every second), the old instance
//!   is closed, the database opened again, the journal applied once more and flushed. Nothing
//!   that was acknowledged is lost, and no restart is needed.
//!
//! Re-applying the journal over what sled had made durable gives the same state: sled
//! recovers a prefix of the changes, the journal holds every change since the last flush that
//! succeeded (a point inside that prefix), and each change writes whole values, so the last
//! write of every key wins either way.
//!
//! Scans come in pages, each from the current instance, so no long-lived handle keeps an old
//! instance (and sled's file lock) alive.

use std::collections::VecDeque;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sled::{Batch, IVec};

/// How often the timer makes changes durable (and retries a failed database).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Free space the disk needs before a failed database is opened again.
const ROOM: u64 = 4 << 20;
/// How long to wait for the old instance's last handles to go before opening again.
const REOPEN_WAIT: Duration = Duration::from_secs(3);
/// Entries per page of a scan.
const PAGE: usize = 512;

type Result<T> = std::result::Result<T, sled::Error>;

/// The index database; see the module docs.
pub struct Index {
    /// `None` for a temporary database (tests), which cannot be opened again.
    path: Option<PathBuf>,
    cache: u64,
    state: RwLock<State>,
    /// Changes not yet known durable. Lock order: the journal, then the state.
    journal: Mutex<Journal>,
    /// The data directory's lock (one process per data directory), let go only after the
    /// database (`state` is declared, so dropped, first): whoever takes the lock next finds
    /// the database free too.
    _dir_lock: Option<std::fs::File>,
}

struct State {
    /// `None` only while opening again failed.
    db: Option<sled::Db>,
    /// The error that broke the instance in use, until it is replaced.
    failed: Option<sled::Error>,
    /// Counts instances, so a caller knows whether the one that failed it is still in use.
    generation: u64,
}

#[derive(Default)]
struct Journal {
    /// Changes since the last flush that succeeded, oldest first; `None` is the default tree.
    changes: VecDeque<(Option<Arc<str>>, Batch)>,
    /// The number of changes ever trimmed from the front.
    trimmed: u64,
}

impl Journal {
    fn end(&self) -> u64 {
        self.trimmed + self.changes.len() as u64
    }

    /// Forgets the changes before `mark` (a former `end`): a flush made them durable.
    fn trim(&mut self, mark: u64) {
        while self.trimmed < mark && self.changes.pop_front().is_some() {
            self.trimmed += 1;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error writes get while the disk has no room for the index.
fn full() -> sled::Error {
    sled::Error::Io(io::Error::from_raw_os_error(libc::ENOSPC))
}

/// Bytes free for unprivileged use on the filesystem holding `p`.
fn free_bytes(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

impl Index {
    /// Opens (creating if needed) the database at `path`, with `cache` bytes of sled cache.
    pub fn open(path: &Path, cache: u64) -> Result<Arc<Index>> {
        let db = Self::config(path, cache).open()?;
        Ok(Self::over(Some(path.to_owned()), cache, db, None))
    }

    /// As `open`, and keeps `lock` (the data directory's) until the database is closed.
    pub fn open_holding(path: &Path, cache: u64, lock: std::fs::File) -> Result<Arc<Index>> {
        let db = Self::config(path, cache).open()?;
        Ok(Self::over(Some(path.to_owned()), cache, db, Some(lock)))
    }

    /// A database that lives only in memory and a temporary file (tests).
    pub fn temporary() -> Result<Arc<Index>> {
        let db = sled::Config::new().temporary(true).open()?;
        Ok(Self::over(None, 0, db, None))
    }

    fn config(path: &Path, cache: u64) -> sled::Config {
        // sled's own flush timer is off: ours trims the journal when it succeeds.
        sled::Config::new()
            .path(path)
            .cache_capacity(cache)
            .flush_every_ms(None)
    }

    fn over(path: Option<PathBuf>, cache: u64, db: sled::Db, lock: Option<std::fs::File>) -> Arc<Index> {
        Arc::new(Index {
            path,
            cache,
            state: RwLock::new(State {
                db: Some(db),
                failed: None,
                generation: 0,
            }),
            journal: Mutex::new(Journal::default()),
            _dir_lock: lock,
        })
    }

    /// A table: the default tree (`None`) or a named one.
    pub fn table(self: &Arc<Self>, name: Option<&str>) -> Result<Table> {
        let t = Table {
            index: self.clone(),
            name: name.map(Arc::from),
        };
        t.tree()?;
        Ok(t)
    }

    /// Starts the timer that flushes every second, and retries a failed database. It stops
    /// when the returned guard is dropped.
    pub fn start_flusher(self: &Arc<Self>) -> Flusher {
        let (stop, stopped) = mpsc::channel::<()>();
        let index = self.clone();
        let thread = std::thread::Builder::new()
            .name("index-flush".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_EVERY) {
                    let idle = lock(&index.journal).changes.is_empty() && index.failed().is_none();
                    if !idle {
                        if let Err(e) = index.flush() {
                            tracing::debug!("index flush: {e}");
                        }
                    }
                }
            })
            .expect("cannot start the index flush thread");
        Flusher {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The error that broke the database, while it is not yet replaced.
    pub fn failed(&self) -> Option<sled::Error> {
        self.state().failed.clone()
    }

    /// The instance in use and its generation, or the error that left none.
    fn current(&self) -> (Result<sled::Db>, u64) {
        let st = self.state();
        let db = st.db.clone().ok_or_else(|| st.failed.clone().unwrap_or_else(full));
        (db, st.generation)
    }

    fn tree_of(db: &sled::Db, name: Option<&str>) -> Result<sled::Tree> {
        match name {
            None => Ok((**db).clone()),
            Some(n) => db.open_tree(n),
        }
    }

    /// Runs `op` on the instance in use; if it fails with an I/O error, opens the database
    /// again (when there is room) and runs it once more. The caller holds the journal.
    fn write<T>(&self, j: &mut Journal, mut op: impl FnMut(&sled::Db) -> Result<T>) -> Result<T> {
        let mut retried = false;
        loop {
            let (db, generation) = self.current();
            let e = match db.and_then(|db| op(&db)) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if retried || !matches!(e, sled::Error::Io(_)) {
                return Err(e);
            }
            retried = true;
            self.recover(j, generation, e)?;
        }
    }

    /// Applies `b` to tree `name` and journals it.
    fn apply(&self, name: Option<&Arc<str>>, b: Batch) -> Result<()> {
        let mut j = lock(&self.journal);
        self.write(&mut j, |db| {
            Self::tree_of(db, name.map(|n| &**n))?.apply_batch(b.clone())
        })?;
        j.changes.push_back((name.cloned(), b));
        Ok(())
    }

    /// A number never handed out before, in this life or an earlier one (sled's counter).
    pub fn generate_id(&self) -> Result<u64> {
        let mut j = lock(&self.journal);
        self.write(&mut j, |db| db.generate_id())
    }

    /// Makes every change applied so far durable.
    pub fn flush(&self) -> Result<()> {
        let mark = lock(&self.journal).end();
        let (db, generation) = self.current();
        let e = match db.and_then(|db| db.flush()) {
            Ok(_) => {
                lock(&self.journal).trim(mark);
                return Ok(());
            }
            Err(e) => e,
        };
        if !matches!(e, sled::Error::Io(_)) {
            return Err(e);
        }
        let mut j = lock(&self.journal);
        // Opening again flushes the whole journal, so everything up to `mark` is durable; if
        // another caller opened it again first, flush once more.
        if self.recover(&mut j, generation, e)? {
            return Ok(());
        }
        drop(j);
        let (db, _) = self.current();
        db?.flush()?;
        lock(&self.journal).trim(mark);
        Ok(())
    }

    /// The instance of `generation` failed with `cause`: open the database again and apply the
    /// journal, if the disk has room; until then keep the old instance for reads. Returns
    /// whether this call opened it (`false`: another caller had already).
    fn recover(&self, j: &mut Journal, generation: u64, cause: sled::Error) -> Result<bool> {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.generation != generation {
            return Ok(false);
        }
        if st.failed.is_none() {
            tracing::error!(
                "index database: {cause}; writes to it fail until there is room again (nothing is lost meanwhile)"
            );
            st.failed = Some(cause.clone());
        }
        let Some(path) = &self.path else {
            return Err(cause);
        };
        if free_bytes(path).is_none_or(|f| f < ROOM) {
            return Err(full());
        }
        // sled's file lock is released when the last handle on the old instance goes.
        drop(st.db.take());
        let started = Instant::now();
        let db = loop {
            match Self::config(path, self.cache).open() {
                Ok(db) => break db,
                Err(e) if started.elapsed() < REOPEN_WAIT => {
                    tracing::debug!("opening the index again: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::error!("cannot open the index database again: {e}; writes fail until it opens");
                    return Err(e);
                }
            }
        };
        let replayed = j.changes.len();
        let applied = j
            .changes
            .iter()
            .try_for_each(|(name, b)| Self::tree_of(&db, name.as_deref())?.apply_batch(b.clone()))
            .and_then(|()| db.flush().map(|_| ()));
        st.db = Some(db);
        if let Err(e) = applied {
            tracing::error!("applying the index journal again: {e}");
            st.failed = Some(e.clone());
            // The new instance failed in turn: the next attempt is against it.
            st.generation += 1;
            return Err(e);
        }
        let end = j.end();
        j.trim(end);
        st.failed = None;
        st.generation += 1;
        tracing::info!(
            replayed,
            "index database opened again after: {cause}; nothing acknowledged was lost"
        );
        Ok(true)
    }
}

/// Stops the flush timer when dropped.
pub struct Flusher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One tree of the index, through the handle that survives errors.
#[derive(Clone)]
pub struct Table {
    index: Arc<Index>,
    name: Option<Arc<str>>,
}

impl Table {
    fn tree(&self) -> Result<sled::Tree> {
        Index::tree_of(&self.index.current().0?, self.name.as_deref())
    }

    pub fn get(&self, k: impl AsRef<[u8]>) -> Result<Option<IVec>> {
        self.tree()?.get(k)
    }

    /// Applies a batch atomically.
    pub fn apply_batch(&self, b: Batch) -> Result<()> {
        self.index.apply(self.name.as_ref(), b)
    }

    pub fn insert(&self, k: impl AsRef<[u8]>, v: impl Into<IVec>) -> Result<()> {
        let mut b = Batch::default();
        b.insert(k.as_ref(), v);
        self.apply_batch(b)
    }

    /// Makes every change to the database durable (all tables share one log).
    pub fn flush(&self) -> Result<()> {
        self.index.flush()
    }

    /// The entries whose keys start with `prefix`, in key order, read a page at a time.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Scan {
        let prefix = prefix.as_ref().to_vec();
        Scan {
            table: self.clone(),
            from: Bound::Included(prefix.clone()),
            prefix,
            page: VecDeque::new(),
            done: false,
        }
    }
}

/// A scan in pages; see `Table::scan_prefix`.
pub struct Scan {
    table: Table,
    prefix: Vec<u8>,
    from: Bound<Vec<u8>>,
    page: VecDeque<(IVec, IVec)>,
    done: bool,
}

impl Scan {
    fn fill(&mut self) -> Result<()> {
        let tree = self.table.tree()?;
        let mut it = tree.range::<Vec<u8>, _>((self.from.clone(), Bound::Unbounded));
        for _ in 0..PAGE {
            match it.next().transpose()? {
                Some((k, v)) if k.starts_with(&self.prefix) => self.page.push_back((k, v)),
                _ => {
                    self.done = true;
                    break;
                }
            }
        }
        if let Some((k, _)) = self.page.back() {
            self.from = Bound::Excluded(k.to_vec());
        }
        Ok(())
    }
}

impl Iterator for Scan {
    type Item = Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty() && !self.done {
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
        }
        self.page.pop_front().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_reads_every_entry_of_its_prefix_across_pages() {
        let ix = Index::temporary().unwrap();
        let t = ix.table(Some("t")).unwrap();
        for i in 0..(PAGE as u32 * 2 + 7) {
            t.insert([&b"a"[..], &i.to_be_bytes()].concat(), &[][..]).unwrap();
        }
        t.insert(&b"b"[..], &[][..]).unwrap();
        t.insert(&b"\x00"[..], &[][..]).unwrap();
        let keys: Vec<_> = t.scan_prefix(b"a").map(|kv| kv.unwrap().0).collect();
        assert_eq!(keys.len(), PAGE * 2 + 7);
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(t.scan_prefix(b"c").count(), 0);
    }

    #[test]
    fn the_journal_holds_changes_until_a_flush_makes_them_durable() {
        let dir = tempfile::tempdir().unwrap();
        let ix = Index::open(&dir.path().join("index"), 1 << 20).unwrap();
        let t = ix.table(None).unwrap();
        t.insert(&b"k"[..], &b"1"[..]).unwrap();
        t.insert(&b"k"[..], &b"2"[..]).unwrap();
        assert_eq!(lock(&ix.journal).changes.len(), 2);
        t.flush().unwrap();
        assert_eq!(lock(&ix.journal).changes.len(), 0);
        assert_eq!(t.get(b"k").unwrap().as_deref(), Some(&b"2"[..]));
    }
}
