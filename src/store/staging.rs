//! Staged files: content being written through the mount, before it becomes a blob.
//!
//! Bytes land in a temp file at any offset. While the writes stay sequential from offset 0,
//! a hasher thread computes the hash and the outboard as the data streams in, off the write
//! path, and starts writeback every `WRITEBACK_EVERY` bytes so that the fsync at commit is short.
//! A write anywhere else, or a truncation, stops the hasher; `commit_staged` then hashes the
//! file in one pass.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use super::import::{TempFile, BUF_SIZE};
use super::{Held, IoContext, Result, Store, INLINE_MAX};
use crate::hash::Hash;
use crate::tree::{OutboardBuilder, GROUP_SIZE, PAIR_SIZE};

/// Writes pairs into an outboard file; boxed so the hasher thread can own its builder.
type FileSink = Box<dyn FnMut(u64, &[u8; 64]) -> io::Result<()> + Send>;
type Builder = OutboardBuilder<FileSink>;

/// Bytes hashed between two calls that start writeback of the staged data.
const WRITEBACK_EVERY: u64 = 16 << 20;
/// Writes queued for the hasher before a writer waits for it.
const QUEUE: usize = 16;

fn file_sink(f: &File) -> io::Result<FileSink> {
    let f = f.try_clone()?;
    Ok(Box::new(move |slot, pair: &[u8; 64]| {
        f.write_all_at(pair, slot * PAIR_SIZE)
    }))
}

/// Asks the kernel to start writing `len` bytes at `off` to disk, without waiting, so that
/// the fsync at commit has little left to do.
fn start_writeback(f: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the fd is open for the call.
    let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), off as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        tracing::debug!("sync_file_range: {}", io::Error::last_os_error());
    }
}

/// The thread that hashes sequential writes as they arrive.
struct Hasher {
    tx: SyncSender<Vec<u8>>,
    thread: JoinHandle<io::Result<(Builder, Vec<u8>)>>,
}

impl Hasher {
    fn start(data: &File, ob: &File) -> io::Result<Hasher> {
        let sink = file_sink(ob)?;
        let data = data.try_clone()?;
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let thread = std::thread::Builder::new().name("stage-hash".into()).spawn(move || {
            let mut b = OutboardBuilder::new(sink);
            let mut tail: Vec<u8> = Vec::new();
            let (mut written, mut unsynced) = (0u64, 0u64);
            for chunk in rx {
                let data_ref = if tail.is_empty() {
                    &chunk[..]
                } else {
                    tail.extend_from_slice(&chunk);
                    &tail[..]
                };
                let whole = data_ref.len() / GROUP_SIZE as usize * GROUP_SIZE as usize;
                b.push_all(&data_ref[..whole])?;
                let rest = data_ref[whole..].to_vec();
                tail = rest;
                unsynced += chunk.len() as u64;
                if unsynced >= WRITEBACK_EVERY {
                    start_writeback(&data, written, unsynced);
                    written += unsynced;
                    unsynced = 0;
                }
            }
            Ok((b, tail))
        })?;
        Ok(Hasher { tx, thread })
    }

    fn finish(self) -> io::Result<(Builder, Vec<u8>)> {
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| io::Error::other("the hasher thread panicked"))?
    }
}

/// A file being written: see the module docs.
pub struct Staging {
    data: TempFile,
    ob: TempFile,
    /// Running while every write so far continued where the last one ended.
    hasher: Option<Hasher>,
    len: u64,
}

