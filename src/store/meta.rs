//! Index records: the fixed binary form of a blob's metadata, and the key layout in sled.
//!
//! One sled tree holds everything, so a `Batch` changes a blob's records atomically:
//!
//! ```text
//! 'm' hash          -> Meta (26 bytes)
//! 'p' hash          -> present-set of a partial blob (one bit per group)
//! 'i' hash          -> the bytes of a blob of at most INLINE_MAX bytes
//! 'l' tick(BE) hash -> ()   LRU order: the oldest tick first
//! ```

use crate::hash::Hash;

pub const TAG_META: u8 = b'm';
pub const TAG_PRESENT: u8 = b'p';
pub const TAG_INLINE: u8 = b'i';
pub const TAG_LRU: u8 = b'l';

const VERSION: u8 = 1;
const COMPLETE: u8 = 1;
const PINNED: u8 = 2;
const INLINE: u8 = 4;

/// What the index knows of a blob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// The size in bytes. For a partial blob it is trusted once its last group verified.
    pub size: u64,
    /// Every group is present and verified.
    pub complete: bool,
    pub pinned: bool,
    /// The bytes live in the index ('i'), not in files.
    pub inline: bool,
    /// Bytes present locally.
    pub present: u64,
    /// The blob's place in the LRU order.
    pub tick: u64,
}

impl Meta {
    pub fn encode(&self) -> [u8; 26] {
        let mut out = [0u8; 26];
        out[0] = VERSION;
        out[1] = (self.complete as u8 * COMPLETE) | (self.pinned as u8 * PINNED) | (self.inline as u8 * INLINE);
        out[2..10].copy_from_slice(&self.size.to_le_bytes());
        out[10..18].copy_from_slice(&self.present.to_le_bytes());
        out[18..26].copy_from_slice(&self.tick.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Meta> {
        if b.len() != 26 || b[0] != VERSION {
            return None;
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        Some(Meta {
            complete: b[1] & COMPLETE != 0,
            pinned: b[1] & PINNED != 0,
            inline: b[1] & INLINE != 0,
            size: u(2..10),
            present: u(10..18),
            tick: u(18..26),
        })
    }
}

pub fn key(tag: u8, h: &Hash) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = tag;
    k[1..].copy_from_slice(h.as_bytes());
    k
}

pub fn lru_key(tick: u64, h: &Hash) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = TAG_LRU;
    k[1..9].copy_from_slice(&tick.to_be_bytes());
    k[9..].copy_from_slice(h.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Meta {
            size: 1 << 40,
            complete: true,
            pinned: false,
            inline: true,
            present: 77,
            tick: 9,
        };
        assert_eq!(Meta::decode(&m.encode()), Some(m));
        assert_eq!(Meta::decode(&[0; 26]), None);
    }
}
