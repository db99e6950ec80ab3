//! The user's names in the mount: files, folders and symlinks, kept in the index so that they
//! survive a restart.
//!
//! A file's content is a blob; the node holds its hash and size. Layout in the `names` tree:
//!
//! ```text
//! 'n' ino(BE)             -> Node (JSON)
//! 'c' parent(BE) name     -> ino(BE)      children, sorted by name
//! 's'                     -> next inode number
//! 'h' hash ino(BE)        -> ()           the blob a file holds, by file
//! 'v'                     -> layout version (2 since the 'h' records)
//! ```
//!
//! A name holds the blob it points to: the store never evicts a blob that an 'h' record names
//! (`held_by`), and when the name is rewritten or removed the old blob is released, still
//! cached and seeded until gc evicts it. The 'h' records change in the same batch as the node.
//!
//! Changes are applied as sled batches, so a rename or an unlink is atomic. The filesystem
//! flushes them at every save (a close that commits), unlink, rename, fsync and fsyncdir;
//! other changes (mkdir, symlink, chmod) wait for the index's timer (every second) or the next
//! of those, so a crash can lose the last second of them, never a blob. A full disk loses
//! none of them: the index keeps them until it can write them (`store/index.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::store::Table;

/// The root directory's inode number.
pub const ROOT: u64 = 1;

/// What a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// One name in the mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub parent: u64,
    pub name: Vec<u8>,
    pub kind: Kind,
    /// Permission bits (07777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Times as nanoseconds since the epoch.
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    /// For a file, the size of its blob.
    pub size: u64,
    /// For a file, its blob; `None` only while a new file has never been closed.
    pub hash: Option<Hash>,
    /// For a symlink, its target.
    pub target: Vec<u8>,
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A time in nanoseconds as a `SystemTime`.
pub fn to_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

impl Node {
    /// A new node stamped with the current time.
    pub fn new(parent: u64, name: &[u8], kind: Kind, perm: u32, uid: u32, gid: u32) -> Node {
        let t = now_ns();
        Node {
            parent,
            name: name.to_vec(),
            kind,
            perm,
            uid,
            gid,
            atime: t,
            mtime: t,
            ctime: t,
            size: 0,
            hash: None,
            target: Vec::new(),
        }
    }
}

/// Why a names operation failed, in errno terms.
#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("no such name")]
    NotFound,
    #[error("name exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("a folder cannot move inside itself")]
    Invalid,
    #[error("index database: {0}")]
    Db(#[from] sled::Error),
}

type Result<T> = std::result::Result<T, NamesError>;

/// The table of names.
pub struct Names {
    tree: Table,
    next: AtomicU64,
    /// Serialises changes that read and then write several records (rename, unlink).
    write: Mutex<()>,
}

fn node_key(ino: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'n';
    k[1..].copy_from_slice(&ino.to_be_bytes());
    k
}

fn child_key(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + name.len());
    k.push(b'c');
    k.extend_from_slice(&parent.to_be_bytes());
    k.extend_from_slice(name);
    k
}

