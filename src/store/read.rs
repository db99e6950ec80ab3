//! Reading blobs: every byte handed out has been verified against the blob's hash first.
//!
//! A read walks the tree from the root down to the groups it needs (`tree::walk`), checking
//! each outboard pair on the way, then hashes each group's bytes against the value the walk
//! gave. `copy_to` streams a whole blob on two threads: one reads and walks ahead, the other
//! verifies and writes, so hashing overlaps the I/O.

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::sync_channel;

use super::meta::{key, Meta, TAG_INLINE};
use super::{IoContext, Present, Result, Store, StoreError};
use crate::bao::{self, VerifyError};
use crate::hash::Hash;
use crate::tree::{group_cv, walk, Cv, Pair, Step, Tree, GROUP_SIZE, PAIR_SIZE};

/// Groups per batch in streaming reads (1 MiB).
const BATCH: u64 = 64;
const PAGE: u64 = 4096;
const PAGES: usize = 16;

/// The expected value of each group in a batch, as (group, value, is_root).
type Expect = Vec<(u64, Cv, bool)>;

/// A handle for verified reads of one blob.
pub struct BlobReader {
    hash: Hash,
    tree: Tree,
    src: Source,
    /// For a partial blob, the groups present when the reader was opened.
    present: Option<Present>,
}

enum Source {
    Inline(Vec<u8>),
    File { data: File, ob: OutboardPages },
}

/// A few cached 4 KiB pages of an outboard file: a batch's pairs sit together, and the pairs
/// above them are shared by the batches that follow.
struct OutboardPages {
    file: File,
    pages: Vec<(u64, Box<[u8; PAGE as usize]>)>,
}

impl OutboardPages {
    fn pair(&mut self, slot: u64) -> io::Result<Pair> {
        let at = slot * PAIR_SIZE;
        let (page, off) = (at / PAGE, (at % PAGE) as usize);
        let i = match self.pages.iter().position(|(p, _)| *p == page) {
            Some(i) => i,
            None => {
                let mut buf = Box::new([0u8; PAGE as usize]);
                let n = read_full_at(&self.file, &mut buf[..], page * PAGE)?;
                if n < off + 64 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "outboard is short"));
                }
                if self.pages.len() == PAGES {
                    self.pages.remove(0);
                }
                self.pages.push((page, buf));
                self.pages.len() - 1
            }
        };
        let mut p = [0u8; 64];
        p.copy_from_slice(&self.pages[i].1[off..off + 64]);
        Ok(p)
    }
}

