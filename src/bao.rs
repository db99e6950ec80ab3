//! Verified streaming of group ranges: the bao-style pre-order encoding.
//!
//! An encoding of a set of groups is the walk from the root down to those groups, in
//! pre-order: for every internal node on the way, its 64-byte pair; for every wanted group,
//! its bytes. The receiver knows the tree shape from the size, so it needs no framing, and it
//! checks each pair against its parent's value and each group against its own before it
//! believes or stores anything. `docs/protocol.md` gives the byte-level format.
//!
//! The sender checks as well: it only ever sends bytes that verified against the root.

use std::io::{self, Read, Write};
use std::ops::Range;

use crate::hash::Hash;
use crate::tree::{group_cv, left_len, parent_cv, split_pair, Cv, Pair, Tree};

/// Why a stream of verified data stopped.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A pair did not hash to its parent's value.
    #[error("the tree node above blocks {}..{} failed verification", groups.start, groups.end)]
    BadPair { groups: Range<u64> },
    /// A group's bytes did not hash to the value its parent gave.
    #[error("block {group} failed verification")]
    BadGroup { group: u64 },
}

/// True when `node` (a group range) overlaps any range in `want` (sorted, disjoint).
pub fn overlaps(want: &[Range<u64>], node: &Range<u64>) -> bool {
    want.iter()
        .any(|r| r.start < node.end && node.start < r.end && r.start < r.end)
}

/// Writes the encoding of the groups in `want` to `out`, reading the local outboard with
/// `pair(slot)` and group bytes with `group(g, buf)`. Everything is verified before it is
/// written, so a corrupt local copy stops the stream with an error instead of spreading.
pub fn encode(
    tree: Tree,
    root: &Hash,
    want: &[Range<u64>],
    pair: &mut dyn FnMut(u64) -> io::Result<Pair>,
    group: &mut dyn FnMut(u64, &mut Vec<u8>) -> io::Result<()>,
    out: &mut dyn Write,
) -> Result<(), VerifyError> {
    let mut buf = Vec::new();
    let mut enc = Encoder {
        tree,
        want,
        pair,
        group,
        out,
        buf: &mut buf,
    };
    enc.node(0, tree.groups(), *root.as_bytes(), true)
}

struct Encoder<'a> {
    tree: Tree,
    want: &'a [Range<u64>],
    pair: &'a mut dyn FnMut(u64) -> io::Result<Pair>,
    group: &'a mut dyn FnMut(u64, &mut Vec<u8>) -> io::Result<()>,
    out: &'a mut dyn Write,
    buf: &'a mut Vec<u8>,
}

impl Encoder<'_> {
    fn node(&mut self, start: u64, len: u64, expected: Cv, is_root: bool) -> Result<(), VerifyError> {
        if !overlaps(self.want, &(start..start + len)) {
            return Ok(());
        }
        if len == 1 {
            (self.group)(start, self.buf)?;
            if self.buf.len() as u64 != self.tree.group_bytes(start).end - self.tree.group_bytes(start).start
                || group_cv(start, self.buf, is_root) != expected
            {
                return Err(VerifyError::BadGroup { group: start });
            }
            self.out.write_all(self.buf)?;
            return Ok(());
        }
        let ll = left_len(len);
        let p = (self.pair)(start + ll - 1)?;
        let (l, r) = split_pair(&p);
        if parent_cv(&l, &r, is_root) != expected {
            return Err(VerifyError::BadPair {
                groups: start..start + len,
            });
        }
        self.out.write_all(&p)?;
        self.node(start, ll, l, false)?;
        self.node(start + ll, len - ll, r, false)
    }
}

/// One verified item out of a decoded stream.
pub enum Item<'a> {
    /// An outboard pair that verified, for slot `slot`.
    Pair { slot: u64, pair: &'a Pair },
    /// The bytes of group `group`, verified.
    Group { group: u64, data: &'a [u8] },
}

/// Reads the encoding of the groups in `want` from `input`, verifying as the bytes arrive,
/// and hands each verified item to `sink`. It stops at the first item that fails; everything
/// handed over before that is good.
pub fn decode(
    tree: Tree,
    root: &Hash,
    want: &[Range<u64>],
    input: &mut dyn Read,
    sink: &mut dyn FnMut(Item<'_>) -> io::Result<()>,
) -> Result<(), VerifyError> {
    let mut buf = Vec::new();
    let mut dec = Decoder {
        tree,
        want,
        input,
        sink,
        buf: &mut buf,
    };
    dec.node(0, tree.groups(), *root.as_bytes(), true)
}

struct Decoder<'a> {
    tree: Tree,
    want: &'a [Range<u64>],
    input: &'a mut dyn Read,
    sink: &'a mut dyn FnMut(Item<'_>) -> io::Result<()>,
    buf: &'a mut Vec<u8>,
}