impl Staging {
    /// The file's current length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `data` at `off`.
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        self.data.file.write_all_at(data, off)?;
        self.follow(off, data.len() as u64, || data.to_vec())
    }

    /// Writes `data` at `off`, handing the buffer itself to the hasher.
    pub fn write_owned(&mut self, off: u64, data: Vec<u8>) -> io::Result<()> {
        self.data.file.write_all_at(&data, off)?;
        self.follow(off, data.len() as u64, || data)
    }

    /// Feeds a write of `n` bytes at `off` to the hasher if it continues the sequence, or
    /// stops the hasher.
    fn follow(&mut self, off: u64, n: u64, data: impl FnOnce() -> Vec<u8>) -> io::Result<()> {
        let sequential = off == self.len;
        self.len = self.len.max(off + n);
        let Some(h) = &self.hasher else { return Ok(()) };
        if !sequential {
            tracing::debug!(off, "write is not sequential; the hash is computed at close");
            self.stop_hasher();
        } else if h.tx.send(data()).is_err() {
            // The hasher failed; commit hashes the file again.
            self.stop_hasher();
        }
        Ok(())
    }

    fn stop_hasher(&mut self) {
        if let Some(h) = self.hasher.take() {
            let _ = h.finish();
        }
    }

    /// Truncates or extends the file to `len` bytes.
    pub fn set_len(&mut self, len: u64) -> io::Result<()> {
        if len != self.len {
            self.stop_hasher();
        }
        self.data.file.set_len(len)?;
        self.len = len;
        Ok(())
    }

    /// Reads what was written, for readers of a file that is still open for writing.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let end = (off + buf.len() as u64).min(self.len);
        if off >= end {
            return Ok(0);
        }
        let n = (end - off) as usize;
        self.data.file.read_exact_at(&mut buf[..n], off)?;
        Ok(n)
    }
}

impl Store {
    /// Starts an empty staged file.
    pub fn stage(&self) -> Result<Staging> {
        let data = TempFile::create(self.tmp_path("stage"))?;
        let ob = TempFile::create(self.tmp_path("obao"))?;
        let hasher = Hasher::start(&data.file, &ob.file).ctx(|| "cannot start hashing a staged file".into())?;
        Ok(Staging {
            data,
            ob,
            hasher: Some(hasher),
            len: 0,
        })
    }

    /// Starts a staged file holding the first `len` bytes of blob `h` (verified).
    pub fn stage_from(&self, h: &Hash, len: u64) -> Result<Staging> {
        let mut s = self.stage()?;
        let mut r = self.reader(h)?;
        let mut off = 0;
        let end = len.min(r.size());
        while off < end {
            let chunk = r.read_at(off, ((end - off) as usize).min(BUF_SIZE))?;
            let n = chunk.len() as u64;
            s.write_owned(off, chunk)
                .ctx(|| "cannot write the staging file".into())?;
            off += n;
        }
        Ok(s)
    }

    /// Stores a staged file as a blob and returns its hash and size, with the blob held
    /// against eviction until the caller has named it.
    pub fn commit_staged(&self, mut s: Staging) -> Result<(Hash, u64, Held<'_>)> {
        let size = s.len;
        let streamed = match s.hasher.take() {
            Some(h) => h.finish().ok(),
            None => None,
        };
        let hash = match streamed {
            Some((mut b, tail)) => {
                b.push_all(&tail).ctx(|| "cannot write the staging outboard".into())?;
                b.finish().ctx(|| "cannot write the staging outboard".into())?
            }
            None => self.hash_file(&s, size)?,
        };
        let mut first = vec![0u8; size.min(INLINE_MAX) as usize];
        if size <= INLINE_MAX {
            s.data
                .file
                .read_exact_at(&mut first, 0)
                .ctx(|| "cannot read the staging file".into())?;
        }
        let held = self.hold_guard(hash);
        self.commit_import(hash, size, s.data, s.ob, first, false)?;
        Ok((hash, size, held))
    }

    /// Hashes a staged file in one pass into a fresh outboard.
    fn hash_file(&self, s: &Staging, size: u64) -> Result<Hash> {
        let ob_err = || "cannot write the staging outboard".to_string();
        s.ob.file.set_len(0).ctx(ob_err)?;
        let mut b = OutboardBuilder::new(file_sink(&s.ob.file).ctx(ob_err)?);
        let mut buf = vec![0u8; BUF_SIZE];
        let mut off = 0;
        while off < size {
            let n = ((size - off) as usize).min(BUF_SIZE);
            s.data
                .file
                .read_exact_at(&mut buf[..n], off)
                .ctx(|| "cannot read the staging file".into())?;
            b.push_all(&buf[..n]).ctx(ob_err)?;
            off += n as u64;
        }
        b.finish().ctx(ob_err)
    }
}
