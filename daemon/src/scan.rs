//! The scanner: walks a workspace (or some paths of it), finds what changed
//! since the index last saw it, and commits new content and index entries.
//!
//! A file is read only if its stat (size, mtime, ctime, inode, mode) differs
//! from what the index cached; ctime catches an edit that kept the size and
//! set an older mtime. A file hashed within [`RACY_WINDOW_NS`] of its last
//! write keeps no stat cache, so a second write in the same timestamp tick is
//! still seen on the next scan (git's "racily clean" entries), unless its
//! ctime has moved past its mtime (see [`stat_is_settled`]).

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
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;
/// Longer than a file system's ctime tick where ctime is kept (a jiffy on
/// Linux, at most 10 ms; 15.6 ms on Windows).
const CTIME_TICK_NS: i64 = 100_000_000;
/// Files above this size are chunked as a stream instead of read whole.
const WHOLE_READ_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// One commit holds at most this many entries or this many new chunk bytes.
const BATCH_ENTRIES_MAX: usize = 4096;
const BATCH_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// A partial scan of at most this many paths walks on the caller's thread.
const SERIAL_WALK_PATHS: usize = 64;
/// A scan of at most this many files and bytes to hash runs on the
/// caller's thread with one durable commit.
const SMALL_SCAN_FILES: usize = 16;
const SMALL_SCAN_BYTES: u64 = 1024 * 1024;
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
    /// This device's ID, recorded as the maker of each new version.
    pub device_id: &'a str,
    pub progress: &'a ScanProgress,
    pub cancel: &'a AtomicBool,
    /// Allow committing the deletion of everything (the user resumed an
    /// emptied workspace).
    pub allow_empty: bool,
    /// Remove leftover temporary files of the daemon (at startup, when no
    /// write into the workspace can be in flight).
    pub clean_temp_files: bool,
    /// Called after an intermediate commit of a long scan made the entries
    /// so far durable (peers may pull them while the scan goes on).
    pub on_durable: &'a (dyn Fn() + Sync),
}

