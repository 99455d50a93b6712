//! MarieSync's shared vocabulary: ids, paths, version vectors, file index
//! entries, the LSP-framed JSON-RPC codec and the IPC contract.
//!
//! **Architecture Invariant:** this crate does no IO. It reads no clock, opens
//! no file or socket and depends on no async runtime. Everything here is a
//! pure function of its inputs, so the daemon, the client library and tests in
//! memory all share one definition of the contract.

pub mod frame;
pub mod ids;
pub mod index;
pub mod ipc;
pub mod membership;
pub mod path;
pub mod sync;
pub mod ticket;
pub mod version;
pub mod wire;

pub use ids::{CheckpointId, ChunkHash, WorkspaceId};
pub use index::{FileEntry, FileKind};
pub use path::RelPath;
pub use version::{DeviceKey, VersionOrder, VersionVector};
