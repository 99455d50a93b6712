//! Stored records and their encoding (postcard). The stored form is this
//! module's business; the rest of the daemon sees plain structs.

use mariesync_protocol::index::ChunkRef;
use mariesync_protocol::{CheckpointId, ChunkHash, FileEntry, FileKind, RelPath, WorkspaceId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{Result, StoreError};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub id: WorkspaceId,
    pub name: String,
    /// Absolute, canonical root.
    pub path: String,
    pub state: WorkspaceState,
    /// The sequence number the next change gets.
    pub next_sequence: u64,
    pub created_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkspaceState {
    Active,
    /// Not scanned nor changed until the user resumes it.
    Paused {
        reason: String,
    },
}

/// A device this one trusts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub name: String,
    /// Multiaddrs to dial it at, as text.
    pub addrs: Vec<String>,
    pub added_ms: u64,
}

impl PeerRecord {
    pub fn new(name: String, added_ms: u64) -> PeerRecord {
        PeerRecord {
            name,
            addrs: Vec::new(),
            added_ms,
        }
    }

    /// Adds `addr` unless it is known; whether it was new.
    pub fn add_addr(&mut self, addr: String) -> bool {
        let new = !self.addrs.contains(&addr);
        if new {
            self.addrs.push(addr);
        }
        new
    }
}

/// What the scanner saw of a file when it last hashed it. If all of it is
/// unchanged, the file is not read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatCache {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
    pub mode: u32,
}

/// An index entry plus this device's private knowledge about it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexedFile {
    pub entry: FileEntry,
    /// None for tombstones, and for entries that must be re-read next scan
    /// (hashed so soon after a write that a same-timestamp edit could follow).
    pub stat: Option<StatCache>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub id: CheckpointId,
    pub created_ms: u64,
    pub message: String,
    pub files: u64,
    pub bytes: u64,
    /// The workspace's next sequence number when it was taken: if it has not
    /// moved since, the live state is still this checkpoint.
    pub sequence: u64,
    pub manifest_hash: ChunkHash,
    pub manifest: Vec<ChunkRef>,
}

/// One live path in a checkpoint manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: RelPath,
    pub kind: FileKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub executable: bool,
    pub content_hash: ChunkHash,
    pub chunks: Vec<ChunkRef>,
    pub symlink_target: Option<String>,
}

impl ManifestEntry {
    pub fn from_entry(entry: &FileEntry) -> ManifestEntry {
        ManifestEntry {
            path: entry.path.clone(),
            kind: entry.kind,
            size: entry.size,
            mtime_ns: entry.mtime_ns,
            executable: entry.executable,
            content_hash: entry.content_hash,
            chunks: entry.chunks.clone(),
            symlink_target: entry.symlink_target.clone(),
        }
    }

    /// Same content and synced metadata as a live entry.
    pub fn matches(&self, entry: &FileEntry) -> bool {
        !entry.deleted
            && self.kind == entry.kind
            && self.executable == entry.executable
            && self.content_hash == entry.content_hash
            && self.symlink_target == entry.symlink_target
    }
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("in-memory records always serialize")
}

pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Record(e.to_string()))
}
