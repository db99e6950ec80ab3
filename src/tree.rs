//! The BLAKE3 tree over 16 KiB chunk groups: its shape, the outboard, and verification.
//!
//! BLAKE3 hashes 1 KiB chunks and combines them in a left-balanced binary tree. We cut that
//! tree off at 16-chunk groups (16 KiB), the leaves of our tree. For every internal node the
//! *outboard* keeps the pair of child chaining values (64 bytes), 0.39% of the data. With the
//! outboard, any group can be checked against the root hash on its own, and any range can be
//! sent with just the pairs on its path (see `bao.rs`).
//!
//! Layout: a blob of `n` groups has `n - 1` internal nodes. The node whose left subtree ends at
//! group `k` lives in slot `k` (offset `64 * k`), so the outboard is dense and its final size
//! is known from the blob size alone. Slots are written in any order as the tree is built.
//!
//! Nothing here trusts the outboard: every pair is checked against its parent's value, from
//! the root hash down, before its children are believed.

use std::io;
use std::ops::Range;

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

use crate::hash::Hash;

/// Bytes in a chunk group, the unit of verification and of the present-set.
pub const GROUP_SIZE: u64 = 16 * 1024;
/// Bytes of one outboard entry: the left and right child chaining values.
pub const PAIR_SIZE: u64 = 64;

/// A chaining value: the hash of a subtree that is not the root.
pub type Cv = [u8; 32];
/// An outboard entry: left child value followed by right child value.
pub type Pair = [u8; 64];

/// The shape of the tree for a blob of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tree {
    size: u64,
}

impl Tree {
    /// The tree of a blob of `size` bytes.
    pub fn new(size: u64) -> Self {
        Tree { size }
    }

    /// The blob size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The number of groups; the empty blob has one empty group.
    pub fn groups(&self) -> u64 {
        self.size.div_ceil(GROUP_SIZE).max(1)
    }

    /// The byte range of group `g`.
    pub fn group_bytes(&self, g: u64) -> Range<u64> {
        let start = (g * GROUP_SIZE).min(self.size);
        start..(start + GROUP_SIZE).min(self.size)
    }

    /// The groups that hold any of the bytes in `bytes` (clamped to the blob).
    pub fn groups_for_bytes(&self, bytes: Range<u64>) -> Range<u64> {
        let end = bytes.end.min(self.size);
        if bytes.start >= end {
            return 0..0;
        }
        bytes.start / GROUP_SIZE..end.div_ceil(GROUP_SIZE)
    }

    /// The byte range covered by a range of groups.
    pub fn bytes_for_groups(&self, groups: Range<u64>) -> Range<u64> {
        (groups.start * GROUP_SIZE).min(self.size)..(groups.end * GROUP_SIZE).min(self.size)
    }

    /// The size of the outboard in bytes.
    pub fn outboard_size(&self) -> u64 {
        (self.groups() - 1) * PAIR_SIZE
    }

    /// True when the whole blob is one group, so its root hash is a plain `blake3::hash`.
    pub fn is_single_group(&self) -> bool {
        self.groups() == 1
    }
}

