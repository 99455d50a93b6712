//! The scanner: walks a workspace (or some paths of it), finds what changed
//! since the index last saw it, and commits new content and index entries.
//!
//! A file is read only if its stat (size, mtime, ctime, inode, mode) differs
//! from what the index cached; ctime catches an edit that kept the size and
//! set an older mtime. A file hashed within [`RACY_WINDOW_NS`] of its last
//! write keeps no stat cache, so a second write in the same timestamp tick is
//! still seen on the next scan (git's "racily clean" entries).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mariesync_protocol::index::ChunkRef;
use mariesync_protocol::{ChunkHash, DeviceKey, FileEntry, FileKind, RelPath, VersionVector};
use rayon::prelude::*;

use crate::store::{
    self, Batch, CONTENT_CHUNKS, ChunkReader, EncodedChunk, IndexedFile, StatCache, Store,
    StoreError,
};

/// Names that are never part of a workspace, wherever they are.
pub const VCS_DIRS: [&str; 3] = [".git", ".hg", ".svn"];
/// Prefix of the daemon's temporary files inside workspaces.
pub const TEMP_PREFIX: &str = ".mariesync-tmp-";
pub const IGNORE_FILE: &str = ".mariesyncignore";

/// A file written this recently may be written again within the same
/// timestamp tick without its stat changing: don't trust its stat next time.
const RACY_WINDOW_NS: i64 = 2_000_000_000;
/// Files above this size are chunked as a stream instead of read whole.
const WHOLE_READ_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// One commit holds at most this many entries or this many new chunk bytes.
const BATCH_ENTRIES_MAX: usize = 4096;
const BATCH_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Skipped or clashing names listed in status at most.
const LISTED_NAMES_MAX: usize = 100;

#[derive(Debug, Clone)]
pub enum Scope {
    Full,
    Paths(Vec<RelPath>),
}

/// Counters a scan updates as it goes, read by `status`.
#[derive(Default)]
pub struct ScanProgress {
    pub files_to_hash: AtomicU64,
    pub files_hashed: AtomicU64,
    pub bytes_to_hash: AtomicU64,
    pub bytes_hashed: AtomicU64,
}

impl ScanProgress {
    fn reset(&self) {
        for counter in [
            &self.files_to_hash,
            &self.files_hashed,
            &self.bytes_to_hash,
            &self.bytes_hashed,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

pub struct Scanner<'a> {
    pub store: &'a Store,
    pub workspace: u32,
    pub root: &'a Path,
    pub device: DeviceKey,
    pub progress: &'a ScanProgress,
    pub cancel: &'a AtomicBool,
    /// Allow committing the deletion of everything (the user resumed an
    /// emptied workspace).
    pub allow_empty: bool,
    /// Remove leftover temporary files of the daemon (at startup, when no
    /// write into the workspace can be in flight).
    pub clean_temp_files: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Modified => "modified",
            Change::Deleted => "deleted",
        }
    }
}

#[derive(Debug, Default)]
pub struct ScanReport {
    pub changes: Vec<(RelPath, Change)>,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// Names that cannot be synced (not UTF-8, or not portable).
    pub skipped: Vec<String>,
    /// Pairs of paths that differ only in case. `None` for partial scans.
    pub case_clashes: Option<Vec<(String, String)>>,
    /// Files that changed while being read; scanned again later.
    pub unstable: Vec<RelPath>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("workspace root {0} is missing or unreadable")]
    RootMissing(PathBuf),
    #[error(
        "workspace root is empty but {0} indexed entries were there; paused instead of deleting them (run `mariesync workspace resume` if this is intended)"
    )]
    Emptied(usize),
    #[error("scan cancelled")]
    Cancelled,
}

/// What the walk saw at one path.
struct Seen {
    path: RelPath,
    kind: FileKind,
    stat: StatCache,
}

