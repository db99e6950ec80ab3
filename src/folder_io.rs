//! Folders on disk and on the network: `add -r` (a local tree into the store, with its
//! manifests), `ls HASH` and `get HASH -o DIR` (a published folder, fetched and checked).
//! The format and its checks are in `folder.rs`.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use futures::StreamExt;

use crate::api::NetCtx;
use crate::fetch::GetError;
use crate::folder::{self, Entry, EntryKind, FolderError, ManifestSource, Reader};
use crate::hash::Hash;
use crate::store::Store;

/// Files fetched at once by `get` of a folder: small files are dominated by round trips.
const PARALLEL_FILES: usize = 16;

/// How a file is stored (and pinned) by `add_dir`: its hash and size.
pub type Import<'a> = &'a mut dyn FnMut(&Path) -> Result<(Hash, u64)>;

/// Stores the folder at `real` and everything in it (files and manifests pinned), each file
/// with `import`. Calls `file` for each file stored, with its path under `shown`, and `skip`
/// for each entry left out (sockets, pipes, devices, absolute symlinks). Returns the folder's
/// hash and the bytes of files beneath.
pub fn add_dir(
    store: &Store,
    real: &Path,
    shown: &Path,
    import: Import,
    file: &mut dyn FnMut(&Hash, u64, &Path) -> Result<()>,
    skip: &mut dyn FnMut(&Path, &str),
) -> Result<(Hash, u64)> {
    let mut entries = Vec::new();
    let rd = std::fs::read_dir(real).with_context(|| format!("cannot read folder {}", real.display()))?;
    for d in rd {
        let d = d.with_context(|| format!("cannot read folder {}", real.display()))?;
        let name = d.file_name();
        let (path, show) = (real.join(&name), shown.join(&name));
        let meta = std::fs::symlink_metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
        let t = meta.file_type();
        if t.is_file() {
            let (h, size) = import(&path).with_context(|| format!("cannot add {}", path.display()))?;
            file(&h, size, &show)?;
            entries.push(Entry::file(
                name.as_bytes(),
                size,
                h,
                folder::is_exec(meta.permissions().mode()),
            ));
        } else if t.is_dir() {
            let (h, total) = add_dir(store, &path, &show, import, file, skip)?;
            entries.push(Entry::folder(name.as_bytes(), total, h));
        } else if t.is_symlink() {
            let target = std::fs::read_link(&path).with_context(|| format!("cannot read link {}", path.display()))?;
            let target = target.as_os_str().as_bytes();
            match folder::check_target(target) {
                Ok(()) => entries.push(Entry::symlink(name.as_bytes(), target)),
                Err(why) => skip(&show, &format!("a folder cannot hold {why}")),
            }
        } else {
            skip(&show, "only files, folders and symlinks are shared");
        }
    }
    publish(store, entries, true).with_context(|| format!("cannot add folder {}", real.display()))
}

/// The bytes of the files beneath folder `real` (symlinks not followed, unreadable parts
/// left out): what `add_dir` will read, known before it starts.
pub fn bytes_beneath(real: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(real) else { return 0 };
    rd.flatten()
        .map(|d| match d.metadata() {
            Ok(m) if m.is_file() => m.len(),
            Ok(m) if m.is_dir() => bytes_beneath(&d.path()),
            _ => 0,
        })
        .sum()
}

/// Stores the manifests of a folder with `entries` (pinned if `pin`), each announced as it is
/// stored; returns the folder's hash and the bytes of files beneath.
pub fn publish(store: &Store, entries: Vec<Entry>, pin: bool) -> Result<(Hash, u64)> {
    let built = folder::build(entries).map_err(|why| anyhow::anyhow!("{why}"))?;
    store_manifests(store, &built, pin)?;
    Ok((built.hash, built.total))
}

/// Stores (and so announces) the manifests of a built folder that are not whole here yet;
/// with `pin`, pins every one.
pub fn store_manifests(store: &Store, built: &folder::Built, pin: bool) -> crate::store::Result<()> {
    for (h, bytes) in &built.blobs {
        if pin || !store.info(h)?.is_some_and(|i| i.complete) {
            let (got, _) = store.import_reader(&bytes[..], pin)?;
            debug_assert_eq!(got, *h);
        }
    }
    Ok(())
}

