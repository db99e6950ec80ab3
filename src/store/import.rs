//! Importing: one pass over the data computes the hash and the outboard while the bytes are
//! written, so nothing is read twice and nothing is held whole in memory.
//!
//! Three threads share the work: one reads the source, one hashes, one writes the temp file.
//! Buffers (1 MiB each, four of them) go round in a loop, which bounds memory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use super::meta::{key, Meta, TAG_INLINE, TAG_PRESENT};
use super::{IoContext, Result, Store, StoreError, INLINE_MAX};
use crate::hash::Hash;
use crate::tree::{OutboardBuilder, PAIR_SIZE};

pub(super) const BUF_SIZE: usize = 1 << 20;
const BUFS: usize = 4;

/// A temp file that is deleted unless it was moved into place.
pub(super) struct TempFile {
    path: std::path::PathBuf,
    pub(super) file: File,
    keep: bool,
}

impl TempFile {
    pub(super) fn create(path: std::path::PathBuf) -> Result<TempFile> {
        let file = super::private_file()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("cannot create {}", path.display()))?;
        Ok(TempFile {
            path,
            file,
            keep: false,
        })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Store {
    /// Imports the file at `path`, pins it if `pin`, and returns its hash and size.
    pub fn import_file(&self, path: &Path, pin: bool) -> Result<(Hash, u64)> {
        let what = || format!("cannot read {}", path.display());
        let f = File::open(path).ctx(what)?;
        if f.metadata().ctx(what)?.is_dir() {
            return Err(StoreError::IsDir { path: path.to_owned() });
        }
        self.import(f, pin, &path.display().to_string())
    }

    /// `import_file`, adding the bytes read so far to `read` as it goes (for a progress bar
    /// on another thread).
    pub fn import_file_counted(&self, path: &Path, pin: bool, read: &AtomicU64) -> Result<(Hash, u64)> {
        let what = || format!("cannot read {}", path.display());
        let f = File::open(path).ctx(what)?;
        if f.metadata().ctx(what)?.is_dir() {
            return Err(StoreError::IsDir { path: path.to_owned() });
        }
        self.import(Counted { inner: f, read }, pin, &path.display().to_string())
    }

    /// Imports everything `r` yields.
    pub fn import_reader(&self, r: impl Read + Send, pin: bool) -> Result<(Hash, u64)> {
        self.import(r, pin, "the input")
    }

    fn import(&self, mut src: impl Read + Send, pin: bool, name: &str) -> Result<(Hash, u64)> {
        let data = TempFile::create(self.tmp_path("data"))?;
        let ob = TempFile::create(self.tmp_path("obao"))?;
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(BUFS);
        for _ in 0..BUFS {
            free_tx.send(vec![0u8; BUF_SIZE]).expect("room for every buffer");
        }
        let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize)>(BUFS);
        let (hashed_tx, hashed_rx) = sync_channel::<(Vec<u8>, usize)>(BUFS);

        let (hash, size, first) = std::thread::scope(|s| -> Result<(Hash, u64, Vec<u8>)> {
            let reader = s.spawn(move || read_stage(&mut src, free_rx, full_tx));
            let data_file = &data.file;
            let writer = s.spawn(move || write_stage(data_file, hashed_rx, free_tx));
            let hashed = hash_stage(&ob.file, full_rx, hashed_tx);
            let read = reader.join().expect("reader thread");
            let written = writer.join().expect("writer thread");
            // The first failure is the real one; the others are its echo.
            read.ctx(|| format!("cannot read {name}"))?;
            written.ctx(|| "cannot write the store's temp file".into())?;
            hashed
        })?;
        self.commit_import(hash, size, data, ob, first, pin)?;
        Ok((hash, size))
    }

