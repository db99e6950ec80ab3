//! The present-set of a partial blob: one bit per 16 KiB group, kept in the index.

use std::ops::Range;

/// Which groups of a blob are held and verified locally.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Present {
    words: Vec<u64>,
    groups: u64,
}

impl Present {
    /// An empty set over `groups` groups.
    pub fn new(groups: u64) -> Self {
        Present {
            words: vec![0; groups.div_ceil(64) as usize],
            groups,
        }
    }

    /// A full set over `groups` groups.
    pub fn full(groups: u64) -> Self {
        let mut p = Present::new(groups);
        p.insert(0..groups);
        p
    }

    /// Reads the stored form; `None` if it does not fit `groups`.
    pub fn from_bytes(groups: u64, bytes: &[u8]) -> Option<Self> {
        let n = groups.div_ceil(64) as usize;
        if bytes.len() != n * 8 {
            return None;
        }
        let words = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Some(Present { words, groups })
    }

    /// The stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The number of groups the set ranges over.
    pub fn groups(&self) -> u64 {
        self.groups
    }

    /// True if group `g` is present.
    pub fn contains(&self, g: u64) -> bool {
        g < self.groups && self.words[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    /// Marks groups present, a word at a time.
    pub fn insert(&mut self, r: Range<u64>) {
        let (mut g, end) = (r.start, r.end.min(self.groups));
        while g < end {
            let bit = g % 64;
            let n = (64 - bit).min(end - g);
            let mask = if n == 64 { !0 } else { ((1u64 << n) - 1) << bit };
            self.words[(g / 64) as usize] |= mask;
            g += n;
        }
    }

    /// Marks a group missing.
    pub fn remove(&mut self, g: u64) {
        if g < self.groups {
            self.words[(g / 64) as usize] &= !(1 << (g % 64));
        }
    }

    /// How many groups are present.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// True when every group is present.
    pub fn is_full(&self) -> bool {
        self.count() == self.groups
    }

    /// The maximal runs of missing groups within `within`.
    pub fn missing(&self, within: Range<u64>) -> Vec<Range<u64>> {
        self.runs(within, false)
    }

    /// The maximal runs of present groups within `within`.
    pub fn present(&self, within: Range<u64>) -> Vec<Range<u64>> {
        self.runs(within, true)
    }

    fn runs(&self, within: Range<u64>, want: bool) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for g in within.start..within.end.min(self.groups) {
            if self.contains(g) == want {
                match out.last_mut() {
                    Some(r) if r.end == g => r.end = g + 1,
                    _ => out.push(g..g + 1),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_round_trip() {
        let mut p = Present::new(130);
        p.insert(3..5);
        p.insert(64..66);
        p.insert(129..200);
        assert_eq!(p.count(), 5);
        assert_eq!(p.missing(0..130), vec![0..3, 5..64, 66..129]);
        assert_eq!(p.present(4..130), vec![4..5, 64..66, 129..130]);
        let q = Present::from_bytes(130, &p.to_bytes()).unwrap();
        assert_eq!(p, q);
        assert!(Present::from_bytes(131 + 64, &p.to_bytes()).is_none());
        assert!(Present::full(130).is_full());
        for (n, r) in [
            (200, 3..67),
            (200, 0..128),
            (200, 63..65),
            (200, 190..400),
            (64, 0..64),
            (70, 5..5),
        ] {
            let mut p = Present::new(n);
            p.insert(r.clone());
            for g in 0..n {
                assert_eq!(p.contains(g), r.contains(&g), "{n} {r:?} {g}");
            }
            assert_eq!(p.count(), r.end.min(n).saturating_sub(r.start));
        }
    }
}