/// The whole of blob `h` from the store, fetched first if it is not whole here and `net` is
/// given. A blob bigger than a manifest can be is refused before it is fetched.
pub struct Manifests<'a> {
    pub store: &'a Store,
    pub net: Option<&'a NetCtx>,
}

impl ManifestSource for Manifests<'_> {
    fn get(&self, h: &Hash) -> Result<Vec<u8>, FolderError> {
        let unavailable = |why: String| FolderError::Unavailable { hash: *h, why };
        let info = self.store.info(h).map_err(|e| unavailable(e.to_string()))?;
        let size = match (&info, self.net) {
            (Some(i), _) if i.complete => i.size,
            (_, None) => return Err(unavailable("it is not held here and no node is running".into())),
            (_, Some(n)) => {
                let f = &n.fetcher;
                let size =
                    n.rt.block_on(f.size(*h, n.lookup_timeout))
                        .ok_or_else(|| unavailable(GetError::NoProviders(*h).to_string()))?;
                if size > folder::PART_BYTES as u64 {
                    return Err(FolderError::NotAFolder(*h));
                }
                n.rt.block_on(f.fill(*h, size, n.read_timeout, &mut || {}))
                    .map_err(|e| unavailable(e.to_string()))?;
                self.store.sync_partial(h).map_err(|e| unavailable(e.to_string()))?;
                size
            }
        };
        if size > folder::PART_BYTES as u64 {
            return Err(FolderError::NotAFolder(*h));
        }
        let mut r = self.store.reader(h).map_err(|e| unavailable(e.to_string()))?;
        r.read_at(0, size as usize).map_err(|e| unavailable(e.to_string()))
    }
}

/// A folder error, with the peers that sent a hostile manifest banned.
fn refused(n: Option<&NetCtx>, e: FolderError) -> anyhow::Error {
    if let (FolderError::Malformed { hash, why }, Some(n)) = (&e, n) {
        n.rt.block_on(
            n.fetcher
                .refuse(hash, &format!("is a malformed folder manifest ({why})")),
        );
    }
    tracing::warn!("{e}");
    anyhow::Error::from(e)
}

/// True if `h` is a folder: a blob held here, or found on the network, that starts with the
/// manifest's magic line. Fetches only its first group.
pub fn is_folder(store: &Store, net: Option<&NetCtx>, h: &Hash) -> Result<bool> {
    if let Some(n) = net {
        if !store.info(h)?.is_some_and(|i| i.size_verified) {
            n.rt.block_on(n.fetcher.size(*h, n.lookup_timeout))
                .ok_or(GetError::NoProviders(*h))?;
        }
    }
    let Some(info) = store.info(h)? else {
        bail!("blob {h} is not held here");
    };
    if info.size > folder::PART_BYTES as u64 || info.size < folder::MAGIC.len() as u64 {
        return Ok(false);
    }
    if let Some(n) = net {
        // The size check fetched the first group, but a blob cached earlier may lack it.
        let deadline = tokio::time::Instant::now() + n.read_timeout;
        n.rt.block_on(n.fetcher.ensure(*h, 0..1, deadline, true))?;
    }
    let head = store.reader(h)?.read_at(0, folder::MAGIC.len())?;
    Ok(folder::looks_like_manifest(&head))
}

/// The entries of folder `h` (its manifests fetched if need be; a malformed one is refused
/// and its providers banned).
pub fn entries(store: &Store, net: Option<&NetCtx>, h: &Hash) -> Result<Vec<Entry>> {
    let src = Manifests { store, net };
    Reader::new(&src).list(h, None).map_err(|e| refused(net, e))
}

/// One thing `get` makes under the target folder.
struct Item {
    path: PathBuf,
    entry: Entry,
    /// The folder whose manifest listed it (its providers are banned if the entry lies).
    from: Hash,
}

