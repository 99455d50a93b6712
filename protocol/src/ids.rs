//! Identifiers: content hashes of chunks and files, workspace and checkpoint ids.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A blake3 hash. Chunk ids and whole-file content hashes are both this type:
/// a file that fits in one chunk has a content hash equal to its chunk id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(bytes: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    /// A short prefix for humans and logs.
    pub fn short(&self) -> String {
        hex_encode(&self.0[..6])
    }
}

impl From<blake3::Hash> for ChunkHash {
    fn from(hash: blake3::Hash) -> ChunkHash {
        ChunkHash(*hash.as_bytes())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.short())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for ChunkHash {
    type Err = IdError;
    fn from_str(s: &str) -> Result<ChunkHash, IdError> {
        Ok(ChunkHash(hex_decode::<32>(s).ok_or(IdError::ChunkHash)?))
    }
}

/// A workspace's identity, shared by every device that syncs it: 128 random
/// bits, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkspaceId(pub [u8; 16]);

impl WorkspaceId {
    pub fn from_random(bytes: [u8; 16]) -> WorkspaceId {
        WorkspaceId(bytes)
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl fmt::Debug for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkspaceId({self})")
    }
}

impl FromStr for WorkspaceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<WorkspaceId, IdError> {
        Ok(WorkspaceId(hex_decode::<16>(s).ok_or(IdError::Workspace)?))
    }
}

/// A checkpoint's id: a number that grows within its workspace, shown as a
/// decimal string so users can type it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct CheckpointId(pub u64);

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for CheckpointId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<CheckpointId, IdError> {
        s.parse::<u64>()
            .map(CheckpointId)
            .map_err(|_| IdError::Checkpoint)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("not a chunk hash: expected 64 hex digits")]
    ChunkHash,
    #[error("not a workspace id: expected 32 hex digits")]
    Workspace,
    #[error("not a checkpoint id: expected a number")]
    Checkpoint,
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let hash = ChunkHash::of(b"hello");
        assert_eq!(hash.to_hex().parse::<ChunkHash>().unwrap(), hash);
        let ws = WorkspaceId([0xab; 16]);
        assert_eq!(ws.to_string(), "ab".repeat(16));
        assert_eq!(ws.to_string().parse::<WorkspaceId>().unwrap(), ws);
        assert_eq!("zz".parse::<WorkspaceId>(), Err(IdError::Workspace));
        assert_eq!("12".parse::<CheckpointId>().unwrap(), CheckpointId(12));
    }
}
