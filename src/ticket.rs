//! Tickets: one pasteable string holding a hash and where to get it (`docs/ticket.md`).
//!
//! ```text
//! text    = "swarmfs" version(decimal) base32(payload || check)     lowercase, no padding
//! payload = kind(u8: 0 blob) hash(32) npeers(u8) { peer } ...
//! peer    = len(u8) peer-id(bytes) naddrs(u8) { len(u8) multiaddr(bytes, no /p2p) } ...
//! check   = the first 4 bytes of BLAKE3(payload)
//! ```
//!
//! Version 1 is the only one. A ticket is bounded (at most 8 peers of 8 addresses each), and
//! every way it can be wrong (an unknown prefix or version, a character outside base32, a
//! cut-off or altered ticket) gives its own one-line error.

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};

use crate::hash::Hash;

/// The text every ticket starts with, before its version.
pub const PREFIX: &str = "swarmfs";
/// The version this code writes and reads.
pub const VERSION: u8 = 1;
/// Most peers, and most addresses per peer, a ticket holds.
pub const MAX_PEERS: usize = 8;
pub const MAX_ADDRS: usize = 8;

const KIND_BLOB: u8 = 0;
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// What a ticket holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub hash: Hash,
    /// Peers that had it, each with addresses to dial it at (direct first, then relayed).
    pub peers: Vec<(PeerId, Vec<Multiaddr>)>,
}

/// Why a string is not a ticket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("not a swarmfs ticket (it should start with \"{PREFIX}1\")")]
    Prefix,
    #[error("ticket version {0} is not known to this swarmfs (it reads version {VERSION}); upgrade it")]
    Version(String),
    #[error("the ticket has a character that cannot be in one ({0:?}): was it copied whole?")]
    Char(char),
    #[error("the ticket is cut short or altered: its check does not match; copy it again whole")]
    Check,
    #[error("the ticket is malformed: {0}")]
    Malformed(&'static str),
}

impl Ticket {
    /// The ticket as text.
    pub fn encode(&self) -> String {
        let mut b = vec![KIND_BLOB];
        b.extend_from_slice(self.hash.as_bytes());
        let peers = &self.peers[..self.peers.len().min(MAX_PEERS)];
        b.push(peers.len() as u8);
        for (p, addrs) in peers {
            let id = p.to_bytes();
            b.push(id.len() as u8);
            b.extend_from_slice(&id);
            let addrs: Vec<Vec<u8>> = addrs
                .iter()
                .map(|a| crate::net::without_peer(a).to_vec())
                .filter(|a| a.len() <= 255)
                .take(MAX_ADDRS)
                .collect();
            b.push(addrs.len() as u8);
            for a in addrs {
                b.push(a.len() as u8);
                b.extend_from_slice(&a);
            }
        }
        let check = blake3::hash(&b);
        b.extend_from_slice(&check.as_bytes()[..4]);
        format!("{PREFIX}{VERSION}{}", base32(&b))
    }

    /// Reads a ticket from text (surrounding whitespace is ignored).
    pub fn decode(s: &str) -> Result<Ticket, TicketError> {
        let s = s.trim();
        let rest = s.strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (version, body) = rest.split_at(digits);
        if version.is_empty() {
            return Err(TicketError::Prefix);
        }
        if version != VERSION.to_string() {
            return Err(TicketError::Version(version.to_string()));
        }
        let b = unbase32(body)?;
        if b.len() < 4 {
            return Err(TicketError::Check);
        }
        let (payload, check) = b.split_at(b.len() - 4);
        if blake3::hash(payload).as_bytes()[..4] != *check {
            return Err(TicketError::Check);
        }
        let mut r = Reader(payload);
        if r.byte()? != KIND_BLOB {
            return Err(TicketError::Malformed(
                "it holds a kind of content this swarmfs does not know",
            ));
        }
        let hash = Hash::from_bytes(r.take(32)?.try_into().expect("32 bytes"));
        let n = r.byte()? as usize;
        if n > MAX_PEERS {
            return Err(TicketError::Malformed("too many peers"));
        }
        let mut peers = Vec::with_capacity(n);
        for _ in 0..n {
            let len = r.byte()? as usize;
            let peer = PeerId::from_bytes(r.take(len)?).map_err(|_| TicketError::Malformed("a peer id is invalid"))?;
            let na = r.byte()? as usize;
            if na > MAX_ADDRS {
                return Err(TicketError::Malformed("too many addresses for a peer"));
            }
            let mut addrs = Vec::with_capacity(na);
            for _ in 0..na {
                let len = r.byte()? as usize;
                let a = Multiaddr::try_from(r.take(len)?.to_vec())
                    .map_err(|_| TicketError::Malformed("an address is invalid"))?;
                addrs.push(a);
            }
            peers.push((peer, addrs));
        }
        if !r.0.is_empty() {
            return Err(TicketError::Malformed("bytes left over"));
        }
        Ok(Ticket { hash, peers })
    }

