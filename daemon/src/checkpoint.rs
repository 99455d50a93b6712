//! Checkpoints: a workspace's live index frozen as a manifest, stored as
//! content-defined chunks in the chunk store, so checkpoints share chunks
//! with each other and with the live state.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use mariesync_protocol::{CheckpointId, ChunkHash, FileKind};
use rayon::prelude::*;

use crate::materialize::{self, Expected, Identity, WriteError};
use crate::store::{
    self, CheckpointRecord, EncodedChunk, MANIFEST_CHUNKS, ManifestEntry, Store, StoreError,
};

/// The manifest of the workspace's current index.
pub fn live_manifest(store: &Store, workspace: u32) -> Result<Vec<ManifestEntry>, StoreError> {
    Ok(store
        .files(workspace, None)?
        .iter()
        .filter(|f| !f.entry.deleted)
        .map(|f| ManifestEntry::from_entry(&f.entry))
        .collect())
}

/// Freezes the current index as a checkpoint. If nothing changed since the
/// newest checkpoint, its manifest is shared as is.
pub fn create(
    store: &Store,
    workspace: u32,
    message: String,
    created_ms: u64,
) -> Result<CheckpointRecord, StoreError> {
    // Manifest chunks found in the store are reused: keep them there.
    let _references = store.reference_guard();
    let sequence = store
        .workspace(workspace)?
        .map(|r| r.next_sequence)
        .unwrap_or(0);
    // Unchanged since the newest checkpoint: share its manifest as is.
    let last = store
        .checkpoints(workspace)?
        .pop()
        .filter(|last| last.sequence == sequence);
    let (new_chunks, files, bytes, manifest_hash, manifest) = match last {
        Some(last) => (
            Vec::new(),
            last.files,
            last.bytes,
            last.manifest_hash,
            last.manifest,
        ),
        None => encode_manifest(store, workspace)?,
    };
    store.add_checkpoint(workspace, &new_chunks, |id| CheckpointRecord {
        id,
        created_ms,
        message,
        files,
        bytes,
        sequence,
        manifest_hash,
        manifest,
    })
}

type EncodedManifest = (
    Vec<EncodedChunk>,
    u64,
    u64,
    ChunkHash,
    Vec<mariesync_protocol::index::ChunkRef>,
);

/// The live index as manifest chunks: the ones the store lacks, the file
/// count and bytes, the manifest's hash, and its chunk list.
fn encode_manifest(store: &Store, workspace: u32) -> Result<EncodedManifest, StoreError> {
    let entries = live_manifest(store, workspace)?;
    let files = entries.iter().filter(|e| e.kind == FileKind::File).count() as u64;
    let bytes = entries.iter().map(|e| e.size).sum();
    let encoded = postcard::to_stdvec(&entries).expect("manifests always serialize");
    let manifest_hash = ChunkHash::of(&encoded);
    let reader = store.reader()?;
    let mut manifest = Vec::new();
    let mut new_chunks: Vec<EncodedChunk> = Vec::new();
    for (offset, len) in store::chunk_boundaries(&encoded, MANIFEST_CHUNKS) {
        let data = &encoded[offset..offset + len];
        let hash = ChunkHash::of(data);
        manifest.push(mariesync_protocol::index::ChunkRef {
            hash,
            len: len as u32,
        });
        if !reader.contains(&hash)? && !new_chunks.iter().any(|c| c.hash == hash) {
            new_chunks.push(store::encode_chunk(hash, data));
        }
    }
    Ok((new_chunks, files, bytes, manifest_hash, manifest))
}

pub fn load(
    store: &Store,
    workspace: u32,
    id: CheckpointId,
) -> Result<Option<(CheckpointRecord, Vec<ManifestEntry>)>, StoreError> {
    let Some(record) = store.checkpoint(workspace, id)? else {
        return Ok(None);
    };
    let entries = store::load_manifest(&store.reader()?, &record)?;
    Ok(Some((record, entries)))
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub modified: Vec<String>,
    pub deleted: Vec<String>,
}

