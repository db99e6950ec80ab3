//! `Hash`: the BLAKE3 hash of a blob's whole content, the address of every blob.
//!
//! It prints as 64 lowercase hex characters, exactly as `b3sum` does, and parses from
//! either case. Anything else is refused with an error that quotes the input.

use std::fmt;
use std::str::FromStr;

/// The BLAKE3 hash of a blob's whole content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash([u8; 32]);

/// Why a string is not a hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed hash {input:?}: {reason}")]
pub struct ParseHashError {
    /// The input, cut short if it was long.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Hash {
    /// The hash of the empty blob.
    pub const EMPTY: Hash = Hash([
        0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc, 0xc9, 0x49, 0x9b, 0xcb,
        0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f, 0x32, 0x62,
    ]);

    /// Wraps raw hash bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Hash(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Hashes `data` in one go.
    pub fn of(data: &[u8]) -> Self {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Parses only the canonical lowercase form, as the mount requires for blob names.
    pub fn parse_lowercase(s: &str) -> Option<Self> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            s.parse().ok()
        } else {
            None
        }
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
        // The buffer holds only ASCII hex digits.
        f.write_str(std::str::from_utf8(&out).expect("hex is ascii"))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl FromStr for Hash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseHashError {
            input: s.chars().take(80).collect(),
            reason,
        };
        if s.len() != 64 {
            return Err(err("a hash is 64 hex characters"));
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            match (digit(pair[0]), digit(pair[1])) {
                (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
                _ => return Err(err("it holds a character that is not a hex digit")),
            }
        }
        Ok(Hash(out))
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_matches_b3sum() {
        assert_eq!(Hash::of(b""), Hash::EMPTY);
        assert_eq!(
            Hash::EMPTY.to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn parse_either_case_round_trips() {
        let h = Hash::of(b"hello");
        let upper = h.to_string().to_uppercase();
        assert_eq!(upper.parse::<Hash>().unwrap(), h);
        assert_eq!(h.to_string().parse::<Hash>().unwrap(), h);
        assert_eq!(Hash::parse_lowercase(&upper), None);
        assert_eq!(Hash::parse_lowercase(&h.to_string()), Some(h));
    }

    #[test]
    fn malformed_is_quoted() {
        let e = "xyz".parse::<Hash>().unwrap_err();
        assert!(e.to_string().contains("\"xyz\""), "{e}");
        let bad = format!("{}g", &Hash::EMPTY.to_string()[..63]);
        let e = bad.parse::<Hash>().unwrap_err();
        assert!(e.to_string().contains(&bad), "{e}");
    }
}
