//! One worker thread per workspace. Everything that reads or changes a
//! workspace's files (scans, checkpoints, restores) runs here, one job at a
//! time, so no two of them ever race on the same tree.
//!
//! The worker's loop is one `match` over the closed [`Job`] enum: watcher
//! batches, IPC requests, and the periodic safety rescan.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mariesync_protocol::index::ChunkRef;
use mariesync_protocol::ipc::{ErrorCode, RpcError, event_kind};
use mariesync_protocol::{
    CheckpointId, ChunkHash, DeviceKey, FileEntry, FileKind, RelPath, WorkspaceId, sync,
};
use notify::Watcher;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::checkpoint::{self, RestoreError};
use crate::events::EventLog;
use crate::materialize::{self, Expected, Identity};
use crate::scan::{self, ScanError, ScanProgress, ScanReport, Scanner, Scope};
use crate::store::{
    CONTENT_CHUNKS, ChunkReader, EncodedChunk, StatCache, Store, StoreError, WorkspaceState,
};

/// Quiet time after the last watcher event before a batch is scanned.
const DEBOUNCE_QUIET_MS: u64 = 10;
/// A batch is scanned at the latest this long after its first event.
const DEBOUNCE_MAX_MS: u64 = 100;
/// More changed paths than this in one batch: scan everything instead.
const BATCH_PATHS_MAX: usize = 2048;
/// Safety rescan interval with a working watcher, and without one.
const RESCAN_INTERVAL_MS: u64 = 60 * 60 * 1000;
const RESCAN_DEGRADED_MS: u64 = 30 * 1000;
/// How often a paused workspace checks whether its root came back.
const PAUSED_RECHECK_MS: u64 = 2 * 1000;
const RETRY_UNSTABLE_MS: u64 = 250;
const RETRY_FAILED_SCAN_MS: u64 = 2000;
/// How long a flush waits for its cookie to come back through the watcher
/// before it falls back to a full rescan.
const COOKIE_TIMEOUT_MS: u64 = 2000;
/// Local changes announced one by one per scan; beyond, one summary event.
const CHANGE_EVENTS_MAX: usize = 1000;
/// From this many files in one apply, their bytes are made durable with one
/// syncfs instead of an fsync each.
const BATCH_SYNC_FILES_MIN: usize = 8;
/// Paths listed in `status` as not applied (the count goes on).
const NOT_APPLIED_LISTED_MAX: usize = 100;

pub type Reply = oneshot::Sender<Result<Value, RpcError>>;

pub enum Job {
    /// Paths the watcher saw change (absolute).
    Changed(Vec<PathBuf>),
    /// The watcher lost events or cannot watch everything.
    WatcherTrouble(String),
    Scan {
        scope: Scope,
        reply: Option<Reply>,
        /// Answered once the scan's changes are stored, just before peers
        /// are told and before the scan's durable commit (the IDE's hint
        /// without `--wait`: it promises no durability, and the file
        /// itself is what a crash would scan again).
        early: bool,
    },
    /// Index every change made before this job was sent.
    Flush {
        reply: Reply,
    },
    Checkpoint {
        message: String,
        reply: Reply,
    },
    Restore {
        id: CheckpointId,
        reply: Reply,
    },
    Resume {
        reply: Reply,
    },
    /// Chunks were dropped as corrupt: re-read the files that used them.
    Repair,
    /// Apply a peer's entries; the chunks they need are in the store
    /// (fetched, verified and pinned by the replicator).
    Apply {
        entries: Vec<FileEntry>,
        /// Verified chunks the peer pushed with them, not stored yet: the
        /// files are written from them, and the commit of the entries
        /// stores them.
        received: Vec<EncodedChunk>,
        /// The peer's sequence of the first entry not applied, if any.
        reply: oneshot::Sender<Result<Option<u64>, RpcError>>,
    },
    Stop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    Idle,
    Scanning,
    Restoring,
    Paused(String),
}

#[derive(Clone, Debug)]
pub struct Status {
    pub activity: Activity,
    pub watcher: Option<String>,
    pub skipped: Vec<String>,
    pub case_clashes: Vec<(String, String)>,
    pub last_error: Option<String>,
    /// Paths whose version from a peer could not be written yet, and why
    /// (at most [`NOT_APPLIED_LISTED_MAX`]).
    pub not_applied: BTreeMap<String, String>,
    /// Counts over the index; None when they must be recounted.
    pub totals: Option<Totals>,
    /// Moves each time the index changes: counts read from the store are
    /// kept only if it did not move while they were read (a count taken
    /// just before an apply's commit, stored just after, stayed wrong until
    /// the next change).
    pub totals_epoch: u64,
}

impl Status {
    pub fn new(activity: Activity) -> Status {
        Status {
            activity,
            watcher: None,
            skipped: Vec::new(),
            case_clashes: Vec::new(),
            last_error: None,
            not_applied: BTreeMap::new(),
            totals: None,
            totals_epoch: 0,
        }
    }

    /// The index changed: the counts must be taken again.
    pub fn invalidate_totals(&mut self) {
        self.totals = None;
        self.totals_epoch += 1;
    }

