//! The blob protocol, `/swarmfs/blobs/1`: how one node asks another for verified ranges of a
//! blob. This module's docs, with `docs/protocol.md`, are the specification.
//!
//! Goals: a reader fetches exactly the 16 KiB groups it needs, verifies every byte as it
//! arrives (the body is the encoding in `bao.rs`), and learns the blob's size. A node that
//! holds only part of a blob serves what it holds. Every message is bounded.
//!
//! Non-goals: discovery (that is the DHT), transfer of several blobs per stream, compression.
//!
//! A stream carries GET requests one after another, or is a swarm stream (below). All
//! integers are little-endian.
//!
//! ```text
//! request  = kind:u8 (1 = GET)  hash:[u8; 32]  count:u16  count × (start:u64 end:u64)
//! response = status:u8
//!            if status = 0 (OK):  size:u64  count:u16  count × (start:u64 end:u64)  body
//! ```
//!
//! Ranges are half-open runs of groups (group `g` is bytes `16384·g .. 16384·(g+1)`), sorted,
//! disjoint and non-empty. The ranges in the response are the part of the request the node
//! holds and verified (clamped to the blob); the body is the encoding of exactly those. Other
//! statuses end the response: 1 = the node does not have the blob, 2 = busy (too many
//! requests from this peer; try another), 3 = the request was malformed. Kinds and statuses
//! not listed are reserved; a node answers an unknown kind with status 3.
//!
//! A swarm stream starts with JOIN (kind 2: a GET's head with no ranges). The answer is a
//! status and, for OK, the blob's size. Then both sides send messages at any time, each a
//! tag and a body: HAVE (1, runs of groups the sender holds), SYNCED (2, the sender's whole
//! map so far has been sent), PEERS (3, other members of the swarm and their addresses),
//! LOST (4, runs the sender no longer holds). A node that does not know kind 2 answers
//! status 3, and the joiner falls back to plain GETs.

use std::io::{self, Read, Write};
use std::ops::Range;

use crate::hash::Hash;

/// The protocol name negotiated on the stream.
pub const PROTOCOL: &str = "/swarmfs/blobs/1";
/// Most ranges in one request or response.
pub const MAX_RANGES: usize = 256;
/// Most groups one request may ask for (64 MiB).
pub const MAX_GROUPS: u64 = 4096;
/// The largest request on the wire.
pub const MAX_REQUEST_LEN: usize = 1 + 32 + 2 + 16 * MAX_RANGES;

const KIND_GET: u8 = 1;
const KIND_JOIN: u8 = 2;
/// Most peers in one PEERS message, and addresses per peer.
pub const MAX_PEX_PEERS: usize = 32;
pub const MAX_PEX_ADDRS: usize = 8;

/// What a stream's first message asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Groups of a blob (kind 1).
    Get(Request),
    /// Join the blob's swarm (kind 2): exchange have-maps and peers on this stream.
    Join(Hash),
}

/// A message on a swarm stream, after the JOIN and its answer. Either side may send any of
/// them at any time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwarmMsg {
    /// Groups the sender holds, verified (added to what it said before).
    Have(Vec<Range<u64>>),
    /// Everything the sender held when the stream opened has been sent.
    Synced,
    /// Other peers in this blob's swarm, with addresses to dial them at.
    Peers(Vec<(Vec<u8>, Vec<Vec<u8>>)>),
    /// Groups the sender no longer holds (dropped as corrupt, or evicted).
    Lost(Vec<Range<u64>>),
    /// Groups the sender has just asked some peer for: a hint that it will hold them soon,
    /// so that others fetch different groups from a seeder and take these from the sender.
    Fetching(Vec<Range<u64>>),
}

const MSG_HAVE: u8 = 1;
const MSG_SYNCED: u8 = 2;
const MSG_PEERS: u8 = 3;
const MSG_LOST: u8 = 4;
const MSG_FETCHING: u8 = 5;

/// How a node answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    Busy = 2,
    BadRequest = 3,
}