/// What changed from `from` to `to`.
pub fn diff(from: &[ManifestEntry], to: &[ManifestEntry]) -> Diff {
    let from: BTreeMap<&str, &ManifestEntry> = from.iter().map(|e| (e.path.as_str(), e)).collect();
    let to: BTreeMap<&str, &ManifestEntry> = to.iter().map(|e| (e.path.as_str(), e)).collect();
    let mut out = Diff::default();
    for (path, new) in &to {
        match from.get(path) {
            None => out.added.push(path.to_string()),
            Some(old) if !same(old, new) => out.modified.push(path.to_string()),
            Some(_) => {}
        }
    }
    for path in from.keys() {
        if !to.contains_key(path) {
            out.deleted.push(path.to_string());
        }
    }
    out
}

fn same(a: &ManifestEntry, b: &ManifestEntry) -> bool {
    a.kind == b.kind
        && a.executable == b.executable
        && a.content_hash == b.content_hash
        && a.symlink_target == b.symlink_target
}

#[derive(Debug, Default)]
pub struct RestoreReport {
    pub written: u64,
    pub deleted: u64,
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error(
        "the checkpoint cannot be restored: {0} of its chunks are corrupt or missing ({1}); nothing was changed"
    )]
    Corrupt(usize, String),
}

/// Makes the workspace at `root` equal to `target`, given the index's view of
/// the current state. Each file is replaced atomically; a file whose content
/// on disk no longer matches the index (the user saved it meanwhile) is left
/// alone and reported.
pub fn restore(
    store: &Store,
    root: &Path,
    current: &[ManifestEntry],
    target: &[ManifestEntry],
) -> Result<RestoreReport, RestoreError> {
    let plan = diff(current, target);
    let target_by_path: BTreeMap<&str, &ManifestEntry> =
        target.iter().map(|e| (e.path.as_str(), e)).collect();
    let current_by_path: BTreeMap<&str, &ManifestEntry> =
        current.iter().map(|e| (e.path.as_str(), e)).collect();

    // Verify every chunk to be written before touching anything.
    let reader = store.reader()?;
    let mut to_write: Vec<&ManifestEntry> = Vec::new();
    let mut chmod_only: Vec<&ManifestEntry> = Vec::new();
    for path in plan.added.iter().chain(&plan.modified) {
        let entry = target_by_path[path.as_str()];
        let content_same = current_by_path.get(path.as_str()).is_some_and(|c| {
            c.kind == entry.kind
                && c.content_hash == entry.content_hash
                && c.symlink_target == entry.symlink_target
        });
        if content_same && entry.kind == FileKind::File {
            chmod_only.push(entry);
        } else {
            to_write.push(entry);
        }
    }
    let mut checked = HashSet::new();
    let mut bad = Vec::new();
    for entry in &to_write {
        for chunk in &entry.chunks {
            if checked.insert(chunk.hash)
                && let Err(e) = reader.read(&chunk.hash, chunk.len)
            {
                bad.push(format!("{}: {e}", entry.path));
            }
        }
    }
    if !bad.is_empty() {
        let first = bad[0].clone();
        return Err(RestoreError::Corrupt(bad.len(), first));
    }

    let mut report = RestoreReport::default();
    let mut touched_dirs: BTreeSet<std::path::PathBuf> = BTreeSet::new();

    // Deletions, deepest first, so directories empty before they go.
    let mut deletions: Vec<&ManifestEntry> = plan
        .deleted
        .iter()
        .map(|p| current_by_path[p.as_str()])
        .collect();
    deletions.sort_by(|a, b| b.path.cmp(&a.path));
    for entry in deletions {
        let Ok(path) = materialize::resolve_inside(root, &entry.path) else {
            continue;
        };
        let result = match entry.kind {
            FileKind::Directory => std::fs::remove_dir(&path),
            _ if !on_disk_matches(&path, entry) => {
                report.errors.push(format!(
                    "{}: changed on disk since it was indexed; kept",
                    entry.path
                ));
                continue;
            }
            _ => std::fs::remove_file(&path),
        };
        match result {
            Ok(()) => report.deleted += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.errors.push(format!("{}: {e}", entry.path)),
        }
        if let Some(parent) = path.parent() {
            touched_dirs.insert(parent.to_path_buf());
        }
    }

    // Directories, shallowest first.
    for entry in target.iter().filter(|e| e.kind == FileKind::Directory) {
        if let Ok(path) = materialize::resolve_inside(root, &entry.path)
            && let Err(e) = std::fs::create_dir_all(&path)
        {
            report.errors.push(format!("{}: {e}", entry.path));
        }
    }

    // Files and links, in parallel: each is fsynced before its rename.
    let results: Vec<Result<(), WriteError>> = to_write
        .par_iter()
        .filter(|e| e.kind != FileKind::Directory)
        .map(|entry| {
            let path = materialize::resolve_inside(root, &entry.path)?;
            let changed = || WriteError::Io {
                path: entry.path.to_string(),
                source: std::io::Error::other("changed on disk since it was indexed; kept"),
            };
            // What the index knows is there may be replaced, if it is still
            // exactly that; where it knows nothing, nothing may be replaced.
            let expected = match current_by_path.get(entry.path.as_str()) {
                Some(current) if current.kind != FileKind::Directory => {
                    let before = Identity::of(&path);
                    if !on_disk_matches(&path, current) {
                        return Err(changed());
                    }
                    match (before, Identity::of(&path)) {
                        (Some(a), Some(b)) if a == b => Expected::Present(a),
                        (None, None) => Expected::Absent,
                        _ => return Err(changed()),
                    }
                }
                _ => Expected::Absent,
            };
            materialize::write_entry(root, entry, &reader, expected)
        })
        .collect();
    for (entry, result) in to_write
        .iter()
        .filter(|e| e.kind != FileKind::Directory)
        .zip(results)
    {
        match result {
            Ok(()) => {
                report.written += 1;
                if let Some(parent) = root.join(entry.path.as_str()).parent() {
                    touched_dirs.insert(parent.to_path_buf());
                }
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    for entry in chmod_only {
        if let Ok(path) = materialize::resolve_inside(root, &entry.path) {
            match materialize::set_executable(&path, entry.executable) {
                Ok(()) => report.written += 1,
                Err(e) => report.errors.push(format!("{}: {e}", entry.path)),
            }
        }
    }
    for dir in touched_dirs {
        materialize::sync_dir(&dir);
    }
    Ok(report)
}

/// True if the file at `path` still has the content the index recorded
/// (checked by size first, then by hash).
pub fn on_disk_matches(path: &Path, entry: &ManifestEntry) -> bool {
    match entry.kind {
        FileKind::Symlink => std::fs::read_link(path)
            .ok()
            .and_then(|t| t.to_str().map(str::to_owned))
            .is_some_and(|t| Some(t) == entry.symlink_target),
        FileKind::File => {
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                return true;
            };
            if !meta.is_file() || meta.len() != entry.size {
                return false;
            }
            let mut hasher = blake3::Hasher::new();
            match std::fs::File::open(path).and_then(|file| hasher.update_reader(file).map(drop)) {
                Ok(()) => ChunkHash::from(hasher.finalize()) == entry.content_hash,
                Err(_) => false,
            }
        }
        FileKind::Directory => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mariesync_protocol::RelPath;

    fn entry(path: &str, content: &str) -> ManifestEntry {
        ManifestEntry {
            path: RelPath::new(path).unwrap(),
            kind: FileKind::File,
            size: content.len() as u64,
            mtime_ns: 0,
            executable: false,
            content_hash: ChunkHash::of(content.as_bytes()),
            chunks: vec![],
            symlink_target: None,
        }
    }

    #[test]
    fn diff_lists_added_modified_deleted() {
        let a = [entry("a", "1"), entry("b", "2"), entry("c", "3")];
        let b = [entry("a", "1"), entry("b", "changed"), entry("d", "4")];
        let d = diff(&a, &b);
        expect_test::expect![[r#"
            Diff {
                added: [
                    "d",
                ],
                modified: [
                    "b",
                ],
                deleted: [
                    "c",
                ],
            }
        "#]]
        .assert_debug_eq(&d);
    }
}