    /// Keeps counts read from the store since `read_at` (the epoch before
    /// reading), unless the index changed meanwhile.
    pub fn keep_totals(&mut self, read_at: u64, totals: Totals) {
        if self.totals_epoch == read_at {
            self.totals = Some(totals);
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Live files, their bytes, and how many of them are conflict copies.
    pub files: u64,
    pub bytes: u64,
    pub conflicts: u64,
    /// Entries (deletions too) whose last change was made on this device.
    pub local_changes: u64,
}

/// What the IPC side can see of a worker.
pub struct Shared {
    pub number: u32,
    pub id: WorkspaceId,
    pub name: String,
    pub root: PathBuf,
    pub status: Mutex<Status>,
    pub progress: ScanProgress,
    pub cancel: AtomicBool,
}

impl Shared {
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

pub struct Handle {
    pub shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    pub fn send(&self, job: Job) -> Result<(), RpcError> {
        self.jobs
            .send(job)
            .map_err(|_| RpcError::new(ErrorCode::ShuttingDown, "the workspace is shutting down"))
    }

    /// Stops the worker after the job in hand; waits for it.
    pub fn stop(mut self) {
        self.shared.cancel.store(true, Ordering::Release);
        let _ = self.jobs.send(Job::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub struct Context {
    pub store: Arc<Store>,
    pub events: Arc<EventLog>,
    pub device: DeviceKey,
    pub device_id: String,
    /// Set when a change may have left chunks unreferenced.
    pub garbage: Arc<AtomicBool>,
}

/// `MARIESYNC_FAULT_NOT_DURABLE`: small scans are never made durable, so
/// that a crash test can kill the daemon after peers took changes it then
/// loses (`crash.rs`).
fn fault_not_durable() -> bool {
    static FAULT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAULT.get_or_init(|| std::env::var_os("MARIESYNC_FAULT_NOT_DURABLE").is_some())
}

/// Starts the worker and the watcher of a workspace. The worker begins with
/// a full scan (cleaning leftover temporary files when `startup`) and
/// finishes a restore that a crash interrupted.
pub fn start(
    context: Context,
    number: u32,
    id: WorkspaceId,
    name: String,
    root: PathBuf,
    paused: Option<String>,
    startup: bool,
) -> Handle {
    let shared = Arc::new(Shared {
        number,
        id,
        name,
        root: root.clone(),
        status: Mutex::new(Status::new(match &paused {
            Some(reason) => Activity::Paused(reason.clone()),
            None => Activity::Scanning,
        })),
        progress: ScanProgress::default(),
        cancel: AtomicBool::new(false),
    });
    let (jobs, receiver) = mpsc::channel();
    let store_generation = context.store.generation();
    let worker = Worker {
        context,
        shared: shared.clone(),
        receiver,
        jobs: jobs.clone(),
        watcher: None,
        watched_root: None,
        queued: Default::default(),
        retry: BTreeSet::new(),
        store_generation,
        repair_due: None,
        repair_backoff: Duration::from_millis(RETRY_FAILED_SCAN_MS),
        early_replies: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("workspace-{number}"))
        .spawn(move || worker.run(startup))
        .expect("spawning a thread");
    Handle {
        shared,
        jobs,
        thread: Some(thread),
    }
}

fn is_read_only_access(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(kind, EventKind::Access(access) if !matches!(access, AccessKind::Close(AccessMode::Write)))
}

/// After [`scan::TEMP_PREFIX`], the name of a flush's cookie file.
const COOKIE_PREFIX: &str = "cookie-";

/// One of our temporary files, except a flush's cookie (which the worker
/// waits to see).
fn is_temp_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(scan::TEMP_PREFIX))
        .is_some_and(|rest| !rest.starts_with(COOKIE_PREFIX))
}

/// The identity of a directory: a remounted or recreated root is another one.
fn dir_identity(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Some((0, 0))
    }
}

fn start_watcher(
    root: &Path,
    jobs: mpsc::Sender<Job>,
    shared: &Shared,
    events: &EventLog,
) -> Option<notify::RecommendedWatcher> {
    let handler = move |result: notify::Result<notify::Event>| {
        let job = match result {
            Ok(event) if event.need_rescan() => {
                Job::WatcherTrouble("the watcher's event queue overflowed".into())
            }
            // Opening or reading a file changes nothing; the scanner's own
            // reads would otherwise look like edits. Closing after a write
            // is kept: it marks the end of a save.
            Ok(event) if is_read_only_access(&event.kind) => return,
            // Our own temporary files (three or four events for each file a
            // peer sends): never part of the workspace.
            Ok(event) if !event.paths.is_empty() && event.paths.iter().all(|p| is_temp_file(p)) => {
                return;
            }
            Ok(event) => Job::Changed(event.paths),
            Err(e) => Job::WatcherTrouble(format!("watcher error: {e}")),
        };
        let _ = jobs.send(job);
    };
    let degrade = |reason: String| {
        tracing::warn!(workspace = %shared.name, "{reason}; falling back to rescans every {}s", RESCAN_DEGRADED_MS / 1000);
        shared.update(|s| s.watcher = Some(reason.clone()));
        events.publish(
            event_kind::WATCHER_DEGRADED,
            json!({"workspace_id": shared.id.to_string(), "reason": reason}),
        );
    };
    if std::env::var_os("MARIESYNC_FAULT_NO_WATCH").is_some() {
        degrade("file watching is disabled (MARIESYNC_FAULT_NO_WATCH)".into());
        return None;
    }
    // Links are content, not places to watch: following them would report
    // events under the link's path, and a link to `/` would watch the disk.
    // Only changes: an open or a read by the IDE, a build or our own
    // scanner must not even reach us (notify 8 always asked for IN_OPEN).
    let config = notify::Config::default()
        .with_follow_symlinks(false)
        .with_event_kinds(notify::EventKindMask::CORE);
    let mut watcher = match notify::RecommendedWatcher::new(handler, config) {
        Ok(w) => w,
        Err(e) => {
            degrade(format!("cannot start the file watcher: {e}"));
            return None;
        }
    };
    if let Err(e) = watcher.watch(root, notify::RecursiveMode::Recursive) {
        let reason = match e.kind {
            notify::ErrorKind::MaxFilesWatch => "the system's limit of watched directories is exhausted (raise fs.inotify.max_user_watches)".to_string(),
            _ => format!("cannot watch the workspace: {e}"),
        };
        degrade(reason);
    }
    Some(watcher)
}

struct Worker {
    context: Context,
    shared: Arc<Shared>,
    receiver: mpsc::Receiver<Job>,
    /// For the watcher's callback.
    jobs: mpsc::Sender<Job>,
    watcher: Option<notify::RecommendedWatcher>,
    /// The root directory the watcher watches.
    watched_root: Option<(u64, u64)>,
    /// Jobs that arrived while a watcher batch was being gathered.
    queued: std::collections::VecDeque<Job>,
    /// Files that changed while being read, to scan again shortly.
    retry: BTreeSet<RelPath>,
    /// The store's generation this worker last saw (it moves when the
    /// database opens again after a failure).
    store_generation: u64,
    /// A repair and full scan owed (a scan failed on the store, or the
    /// database opened again and lost what was not durable), not before
    /// this time; and the wait before the next try if it fails too.
    repair_due: Option<Instant>,
    repair_backoff: Duration,
    /// Replies to send as soon as the scan running now has stored its
    /// changes (see `Job::Scan::early`).
    early_replies: Vec<Reply>,
}

impl Worker {
    fn degraded(&self) -> bool {
        self.shared.status().watcher.is_some()
    }

    /// (Re)starts the watcher if the root is not the directory it watches.
    /// Returns true if it did: events in between were lost.
    fn ensure_watcher(&mut self) -> bool {
        let identity = dir_identity(&self.shared.root);
        if identity.is_none()
            || (identity == self.watched_root && (self.watcher.is_some() || self.degraded()))
        {
            return false;
        }
        self.watcher = None;
        self.shared.update(|s| s.watcher = None);
        self.watcher = start_watcher(
            &self.shared.root,
            self.jobs.clone(),
            &self.shared,
            &self.context.events,
        );
        self.watched_root = identity;
        true
    }

    fn run(mut self, startup: bool) {
        let _ = self.ensure_watcher();
        if !self.is_paused() && self.scan(Scope::Full, startup).is_ok() {
            self.finish_interrupted_restore();
        }
        loop {
            self.repair_if_due();
            let job = match self.queued.pop_front() {
                Some(job) => job,
                None => match self.receiver.recv_timeout(self.timeout()) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        self.tick();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            };
            match job {
                Job::Stop => return,
                Job::Changed(paths) => {
                    let (batch, hinted) = self.gather(paths);
                    self.scan_answering(hinted, |worker| worker.scan_changed(batch));
                }
                Job::WatcherTrouble(reason) => {
                    if !self.degraded() {
                        tracing::warn!(workspace = %self.shared.name, "{reason}; rescanning");
                    }
                    if !self.is_paused() {
                        let _ = self.scan(Scope::Full, false);
                    }
                }
                Job::Scan {
                    scope,
                    reply,
                    early,
                } => {
                    let replies = reply.map(|reply| (reply, early)).into_iter().collect();
                    self.scan_answering(replies, |worker| worker.scan(scope, false).map(drop));
                }
                Job::Flush { reply } => {
                    let result = self.flush();
                    let _ = reply.send(result.map(|_| json!({})));
                }
                Job::Checkpoint { message, reply } => {
                    let result = self.checkpoint(message);
                    let _ = reply.send(result);
                    crate::release_memory();
                }
                Job::Restore { id, reply } => {
                    let result = self.restore(id);
                    let _ = reply.send(result);
                }
                Job::Repair => {
                    self.repair();
                }
                Job::Apply {
                    entries,
                    received,
                    reply,
                } => {
                    let mut reply = Some(reply);
                    let result = if self.is_paused() {
                        Err(self.paused_error())
                    } else {
                        self.apply_remote(entries, received, &mut reply)
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                Job::Resume { reply } => {
                    let result = self.resume(true);
                    let _ = reply.send(result);
                }
            }
        }
    }

    fn timeout(&self) -> Duration {
        if let Some(due) = self.repair_due
            && !self.is_paused()
        {
            return due.saturating_duration_since(Instant::now());
        }
        Duration::from_millis(if !self.retry.is_empty() {
            RETRY_UNSTABLE_MS
        } else if self.is_paused() {
            PAUSED_RECHECK_MS
        } else if self.degraded() {
            RESCAN_DEGRADED_MS
        } else {
            RESCAN_INTERVAL_MS
        })
    }

    /// Runs the repair and full scan owed, if it is time: after a scan
    /// failed on the store (the changes it missed have no watcher event
    /// left to bring them back), or after the database opened again (what
    /// was not durable is gone: chunks an entry names, whole batches).
    /// A failure waits twice as long for the next try, up to a minute.
    fn repair_if_due(&mut self) {
        let generation = self.context.store.generation();
        if generation != self.store_generation {
            self.store_generation = generation;
            self.repair_due = Some(Instant::now());
        }
        let Some(due) = self.repair_due else { return };
        if Instant::now() < due || self.is_paused() {
            return;
        }
        if self.repair() {
            self.repair_due = None;
            self.repair_backoff = Duration::from_millis(RETRY_FAILED_SCAN_MS);
        } else {
            self.repair_due = Some(Instant::now() + self.repair_backoff);
            self.repair_backoff = (self.repair_backoff * 2).min(Duration::from_secs(60));
        }
    }

    /// Nothing happened for a while: retry unstable files, re-check a paused
    /// root, or run the safety rescan.
    fn tick(&mut self) {
        if let Activity::Paused(_) = self.shared.status().activity {
            // Only content coming back resumes by itself; an empty root is
            // accepted by the user alone (`workspace resume`).
            if !scan::root_is_empty(&self.shared.root) {
                tracing::info!(workspace = %self.shared.name, "workspace root has content again; resuming");
                let _ = self.resume(false);
            }
        } else if !self.retry.is_empty() {
            let paths = std::mem::take(&mut self.retry).into_iter().collect();
            let _ = self.scan(Scope::Paths(paths), false);
        } else {
            let _ = self.scan(Scope::Full, false);
        }
    }

    /// Runs `scan` unless the workspace is paused, and answers `replies`
    /// with the outcome: the early ones (see `Job::Scan::early`) as soon as
    /// the scan has stored its changes, the others, and early ones it
    /// never got to, at the end.
    fn scan_answering(
        &mut self,
        replies: Vec<(Reply, bool)>,
        scan: impl FnOnce(&mut Self) -> Result<(), RpcError>,
    ) {
        let mut late = Vec::new();
        for (reply, early) in replies {
            if early {
                self.early_replies.push(reply);
            } else {
                late.push(reply);
            }
        }
        let result = if self.is_paused() {
            Err(self.paused_error())
        } else {
            scan(self)
        };
        let result = result.map(|()| json!({}));
        for reply in late.into_iter().chain(self.early_replies.drain(..)) {
            let _ = reply.send(result.clone());
        }
    }

    /// Collects watcher events until they pause, into workspace paths. The
    /// IDE's hint (`touched`) ends the wait: its paths join the batch, and
    /// the replies returned are answered once the batch is scanned (the
    /// file it names is usually the one whose events these are; scanning
    /// it twice would delay the answer).
    fn gather(&mut self, first: Vec<PathBuf>) -> (Option<BTreeSet<RelPath>>, Vec<(Reply, bool)>) {
        let started = Instant::now();
        let mut raw = first;
        let mut hinted = Vec::new();
        let mut hinted_paths = Vec::new();
        loop {
            let left = Duration::from_millis(DEBOUNCE_MAX_MS).saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            match self
                .receiver
                .recv_timeout(left.min(Duration::from_millis(DEBOUNCE_QUIET_MS)))
            {
                Ok(Job::Changed(more)) => raw.extend(more),
                Ok(Job::Scan {
                    scope: Scope::Paths(paths),
                    reply,
                    early,
                }) => {
                    hinted_paths.extend(paths);
                    hinted.extend(reply.map(|reply| (reply, early)));
                    break;
                }
                Ok(other) => {
                    self.queued.push_back(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let batch = self.workspace_paths(raw).map(|mut batch| {
            batch.extend(hinted_paths);
            batch
        });
        (batch, hinted)
    }

    /// Turns watcher paths into the workspace paths to scan; None means
    /// "scan everything".
    fn workspace_paths(&self, raw: Vec<PathBuf>) -> Option<BTreeSet<RelPath>> {
        let mut paths = BTreeSet::new();
        for path in raw {
            let Ok(relative) = path.strip_prefix(&self.shared.root) else {
                continue;
            };
            let Some(text) = relative.to_str() else {
                continue;
            };
            if text.is_empty() {
                continue;
            }
            let text = text.replace(std::path::MAIN_SEPARATOR, "/");
            if text
                .split('/')
                .any(|c| scan::VCS_DIRS.contains(&c) || c.starts_with(scan::TEMP_PREFIX))
            {
                continue;
            }
            let Ok(rel) = RelPath::new(text) else {
                continue;
            };
            // A changed ignore file changes what its whole directory holds.
            if rel.file_name() == ".gitignore" || rel.file_name() == scan::IGNORE_FILE {
                match rel.parent() {
                    Some(dir) => paths.insert(dir),
                    None => return None,
                };
            }
            paths.insert(rel);
            if paths.len() > BATCH_PATHS_MAX {
                return None;
            }
        }
        Some(paths)
    }

    fn scan_changed(&mut self, batch: Option<BTreeSet<RelPath>>) -> Result<(), RpcError> {
        match batch {
            None => self.scan(Scope::Full, false).map(drop),
            Some(paths) if paths.is_empty() => Ok(()),
            Some(paths) => {
                // Drop paths below another path of the batch: scanning the
                // ancestor covers them.
                let mut kept: Vec<RelPath> = Vec::new();
                for path in paths {
                    if !kept.last().is_some_and(|k| path.starts_with(k)) {
                        kept.push(path);
                    }
                }
                self.scan(Scope::Paths(kept), false).map(drop)
            }
        }
    }

    /// Indexes every change made before now. With a working watcher this is
    /// Watchman's cookie: write a file in the root and wait for its event;
    /// the watcher delivers events in order, so every earlier change has
    /// then been seen, and only those paths are scanned. Without one (or if
    /// the cookie does not come back in time), a full rescan.
    fn flush(&mut self) -> Result<(), RpcError> {
        if self.is_paused() {
            return Err(self.paused_error());
        }
        if self.ensure_watcher() {
            // A new root directory (a remount): what happened before the
            // new watcher started is unknown.
            return self.scan(Scope::Full, false).map(drop);
        }
        match self.sync_with_watcher() {
            Some(mut batch) => {
                if let Some(paths) = &mut batch {
                    paths.extend(std::mem::take(&mut self.retry));
                }
                self.scan_changed(batch)
            }
            None => self.scan(Scope::Full, false).map(drop),
        }
    }

    fn sync_with_watcher(&mut self) -> Option<Option<BTreeSet<RelPath>>> {
        static COOKIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if self.watcher.is_none() || self.degraded() {
            return None;
        }
        let name = format!(
            "{}{COOKIE_PREFIX}{}-{}",
            scan::TEMP_PREFIX,
            std::process::id(),
            COOKIES.fetch_add(1, Ordering::Relaxed)
        );
        let cookie = self.shared.root.join(&name);
        if std::fs::write(&cookie, b"").is_err() {
            return None;
        }
        let deadline = Instant::now() + Duration::from_millis(COOKIE_TIMEOUT_MS);
        let mut raw = Vec::new();
        let mut found = false;
        while !found {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(left) {
                Ok(Job::Changed(paths)) => {
                    found = paths
                        .iter()
                        .any(|p| p.file_name().is_some_and(|n| n == name.as_str()));
                    raw.extend(paths);
                }
                Ok(Job::WatcherTrouble(_)) => break,
                Ok(other) => self.queued.push_back(other),
                Err(_) => break,
            }
        }
        let _ = std::fs::remove_file(&cookie);
        if !found {
            tracing::warn!(workspace = %self.shared.name, "the watcher did not report a flush cookie in time; rescanning everything");
            return None;
        }
        Some(self.workspace_paths(raw))
    }

    fn is_paused(&self) -> bool {
        matches!(self.shared.status().activity, Activity::Paused(_))
    }

    fn paused_error(&self) -> RpcError {
        let reason = match self.shared.status().activity {
            Activity::Paused(reason) => reason,
            _ => String::new(),
        };
        RpcError::new(
            ErrorCode::WorkspacePaused,
            format!("workspace '{}' is paused: {reason}", self.shared.name),
        )
    }

    fn scan(&mut self, scope: Scope, startup: bool) -> Result<ScanReport, RpcError> {
        self.scan_with(scope, startup, false)
    }

    fn scan_with(
        &mut self,
        scope: Scope,
        startup: bool,
        allow_empty: bool,
    ) -> Result<ScanReport, RpcError> {
        let full = matches!(scope, Scope::Full);
        if full {
            let _ = self.ensure_watcher();
            self.shared.update(|s| s.activity = Activity::Scanning);
        }
        let progress = &self.shared.progress;
        let events = &self.context.events;
        let workspace_id = self.shared.id.to_string();
        let on_durable = || {
            events.publish(
                event_kind::SCAN_PROGRESS,
                json!({
                    "workspace_id": workspace_id,
                    "files_hashed": progress.files_hashed.load(Ordering::Relaxed),
                    "files_to_hash": progress.files_to_hash.load(Ordering::Relaxed),
                    "bytes_hashed": progress.bytes_hashed.load(Ordering::Relaxed),
                    "bytes_to_hash": progress.bytes_to_hash.load(Ordering::Relaxed),
                }),
            );
        };
        let scanner = Scanner {
            on_durable: &on_durable,
            store: &self.context.store,
            workspace: self.shared.number,
            root: &self.shared.root,
            device: self.context.device,
            device_id: &self.context.device_id,
            progress: &self.shared.progress,
            cancel: &self.shared.cancel,
            allow_empty,
            clean_temp_files: startup,
        };
        let started = Instant::now();
        tracing::debug!(workspace = %self.shared.name, ?scope, "scan starts");
        let result = scanner.run(&scope);
        tracing::debug!(workspace = %self.shared.name, us = started.elapsed().as_micros() as u64, "scan done");
        if full {
            crate::release_memory();
        }
        match result {
            Ok(report) => {
                self.shared.update(|s| {
                    s.activity = Activity::Idle;
                    s.last_error = None;
                    if full {
                        s.skipped = report.skipped.clone();
                    }
                    if let Some(clashes) = &report.case_clashes {
                        s.case_clashes = clashes.clone();
                    }
                    if !report.changes.is_empty() || report.forgotten > 0 {
                        s.invalidate_totals();
                    }
                });
                self.retry.extend(report.unstable.iter().cloned());
                // Peers hear of a small scan's changes now and pull them
                // while they are made durable here; whoever asked for the
                // scan is answered after that, but for the early replies,
                // which go first: woken after the announcement, a reply
                // waited for the runtime's threads to carry that to the
                // peers (0.4 to 1.9 ms), and the announcement is queued
                // microseconds later, before anything else happens here.
                for reply in self.early_replies.drain(..) {
                    let _ = reply.send(Ok(json!({})));
                }
                self.announce(&report, full, started.elapsed());
                if let Some(told) = report.durability_due.filter(|_| !fault_not_durable()) {
                    match self.context.store.make_durable(self.shared.number, told) {
                        // Served only now: peers heard too early.
                        Ok(true) => on_durable(),
                        Ok(false) => {}
                        Err(e) => return Err(self.store_failed(e)),
                    }
                }
                Ok(report)
            }
            Err(ScanError::Cancelled) => Err(RpcError::new(
                ErrorCode::ShuttingDown,
                "the daemon is shutting down",
            )),
            Err(e @ (ScanError::RootMissing(_) | ScanError::Emptied(_))) => {
                let reason = e.to_string();
                self.pause(reason);
                Err(self.paused_error())
            }
            Err(ScanError::Store(e)) => Err(self.store_failed(e)),
        }
    }

    /// A scan's store error: reported once, and a repair scheduled.
    fn store_failed(&mut self, e: StoreError) -> RpcError {
        let error = store_rpc_error(&e);
        let message = e.to_string();
        let mut news = false;
        self.shared.update(|s| {
            s.activity = Activity::Idle;
            news = s.last_error.as_ref() != Some(&message);
            s.last_error = Some(message.clone());
        });
        if news {
            self.context.events.publish(
                event_kind::ERROR,
                json!({"workspace_id": self.shared.id.to_string(), "message": message}),
            );
        }
        if self.repair_due.is_none() {
            self.repair_due = Some(Instant::now() + self.repair_backoff);
        }
        error
    }

    fn announce(&self, report: &ScanReport, full: bool, took: Duration) {
        let workspace_id = self.shared.id.to_string();
        if !report.changes.is_empty() {
            self.context.garbage.store(true, Ordering::Relaxed);
        }
        if report.changes.len() <= CHANGE_EVENTS_MAX {
            for (path, change) in &report.changes {
                self.context.events.publish(
                    event_kind::LOCAL_CHANGE,
                    json!({"workspace_id": workspace_id, "path": path.as_str(), "change": change.as_str()}),
                );
            }
        } else {
            self.context.events.publish(
                event_kind::LOCAL_CHANGE,
                json!({"workspace_id": workspace_id, "changes": report.changes.len(), "summary": true}),
            );
        }
        if full {
            self.context.events.publish(
                event_kind::SCAN_FINISHED,
                json!({
                    "workspace_id": workspace_id,
                    "changes": report.changes.len(),
                    "hashed_files": report.hashed_files,
                    "hashed_bytes": report.hashed_bytes,
                    "duration_ms": took.as_millis() as u64,
                }),
            );
        }
    }

    fn pause(&mut self, reason: String) {
        tracing::warn!(workspace = %self.shared.name, "pausing: {reason}");
        let number = self.shared.number;
        let persisted = reason.clone();
        if let Err(e) = self.context.store.update_workspace(number, |r| {
            r.state = WorkspaceState::Paused { reason: persisted }
        }) {
            tracing::error!("cannot record the pause: {e}");
        }
        self.shared
            .update(|s| s.activity = Activity::Paused(reason.clone()));
        self.context.events.publish(
            event_kind::WORKSPACE_STATE,
            json!({"workspace_id": self.shared.id.to_string(), "state": "paused", "reason": reason}),
        );
    }

    /// Resumes a paused workspace; `allow_empty` accepts an empty root as
    /// the new state (the user said so).
    fn resume(&mut self, allow_empty: bool) -> Result<Value, RpcError> {
        let number = self.shared.number;
        self.context
            .store
            .update_workspace(number, |r| r.state = WorkspaceState::Active)
            .map_err(|e| store_rpc_error(&e))?;
        self.shared.update(|s| s.activity = Activity::Scanning);
        self.context.events.publish(
            event_kind::WORKSPACE_STATE,
            json!({"workspace_id": self.shared.id.to_string(), "state": "scanning"}),
        );
        self.scan_with(Scope::Full, false, allow_empty)?;
        Ok(json!({}))
    }

    /// Applies a peer's entries: each path gets the version the sans-IO
    /// core picks, written atomically and only over what the index knows.
    /// Returns the peer's sequence of the first entry that could not be
    /// applied (tried again later), if any; through `reply` as soon as the
    /// batch is committed when it had no conflict and no corrupt chunk:
    /// that answer becomes the acknowledgement a peer's `touched --wait` or
    /// `flush` waits for, and the events need not hold it up (they woke
    /// the tasks that announce our news, and the answer waited 0.4 ms for a
    /// thread on the development VM).
    fn apply_remote(
        &mut self,
        entries: Vec<FileEntry>,
        received: Vec<EncodedChunk>,
        reply: &mut Option<oneshot::Sender<Result<Option<u64>, RpcError>>>,
    ) -> Result<Option<u64>, RpcError> {
        let store = self.context.store.clone();
        let number = self.shared.number;
        let root = self.shared.root.clone();
        let store_err = |e: StoreError| store_rpc_error(&e);
        let references = store.reference_guard();
        let mut reader = store.reader().map_err(store_err)?.with_received(received);
        let mut next = store
            .workspace(number)
            .map_err(store_err)?
            .map(|r| r.next_sequence)
            .unwrap_or(1);
        let mut batch = crate::store::Batch::default();
        let mut rescan = Vec::new();
        let mut first_failed: Option<u64> = None;
        let mut fail = |sequence: u64| {
            first_failed = Some(first_failed.map_or(sequence, |f: u64| f.min(sequence)))
        };
        // Directory deletions go last, deepest first, once their files are gone.
        let (dir_deletions, entries): (Vec<FileEntry>, Vec<FileEntry>) = entries
            .into_iter()
            .partition(|e| e.deleted && e.kind == FileKind::Directory);
        let mut dir_deletions = dir_deletions;
        dir_deletions.sort_by(|a, b| b.path.cmp(&a.path));
        // New versions of plain files are written in parallel, beside their
        // targets; then made durable together (one syncfs for a batch, an
        // fsync each for a few), and only then renamed into place by the
        // loop below. Only this thread changes the index, so the decisions
        // made here are the ones the loop makes.
        let started = std::time::Instant::now();
        let candidates = entries
            .iter()
            .filter(|r| r.kind == FileKind::File && !r.deleted)
            .count();
        let durability = if materialize::BATCHED_DURABILITY && candidates >= BATCH_SYNC_FILES_MIN {
            materialize::Durability::Batched
        } else {
            materialize::Durability::Fsync
        };
        // Written before any link of this batch is made (links go in the
        // loop below), so a parent checked once stays checked for the batch.
        let known_dirs = materialize::KnownDirs::default();
        let prewrite = |remote: &FileEntry| {
            if remote.kind != FileKind::File || remote.deleted || !valid_remote(remote) {
                return None;
            }
            let local = store.file(number, remote.path.as_str()).ok()?;
            let local_entry = local.as_ref().map(|l| &l.entry);
            (sync::decide(local_entry, remote) == sync::Decision::Apply).then(|| {
                (
                    remote.path.clone(),
                    prepare_remote(
                        &root,
                        remote,
                        local_entry,
                        &reader,
                        durability,
                        Some(&known_dirs),
                    ),
                )
            })
        };
        // One file (a save on a peer) is written on this thread: handing it
        // to the pool and back costs two wake-ups on its way.
        let mut prewritten: std::collections::HashMap<
            RelPath,
            Result<Pending, materialize::WriteError>,
        > = if candidates <= 1 {
            entries.iter().filter_map(prewrite).collect()
        } else {
            io_pool().install(|| {
                use rayon::prelude::*;
                entries.par_iter().filter_map(prewrite).collect()
            })
        };
        let written_us = started.elapsed().as_micros() as u64;
        if durability == materialize::Durability::Batched
            && prewritten.values().any(Result::is_ok)
            && let Err(e) = materialize::sync_batch(&root)
        {
            // Nothing of this batch is known durable: none of it goes in.
            tracing::warn!(workspace = %self.shared.name, "cannot make received files durable: {e}");
            prewritten = prewritten
                .into_iter()
                .map(|(path, pending)| {
                    if let Ok(pending) = pending {
                        pending.prepared.discard();
                    }
                    let error = materialize::WriteError::Io {
                        path: path.to_string(),
                        source: std::io::Error::other(format!("syncfs: {e}")),
                    };
                    (path, Err(error))
                })
                .collect();
        }
        let synced_us = started.elapsed().as_micros() as u64;
        let mut touched_dirs = BTreeSet::new();
        let mut received: Vec<(&str, Value)> = Vec::new();
        // Paths decided in this batch, and those that could not be written
        // (a full disk, a directory in the way): listed in `status` as
        // `not_applied` until a later batch settles them.
        let mut settled: Vec<RelPath> = Vec::new();
        let mut failures: Vec<(RelPath, String)> = Vec::new();
        let mut corrupt: Vec<(ChunkHash, String)> = Vec::new();
        for remote in entries.into_iter().chain(dir_deletions) {
            if !valid_remote(&remote) {
                tracing::warn!(path = %remote.path, "ignoring an invalid entry from a peer");
                continue;
            }
            let local = store
                .file(number, remote.path.as_str())
                .map_err(store_err)?;
            let local_entry = local.as_ref().map(|l| &l.entry);
            let decision = sync::decide(local_entry, &remote);
            settled.push(remote.path.clone());
            let outcome = match &decision {
                sync::Decision::Ignore => continue,
                sync::Decision::Apply => match prewritten.remove(&remote.path) {
                    Some(pending) => pending.and_then(|p| p.finish(&remote)),
                    None => write_remote(&root, &remote, local_entry, &reader),
                },
                sync::Decision::Conflict {
                    remote_wins: true,
                    conflict_path,
                } => {
                    // Our version moves aside; the winner takes the path.
                    if let (Some(path), Some(local)) = (conflict_path, local_entry) {
                        if let Err(e) = move_aside(&root, local, path) {
                            tracing::warn!("cannot keep our conflicting version as {path}: {e}");
                            fail(remote.sequence);
                            failures.push((remote.path.clone(), e.to_string()));
                            continue;
                        }
                        rescan.push(path.clone());
                    }
                    write_remote(&root, &remote, None, &reader)
                }
                sync::Decision::Conflict {
                    remote_wins: false,
                    conflict_path,
                } => {
                    // Ours stays, now with a version that has seen theirs, so
                    // it replaces theirs everywhere; theirs is kept beside.
                    if let Some(path) = conflict_path {
                        let mut copy = crate::store::ManifestEntry::from_entry(&remote);
                        copy.path = path.clone();
                        // Already there: an earlier round wrote the same copy.
                        let written =
                            materialize::write_entry(&root, &copy, &reader, Expected::Absent);
                        let already = |e: &materialize::WriteError| matches!(e, materialize::WriteError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists);
                        if let Err(e) = written.as_ref().map_err(|e| (already(e), e))
                            && !e.0
                        {
                            tracing::warn!(
                                "cannot keep the conflicting version as {path}: {}",
                                e.1
                            );
                            fail(remote.sequence);
                            failures.push((remote.path.clone(), e.1.to_string()));
                            continue;
                        }
                        rescan.push(path.clone());
                    }
                    if let Some(local) = &local {
                        let mut kept = local.clone();
                        kept.entry.version.merge(&remote.version);
                        kept.entry.sequence = next;
                        next += 1;
                        batch.upserts.push(kept);
                    }
                    continue;
                }
            };
            match outcome {
                Ok(stat) => {
                    let mut entry = remote;
                    // Whatever we had is now seen too: a no-op when theirs
                    // was newer, the union when the changes were concurrent.
                    if let Some(local) = local_entry {
                        entry.version.merge(&local.version);
                    }
                    entry.sequence = next;
                    next += 1;
                    if let Some(parent) = materialize::join(&root, &entry.path).parent() {
                        touched_dirs.insert(parent.to_path_buf());
                    }
                    received.push((
                        event_kind::FILE_RECEIVED,
                        json!({"workspace_id": self.shared.id.to_string(), "path": entry.path.as_str(), "deleted": entry.deleted}),
                    ));
                    if let sync::Decision::Conflict {
                        conflict_path: Some(path),
                        ..
                    } = &decision
                    {
                        received.push((
                            event_kind::CONFLICT,
                            json!({"workspace_id": self.shared.id.to_string(), "path": entry.path.as_str(), "conflict_path": path.as_str()}),
                        ));
                    }
                    batch
                        .upserts
                        .push(crate::store::IndexedFile { entry, stat });
                }
                Err(e) => {
                    tracing::warn!(workspace = %self.shared.name, "not applied yet: {e}");
                    if let materialize::WriteError::Store {
                        source: StoreError::CorruptChunk { hash, reason },
                        ..
                    } = &e
                    {
                        corrupt.push((*hash, reason.clone()));
                    }
                    fail(remote.sequence);
                    failures.push((remote.path.clone(), e.to_string()));
                }
            }
        }
        // Received chunks go in with the entries that use them. Those the
        // store has already (the same save relayed by another peer) or
        // no applied entry uses are left out: a batch of nothing else
        // would cost an fsync for nothing, and a retry fetches them.
        let pushed = reader.take_received();
        let used: std::collections::HashSet<ChunkHash> = batch
            .upserts
            .iter()
            .flat_map(|f| f.entry.chunks.iter().map(|c| c.hash))
            .collect();
        batch.chunks = pushed
            .into_iter()
            .filter(|c| used.contains(&c.hash) && !reader.stored(&c.hash).unwrap_or(false))
            .collect();
        batch.chunks_fetched = true;
        drop(reader);
        for pending in prewritten.into_values().flatten() {
            pending.prepared.discard();
        }
        // Renames and deletions are durable before the index says so: one
        // syncfs for a batch, else each directory's fsync.
        let synced = durability == materialize::Durability::Batched
            && !touched_dirs.is_empty()
            && materialize::sync_batch(&root).is_ok();
        if !synced {
            for dir in &touched_dirs {
                materialize::sync_dir(dir);
            }
        }
        let renamed_us = started.elapsed().as_micros() as u64;
        // Entries the index already had (a peer relaying our own changes
        // back, say) change nothing: no commit, and no fsync for nothing.
        if !(batch.upserts.is_empty() && batch.forget.is_empty()) {
            store
                .commit_batch(number, &batch, next, true)
                .map_err(store_err)?;
        }
        tracing::debug!(
            workspace = %self.shared.name,
            files = batch.upserts.len(),
            dirs = touched_dirs.len(),
            written_us,
            synced_us,
            renamed_us,
            committed_us = started.elapsed().as_micros() as u64,
            "applied a peer's entries"
        );
        self.note_not_applied(&settled, failures);
        if !batch.upserts.is_empty() {
            self.shared.update(Status::invalidate_totals);
            self.context.garbage.store(true, Ordering::Relaxed);
        }
        // The common case answers now. Corrupt chunks are dropped first
        // (the pull would otherwise go on and find them still stored), and
        // conflict copies indexed first, as before.
        if corrupt.is_empty()
            && rescan.is_empty()
            && let Some(reply) = reply.take()
        {
            let _ = reply.send(Ok(first_failed));
        }
        // Announced only once committed and durable: a peer told earlier
        // would pull before the entries can be served, and not again.
        for (kind, event) in received {
            self.context.events.publish(kind, event);
        }
        drop(references);
        self.drop_corrupt(&corrupt);
        if !rescan.is_empty() {
            let _ = self.scan(Scope::Paths(rescan), false);
        }
        Ok(first_failed)
    }

    /// Chunks of our store that failed their check while a peer's version
    /// was written from them: dropped ([`drop_corrupt_chunks`]), so the
    /// next pull fetches them again (the entries stay not applied until
    /// then), and the files of this workspace that used them are read
    /// again (a repair).
    fn drop_corrupt(&mut self, corrupt: &[(ChunkHash, String)]) {
        if let Err(e) = drop_corrupt_chunks(&self.context.store, &self.context.events, corrupt) {
            tracing::error!(workspace = %self.shared.name, "cannot drop corrupt chunks: {e}");
        }
        if !corrupt.is_empty() {
            self.repair_due = Some(Instant::now());
        }
    }

    /// Updates `status`'s `not_applied` after a batch: paths it settled
    /// leave the list, paths that failed join it, with an `error` event the
    /// first time a path fails for a reason (not at every retry).
    fn note_not_applied(&self, settled: &[RelPath], failures: Vec<(RelPath, String)>) {
        if failures.is_empty()
            && self
                .shared
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .not_applied
                .is_empty()
        {
            return;
        }
        let mut news = Vec::new();
        let failed: BTreeSet<RelPath> = failures.iter().map(|(path, _)| path.clone()).collect();
        self.shared.update(|s| {
            for path in settled.iter().filter(|path| !failed.contains(path)) {
                s.not_applied.remove(path.as_str());
            }
            for (path, message) in failures {
                let known = s.not_applied.get(path.as_str()) == Some(&message);
                if !known
                    && (s.not_applied.len() < NOT_APPLIED_LISTED_MAX
                        || s.not_applied.contains_key(path.as_str()))
                {
                    s.not_applied.insert(path.to_string(), message.clone());
                }
                if !known {
                    news.push((path, message));
                }
            }
        });
        for (path, message) in news {
            self.context.events.publish(
                event_kind::ERROR,
                json!({
                    "workspace_id": self.shared.id.to_string(),
                    "path": path.as_str(),
                    "message": format!("cannot apply a peer's version of {path}: {message}"),
                }),
            );
        }
    }

    /// Forgets the stat cache of entries whose chunks are gone, then scans:
    /// files that still have that content store it again. True if the
    /// scan went through.
    fn repair(&mut self) -> bool {
        let store = &self.context.store;
        let number = self.shared.number;
        let outcome = (|| -> Result<(), StoreError> {
            let _references = store.reference_guard();
            let reader = store.reader()?;
            let mut stale = Vec::new();
            for mut file in store.files(number, None)? {
                if file.entry.deleted || file.stat.is_none() {
                    continue;
                }
                let mut missing = false;
                for chunk in &file.entry.chunks {
                    missing |= !reader.contains(&chunk.hash)?;
                }
                if missing {
                    file.stat = None;
                    stale.push(file);
                }
            }
            drop(reader);
            if !stale.is_empty() {
                let next = store
                    .workspace(number)?
                    .map(|r| r.next_sequence)
                    .unwrap_or(0);
                let batch = crate::store::Batch {
                    upserts: stale,
                    ..Default::default()
                };
                store.commit_batch(number, &batch, next, true)?;
            }
            Ok(())
        })();
        if let Err(e) = outcome {
            tracing::error!(workspace = %self.shared.name, "repair failed: {e}");
            return false;
        }
        self.scan(Scope::Full, false).is_ok()
    }

    fn checkpoint(&mut self, message: String) -> Result<Value, RpcError> {
        if self.is_paused() {
            return Err(self.paused_error());
        }
        // The checkpoint freezes what is on disk now.
        self.flush()?;
        let record = checkpoint::create(&self.context.store, self.shared.number, message, now_ms())
            .map_err(|e| store_rpc_error(&e))?;
        self.context.events.publish(
            event_kind::CHECKPOINT_CREATED,
            json!({"workspace_id": self.shared.id.to_string(), "checkpoint_id": record.id.to_string()}),
        );
        Ok(json!({"checkpoint_id": record.id.to_string()}))
    }

    fn restore(&mut self, id: CheckpointId) -> Result<Value, RpcError> {
        if self.is_paused() {
            return Err(self.paused_error());
        }
        let store = self.context.store.clone();
        let number = self.shared.number;
        let not_found = || {
            RpcError::new(
                ErrorCode::CheckpointNotFound,
                format!("no checkpoint {id} in workspace '{}'", self.shared.name),
            )
        };
        if store
            .checkpoint(number, id)
            .map_err(|e| store_rpc_error(&e))?
            .is_none()
        {
            return Err(not_found());
        }
        self.scan(Scope::Full, false)?;
        let undo = checkpoint::create(
            &store,
            number,
            format!("before restoring checkpoint {id}"),
            now_ms(),
        )
        .map_err(|e| store_rpc_error(&e))?;
        store
            .set_restore_intent(number, Some(id))
            .map_err(|e| store_rpc_error(&e))?;
        let mut result = self.run_restore(id)?;
        result["undo_checkpoint_id"] = undo.id.to_string().into();
        Ok(result)
    }

    /// Applies checkpoint `id` to the tree, then re-indexes and clears the
    /// restore intent. Safe to run again after a crash: it only writes what
    /// still differs.
    fn run_restore(&mut self, id: CheckpointId) -> Result<Value, RpcError> {
        let store = self.context.store.clone();
        let number = self.shared.number;
        self.shared.update(|s| s.activity = Activity::Restoring);
        let mut target_is_empty = false;
        let outcome = (|| -> Result<checkpoint::RestoreReport, RpcError> {
            let (_, target) = checkpoint::load(&store, number, id)
                .map_err(|e| store_rpc_error(&e))?
                .ok_or_else(|| {
                    RpcError::new(ErrorCode::CheckpointNotFound, format!("no checkpoint {id}"))
                })?;
            target_is_empty = target.is_empty();
            let current =
                checkpoint::live_manifest(&store, number).map_err(|e| store_rpc_error(&e))?;
            checkpoint::restore(&store, &self.shared.root, &current, &target).map_err(|e| match e {
                RestoreError::Store(e) => store_rpc_error(&e),
                RestoreError::Corrupt(..) => {
                    self.context.events.publish(
                        event_kind::STORE_CORRUPT,
                        json!({"workspace_id": self.shared.id.to_string(), "message": e.to_string()}),
                    );
                    RpcError::new(ErrorCode::StoreCorrupt, e.to_string())
                }
            })
        })();
        self.shared.update(|s| s.activity = Activity::Idle);
        // The tree is written (or cannot be): the intent is done either way.
        // Left set, a later start would replay it over newer work.
        let cleared = store.set_restore_intent(number, None);
        let report = outcome?;
        cleared.map_err(|e| store_rpc_error(&e))?;
        // Restoring an empty checkpoint empties the root on purpose.
        self.scan_with(Scope::Full, false, target_is_empty)?;
        for error in &report.errors {
            tracing::warn!(workspace = %self.shared.name, "restore: {error}");
        }
        self.context.events.publish(
            event_kind::RESTORE_FINISHED,
            json!({
                "workspace_id": self.shared.id.to_string(),
                "checkpoint_id": id.to_string(),
                "written": report.written,
                "deleted": report.deleted,
                "errors": report.errors,
            }),
        );
        Ok(json!({
            "checkpoint_id": id.to_string(),
            "written": report.written,
            "deleted": report.deleted,
            "errors": report.errors,
        }))
    }

    fn finish_interrupted_restore(&mut self) {
        match self.context.store.restore_intent(self.shared.number) {
            Ok(Some(id)) => {
                tracing::info!(workspace = %self.shared.name, "finishing the restore of checkpoint {id} that was interrupted");
                // What is on disk now may hold work: keep it restorable.
                if let Err(e) = checkpoint::create(
                    &self.context.store,
                    self.shared.number,
                    format!("before finishing the interrupted restore of checkpoint {id}"),
                    now_ms(),
                ) {
                    tracing::error!(workspace = %self.shared.name, "cannot checkpoint before finishing the restore: {e}");
                    return;
                }
                if let Err(e) = self.run_restore(id) {
                    tracing::error!(workspace = %self.shared.name, "cannot finish the interrupted restore: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("cannot read restore intent: {e}"),
        }
    }
}

/// Threads for writing files received from peers: fsync-bound work scales
/// past the core count.
fn io_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(8)
            .thread_name(|i| format!("apply-{i}"))
            .build()
            .expect("building the apply thread pool")
    })
}

/// An entry from a peer we are willing to apply: chunk lengths within the
/// chunker's bounds and adding up to the size, links that stay inside.
fn valid_remote(entry: &FileEntry) -> bool {
    // Never VCS metadata (a peer writing .git/hooks runs code here) nor the
    // daemon's own temporary names.
    if entry
        .path
        .components()
        .any(|c| scan::VCS_DIRS.contains(&c) || c.starts_with(scan::TEMP_PREFIX))
    {
        return false;
    }
    if !entry.version.is_well_formed() || entry.modified_by.len() > 128 {
        return false;
    }
    if entry.deleted {
        return true;
    }
    match entry.kind {
        FileKind::File => {
            entry
                .chunks
                .iter()
                .all(|c| c.len > 0 && c.len <= CONTENT_CHUNKS.max)
                && entry.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() == entry.size
        }
        FileKind::Symlink => entry
            .symlink_target
            .as_deref()
            .is_some_and(|t| !scan::link_escapes(&entry.path, t)),
        FileKind::Directory => true,
    }
}

/// Writes (or deletes) `remote` at its path, replacing only what `local`
/// says is there; returns the stat to cache.
fn write_remote(
    root: &Path,
    remote: &FileEntry,
    local: Option<&FileEntry>,
    reader: &ChunkReader,
) -> Result<Option<StatCache>, materialize::WriteError> {
    let path = materialize::resolve_inside(root, &remote.path)?;
    let io = |source| materialize::WriteError::Io {
        path: remote.path.to_string(),
        source,
    };
    let live_local = local.filter(|l| !l.deleted);
    if remote.deleted {
        match live_local {
            Some(l) if l.kind == FileKind::Directory => match std::fs::remove_dir(&path) {
                // Still holds something the peer never had (ignored build
                // output): it stays; at worst an empty directory comes back.
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    tracing::info!(path = %remote.path, "deleted by a peer but not empty here; kept");
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            },
            Some(l) => {
                // Moved aside first, then checked: a save that lands
                // meanwhile either goes to a new file at `path` (kept) or
                // into the moved file (which then goes back).
                let aside =
                    path.with_file_name(format!("{}del-{}", scan::TEMP_PREFIX, std::process::id()));
                match std::fs::rename(&path, &aside) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(e)),
                    Ok(()) => {
                        if crate::checkpoint::on_disk_matches(
                            &aside,
                            &crate::store::ManifestEntry::from_entry(l),
                        ) {
                            std::fs::remove_file(&aside).map_err(io)?;
                        } else {
                            materialize::rename_noreplace(&aside, &path).map_err(io)?;
                            return Err(io(std::io::Error::other("changed on disk; kept")));
                        }
                    }
                }
            }
            None => {}
        }
        return Ok(None);
    }
    if remote.kind == FileKind::Directory {
        std::fs::create_dir_all(&path).map_err(io)?;
        return Ok(None);
    }
    prepare_remote(
        root,
        remote,
        live_local,
        reader,
        materialize::Durability::Fsync,
        None,
    )?
    .finish(remote)
}

/// A plain file's or link's new version, written beside its target, and
/// what the target must still be when it is renamed over it.
struct Pending {
    prepared: materialize::Prepared,
    expected: Expected,
}

impl Pending {
    fn finish(self, remote: &FileEntry) -> Result<Option<StatCache>, materialize::WriteError> {
        let target = self.prepared.target().to_path_buf();
        self.prepared.finish(self.expected)?;
        Ok(written_stat(&target, remote))
    }
}

/// Checks that the local version on disk is the one the index knows (else
/// it is an edit not indexed yet: kept), then writes the new version beside
/// it. The caller fsyncs the directory once for all the files it renames.
fn prepare_remote(
    root: &Path,
    remote: &FileEntry,
    local: Option<&FileEntry>,
    reader: &ChunkReader,
    durability: materialize::Durability,
    known: Option<&materialize::KnownDirs>,
) -> Result<Pending, materialize::WriteError> {
    let path = materialize::resolve_inside_known(root, &remote.path, known)?;
    let io = |source| materialize::WriteError::Io {
        path: remote.path.to_string(),
        source,
    };
    let live_local = local.filter(|l| !l.deleted);
    let expected = match live_local {
        Some(l) if l.kind != FileKind::Directory => {
            let before = Identity::of(&path);
            if !crate::checkpoint::on_disk_matches(
                &path,
                &crate::store::ManifestEntry::from_entry(l),
            ) {
                return Err(io(std::io::Error::other("changed on disk; kept")));
            }
            match (before, Identity::of(&path)) {
                (Some(a), Some(b)) if a == b => Expected::Present(a),
                (None, None) => Expected::Absent,
                _ => return Err(io(std::io::Error::other("changed on disk; kept"))),
            }
        }
        _ => Expected::Absent,
    };
    let prepared = materialize::prepare_entry_at(
        path,
        &crate::store::ManifestEntry::from_entry(remote),
        reader,
        durability,
    )?;
    Ok(Pending { prepared, expected })
}

/// The stat to cache for a file just written from a peer's entry, so that
/// the scan its watcher events start does not read it all again. Only when
/// the file still has the size and the mtime we gave it, and that stat is
/// settled ([`scan::stat_is_settled`]): a later write (an editor's, in place
/// or by rename) changes it, and the next scan reads the file. The ctime is
/// that of our own rename, after the mtime we set unless the peer's clock
/// is ahead: its tick need not be over, since what remains in that tick is
/// another writer setting the peer's very mtime back by hand. A file dated
/// in the future keeps no cache: the next scan reads it once.
fn written_stat(path: &Path, remote: &FileEntry) -> Option<StatCache> {
    let stat = scan::stat_of(&std::fs::symlink_metadata(path).ok()?);
    let settled = scan::stat_is_settled(&stat, scan::now_ns(), 0);
    (settled && stat.size == remote.size && stat.mtime_ns == remote.mtime_ns).then_some(stat)
}

/// Renames our losing version to its conflict name, if it is still what
/// the index says (a file saved meanwhile is not moved over).
fn move_aside(root: &Path, local: &FileEntry, conflict_path: &RelPath) -> std::io::Result<()> {
    if local.deleted || local.kind == FileKind::Directory {
        return Ok(());
    }
    let from = materialize::resolve_inside(root, &local.path).map_err(std::io::Error::other)?;
    let to = materialize::resolve_inside(root, conflict_path).map_err(std::io::Error::other)?;
    if !crate::checkpoint::on_disk_matches(&from, &crate::store::ManifestEntry::from_entry(local)) {
        return Err(std::io::Error::other(
            "changed on disk since it was indexed",
        ));
    }
    match materialize::rename_noreplace(&from, &to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Chunks that failed their check when read: each reported (log and a
/// `store_corrupt` event) and dropped from the store, so that a scan that
/// still finds the content on disk stores it again instead of trusting the
/// bad copy, and what needs it from a peer fetches it again. The caller
/// owes the repair of the index entries that name them.
pub fn drop_corrupt_chunks(
    store: &Store,
    events: &EventLog,
    corrupt: &[(ChunkHash, String)],
) -> Result<(), StoreError> {
    for (hash, why) in corrupt {
        tracing::error!("corrupt chunk {hash}: {why}");
        events.publish(
            event_kind::STORE_CORRUPT,
            json!({"chunk": hash.to_hex(), "message": why}),
        );
        store.drop_chunk(hash)?;
    }
    Ok(())
}

pub fn store_rpc_error(error: &StoreError) -> RpcError {
    match error {
        StoreError::CorruptChunk { .. } | StoreError::MissingChunk(_) => {
            RpcError::new(ErrorCode::StoreCorrupt, error.to_string())
        }
        _ => RpcError::new(ErrorCode::StoreFailed, error.to_string()),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The chunks `entries` need that the store lacks, for the entries the
/// sans-IO core would apply now. Read-only: run beside the worker (a stale
/// answer costs a chunk fetched for nothing, or an entry tried again later).
pub fn plan_remote(
    store: &Store,
    number: u32,
    entries: &[FileEntry],
) -> Result<Vec<ChunkRef>, StoreError> {
    let reader = store.reader()?;
    let mut missing = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for remote in entries {
        if remote.kind != FileKind::File || remote.deleted || !valid_remote(remote) {
            continue;
        }
        let local = store.file(number, remote.path.as_str())?;
        if sync::decide(local.as_ref().map(|l| &l.entry), remote) == sync::Decision::Ignore {
            continue;
        }
        for chunk in &remote.chunks {
            if seen.insert(chunk.hash) && !reader.contains(&chunk.hash)? {
                missing.push(*chunk);
            }
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watcher_drops_temporary_files_but_not_cookies() {
        let temp = format!("/ws/src/{}123-ab", scan::TEMP_PREFIX);
        assert!(is_temp_file(Path::new(&temp)));
        let deleted = format!("/ws/{}del-123", scan::TEMP_PREFIX);
        assert!(is_temp_file(Path::new(&deleted)));
        // The cookie a flush waits for must reach the worker.
        let cookie = format!("/ws/{}{COOKIE_PREFIX}123-4", scan::TEMP_PREFIX);
        assert!(!is_temp_file(Path::new(&cookie)));
        assert!(!is_temp_file(Path::new("/ws/src/main.rs")));
        assert!(!is_temp_file(Path::new("/ws/.mariesync-tm")));
    }

    #[test]
    fn counts_read_across_a_change_are_not_kept() {
        let mut status = Status::new(Activity::Idle);
        let stale = Totals {
            files: 4919,
            ..Totals::default()
        };
        let fresh = Totals {
            files: 5004,
            ..Totals::default()
        };
        // A count starts, an apply commits, the count ends: not kept.
        let read_at = status.totals_epoch;
        status.invalidate_totals();
        status.keep_totals(read_at, stale);
        assert_eq!(status.totals, None);
        // Read with nothing changing meanwhile: kept.
        status.keep_totals(status.totals_epoch, fresh);
        assert_eq!(status.totals, Some(fresh));
        status.invalidate_totals();
        assert_eq!(status.totals, None);
    }
}
