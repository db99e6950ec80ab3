//! Partial blobs: verified ranges written in any order, the present-set, and serving ranges.
//!
//! Ranges arrive as the bao-style encoding (`bao.rs`), verified as they are read, and go
//! straight to their place in `blobs/<hex>` and `blobs/<hex>.obao`. The present-set is kept
//! in memory and written to the index only after the bytes it lists are fsynced (every
//! `FLUSH_BYTES`, on completion, and on `Store::flush`), so a crash can lose recent ranges
//! but can never make the index claim bytes that are not on disk.

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::meta::{key, Meta, TAG_INLINE, TAG_PRESENT};
use super::{IoContext, Present, Result, Store, StoreError};
use crate::bao::{self, Item};
use crate::hash::Hash;
use crate::tree::{Tree, GROUP_SIZE, PAIR_SIZE};

/// Unsynced bytes a partial blob may gather before its present-set is made durable.
const FLUSH_BYTES: u64 = 32 << 20;

/// An open partial blob.
pub(crate) struct Partial {
    tree: Tree,
    data: File,
    ob: File,
    /// Groups verified and written (durable or not).
    present: Present,
    /// Bytes written since the last flush.
    dirty: u64,
    /// Held while the blob is synced, so one sync runs at a time; never taken while the
    /// partial's own lock is held.
    syncing: Arc<Mutex<()>>,
    /// Bumped whenever groups leave the present-set, so a sync does not record an older set.
    gen: u64,
    /// A write already said a sync is due, and that sync has not taken its snapshot yet:
    /// later writes do not ask again.
    sync_asked: bool,
    /// Its files were made in this run and `blobs/` has not been synced since: the first sync
    /// makes their names durable before it records any group.
    fresh: bool,
}

/// What a write left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Nothing yet.
    Partial,
    /// Enough bytes are unsynced that `Store::sync_partial` should run.
    FlushDue,
    /// Every group is present: `Store::sync_partial` makes the blob durable and complete.
    AllPresent,
}

impl Partial {
    /// True if group `g` is present.
    pub(crate) fn has(&self, g: u64) -> bool {
        self.present.contains(g)
    }

    /// The bytes held in the present groups.
    pub(crate) fn present_bytes(&self) -> u64 {
        present_bytes(&self.tree, &self.present)
    }
}

/// The bytes held in the present groups.
fn present_bytes(tree: &Tree, p: &Present) -> u64 {
    let mut n = p.count() * GROUP_SIZE;
    let last = tree.groups() - 1;
    if p.contains(last) {
        let r = tree.group_bytes(last);
        n -= GROUP_SIZE - (r.end - r.start);
    }
    n
}

impl Store {
    /// The present-set of a blob (full for a complete one).
    pub fn present_groups(&self, h: &Hash) -> Result<Present> {
        if let Some(p) = self.open_partial(h) {
            return Ok(p.lock().unwrap_or_else(|e| e.into_inner()).present.clone());
        }
        let m = self.meta(h)?.ok_or(StoreError::NotFound(*h))?;
        let groups = Tree::new(m.size).groups();
        if m.complete {
            return Ok(Present::full(groups));
        }
        let v = self.db.get(key(TAG_PRESENT, h)).map_err(|e| self.db_err(e))?;
        Ok(v.and_then(|v| Present::from_bytes(groups, &v))
            .unwrap_or_else(|| Present::new(groups)))
    }

    /// The runs of groups within `within` that are not held locally.
    pub fn missing(&self, h: &Hash, within: Range<u64>) -> Result<Vec<Range<u64>>> {
        Ok(self.present_groups(h)?.missing(within))
    }