impl Scanner<'_> {
    pub fn run(&self, scope: &Scope) -> Result<ScanReport, ScanError> {
        self.progress.reset();
        let root_meta = std::fs::metadata(self.root)
            .map_err(|_| ScanError::RootMissing(self.root.to_path_buf()))?;
        if !root_meta.is_dir() {
            return Err(ScanError::RootMissing(self.root.to_path_buf()));
        }
        let mut report = ScanReport::default();
        let seen = self.walk(scope, &mut report.skipped);

        let mut indexed: HashMap<String, IndexedFile> = HashMap::new();
        match scope {
            Scope::Full => {
                for file in self.store.files(self.workspace, None)? {
                    indexed.insert(file.entry.path.as_str().to_owned(), file);
                }
            }
            Scope::Paths(paths) => {
                for path in paths {
                    for file in self.store.files(self.workspace, Some(path))? {
                        indexed.insert(file.entry.path.as_str().to_owned(), file);
                    }
                }
            }
        }
        // An emptied root (an unmounted disk, a wrong path) must not become
        // a mass deletion, whether a full scan or a watcher batch sees it.
        let live_before = indexed.values().filter(|f| !f.entry.deleted).count();
        if live_before > 0 && !self.allow_empty && root_is_empty(self.root) {
            return Err(ScanError::Emptied(live_before));
        }
        if matches!(scope, Scope::Full) {
            report.case_clashes = Some(case_clashes(&seen));
        }

        let mut next_sequence = self
            .store
            .workspace(self.workspace)?
            .map(|r| r.next_sequence)
            .ok_or_else(|| StoreError::Record("workspace vanished".into()))?;
        let now_ns = now_ns();
        let mut batch = Batch::default();
        let mut to_hash = Vec::new();
        let seen_paths: HashSet<&str> = seen.iter().map(|s| s.path.as_str()).collect();

        for item in &seen {
            let old = indexed.get(item.path.as_str());
            match item.kind {
                FileKind::File => {
                    let unchanged = old.is_some_and(|o| {
                        !o.entry.deleted
                            && o.entry.kind == FileKind::File
                            && o.stat == Some(item.stat)
                    });
                    if !unchanged {
                        to_hash.push(item);
                    }
                }
                FileKind::Directory => {
                    let unchanged = old
                        .is_some_and(|o| !o.entry.deleted && o.entry.kind == FileKind::Directory);
                    if !unchanged {
                        let entry = new_entry(item, ChunkHash::of(b""), Vec::new(), None);
                        self.push_change(
                            &mut batch,
                            &mut report,
                            old,
                            entry,
                            Some(item.stat),
                            &mut next_sequence,
                        );
                    }
                }
                FileKind::Symlink => {
                    let Ok(target) = std::fs::read_link(self.root.join(item.path.as_str())) else {
                        continue;
                    };
                    let Some(target) = target.to_str().map(str::to_owned) else {
                        push_limited(
                            &mut report.skipped,
                            format!("{} (link target is not UTF-8)", item.path),
                        );
                        continue;
                    };
                    let unchanged = old.is_some_and(|o| {
                        !o.entry.deleted
                            && o.entry.symlink_target.as_deref() == Some(target.as_str())
                    });
                    if !unchanged {
                        let hash = ChunkHash::of(target.as_bytes());
                        let entry = new_entry(item, hash, Vec::new(), Some(target));
                        self.push_change(
                            &mut batch,
                            &mut report,
                            old,
                            entry,
                            Some(item.stat),
                            &mut next_sequence,
                        );
                    }
                }
            }
        }

        // Deletions: indexed, live, in scope, and not seen by the walk.
        let mut gone: Vec<&IndexedFile> = indexed
            .values()
            .filter(|f| !f.entry.deleted && !seen_paths.contains(f.entry.path.as_str()))
            .collect();
        gone.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
        for old in gone {
            match std::fs::symlink_metadata(self.root.join(old.entry.path.as_str())) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.kind() == std::io::ErrorKind::NotADirectory =>
                {
                    let mut entry = old.entry.clone();
                    entry.deleted = true;
                    entry.size = 0;
                    entry.chunks.clear();
                    entry.content_hash = ChunkHash::of(b"");
                    entry.symlink_target = None;
                    self.push_change(
                        &mut batch,
                        &mut report,
                        Some(old),
                        entry,
                        None,
                        &mut next_sequence,
                    );
                }
                // Still there but no longer walked: ignored now. Forget it
                // locally; an ignored file is never deleted elsewhere.
                _ => batch.forget.push(old.entry.path.clone()),
            }
        }
        self.commit(&mut batch, next_sequence)?;

        // Contents, in parallel, committed in bounded batches.
        let total_bytes: u64 = to_hash.iter().map(|s| s.stat.size).sum();
        self.progress
            .files_to_hash
            .store(to_hash.len() as u64, Ordering::Relaxed);
        self.progress
            .bytes_to_hash
            .store(total_bytes, Ordering::Relaxed);
        let mut start = 0;
        while start < to_hash.len() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(ScanError::Cancelled);
            }
            let mut end = start;
            let mut bytes = 0;
            while end < to_hash.len() && end - start < BATCH_ENTRIES_MAX && bytes < BATCH_BYTES_MAX
            {
                bytes += to_hash[end].stat.size;
                end += 1;
            }
            let reader = self.store.reader()?;
            let results: Vec<_> = to_hash[start..end]
                .par_iter()
                .map(|item| {
                    let result = ingest_file(&self.root.join(item.path.as_str()), &reader);
                    self.progress.files_hashed.fetch_add(1, Ordering::Relaxed);
                    self.progress
                        .bytes_hashed
                        .fetch_add(item.stat.size, Ordering::Relaxed);
                    (item, result)
                })
                .collect();
            drop(reader);
            let mut new_chunks: HashSet<ChunkHash> = HashSet::new();
            for (item, result) in results {
                let old = indexed.get(item.path.as_str());
                match result {
                    Ok(ingested) => {
                        report.hashed_files += 1;
                        report.hashed_bytes += ingested.stat.size;
                        for chunk in ingested.chunks_new {
                            if new_chunks.insert(chunk.hash) {
                                batch.chunks.push(chunk);
                            }
                        }
                        let racy = now_ns - ingested.stat.mtime_ns < RACY_WINDOW_NS
                            || now_ns - ingested.stat.ctime_ns < RACY_WINDOW_NS;
                        let stat = (!racy).then_some(ingested.stat);
                        let seen_now = Seen {
                            path: item.path.clone(),
                            kind: FileKind::File,
                            stat: ingested.stat,
                        };
                        let entry =
                            new_entry(&seen_now, ingested.content_hash, ingested.chunks, None);
                        self.push_change(
                            &mut batch,
                            &mut report,
                            old,
                            entry,
                            stat,
                            &mut next_sequence,
                        );
                    }
                    Err(IngestError::Unstable) => report.unstable.push(item.path.clone()),
                    Err(IngestError::Gone) => {}
                    Err(IngestError::Io(e)) => {
                        tracing::warn!(path = %item.path, "cannot read file: {e}");
                        push_limited(&mut report.skipped, format!("{} ({e})", item.path));
                    }
                    Err(IngestError::Store(e)) => return Err(e.into()),
                }
            }
            self.commit(&mut batch, next_sequence)?;
            start = end;
        }
        Ok(report)
    }

    /// Records `entry` as the new state of its path unless nothing that
    /// sync carries changed, in which case only the stat cache is refreshed.
    fn push_change(
        &self,
        batch: &mut Batch,
        report: &mut ScanReport,
        old: Option<&IndexedFile>,
        mut entry: FileEntry,
        stat: Option<StatCache>,
        next_sequence: &mut u64,
    ) {
        let change = match old {
            Some(old) if old.entry.same_content(&entry) => {
                if old.stat != stat {
                    batch.upserts.push(IndexedFile {
                        entry: old.entry.clone(),
                        stat,
                    });
                }
                return;
            }
            Some(old) if !old.entry.deleted && !entry.deleted => Change::Modified,
            Some(old) if !old.entry.deleted => Change::Deleted,
            _ => Change::Added,
        };
        let mut version = old.map(|o| o.entry.version.clone()).unwrap_or_default();
        version.bump(self.device);
        entry.version = version;
        entry.sequence = *next_sequence;
        *next_sequence += 1;
        report.changes.push((entry.path.clone(), change));
        batch.upserts.push(IndexedFile { entry, stat });
    }

    fn commit(&self, batch: &mut Batch, next_sequence: u64) -> Result<(), StoreError> {
        if batch.upserts.is_empty() && batch.forget.is_empty() && batch.chunks.is_empty() {
            return Ok(());
        }
        self.store
            .commit_batch(self.workspace, batch, next_sequence)?;
        *batch = Batch::default();
        Ok(())
    }

    fn walk(&self, scope: &Scope, skipped: &mut Vec<String>) -> Vec<Seen> {
        let root = self.root.to_path_buf();
        // For partial scans: the targets, and every ancestor of a target
        // (walked through, so their ignore files apply, but not scanned).
        let (targets, ancestors): (HashSet<String>, HashSet<String>) = match scope {
            Scope::Full => Default::default(),
            Scope::Paths(paths) => {
                let targets: HashSet<String> =
                    paths.iter().map(|p| p.as_str().to_owned()).collect();
                let mut ancestors = HashSet::new();
                for path in paths {
                    let mut current = path.parent();
                    while let Some(p) = current {
                        current = p.parent();
                        ancestors.insert(p.as_str().to_owned());
                    }
                }
                (targets, ancestors)
            }
        };
        let partial = matches!(scope, Scope::Paths(_));
        let in_scope = move |rel: &str| -> bool {
            if !partial || targets.contains(rel) {
                return true;
            }
            let mut prefix = rel;
            while let Some(i) = prefix.rfind('/') {
                prefix = &prefix[..i];
                if targets.contains(prefix) {
                    return true;
                }
            }
            false
        };
        let in_scope = std::sync::Arc::new(in_scope);
        let ancestors = std::sync::Arc::new(ancestors);

        let temp_files = std::sync::Arc::new(Mutex::new(Vec::<PathBuf>::new()));
        let mut builder = ignore::WalkBuilder::new(&root);
        builder
            .hidden(false)
            .parents(false)
            .ignore(false)
            .git_ignore(true)
            .git_global(false)
            .git_exclude(false)
            .require_git(false)
            .follow_links(false)
            .add_custom_ignore_filename(IGNORE_FILE)
            .threads(2);
        {
            let root = root.clone();
            let in_scope = in_scope.clone();
            let ancestors = ancestors.clone();
            let temp_files = temp_files.clone();
            builder.filter_entry(move |entry| {
                let name = entry.file_name().to_string_lossy();
                if VCS_DIRS.contains(&name.as_ref()) {
                    return false;
                }
                if name.starts_with(TEMP_PREFIX) {
                    temp_files
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(entry.path().to_path_buf());
                    return false;
                }
                if !partial || entry.depth() == 0 {
                    return true;
                }
                match entry.path().strip_prefix(&root).ok().and_then(Path::to_str) {
                    Some(rel) => in_scope(rel) || ancestors.contains(rel),
                    None => true,
                }
            });
        }
        let out = Mutex::new(Vec::new());
        let skipped_shared = Mutex::new(Vec::new());
        builder.build_parallel().run(|| {
            let root = &root;
            let out = &out;
            let skipped_shared = &skipped_shared;
            let in_scope = in_scope.clone();
            Box::new(move |result| {
                let Ok(entry) = result else {
                    return ignore::WalkState::Continue;
                };
                if entry.depth() == 0 {
                    return ignore::WalkState::Continue;
                }
                let Ok(relative) = entry.path().strip_prefix(root) else {
                    return ignore::WalkState::Continue;
                };
                let Some(rel) = relative
                    .to_str()
                    .map(|s| s.replace(std::path::MAIN_SEPARATOR, "/"))
                else {
                    push_limited(
                        &mut skipped_shared.lock().unwrap(),
                        format!("{} (name is not UTF-8)", relative.display()),
                    );
                    return ignore::WalkState::Continue;
                };
                if !in_scope(&rel) {
                    return ignore::WalkState::Continue;
                }
                let path = match RelPath::new(rel.clone()) {
                    Ok(p) => p,
                    Err(e) => {
                        push_limited(&mut skipped_shared.lock().unwrap(), format!("{rel} ({e})"));
                        return ignore::WalkState::Continue;
                    }
                };
                let Ok(meta) = entry.metadata() else {
                    return ignore::WalkState::Continue;
                };
                let kind = if meta.file_type().is_symlink() {
                    FileKind::Symlink
                } else if meta.is_dir() {
                    FileKind::Directory
                } else if meta.is_file() {
                    FileKind::File
                } else {
                    // Sockets, FIFOs and devices are not content.
                    return ignore::WalkState::Continue;
                };
                out.lock().unwrap().push(Seen {
                    path,
                    kind,
                    stat: stat_of(&meta),
                });
                ignore::WalkState::Continue
            })
        });
        skipped.extend(skipped_shared.into_inner().unwrap_or_default());
        if self.clean_temp_files {
            for temp in temp_files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
            {
                match std::fs::remove_file(&temp) {
                    Ok(()) => tracing::info!("removed leftover temporary file {}", temp.display()),
                    Err(e) => tracing::warn!(
                        "cannot remove leftover temporary file {}: {e}",
                        temp.display()
                    ),
                }
            }
        }
        let mut seen = out.into_inner().unwrap_or_default();
        seen.sort_by(|a, b| a.path.cmp(&b.path));
        seen
    }
}

