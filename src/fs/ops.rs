//! The `fuser::Filesystem` impl: each callback checks its arguments, hands slow work to the
//! blocking pool, and replies exactly once.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::SystemTime;

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::{is_read_only, lock, Handle, Holding, Inner, SwarmFs, HASH_TTL, HASH_XATTR};
use crate::folder::EntryKind;
use crate::metrics::Op;
use crate::names::{self, Kind, Node};

/// Largest read and write we ask the kernel for.
const MAX_IO: u32 = 1 << 20;

fn ns(t: TimeOrNow) -> u64 {
    let t = match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl SwarmFs {
    fn entry(&self, ino: u64, reply: ReplyEntry) {
        match self.0.attr(ino) {
            Ok((a, ttl)) => reply.entry(&ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    /// Creates a name in `parent`, unless it is a blob name in the root.
    fn make(&self, req: &Request, parent: INodeNo, name: &OsStr, kind: Kind, perm: u32) -> Result<u64, Errno> {
        if Inner::reserved(parent.0, name) {
            return Err(Errno::EROFS);
        }
        let node = Node::new(parent.0, name.as_bytes(), kind, perm & 0o7777, req.uid(), req.gid());
        Ok(self.0.names.create(node)?)
    }
}

impl Filesystem for SwarmFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO) {
            tracing::info!("kernel caps max_write at {max}");
        }
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            tracing::info!("kernel caps read-ahead at {max}");
            let _ = config.set_max_readahead(max);
        }
        if self.0.opts.passthrough {
            let ok =
                config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(2).is_ok();
            self.0.passthrough.store(ok, Ordering::Relaxed);
            tracing::info!(passthrough = ok, "FUSE passthrough");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let op = Op::start("lookup");
        let name = name.to_owned();
        // A hash that is not local may wait on the network: never on this thread.
        self.0.spawn(move |fs| match fs.lookup(parent.0, &name) {
            Ok((a, ttl)) => reply.entry(&ttl, &a, Generation(0)),
            Err(e) => op.fail(reply, e),
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let op = Op::start("getattr");
        if let Some(h) = self.0.ino_hash(ino.0) {
            // A blob evicted since it was looked up is looked up again: never on this thread.
            return self.0.spawn(move |fs| match fs.hash_attr_or_find(&h) {
                Ok(a) => reply.attr(&HASH_TTL, &a),
                Err(e) => op.fail(reply, e),
            });
        }
        match self.0.attr(ino.0) {
            Ok((a, ttl)) => reply.attr(&ttl, &a),
            Err(e) => op.fail(reply, e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let op = Op::start("setattr");
        if is_read_only(ino.0) {
            return op.fail(reply, Errno::EROFS);
        }
        self.0.spawn(move |fs| {
            let res = (|| {
                if let Some(len) = size {
                    fs.truncate(ino.0, len)?;
                }
                if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
                    fs.update_node(ino.0, |n| {
                        if let Some(m) = mode {
                            n.perm = m & 0o7777;
                        }
                        if let Some(u) = uid {
                            n.uid = u;
                        }
                        if let Some(g) = gid {
                            n.gid = g;
                        }
                        if let Some(t) = atime {
                            n.atime = ns(t);
                        }
                        if let Some(t) = mtime {
                            n.mtime = ns(t);
                        }
                        n.ctime = names::now_ns();
                    })?;
                    if mtime.is_some() {
                        // An explicit mtime (cp -a, rsync) outlives the writes before it.
                        if let Some(o) = fs.open_file(ino.0) {
                            lock(&o.state).touched = false;
                        }
                        if let Some(s) = lock(&fs.staged).get_mut(&ino.0) {
                            s.mtime = None;
                        }
                    }
                }
                fs.attr(ino.0)
            })();
            match res {
                Ok((a, ttl)) => reply.attr(&ttl, &a),
                Err(e) => op.fail(reply, e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let op = Op::start("readlink");
        if let Some(n) = self.0.tree_node(ino.0) {
            return match n.entry.kind {
                EntryKind::Symlink => reply.data(&n.entry.target),
                _ => op.fail(reply, Errno::EINVAL),
            };
        }
        match self.0.node(ino.0) {
            Ok(n) if n.kind == Kind::Symlink => reply.data(&n.target),
            Ok(_) => op.fail(reply, Errno::EINVAL),
            Err(e) => op.fail(reply, e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let op = Op::start("mkdir");
        match self.make(req, parent, name, Kind::Dir, mode & !umask) {
            Ok(ino) => self.entry(ino, reply),
            Err(e) => op.fail(reply, e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = Op::start("unlink");
        if Inner::reserved(parent.0, name) {
            return op.fail(reply, Errno::EROFS);
        }
        let name = name.to_owned();
        // Made durable before the reply (sqlite's commit ends by deleting its journal): on the
        // blocking pool, since a flush waits on the disk.
        self.0
            .spawn(move |fs| match fs.names.remove(parent.0, name.as_bytes(), false) {
                Ok((ino, node)) => {
                    fs.removed(ino, node);
                    match fs.sync_names() {
                        Ok(()) => reply.ok(),
                        Err(e) => op.fail(reply, e),
                    }
                }
                Err(e) => op.fail(reply, e.into()),
            });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = Op::start("rmdir");
        if Inner::reserved(parent.0, name) {
            return op.fail(reply, Errno::EROFS);
        }
        match self.0.names.remove(parent.0, name.as_bytes(), true) {
            Ok(_) => reply.ok(),
            Err(e) => op.fail(reply, e.into()),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let op = Op::start("mknod");
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return op.fail(reply, Errno::EINVAL),
        };
        let res = self.make(req, parent, name, kind, mode & !umask).and_then(|ino| {
            match kind {
                // A regular file made by mknod is an empty file, named at once.
                Kind::File => self.0.name_empty_file(ino)?,
                Kind::CharDev | Kind::BlockDev => {
                    self.0.names.update(ino, |n| n.rdev = rdev)?;
                }
                _ => {}
            }
            Ok(ino)
        });
        match res {
            Ok(ino) => self.entry(ino, reply),
            Err(e) => op.fail(reply, e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let op = Op::start("link");
        if is_read_only(ino.0) {
            // Blob entries are not names: copy one to name it.
            return op.fail(reply, Errno::EPERM);
        }
        if Inner::reserved(newparent.0, newname) {
            return op.fail(reply, Errno::EROFS);
        }
        match self.0.names.link(ino.0, newparent.0, newname.as_bytes()) {
            Ok(_) => self.entry(ino.0, reply),
            Err(e) => op.fail(reply, e.into()),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let op = Op::start("fallocate");
        // Space is not reserved ahead (content lands in a blob at commit): mode 0 grows the
        // file to cover the range, KEEP_SIZE is accepted and does nothing; punching holes,
        // collapsing, zeroing and inserting ranges are not supported.
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return op.fail(reply, Errno::EOPNOTSUPP);
        }
        match self.0.handle(fh.0).as_deref() {
            Ok(Handle::File { write: true, .. }) => {}
            Ok(Handle::Blob { .. }) => return op.fail(reply, Errno::EROFS),
            Ok(_) => return op.fail(reply, Errno::EBADF),
            Err(e) => return op.fail(reply, *e),
        }
        let Some(end) = offset.checked_add(length).filter(|&e| e <= i64::MAX as u64) else {
            return op.fail(reply, Errno::EFBIG);
        };
        if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.ok();
        }
        self.0.spawn(move |fs| {
            let res = fs
                .attr(ino.0)
                .and_then(|(a, _)| if end > a.size { fs.truncate(ino.0, end) } else { Ok(()) });
            match res {
                Ok(()) => reply.ok(),
                Err(e) => op.fail(reply, e),
            }
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let op = Op::start("symlink");
        if target.as_os_str().len() >= libc::PATH_MAX as usize {
            return op.fail(reply, Errno::ENAMETOOLONG);
        }
        let res = self.make(req, parent, link_name, Kind::Symlink, 0o777).and_then(|ino| {
            self.0
                .names
                .update(ino, |n| n.target = target.as_os_str().as_bytes().to_vec())?;
            Ok(ino)
        });
        match res {
            Ok(ino) => self.entry(ino, reply),
            Err(e) => op.fail(reply, e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let op = Op::start("rename");
        if Inner::reserved(parent.0, name) || Inner::reserved(newparent.0, newname) {
            return op.fail(reply, Errno::EROFS);
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return op.fail(reply, Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (name, newname) = (name.to_owned(), newname.to_owned());
        // Durable before the reply, like unlink: a rename is how editors save.
        self.0.spawn(move |fs| {
            match fs
                .names
                .rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes(), no_replace)
            {
                Ok(replaced) => {
                    if let Some((ino, node)) = replaced {
                        fs.removed(ino, node);
                    }
                    match fs.sync_names() {
                        Ok(()) => reply.ok(),
                        Err(e) => op.fail(reply, e),
                    }
                }
                Err(e) => op.fail(reply, e.into()),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let op = Op::start("open");
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        let blob = match self.0.tree_node(ino.0) {
            Some(n) if n.entry.kind == EntryKind::File => Some((n.entry.hash, Some((n.entry.size, n.from)))),
            Some(_) => return op.fail(reply, Errno::EISDIR),
            None => self.0.ino_hash(ino.0).map(|h| (h, None)),
        };
        if let Some((hash, expect)) = blob {
            if write {
                return op.fail(reply, Errno::EROFS);
            }
            if lock(&self.0.kinds).get(&hash) == Some(&true) && expect.is_none() {
                return op.fail(reply, Errno::EISDIR);
            }
            let backing = self.0.backing(ino.0, &hash, &reply);
            let fh = self.0.new_fh(Handle::Blob {
                hash,
                reader: Mutex::new(None),
                _backing: backing.clone(),
                ahead: Mutex::new((0, 0)),
                _hold: Holding::new(&self.0.store, hash),
                expect,
            });
            return match backing {
                // The kernel refuses KEEP_CACHE with passthrough: the backing file's own page
                // cache serves the reads there.
                Some(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
                None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            };
        }
        let node = match self.0.node(ino.0) {
            Ok(n) => n,
            Err(e) => return op.fail(reply, e),
        };
        if node.kind == Kind::Dir {
            return op.fail(reply, Errno::EISDIR);
        }
        if write {
            self.0.add_writer(ino.0, false);
        }
        // A user file is never passed through: its content changes under open descriptors
        // (an append, a truncation), which must see it, and the kernel refuses to mix
        // passthrough and ordinary opens of one inode.
        let fh = self.0.new_fh(Handle::File {
            ino: ino.0,
            write,
            reader: Mutex::new(None),
        });
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let op = Op::start("read");
        let h = match self.0.handle(fh.0) {
            Ok(h) => h,
            Err(e) => return op.fail(reply, e),
        };
        self.0.spawn(move |fs| match fs.read(&h, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => op.fail(reply, e),
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let op = Op::start("write");
        match self.0.handle(fh.0).as_deref() {
            Ok(Handle::File { write: true, .. }) => {}
            Ok(Handle::Blob { .. }) => return op.fail(reply, Errno::EROFS),
            Ok(_) => return op.fail(reply, Errno::EBADF),
            Err(e) => return op.fail(reply, *e),
        }
        let data = data.to_vec();
        let n = data.len() as u32;
        self.0.spawn(move |fs| match fs.write(ino.0, offset, data) {
            Ok(()) => reply.written(n),
            Err(e) => op.fail(reply, e),
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let op = Op::start("flush");
        // close(2) sees this reply: publishing here lets a full disk fail the close.
        match self.0.handle(fh.0).as_deref() {
            Ok(Handle::File { write: true, .. }) => {}
            _ => return reply.ok(),
        }
        self.0.spawn(move |fs| match fs.flush_file(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => op.fail(reply, e),
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let op = Op::start("release");
        let Some(h) = lock(&self.0.handles).remove(&fh.0) else {
            return reply.ok();
        };
        if !matches!(*h, Handle::File { write: true, .. }) {
            self.0.released(ino.0);
            return reply.ok();
        }
        self.0.spawn(move |fs| {
            let res = match fs.remove_writer(ino.0) {
                Some(last) => fs.commit(ino.0, &mut lock(&last.state)),
                None => Ok(()),
            };
            fs.released(ino.0);
            match res {
                Ok(()) => reply.ok(),
                Err(e) => op.fail(reply, e),
            }
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let op = Op::start("fsync");
        // A promise: the content as it stands is stored, named and durable before the reply.
        self.0.spawn(move |fs| match fs.sync_file(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => op.fail(reply, e),
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let op = Op::start("fsyncdir");
        // The folder's names, and every other name change so far, are made durable.
        self.0.spawn(move |fs| match fs.sync_names() {
            Ok(()) => reply.ok(),
            Err(e) => op.fail(reply, e),
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        Op::start("readdir");
        fn answer(
            entries: Result<Vec<(u64, fuser::FileType, Vec<u8>)>, Errno>,
            offset: u64,
            mut reply: ReplyDirectory,
        ) {
            let entries = match entries {
                Ok(e) => e,
                Err(e) => return Op("readdir").fail(reply, e),
            };
            for (i, (cino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(cino), i as u64 + 1, kind, OsStr::from_bytes(&name)) {
                    break;
                }
            }
            reply.ok();
        }
        if is_read_only(ino.0) {
            // A published folder's manifests may have to be fetched: never on this thread.
            return self.0.spawn(move |fs| answer(fs.dir_entries(ino.0), offset, reply));
        }
        answer(self.0.dir_entries(ino.0), offset, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        Op::start("statfs");
        const BS: u64 = 4096;
        let cap = self.0.store.cache_size();
        let used = self.0.store.used();
        let free = cap.saturating_sub(used) / BS;
        // Names are not limited in number: report room for as many again as a u32 holds,
        // so that used (files - ffree) is the count of names and never negative.
        let names = self.0.names.count() as u64;
        let ffree = u32::MAX as u64;
        reply.statfs(cap / BS, free, free, names + ffree, ffree, BS as u32, 255, BS as u32);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let op = Op::start("setxattr");
        op.fail(reply, Errno::ENOTSUP);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let op = Op::start("getxattr");
        if name != HASH_XATTR {
            return op.fail(reply, Errno::ENODATA);
        }
        // A folder's hash is computed from what it holds, and its manifests stored.
        self.0.spawn(move |fs| {
            let value = match fs.hash_of(ino.0) {
                Ok(h) => h.to_string(),
                Err(e) => return op.fail(reply, e),
            };
            if size == 0 {
                reply.size(value.len() as u32);
            } else if (size as usize) < value.len() {
                op.fail(reply, Errno::ERANGE);
            } else {
                reply.data(value.as_bytes());
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let op = Op::start("listxattr");
        let list: &[u8] = if self.0.has_hash(ino.0) {
            b"user.swarmfs.hash\0"
        } else {
            b""
        };
        if size == 0 {
            reply.size(list.len() as u32);
        } else if (size as usize) < list.len() {
            op.fail(reply, Errno::ERANGE);
        } else {
            reply.data(list);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let op = Op::start("removexattr");
        op.fail(reply, Errno::ENOTSUP);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        Op::start("access");
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let op = Op::start("create");
        let ino = match self.make(req, parent, name, Kind::File, mode & !umask) {
            Ok(ino) => ino,
            Err(e) => return op.fail(reply, e),
        };
        self.0.add_writer(ino, true);
        let fh = self.0.new_fh(Handle::File {
            ino,
            write: true,
            reader: Mutex::new(None),
        });
        match self.0.attr(ino) {
            Ok((a, ttl)) => reply.created(&ttl, &a, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => op.fail(reply, e),
        }
    }
}