    /// Each peer's addresses with its `/p2p/ID` on the end, ready to dial.
    pub fn dial_addrs(&self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        self.peers
            .iter()
            .map(|(p, addrs)| (*p, addrs.iter().map(|a| a.clone().with(Protocol::P2p(*p))).collect()))
            .collect()
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TicketError> {
        if self.0.len() < n {
            return Err(TicketError::Malformed("it ends too soon"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn byte(&mut self) -> Result<u8, TicketError> {
        Ok(self.take(1)?[0])
    }
}

/// RFC 4648 base32, lowercase, without padding.
fn base32(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len() * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &x in b {
        acc = (acc << 8) | x as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn unbase32(s: &str) -> Result<Vec<u8>, TicketError> {
    let mut out = Vec::with_capacity(s.len() * 5 / 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.chars() {
        let v = match c.to_ascii_lowercase() {
            c @ 'a'..='z' => c as u32 - 'a' as u32,
            c @ '2'..='7' => c as u32 - '2' as u32 + 26,
            _ => return Err(TicketError::Char(c)),
        };
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // What is left is padding, all zero in a ticket as written: anything else was altered
    // (or cut off mid-byte).
    if bits >= 5 || acc & ((1 << bits) - 1) != 0 {
        return Err(TicketError::Check);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ticket {
        // A fixed key, so the peer id (and the golden text) never change.
        let key = libp2p::identity::Keypair::ed25519_from_bytes([7u8; 32]).unwrap();
        Ticket {
            hash: Hash::of(b"hello\n"),
            peers: vec![(
                key.public().to_peer_id(),
                vec![
                    "/ip4/192.0.2.7/tcp/4701".parse().unwrap(),
                    "/ip6/2001:db8::7/tcp/4701".parse().unwrap(),
                ],
            )],
        }
    }

    #[test]
    fn a_ticket_round_trips_and_its_bytes_are_fixed() {
        let t = sample();
        let text = t.encode();
        assert_eq!(Ticket::decode(&text).unwrap(), t);
        assert_eq!(
            Ticket::decode(&format!("  {text}\n")).unwrap(),
            t,
            "whitespace around it"
        );
        assert_eq!(
            Ticket::decode(&text.to_uppercase().replace("SWARMFS", "swarmfs")).unwrap(),
            t
        );
        // Golden: the format is versioned; this text must read the same forever.
        assert_eq!(text, GOLDEN);
        // About as compact as sendme's: hash, one peer, two addresses in 181 characters.
        assert!(text.len() < 200, "{} characters", text.len());
        let bare = Ticket {
            hash: t.hash,
            peers: vec![],
        };
        assert_eq!(Ticket::decode(&bare.encode()).unwrap(), bare);
    }

    const GOLDEN: &str = "swarmfs1achey7a3thn72uhhvfiyl7vnl3qujd5jasrp3v3y5l27fw75mknjsajgaasaqaisedveu3dd4kofecv66vihwezoyx4zkr3wv27l464siipou2iui3jcyaqiataaaaqhayjf2fbjeaaq3oaaaaaaaaaaaaaaaaaaa4dbexisj32xi";

    #[test]
    fn cut_garbled_and_foreign_tickets_give_their_own_errors() {
        let text = sample().encode();
        assert_eq!(Ticket::decode("hello"), Err(TicketError::Prefix));
        assert_eq!(
            Ticket::decode(&text.replacen("swarmfs1", "swarmfs2", 1)),
            Err(TicketError::Version("2".into()))
        );
        assert_eq!(Ticket::decode(&text[..text.len() - 9]), Err(TicketError::Check));
        assert_eq!(Ticket::decode(&text[..12]), Err(TicketError::Check));
        assert_eq!(Ticket::decode(&format!("{text}!")), Err(TicketError::Char('!')));
        // Any one character changed is caught.
        for i in 8..text.len() {
            let mut b = text.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let garbled = String::from_utf8(b).unwrap();
            assert!(Ticket::decode(&garbled).is_err(), "position {i} changed went unnoticed");
        }
        for e in [TicketError::Prefix, TicketError::Check, TicketError::Char('!')] {
            assert_eq!(e.to_string().lines().count(), 1);
        }
    }
}