fn hold_key(h: &Hash, ino: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(41);
    k.push(b'h');
    k.extend_from_slice(h.as_bytes());
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

/// The layout version this code writes.
const VERSION: u8 = 2;

/// Keeps the 'h' record of `ino` in step as its node goes from `old` to `new`.
fn rehold(b: &mut sled::Batch, ino: u64, old: Option<&Node>, new: Option<&Node>) {
    let held = |n: Option<&Node>| n.filter(|n| n.kind == Kind::File).and_then(|n| n.hash);
    let (was, is) = (held(old), held(new));
    if was == is {
        return;
    }
    if let Some(h) = was {
        b.remove(hold_key(&h, ino));
    }
    if let Some(h) = is {
        b.insert(hold_key(&h, ino), &[][..]);
    }
}

/// The inode of a name that holds blob `h`, if any. `tree` is the names table; the store
/// asks this before it evicts anything.
pub fn held_by(tree: &Table, h: &Hash) -> std::result::Result<Option<u64>, sled::Error> {
    let mut prefix = vec![b'h'];
    prefix.extend_from_slice(h.as_bytes());
    Ok(match tree.scan_prefix(&prefix).next().transpose()? {
        Some((k, _)) => k[33..].try_into().ok().map(u64::from_be_bytes),
        None => None,
    })
}

/// The path of `ino` from the mount's root (`a/b/c`), as far as it can be followed.
pub fn path_of(tree: &Table, mut ino: u64) -> std::result::Result<Vec<u8>, sled::Error> {
    let mut parts = Vec::new();
    while ino != ROOT && parts.len() < 4096 {
        let Some(n) = tree.get(node_key(ino))?.and_then(|v| decode(&v)) else {
            break;
        };
        parts.push(n.name);
        ino = n.parent;
    }
    parts.reverse();
    Ok(parts.join(&b'/'))
}

fn decode(v: &[u8]) -> Option<Node> {
    serde_json::from_slice(v).ok()
}

fn encode(n: &Node) -> Vec<u8> {
    serde_json::to_vec(n).expect("a node always serialises")
}

impl Names {
    /// Opens the table, creating the root folder the first time.
    pub fn open(tree: Table, uid: u32, gid: u32) -> Result<Names> {
        let next = match tree.get(b"s")? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0, 0, 0, 0, 0, 0, 0, 2])),
            None => 2,
        };
        let names = Names {
            tree,
            next: AtomicU64::new(next.max(2)),
            write: Mutex::new(()),
        };
        if names.get(ROOT)?.is_none() {
            let root = Node::new(ROOT, b"", Kind::Dir, 0o755, uid, gid);
            names.tree.insert(node_key(ROOT), encode(&root))?;
        }
        if names
            .tree
            .get(b"v")?
            .is_none_or(|v| v.first().is_none_or(|&v| v < VERSION))
        {
            names.index_holds()?;
        }
        Ok(names)
    }

    /// Builds the 'h' records of a table written before they existed. Blobs the old layout
    /// pinned for their names stay pinned (an explicit pin and a name's looked the same).
    fn index_holds(&self) -> Result<()> {
        let mut b = sled::Batch::default();
        let mut n = 0;
        for kv in self.tree.scan_prefix(b"n") {
            let (k, v) = kv?;
            if let (Ok(ino), Some(node)) = (<[u8; 8]>::try_from(&k[1..]), decode(&v)) {
                rehold(&mut b, u64::from_be_bytes(ino), None, Some(&node));
                n += usize::from(node.hash.is_some());
            }
        }
        b.insert(&b"v"[..], &[VERSION][..]);
        self.tree.apply_batch(b)?;
        self.tree.flush()?;
        if n > 0 {
            tracing::info!(files = n, "indexed the blobs each name holds");
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node with inode number `ino`.
    pub fn get(&self, ino: u64) -> Result<Option<Node>> {
        Ok(self.tree.get(node_key(ino))?.and_then(|v| decode(&v)))
    }

    /// The child `name` of folder `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<(u64, Node)>> {
        let Some(v) = self.tree.get(child_key(parent, name))? else {
            return Ok(None);
        };
        let ino = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| NamesError::NotFound)?);
        Ok(self.get(ino)?.map(|n| (ino, n)))
    }

    /// The children of `parent`, sorted by name, from position `skip`.
    pub fn children(&self, parent: u64, skip: usize) -> Result<Vec<(u64, Node)>> {
        let mut prefix = vec![b'c'];
        prefix.extend_from_slice(&parent.to_be_bytes());
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix).skip(skip) {
            let (_, v) = kv?;
            if let Ok(b) = <[u8; 8]>::try_from(v.as_ref()) {
                let ino = u64::from_be_bytes(b);
                if let Some(n) = self.get(ino)? {
                    out.push((ino, n));
                }
            }
        }
        Ok(out)
    }

    /// The number of names.
    pub fn count(&self) -> usize {
        self.tree.scan_prefix(b"n").count()
    }

    /// Adds `node` under its parent; fails if the name is taken.
    pub fn create(&self, node: Node) -> Result<u64> {
        let _w = self.lock();
        match self.get(node.parent)? {
            Some(p) if p.kind == Kind::Dir => {}
            Some(_) => return Err(NamesError::NotDir),
            None => return Err(NamesError::NotFound),
        }
        let ck = child_key(node.parent, &node.name);
        if self.tree.get(&ck)?.is_some() {
            return Err(NamesError::Exists);
        }
        let ino = self.next.fetch_add(1, Ordering::Relaxed);
        let mut b = sled::Batch::default();
        b.insert(&b"s"[..], &(ino + 1).to_be_bytes()[..]);
        b.insert(&node_key(ino)[..], encode(&node));
        rehold(&mut b, ino, None, Some(&node));
        b.insert(ck, &ino.to_be_bytes()[..]);
        self.tree.apply_batch(b)?;
        Ok(ino)
    }

    /// Changes a node in place with `f`, and returns the new node.
    pub fn update(&self, ino: u64, f: impl FnOnce(&mut Node)) -> Result<Node> {
        let _w = self.lock();
        let old = self.get(ino)?.ok_or(NamesError::NotFound)?;
        let mut n = old.clone();
        f(&mut n);
        let mut b = sled::Batch::default();
        b.insert(&node_key(ino)[..], encode(&n));
        rehold(&mut b, ino, Some(&old), Some(&n));
        self.tree.apply_batch(b)?;
        Ok(n)
    }

    /// Removes `name` from `parent`; `dir` says whether the caller expects a folder (rmdir)
    /// or not (unlink). Returns the removed node.
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<(u64, Node)> {
        let _w = self.lock();
        let (ino, n) = self.lookup(parent, name)?.ok_or(NamesError::NotFound)?;
        match (dir, n.kind == Kind::Dir) {
            (true, false) => return Err(NamesError::NotDir),
            (false, true) => return Err(NamesError::IsDir),
            _ => {}
        }
        if dir && !self.children(ino, 0)?.is_empty() {
            return Err(NamesError::NotEmpty);
        }
        let mut b = sled::Batch::default();
        b.remove(child_key(parent, name));
        b.remove(&node_key(ino)[..]);
        rehold(&mut b, ino, Some(&n), None);
        self.tree.apply_batch(b)?;
        Ok((ino, n))
    }

    /// Moves `parent/name` to `new_parent/new_name`, replacing what is there as rename(2)
    /// does (unless `no_replace`). Returns the node it replaced, if any.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        no_replace: bool,
    ) -> Result<Option<(u64, Node)>> {
        let _w = self.lock();
        let (ino, mut n) = self.lookup(parent, name)?.ok_or(NamesError::NotFound)?;
        match self.get(new_parent)? {
            Some(p) if p.kind == Kind::Dir => {}
            Some(_) => return Err(NamesError::NotDir),
            None => return Err(NamesError::NotFound),
        }
        // A folder may not move into its own subtree.
        let mut up = new_parent;
        while up != ROOT {
            if up == ino {
                return Err(NamesError::Invalid);
            }
            up = self.get(up)?.map_or(ROOT, |p| p.parent);
        }
        let mut b = sled::Batch::default();
        let replaced = self.lookup(new_parent, new_name)?;
        if let Some((old_ino, old)) = &replaced {
            if *old_ino == ino {
                return Ok(None);
            }
            if no_replace {
                return Err(NamesError::Exists);
            }
            match (n.kind == Kind::Dir, old.kind == Kind::Dir) {
                (true, false) => return Err(NamesError::NotDir),
                (false, true) => return Err(NamesError::IsDir),
                (true, true) if !self.children(*old_ino, 0)?.is_empty() => return Err(NamesError::NotEmpty),
                _ => {}
            }
            b.remove(&node_key(*old_ino)[..]);
            rehold(&mut b, *old_ino, Some(old), None);
        }
        b.remove(child_key(parent, name));
        n.parent = new_parent;
        n.name = new_name.to_vec();
        n.ctime = now_ns();
        b.insert(&node_key(ino)[..], encode(&n));
        b.insert(child_key(new_parent, new_name), &ino.to_be_bytes()[..]);
        self.tree.apply_batch(b)?;
        Ok(replaced)
    }

    /// Removes files that were created but never closed: a daemon killed while they were
    /// being written. Their content was never published, so the names go too. Returns how
    /// many were removed.
    pub fn sweep_unfinished(&self) -> Result<usize> {
        let mut gone = Vec::new();
        for kv in self.tree.scan_prefix(b"n") {
            let (_, v) = kv?;
            if let Some(n) = decode(&v) {
                if n.kind == Kind::File && n.hash.is_none() {
                    gone.push((n.parent, n.name));
                }
            }
        }
        for (parent, name) in &gone {
            self.remove(*parent, name, false)?;
        }
        Ok(gone.len())
    }

    /// Makes every change durable.
    pub fn flush(&self) -> Result<()> {
        self.tree.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        crate::store::Index::temporary().unwrap().table(Some("names")).unwrap()
    }

    #[test]
    fn a_name_holds_its_blob_until_rewritten_removed_or_renamed_over() {
        let tree = table();
        let names = Names::open(tree.clone(), 0, 0).unwrap();
        let (h1, h2) = (Hash::of(b"one"), Hash::of(b"two"));
        let ino = names.create(Node::new(ROOT, b"f", Kind::File, 0o644, 0, 0)).unwrap();
        assert_eq!(held_by(&tree, &h1).unwrap(), None);
        names.update(ino, |n| n.hash = Some(h1)).unwrap();
        assert_eq!(held_by(&tree, &h1).unwrap(), Some(ino));
        names.update(ino, |n| n.hash = Some(h2)).unwrap();
        assert_eq!(
            held_by(&tree, &h1).unwrap(),
            None,
            "rewritten: the old blob is released"
        );
        let other = names.create(Node::new(ROOT, b"g", Kind::File, 0o644, 0, 0)).unwrap();
        names.update(other, |n| n.hash = Some(h1)).unwrap();
        names.rename(ROOT, b"g", ROOT, b"f", false).unwrap();
        assert_eq!(held_by(&tree, &h2).unwrap(), None, "renamed over: released");
        assert_eq!(held_by(&tree, &h1).unwrap(), Some(other));
        assert_eq!(path_of(&tree, other).unwrap(), b"f");
        names.remove(ROOT, b"f", false).unwrap();
        assert_eq!(held_by(&tree, &h1).unwrap(), None, "removed: released");
    }

    #[test]
    fn a_table_from_before_the_hold_records_is_indexed_at_open() {
        let tree = table();
        let h = Hash::of(b"old");
        let mut n = Node::new(ROOT, b"old", Kind::File, 0o644, 0, 0);
        n.hash = Some(h);
        tree.insert(node_key(7), encode(&n)).unwrap();
        tree.insert(child_key(ROOT, b"old"), &7u64.to_be_bytes()[..]).unwrap();
        assert_eq!(held_by(&tree, &h).unwrap(), None);
        Names::open(tree.clone(), 0, 0).unwrap();
        assert_eq!(held_by(&tree, &h).unwrap(), Some(7));
    }
}
