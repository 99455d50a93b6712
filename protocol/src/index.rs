//! Entries of a workspace's file index: what a device knows about one path.
//!
//! These records are deliberately `Serialize`: they are the stored form of the
//! index and of checkpoint manifests (postcard, in the daemon's store), and
//! will be the payload of index exchange between peers.

use serde::{Deserialize, Serialize};

use crate::{ChunkHash, RelPath, VersionVector};

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Directory => "dir",
            FileKind::Symlink => "symlink",
        }
    }
}

/// One chunk of a file's content, in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: ChunkHash,
    pub len: u32,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: RelPath,
    pub kind: FileKind,
    /// Content length for files, 0 otherwise.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub executable: bool,
    /// blake3 of the whole content (files) or of the link target (symlinks).
    pub content_hash: ChunkHash,
    /// The content as chunks in order; empty for directories, symlinks and
    /// empty files.
    pub chunks: Vec<ChunkRef>,
    /// Symlink target, as stored in the link.
    pub symlink_target: Option<String>,
    /// True when this entry records a deletion (a tombstone).
    pub deleted: bool,
    pub version: VersionVector,
    /// The workspace's sequence number at the last change of this entry.
    pub sequence: u64,
    /// The device ID of the device that made this version.
    pub modified_by: String,
}

impl FileEntry {
    /// True if the two entries describe the same content and metadata that
    /// sync carries (path, kind, exec bit, content), whatever their versions.
    pub fn same_content(&self, other: &FileEntry) -> bool {
        self.kind == other.kind
            && self.deleted == other.deleted
            && self.executable == other.executable
            && self.content_hash == other.content_hash
            && self.symlink_target == other.symlink_target
    }
}