    /// The open partial blob for `h`, created with `size` if the store has none.
    fn partial(&self, h: &Hash, size: u64) -> Result<Arc<Mutex<Partial>>> {
        if let Some(p) = self.open_partial(h) {
            let known = p.lock().unwrap_or_else(|e| e.into_inner()).tree.size();
            if known != size {
                return Err(StoreError::SizeMismatch {
                    hash: *h,
                    known,
                    claimed: size,
                });
            }
            return Ok(p.clone());
        }
        let _w = self.lock_write();
        // Another thread may have opened it while this one waited for the lock.
        if let Some(p) = self.open_partial(h) {
            return Ok(p);
        }
        let old = self.meta(h)?;
        if let Some(m) = &old {
            if m.size != size {
                return Err(StoreError::SizeMismatch {
                    hash: *h,
                    known: m.size,
                    claimed: size,
                });
            }
        }
        let tree = Tree::new(size);
        let present = self.present_groups(h).unwrap_or_else(|_| Present::new(tree.groups()));
        let open = |p: std::path::PathBuf, len: u64| -> Result<File> {
            let f = super::private_file()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .ctx(|| format!("cannot create {}", p.display()))?;
            f.set_len(len).ctx(|| format!("cannot size {}", p.display()))?;
            Ok(f)
        };
        let data = open(self.data_path(h), size)?;
        let ob = open(self.ob_path(h), tree.outboard_size())?;
        if old.is_none() {
            // The entry goes in first, but nothing waits for the disk here: a crash before
            // the first sync leaves files the index may not list (the next open removes
            // them) or an entry whose files are gone (dropped), never a group recorded
            // without its bytes and its files' names on disk (see `sync_partial`).
            let mut m = Meta {
                size,
                ..Meta::default()
            };
            self.put_meta_lazy(h, None, &mut m, sled::Batch::default())?;
        }
        let p = Arc::new(Mutex::new(Partial {
            tree,
            data,
            ob,
            present,
            dirty: 0,
            syncing: Arc::default(),
            gen: 0,
            sync_asked: false,
            fresh: old.is_none(),
        }));
        self.partials_lock().insert(*h, p.clone());
        Ok(p)
    }

    /// Reads the encoding of the groups in `want` for blob `h` of `size` bytes from `input`,
    /// verifies it and stores every verified group. Returns true once the blob is complete.
    /// On bad data, whatever verified before it is kept and `BadData` is returned.
    pub fn write_encoded(&self, h: &Hash, size: u64, want: &[Range<u64>], input: &mut dyn Read) -> Result<bool> {
        let w = self.write_verified(h, size, want, input)?;
        if w != Written::Partial {
            self.sync_partial(h)?;
        }
        Ok(w == Written::AllPresent)
    }

    /// As `write_encoded`, but leaves the fsync (and the marking of a complete blob) to the
    /// caller: `Store::sync_partial`, when the result asks for it. Until then the groups are
    /// present for readers but not yet recorded in the index.
    pub fn write_verified(&self, h: &Hash, size: u64, want: &[Range<u64>], input: &mut dyn Read) -> Result<Written> {
        let tree = Tree::new(size);
        if let Some(m) = self.meta(h)?.filter(|m| m.complete) {
            if m.size != size {
                return Err(StoreError::SizeMismatch {
                    hash: *h,
                    known: m.size,
                    claimed: size,
                });
            }
            bao::decode(tree, h, want, input, &mut |_| Ok(()))
                .map_err(|source| StoreError::BadData { hash: *h, source })?;
            return Ok(Written::AllPresent);
        }
        if tree.is_single_group() {
            return Ok(match self.write_single(h, size, want, input)? {
                true => Written::AllPresent,
                false => Written::Partial,
            });
        }
        // Verify first, into memory, without holding the blob: the input may be a network
        // stream, and other writers of the same blob must not wait on it.
        // Groups are kept in runs of consecutive groups, so each run is one pwrite.
        let mut pairs: Vec<(u64, [u8; 64])> = Vec::new();
        let mut runs: Vec<(Range<u64>, Vec<u8>)> = Vec::new();
        let res = bao::decode(tree, h, want, input, &mut |item| {
            match item {
                Item::Pair { slot, pair } => pairs.push((slot, *pair)),
                Item::Group { group, data } => match runs.last_mut() {
                    Some((r, bytes)) if r.end == group => {
                        r.end += 1;
                        bytes.extend_from_slice(data);
                    }
                    _ => {
                        let mut bytes = Vec::with_capacity(16 * GROUP_SIZE as usize);
                        bytes.extend_from_slice(data);
                        runs.push((group..group + 1, bytes));
                    }
                },
            }
            Ok(())
        });
        let verdict = res.map_err(|e| match e {
            bao::VerifyError::Io(e) => StoreError::Io {
                what: format!("reading blob {h}"),
                source: e,
            },
            source => {
                tracing::warn!(hash = %h, "rejected data that failed verification: {source}");
                StoreError::BadData { hash: *h, source }
            }
        });
        // A first answer that verified nothing leaves nothing behind: no entry under a size
        // that only the peer claimed.
        if runs.is_empty() && self.open_partial(h).is_none() && self.meta(h)?.is_none() {
            return verdict.map(|()| Written::Partial);
        }
        // Whatever verified is kept, even if the stream then failed.
        let p = self.partial(h, size)?;
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        let part = &mut *p;
        let mut added = 0;
        let written = (|| -> std::io::Result<()> {
            for (slot, pair) in &pairs {
                part.ob.write_all_at(pair, slot * PAIR_SIZE)?;
            }
            for (r, data) in &runs {
                // Groups already present are written again with the same verified bytes;
                // only new ones count.
                let new: u64 = r
                    .clone()
                    .filter(|g| !part.present.contains(*g))
                    .map(|g| tree.group_bytes(g).end - tree.group_bytes(g).start)
                    .sum();
                if new > 0 {
                    part.data.write_all_at(data, r.start * GROUP_SIZE)?;
                    part.present.insert(r.clone());
                    added += new;
                }
            }
            Ok(())
        })();
        part.dirty += added;
        self.used.fetch_add(added, Ordering::Relaxed);
        written.ctx(|| format!("cannot store blob {h}"))?;
        verdict?;
        Ok(if part.present.is_full() {
            Written::AllPresent
        } else if part.dirty >= FLUSH_BYTES && !part.sync_asked {
            part.sync_asked = true;
            Written::FlushDue
        } else {
            Written::Partial
        })
    }