/// A malformed or oversized message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("unknown request kind {0}")]
    UnknownKind(u8),
    #[error("unknown response status {0}")]
    UnknownStatus(u8),
    #[error("{0} ranges is more than the limit of {MAX_RANGES}")]
    TooManyRanges(usize),
    #[error("{0} groups is more than the limit of {MAX_GROUPS}")]
    TooManyGroups(u64),
    #[error("ranges must be non-empty, sorted and disjoint")]
    BadRanges,
    #[error("unknown swarm message {0}")]
    UnknownMessage(u8),
    #[error("{0} peers or addresses is more than the limit")]
    TooManyPeers(usize),
    #[error("a {0}-byte field is longer than 255 bytes")]
    TooLong(usize),
}

/// A request for groups of a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub hash: Hash,
    pub ranges: Vec<Range<u64>>,
}

/// The head of a response; for `Status::Ok` the encoding of `ranges` follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: Status,
    pub size: u64,
    pub ranges: Vec<Range<u64>>,
}

fn check_ranges(ranges: &[Range<u64>], limit_groups: bool) -> Result<(), ProtocolError> {
    if ranges.len() > MAX_RANGES {
        return Err(ProtocolError::TooManyRanges(ranges.len()));
    }
    let mut last_end = 0;
    let mut total = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        if r.start >= r.end || (i > 0 && r.start < last_end) {
            return Err(ProtocolError::BadRanges);
        }
        last_end = r.end;
        total = total.saturating_add(r.end - r.start);
    }
    if limit_groups && total > MAX_GROUPS {
        return Err(ProtocolError::TooManyGroups(total));
    }
    Ok(())
}

fn put_ranges(out: &mut Vec<u8>, ranges: &[Range<u64>]) {
    out.extend_from_slice(&(ranges.len() as u16).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.start.to_le_bytes());
        out.extend_from_slice(&r.end.to_le_bytes());
    }
}

fn get_ranges(r: &mut dyn Read) -> Result<Vec<Range<u64>>, ProtocolError> {
    let mut n = [0u8; 2];
    r.read_exact(&mut n)?;
    let n = u16::from_le_bytes(n) as usize;
    if n > MAX_RANGES {
        return Err(ProtocolError::TooManyRanges(n));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut b = [0u8; 16];
        r.read_exact(&mut b)?;
        let start = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let end = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
        out.push(start..end);
    }
    Ok(out)
}

impl Request {
    /// The bytes on the wire; fails if the request breaks a limit.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        check_ranges(&self.ranges, true)?;
        let mut out = Vec::with_capacity(35 + 16 * self.ranges.len());
        out.push(KIND_GET);
        out.extend_from_slice(self.hash.as_bytes());
        put_ranges(&mut out, &self.ranges);
        Ok(out)
    }

    /// Reads and checks a request.
    pub fn read(r: &mut dyn Read) -> Result<Request, ProtocolError> {
        let mut head = [0u8; 33];
        r.read_exact(&mut head)?;
        if head[0] != KIND_GET {
            return Err(ProtocolError::UnknownKind(head[0]));
        }
        let hash = Hash::from_bytes(head[1..].try_into().expect("32 bytes"));
        let ranges = get_ranges(r)?;
        check_ranges(&ranges, true)?;
        Ok(Request { hash, ranges })
    }
}