impl Decoder<'_> {
    fn node(&mut self, start: u64, len: u64, expected: Cv, is_root: bool) -> Result<(), VerifyError> {
        if !overlaps(self.want, &(start..start + len)) {
            return Ok(());
        }
        if len == 1 {
            let r = self.tree.group_bytes(start);
            self.buf.resize((r.end - r.start) as usize, 0);
            self.input.read_exact(self.buf)?;
            if group_cv(start, self.buf, is_root) != expected {
                return Err(VerifyError::BadGroup { group: start });
            }
            (self.sink)(Item::Group {
                group: start,
                data: self.buf,
            })?;
            return Ok(());
        }
        let mut p = [0u8; 64];
        self.input.read_exact(&mut p)?;
        let (l, r) = split_pair(&p);
        if parent_cv(&l, &r, is_root) != expected {
            return Err(VerifyError::BadPair {
                groups: start..start + len,
            });
        }
        let ll = left_len(len);
        (self.sink)(Item::Pair {
            slot: start + ll - 1,
            pair: &p,
        })?;
        self.node(start, ll, l, false)?;
        self.node(start + ll, len - ll, r, false)
    }
}

/// The exact length of the encoding of `want`, so a receiver can bound what it reads.
pub fn encoded_len(tree: Tree, want: &[Range<u64>]) -> u64 {
    fn node(tree: &Tree, want: &[Range<u64>], start: u64, len: u64) -> u64 {
        if !overlaps(want, &(start..start + len)) {
            return 0;
        }
        if len == 1 {
            let r = tree.group_bytes(start);
            return r.end - r.start;
        }
        let ll = left_len(len);
        64 + node(tree, want, start, ll) + node(tree, want, start + ll, len - ll)
    }
    node(&tree, want, 0, tree.groups())
}

#[cfg(test)]
// A list of one range is what a request for one run of groups is.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::tree::tests::{build, data, INTERESTING_SIZES};
    use crate::tree::{GROUP_SIZE, PAIR_SIZE};

    fn enc(d: &[u8], want: &[Range<u64>]) -> (Hash, Vec<u8>) {
        let (h, ob) = build(d);
        let tree = Tree::new(d.len() as u64);
        let mut out = Vec::new();
        encode(
            tree,
            &h,
            want,
            &mut |slot| {
                let mut p = [0u8; 64];
                p.copy_from_slice(&ob[(slot * PAIR_SIZE) as usize..][..64]);
                Ok(p)
            },
            &mut |g, buf| {
                let r = tree.group_bytes(g);
                buf.clear();
                buf.extend_from_slice(&d[r.start as usize..r.end as usize]);
                Ok(())
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len() as u64, encoded_len(tree, want));
        (h, out)
    }

    #[test]
    fn round_trip_ranges() {
        for &size in INTERESTING_SIZES {
            let d = data(size);
            let tree = Tree::new(size);
            let n = tree.groups();
            for want in [vec![0..n], vec![n - 1..n], vec![0..1, n / 2..n / 2 + 1]] {
                let (h, e) = enc(&d, &want);
                let mut got = vec![0u8; size as usize];
                decode(tree, &h, &want, &mut &e[..], &mut |item| {
                    if let Item::Group { group, data } = item {
                        let at = (group * GROUP_SIZE) as usize;
                        got[at..at + data.len()].copy_from_slice(data);
                    }
                    Ok(())
                })
                .unwrap();
                for g in 0..n {
                    if overlaps(&want, &(g..g + 1)) {
                        let r = tree.group_bytes(g);
                        assert_eq!(
                            got[r.start as usize..r.end as usize],
                            d[r.start as usize..r.end as usize]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let d = data(5 * GROUP_SIZE + 77);
        let tree = Tree::new(d.len() as u64);
        let want = vec![1..4];
        let (h, e) = enc(&d, &want);
        for i in (0..e.len()).step_by(97) {
            let mut bad = e.clone();
            bad[i] ^= 0x40;
            let r = decode(tree, &h, &want, &mut &bad[..], &mut |_| Ok(()));
            assert!(
                matches!(r, Err(VerifyError::BadPair { .. } | VerifyError::BadGroup { .. })),
                "flip at {i} passed"
            );
        }
    }
}
