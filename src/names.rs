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
//! 'r' ino(BE) parent(BE) name -> ()       a hard link's names beyond the node's own
//! 'v'                     -> layout version (3 since link counts)
//! ```
//!
//! A node's `parent` and `name` are one of its names; a file with hard links has its other
//! names in 'r' records, and when the node's own name goes, one of those takes its place.
//! `nlink` is the number of names of a file, and 2 + sub-folders for a folder. Creating,
//! removing or renaming an entry stamps its folder's mtime and ctime in the same batch.
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

use std::collections::BTreeMap;
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
    /// Named pipes, sockets and device nodes are names only: the kernel opens them, and
    /// they are never published.
    Fifo,
    Socket,
    CharDev,
    BlockDev,
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
    /// For a device node, its device number.
    #[serde(default)]
    pub rdev: u32,
    /// Names of a file; 2 + sub-folders of a folder. Tables before layout 3 lack it.
    #[serde(default)]
    pub nlink: u32,
    /// For a folder, the manifests of its hash as last computed (`user.swarmfs.hash`); the
    /// folder holds them, as a file holds its blob.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<Hash>,
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
            rdev: 0,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            manifests: Vec::new(),
        }
    }
}

/// The longest name a folder holds, in bytes (NAME_MAX).
pub const NAME_MAX: usize = 255;
/// The set-group-ID bit: on a folder, new entries take its group, and new folders the bit.
const S_ISGID: u32 = 0o2000;

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
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("a folder cannot have hard links")]
    DirLink,
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

fn link_key(ino: u64, parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + name.len());
    k.push(b'r');
    k.extend_from_slice(&ino.to_be_bytes());
    k.extend_from_slice(&parent.to_be_bytes());
    k.extend_from_slice(name);
    k
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(NamesError::NameTooLong);
    }
    Ok(())
}

/// The layout version this code writes.
const VERSION: u8 = 3;

/// One change to the table, built up and then applied as one batch: nodes as the change
/// leaves them (read through it), with their 'h' records kept in step at the end.
struct Change<'a> {
    names: &'a Names,
    b: sled::Batch,
    /// ino -> (as it was, as it is now; `None`: removed).
    nodes: BTreeMap<u64, (Option<Node>, Option<Node>)>,
    now: u64,
}

impl<'a> Change<'a> {
    fn new(names: &'a Names) -> Change<'a> {
        Change {
            names,
            b: sled::Batch::default(),
            nodes: BTreeMap::new(),
            now: now_ns(),
        }
    }

    fn get(&mut self, ino: u64) -> Result<Option<Node>> {
        if let Some((_, n)) = self.nodes.get(&ino) {
            return Ok(n.clone());
        }
        let n = self.names.get(ino)?;
        self.nodes.insert(ino, (n.clone(), n.clone()));
        Ok(n)
    }

    fn put(&mut self, ino: u64, n: Option<Node>) -> Result<()> {
        self.get(ino)?;
        self.nodes.get_mut(&ino).expect("read above").1 = n;
        Ok(())
    }

    /// The folder `ino`, which must be one.
    fn dir(&mut self, ino: u64) -> Result<Node> {
        match self.get(ino)? {
            Some(p) if p.kind == Kind::Dir => Ok(p),
            Some(_) => Err(NamesError::NotDir),
            None => Err(NamesError::NotFound),
        }
    }

    /// An entry of folder `ino` came or went: its mtime and ctime now, its link count by
    /// `sub` (sub-folders gained or lost).
    fn entries_changed(&mut self, ino: u64, sub: i32) -> Result<()> {
        let mut p = self.dir(ino)?;
        p.mtime = self.now;
        p.ctime = self.now;
        p.nlink = p.nlink.saturating_add_signed(sub).max(2);
        self.put(ino, Some(p))
    }

    /// Takes away the name `parent/name` of `ino` (node `n`): the node goes with its last
    /// name. Returns the node as left, with `nlink` 0 if it is gone.
    fn unname(&mut self, parent: u64, name: &[u8], ino: u64, mut n: Node) -> Result<Node> {
        self.b.remove(child_key(parent, name));
        let sub = if n.kind == Kind::Dir { -1 } else { 0 };
        self.entries_changed(parent, sub)?;
        if n.kind != Kind::Dir && n.nlink > 1 {
            n.nlink -= 1;
            n.ctime = self.now;
            if n.parent == parent && n.name == name {
                // The node's own name goes: another of its names takes its place.
                let (p2, name2) = self.names.other_link(ino)?.ok_or(NamesError::NotFound)?;
                self.b.remove(link_key(ino, p2, &name2));
                n.parent = p2;
                n.name = name2;
            } else {
                self.b.remove(link_key(ino, parent, name));
            }
            self.put(ino, Some(n.clone()))?;
            return Ok(n);
        }
        self.put(ino, None)?;
        n.nlink = 0;
        Ok(n)
    }

    fn apply(mut self) -> Result<()> {
        for (ino, (old, new)) in std::mem::take(&mut self.nodes) {
            if old == new {
                continue;
            }
            match &new {
                Some(n) => self.b.insert(&node_key(ino)[..], encode(n)),
                None => self.b.remove(&node_key(ino)[..]),
            }
            rehold(&mut self.b, ino, old.as_ref(), new.as_ref());
        }
        self.names.tree.apply_batch(self.b)?;
        Ok(())
    }
}

/// Keeps the 'h' records of `ino` in step as its node goes from `old` to `new`: a file holds
/// its blob, a folder the manifests of its last computed hash.
fn rehold(b: &mut sled::Batch, ino: u64, old: Option<&Node>, new: Option<&Node>) {
    let held = |n: Option<&Node>| -> Vec<Hash> {
        match n {
            Some(n) if n.kind == Kind::File => n.hash.into_iter().collect(),
            Some(n) if n.kind == Kind::Dir => n.manifests.clone(),
            _ => Vec::new(),
        }
    };
    let (was, is) = (held(old), held(new));
    if was == is {
        return;
    }
    for h in was.iter().filter(|h| !is.contains(h)) {
        b.remove(hold_key(h, ino));
    }
    for h in is.iter().filter(|h| !was.contains(h)) {
        b.insert(hold_key(h, ino), &[][..]);
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
            names.upgrade()?;
        }
        Ok(names)
    }