/// A long scan makes its entries durable (and servable to peers) at least
/// this often, instead of only at its end.
const DURABLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

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
    /// Entries forgotten because they are ignored now (not changes: an
    /// ignored file is never deleted elsewhere, but counts move).
    pub forgotten: u64,
    /// Committed without durability (a small scan): peers may be told
    /// now, and [`crate::store::Store::make_durable`] is due before anyone
    /// is answered; how far entries were servable after the commit.
    pub durability_due: Option<u64>,
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
#[derive(Debug, PartialEq, Eq)]
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
        // From the first "the store has this chunk" decision to the last
        // commit, no chunk may be deleted.
        let _references = self.store.reference_guard();
        let started = std::time::Instant::now();
        let (seen, unreadable) = self.walk(scope, &mut report.skipped);
        let walk_us = started.elapsed().as_micros() as u64;

        // The index in scope, in path order: the same byte order as `seen`,
        // so the two are compared by a merge, without hashing 100k paths.
        let indexed: Vec<IndexedFile> = match scope {
            Scope::Full => self.store.files(self.workspace, None)?,
            Scope::Paths(paths) => {
                let mut files = Vec::new();
                for path in paths {
                    files.extend(self.store.files(self.workspace, Some(path))?);
                }
                files.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
                files.dedup_by(|a, b| a.entry.path == b.entry.path);
                files
            }
        };
        // An emptied root (an unmounted disk, a wrong path) must not become
        // a mass deletion, whether a full scan or a watcher batch sees it.
        let live_before = indexed.iter().filter(|f| !f.entry.deleted).count();
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
        let mut batch = Batch::default();
        let mut to_hash: Vec<(&Seen, Option<&IndexedFile>)> = Vec::new();
        // Live entries the walk did not see.
        let mut gone: Vec<&IndexedFile> = Vec::new();
        let mut cursor = 0;

        for item in &seen {
            while cursor < indexed.len() && indexed[cursor].entry.path < item.path {
                if !indexed[cursor].entry.deleted {
                    gone.push(&indexed[cursor]);
                }
                cursor += 1;
            }
            let old = match indexed.get(cursor) {
                Some(file) if file.entry.path == item.path => {
                    cursor += 1;
                    Some(file)
                }
                _ => None,
            };
            match item.kind {
                FileKind::File => {
                    let unchanged = old.is_some_and(|o| {
                        !o.entry.deleted
                            && o.entry.kind == FileKind::File
                            && o.stat == Some(item.stat)
                    });
                    if !unchanged {
                        to_hash.push((item, old));
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
                    if link_escapes(&item.path, &target) {
                        push_limited(
                            &mut report.skipped,
                            format!("{} (link points outside the workspace)", item.path),
                        );
                        continue;
                    }
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

        gone.extend(indexed[cursor..].iter().filter(|f| !f.entry.deleted));
        // Deletions: indexed, live, in scope, and not seen by the walk.
        for old in gone {
            // Under a directory the walk could not read: unknown, not gone.
            if unreadable.iter().any(|dir| old.entry.path.starts_with(dir)) {
                continue;
            }
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
                // locally; an ignored file is never deleted elsewhere. The
                // sequence moves so checkpoints see the index changed.
                _ => {
                    batch.forget.push(old.entry.path.clone());
                    report.forgotten += 1;
                    next_sequence += 1;
                }
            }
        }
        // Contents: hashed and compressed in parallel, batch by batch, while
        // a committer thread writes the previous batch. Intermediate commits
        // are durable only every `DURABLE_INTERVAL` (so that peers can pull
        // a long scan's first entries while it goes on); the last one is,
        // which makes them all so. A crash before it loses nothing that was
        // acknowledged: the next scan finds the same changes again.
        let total_bytes: u64 = to_hash.iter().map(|(s, _)| s.stat.size).sum();
        self.progress
            .files_to_hash
            .store(to_hash.len() as u64, Ordering::Relaxed);
        self.progress
            .bytes_to_hash
            .store(total_bytes, Ordering::Relaxed);
        // A few small files (a save, the IDE's hint) are hashed on this
        // thread and committed once, without durability: no committer
        // thread, no rayon hand-off. Peers may pull them at once (within
        // the store's lease) while the caller makes them durable.
        if to_hash.len() <= SMALL_SCAN_FILES && total_bytes <= SMALL_SCAN_BYTES {
            let mut batches: Vec<(Batch, u64)> = Vec::new();
            self.hash_all(
                &to_hash,
                &mut report,
                batch,
                &mut next_sequence,
                &mut |batch, next| {
                    batches.push((batch, next));
                    true
                },
            )?;
            let hashed_us = started.elapsed().as_micros() as u64;
            for (batch, next) in batches {
                let servable = self
                    .store
                    .commit_batch(self.workspace, &batch, next, false)?;
                report.durability_due = Some(servable);
            }
            tracing::debug!(
                seen = seen.len(),
                walk_us,
                hashed_us,
                committed_us = started.elapsed().as_micros() as u64,
                "small scan"
            );
            return Ok(report);
        }
        let outcome = std::thread::scope(|scope| -> Result<bool, ScanError> {
            let (sender, receiver) = std::sync::mpsc::sync_channel::<(Batch, u64)>(1);
            let committer = scope.spawn(move || -> Result<(), StoreError> {
                // The first batch is durable at once: peers start pulling
                // while the rest is hashed, not half a second later.
                let mut last_durable: Option<std::time::Instant> = None;
                for (batch, next) in receiver {
                    let durable = last_durable.is_none_or(|t| t.elapsed() >= DURABLE_INTERVAL);
                    self.store
                        .commit_batch(self.workspace, &batch, next, durable)?;
                    if durable {
                        last_durable = Some(std::time::Instant::now());
                        (self.on_durable)();
                    }
                }
                Ok(())
            });
            let hashed = self.hash_all(
                &to_hash,
                &mut report,
                batch,
                &mut next_sequence,
                &mut |batch, next| sender.send((batch, next)).is_ok(),
            );
            drop(sender);
            let committed = committer.join().expect("the committer thread panicked");
            let sent = hashed?;
            committed?;
            Ok(sent)
        });
        if outcome? {
            self.store
                .commit_batch(self.workspace, &Batch::default(), next_sequence, true)?;
        }
        Ok(report)
    }

    /// Hashes `to_hash` in bounded parallel batches and hands each batch
    /// (starting with `batch`, which holds the entries decided so far) to
    /// `commit`, which answers false once the committer stopped.
    fn hash_all<'a>(
        &self,
        to_hash: &[(&'a Seen, Option<&'a IndexedFile>)],
        report: &mut ScanReport,
        mut batch: Batch,
        next_sequence: &mut u64,
        commit: &mut dyn FnMut(Batch, u64) -> bool,
    ) -> Result<bool, ScanError> {
        let now_ns = now_ns();
        let mut start = 0;
        let mut sent = false;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(ScanError::Cancelled);
            }
            let mut end = start;
            let mut bytes = 0;
            // At least one file per thread, so large files are hashed side
            // by side instead of one at a time.
            let at_least = rayon::current_num_threads();
            while end < to_hash.len()
                && end - start < BATCH_ENTRIES_MAX
                && (bytes < BATCH_BYTES_MAX || end - start < at_least)
            {
                bytes += to_hash[end].0.stat.size;
                end += 1;
            }
            let reader = self.store.reader()?;
            let ingest = |&(item, old): &(&'a Seen, Option<&'a IndexedFile>)| {
                let spill = |chunks: &[EncodedChunk]| self.store.commit_chunks(chunks);
                let result = ingest_file(&self.root.join(item.path.as_str()), &reader, &spill);
                self.progress.files_hashed.fetch_add(1, Ordering::Relaxed);
                self.progress
                    .bytes_hashed
                    .fetch_add(item.stat.size, Ordering::Relaxed);
                (item, old, result)
            };
            let results: Vec<_> = if end - start == 1 {
                to_hash[start..end].iter().map(ingest).collect()
            } else {
                to_hash[start..end].par_iter().map(ingest).collect()
            };
            drop(reader);
            let mut new_chunks: HashSet<ChunkHash> = HashSet::new();
            for (item, old, result) in results {
                match result {
                    Ok(ingested) => {
                        report.hashed_files += 1;
                        report.hashed_bytes += ingested.stat.size;
                        for chunk in ingested.chunks_new {
                            if new_chunks.insert(chunk.hash) {
                                batch.chunks.push(chunk);
                            }
                        }
                        let stat = stat_is_settled(&ingested.stat, now_ns, CTIME_TICK_NS)
                            .then_some(ingested.stat);
                        let seen_now = Seen {
                            path: item.path.clone(),
                            kind: FileKind::File,
                            stat: ingested.stat,
                        };
                        let entry =
                            new_entry(&seen_now, ingested.content_hash, ingested.chunks, None);
                        self.push_change(&mut batch, report, old, entry, stat, next_sequence);
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
            if !batch.upserts.is_empty() || !batch.forget.is_empty() || !batch.chunks.is_empty() {
                // Refused only if the committer stopped on an error, which
                // it returns itself.
                if !commit(std::mem::take(&mut batch), *next_sequence) {
                    return Ok(sent);
                }
                sent = true;
            }
            if end >= to_hash.len() {
                return Ok(sent);
            }
            start = end;
        }
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
        let counter = self.store.issue_version_counter(&version);
        version.bump_at(self.device, counter);
        entry.version = version;
        entry.modified_by = self.device_id.to_owned();
        entry.sequence = *next_sequence;
        *next_sequence += 1;
        report.changes.push((entry.path.clone(), change));
        batch.upserts.push(IndexedFile { entry, stat });
    }

    /// Returns what the walk saw, and the directories it could not read.
    fn walk(&self, scope: &Scope, skipped: &mut Vec<String>) -> (Vec<Seen>, Vec<RelPath>) {
        if let Scope::Paths(paths) = scope
            && paths.len() <= SERIAL_WALK_PATHS
            && !self.clean_temp_files
            && let Some(seen) = look_at(self.root, paths)
        {
            return (seen, Vec::new());
        }
        walk_tree(self.root, scope, self.clean_temp_files, skipped)
    }
}

/// What the walk of `scope` sees in `root`, and the directories it could
/// not read.
fn walk_tree(
    root: &Path,
    scope: &Scope,
    clean_temp_files: bool,
    skipped: &mut Vec<String>,
) -> (Vec<Seen>, Vec<RelPath>) {
    let root = root.to_path_buf();
    // For partial scans: the targets, and every ancestor of a target
    // (walked through, so their ignore files apply, but not scanned).
    let (targets, ancestors): (HashSet<String>, HashSet<String>) = match scope {
        Scope::Full => Default::default(),
        Scope::Paths(paths) => {
            let targets: HashSet<String> = paths.iter().map(|p| p.as_str().to_owned()).collect();
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
    let unreadable_shared = Mutex::new(Vec::new());
    let visit = |result: Result<ignore::DirEntry, ignore::Error>| {
        let root = &root;
        let entry = match result {
            Ok(entry) => entry,
            Err(error) => {
                tracing::warn!("cannot read part of the workspace: {error}");
                if let Some(rel) = error_path(&error)
                    .and_then(|p| p.strip_prefix(root).ok())
                    .and_then(Path::to_str)
                    .and_then(|p| RelPath::new(p.replace(std::path::MAIN_SEPARATOR, "/")).ok())
                {
                    unreadable_shared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(rel);
                }
                return ignore::WalkState::Continue;
            }
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
    };
    let few = matches!(scope, Scope::Paths(paths) if paths.len() <= SERIAL_WALK_PATHS);
    if few {
        // A few paths (the watcher's, the IDE's hint): walked on this
        // thread, since starting the parallel walker's threads cost
        // more than the walk (a millisecond of a save's way to peers).
        for result in builder.build() {
            visit(result);
        }
    } else {
        builder.build_parallel().run(|| Box::new(&visit));
    }
    skipped.extend(skipped_shared.into_inner().unwrap_or_default());
    let unreadable = unreadable_shared.into_inner().unwrap_or_default();
    if clean_temp_files {
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
    (seen, unreadable)
}

/// The path an error of the walk is about, if it names one.
/// What the walk of these paths would see, looked up without reading
/// their directories: each one's ancestors are lstat'ed and matched against
/// the ignore files of the directories above them, as the walker matches
/// them (the deepest match wins, a `.mariesyncignore` before a
/// `.gitignore`; the walker reads no other ignore files). Walking a path
/// reads every directory above it and matches each of their entries (0.7 to
/// 1 ms of a save's way to peers in a directory of 140 files). `None` if a
/// path is a directory (its contents are walked) or a lookup fails other
/// than for a missing name: the walker decides those.
fn look_at(root: &Path, paths: &[RelPath]) -> Option<Vec<Seen>> {
    use ignore::gitignore::{Gitignore, GitignoreBuilder};
    let matchers = |dir: &Path| -> [Gitignore; 2] {
        [IGNORE_FILE, ".gitignore"].map(|name| {
            let mut builder = GitignoreBuilder::new(dir);
            let file = dir.join(name);
            if file.exists() {
                // As the walker: a bad line is skipped, the rest apply.
                let _ = builder.add(file);
            }
            builder.build().unwrap_or_else(|_| Gitignore::empty())
        })
    };
    let mut by_dir: HashMap<PathBuf, [Gitignore; 2]> = HashMap::new();
    let mut seen = Vec::new();
    'paths: for rel in paths {
        let names: Vec<&str> = rel.as_str().split('/').collect();
        let mut dirs = vec![root.to_path_buf()];
        for (i, name) in names.iter().enumerate() {
            if VCS_DIRS.contains(name) || name.starts_with(TEMP_PREFIX) {
                continue 'paths;
            }
            let path = dirs[i].join(name);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.kind() == std::io::ErrorKind::NotADirectory =>
                {
                    continue 'paths;
                }
                Err(_) => return None,
            };
            let last = i + 1 == names.len();
            if meta.is_dir() && last {
                return None;
            }
            for dir in &dirs {
                if !by_dir.contains_key(dir) {
                    by_dir.insert(dir.clone(), matchers(dir));
                }
            }
            let [mut custom, mut git] = [ignore::Match::None, ignore::Match::None];
            for dir in dirs.iter().rev() {
                let [c, g] = &by_dir[dir];
                if custom.is_none() {
                    custom = c.matched(&path, meta.is_dir());
                }
                if git.is_none() {
                    git = g.matched(&path, meta.is_dir());
                }
            }
            if custom.or(git).is_ignore() {
                continue 'paths;
            }
            if !last {
                // The walker does not follow links: nothing below one is seen.
                if !meta.is_dir() {
                    continue 'paths;
                }
                dirs.push(path);
                continue;
            }
            let kind = if meta.file_type().is_symlink() {
                FileKind::Symlink
            } else if meta.is_file() {
                FileKind::File
            } else {
                continue 'paths;
            };
            seen.push(Seen {
                path: rel.clone(),
                kind,
                stat: stat_of(&meta),
            });
        }
    }
    seen.sort_by(|a, b| a.path.cmp(&b.path));
    seen.dedup_by(|a, b| a.path == b.path);
    Some(seen)
}

fn error_path(error: &ignore::Error) -> Option<&Path> {
    match error {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            error_path(err)
        }
        _ => None,
    }
}

/// True if a symlink at `link` with this target leads outside the
/// workspace (absolute, or more `..` than it has parents).
pub fn link_escapes(link: &RelPath, target: &str) -> bool {
    if target.starts_with('/')
        || target.starts_with('\\')
        || target.as_bytes().get(1) == Some(&b':')
    {
        return true;
    }
    let mut depth = link.components().count() as i64 - 1;
    for component in target.split(['/', '\\']) {
        match component {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

/// True if the root holds nothing but what is never synced.
pub fn root_is_empty(root: &Path) -> bool {
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
        modified_by: String::new(),
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

/// Whether `stat`, seen at `now_ns`, is sure to change with the file's next
/// write, so that it may stand for the content read under it.
///
/// A write sets mtime and ctime to one same time, rounded to the file
/// system's tick. Once both are older than [`RACY_WINDOW_NS`] (the coarsest
/// tick, FAT's 2 s), a write can only give newer ones. Sooner, a write in
/// the tick they show would leave them as they are, unless they differ:
/// then it cannot give both their values at once. So a file whose ctime
/// moved past its mtime (a copy that kept its mtime, a file this daemon
/// wrote and dated, a chmod after the write) is settled as soon as its
/// ctime's tick is over (`ctime_tick_ns` old: what remains is a write that
/// sets the mtime back to the very same value within that tick). A
/// ctime before the mtime is not trusted: some file systems keep none.
pub fn stat_is_settled(stat: &StatCache, now_ns: i64, ctime_tick_ns: i64) -> bool {
    let age = |t: i64| now_ns.saturating_sub(t);
    (age(stat.mtime_ns) >= RACY_WINDOW_NS && age(stat.ctime_ns) >= RACY_WINDOW_NS)
        || (stat.ctime_ns > stat.mtime_ns && age(stat.ctime_ns) >= ctime_tick_ns)
}

#[cfg(unix)]
pub fn stat_of(meta: &std::fs::Metadata) -> StatCache {
    use std::os::unix::fs::MetadataExt;
    StatCache {
        size: meta.len(),
        // Saturating: a file dated past 2262 must not crash the scan.
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        ctime_ns: meta
            .ctime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.ctime_nsec()),
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

/// New chunks of one file held in memory at most before they are committed
/// on their own (through `spill`), so a huge file needs bounded memory.
const SPILL_BYTES: usize = 4 * 1024 * 1024;
/// A file larger than [`WHOLE_READ_BYTES_MAX`] is read this much at a time
/// into one buffer, and chunked there (no allocation per chunk).
const READ_WINDOW_BYTES: usize = 1024 * 1024;
/// After this many chunks in a row that did not compress, a file's chunks
/// are stored raw without trying, except every [`COMPRESS_PROBE_EVERY`]th
/// (random or already compressed bytes cost zstd as much time as text and
/// save nothing).
const INCOMPRESSIBLE_STREAK: u32 = 4;
const COMPRESS_PROBE_EVERY: usize = 16;

/// Reads, chunks, hashes and (for new chunks) compresses one file. New
/// chunks beyond [`SPILL_BYTES`] are handed to `spill` to be committed early.
pub fn ingest_file(
    path: &Path,
    reader: &ChunkReader,
    spill: &dyn Fn(&[EncodedChunk]) -> Result<(), StoreError>,
) -> Result<Ingested, IngestError> {
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
        let mut chunks = Vec::new();
        let mut chunks_new: Vec<EncodedChunk> = Vec::new();
        let mut held_bytes = 0;
        let mut known: HashSet<ChunkHash> = HashSet::new();
        let mut raw_streak = 0;
        let mut add_chunk = |data: &[u8]| -> Result<(), IngestError> {
            let hash = ChunkHash::of(data);
            chunks.push(ChunkRef {
                hash,
                len: data.len() as u32,
            });
            if known.insert(hash) && !reader.contains(&hash).map_err(IngestError::Store)? {
                let compress =
                    raw_streak < INCOMPRESSIBLE_STREAK || chunks.len() % COMPRESS_PROBE_EVERY == 0;
                let encoded = store::encode_chunk_with(hash, data, compress);
                if compress {
                    raw_streak = if encoded.is_raw() { raw_streak + 1 } else { 0 };
                }
                held_bytes += encoded.stored.len();
                chunks_new.push(encoded);
                if held_bytes > SPILL_BYTES {
                    spill(&chunks_new).map_err(IngestError::Store)?;
                    chunks_new.clear();
                    held_bytes = 0;
                }
            }
            Ok(())
        };
        let content_hash = if stat.size <= WHOLE_READ_BYTES_MAX {
            let mut data = Vec::with_capacity(stat.size as usize);
            file.read_to_end(&mut data).map_err(IngestError::Io)?;
            let bounds = store::chunk_boundaries(&data, CONTENT_CHUNKS);
            for &(offset, len) in &bounds {
                add_chunk(&data[offset..offset + len])?;
            }
            // One chunk: its hash is the content hash; don't hash twice.
            match bounds.len() {
                1 => None,
                _ => Some(ChunkHash::of(&data)),
            }
        } else {
            let mut hasher = blake3::Hasher::new();
            let max = CONTENT_CHUNKS.max as usize;
            let mut window = vec![0u8; READ_WINDOW_BYTES + max];
            let (mut filled, mut eof) = (0, false);
            loop {
                while !eof && filled < window.len() {
                    match file.read(&mut window[filled..]) {
                        Ok(0) => eof = true,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(IngestError::Io(e)),
                    }
                }
                // The chunk that reaches the end of the window is cut by the
                // window, not by its content: it waits for more bytes
                // (unless the file ends there), so the cuts are the same as
                // over the whole file at once.
                let mut consumed = 0;
                let cuts = fastcdc::v2020::FastCDC::new(
                    &window[..filled],
                    CONTENT_CHUNKS.min as usize,
                    CONTENT_CHUNKS.avg as usize,
                    max,
                );
                for cut in cuts {
                    let end = cut.offset + cut.length;
                    if !eof && end == filled {
                        break;
                    }
                    let data = &window[cut.offset..end];
                    hasher.update(data);
                    add_chunk(data)?;
                    consumed = end;
                }
                if eof {
                    break;
                }
                window.copy_within(consumed..filled, 0);
                filled -= consumed;
            }
            Some(ChunkHash::from(hasher.finalize()))
        };
        let after = file.metadata().map_err(IngestError::Io)?;
        let length: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        if stat_of(&after) != stat || length != stat.size {
            continue;
        }
        let content_hash = content_hash.unwrap_or_else(|| chunks[0].hash);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` pseudo-random bytes (xorshift): zstd saves nothing on them.
    fn incompressible(len: usize) -> Vec<u8> {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_stat_is_trusted_once_no_write_can_leave_it_as_it_is() {
        const S: i64 = 1_000_000_000;
        const MS: i64 = 1_000_000;
        let now = 1_700_000_000 * S;
        let stat = |mtime_ns, ctime_ns| StatCache {
            size: 10,
            mtime_ns,
            ctime_ns,
            inode: 1,
            mode: 0o644,
        };
        let settled = |mtime, ctime| stat_is_settled(&stat(mtime, ctime), now, CTIME_TICK_NS);
        // Written a moment ago (mtime = ctime): another write in that tick
        // would look the same, until the racy window is over.
        assert!(!settled(now - 5 * MS, now - 5 * MS));
        assert!(!settled(now - S, now - S));
        assert!(settled(now - 3 * S, now - 3 * S));
        // A copy that kept an old mtime: trusted once its ctime's tick is
        // over, not within it.
        assert!(settled(now - 3600 * S, now - 200 * MS));
        assert!(!settled(now - 3600 * S, now - 5 * MS));
        // No ctime kept (0), or one before the mtime: the window decides.
        assert!(!settled(now - 5 * MS, 0));
        assert!(settled(now - 3 * S, 0));
        assert!(!settled(now - S, now - 2 * S));
        // Dated in the future (another device's clock): never trusted.
        assert!(!settled(now + 3600 * S, now - 200 * MS));
        // A file this daemon wrote and dated: its ctime is its own rename,
        // trusted at once (the caller passes no tick).
        assert!(stat_is_settled(&stat(now - 3 * MS, now), now, 0));
        assert!(!stat_is_settled(&stat(now, now), now, 0));
    }

    #[test]
    fn a_large_file_is_ingested_in_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let path = dir.path().join("big.bin");
        // 80 MiB of incompressible bytes: more than two spills' worth.
        let data = incompressible(80 << 20);
        std::fs::write(&path, &data).unwrap();
        let spilled = std::sync::Mutex::new(Vec::new());
        let spill = |chunks: &[EncodedChunk]| {
            spilled
                .lock()
                .unwrap()
                .push(chunks.iter().map(|c| c.stored.len()).sum::<usize>());
            store.commit_chunks(chunks)
        };
        let ingested = ingest_file(&path, &store.reader().unwrap(), &spill).unwrap();
        let spilled = spilled.into_inner().unwrap();
        assert!(spilled.len() >= 2, "{spilled:?}");
        assert!(
            spilled
                .iter()
                .all(|&bytes| bytes <= SPILL_BYTES + CONTENT_CHUNKS.max as usize + 16)
        );
        let held: usize = ingested.chunks_new.iter().map(|c| c.stored.len()).sum();
        assert!(held <= SPILL_BYTES, "{held}");
        assert_eq!(ingested.content_hash, ChunkHash::of(&data));
        // Read through a window, cut exactly as the whole file at once.
        let lens: Vec<usize> = ingested.chunks.iter().map(|c| c.len as usize).collect();
        let whole: Vec<usize> = store::chunk_boundaries(&data, CONTENT_CHUNKS)
            .iter()
            .map(|&(_, len)| len)
            .collect();
        assert_eq!(lens, whole);
        // Every chunk is either spilled into the store or still held.
        let reader = store.reader().unwrap();
        for chunk in &ingested.chunks {
            assert!(
                reader.contains(&chunk.hash).unwrap()
                    || ingested.chunks_new.iter().any(|c| c.hash == chunk.hash)
            );
        }
    }

    #[test]
    fn text_after_incompressible_bytes_is_still_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let path = dir.path().join("mixed.bin");
        let mut data = incompressible(16 << 20);
        let random_len = data.len();
        let mut line = 0u64;
        while data.len() < random_len + (16 << 20) {
            line += 1;
            data.extend_from_slice(
                format!("line {line}: let total = a + b * {line};\n").as_bytes(),
            );
        }
        std::fs::write(&path, &data).unwrap();
        let encoded = std::sync::Mutex::new(Vec::new());
        let spill = |chunks: &[EncodedChunk]| {
            let mut encoded = encoded.lock().unwrap();
            encoded.extend(chunks.iter().map(|c| (c.hash, c.is_raw())));
            store.commit_chunks(chunks)
        };
        let ingested = ingest_file(&path, &store.reader().unwrap(), &spill).unwrap();
        let mut raw: HashMap<ChunkHash, bool> = encoded.into_inner().unwrap().into_iter().collect();
        raw.extend(ingested.chunks_new.iter().map(|c| (c.hash, c.is_raw())));
        let (mut offset, mut text_chunks, mut text_raw) = (0usize, 0, 0);
        for chunk in &ingested.chunks {
            if offset >= random_len {
                text_chunks += 1;
                text_raw += usize::from(raw[&chunk.hash]);
            } else if offset + (chunk.len as usize) < random_len {
                assert!(raw[&chunk.hash], "random bytes stored compressed");
            }
            offset += chunk.len as usize;
        }
        // Only the chunks before the next probe are stored raw.
        assert!(text_chunks > 50, "{text_chunks}");
        assert!(
            text_raw <= COMPRESS_PROBE_EVERY,
            "{text_raw} of {text_chunks} raw"
        );
    }

    #[test]
    fn looking_at_paths_sees_what_walking_to_them_sees() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let files = [
            (".gitignore", "*.log\nbuild/\n!keep.log\n/top-only.txt\n"),
            (IGNORE_FILE, "secret*\n!secret-ok.txt\n"),
            ("src/.gitignore", "!important.log\n*.tmp\ngen/\nsecret-x\n"),
            ("src/.mariesyncignore", "local.txt\n!secret-x\n"),
            ("src/deep/.gitignore", "!*.tmp\n"),
            ("a.txt", ""),
            ("a.log", ""),
            ("keep.log", ""),
            ("top-only.txt", ""),
            ("src/top-only.txt", ""),
            ("secret.txt", ""),
            ("secret-ok.txt", ""),
            ("src/secret-x", ""),
            ("src/important.log", ""),
            ("src/x.log", ""),
            ("src/y.tmp", ""),
            ("src/deep/z.tmp", ""),
            ("src/deep/w.log", ""),
            ("src/gen/g.rs", ""),
            ("build/out.o", ""),
            ("src/build/o2", ""),
            ("src/local.txt", ""),
            ("src/deep/local.txt", ""),
            (".git/config", ""),
            ("src/.hg/x", ""),
            ("src/.mariesync-tmp-1-2", ""),
        ];
        for (path, content) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("../a.txt", root.join("src/link")).unwrap();
            std::os::unix::fs::symlink("src", root.join("linkdir")).unwrap();
            std::os::unix::fs::symlink("x.log", root.join("src/link.log")).unwrap();
        }
        let mut paths: Vec<&str> = files.iter().map(|(p, _)| *p).collect();
        paths.extend([
            "src/link",
            "src/link.log",
            "linkdir/deep/z.tmp",
            "nope/x",
            "a.txt/x",
            "src/missing.txt",
            "build/new.o",
        ]);
        let rel = |p: &str| RelPath::new(p.to_owned()).unwrap();
        let walked =
            |paths: Vec<RelPath>| walk_tree(root, &Scope::Paths(paths), false, &mut Vec::new());
        let mut some_seen = 0;
        for path in &paths {
            let looked = look_at(root, &[rel(path)]).expect("not a directory");
            let (walked, unreadable) = walked(vec![rel(path)]);
            assert!(unreadable.is_empty());
            assert_eq!(looked, walked, "{path}");
            some_seen += looked.len();
        }
        // Some are seen, not all: the tree tells the two apart.
        assert!(some_seen > 5 && some_seen < paths.len() - 10, "{some_seen}");
        let all: Vec<RelPath> = paths.iter().map(|p| rel(p)).collect();
        assert_eq!(look_at(root, &all).unwrap(), walked(all).0);
        // A directory's contents are the walker's to find.
        assert!(look_at(root, &[rel("src/deep")]).is_none());
    }

    #[test]
    fn links_that_leave_the_workspace_are_recognised() {
        let at = |p: &str| RelPath::new(p).unwrap();
        assert!(link_escapes(&at("a"), "/etc"));
        assert!(link_escapes(&at("a"), ".."));
        assert!(link_escapes(&at("d/a"), "../../x"));
        assert!(link_escapes(&at("d/a"), "x/../../../y"));
        assert!(!link_escapes(&at("d/a"), "../x"));
        assert!(!link_escapes(&at("a"), "b/c/../d"));
        assert!(!link_escapes(&at("d/e/a"), "../../f"));
    }
}
