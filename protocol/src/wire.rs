//! Messages between devices, and their framing: a 4-byte little-endian
//! length, then a postcard-encoded message. Every frame has a size limit
//! checked before its bytes are read.

use serde::{Deserialize, Serialize};

use crate::membership::Membership;
use crate::{ChunkHash, FileEntry, WorkspaceId};

/// The libp2p protocol name of MarieSync's sync protocol (trusted peers only).
pub const SYNC_PROTOCOL: &str = "/mariesync/sync/1";
/// The protocol a device not yet trusted may speak: presenting a ticket.
pub const JOIN_PROTOCOL: &str = "/mariesync/join/1";
/// No join message may be larger.
pub const JOIN_FRAME_BYTES_MAX: usize = 64 * 1024;
/// Version of the messages below; a peer with another answers with an error.
/// 2: `IndexAfter` (asking for entries and acknowledging are separate, so a
/// receiver asks for the next page while it still applies the last).
/// 3: `Index::head` (a receiver shows how far along its sync is).
/// 4: `Changed::pushed` (a small change travels with its announcement).
pub const PROTOCOL_VERSION: u32 = 4;
/// No frame from a peer may be larger (before any decompression).
pub const WIRE_FRAME_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Index entries one `IndexAfter` answer carries at most.
pub const INDEX_ENTRIES_MAX: usize = 1024;
/// Hashes one `Chunks` request names at most.
pub const CHUNK_REQUEST_MAX: usize = 512;
/// Stored bytes one `Chunks` answer carries at most (the rest is asked again).
pub const CHUNK_RESPONSE_BYTES_MAX: usize = 2 * 1024 * 1024;
/// A change is pushed with its announcement when its index page has at
/// most this many entries...
pub const PUSH_ENTRIES_MAX: usize = 64;
/// ...and chunks are pushed with it up to this many stored bytes (the
/// receiver asks for the rest, as for any page).
pub const PUSH_BYTES_MAX: usize = 256 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The first message on a new connection: who we are.
    Hello {
        protocol_version: u32,
        device_name: String,
    },
    /// The entries of `workspace` changed after `after`, in sequence order;
    /// also an acknowledgement: every entry up to `applied` is applied
    /// here, durably (`applied` trails `after` while earlier pages are
    /// still being applied).
    IndexAfter {
        workspace: WorkspaceId,
        after: u64,
        applied: u64,
    },
    /// Chunks of `workspace` by hash, in their stored form.
    Chunks {
        workspace: WorkspaceId,
        hashes: Vec<ChunkHash>,
    },
    /// The sender's index of `workspace` moved to `sequence`: pull. When
    /// the change is small, it comes along (`pushed`): the round trips of
    /// asking for it are what an edit waits for on a LAN.
    Changed {
        workspace: WorkspaceId,
        sequence: u64,
        pushed: Option<Box<Pushed>>,
    },
    /// An owner's view of who shares `workspace`: an offer to a device that
    /// does not have it yet, an update for one that does.
    Membership {
        workspace: WorkspaceId,
        name: String,
        membership: Membership,
    },
    /// An Automerge sync message for one of the device group's documents
    /// (devices of one group only).
    Settings {
        doc: String,
        /// The sender starts over (its sync state for us is new): the
        /// receiver forgets what it believes it sent us, or a message lost
        /// on the way would never be sent again.
        new_session: bool,
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Hello {
        protocol_version: u32,
        device_name: String,
    },
    /// `last_sequence`: the sequence of the last entry sent (or `after`);
    /// `head`: the last sequence the sender serves now (what the receiver
    /// is syncing towards).
    Index {
        entries: Vec<FileEntry>,
        last_sequence: u64,
        more: bool,
        head: u64,
    },
    /// The chunks found, stored form; missing ones are left out.
    Chunks {
        #[serde(with = "chunk_list")]
        chunks: Vec<(ChunkHash, Vec<u8>)>,
    },
    Ack,
    Error {
        message: String,
    },
    /// The answer to a settings sync message, if there is one.
    Settings {
        #[serde(with = "serde_bytes")]
        message: Option<Vec<u8>>,
    },
}

/// The index page a receiver acknowledging `after` would ask for next
/// (whole: the sender pushes only what fits in one page), and the stored
/// chunks its entries name, in their order, up to [`PUSH_BYTES_MAX`]. A
/// receiver elsewhere than `after` ignores it and asks as usual; one that
/// uses it checks everything as it does for a page and chunks it asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    pub after: u64,
    pub entries: Vec<FileEntry>,
    pub last_sequence: u64,
    pub head: u64,
    #[serde(with = "chunk_list")]
    pub chunks: Vec<(ChunkHash, Vec<u8>)>,
}

impl Pushed {
    /// Whether the page keeps the limits a sender keeps (a receiver
    /// ignores one that does not).
    pub fn within_limits(&self) -> bool {
        self.entries.len() <= PUSH_ENTRIES_MAX
            && self.chunks.len() <= CHUNK_REQUEST_MAX
            && self.chunks.iter().map(|(_, b)| b.len()).sum::<usize>() <= PUSH_BYTES_MAX
            && self.after <= self.last_sequence
            && self.last_sequence <= self.head
    }
}