    /// Brings a table written by an older version up to this layout: builds the 'h' records
    /// (layout 2) and the link counts (layout 3). Blobs the layout-1 table pinned for their
    /// names stay pinned (an explicit pin and a name's looked the same).
    fn upgrade(&self) -> Result<()> {
        let mut nodes = BTreeMap::new();
        for kv in self.tree.scan_prefix(b"n") {
            let (k, v) = kv?;
            if let (Ok(ino), Some(node)) = (<[u8; 8]>::try_from(&k[1..]), decode(&v)) {
                nodes.insert(u64::from_be_bytes(ino), node);
            }
        }
        let mut subdirs: BTreeMap<u64, u32> = BTreeMap::new();
        for (_, n) in nodes.iter().filter(|(&i, n)| n.kind == Kind::Dir && i != ROOT) {
            *subdirs.entry(n.parent).or_default() += 1;
        }
        let mut b = sled::Batch::default();
        let mut files = 0;
        for (&ino, node) in &nodes {
            // Holds are written whole: a table of layout 2 has them already, and they match.
            rehold(&mut b, ino, None, Some(node));
            files += usize::from(node.hash.is_some());
            let mut n = node.clone();
            n.nlink = match n.kind {
                Kind::Dir => 2 + subdirs.get(&ino).copied().unwrap_or(0),
                _ => 1,
            };
            if n != *node {
                b.insert(&node_key(ino)[..], encode(&n));
            }
        }
        b.insert(&b"v"[..], &[VERSION][..]);
        self.tree.apply_batch(b)?;
        self.tree.flush()?;
        if files > 0 {
            tracing::info!(files, "indexed the blobs each name holds and the link counts");
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
        check_name(name)?;
        let Some(v) = self.tree.get(child_key(parent, name))? else {
            return Ok(None);
        };
        let ino = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| NamesError::NotFound)?);
        Ok(self.get(ino)?.map(|n| (ino, n)))
    }

    /// The children of `parent`, sorted by name, from position `skip`, each node with the
    /// name it has there.
    pub fn children(&self, parent: u64, skip: usize) -> Result<Vec<(u64, Node)>> {
        let mut prefix = vec![b'c'];
        prefix.extend_from_slice(&parent.to_be_bytes());
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix).skip(skip) {
            let (k, v) = kv?;
            if let Ok(b) = <[u8; 8]>::try_from(v.as_ref()) {
                let ino = u64::from_be_bytes(b);
                if let Some(mut n) = self.get(ino)? {
                    // A file with hard links is listed under the name it has here.
                    n.name = k[9..].to_vec();
                    n.parent = parent;
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

    /// Adds `node` under its parent; fails if the name is taken. In a set-group-ID folder
    /// the node takes the folder's group, and a new folder the bit too.
    pub fn create(&self, mut node: Node) -> Result<u64> {
        check_name(&node.name)?;
        let _w = self.lock();
        let mut c = Change::new(self);
        let parent = c.dir(node.parent)?;
        let ck = child_key(node.parent, &node.name);
        if self.tree.get(&ck)?.is_some() {
            return Err(NamesError::Exists);
        }
        if parent.perm & S_ISGID != 0 {
            node.gid = parent.gid;
            if node.kind == Kind::Dir {
                node.perm |= S_ISGID;
            }
        }
        node.nlink = if node.kind == Kind::Dir { 2 } else { 1 };
        let ino = self.next.fetch_add(1, Ordering::Relaxed);
        c.b.insert(&b"s"[..], &(ino + 1).to_be_bytes()[..]);
        c.b.insert(ck, &ino.to_be_bytes()[..]);
        c.entries_changed(node.parent, i32::from(node.kind == Kind::Dir))?;
        c.put(ino, Some(node))?;
        c.apply()?;
        Ok(ino)
    }

    /// Gives file `ino` another name, `parent/name` (link(2)). Returns the node.
    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Node> {
        check_name(name)?;
        let _w = self.lock();
        let mut c = Change::new(self);
        let mut n = c.get(ino)?.ok_or(NamesError::NotFound)?;
        if n.kind == Kind::Dir {
            return Err(NamesError::DirLink);
        }
        c.dir(parent)?;
        let ck = child_key(parent, name);
        if self.tree.get(&ck)?.is_some() {
            return Err(NamesError::Exists);
        }
        c.b.insert(ck, &ino.to_be_bytes()[..]);
        c.b.insert(link_key(ino, parent, name), &[][..]);
        n.nlink = n.nlink.max(1) + 1;
        n.ctime = c.now;
        c.entries_changed(parent, 0)?;
        c.put(ino, Some(n.clone()))?;
        c.apply()?;
        Ok(n)
    }

    /// A name of `ino` other than the node's own, if it has one (hard links).
    fn other_link(&self, ino: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let mut prefix = vec![b'r'];
        prefix.extend_from_slice(&ino.to_be_bytes());
        Ok(match self.tree.scan_prefix(&prefix).next().transpose()? {
            Some((k, _)) if k.len() >= 17 => Some((
                u64::from_be_bytes(k[9..17].try_into().expect("8 bytes")),
                k[17..].to_vec(),
            )),
            _ => None,
        })
    }

    /// Changes a node in place with `f`, and returns the new node.
    pub fn update(&self, ino: u64, f: impl FnOnce(&mut Node)) -> Result<Node> {
        let _w = self.lock();
        let mut c = Change::new(self);
        let mut n = c.get(ino)?.ok_or(NamesError::NotFound)?;
        f(&mut n);
        c.put(ino, Some(n.clone()))?;
        c.apply()?;
        Ok(n)
    }

    /// Removes `name` from `parent`; `dir` says whether the caller expects a folder (rmdir)
    /// or not (unlink). Returns the node as left: `nlink` 0 if it is gone with its last name.
    pub fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<(u64, Node)> {
        check_name(name)?;
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
        let mut c = Change::new(self);
        let left = c.unname(parent, name, ino, n)?;
        c.apply()?;
        Ok((ino, left))
    }

    /// Moves `parent/name` to `new_parent/new_name`, replacing what is there as rename(2)
    /// does (unless `no_replace`). Returns the node it replaced, as left (`nlink` 0 if gone).
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        no_replace: bool,
    ) -> Result<Option<(u64, Node)>> {
        check_name(name)?;
        check_name(new_name)?;
        let _w = self.lock();
        let (ino, n) = self.lookup(parent, name)?.ok_or(NamesError::NotFound)?;
        let mut c = Change::new(self);
        c.dir(new_parent)?;
        let is_dir = n.kind == Kind::Dir;
        // A folder may not move into its own subtree.
        let mut up = new_parent;
        while up != ROOT {
            if up == ino {
                return Err(NamesError::Invalid);
            }
            up = self.get(up)?.map_or(ROOT, |p| p.parent);
        }
        let replaced = match self.lookup(new_parent, new_name)? {
            Some((old_ino, _)) if old_ino == ino => return Ok(None),
            Some(_) if no_replace => return Err(NamesError::Exists),
            Some((old_ino, old)) => {
                match (is_dir, old.kind == Kind::Dir) {
                    (true, false) => return Err(NamesError::NotDir),
                    (false, true) => return Err(NamesError::IsDir),
                    (true, true) if !self.children(old_ino, 0)?.is_empty() => return Err(NamesError::NotEmpty),
                    _ => {}
                }
                Some((old_ino, c.unname(new_parent, new_name, old_ino, old)?))
            }
            None => None,
        };
        c.b.remove(child_key(parent, name));
        c.b.insert(child_key(new_parent, new_name), &ino.to_be_bytes()[..]);
        let sub = i32::from(is_dir);
        c.entries_changed(parent, -sub)?;
        c.entries_changed(new_parent, sub)?;
        let mut n = c.get(ino)?.ok_or(NamesError::NotFound)?;
        if n.parent == parent && n.name == name {
            n.parent = new_parent;
            n.name = new_name.to_vec();
        } else {
            // One of a hard link's other names moves.
            c.b.remove(link_key(ino, parent, name));
            c.b.insert(link_key(ino, new_parent, new_name), &[][..]);
        }
        n.ctime = c.now;
        c.put(ino, Some(n))?;
        c.apply()?;
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
            // Every name of it goes (hard links included).
            let (mut parent, mut name) = (*parent, name.clone());
            loop {
                let (_, left) = self.remove(parent, &name, false)?;
                if left.nlink == 0 {
                    break;
                }
                (parent, name) = (left.parent, left.name);
            }
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