/// `swarmfs get HASH -o DIR` of a folder: reads every manifest first (so a hostile one is
/// refused before anything is written), then makes the folders, fetches the files (several at
/// once, each verified; what an interrupted run fetched is kept, so a rerun resumes), writes
/// them, and makes the symlinks last. Nothing is written through a symlink or outside `dir`.
pub fn get(
    store: &Store,
    n: &NetCtx,
    root: Hash,
    dir: &Path,
    progress: &mut dyn FnMut(&crate::api::Progress),
    err: &mut dyn Write,
) -> Result<u8> {
    let src = Manifests { store, net: Some(n) };
    let mut items = Vec::new();
    let mut folders = vec![root];
    Reader::new(&src)
        .walk(&root, &mut |path, e, from| {
            if e.kind == EntryKind::Folder {
                folders.push(e.hash);
            }
            items.push(Item {
                path: PathBuf::from(std::ffi::OsStr::from_bytes(path)),
                entry: e.clone(),
                from: *from,
            });
            Ok(())
        })
        .map_err(|e| refused(Some(n), e))?;
    let total: u64 = items
        .iter()
        .filter(|i| i.entry.kind == EntryKind::File)
        .map(|i| i.entry.size)
        .sum();
    let files = items.iter().filter(|i| i.entry.kind == EntryKind::File).count();

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for i in items.iter().filter(|i| i.entry.kind == EntryKind::Folder) {
        make_dir(&dir.join(&i.path))?;
    }

    let started = std::time::Instant::now();
    let done_bytes = AtomicU64::new(0);
    let done_files = AtomicUsize::new(0);
    let mut failed = 0usize;
    let mut throttle = crate::api::Throttle::new();
    let mut show = |finished: bool, progress: &mut dyn FnMut(&crate::api::Progress)| {
        let now = || crate::api::Progress {
            what: "get".into(),
            done: done_bytes.load(Ordering::Relaxed),
            total,
            peers: n.fetcher.known(&root).len(),
            files: Some((done_files.load(Ordering::Relaxed), files)),
            elapsed_ms: started.elapsed().as_millis() as u64,
            finished,
            pause: false,
        };
        throttle.report(progress, now, finished);
    };
    let f = &n.fetcher;
    // Whoever served the manifests most likely holds the files: asked first, directly.
    let mut first = Vec::new();
    for h in &folders {
        for p in f.known(h) {
            if !first.contains(&p) {
                first.push(p);
            }
        }
    }
    let first = &first;
    let fetches = futures::stream::iter(items.iter().filter(|i| i.entry.kind == EntryKind::File))
        .map(|i| async move {
            let h = i.entry.hash;
            let res: Result<(), String> = async {
                if !store.info(&h).map_err(|e| e.to_string())?.is_some_and(|x| x.complete)
                    && !small_at_once(f, store, i, first).await?
                {
                    let size = f
                        .size(h, n.lookup_timeout)
                        .await
                        .ok_or_else(|| GetError::NoProviders(h).to_string())?;
                    if size != i.entry.size {
                        let why = format!("says {} is {} bytes, and it is {size}", i.path.display(), i.entry.size);
                        f.refuse(&i.from, &format!("is a folder manifest that lies ({why})"))
                            .await;
                        return Err(format!("the folder's manifest {why}"));
                    }
                    f.fill(h, size, n.read_timeout, &mut || {})
                        .await
                        .map_err(|e| e.to_string())?;
                    store.sync_partial(&h).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            .await;
            (i, res)
        })
        .buffer_unordered(PARALLEL_FILES);
    let mut fetches = std::pin::pin!(fetches);
    while let Some((i, res)) = n.rt.block_on(fetches.next()) {
        let res = res
            .map_err(anyhow::Error::msg)
            .and_then(|()| write_file(store, &dir.join(&i.path), &i.entry));
        match res {
            Ok(()) => {
                done_bytes.fetch_add(i.entry.size, Ordering::Relaxed);
                done_files.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                failed += 1;
                writeln!(err, "swarmfs: {}: {e:#}", i.path.display())?;
            }
        }
        show(false, progress);
    }
    for i in items.iter().filter(|i| i.entry.kind == EntryKind::Symlink) {
        if let Err(e) = make_symlink(&dir.join(&i.path), &i.entry.target) {
            failed += 1;
            writeln!(err, "swarmfs: {}: {e:#}", i.path.display())?;
        }
    }
    // One sync for the whole tree: `get` says it is done only once it is on disk.
    sync_fs(dir)?;
    show(true, progress);
    if failed > 0 {
        writeln!(
            err,
            "swarmfs: {failed} of {} entries of {root} could not be written",
            items.len()
        )?;
        return Ok(1);
    }
    Ok(0)
}

/// Files up to this size are asked for whole, in one request, from the peers that served the
/// folder: one round trip instead of a lookup, a size check and a fill.
const AT_ONCE: u64 = crate::fetch::UNIT * crate::tree::GROUP_SIZE;

/// Fetches a small file whole from one of `peers` in one request, verified as it arrives.
/// True if it is now complete here; false to fall back to the usual fetch. A peer that sends
/// a blob of another size than the manifest says shows the manifest lied.
async fn small_at_once(
    f: &crate::fetch::Fetcher,
    store: &Store,
    i: &Item,
    peers: &[libp2p::PeerId],
) -> Result<bool, String> {
    let e = &i.entry;
    if e.size > AT_ONCE {
        return Ok(false);
    }
    let groups = crate::tree::Tree::new(e.size).groups();
    for p in peers {
        match f.net().fetch(*p, e.hash, vec![0..groups]).await {
            Ok(got) if got.size != e.size && got.complete => {
                let why = format!("says {} is {} bytes, and it is {}", i.path.display(), e.size, got.size);
                f.refuse(&i.from, &format!("is a folder manifest that lies ({why})"))
                    .await;
                return Err(format!("the folder's manifest {why}"));
            }
            Ok(got) if got.complete => {
                store.sync_partial(&e.hash).map_err(|e| e.to_string())?;
                return Ok(true);
            }
            Ok(_) => {}
            Err(err) => tracing::debug!("{}: {err}", i.path.display()),
        }
    }
    Ok(false)
}

/// Makes folder `p`, or accepts one that is there; anything else there (a file, a symlink) is
/// an error, so nothing below is ever written through a symlink.
fn make_dir(p: &Path) -> Result<()> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(p)?;
            if m.is_dir() {
                Ok(())
            } else {
                bail!("{} exists and is not a folder", p.display())
            }
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", p.display())),
    }
}

