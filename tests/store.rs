//! The store as a library: range reads, partial blobs, eviction.

use std::ops::Range;

use swarmfs::store::{Options, Store, StoreError};
use swarmfs::tree::{Tree, GROUP_SIZE};
use swarmfs::Hash;

use crate::util::*;

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, Options::default()).unwrap()
}

#[test]
fn random_range_reads_equal_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut rng = Rng(42);
    for &size in INTERESTING_SIZES {
        let bytes = data(size, 3);
        let (h, n) = store.import_reader(&bytes[..], false).unwrap();
        assert_eq!((h, n), (Hash::of(&bytes), size));
        let mut r = store.reader(&h).unwrap();
        assert_eq!(r.size(), size);
        for _ in 0..40 {
            let off = rng.below(size + 10);
            let len = rng.below(3 * GROUP_SIZE) as usize;
            let got = r.read_at(off, len).unwrap();
            let s = (off.min(size)) as usize;
            let e = ((off + len as u64).min(size)) as usize;
            assert!(got == bytes[s..e], "size {size} off {off} len {len}");
        }
    }
}

#[test]
fn a_blob_file_cut_short_reads_as_corrupt_at_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let bytes = data(10 * GROUP_SIZE, 8);
    let (h, _) = store.import_reader(&bytes[..], false).unwrap();
    let path = dir.path().join("blobs").join(h.to_string());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(6 * GROUP_SIZE + 100)
        .unwrap();
    let mut r = store.reader(&h).unwrap();
    assert!(r.read_at(0, 6 * GROUP_SIZE as usize).unwrap() == bytes[..6 * GROUP_SIZE as usize]);
    match r.read_at(5 * GROUP_SIZE, 3 * GROUP_SIZE as usize) {
        Err(StoreError::Corrupt { group, .. }) => assert_eq!(group, 6),
        other => panic!("expected the cut group to read as corrupt, got {other:?}"),
    }
}

/// The encoding of `want` from a store that holds the blob.
fn encoding(src: &Store, h: &Hash, want: &[Range<u64>]) -> Vec<u8> {
    let mut out = Vec::new();
    src.encode(h, want, &mut out).unwrap();
    out
}

#[test]
fn partial_blob_takes_ranges_in_any_order() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let src = open(a.path());
    let dst = open(b.path());
    let size = 5 * (1 << 20) + 333;
    let bytes = data(size, 9);
    let (h, _) = src.import_reader(&bytes[..], true).unwrap();
    let tree = Tree::new(size);
    let n = tree.groups();

    // Cut the blob into runs of 1..=20 groups and write them in a shuffled order.
    let mut rng = Rng(7);
    let mut runs = Vec::new();
    let mut g = 0;
    while g < n {
        let len = 1 + rng.below(20);
        runs.push(g..(g + len).min(n));
        g += len;
    }
    for i in (1..runs.len()).rev() {
        runs.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut model = vec![false; n as usize];
    let last = runs.len() - 1;
    for (i, run) in runs.iter().enumerate() {
        let enc = encoding(&src, &h, std::slice::from_ref(run));
        let done = dst
            .write_encoded(&h, size, std::slice::from_ref(run), &mut &enc[..])
            .unwrap();
        assert_eq!(done, i == last);
        for g in run.clone() {
            model[g as usize] = true;
        }
        if i < last {
            let expect: Vec<Range<u64>> =
                (0..n)
                    .filter(|&g| !model[g as usize])
                    .fold(Vec::new(), |mut v: Vec<Range<u64>>, g| {
                        match v.last_mut() {
                            Some(r) if r.end == g => r.end += 1,
                            _ => v.push(g..g + 1),
                        }
                        v
                    });
            assert_eq!(dst.missing(&h, 0..n).unwrap(), expect);
            let info = dst.info(&h).unwrap().unwrap();
            assert_eq!(
                info.size_verified,
                model[n as usize - 1],
                "size trusted only with the last group"
            );
            assert!(!info.complete);
            // A present range reads back verified; a missing one is refused by name.
            let mut r = dst.reader(&h).unwrap();
            let got = r.read_at(tree.bytes_for_groups(run.clone()).start, 100).unwrap();
            let s = tree.bytes_for_groups(run.clone()).start as usize;
            assert_eq!(got, bytes[s..s + got.len()]);
            if let Some(m) = expect.first() {
                let err = r.read_at(m.start * GROUP_SIZE, 1).unwrap_err();
                assert!(
                    matches!(err, StoreError::Missing { group, .. } if group == m.start),
                    "{err}"
                );
            }
        }
    }
    assert!(dst.missing(&h, 0..n).unwrap().is_empty());
    let info = dst.info(&h).unwrap().unwrap();
    assert!(info.complete && info.present == size);
    assert!(dst.verify(&h).unwrap().is_empty());
    let mut out = Vec::new();
    dst.cat(&h, &mut out).unwrap();
    assert!(out == bytes);
    // The complete file is exactly the content.
    let file = dst.complete_file(&h).unwrap().unwrap();
    assert!(std::fs::read(file).unwrap() == bytes);
}