/// The one request of the join protocol: a ticket's secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub secret: [u8; 16],
    pub device_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinResponse {
    /// Welcome: the joiner is now trusted (and a member, for a workspace).
    Joined {
        /// For a workspace ticket: the workspace and its membership.
        workspace: Option<(WorkspaceId, String, Membership)>,
    },
    Refused {
        message: String,
    },
}

/// Chunk bytes as one byte string each: the same encoding as a sequence
/// of bytes in postcard, but decoded with one copy instead of byte by byte
/// (which was 4% of a receiver's CPU).
mod chunk_list {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::ChunkHash;

    pub fn serialize<S: Serializer>(
        chunks: &[(ChunkHash, Vec<u8>)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            chunks
                .iter()
                .map(|(hash, bytes)| (hash, serde_bytes::Bytes::new(bytes))),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<(ChunkHash, Vec<u8>)>, D::Error> {
        let chunks: Vec<(ChunkHash, serde_bytes::ByteBuf)> =
            Deserialize::deserialize(deserializer)?;
        Ok(chunks
            .into_iter()
            .map(|(hash, bytes)| (hash, bytes.into_vec()))
            .collect())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// A message as one frame, written once into a buffer of its exact size:
/// a 2 MiB answer of chunks is not built in a doubling buffer and copied
/// again (which held four times its size at the peak).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let malformed = |e: postcard::Error| WireError::Malformed(e.to_string());
    let len = postcard::experimental::serialized_size(message).map_err(malformed)?;
    if len > WIRE_FRAME_BYTES_MAX {
        return Err(WireError::TooLarge(len, WIRE_FRAME_BYTES_MAX));
    }
    let mut frame = vec![0u8; len + 4];
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    postcard::to_slice(message, &mut frame[4..]).map_err(malformed)?;
    Ok(frame)
}

/// The frame of `Response::Chunks` for chunks of these hashes and stored
/// lengths, each chunk's bytes written in place by `fill(i, bytes)`: the
/// same bytes as [`encode`] makes of the message, but an answer's chunks
/// are read straight into its frame instead of being held twice.
pub fn encode_chunks_with<E: From<WireError>>(
    chunks: &[(ChunkHash, usize)],
    mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    use postcard::experimental::serialized_size;
    let malformed = |e: postcard::Error| WireError::Malformed(e.to_string());
    // Postcard writes a list as its length, then each item: here a chunk's
    // hash and the length of its bytes, then the bytes themselves. The
    // variant's tag is an empty list's encoding without its length (0).
    let empty = postcard::to_stdvec(&Response::Chunks { chunks: Vec::new() }).map_err(malformed)?;
    let tag = &empty[..empty.len() - 1];
    let mut len = tag.len() + serialized_size(&chunks.len()).map_err(malformed)?;
    for &(hash, n) in chunks {
        len += serialized_size(&(hash, n)).map_err(malformed)? + n;
    }
    if len > WIRE_FRAME_BYTES_MAX {
        return Err(WireError::TooLarge(len, WIRE_FRAME_BYTES_MAX).into());
    }
    let mut frame = Vec::with_capacity(len + 4);
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    frame.extend_from_slice(tag);
    frame = postcard::to_extend(&chunks.len(), frame).map_err(malformed)?;
    for (i, &(hash, n)) in chunks.iter().enumerate() {
        frame = postcard::to_extend(&(hash, n), frame).map_err(malformed)?;
        let at = frame.len();
        frame.resize(at + n, 0);
        fill(i, &mut frame[at..])?;
    }
    debug_assert_eq!(frame.len(), len + 4);
    Ok(frame)
}

/// Checks a frame's announced length against `max` before its body is read.
pub fn check_length(prefix: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLarge(len, max));
    }
    Ok(len)
}

/// A frame's body as a message; bytes left over after it make the frame
/// malformed (postcard alone would ignore them).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, WireError> {
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_limits() {
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            device_name: "laptop".into(),
        };
        let frame = encode(&hello).unwrap();
        let len = check_length(frame[..4].try_into().unwrap(), WIRE_FRAME_BYTES_MAX).unwrap();
        assert_eq!(decode::<Request>(&frame[4..4 + len]).unwrap(), hello);
        // Anything after the message makes the frame malformed.
        let mut longer = frame[4..4 + len].to_vec();
        longer.push(0);
        assert!(matches!(
            decode::<Request>(&longer),
            Err(WireError::Malformed(_))
        ));
        assert_eq!(
            check_length(u32::MAX.to_le_bytes(), WIRE_FRAME_BYTES_MAX),
            Err(WireError::TooLarge(u32::MAX as usize, WIRE_FRAME_BYTES_MAX))
        );
    }

    /// A change pushed with its announcement survives the wire, and a
    /// receiver tells a page within the limits a sender keeps from one
    /// beyond them.
    #[test]
    fn pushed_pages_round_trip_and_keep_their_limits() {
        use crate::index::{ChunkRef, FileKind};
        use crate::{RelPath, version::VersionVector};
        let content = b"saved in the IDE\n";
        let hash = ChunkHash::of(content);
        let entry = FileEntry {
            path: RelPath::new("src/main.rs").unwrap(),
            kind: FileKind::File,
            size: content.len() as u64,
            mtime_ns: 1_700_000_000_000_000_000,
            executable: false,
            content_hash: hash,
            chunks: vec![ChunkRef {
                hash,
                len: content.len() as u32,
            }],
            symlink_target: None,
            deleted: false,
            version: VersionVector::new(),
            sequence: 8,
            modified_by: "a device".into(),
        };
        let page = Pushed {
            after: 7,
            entries: vec![entry],
            last_sequence: 8,
            head: 8,
            chunks: vec![(hash, [&[0u8][..], content].concat())],
        };
        assert!(page.within_limits());
        let changed = Request::Changed {
            workspace: WorkspaceId::from_random([3; 16]),
            sequence: 8,
            pushed: Some(Box::new(page.clone())),
        };
        let frame = encode(&changed).unwrap();
        assert_eq!(decode::<Request>(&frame[4..]).unwrap(), changed);

        let beyond = |change: fn(&mut Pushed)| {
            let mut page = page.clone();
            change(&mut page);
            !page.within_limits()
        };
        assert!(beyond(
            |p| p.entries = vec![p.entries[0].clone(); PUSH_ENTRIES_MAX + 1]
        ));
        assert!(beyond(
            |p| p.chunks = vec![p.chunks[0].clone(); CHUNK_REQUEST_MAX + 1]
        ));
        assert!(beyond(|p| p.chunks[0].1 = vec![0; PUSH_BYTES_MAX + 1]));
        assert!(beyond(|p| p.after = p.last_sequence + 1));
        assert!(beyond(|p| p.head = p.last_sequence - 1));
    }

    /// A frame is the length, then exactly postcard's encoding: its size
    /// is computed before it is written, never guessed.
    #[test]
    fn frames_are_sized_exactly() {
        let chunks: Vec<(ChunkHash, Vec<u8>)> = [0usize, 1, 127, 128, 300, 70_000]
            .iter()
            .map(|&n| (ChunkHash::of(&n.to_le_bytes()), vec![n as u8; n]))
            .collect();
        let messages = [
            Response::Chunks { chunks },
            Response::Error {
                message: "é".repeat(200),
            },
            Response::Ack,
        ];
        for message in messages {
            let frame = encode(&message).unwrap();
            let body = postcard::to_stdvec(&message).unwrap();
            assert_eq!(frame[..4], (body.len() as u32).to_le_bytes());
            assert_eq!(frame[4..], body[..]);
        }
    }

    /// An answer laid out from lengths and filled in place is the same
    /// frame as the message encoded whole.
    #[test]
    fn chunks_filled_in_place_match_their_encoding() {
        let chunks: Vec<(ChunkHash, Vec<u8>)> = [0usize, 1, 127, 128, 16_383, 16_384, 70_000]
            .iter()
            .map(|&n| (ChunkHash::of(&n.to_le_bytes()), vec![n as u8; n]))
            .collect();
        for count in [0, 1, chunks.len()] {
            let chunks = chunks[..count].to_vec();
            let layout: Vec<(ChunkHash, usize)> =
                chunks.iter().map(|(h, b)| (*h, b.len())).collect();
            let filled = encode_chunks_with::<WireError>(&layout, |i, out| {
                out.copy_from_slice(&chunks[i].1);
                Ok(())
            })
            .unwrap();
            assert_eq!(filled, encode(&Response::Chunks { chunks }).unwrap());
        }
        let too_many = [(ChunkHash::of(b""), WIRE_FRAME_BYTES_MAX)];
        assert!(matches!(
            encode_chunks_with::<WireError>(&too_many, |_, _| Ok(())),
            Err(WireError::TooLarge(..))
        ));
    }

    /// Byte strings keep postcard's encoding of a byte sequence: peers of
    /// the previous build read them.
    #[test]
    fn chunk_bytes_keep_their_encoding() {
        #[derive(Serialize)]
        enum Old {
            _Hello,
            _Index,
            Chunks { chunks: Vec<(ChunkHash, Vec<u8>)> },
        }
        let chunks = vec![(ChunkHash::of(b"x"), b"stored bytes".to_vec())];
        let old = postcard::to_stdvec(&Old::Chunks {
            chunks: chunks.clone(),
        })
        .unwrap();
        let new = postcard::to_stdvec(&Response::Chunks {
            chunks: chunks.clone(),
        })
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(
            decode::<Response>(&new).unwrap(),
            Response::Chunks { chunks }
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }
    }
}