    /// A blob of one group is verified whole and kept inline.
    fn write_single(&self, h: &Hash, size: u64, want: &[Range<u64>], input: &mut dyn Read) -> Result<bool> {
        let mut got = None;
        bao::decode(Tree::new(size), h, want, input, &mut |item| {
            if let Item::Group { data, .. } = item {
                got = Some(data.to_vec());
            }
            Ok(())
        })
        .map_err(|source| StoreError::BadData { hash: *h, source })?;
        let Some(data) = got else { return Ok(false) };
        let _w = self.lock_write();
        let old = self.meta(h)?;
        let mut b = sled::Batch::default();
        b.insert(&key(TAG_INLINE, h)[..], data);
        let mut m = Meta {
            size,
            complete: true,
            inline: true,
            present: size,
            ..old.unwrap_or_default()
        };
        self.put_meta(h, old.as_ref(), &mut m, b)?;
        self.used.fetch_add(size, Ordering::Relaxed);
        drop(_w);
        self.completed(*h);
        Ok(true)
    }

    /// Makes a partial blob's written groups durable, then records them in the index; if
    /// every group is present, marks the blob complete (and announces it). The fsync runs
    /// without the blob's lock, so writers and readers go on meanwhile.
    pub fn sync_partial(&self, h: &Hash) -> Result<()> {
        let Some(p) = self.open_partial(h) else {
            return Ok(());
        };
        let syncing = p.lock().unwrap_or_else(|e| e.into_inner()).syncing.clone();
        let _one = syncing.lock().unwrap_or_else(|e| e.into_inner());
        let what = || format!("cannot sync blob {h}");
        // What is written now is what this sync makes durable.
        let (gen, present, dirty, data, ob, fresh) = {
            let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
            g.sync_asked = false;
            if g.dirty == 0 && !g.present.is_full() {
                return Ok(());
            }
            let files = (g.data.try_clone().ctx(what)?, g.ob.try_clone().ctx(what)?);
            let dirty = std::mem::take(&mut g.dirty);
            (g.gen, g.present.clone(), dirty, files.0, files.1, g.fresh)
        };
        let synced = data.sync_data().and_then(|()| ob.sync_data());
        // New files' names, too, before the index lists any of their groups.
        let named = match synced {
            Ok(()) if fresh => self.sync_blobs_dir(),
            Ok(()) => Ok(()),
            Err(e) => Err(e).ctx(what),
        };
        let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = named {
            g.dirty += dirty;
            return Err(e);
        }
        g.fresh = false;
        if g.gen != gen {
            // Groups were dropped meanwhile; the next sync records the smaller set.
            g.dirty += dirty.max(1);
            return Ok(());
        }
        let _w = self.lock_write();
        let Some(old) = self.meta(h)? else {
            return Ok(());
        };
        if old.complete {
            // Another sync (the fetch's own, behind its reader) got here first.
            return Ok(());
        }
        let mut m = old;
        let mut b = sled::Batch::default();
        if present.is_full() {
            m.complete = true;
            m.present = m.size;
            b.remove(&key(TAG_PRESENT, h)[..]);
        } else {
            m.present = present_bytes(&g.tree, &present);
            b.insert(&key(TAG_PRESENT, h)[..], present.to_bytes());
        }
        self.put_meta_lazy(h, Some(&old), &mut m, b)?;
        drop(_w);
        drop(g);
        // Durable before this returns. The flush runs without the locks, so that the syncs of
        // other blobs share it instead of queueing behind it (the bytes it records are on disk
        // already: a crash before it only forgets them).
        self.db.flush().map_err(|e| self.db_err(e))?;
        if !present.is_full() {
            return Ok(());
        }
        tracing::info!(hash = %h, size = m.size, "blob complete");
        self.partials_lock().remove(h);
        self.completed(*h);
        self.gc()?;
        Ok(())
    }