/// True if the root holds nothing but what is never synced.
fn root_is_empty(root: &Path) -> bool {
    match std::fs::read_dir(root) {
        Ok(entries) => entries.flatten().all(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            VCS_DIRS.contains(&name.as_ref()) || name.starts_with(TEMP_PREFIX)
        }),
        Err(_) => true,
    }
}

fn new_entry(
    seen: &Seen,
    content_hash: ChunkHash,
    chunks: Vec<ChunkRef>,
    symlink_target: Option<String>,
) -> FileEntry {
    FileEntry {
        path: seen.path.clone(),
        kind: seen.kind,
        size: if seen.kind == FileKind::File {
            seen.stat.size
        } else {
            0
        },
        mtime_ns: if seen.kind == FileKind::Directory {
            0
        } else {
            seen.stat.mtime_ns
        },
        executable: seen.kind == FileKind::File && seen.stat.mode & 0o111 != 0,
        content_hash,
        chunks,
        symlink_target,
        deleted: false,
        version: VersionVector::new(),
        sequence: 0,
    }
}

fn case_clashes(seen: &[Seen]) -> Vec<(String, String)> {
    let mut by_key: HashMap<String, &str> = HashMap::new();
    let mut clashes = Vec::new();
    for item in seen {
        if let Some(other) = by_key.insert(item.path.case_fold_key(), item.path.as_str())
            && clashes.len() < LISTED_NAMES_MAX
        {
            clashes.push((other.to_owned(), item.path.as_str().to_owned()));
        }
    }
    clashes
}