/// Writes a complete blob to `p` (never through a symlink at `p`), mode 0644 or 0755.
fn write_file(store: &Store, p: &Path, e: &Entry) -> Result<()> {
    let mode = if e.exec { 0o755 } else { 0o644 };
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!("{} is a symlink; not writing through it", p.display());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .with_context(|| format!("cannot create {}", p.display()))?;
    store.cat(&e.hash, &mut f)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn make_symlink(p: &Path, target: &[u8]) -> Result<()> {
    let target = std::ffi::OsStr::from_bytes(target);
    match std::fs::read_link(p) {
        Ok(t) if t.as_os_str() == target => return Ok(()),
        Ok(_) => std::fs::remove_file(p)?,
        Err(_) if std::fs::symlink_metadata(p).is_ok() => bail!("{} exists and is not a symlink", p.display()),
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, p).with_context(|| format!("cannot create symlink {}", p.display()))
}

/// Flushes the filesystem that holds `dir`.
fn sync_fs(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir)?;
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot sync the written folder");
    }
    Ok(())
}

/// What a path inside a folder names.
pub enum Resolved {
    /// A file: its entry (hash and size).
    File(Entry),
    /// A folder: its manifest's hash and its entries.
    Folder(Hash, Vec<Entry>),
}

/// Follows `path` (names, no `/`) from folder `root`, reading one manifest per level (and
/// per part on the way). Symlinks are not followed. A hostile manifest gets its providers
/// banned, as everywhere.
pub fn resolve(store: &Store, net: Option<&NetCtx>, root: Hash, path: &[&[u8]]) -> Result<Option<Resolved>> {
    let src = Manifests { store, net };
    let reader = Reader::new(&src);
    let (mut cur, mut total) = (root, None);
    for (i, name) in path.iter().enumerate() {
        let Some(e) = reader.find(&cur, total, name).map_err(|e| refused(net, e))? else {
            return Ok(None);
        };
        match e.kind {
            EntryKind::Folder => (cur, total) = (e.hash, Some(e.size)),
            EntryKind::File if i + 1 == path.len() => return Ok(Some(Resolved::File(e))),
            _ => return Ok(None),
        }
    }
    let entries = reader.list(&cur, total).map_err(|e| refused(net, e))?;
    Ok(Some(Resolved::Folder(cur, entries)))
}
