//! Which blob files may be read by FUSE passthrough, where the kernel reads the file and no
//! byte is verified on the way.
//!
//! A blob file qualifies only once it verified whole in this process's life (it was hashed
//! as it was written, every group was verified as it arrived, or `check_for_passthrough`
//! read it through), and only while its size, inode, mtime and ctime are those it had then:
//! a file changed on disk by anyone but the store is read through the daemon again, where
//! every byte is verified. A blob found corrupt anywhere (a read, a peer's request, `verify`)
//! loses the mark at once.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Result, Store, StoreError};
use crate::hash::Hash;

/// What a blob file looked like when it verified whole.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Stamp {
    len: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(p: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(p).ok()?;
    Some(Stamp {
        len: m.len(),
        ino: m.ino(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

impl Store {
    /// Marks complete blob `h`'s file as verified whole, as it is now.
    pub(crate) fn mark_verified(&self, h: &Hash) {
        if let Ok(Some(p)) = self.complete_file(h) {
            if let Some(s) = stamp(&p) {
                self.verified_lock().insert(*h, s);
            }
        }
    }

    /// Forgets that `h`'s file verified (it was found corrupt, or dropped).
    pub(crate) fn unmark_verified(&self, h: &Hash) {
        self.verified_lock().remove(h);
    }

    /// The file of complete blob `h` if it may be read by passthrough: it verified whole in
    /// this process's life and has not changed since.
    pub fn passthrough_file(&self, h: &Hash) -> Option<PathBuf> {
        let p = self.complete_file(h).ok()??;
        let want = *self.verified_lock().get(h)?;
        (stamp(&p) == Some(want)).then_some(p)
    }

    /// Reads complete blob `h` through, verifying every group (dropping bad ones); if all is
    /// well and the file did not change meanwhile, marks it fit for passthrough. Returns
    /// whether it is.
    pub fn check_for_passthrough(&self, h: &Hash) -> Result<bool> {
        let Some(p) = self.complete_file(h)? else {
            return Ok(false);
        };
        let before = stamp(&p);
        if !self.verify(h)?.is_empty() {
            return Ok(false);
        }
        let after = stamp(&p);
        match (before, after) {
            (Some(b), Some(a)) if a == b => {
                self.verified_lock().insert(*h, a);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A read of `h` found group `group` corrupt: drop it (so that it is fetched again from
    /// peers, and no longer served or announced as held), and read `h` through the daemon
    /// from now on.
    pub fn found_corrupt(&self, h: &Hash, group: u64) {
        self.unmark_verified(h);
        let res = match self.meta(h) {
            Ok(Some(m)) => self.drop_groups(h, &m, &[group]),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => tracing::warn!(hash = %h, block = group, "dropped a block that failed verification"),
            Err(e) => tracing::error!(hash = %h, block = group, "cannot drop a block that failed verification: {e}"),
        }
    }

    /// If `e` says a group of a blob is corrupt, drops it (`found_corrupt`); returns `e`.
    pub fn note_corrupt(&self, e: StoreError) -> StoreError {
        if let StoreError::Corrupt { hash, group, .. } = &e {
            self.found_corrupt(hash, *group);
        }
        e
    }
}