    /// Drops groups that failed verification from a blob's present-set.
    pub(crate) fn drop_groups(&self, h: &Hash, m: &Meta, bad: &[u64]) -> Result<()> {
        self.unmark_verified(h);
        let tree = Tree::new(m.size);
        if m.inline {
            return self.remove(h);
        }
        // Lock order: a partial blob's lock before the write lock, never the other way.
        let present = match self.open_partial(h) {
            Some(p) => {
                let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                for &g in bad {
                    p.present.remove(g);
                }
                p.gen += 1;
                p.present.clone()
            }
            None => {
                let mut present = self.present_groups(h)?;
                for &g in bad {
                    present.remove(g);
                }
                present
            }
        };
        let _w = self.lock_write();
        let mut new = *m;
        new.complete = false;
        new.present = present_bytes(&tree, &present);
        let mut b = sled::Batch::default();
        b.insert(&key(TAG_PRESENT, h)[..], present.to_bytes());
        self.put_meta(h, Some(m), &mut new, b)?;
        self.used.fetch_sub(m.present - new.present, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the verified encoding of the groups in `want` to `out`; every wanted group must
    /// be present. This is what a node serves to peers.
    pub fn encode(&self, h: &Hash, want: &[Range<u64>], out: &mut dyn Write) -> Result<u64> {
        let m = self.meta(h)?.ok_or(StoreError::NotFound(*h))?;
        let tree = Tree::new(m.size);
        let present = self.present_groups(h)?;
        for r in want {
            if let Some(g) = (r.start..r.end.min(tree.groups())).find(|&g| !present.contains(g)) {
                return Err(StoreError::Missing {
                    hash: *h,
                    group: g,
                    bytes: tree.group_bytes(g),
                });
            }
        }
        let mut reader = self.reader_for(h, &m)?;
        let mut counter = Counter { inner: out, n: 0 };
        reader
            .encode_to(want, &mut counter)
            .map_err(|source| match source {
                bao::VerifyError::BadGroup { group } => reader_corrupt(h, &tree, group),
                bao::VerifyError::BadPair { groups } => reader_corrupt(h, &tree, groups.start),
                bao::VerifyError::Io(e) => StoreError::Io {
                    what: format!("cannot serve blob {h}"),
                    source: e,
                },
            })
            // A bad group is dropped at the first failure: not served or claimed again.
            .map_err(|e| self.note_corrupt(e))?;
        Ok(counter.n)
    }
}

fn reader_corrupt(h: &Hash, tree: &Tree, g: u64) -> StoreError {
    tracing::error!(hash = %h, block = g, "block failed verification while serving");
    StoreError::Corrupt {
        hash: *h,
        group: g,
        bytes: tree.group_bytes(g),
    }
}

struct Counter<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