#[test]
fn partial_blob_survives_reopen_and_rejects_bad_data() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let src = open(a.path());
    let size = 40 * GROUP_SIZE + 1;
    let bytes = data(size, 11);
    let (h, _) = src.import_reader(&bytes[..], true).unwrap();
    {
        let dst = open(b.path());
        let want = [3..9];
        let enc = encoding(&src, &h, &want);
        assert!(!dst.write_encoded(&h, size, &want, &mut &enc[..]).unwrap());
        // A flipped byte in group 12's data: groups before it are kept, 12 is not.
        let want = [10..14];
        let mut enc = encoding(&src, &h, &want);
        let at = enc.len() - 2 * GROUP_SIZE as usize + 5;
        enc[at] ^= 0x80;
        let err = dst.write_encoded(&h, size, &want, &mut &enc[..]).unwrap_err();
        assert!(matches!(err, StoreError::BadData { .. }), "{err}");
        assert_eq!(dst.missing(&h, 0..41).unwrap(), vec![0..3, 9..10, 12..41]);
    }
    let dst = open(b.path());
    assert_eq!(dst.missing(&h, 0..41).unwrap(), vec![0..3, 9..10, 12..41]);
    assert!(dst.verify(&h).unwrap().is_empty());
    let info = dst.info(&h).unwrap().unwrap();
    assert_eq!(info.present, 8 * GROUP_SIZE);
    // A different size for a known blob is refused.
    let err = dst.write_encoded(&h, size + 1, &[0..1], &mut &[][..]).unwrap_err();
    assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
}

#[test]
fn eviction_respects_pins_and_lru_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mb = 1 << 20;
    let blobs: Vec<Hash> = (0..4u64)
        .map(|i| store.import_reader(&data(mb, 100 + i)[..], i == 0).unwrap().0)
        .collect();
    // Use order, oldest first: 2, 1, 3 (0 is pinned).
    for i in [2, 1, 3] {
        store.touch(&blobs[i]).unwrap();
    }
    store.set_cache_size(2 * mb + 1).unwrap();
    let evicted: Vec<Hash> = store.gc().unwrap().into_iter().map(|b| b.hash).collect();
    assert_eq!(evicted, vec![blobs[2], blobs[1]]);
    assert!(store.used() <= 2 * mb + 1);
    let held: Vec<Hash> = store.list().unwrap().into_iter().map(|b| b.hash).collect();
    assert!(held.contains(&blobs[0]) && held.contains(&blobs[3]));
    assert!(!dir.path().join("blobs").join(blobs[2].to_string()).exists());

    // Even a cap of zero never evicts a pinned blob; importing enforces the cap.
    store.set_cache_size(0).unwrap();
    store.import_reader(&data(mb, 200)[..], false).unwrap();
    let held: Vec<Hash> = store.list().unwrap().into_iter().map(|b| b.hash).collect();
    assert_eq!(held, vec![blobs[0]]);
    // The totals survive a reopen.
    let used = store.used();
    drop(store);
    assert_eq!(open(dir.path()).used(), used);
}

/// Regression: `verify` misplaced groups after a gap where the outboard path was never
/// written, and reported good blocks of a sparse partial blob as corrupt.
#[test]
fn verify_of_sparse_partial_blob_places_groups_by_index() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let src = open(a.path());
    let dst = open(b.path());
    let size = 200 * GROUP_SIZE;
    let (h, _) = src.import_reader(&data(size, 13)[..], true).unwrap();
    for want in [[0..1], [130..131], [199..200]] {
        let enc = encoding(&src, &h, &want);
        dst.write_encoded(&h, size, &want, &mut &enc[..]).unwrap();
    }
    assert_eq!(dst.verify(&h).unwrap(), Vec::<u64>::new());
    assert_eq!(dst.info(&h).unwrap().unwrap().present, 3 * GROUP_SIZE);
}