/// The JOIN request for blob `h`: a GET's head with kind 2 and no ranges.
pub fn encode_join(h: &Hash) -> Vec<u8> {
    let mut out = vec![KIND_JOIN];
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// The answer to a JOIN: a status, and for OK the blob's size.
pub fn encode_join_answer(status: Status, size: u64) -> Vec<u8> {
    let mut out = vec![status as u8];
    if status == Status::Ok {
        out.extend_from_slice(&size.to_le_bytes());
    }
    out
}

/// Reads a stream's request: a GET, or a JOIN (whose range count must be 0).
pub fn read_incoming(r: &mut dyn Read) -> Result<Incoming, ProtocolError> {
    let mut head = [0u8; 33];
    r.read_exact(&mut head)?;
    let hash = Hash::from_bytes(head[1..].try_into().expect("32 bytes"));
    match head[0] {
        KIND_GET => {
            let ranges = get_ranges(r)?;
            check_ranges(&ranges, true)?;
            Ok(Incoming::Get(Request { hash, ranges }))
        }
        KIND_JOIN => match get_ranges(r)?.len() {
            0 => Ok(Incoming::Join(hash)),
            _ => Err(ProtocolError::BadRanges),
        },
        k => Err(ProtocolError::UnknownKind(k)),
    }
}

impl SwarmMsg {
    /// The bytes on the wire; fails if the message breaks a limit.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::new();
        match self {
            SwarmMsg::Have(r) | SwarmMsg::Lost(r) | SwarmMsg::Fetching(r) => {
                check_ranges(r, false)?;
                out.push(match self {
                    SwarmMsg::Have(_) => MSG_HAVE,
                    SwarmMsg::Lost(_) => MSG_LOST,
                    _ => MSG_FETCHING,
                });
                put_ranges(&mut out, r);
            }
            SwarmMsg::Synced => out.push(MSG_SYNCED),
            SwarmMsg::Peers(peers) => {
                if peers.len() > MAX_PEX_PEERS {
                    return Err(ProtocolError::TooManyPeers(peers.len()));
                }
                out.push(MSG_PEERS);
                out.push(peers.len() as u8);
                for (id, addrs) in peers {
                    if addrs.len() > MAX_PEX_ADDRS {
                        return Err(ProtocolError::TooManyPeers(addrs.len()));
                    }
                    put_short(&mut out, id)?;
                    out.push(addrs.len() as u8);
                    for a in addrs {
                        put_short(&mut out, a)?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads and checks one message.
    pub fn read(r: &mut dyn Read) -> Result<SwarmMsg, ProtocolError> {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        match tag[0] {
            MSG_HAVE | MSG_LOST | MSG_FETCHING => {
                let ranges = get_ranges(r)?;
                check_ranges(&ranges, false)?;
                Ok(match tag[0] {
                    MSG_HAVE => SwarmMsg::Have(ranges),
                    MSG_LOST => SwarmMsg::Lost(ranges),
                    _ => SwarmMsg::Fetching(ranges),
                })
            }
            MSG_SYNCED => Ok(SwarmMsg::Synced),
            MSG_PEERS => {
                let n = get_u8(r)? as usize;
                if n > MAX_PEX_PEERS {
                    return Err(ProtocolError::TooManyPeers(n));
                }
                let mut peers = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = get_short(r)?;
                    let k = get_u8(r)? as usize;
                    if k > MAX_PEX_ADDRS {
                        return Err(ProtocolError::TooManyPeers(k));
                    }
                    let addrs = (0..k).map(|_| get_short(r)).collect::<Result<_, _>>()?;
                    peers.push((id, addrs));
                }
                Ok(SwarmMsg::Peers(peers))
            }
            t => Err(ProtocolError::UnknownMessage(t)),
        }
    }
}

fn get_u8(r: &mut dyn Read) -> Result<u8, ProtocolError> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

/// A byte string of at most 255 bytes, after its length.
fn put_short(out: &mut Vec<u8>, b: &[u8]) -> Result<(), ProtocolError> {
    let n = u8::try_from(b.len()).map_err(|_| ProtocolError::TooLong(b.len()))?;
    out.push(n);
    out.extend_from_slice(b);
    Ok(())
}

fn get_short(r: &mut dyn Read) -> Result<Vec<u8>, ProtocolError> {
    let mut b = vec![0u8; get_u8(r)? as usize];
    r.read_exact(&mut b)?;
    Ok(b)
}

impl ResponseHead {
    /// A response that ends at its status.
    pub fn refuse(status: Status) -> ResponseHead {
        ResponseHead {
            status,
            size: 0,
            ranges: Vec::new(),
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = vec![self.status as u8];
        if self.status == Status::Ok {
            check_ranges(&self.ranges, true)?;
            out.extend_from_slice(&self.size.to_le_bytes());
            put_ranges(&mut out, &self.ranges);
        }
        Ok(out)
    }

    /// Writes the head.
    pub fn write(&self, w: &mut dyn Write) -> Result<(), ProtocolError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }

    /// Reads and checks a head.
    pub fn read(r: &mut dyn Read) -> Result<ResponseHead, ProtocolError> {
        let mut s = [0u8; 1];
        r.read_exact(&mut s)?;
        let status = match s[0] {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::Busy,
            3 => Status::BadRequest,
            x => return Err(ProtocolError::UnknownStatus(x)),
        };
        if status != Status::Ok {
            return Ok(ResponseHead::refuse(status));
        }
        let mut size = [0u8; 8];
        r.read_exact(&mut size)?;
        let ranges = get_ranges(r)?;
        check_ranges(&ranges, true)?;
        Ok(ResponseHead {
            status,
            size: u64::from_le_bytes(size),
            ranges,
        })
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden encodings: these bytes are the protocol. Changing them breaks old peers.
    #[test]
    fn golden_request() {
        let req = Request {
            hash: Hash::EMPTY,
            ranges: vec![0..1, 4..6],
        };
        let wire = req.encode().unwrap();
        let want = concat!(
            "01",                                                               // kind: GET
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262", // hash
            "0200",                                                             // 2 ranges
            "0000000000000000",
            "0100000000000000", // 0..1
            "0400000000000000",
            "0600000000000000", // 4..6
        );
        assert_eq!(hex(&wire), want);
        assert_eq!(Request::read(&mut &wire[..]).unwrap(), req);
    }

    #[test]
    fn golden_responses() {
        let ok = ResponseHead {
            status: Status::Ok,
            size: 70000,
            ranges: vec![4..5],
        };
        let wire = ok.encode().unwrap();
        let want = concat!(
            "00",               // status: OK
            "7011010000000000", // size: 70000
            "0100",             // 1 range
            "0400000000000000",
            "0500000000000000", // 4..5
        );
        assert_eq!(hex(&wire), want);
        assert_eq!(ResponseHead::read(&mut &wire[..]).unwrap(), ok);
        for (status, byte) in [
            (Status::NotFound, "01"),
            (Status::Busy, "02"),
            (Status::BadRequest, "03"),
        ] {
            let wire = ResponseHead::refuse(status).encode().unwrap();
            assert_eq!(hex(&wire), byte);
            assert_eq!(ResponseHead::read(&mut &wire[..]).unwrap().status, status);
        }
    }

    #[test]
    fn golden_join_and_swarm_messages() {
        let join = encode_join(&Hash::EMPTY);
        let want = concat!(
            "02",                                                               // kind: JOIN
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262", // hash
            "0000",                                                             // no ranges
        );
        assert_eq!(hex(&join), want);
        assert_eq!(read_incoming(&mut &join[..]).unwrap(), Incoming::Join(Hash::EMPTY));
        // An old GET still reads as a GET.
        let get = Request {
            hash: Hash::EMPTY,
            ranges: vec![0..1],
        };
        assert_eq!(
            read_incoming(&mut &get.encode().unwrap()[..]).unwrap(),
            Incoming::Get(get)
        );
        assert_eq!(hex(&encode_join_answer(Status::Ok, 70000)), "007011010000000000");
        assert_eq!(hex(&encode_join_answer(Status::NotFound, 70000)), "01");
        let cases: Vec<(SwarmMsg, String)> = vec![
            (
                SwarmMsg::Have(vec![0..16, 32..33]),
                concat!(
                    "01",   // HAVE
                    "0200", // 2 runs
                    "0000000000000000",
                    "1000000000000000", // 0..16
                    "2000000000000000",
                    "2100000000000000", // 32..33
                )
                .into(),
            ),
            (SwarmMsg::Synced, "02".into()),
            (
                SwarmMsg::Peers(vec![(vec![0xaa, 0xbb], vec![vec![0x04, 0x7f, 0, 0, 1]])]),
                concat!(
                    "03",           // PEERS
                    "01",           // 1 peer
                    "02aabb",       // id: 2 bytes
                    "01",           // 1 address
                    "05047f000001", // 5 bytes of multiaddr
                )
                .into(),
            ),
            (
                SwarmMsg::Lost(vec![5..6]),
                concat!("04", "0100", "0500000000000000", "0600000000000000").into(), // LOST 5..6
            ),
            (
                SwarmMsg::Fetching(vec![64..80]),
                concat!("05", "0100", "4000000000000000", "5000000000000000").into(), // FETCHING 64..80
            ),
        ];
        for (msg, want) in cases {
            let wire = msg.encode().unwrap();
            assert_eq!(hex(&wire), want, "{msg:?}");
            assert_eq!(SwarmMsg::read(&mut &wire[..]).unwrap(), msg);
        }
    }

    #[test]
    fn malformed_swarm_messages_are_refused() {
        // A JOIN with ranges, an unknown tag, too many peers, a cut-short message.
        let mut join = encode_join(&Hash::EMPTY);
        join[33] = 1;
        join.extend_from_slice(&[0; 16]);
        assert!(matches!(read_incoming(&mut &join[..]), Err(ProtocolError::BadRanges)));
        assert!(matches!(
            SwarmMsg::read(&mut &[9u8][..]),
            Err(ProtocolError::UnknownMessage(9))
        ));
        assert!(matches!(
            SwarmMsg::read(&mut &[3u8, 33][..]),
            Err(ProtocolError::TooManyPeers(33))
        ));
        let many = SwarmMsg::Peers(vec![(vec![1], vec![]); MAX_PEX_PEERS + 1]);
        assert!(many.encode().is_err());
        assert!(matches!(
            SwarmMsg::read(&mut &[1u8, 1, 0, 0][..]),
            Err(ProtocolError::Io(_))
        ));
        // Runs must be sorted and disjoint, but a HAVE may cover more than a GET's limit.
        assert!(SwarmMsg::Have(vec![4..6, 5..7]).encode().is_err());
        assert!(SwarmMsg::Have(vec![0..1 << 40]).encode().is_ok());
    }

    #[test]
    fn limits_and_malformed_input_are_refused() {
        let h = Hash::EMPTY;
        let too_many = Request {
            hash: h,
            ranges: (0..MAX_RANGES as u64 + 1).map(|i| 2 * i..2 * i + 1).collect(),
        };
        assert!(matches!(too_many.encode(), Err(ProtocolError::TooManyRanges(_))));
        let too_big = Request {
            hash: h,
            ranges: vec![0..MAX_GROUPS + 1],
        };
        assert!(matches!(too_big.encode(), Err(ProtocolError::TooManyGroups(_))));
        for bad in [vec![3..3], vec![4..6, 5..7], vec![5..6, 1..2]] {
            let r = Request { hash: h, ranges: bad };
            assert!(matches!(r.encode(), Err(ProtocolError::BadRanges)));
        }
        let mut wire = Request {
            hash: h,
            ranges: vec![0..1],
        }
        .encode()
        .unwrap();
        wire[0] = 9;
        assert!(matches!(
            Request::read(&mut &wire[..]),
            Err(ProtocolError::UnknownKind(9))
        ));
        assert!(matches!(Request::read(&mut &wire[..10]), Err(ProtocolError::Io(_))));
        assert!(matches!(
            ResponseHead::read(&mut &[7u8][..]),
            Err(ProtocolError::UnknownStatus(7))
        ));
        // A count beyond the limit is refused before anything is allocated for it.
        let mut wire = vec![KIND_GET];
        wire.extend_from_slice(h.as_bytes());
        wire.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            Request::read(&mut &wire[..]),
            Err(ProtocolError::TooManyRanges(_))
        ));
    }
}