/// Reads as much as there is up to `buf.len()` at `at`.
fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Appends up to `len` bytes read from `f` at `at` to `buf`, without zeroing them first
/// (a FUSE read of 1 MiB would otherwise write every byte twice). Short only at end of file.
fn read_append_at(f: &File, buf: &mut Vec<u8>, len: usize, at: u64) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    buf.reserve(len);
    let mut n = 0;
    while n < len {
        let spare = &mut buf.spare_capacity_mut()[..len - n];
        // SAFETY: pread writes at most `spare.len()` bytes into the spare capacity, and
        // `set_len` below counts only the bytes it reports written.
        let rc = unsafe {
            libc::pread(
                f.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                (at + n as u64) as i64,
            )
        };
        match rc {
            0 => break,
            k if k > 0 => {
                // SAFETY: the `k` bytes after the current length were just initialised.
                unsafe { buf.set_len(buf.len() + k as usize) };
                n += k as usize;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(n)
}

impl Store {
    /// Opens a blob for verified reads.
    pub fn reader(&self, h: &Hash) -> Result<BlobReader> {
        let m = self.meta(h)?.ok_or(StoreError::NotFound(*h))?;
        self.reader_for(h, &m)
    }

    pub(crate) fn reader_for(&self, h: &Hash, m: &Meta) -> Result<BlobReader> {
        let tree = Tree::new(m.size);
        let src = if m.inline {
            let v = self.db.get(key(TAG_INLINE, h)).map_err(|e| self.db_err(e))?;
            Source::Inline(v.map(|v| v.to_vec()).unwrap_or_default())
        } else {
            let open = |p: std::path::PathBuf| File::open(&p).ctx(|| format!("cannot open {}", p.display()));
            Source::File {
                data: open(self.data_path(h))?,
                ob: OutboardPages {
                    file: open(self.ob_path(h))?,
                    pages: Vec::new(),
                },
            }
        };
        let present = if m.complete {
            None
        } else {
            Some(self.present_groups(h)?)
        };
        Ok(BlobReader {
            hash: *h,
            tree,
            src,
            present,
        })
    }

    /// Writes the whole blob to `out`, verified, and marks it used.
    pub fn cat(&self, h: &Hash, out: &mut (dyn Write + Send)) -> Result<u64> {
        let mut r = self.reader(h)?;
        self.touch(h)?;
        r.copy_to(out)
    }

    /// Re-hashes every present group of a blob. Corrupt groups are logged, dropped from the
    /// present-set, and returned.
    pub fn verify(&self, h: &Hash) -> Result<Vec<u64>> {
        let m = self.meta(h)?.ok_or(StoreError::NotFound(*h))?;
        let mut r = match self.reader_for(h, &m) {
            Ok(r) => r,
            // Its files are gone: every group it held is bad.
            Err(e @ StoreError::Io { .. }) => {
                tracing::error!(hash = %h, "cannot read the blob's files: {e}; dropping it");
                let tree = Tree::new(m.size);
                let held = if m.complete {
                    Present::full(tree.groups())
                } else {
                    self.present_groups(h)?
                };
                let bad: Vec<u64> = (0..tree.groups()).filter(|&g| held.contains(g)).collect();
                self.drop_groups(h, &m, &bad)?;
                return Ok(bad);
            }
            Err(e) => return Err(e),
        };
        let mut bad = Vec::new();
        let groups = r.tree.groups();
        let mut buf = Vec::new();
        let mut g = 0;
        while g < groups {
            let batch = g..(g + BATCH).min(groups);
            let expect = match r.expect(batch.clone()) {
                Ok((expect, bad_nodes)) => {
                    bad.extend(bad_nodes.iter().filter(|&&g| r.has(g)));
                    expect
                }
                // An outboard cut short or unreadable: none of the batch can be checked.
                Err(_) => {
                    bad.extend(batch.clone().filter(|&g| r.has(g)));
                    g = batch.end;
                    continue;
                }
            };
            // The groups of `exp`, read into `buf`, against their values. A bad pair leaves gaps
            // in `exp`, so each group is placed by its index.
            let check = |exp: &Expect, buf: &[u8], bad: &mut Vec<u64>| {
                let base = exp.first().map_or(0, |e| e.0);
                for &(g, cv, is_root) in exp {
                    let at = ((g - base) * GROUP_SIZE) as usize;
                    if r.has(g) && group_cv(g, &buf[at..at + r.group_len(g)], is_root) != cv {
                        bad.push(g);
                    }
                }
            };
            match r.read_raw(&expect, &mut buf) {
                Ok(()) => check(&expect, &buf, &mut bad),
                // A data file cut short (or unreadable) fails the batch's read: judge each
                // group on its own.
                Err(_) => {
                    for e in &expect {
                        let one = vec![*e];
                        match r.read_raw(&one, &mut buf) {
                            Ok(()) => check(&one, &buf, &mut bad),
                            Err(_) if r.has(e.0) => bad.push(e.0),
                            Err(_) => {}
                        }
                    }
                }
            }
            g = batch.end;
        }
        bad.sort_unstable();
        for &g in &bad {
            let b = r.tree.group_bytes(g);
            tracing::error!(hash = %h, block = g, start = b.start, end = b.end, "block failed verification; dropping it");
        }
        if !bad.is_empty() {
            self.drop_groups(h, &m, &bad)?;
        }
        Ok(bad)
    }
}

impl BlobReader {
    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.tree.size()
    }

    fn has(&self, g: u64) -> bool {
        self.present.as_ref().is_none_or(|p| p.contains(g))
    }

    fn group_len(&self, g: u64) -> usize {
        let r = self.tree.group_bytes(g);
        (r.end - r.start) as usize
    }

    /// Walks to the groups in `want`: their expected values, and the groups whose path holds
    /// a bad outboard pair.
    fn expect(&mut self, want: Range<u64>) -> Result<(Expect, Vec<u64>)> {
        let mut exp = Vec::with_capacity((want.end - want.start) as usize);
        let mut bad = Vec::new();
        let tree = self.tree;
        let hash = self.hash;
        let mut leaf = |s: Step| {
            match s {
                Step::Leaf {
                    group,
                    expected,
                    is_root,
                } => exp.push((group, expected, is_root)),
                Step::BadNode { groups } => {
                    bad.extend(groups.start.max(want.start)..groups.end.min(want.end));
                }
            }
            Ok(())
        };
        match &mut self.src {
            Source::Inline(_) => walk(tree, &hash, want.clone(), &mut |_| unreachable!("one group"), &mut leaf),
            Source::File { ob, .. } => walk(tree, &hash, want.clone(), &mut |slot| ob.pair(slot), &mut leaf),
        }
        .ctx(|| format!("cannot read the outboard of {hash}"))?;
        Ok((exp, bad))
    }

    /// Reads the bytes of the groups in `expect` (consecutive) into `buf`, unverified.
    fn read_raw(&self, expect: &Expect, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        let (Some(first), Some(last)) = (expect.first(), expect.last()) else {
            return Ok(());
        };
        let start = first.0 * GROUP_SIZE;
        let len = (self.tree.group_bytes(last.0).end - start) as usize;
        match &self.src {
            Source::Inline(d) => {
                if d.len() != len {
                    return Err(self.corrupt(0));
                }
                buf.extend_from_slice(d);
            }
            Source::File { data, .. } => {
                let n = read_append_at(data, buf, len, start).ctx(|| format!("cannot read blob {}", self.hash))?;
                if n < len {
                    return Err(self.corrupt((start + n as u64) / GROUP_SIZE));
                }
            }
        }
        Ok(())
    }

    fn corrupt(&self, g: u64) -> StoreError {
        let bytes = self.tree.group_bytes(g);
        tracing::error!(hash = %self.hash, block = g, start = bytes.start, end = bytes.end, "block failed verification");
        StoreError::Corrupt {
            hash: self.hash,
            group: g,
            bytes,
        }
    }

    /// Reads and verifies the groups in `groups` into `buf` (group-aligned bytes).
    pub fn read_groups(&mut self, groups: Range<u64>, buf: &mut Vec<u8>) -> Result<()> {
        if let Some(g) = groups.clone().find(|&g| !self.has(g)) {
            return Err(StoreError::Missing {
                hash: self.hash,
                group: g,
                bytes: self.tree.group_bytes(g),
            });
        }
        let (expect, bad) = self.expect(groups)?;
        if let Some(&g) = bad.first() {
            return Err(self.corrupt(g));
        }
        self.read_raw(&expect, buf)?;
        check(&self.tree, &expect, buf).map_err(|g| self.corrupt(g))
    }

    /// Reads and verifies up to `len` bytes at `offset`; short only at the end of the blob.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = (offset + len as u64).min(self.size());
        let groups = self.tree.groups_for_bytes(offset..end);
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut buf = Vec::new();
        self.read_groups(groups.clone(), &mut buf)?;
        let skip = (offset - groups.start * GROUP_SIZE) as usize;
        buf.truncate(skip + (end - offset) as usize);
        buf.drain(..skip);
        Ok(buf)
    }

    /// Writes the verified encoding of the groups in `want` (see `bao.rs`).
    pub(crate) fn encode_to(
        &mut self,
        want: &[Range<u64>],
        out: &mut dyn Write,
    ) -> std::result::Result<(), VerifyError> {
        let tree = self.tree;
        match &mut self.src {
            Source::Inline(d) => bao::encode(
                tree,
                &self.hash,
                want,
                &mut |_| unreachable!("one group"),
                &mut |_, buf| {
                    buf.clear();
                    buf.extend_from_slice(d);
                    Ok(())
                },
                out,
            ),
            Source::File { data, ob } => bao::encode(
                tree,
                &self.hash,
                want,
                &mut |slot| ob.pair(slot),
                &mut |g, buf| {
                    let r = tree.group_bytes(g);
                    buf.resize((r.end - r.start) as usize, 0);
                    data.read_exact_at(buf, r.start)
                },
                out,
            ),
        }
    }

    /// Streams the whole blob to `out`. This thread reads and walks ahead; a second thread
    /// verifies each batch and writes it only if every group in it verified.
    pub fn copy_to(&mut self, out: &mut (dyn Write + Send)) -> Result<u64> {
        let groups = self.tree.groups();
        if let Some(g) = (0..groups).find(|&g| !self.has(g)) {
            return Err(StoreError::Missing {
                hash: self.hash,
                group: g,
                bytes: self.tree.group_bytes(g),
            });
        }
        let (full_tx, full_rx) = sync_channel::<(Vec<u8>, Expect)>(2);
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(4);
        for _ in 0..3 {
            free_tx.send(Vec::new()).expect("room for every buffer");
        }
        let tree = self.tree;
        std::thread::scope(|s| -> Result<u64> {
            let writer = s.spawn(move || -> std::result::Result<u64, WriteFail> {
                let mut total = 0;
                while let Ok((buf, expect)) = full_rx.recv() {
                    check(&tree, &expect, &buf).map_err(WriteFail::Corrupt)?;
                    out.write_all(&buf).map_err(WriteFail::Io)?;
                    total += buf.len() as u64;
                    let _ = free_tx.send(buf);
                }
                out.flush().map_err(WriteFail::Io)?;
                Ok(total)
            });
            let mut g = 0;
            let mut failed = None;
            while g < groups {
                let Ok(mut buf) = free_rx.recv() else { break };
                let batch = g..(g + BATCH).min(groups);
                let step = self.expect(batch.clone()).and_then(|(expect, bad)| match bad.first() {
                    Some(&b) => Err(self.corrupt(b)),
                    None => self.read_raw(&expect, &mut buf).map(|()| expect),
                });
                match step {
                    Ok(expect) => {
                        if full_tx.send((buf, expect)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                g = batch.end;
            }
            drop(full_tx);
            let written = writer.join().expect("writer thread");
            if let Some(e) = failed {
                return Err(e);
            }
            match written {
                Ok(n) => Ok(n),
                Err(WriteFail::Corrupt(g)) => Err(self.corrupt(g)),
                Err(WriteFail::Io(e)) => Err(StoreError::Io {
                    what: "cannot write the output".into(),
                    source: e,
                }),
            }
        })
    }
}

enum WriteFail {
    Corrupt(u64),
    Io(io::Error),
}

/// Checks each group in `buf` (consecutive, from `expect[0]`) against its expected value;
/// returns the first group that fails.
fn check(tree: &Tree, expect: &Expect, buf: &[u8]) -> std::result::Result<(), u64> {
    let base = expect.first().map_or(0, |e| e.0);
    for &(g, cv, is_root) in expect {
        let r = tree.group_bytes(g);
        let at = ((g - base) * GROUP_SIZE) as usize;
        let len = (r.end - r.start) as usize;
        if buf.len() < at + len || group_cv(g, &buf[at..at + len], is_root) != cv {
            return Err(g);
        }
    }
    Ok(())
}