fn push_limited(list: &mut Vec<String>, item: String) {
    if list.len() < LISTED_NAMES_MAX {
        list.push(item);
    }
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(unix)]
pub fn stat_of(meta: &std::fs::Metadata) -> StatCache {
    use std::os::unix::fs::MetadataExt;
    StatCache {
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        inode: meta.ino(),
        mode: meta.mode(),
    }
}

#[cfg(not(unix))]
pub fn stat_of(meta: &std::fs::Metadata) -> StatCache {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    StatCache {
        size: meta.len(),
        mtime_ns,
        ctime_ns: 0,
        inode: 0,
        mode: if meta.permissions().readonly() {
            0o444
        } else {
            0o644
        },
    }
}

#[derive(Debug)]
pub enum IngestError {
    /// The file changed while it was read.
    Unstable,
    /// The file vanished or stopped being a regular file.
    Gone,
    Io(std::io::Error),
    Store(StoreError),
}

pub struct Ingested {
    pub stat: StatCache,
    pub content_hash: ChunkHash,
    pub chunks: Vec<ChunkRef>,
    /// Chunks the store does not have yet, compressed.
    pub chunks_new: Vec<EncodedChunk>,
}

/// Reads, chunks, hashes and (for new chunks) compresses one file.
pub fn ingest_file(path: &Path, reader: &ChunkReader) -> Result<Ingested, IngestError> {
    const ATTEMPTS: usize = 3;
    for _ in 0..ATTEMPTS {
        let mut file = match open_nofollow(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(IngestError::Gone),
            Err(e) => return Err(IngestError::Io(e)),
        };
        let before = file.metadata().map_err(IngestError::Io)?;
        if !before.is_file() {
            return Err(IngestError::Gone);
        }
        let stat = stat_of(&before);
        let mut hasher = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let mut chunks_new = Vec::new();
        let mut add_chunk = |data: &[u8]| -> Result<(), IngestError> {
            hasher.update(data);
            let hash = ChunkHash::of(data);
            chunks.push(ChunkRef {
                hash,
                len: data.len() as u32,
            });
            if !reader.contains(&hash).map_err(IngestError::Store)?
                && !chunks_new.iter().any(|c: &EncodedChunk| c.hash == hash)
            {
                chunks_new.push(store::encode_chunk(hash, data));
            }
            Ok(())
        };
        if stat.size <= WHOLE_READ_BYTES_MAX {
            let mut data = Vec::with_capacity(stat.size as usize);
            file.read_to_end(&mut data).map_err(IngestError::Io)?;
            for (offset, len) in store::chunk_boundaries(&data, CONTENT_CHUNKS) {
                add_chunk(&data[offset..offset + len])?;
            }
        } else {
            let stream = fastcdc::v2020::StreamCDC::new(
                &mut file,
                CONTENT_CHUNKS.min as usize,
                CONTENT_CHUNKS.avg as usize,
                CONTENT_CHUNKS.max as usize,
            );
            for chunk in stream {
                let chunk =
                    chunk.map_err(|e| IngestError::Io(std::io::Error::other(e.to_string())))?;
                add_chunk(&chunk.data)?;
            }
        }
        let after = file.metadata().map_err(IngestError::Io)?;
        let length: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        if stat_of(&after) != stat || length != stat.size {
            continue;
        }
        let content_hash = if chunks.len() == 1 {
            chunks[0].hash
        } else {
            ChunkHash::from(hasher.finalize())
        };
        return Ok(Ingested {
            stat,
            content_hash,
            chunks,
            chunks_new,
        });
    }
    Err(IngestError::Unstable)
}

#[cfg(unix)]
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(not(unix))]
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    File::open(path)
}