/// Four writers fill one partial blob at once while another thread lists and reads it: no
/// deadlock, no lost group, and the result verifies.
#[test]
fn concurrent_range_writers_and_readers() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let src = open(a.path());
    let dst = std::sync::Arc::new(open(b.path()));
    let size = 300 * GROUP_SIZE + 17;
    let bytes = data(size, 21);
    let (h, _) = src.import_reader(&bytes[..], true).unwrap();
    let n = Tree::new(size).groups();
    let encs: Vec<(Range<u64>, Vec<u8>)> = (0..n)
        .step_by(5)
        .map(|g| {
            let r = g..(g + 5).min(n);
            let e = encoding(&src, &h, std::slice::from_ref(&r));
            (r, e)
        })
        .collect();
    let encs = std::sync::Arc::new(encs);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for t in 0..4usize {
        let (dst, encs, done) = (dst.clone(), encs.clone(), done_tx.clone());
        std::thread::spawn(move || {
            for (r, e) in encs.iter().skip(t).step_by(4) {
                dst.write_encoded(&h, size, std::slice::from_ref(r), &mut &e[..])
                    .unwrap();
            }
            done.send(()).unwrap();
        });
    }
    {
        let (dst, done) = (dst.clone(), done_tx.clone());
        std::thread::spawn(move || {
            for _ in 0..200 {
                dst.list().unwrap();
                // Until the first write lands, the blob is simply unknown.
                match dst.missing(&h, 0..n) {
                    Ok(_) | Err(StoreError::NotFound(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                if let Ok(mut r) = dst.reader(&h) {
                    let _ = r.read_at(0, 100);
                }
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..5 {
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a thread hung or died");
    }
    let info = dst.info(&h).unwrap().unwrap();
    assert!(info.complete && info.size_verified && info.present == size);
    let mut out = Vec::new();
    dst.cat(&h, &mut out).unwrap();
    assert!(out == bytes);
}

/// Staged files: sequential writes hash as they stream; random writes, holes and truncation
/// fall back to hashing at commit. Either way the hash is the content's.
#[test]
fn staged_files_hash_to_their_content() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for &size in INTERESTING_SIZES {
        let bytes = data(size, 31);
        // Sequential, in odd-sized writes.
        let mut s = store.stage().unwrap();
        let mut off = 0;
        for piece in bytes.chunks(7919) {
            s.write_at(off, piece).unwrap();
            off += piece.len() as u64;
        }
        assert_eq!(
            {
                let (h, n, _) = store.commit_staged(s).unwrap();
                (h, n)
            },
            (Hash::of(&bytes), size)
        );
        // Backwards, in 5000-byte writes, then a truncate that cuts 3 bytes.
        let mut s = store.stage().unwrap();
        let mut end = size;
        while end > 0 {
            let start = end.saturating_sub(5000);
            s.write_at(start, &bytes[start as usize..end as usize]).unwrap();
            end = start;
        }
        let cut = size.saturating_sub(3);
        s.set_len(cut).unwrap();
        let (h, n, _) = store.commit_staged(s).unwrap();
        assert_eq!((h, n), (Hash::of(&bytes[..cut as usize]), cut));
        let mut out = Vec::new();
        store.cat(&h, &mut out).unwrap();
        assert!(out == bytes[..cut as usize]);
    }
    // A copy of a blob's prefix, then an append: still one streaming pass.
    let bytes = data(100_000, 5);
    let (h, _) = store.import_reader(&bytes[..], false).unwrap();
    let mut s = store.stage_from(&h, 50_000).unwrap();
    s.write_at(50_000, b"tail").unwrap();
    let mut want = bytes[..50_000].to_vec();
    want.extend_from_slice(b"tail");
    assert_eq!(store.commit_staged(s).unwrap().0, Hash::of(&want));
}

/// gc evicting a partial blob while its groups are written and synced: the two take the
/// blob's lock and the store's write lock, and must never wait on each other.
#[test]
fn gc_beside_partial_blobs_being_synced_never_deadlocks() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let src = open(a.path());
    let dst = std::sync::Arc::new(open(b.path()));
    dst.set_cache_size(0).unwrap();
    let size = 64 * GROUP_SIZE;
    let (h, _) = src.import_reader(&data(size, 5)[..], true).unwrap();
    let n = Tree::new(size).groups();
    let encs: Vec<(Range<u64>, Vec<u8>)> = (0..n)
        .map(|g| (g..g + 1, encoding(&src, &h, std::slice::from_ref(&(g..g + 1)))))
        .collect();
    let encs = std::sync::Arc::new(encs);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for t in 0..2usize {
        let (dst, encs, done) = (dst.clone(), encs.clone(), done_tx.clone());
        std::thread::spawn(move || {
            for _ in 0..100 {
                for (r, e) in encs.iter().skip(t).step_by(2) {
                    let _ = dst.write_encoded(&h, size, std::slice::from_ref(r), &mut &e[..]);
                    let _ = dst.sync_partial(&h);
                }
            }
            done.send(()).unwrap();
        });
    }
    {
        let (dst, done) = (dst.clone(), done_tx.clone());
        std::thread::spawn(move || {
            for _ in 0..20000 {
                dst.gc().unwrap();
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..3 {
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("gc and a partial blob's sync deadlocked");
    }
}