/// For a node over `n >= 2` groups, the number of groups in its left subtree: the largest
/// power of two below `n`. This is BLAKE3's own rule, in units of whole groups.
pub fn left_len(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Combines two child values into their parent's value (the root hash if `is_root`).
pub fn parent_cv(left: &Cv, right: &Cv, is_root: bool) -> Cv {
    if is_root {
        *merge_subtrees_root(left, right, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(left, right, Mode::Hash)
    }
}

/// The value of group `g` holding `data`, where `is_root` means the blob is this one group.
pub fn group_cv(g: u64, data: &[u8], is_root: bool) -> Cv {
    if is_root {
        *blake3::hash(data).as_bytes()
    } else {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(g * GROUP_SIZE);
        h.update(data);
        h.finalize_non_root()
    }
}

/// Splits an outboard pair into its children.
pub fn split_pair(p: &Pair) -> (Cv, Cv) {
    let mut l = [0u8; 32];
    let mut r = [0u8; 32];
    l.copy_from_slice(&p[..32]);
    r.copy_from_slice(&p[32..]);
    (l, r)
}

/// Joins two child values into an outboard pair.
pub fn join_pair(l: &Cv, r: &Cv) -> Pair {
    let mut p = [0u8; 64];
    p[..32].copy_from_slice(l);
    p[32..].copy_from_slice(r);
    p
}

/// Builds the outboard in one pass while the data streams by, and yields the root hash.
///
/// Groups are pushed in order; every group but the last must be exactly `GROUP_SIZE` bytes.
/// Parents are merged lazily, only once more input is known to follow, which is what gives
/// BLAKE3's left-balanced shape without knowing the size in advance.
pub struct OutboardBuilder<S> {
    /// Completed subtrees: (value, first group, number of groups).
    stack: Vec<(Cv, u64, u64)>,
    groups: u64,
    /// The first group's bytes, kept until a second group shows the blob is not one group.
    first: Option<Vec<u8>>,
    sink: S,
}

impl<S: FnMut(u64, &Pair) -> io::Result<()>> OutboardBuilder<S> {
    /// A builder that hands every finished pair to `sink(slot, pair)`.
    pub fn new(sink: S) -> Self {
        OutboardBuilder {
            stack: Vec::with_capacity(64),
            groups: 0,
            first: None,
            sink,
        }
    }

    /// Adds the next group.
    pub fn push(&mut self, data: &[u8]) -> io::Result<()> {
        let g = self.groups;
        if g == 0 {
            self.first = Some(data.to_vec());
        } else {
            if g == 1 {
                // The blob has at least two groups, so the first is not the root after all.
                let first = self.first.take().expect("first group kept");
                self.stack.push((group_cv(0, &first, false), 0, 1));
            }
            self.merge_to(g.count_ones() as usize)?;
            self.stack.push((group_cv(g, data, false), g, 1));
        }
        self.groups += 1;
        Ok(())
    }

    /// Adds many whole groups at once; only the very last may be short.
    pub fn push_all(&mut self, data: &[u8]) -> io::Result<()> {
        for group in data.chunks(GROUP_SIZE as usize) {
            self.push(group)?;
        }
        Ok(())
    }

    fn merge_to(&mut self, len: usize) -> io::Result<()> {
        while self.stack.len() > len {
            self.merge_top(false)?;
        }
        Ok(())
    }

    fn merge_top(&mut self, is_root: bool) -> io::Result<()> {
        let (r, _, rn) = self.stack.pop().expect("two subtrees");
        let (l, ls, ln) = self.stack.pop().expect("two subtrees");
        (self.sink)(ls + ln - 1, &join_pair(&l, &r))?;
        self.stack.push((parent_cv(&l, &r, is_root), ls, ln + rn));
        Ok(())
    }

    /// Finishes the tree and returns the root hash.
    pub fn finish(mut self) -> io::Result<Hash> {
        if self.groups <= 1 {
            let first = self.first.take().unwrap_or_default();
            return Ok(Hash::of(&first));
        }
        while self.stack.len() > 2 {
            self.merge_top(false)?;
        }
        self.merge_top(true)?;
        Ok(Hash::from_bytes(self.stack[0].0))
    }
}

/// One step of a verified walk down the tree.
#[derive(Debug)]
pub enum Step {
    /// Group `group` must hash to `expected`; `is_root` when it is the whole blob.
    Leaf { group: u64, expected: Cv, is_root: bool },
    /// The outboard pair above these groups does not match its parent, so none of them can
    /// be verified.
    BadNode { groups: Range<u64> },
}

/// Walks from the root down to every group in `want`, in order, checking each outboard pair
/// on the way against the value its parent gave. `pair(slot)` reads the outboard.
pub fn walk(
    tree: Tree,
    root: &Hash,
    want: Range<u64>,
    pair: &mut dyn FnMut(u64) -> io::Result<Pair>,
    f: &mut dyn FnMut(Step) -> io::Result<()>,
) -> io::Result<()> {
    walk_node(0, tree.groups(), *root.as_bytes(), true, &want, pair, f)
}

fn walk_node(
    start: u64,
    len: u64,
    expected: Cv,
    is_root: bool,
    want: &Range<u64>,
    pair: &mut dyn FnMut(u64) -> io::Result<Pair>,
    f: &mut dyn FnMut(Step) -> io::Result<()>,
) -> io::Result<()> {
    if start >= want.end || start + len <= want.start {
        return Ok(());
    }
    if len == 1 {
        return f(Step::Leaf {
            group: start,
            expected,
            is_root,
        });
    }
    let ll = left_len(len);
    let p = pair(start + ll - 1)?;
    let (l, r) = split_pair(&p);
    if parent_cv(&l, &r, is_root) != expected {
        return f(Step::BadNode {
            groups: start..start + len,
        });
    }
    walk_node(start, ll, l, false, want, pair, f)?;
    walk_node(start + ll, len - ll, r, false, want, pair, f)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Sizes around the chunk and group boundaries, where bugs live.
    pub const INTERESTING_SIZES: &[u64] = &[
        0,
        1,
        1023,
        1024,
        1025,
        16383,
        16384,
        16385,
        32768,
        49152 + 1,
        5 * 16384 + 100,
        1 << 20,
        (1 << 20) + 1,
    ];

    pub fn data(size: u64) -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64 ^ size;
        (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    pub fn build(d: &[u8]) -> (Hash, Vec<u8>) {
        let tree = Tree::new(d.len() as u64);
        let mut ob = vec![0u8; tree.outboard_size() as usize];
        let mut b = OutboardBuilder::new(|slot, p: &Pair| {
            ob[(slot * PAIR_SIZE) as usize..][..64].copy_from_slice(p);
            Ok(())
        });
        b.push_all(d).unwrap();
        let h = b.finish().unwrap();
        (h, ob)
    }

    #[test]
    fn left_len_matches_blake3() {
        for n in 2..300u64 {
            let bytes = blake3::hazmat::left_subtree_len(n * GROUP_SIZE);
            assert_eq!(left_len(n) * GROUP_SIZE, bytes, "n={n}");
        }
    }

    #[test]
    fn root_matches_blake3_for_interesting_sizes() {
        for &size in INTERESTING_SIZES {
            let d = data(size);
            let (h, _) = build(&d);
            assert_eq!(h, Hash::of(&d), "size {size}");
        }
    }

    #[test]
    fn walk_verifies_every_group_and_catches_a_flip() {
        for &size in INTERESTING_SIZES {
            let d = data(size);
            let tree = Tree::new(size);
            let (h, ob) = build(&d);
            let mut read = |slot: u64| {
                let mut p = [0u8; 64];
                p.copy_from_slice(&ob[(slot * 64) as usize..][..64]);
                Ok(p)
            };
            let mut bad = d.clone();
            if size > 0 {
                bad[(size / 2) as usize] ^= 1;
            }
            let mut seen = 0;
            walk(tree, &h, 0..tree.groups(), &mut read, &mut |s| {
                let Step::Leaf {
                    group,
                    expected,
                    is_root,
                } = s
                else {
                    panic!("bad node in a good outboard")
                };
                let r = tree.group_bytes(group);
                let chunk = &d[r.start as usize..r.end as usize];
                assert_eq!(group_cv(group, chunk, is_root), expected);
                let bchunk = &bad[r.start as usize..r.end as usize];
                let flipped = size > 0 && r.contains(&(size / 2));
                assert_eq!(group_cv(group, bchunk, is_root) != expected, flipped);
                seen += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, tree.groups());
        }
    }
}