    /// Moves a finished import into place and enters it in the index.
    pub(super) fn commit_import(
        &self,
        h: Hash,
        size: u64,
        mut data: TempFile,
        mut ob: TempFile,
        first: Vec<u8>,
        pin: bool,
    ) -> Result<()> {
        let inline = size <= INLINE_MAX;
        let known = self.meta(&h)?.is_some_and(|m| m.complete);
        if !inline && !known {
            data.file.sync_data().ctx(|| "cannot sync the import".into())?;
            ob.file.sync_data().ctx(|| "cannot sync the import".into())?;
        }
        let _w = self.lock_write();
        let old = self.meta(&h)?;
        if let Some(old) = old.filter(|m| m.complete) {
            if pin && !old.pinned {
                let mut m = old;
                m.pinned = true;
                self.put_meta(&h, Some(&old), &mut m, sled::Batch::default())?;
            }
            // Already stored. Deleting the copy (a large unlink can take a while) need not
            // hold up the caller.
            std::thread::spawn(move || drop((data, ob)));
            return Ok(());
        }
        let mut b = sled::Batch::default();
        if inline {
            b.insert(&key(TAG_INLINE, &h)[..], first);
        } else {
            // Any partial copy is replaced whole; its open handles keep the old inode.
            self.partials_lock().remove(&h);
            fs::rename(&data.path, self.data_path(&h)).ctx(|| "cannot move the import into blobs/".into())?;
            data.keep = true;
            fs::rename(&ob.path, self.ob_path(&h)).ctx(|| "cannot move the import into blobs/".into())?;
            ob.keep = true;
            self.sync_blobs_dir()?;
        }
        b.remove(&key(TAG_PRESENT, &h)[..]);
        let mut m = Meta {
            size,
            complete: true,
            pinned: pin || old.is_some_and(|o| o.pinned),
            inline,
            present: size,
            tick: 0,
        };
        self.put_meta(&h, old.as_ref(), &mut m, b)?;
        let before = old.map_or(0, |o| o.present);
        self.used.fetch_add(size, Ordering::Relaxed);
        self.used.fetch_sub(before, Ordering::Relaxed);
        drop(_w);
        self.completed(h);
        self.gc()?;
        Ok(())
    }
}

/// Fills buffers from the source; a short buffer marks the end.
fn read_stage(src: &mut dyn Read, free: Receiver<Vec<u8>>, full: SyncSender<(Vec<u8>, usize)>) -> io::Result<()> {
    while let Ok(mut buf) = free.recv() {
        let mut n = 0;
        while n < buf.len() {
            match src.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let last = n < buf.len();
        if full.send((buf, n)).is_err() || last {
            break;
        }
    }
    Ok(())
}

/// Hashes each buffer, writing outboard pairs as the tree grows, then passes it on.
fn hash_stage(
    ob: &File,
    full: Receiver<(Vec<u8>, usize)>,
    hashed: SyncSender<(Vec<u8>, usize)>,
) -> Result<(Hash, u64, Vec<u8>)> {
    let mut size = 0u64;
    let mut first = Vec::new();
    let mut builder = OutboardBuilder::new(|slot, pair: &[u8; 64]| ob.write_all_at(pair, slot * PAIR_SIZE));
    let ob_err = |e| StoreError::Io {
        what: "cannot write the store's temp outboard".into(),
        source: e,
    };
    while let Ok((buf, n)) = full.recv() {
        builder.push_all(&buf[..n]).map_err(ob_err)?;
        if size == 0 && n as u64 <= INLINE_MAX {
            first = buf[..n].to_vec();
        }
        size += n as u64;
        let last = n < buf.len();
        if hashed.send((buf, n)).is_err() || last {
            break;
        }
    }
    let hash = builder.finish().map_err(ob_err)?;
    Ok((hash, size, first))
}

/// Appends each buffer to the temp data file, then returns it to the reader.
fn write_stage(data: &File, hashed: Receiver<(Vec<u8>, usize)>, free: SyncSender<Vec<u8>>) -> io::Result<()> {
    let mut out = data;
    while let Ok((buf, n)) = hashed.recv() {
        out.write_all(&buf[..n])?;
        // The reader is gone once it hit the end; the buffers still in flight must be written.
        let _ = free.send(buf);
    }
    Ok(())
}

/// A reader that counts what it reads.
struct Counted<'a, R> {
    inner: R,
    read: &'a AtomicU64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
