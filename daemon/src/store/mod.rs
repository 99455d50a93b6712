//! The device's one redb database: content-addressed chunks, the file index of
//! every workspace, checkpoints and daemon metadata.
//!
//! **Architecture Invariant:** a chunk is written in the same transaction as
//! the first index entry or manifest that references it, and garbage
//! collection runs inside one write transaction, so no reader ever sees an
//! entry whose chunks are missing.
//!
//! **Architecture Invariant:** fail-stop, then reopen. After a failed commit
//! (a full disk, an I/O error) the database handle is dropped, never written
//! through again: calls fail with `StoreError::Failed` until the database
//! opens again from disk (tried on use, 1 s apart, doubling to 30 s), which is
//! what a restart of the daemon would do: redb recovers the last durable
//! commit, and the in-memory marks are read again from it.

mod chunks;
mod records;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mariesync_protocol::{CheckpointId, ChunkHash, FileEntry, RelPath, WorkspaceId};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

pub use chunks::{
    CONTENT_CHUNKS, ChunkBytes, ChunkParams, EncodedChunk, MANIFEST_CHUNKS, chunk_boundaries,
    decode_chunk, decode_chunk_owned, decode_chunk_owned_unhashed, encode_chunk, encode_chunk_with,
    verify_chunk,
};
pub use records::{
    CheckpointRecord, IndexedFile, ManifestEntry, PeerRecord, StatCache, WorkspaceRecord,
    WorkspaceState,
};

/// (pack, part) -> bytes. The chunks one commit adds are concatenated into
/// a *pack*, cut into parts of [`PART_BYTES`]:
/// - pack numbers only grow, so commits append at the right edge of the
///   B-tree instead of copying leaves all over it (random blake3 keys made
///   the file 4x its data);
/// - a part fills a 64 KiB page exactly, so only a pack's last part is
///   rounded up (one value per chunk cost 1.5x the data in page rounding).
const CHUNK_DATA: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("chunk_packs");
/// chunk hash -> (pack, offset in pack, stored bytes, raw bytes). Small, so
/// lookups, GC and stats never read chunk data.
const CHUNK_INFO: TableDefinition<[u8; 32], (u64, u32, u32, u32)> =
    TableDefinition::new("chunk_index");

/// A pack's size and its live chunks (hash, offset, stored bytes, raw bytes),
/// as GC sees them.
type PackUse = (u64, Vec<([u8; 32], u32, u32, u32)>);

/// A part plus its key and leaf header fits one 64 KiB redb page (measured:
/// 65,536 - 16 spills into a 128 KiB page, 65,536 - 32 does not).
const PART_BYTES: usize = 64 * 1024 - 64;
/// GC rewrites a pack whose live bytes fell below this share of it.
const PACK_LIVE_RATIO_MIN: f64 = 0.5;
/// workspace number -> WorkspaceRecord.
const WORKSPACES: TableDefinition<u32, &[u8]> = TableDefinition::new("workspaces");
/// (workspace number, path) -> IndexedFile.
const FILES: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("files");
/// (workspace number, sequence) -> path: the change feed replication reads.
const SEQUENCES: TableDefinition<(u32, u64), &str> = TableDefinition::new("sequences");
/// (workspace number, checkpoint id) -> CheckpointRecord.
const CHECKPOINTS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("checkpoints");
/// device id -> PeerRecord: the devices this one trusts.
const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers");
/// Small named values: schema version, counters, restore intents.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// In `META`: the number the next workspace added gets, at least.
const NEXT_WORKSPACE_NUMBER: &str = "next_workspace_number";
/// (document name, part number) -> Automerge bytes: part 0 a full save,
/// the others incremental saves appended since, loaded in order.
const SETTINGS_DOCS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("settings_docs");

/// 2: chunk data keyed by ascending chunk number; 3: chunks in packs;
/// 4: index entries name the device that made them.
const SCHEMA_VERSION: u32 = 4;
/// In META: chunks and stored bytes ever received from peers (two u64 LE).
const FETCHED_KEY: &str = "stats/fetched";
const REOPEN_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const REOPEN_LAST: std::time::Duration = std::time::Duration::from_secs(30);
/// In META: the highest version counter this device issued (u64 LE).
const COUNTER_KEY: &str = "version/counter";
/// In META, while present: entries committed without durability may have
/// been served to peers, so the next open moves every workspace's next
/// sequence number and the version counter [`LEASE_AHEAD`] past what it
/// finds (see [`Store::changes_since`]). A clean close removes it.
const LEASE_KEY: &str = "lease/ahead";
/// How far past the last durable commit entries committed without
/// durability may be served: sequence numbers per workspace, and version
/// counters. After a crash, numbering goes on this far past the durable
/// state, so no number a peer saw is ever given to another change.
const LEASE_AHEAD: u64 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] redb::Error),
    #[error(
        "the database failed a write (a full disk?) and is not open again yet; it is tried again shortly"
    )]
    Failed,
    #[error("chunk {hash} is corrupt: {reason}")]
    CorruptChunk { hash: ChunkHash, reason: String },
    #[error("chunk {0} is missing from the store")]
    MissingChunk(ChunkHash),
    #[error("a stored record is unreadable: {0}")]
    Record(String),
    #[error(
        "the database has schema {found}, this build reads schema {SCHEMA_VERSION}; move the home's mariesync.redb away (it was written by another development build)"
    )]
    Schema { found: u32 },
    /// A batch numbered before the database opened again (after a failed
    /// write) and moved its numbering on: committed, its entries would sit
    /// below a head peers may have been given already.
    #[error(
        "the database opened again while these changes were being numbered; they are scanned again"
    )]
    Renumbered,
}

macro_rules! impl_from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError { StoreError::Database(e.into()) }
        }
    )*};
}
impl_from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Default)]
struct Marks {
    durable: std::collections::HashMap<u32, u64>,
    pending: std::collections::HashMap<u32, u64>,
    /// Per workspace, the highest `servable` mark given out: it never goes
    /// back (an entry once safe to serve stays safe until the database
    /// opens again), so a peer's pull never sees less than an earlier one.
    served: std::collections::HashMap<u32, u64>,
    /// The version counter saved by the last durable commit.
    counter_durable: u64,
    /// [`LEASE_KEY`] is in the database (committed), and durably so.
    lease_written: bool,
    lease_durable: bool,
}

impl Marks {
    /// The sequence number before which entries of `workspace` may be
    /// served to peers: everything durable, and what was committed since
    /// within the durable lease, as long as no version counter issued is
    /// beyond the lease either (a crash moves numbering past both).
    fn servable(&mut self, workspace: u32, counter_issued: u64) -> u64 {
        let durable = self.durable.get(&workspace).copied().unwrap_or(1);
        let leased = self.lease_durable
            && counter_issued <= self.counter_durable.saturating_add(LEASE_AHEAD);
        let now = match self.pending.get(&workspace) {
            Some(&pending) if leased => pending
                .min(durable.saturating_add(LEASE_AHEAD))
                .max(durable),
            _ => durable,
        };
        let served = self.served.entry(workspace).or_insert(now);
        *served = (*served).max(now);
        *served
    }
}

pub struct Store {
    /// None between dropping a failed handle and opening the file again.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    path: std::path::PathBuf,
    failed: AtomicBool,
    /// When the database may next be opened again after a failure, and
    /// the wait after that one if it fails too (1 s, doubling to 30 s: an
    /// open may run redb's repair of the whole file).
    reopen_at: Mutex<(Option<std::time::Instant>, std::time::Duration)>,
    /// Held by a write transaction from its start to its commit.
    writer: Mutex<()>,
    /// Serialises read-modify-write of workspace records across workers.
    workspace_lock: Mutex<()>,
    /// Held shared by everyone between deciding "the store has this chunk"
    /// and committing a reference to it (scans, checkpoints); held
    /// exclusively by whatever deletes chunks (GC, dropping a corrupt one).
    /// Without it, GC could delete a chunk a scan has just chosen to reuse.
    references: std::sync::RwLock<()>,
    /// Per workspace, the next sequence number as of the last durable
    /// commit, and as of non-durable commits since. A crash rolls
    /// non-durable ones back: they are served to peers only within the
    /// durable lease ([`LEASE_KEY`]), past which numbering restarts.
    marks: Mutex<Marks>,
    /// Chunks fetched from peers and committed before the entries that
    /// will reference them (counted: two pulls may fetch one chunk). GC
    /// keeps them; see [`Store::pin`].
    pinned: Mutex<HashMap<ChunkHash, u32>>,
    /// The highest version counter this device issued, and the highest one
    /// committed to META with the entries that carry it (see
    /// [`Store::issue_version_counter`]).
    counter_issued: AtomicU64,
    counter_saved: AtomicU64,
    /// Moves each time the database opens again after a failure.
    generation: AtomicU64,
}

/// A clean close: one durable commit makes everything committed durable
/// and removes the lease, so the next open need not move numbering on.
impl Drop for Store {
    fn drop(&mut self) {
        let leased = self
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lease_written;
        if !leased || self.failed.load(Ordering::Acquire) || std::thread::panicking() {
            return;
        }
        let closed = self.begin_write().and_then(|txn| {
            txn.open_table(META)?.remove(LEASE_KEY)?;
            self.commit(txn)
        });
        if let Err(e) = closed {
            tracing::warn!("the database did not close cleanly: {e}");
        }
    }
}

/// Chunks kept from GC until this is dropped.
pub struct Pins {
    store: std::sync::Arc<Store>,
    hashes: Vec<ChunkHash>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut pinned = self.store.pinned.lock().unwrap_or_else(|e| e.into_inner());
        for hash in &self.hashes {
            if let Some(count) = pinned.get_mut(hash) {
                *count -= 1;
                if *count == 0 {
                    pinned.remove(hash);
                }
            }
        }
    }
}

/// Everything one scan batch commits at once.
#[derive(Default)]
pub struct Batch {
    pub chunks: Vec<EncodedChunk>,
    /// Whether `chunks` came from a peer: counted as fetched (see
    /// [`StoreStats::fetched_chunks`]).
    pub chunks_fetched: bool,
    pub upserts: Vec<IndexedFile>,
    /// Paths to drop from the index without a tombstone (now ignored).
    pub forget: Vec<RelPath>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    pub chunks: u64,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    /// redb's own accounting: bytes of keys and values, of its B-tree
    /// metadata, and lost to page rounding and free space.
    pub database_stored_bytes: u64,
    pub database_metadata_bytes: u64,
    pub database_fragmented_bytes: u64,
    /// Chunks (and their stored bytes) ever received from peers and
    /// stored: a chunk fetched twice counts twice.
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub corrupt: Vec<(ChunkHash, String)>,
    pub missing: Vec<(ChunkHash, String)>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        // A new file goes through redb's recovery path too: only an existing
        // database being repaired is news.
        let db = open_database(path)?;
        let store = Store {
            db: std::sync::RwLock::new(Some(Arc::new(db))),
            path: path.to_path_buf(),
            failed: AtomicBool::new(false),
            reopen_at: Mutex::new((None, REOPEN_FIRST)),
            writer: Mutex::new(()),
            workspace_lock: Mutex::new(()),
            references: std::sync::RwLock::new(()),
            marks: Mutex::new(Marks::default()),
            pinned: Mutex::new(HashMap::new()),
            counter_issued: AtomicU64::new(0),
            counter_saved: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        };
        store.init()?;
        apply_lease(&*store.current_db()?)?;
        store.load_marks()?;
        Ok(store)
    }

    /// The in-memory state that follows the database, read from it (at
    /// open, and when it opens again after a failure).
    fn load_marks(&self) -> Result<()> {
        // Under the marks' lock, which a commit holds until it has noted
        // what it committed: none is noted after this reads the database.
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let (counter, saved) = self.saved_version_counter()?;
        self.counter_issued.fetch_max(counter, Ordering::AcqRel);
        self.counter_saved
            .store(if saved { counter } else { 0 }, Ordering::Release);
        // Everything found at open is durable; `apply_lease` removed the
        // lease.
        let workspaces = self.workspaces()?;
        *marks = Marks {
            counter_durable: counter,
            ..Marks::default()
        };
        for (number, record) in workspaces {
            marks.durable.insert(number, record.next_sequence);
        }
        Ok(())
    }

    /// The database, opened again first if a commit failed (see
    /// `reopen`).
    fn db(&self) -> Result<Arc<Database>> {
        if self.failed.load(Ordering::Acquire) {
            self.reopen();
        }
        self.current_db()
    }

    /// Moves each time the database opens again after a failure: what was
    /// committed without durability before it may be gone (workers repair
    /// their index when it moves).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The database as it is, if it has not failed.
    fn current_db(&self) -> Result<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|_| !self.failed.load(Ordering::Acquire))
            .ok_or(StoreError::Failed)
    }

    fn reopen(&self) {
        let now = std::time::Instant::now();
        {
            let mut at = self.reopen_at.lock().unwrap_or_else(|e| e.into_inner());
            if at.0.is_some_and(|at| now < at) {
                return;
            }
            let wait = at.1;
            *at = (Some(now + wait), (wait * 2).min(REOPEN_LAST));
        }
        // No commit until the marks follow the database again. Never
        // called with the writer lock held: while a write transaction is
        // open, no commit can fail, so `failed` stays false.
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        if !self.failed.load(Ordering::Acquire) {
            return;
        }
        // Ours goes. A reader still holding the old handle gets errors, or
        // what it had cached: chunk bytes are checked against their hashes
        // where they are used, and the index is read afresh per call.
        slot.take();
        match open_database(&self.path).and_then(|db| {
            // What was committed without durability is gone: numbering
            // moves past what peers may have been served of it.
            apply_lease(&db)?;
            Ok(db)
        }) {
            Ok(db) => {
                *slot = Some(Arc::new(db));
                self.failed.store(false, Ordering::Release);
                drop(slot);
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.reopen_at.lock().unwrap_or_else(|e| e.into_inner()).1 = REOPEN_FIRST;
                match self.load_marks() {
                    Ok(()) => tracing::info!("the database is open again and accepts writes"),
                    Err(e) => {
                        self.failed.store(true, Ordering::Release);
                        tracing::warn!("the database opened again but cannot be read: {e}");
                    }
                }
            }
            Err(e) => tracing::debug!("the database does not open again yet: {e}"),
        }
    }

    fn init(&self) -> Result<()> {
        let txn = self.begin_write()?;
        {
            // The schema is checked before any table is opened with this
            // build's types.
            let found = txn
                .open_table(META)?
                .get("schema")?
                .map(|v| u32_from(v.value()));
            if let Some(found) = found.filter(|v| *v != SCHEMA_VERSION) {
                return Err(StoreError::Schema { found });
            }
            txn.open_table(CHUNK_DATA)?;
            txn.open_table(CHUNK_INFO)?;
            txn.open_table(WORKSPACES)?;
            txn.open_table(FILES)?;
            txn.open_table(SEQUENCES)?;
            txn.open_table(CHECKPOINTS)?;
            txn.open_table(PEERS)?;
            txn.open_table(SETTINGS_DOCS)?;
            let mut meta = txn.open_table(META)?;
            if found.is_none() {
                meta.insert("schema", SCHEMA_VERSION.to_le_bytes().as_slice())?;
            }
        }
        self.commit(txn)
    }

    /// The highest version counter issued, and whether it is saved; for a
    /// database from before it was saved, the highest counter in the
    /// index (it is at least that; saved with the next commit).
    fn saved_version_counter(&self) -> Result<(u64, bool)> {
        let txn = self.db()?.begin_read()?;
        if let Some(saved) = txn.open_table(META)?.get(COUNTER_KEY)? {
            return Ok((u64_from(saved.value()), true));
        }
        Ok((highest_counter(&txn.open_table(FILES)?)?, false))
    }

    /// The counter for a new version this device makes of `version`: past
    /// every counter in it and every counter this device issued before,
    /// in any workspace, even one since removed. Saved with the commit of
    /// the batch that carries it (`commit_batch`), so a crash before that
    /// commit loses only counters no peer has seen.
    pub fn issue_version_counter(&self, version: &mariesync_protocol::VersionVector) -> u64 {
        let top = version.top();
        let previous = self
            .counter_issued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |issued| {
                Some(issued.max(top) + 1)
            })
            .unwrap_or_else(|issued| issued);
        previous.max(top) + 1
    }

    fn begin_write(&self) -> Result<Write<'_>> {
        self.begin_write_with(Durability::Immediate)
    }

    /// A write transaction, with the store's writer lock held until it is
    /// committed or dropped: a writer that waited while another's commit
    /// failed must not write through the failed handle (redb asserts on
    /// it), and it sees `failed` once it has the lock.
    fn begin_write_with(&self, durability: Durability) -> Result<Write<'_>> {
        if self.failed.load(Ordering::Acquire) {
            self.reopen();
        }
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // The handle as of now: one fetched before the lock may be a
        // failed one that another commit dropped meanwhile.
        // An error here is the database's (a previous write failed inside
        // a transaction): it opens again, as after a failed commit.
        let mut txn = self.current_db()?.begin_write().map_err(|e| {
            self.failed.store(true, Ordering::Release);
            tracing::error!("cannot start a write; the database opens again: {e}");
            e
        })?;
        txn.set_durability(durability)
            .map_err(|e| StoreError::Record(e.to_string()))?;
        Ok(Write {
            txn,
            _writer: writer,
        })
    }

    /// Commits, then notes what the commit made servable (a durable commit
    /// makes every earlier non-durable one durable too). The writer
    /// lock is held until the marks are noted (so no reopen reads the
    /// database in between), the marks' lock only for the noting: serving
    /// peers never waits for a commit's flush.
    fn commit_marked(
        &self,
        txn: Write<'_>,
        durable: bool,
        workspace_next: Option<(u32, u64)>,
        counter_saved: Option<u64>,
        lease_written: bool,
    ) -> Result<u64> {
        let Write { txn, _writer } = txn;
        self.commit_txn(txn)?;
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = counter_saved {
            self.counter_saved.fetch_max(counter, Ordering::AcqRel);
        }
        marks.lease_written |= lease_written;
        if let Some((workspace, next)) = workspace_next {
            let pending = marks.pending.entry(workspace).or_insert(0);
            *pending = (*pending).max(next);
        }
        if durable {
            let pending: Vec<(u32, u64)> = marks.pending.drain().collect();
            for (workspace, next) in pending {
                let mark = marks.durable.entry(workspace).or_insert(0);
                *mark = (*mark).max(next);
            }
            marks.counter_durable = marks
                .counter_durable
                .max(self.counter_saved.load(Ordering::Acquire));
            marks.lease_durable = marks.lease_written;
        }
        Ok(match workspace_next {
            Some((workspace, _)) => {
                let issued = self.counter_issued.load(Ordering::Acquire);
                marks.servable(workspace, issued)
            }
            None => 0,
        })
    }

    fn commit(&self, txn: Write<'_>) -> Result<()> {
        let Write { txn, _writer } = txn;
        self.commit_txn(txn)
    }

    fn commit_txn(&self, txn: redb::WriteTransaction) -> Result<()> {
        txn.commit().map_err(|e| {
            self.failed.store(true, Ordering::Release);
            tracing::error!(
                "database commit failed; no more writes until the database opens again: {e}"
            );
            StoreError::from(e)
        })
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    // ---- metadata ---------------------------------------------------------

    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    pub fn meta_put(&self, key: &str, value: Option<&[u8]>) -> Result<()> {
        self.meta_put_all(&[(key, value)])
    }

    /// Every metadata entry whose key starts with `prefix`.
    pub fn meta_scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(META)?;
        let mut out = Vec::new();
        for row in table.range(prefix..)? {
            let (key, value) = row?;
            if !key.value().starts_with(prefix) {
                break;
            }
            out.push((key.value().to_owned(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// [`Store::meta_put`] without waiting for the disk (durable with the
    /// next durable commit, lost by a crash before it), and only while
    /// workspace `number` is `id`. For what may be lost (progress that is
    /// read again), on paths where a sync costs, and that the workspace's
    /// removal forgets, written by a task that may end after it. Whether
    /// it was written.
    pub fn meta_put_lazy_for(
        &self,
        number: u32,
        id: WorkspaceId,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<bool> {
        let txn = self.begin_write_with(Durability::None)?;
        let present = match txn.open_table(WORKSPACES)?.get(number)? {
            Some(v) => records::decode::<WorkspaceRecord>(v.value())?.id == id,
            None => false,
        };
        if !present {
            let Write { txn, _writer } = txn;
            txn.abort()?;
            return Ok(false);
        }
        put_meta(&txn, &[(key, value)])?;
        self.commit(txn)?;
        Ok(true)
    }

    /// Writes several metadata entries in one durable commit.
    pub fn meta_put_all(&self, entries: &[(&str, Option<&[u8]>)]) -> Result<()> {
        self.meta_put_with(entries, Durability::Immediate)
    }

    fn meta_put_with(
        &self,
        entries: &[(&str, Option<&[u8]>)],
        durability: Durability,
    ) -> Result<()> {
        let txn = self.begin_write_with(durability)?;
        put_meta(&txn, entries)?;
        self.commit(txn)
    }

    // ---- workspaces -------------------------------------------------------

    pub fn workspaces(&self) -> Result<Vec<(u32, WorkspaceRecord)>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(WORKSPACES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value(), records::decode(v.value())?));
        }
        Ok(out)
    }

    pub fn workspace(&self, number: u32) -> Result<Option<WorkspaceRecord>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(WORKSPACES)?;
        table
            .get(number)?
            .map(|v| records::decode(v.value()))
            .transpose()
    }

    pub fn add_workspace(&self, record: &WorkspaceRecord) -> Result<u32> {
        let _guard = self
            .workspace_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let txn = self.begin_write()?;
        let number;
        {
            // Never a number a removed workspace had: what is keyed by it
            // outside the workspace's tables (a pull's progress saved as
            // the removal happens) cannot pass for the new one's.
            let mut table = txn.open_table(WORKSPACES)?;
            let mut meta = txn.open_table(META)?;
            let after_last = table.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            let unused = meta
                .get(NEXT_WORKSPACE_NUMBER)?
                .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
                .map_or(1, u32::from_le_bytes);
            number = after_last.max(unused);
            table.insert(number, records::encode(record).as_slice())?;
            meta.insert(NEXT_WORKSPACE_NUMBER, (number + 1).to_le_bytes().as_slice())?;
        }
        self.commit_marked(txn, true, Some((number, record.next_sequence)), None, false)?;
        Ok(number)
    }

    pub fn update_workspace(
        &self,
        number: u32,
        update: impl FnOnce(&mut WorkspaceRecord),
    ) -> Result<WorkspaceRecord> {
        let _guard = self
            .workspace_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let txn = self.begin_write()?;
        let record;
        {
            let mut table = txn.open_table(WORKSPACES)?;
            let mut current: WorkspaceRecord = match table.get(number)? {
                Some(v) => records::decode(v.value())?,
                None => return Err(StoreError::Record(format!("workspace {number} vanished"))),
            };
            update(&mut current);
            table.insert(number, records::encode(&current).as_slice())?;
            record = current;
        }
        self.commit(txn)?;
        Ok(record)
    }

    /// Removes a workspace and everything indexed for it. Chunks become
    /// garbage for the next collection.
    pub fn remove_workspace(&self, number: u32) -> Result<()> {
        let _guard = self
            .workspace_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let txn = self.begin_write()?;
        {
            txn.open_table(WORKSPACES)?.remove(number)?;
            txn.open_table(FILES)?
                .retain_in((number, "")..(number + 1, ""), |_, _| false)?;
            txn.open_table(SEQUENCES)?
                .retain_in((number, 0)..(number + 1, 0), |_, _| false)?;
            txn.open_table(CHECKPOINTS)?
                .retain_in((number, 0)..(number + 1, 0), |_, _| false)?;
            txn.open_table(META)?
                .remove(restore_intent_key(number).as_str())?;
        }
        self.commit(txn)
    }

    pub fn find_workspace_by_id(&self, id: WorkspaceId) -> Result<Option<u32>> {
        Ok(self
            .workspaces()?
            .into_iter()
            .find(|(_, r)| r.id == id)
            .map(|(n, _)| n))
    }

    // ---- chunks -----------------------------------------------------------

    pub fn has_chunk(&self, hash: &ChunkHash) -> Result<bool> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(CHUNK_INFO)?;
        Ok(table.get(hash.0)?.is_some())
    }

    /// A read snapshot for many chunk lookups in a row.
    pub fn reader(&self) -> Result<ChunkReader> {
        let txn = self.db()?.begin_read()?;
        Ok(ChunkReader {
            info: txn.open_table(CHUNK_INFO)?,
            data: txn.open_table(CHUNK_DATA)?,
            received: Vec::new(),
        })
    }

    pub fn stats(&self) -> Result<StoreStats> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(CHUNK_INFO)?;
        let mut stats = StoreStats::default();
        for row in table.iter()? {
            let (_, v) = row?;
            let (_, _, stored, raw) = v.value();
            stats.chunks += 1;
            stats.stored_bytes += u64::from(stored);
            stats.raw_bytes += u64::from(raw);
        }
        drop(table);
        if let Some(v) = txn.open_table(META)?.get(FETCHED_KEY)?
            && let Some((chunks, bytes)) = decode_fetched(v.value())
        {
            stats.fetched_chunks = chunks;
            stats.fetched_bytes = bytes;
        }
        drop(txn);
        // redb reports its page accounting from a write transaction; this
        // one changes nothing and is aborted.
        if let Ok(txn) = self.begin_write() {
            if let Ok(db) = txn.stats() {
                stats.database_stored_bytes = db.stored_bytes();
                stats.database_metadata_bytes = db.metadata_bytes();
                stats.database_fragmented_bytes = db.fragmented_bytes();
            }
            let _ = txn.txn.abort();
        }
        Ok(stats)
    }

    /// Forgets a chunk found corrupt, so the next scan of a file that still
    /// has this content stores it again. Its bytes stay in their pack until
    /// GC rewrites it.
    pub fn drop_chunk(&self, hash: &ChunkHash) -> Result<()> {
        let _exclusive = self.references.write().unwrap_or_else(|e| e.into_inner());
        let txn = self.begin_write()?;
        txn.open_table(CHUNK_INFO)?.remove(hash.0)?;
        self.commit(txn)
    }

    /// Keeps chunks from being deleted while the caller decides to reuse
    /// existing ones and commits references to them. Not reentrant: hold one
    /// at a time per thread.
    pub fn reference_guard(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.references.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `hashes` from GC until the returned [`Pins`] is dropped: for
    /// chunks committed (by [`Store::commit_fetched_chunks`]) before the
    /// entries that reference them. Drop the pins only after those entries
    /// committed; GC reads the pins under its exclusive reference lock, so
    /// a chunk is always either pinned or referenced when it looks.
    pub fn pin(self: &std::sync::Arc<Self>, hashes: Vec<ChunkHash>) -> Pins {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        for hash in &hashes {
            *pinned.entry(*hash).or_insert(0) += 1;
        }
        Pins {
            store: self.clone(),
            hashes,
        }
    }

    /// Commits verified chunks fetched from a peer, durably, so that a crash
    /// or an interrupted transfer never fetches them again. Pin them first.
    /// Counts those it lacked, in the same commit, in
    /// [`StoreStats::fetched_chunks`].
    pub fn commit_fetched_chunks(&self, chunks: &[EncodedChunk]) -> Result<()> {
        let txn = self.begin_write()?;
        let inserted = insert_chunks(&txn, chunks)?;
        count_fetched(&txn, inserted)?;
        self.commit_marked(txn, true, None, None, false)?;
        Ok(())
    }

    /// Commits chunks ahead of the entry that will reference them (a large
    /// file's chunks, so they need not all be held in memory). Only safe
    /// under a [`Store::reference_guard`] held until that entry commits.
    pub fn commit_chunks(&self, chunks: &[EncodedChunk]) -> Result<()> {
        let txn = self.begin_write_with(Durability::None)?;
        insert_chunks(&txn, chunks)?;
        self.commit_marked(txn, false, None, None, false)?;
        Ok(())
    }

    // ---- the file index ---------------------------------------------------

    pub fn file(&self, workspace: u32, path: &str) -> Result<Option<IndexedFile>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(FILES)?;
        table
            .get((workspace, path))?
            .map(|v| records::decode(v.value()))
            .transpose()
    }

    /// Every entry of a workspace (tombstones included) in path order, or
    /// those at or below `prefix`.
    pub fn files(&self, workspace: u32, prefix: Option<&RelPath>) -> Result<Vec<IndexedFile>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(FILES)?;
        let mut out = Vec::new();
        match prefix {
            None => decode_range(table.range((workspace, "")..(workspace + 1, ""))?, &mut out)?,
            Some(prefix) => {
                if let Some(v) = table.get((workspace, prefix.as_str()))? {
                    out.push(records::decode(v.value())?);
                }
                // Entries below `p` sort between "p/" and "p0" ('0' follows '/').
                let low = format!("{prefix}/");
                let high = format!("{prefix}0");
                decode_range(
                    table.range((workspace, low.as_str())..(workspace, high.as_str()))?,
                    &mut out,
                )?;
            }
        }
        Ok(out)
    }

    /// Commits one batch of scan results atomically: new chunks, index
    /// entries (with fresh sequence numbers already assigned by the caller
    /// from the workspace's next sequence number, which it moves on).
    /// A non-`durable` commit is made durable by the next durable one (or
    /// lost in a crash before it). Returns how far the workspace's entries
    /// are servable now (see [`Marks::servable`]). Refuses, with
    /// [`StoreError::Renumbered`], entries numbered below the workspace's
    /// next sequence number: the database opened again since they were
    /// numbered.
    pub fn commit_batch(
        &self,
        workspace: u32,
        batch: &Batch,
        next_sequence: u64,
        durable: bool,
    ) -> Result<u64> {
        let _guard = self
            .workspace_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let txn = self.begin_write_with(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let next_after;
        {
            let mut workspaces = txn.open_table(WORKSPACES)?;
            let mut record: WorkspaceRecord = match workspaces.get(workspace)? {
                Some(v) => records::decode(v.value())?,
                None => {
                    return Err(StoreError::Record(format!(
                        "workspace {workspace} vanished"
                    )));
                }
            };
            let inserted = insert_chunks(&txn, &batch.chunks)?;
            if batch.chunks_fetched {
                count_fetched(&txn, inserted)?;
            }
            let mut files = txn.open_table(FILES)?;
            let mut sequences = txn.open_table(SEQUENCES)?;
            for file in &batch.upserts {
                let path = file.entry.path.as_str();
                let old = files
                    .get((workspace, path))?
                    .map(|v| records::decode::<IndexedFile>(v.value()))
                    .transpose()?;
                let same_number = old
                    .as_ref()
                    .is_some_and(|old| old.entry.sequence == file.entry.sequence);
                if !same_number && file.entry.sequence < record.next_sequence {
                    return Err(StoreError::Renumbered);
                }
                if let Some(old) = old.filter(|_| !same_number) {
                    sequences.remove((workspace, old.entry.sequence))?;
                }
                files.insert((workspace, path), records::encode(file).as_slice())?;
                sequences.insert((workspace, file.entry.sequence), path)?;
            }
            for path in &batch.forget {
                if let Some(old) = files.remove((workspace, path.as_str()))? {
                    let old: IndexedFile = records::decode(old.value())?;
                    sequences.remove((workspace, old.entry.sequence))?;
                }
            }
            record.next_sequence = record.next_sequence.max(next_sequence);
            workspaces.insert(workspace, records::encode(&record).as_slice())?;
            next_after = record.next_sequence;
        }
        // Every counter in this batch was issued by now.
        let issued = self.counter_issued.load(Ordering::Acquire);
        if issued > self.counter_saved.load(Ordering::Acquire) {
            txn.open_table(META)?
                .insert(COUNTER_KEY, issued.to_le_bytes().as_slice())?;
        }
        // The lease goes in with the first commit after an open: durable
        // from the first durable one on (a full scan ends with one).
        let write_lease = !self
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lease_written;
        if write_lease {
            txn.open_table(META)?.insert(LEASE_KEY, [1u8].as_slice())?;
        }
        self.commit_marked(
            txn,
            durable,
            Some((workspace, next_after)),
            Some(issued),
            write_lease,
        )
    }

    /// Makes every commit so far durable, with an empty durable commit of
    /// `workspace`'s record. True when entries of `workspace` became
    /// servable only now, past `told` (what [`Store::commit_batch`] said
    /// was servable when peers were told): they need telling again.
    pub fn make_durable(&self, workspace: u32, told: u64) -> Result<bool> {
        Ok(self.commit_batch(workspace, &Batch::default(), 0, true)? > told)
    }

    // ---- checkpoints ------------------------------------------------------

    pub fn checkpoints(&self, workspace: u32) -> Result<Vec<CheckpointRecord>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(CHECKPOINTS)?;
        let mut out = Vec::new();
        for row in table.range((workspace, 0)..(workspace + 1, 0))? {
            let (_, v) = row?;
            out.push(records::decode(v.value())?);
        }
        Ok(out)
    }

    pub fn checkpoint(&self, workspace: u32, id: CheckpointId) -> Result<Option<CheckpointRecord>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(CHECKPOINTS)?;
        table
            .get((workspace, id.0))?
            .map(|v| records::decode(v.value()))
            .transpose()
    }

    /// Stores a checkpoint whose manifest chunks are `chunks` (new ones are
    /// written, known ones shared) and returns its id.
    pub fn add_checkpoint(
        &self,
        workspace: u32,
        chunks: &[EncodedChunk],
        make: impl FnOnce(CheckpointId) -> CheckpointRecord,
    ) -> Result<CheckpointRecord> {
        let _guard = self
            .workspace_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let txn = self.begin_write()?;
        let record;
        {
            insert_chunks(&txn, chunks)?;
            let mut table = txn.open_table(CHECKPOINTS)?;
            let next = table
                .range((workspace, 0)..(workspace + 1, 0))?
                .next_back()
                .transpose()?
                .map(|(k, _)| k.value().1 + 1)
                .unwrap_or(1);
            record = make(CheckpointId(next));
            table.insert((workspace, next), records::encode(&record).as_slice())?;
        }
        self.commit(txn)?;
        Ok(record)
    }

    /// Index entries (tombstones too) changed after `since`, in sequence
    /// order, at most `limit`: the durable ones, and those committed since
    /// within the durable lease (see [`Marks::servable`]).
    pub fn changes_since(&self, workspace: u32, since: u64, limit: usize) -> Result<ChangesSince> {
        // Read the mark first: what it covers is committed before the read.
        let issued = self.counter_issued.load(Ordering::Acquire);
        let mark = self
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .servable(workspace, issued);
        let txn = self.db()?.begin_read()?;
        let sequences = txn.open_table(SEQUENCES)?;
        let files = txn.open_table(FILES)?;
        let mut out = Vec::new();
        let mut more = false;
        for row in sequences.range((workspace, since.saturating_add(1))..(workspace, mark))? {
            if out.len() == limit {
                more = true;
                break;
            }
            let (_, path) = row?;
            if let Some(v) = files.get((workspace, path.value()))? {
                let file: IndexedFile = records::decode(v.value())?;
                out.push(file.entry);
            }
        }
        let head = mark.saturating_sub(1).max(since);
        let covered = match (more, out.last()) {
            (true, Some(last)) => last.sequence,
            _ => head,
        };
        Ok(ChangesSince {
            entries: out,
            more,
            covered,
            head,
        })
    }

    // ---- trusted peers ----------------------------------------------------

    pub fn peers(&self) -> Result<Vec<(String, PeerRecord)>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(PEERS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), records::decode(v.value())?));
        }
        Ok(out)
    }

    pub fn peer(&self, device_id: &str) -> Result<Option<PeerRecord>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(PEERS)?;
        table
            .get(device_id)?
            .map(|v| records::decode(v.value()))
            .transpose()
    }

    pub fn put_peer(&self, device_id: &str, record: &PeerRecord) -> Result<()> {
        let txn = self.begin_write()?;
        txn.open_table(PEERS)?
            .insert(device_id, records::encode(record).as_slice())?;
        self.commit(txn)
    }

    /// Returns whether the peer was trusted.
    pub fn remove_peer(&self, device_id: &str) -> Result<bool> {
        let txn = self.begin_write()?;
        let removed = txn.open_table(PEERS)?.remove(device_id)?.is_some();
        self.commit(txn)?;
        Ok(removed)
    }

    // ---- settings documents -----------------------------------------------

    /// The stored parts of a document, in load order.
    pub fn doc_parts(&self, doc: &str) -> Result<Vec<Vec<u8>>> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(SETTINGS_DOCS)?;
        let mut out = Vec::new();
        for row in table.range((doc, 0)..=(doc, u64::MAX))? {
            out.push(row?.1.value().to_vec());
        }
        Ok(out)
    }

    /// Appends an incremental save, and metadata entries, in one durable
    /// commit; returns how many parts the document has now.
    pub fn doc_append(
        &self,
        doc: &str,
        part: &[u8],
        meta: &[(&str, Option<&[u8]>)],
    ) -> Result<u64> {
        let txn = self.begin_write()?;
        let parts = {
            let mut table = txn.open_table(SETTINGS_DOCS)?;
            let next = table
                .range((doc, 0)..=(doc, u64::MAX))?
                .next_back()
                .transpose()?
                .map_or(0, |(k, _)| k.value().1 + 1);
            table.insert((doc, next), part)?;
            put_meta(&txn, meta)?;
            next + 1
        };
        self.commit(txn)?;
        Ok(parts)
    }

    /// Replaces every part of a document by one full save (compaction).
    pub fn doc_replace(&self, doc: &str, full: &[u8]) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(SETTINGS_DOCS)?;
            table.retain_in((doc, 0)..=(doc, u64::MAX), |_, _| false)?;
            table.insert((doc, 0), full)?;
        }
        self.commit(txn)
    }

    // ---- restore intents --------------------------------------------------

    pub fn restore_intent(&self, workspace: u32) -> Result<Option<CheckpointId>> {
        Ok(self
            .meta_get(&restore_intent_key(workspace))?
            .map(|v| CheckpointId(u64_from(&v))))
    }

    pub fn set_restore_intent(&self, workspace: u32, id: Option<CheckpointId>) -> Result<()> {
        let key = restore_intent_key(workspace);
        self.meta_put(
            &key,
            id.map(|id| id.0.to_le_bytes())
                .as_ref()
                .map(|b| b.as_slice()),
        )
    }

    // ---- integrity and garbage collection ---------------------------------

    /// Checks every chunk referenced by an index entry or a checkpoint: it
    /// exists, decompresses, and hashes to its id.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let reader = self.reader()?;
        let mut seen = HashSet::new();
        let broken = self.for_each_reference(&reader, |hash, len, owner| {
            if !seen.insert(hash) {
                return;
            }
            report.chunks_checked += 1;
            match reader.read(&hash, len) {
                Ok(_) => {}
                Err(StoreError::MissingChunk(_)) => report.missing.push((hash, owner.to_string())),
                Err(e) => report.corrupt.push((hash, format!("{owner}: {e}"))),
            }
        })?;
        for (id, error) in broken {
            report.corrupt.push((
                ChunkHash::of(b""),
                format!("the manifest of checkpoint {id} is unreadable: {error}"),
            ));
        }
        Ok(report)
    }

    /// Deletes every chunk that no index entry and no checkpoint references.
    /// Returns (chunks removed, stored bytes freed).
    pub fn collect_garbage(&self) -> Result<(u64, u64)> {
        let _exclusive = self.references.write().unwrap_or_else(|e| e.into_inner());
        let _guard = self
            .workspace_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Marking reads a snapshot; the sweep below runs in the one write
        // transaction, and the workspace lock keeps scans from committing
        // new references between the two.
        let reader = self.reader()?;
        let mut live = HashSet::new();
        let broken = self.for_each_reference(&reader, |hash, _, _| {
            live.insert(hash);
        })?;
        live.extend(
            self.pinned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .copied(),
        );
        drop(reader);
        if let Some((id, error)) = broken.first() {
            // What an unreadable manifest references is unknown: sweeping
            // now could delete it.
            return Err(StoreError::Record(format!(
                "garbage collection skipped: the manifest of checkpoint {id} is unreadable ({error})"
            )));
        }
        let txn = self.begin_write()?;
        let removed;
        let mut freed = 0;
        {
            let mut info = txn.open_table(CHUNK_INFO)?;
            let mut data = txn.open_table(CHUNK_DATA)?;
            // Per pack: its size, and its live chunks.
            let mut packs: std::collections::BTreeMap<u64, PackUse> = Default::default();
            for row in data.iter()? {
                let (k, v) = row?;
                packs.entry(k.value().0).or_default().0 += v.value().len() as u64;
            }
            let mut dead = Vec::new();
            for row in info.iter()? {
                let (k, v) = row?;
                let (pack, offset, stored, raw) = v.value();
                if live.contains(&ChunkHash(k.value())) {
                    packs
                        .entry(pack)
                        .or_default()
                        .1
                        .push((k.value(), offset, stored, raw));
                } else {
                    dead.push(k.value());
                }
            }
            for hash in &dead {
                info.remove(hash)?;
            }
            removed = dead.len() as u64;
            // Rewrite packs that are mostly dead: their live chunks move to a
            // new pack, the old one goes.
            let mut moved = Vec::new();
            let mut emptied = Vec::new();
            for (pack, (size, chunks)) in &packs {
                let live_bytes: u64 = chunks.iter().map(|c| u64::from(c.2)).sum();
                if (live_bytes as f64) < PACK_LIVE_RATIO_MIN * *size as f64 {
                    for &(hash, offset, stored, raw) in chunks {
                        let bytes = read_packed(&data, *pack, offset, stored)?;
                        moved.push(EncodedChunk {
                            hash: ChunkHash(hash),
                            raw_len: raw,
                            stored: bytes,
                        });
                    }
                    emptied.push((*pack, *size - live_bytes));
                }
            }
            for &(pack, dead_bytes) in &emptied {
                data.retain_in((pack, 0)..(pack + 1, 0), |_, _| false)?;
                freed += dead_bytes;
            }
            for chunk in &moved {
                info.remove(chunk.hash.0)?;
            }
            drop(info);
            drop(data);
            insert_chunks(&txn, &moved)?;
        }
        self.commit(txn)?;
        Ok((removed, freed))
    }

    /// Calls `f(hash, raw length, owner)` for every chunk reference, and
    /// returns the checkpoints whose manifest could not be read.
    fn for_each_reference(
        &self,
        reader: &ChunkReader,
        mut f: impl FnMut(ChunkHash, u32, &str),
    ) -> Result<Vec<(CheckpointId, String)>> {
        let mut broken = Vec::new();
        let txn = self.db()?.begin_read()?;
        let files = txn.open_table(FILES)?;
        for row in files.iter()? {
            let (_, v) = row?;
            let file: IndexedFile = records::decode(v.value())?;
            if file.entry.deleted {
                continue;
            }
            for chunk in &file.entry.chunks {
                f(chunk.hash, chunk.len, file.entry.path.as_str());
            }
        }
        let checkpoints = txn.open_table(CHECKPOINTS)?;
        let mut manifests_seen = HashSet::new();
        for row in checkpoints.iter()? {
            let (_, v) = row?;
            let record: CheckpointRecord = records::decode(v.value())?;
            let owner = format!("checkpoint {}", record.id);
            for chunk in &record.manifest {
                f(chunk.hash, chunk.len, &owner);
            }
            if !manifests_seen.insert(record.manifest_hash) {
                continue;
            }
            match load_manifest(reader, &record) {
                Ok(entries) => {
                    for entry in &entries {
                        for chunk in &entry.chunks {
                            f(chunk.hash, chunk.len, &owner);
                        }
                    }
                }
                Err(e) => broken.push((record.id, e.to_string())),
            }
        }
        Ok(broken)
    }

    /// Runs redb's own consistency check (needs exclusive access).
    pub fn check_integrity(path: &Path) -> Result<bool> {
        let mut db = Database::create(path)?;
        Ok(db.check_integrity()?)
    }
}

/// A write transaction and the store's writer lock (see
/// `Store::begin_write_with`).
struct Write<'a> {
    txn: redb::WriteTransaction,
    _writer: std::sync::MutexGuard<'a, ()>,
}

impl std::ops::Deref for Write<'_> {
    type Target = redb::WriteTransaction;

    fn deref(&self) -> &redb::WriteTransaction {
        &self.txn
    }
}

impl std::ops::DerefMut for Write<'_> {
    fn deref_mut(&mut self) -> &mut redb::WriteTransaction {
        &mut self.txn
    }
}

fn open_database(path: &Path) -> Result<Database> {
    // A new file goes through redb's recovery path too: only an existing
    // database being repaired is news.
    let announced = std::cell::Cell::new(!path.exists());
    Ok(Database::builder()
        .set_repair_callback(move |session| {
            if !announced.replace(true) {
                tracing::warn!("the database was not closed cleanly; checking and repairing it");
            }
            tracing::debug!("database repair {:.0}%", session.progress() * 100.0);
        })
        .set_cache_size(8 * 1024 * 1024)
        .create(path)?)
}

/// After an open: if the lease is in the database, entries committed
/// without durability may have been served to peers and lost since, so
/// every workspace's next sequence number and the version counter move
/// [`LEASE_AHEAD`] on, durably, and the lease goes. On the raw database:
/// a reopen holds the writer lock.
fn apply_lease(db: &Database) -> Result<()> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        if meta.remove(LEASE_KEY)?.is_none() {
            drop(meta);
            txn.abort()?;
            return Ok(());
        }
        let counter = match meta.get(COUNTER_KEY)?.map(|v| u64_from(v.value())) {
            Some(counter) => counter,
            None => highest_counter(&txn.open_table(FILES)?)?,
        };
        let counter = counter.saturating_add(LEASE_AHEAD);
        meta.insert(COUNTER_KEY, counter.to_le_bytes().as_slice())?;
        let mut workspaces = txn.open_table(WORKSPACES)?;
        let mut moved = Vec::new();
        for row in workspaces.iter()? {
            let (number, value) = row?;
            let mut record: WorkspaceRecord = records::decode(value.value())?;
            record.next_sequence = record.next_sequence.saturating_add(LEASE_AHEAD);
            moved.push((number.value(), record));
        }
        for (number, record) in moved {
            workspaces.insert(number, records::encode(&record).as_slice())?;
        }
        tracing::info!(
            "the last run ended without a clean close; sequence numbers and version counters move {LEASE_AHEAD} on"
        );
    }
    txn.commit()?;
    Ok(())
}

/// The highest counter in any version of the index: what a database from
/// before counters were saved has issued at least.
fn highest_counter(files: &impl ReadableTable<(u32, &'static str), &'static [u8]>) -> Result<u64> {
    let mut top = 0;
    for row in files.iter()? {
        let (_, value) = row?;
        let file: IndexedFile = records::decode(value.value())?;
        top = top.max(file.entry.version.top());
    }
    Ok(top)
}

/// Counts `inserted` (chunks and their stored bytes), received from
/// peers and new to the store, in [`StoreStats::fetched_chunks`] and
/// [`StoreStats::fetched_bytes`]: chunks that came twice count once.
fn count_fetched(txn: &redb::WriteTransaction, inserted: (u64, u64)) -> Result<()> {
    if inserted.0 == 0 {
        return Ok(());
    }
    let mut meta = txn.open_table(META)?;
    let (count, bytes) = meta
        .get(FETCHED_KEY)?
        .and_then(|v| decode_fetched(v.value()))
        .unwrap_or((0, 0));
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&(count + inserted.0).to_le_bytes());
    value[8..].copy_from_slice(&(bytes + inserted.1).to_le_bytes());
    meta.insert(FETCHED_KEY, value.as_slice())?;
    Ok(())
}

/// The value at [`FETCHED_KEY`]: chunks and stored bytes fetched, each
/// u64 LE; None if it is not 16 bytes.
fn decode_fetched(value: &[u8]) -> Option<(u64, u64)> {
    let value = <[u8; 16]>::try_from(value).ok()?;
    let (chunks, bytes) = value.split_at(8);
    Some((
        u64::from_le_bytes(chunks.try_into().ok()?),
        u64::from_le_bytes(bytes.try_into().ok()?),
    ))
}

/// Writes the chunks the store lacks as one new pack; how many it wrote,
/// and their stored bytes.
fn insert_chunks(txn: &redb::WriteTransaction, chunks: &[EncodedChunk]) -> Result<(u64, u64)> {
    if chunks.is_empty() {
        return Ok((0, 0));
    }
    let mut data = txn.open_table(CHUNK_DATA)?;
    let mut info = txn.open_table(CHUNK_INFO)?;
    let pack = data.last()?.map(|(k, _)| k.value().0 + 1).unwrap_or(1);
    let mut packed: Vec<&[u8]> = Vec::with_capacity(chunks.len());
    let mut total = 0usize;
    for chunk in chunks {
        if info.get(chunk.hash.0)?.is_some() {
            continue;
        }
        info.insert(
            chunk.hash.0,
            (pack, total as u32, chunk.stored.len() as u32, chunk.raw_len),
        )?;
        total += chunk.stored.len();
        packed.push(&chunk.stored);
    }
    let inserted = packed.len() as u64;
    // Each part is filled in place in redb's page: no copy of the whole
    // pack is ever assembled (it cost a copy of every byte and as much
    // memory again as the chunks).
    let mut pieces = packed.into_iter().flat_map(|stored| {
        stored.chunks(PART_BYTES) // a chunk may straddle parts
    });
    let mut carry: &[u8] = &[];
    for part in 0..total.div_ceil(PART_BYTES) {
        let len = PART_BYTES.min(total - part * PART_BYTES);
        let mut guard = data.insert_reserve((pack, part as u32), len)?;
        let mut out: &mut [u8] = guard.as_mut();
        while !out.is_empty() {
            if carry.is_empty() {
                carry = pieces
                    .next()
                    .ok_or_else(|| StoreError::Record("pack parts ran past their chunks".into()))?;
            }
            let n = carry.len().min(out.len());
            out[..n].copy_from_slice(&carry[..n]);
            out = &mut out[n..];
            carry = &carry[n..];
        }
    }
    Ok((inserted, total as u64))
}

/// The `stored` bytes at `offset` of `pack`, from the parts that hold them.
fn read_packed(
    data: &impl ReadableTable<(u64, u32), &'static [u8]>,
    pack: u64,
    offset: u32,
    stored: u32,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(stored as usize);
    for_each_piece(data, pack, offset, stored, |piece| {
        out.extend_from_slice(piece)
    })?;
    Ok(out)
}

/// Reads `out.len()` stored bytes at `offset` of `pack` into `out`.
fn read_packed_into(
    data: &impl ReadableTable<(u64, u32), &'static [u8]>,
    pack: u64,
    offset: u32,
    out: &mut [u8],
) -> Result<()> {
    let mut at = 0;
    for_each_piece(data, pack, offset, out.len() as u32, |piece| {
        out[at..at + piece.len()].copy_from_slice(piece);
        at += piece.len();
    })
}

/// Hands the `stored` bytes at `offset` of `pack` to `take`, a part's
/// piece at a time, in order; an error if the pack is shorter.
fn for_each_piece(
    data: &impl ReadableTable<(u64, u32), &'static [u8]>,
    pack: u64,
    offset: u32,
    stored: u32,
    mut take: impl FnMut(&[u8]),
) -> Result<()> {
    let (start, end) = (offset as usize, offset as usize + stored as usize);
    let short = || StoreError::Record(format!("pack {pack} is shorter than its index says"));
    let mut taken = 0;
    for part in start / PART_BYTES..end.div_ceil(PART_BYTES) {
        let Some(piece) = data.get((pack, part as u32))? else {
            return Err(StoreError::Record(format!(
                "part {part} of pack {pack} is missing"
            )));
        };
        let piece = piece.value();
        let part_start = part * PART_BYTES;
        let from = start.max(part_start) - part_start;
        let to = (end.min(part_start + piece.len())).saturating_sub(part_start);
        if from > to {
            return Err(short());
        }
        take(&piece[from..to]);
        taken += to - from;
    }
    if taken != stored as usize {
        return Err(short());
    }
    Ok(())
}

fn decode_range<K: redb::Key + 'static>(
    range: redb::Range<'_, K, &'static [u8]>,
    out: &mut Vec<IndexedFile>,
) -> Result<()> {
    for row in range {
        let (_, v) = row?;
        out.push(records::decode(v.value())?);
    }
    Ok(())
}

/// An answer of [`Store::changes_since`].
#[derive(Debug)]
pub struct ChangesSince {
    pub entries: Vec<FileEntry>,
    /// Whether more entries follow.
    pub more: bool,
    /// The sequence the answer covers up to (past gaps left by forgotten
    /// entries, so a reader can acknowledge everything).
    pub covered: u64,
    /// The last durable sequence: where the answers end.
    pub head: u64,
}

pub struct ChunkReader {
    info: redb::ReadOnlyTable<[u8; 32], (u64, u32, u32, u32)>,
    data: redb::ReadOnlyTable<(u64, u32), &'static [u8]>,
    /// Verified chunks not stored yet, read as if they were.
    received: Vec<EncodedChunk>,
}

impl ChunkReader {
    /// This reader, reading `chunks` too: verified chunks a peer pushed
    /// with the entries being applied, stored by the commit of those
    /// entries (`Batch::chunks`) rather than by one of their own before
    /// the files are written.
    pub fn with_received(mut self, chunks: Vec<EncodedChunk>) -> ChunkReader {
        self.received = chunks;
        self
    }

    /// The chunks [`ChunkReader::with_received`] gave, for their commit.
    pub fn take_received(&mut self) -> Vec<EncodedChunk> {
        std::mem::take(&mut self.received)
    }

    fn received(&self, hash: &ChunkHash) -> Option<&EncodedChunk> {
        self.received.iter().find(|c| c.hash == *hash)
    }

    pub fn contains(&self, hash: &ChunkHash) -> Result<bool> {
        Ok(self.received(hash).is_some() || self.stored(hash)?)
    }

    /// Whether the store itself has chunk `hash` (not counting received
    /// ones).
    pub fn stored(&self, hash: &ChunkHash) -> Result<bool> {
        Ok(self.info.get(hash.0)?.is_some())
    }

    /// Chunk `hash`'s bytes, verified against it.
    pub fn read(&self, hash: &ChunkHash, len: u32) -> Result<ChunkBytes> {
        decode_chunk_owned(hash, len, self.read_record(hash)?)
    }

    /// Chunk `hash`'s bytes, their length checked but not their hash: for
    /// a caller that hashes the whole it reads (a file against its content
    /// hash), and reads again with [`ChunkReader::read`] to name the chunk
    /// at fault when that fails.
    pub fn read_unhashed(&self, hash: &ChunkHash, len: u32) -> Result<ChunkBytes> {
        decode_chunk_owned_unhashed(hash, len, self.read_record(hash)?)
    }

    fn read_record(&self, hash: &ChunkHash) -> Result<Vec<u8>> {
        if let Some(chunk) = self.received(hash) {
            return Ok(chunk.stored.clone());
        }
        let at = self
            .stored_at(hash)?
            .ok_or(StoreError::MissingChunk(*hash))?;
        read_packed(&self.data, at.pack, at.offset, at.stored).map_err(|e| {
            StoreError::CorruptChunk {
                hash: *hash,
                reason: e.to_string(),
            }
        })
    }

    /// Where a chunk's stored form lies (for [`ChunkReader::read_stored_into`]),
    /// if it is here.
    pub fn stored_at(&self, hash: &ChunkHash) -> Result<Option<StoredAt>> {
        Ok(self.info.get(hash.0)?.map(|info| {
            let (pack, offset, stored, raw) = info.value();
            StoredAt {
                pack,
                offset,
                stored,
                raw,
            }
        }))
    }

    /// Reads the stored form of chunk `hash` found `at` into `out` (of its
    /// stored length) and verifies it: a corrupt chunk is never served.
    pub fn read_stored_into(&self, hash: &ChunkHash, at: &StoredAt, out: &mut [u8]) -> Result<()> {
        if out.len() != at.stored as usize {
            return Err(StoreError::Record(format!(
                "chunk {hash} is {} stored bytes, not {}",
                at.stored,
                out.len()
            )));
        }
        read_packed_into(&self.data, at.pack, at.offset, out)?;
        verify_chunk(hash, at.raw, out)
    }
}

/// Where a chunk's stored form lies in its pack, and its lengths.
#[derive(Clone, Copy, Debug)]
pub struct StoredAt {
    pack: u64,
    offset: u32,
    /// Length of the stored form (codec byte included).
    pub stored: u32,
    raw: u32,
}

/// Reads and decodes a checkpoint's manifest, verifying every chunk.
pub fn load_manifest(
    reader: &ChunkReader,
    record: &CheckpointRecord,
) -> Result<Vec<ManifestEntry>> {
    let mut bytes = Vec::with_capacity(record.manifest.iter().map(|c| c.len as usize).sum());
    for chunk in &record.manifest {
        bytes.extend_from_slice(&reader.read(&chunk.hash, chunk.len)?);
    }
    if ChunkHash::of(&bytes) != record.manifest_hash {
        return Err(StoreError::CorruptChunk {
            hash: record.manifest_hash,
            reason: "manifest hash mismatch".into(),
        });
    }
    postcard::from_bytes(&bytes)
        .map_err(|e| StoreError::Record(format!("manifest of checkpoint {}: {e}", record.id)))
}

fn restore_intent_key(workspace: u32) -> String {
    format!("restore_intent/{workspace}")
}

fn u32_from(bytes: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = bytes.len().min(4);
    b[..n].copy_from_slice(&bytes[..n]);
    u32::from_le_bytes(b)
}

fn u64_from(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}

fn put_meta(txn: &redb::WriteTransaction, entries: &[(&str, Option<&[u8]>)]) -> Result<()> {
    let mut table = txn.open_table(META)?;
    for (key, value) in entries {
        match value {
            Some(v) => {
                table.insert(*key, *v)?;
            }
            None => {
                table.remove(*key)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::change_feed_tests::record;
    use super::*;
    use mariesync_protocol::index::ChunkRef;
    use mariesync_protocol::{FileEntry, FileKind, VersionVector};

    fn file(path: &str, data: &[u8], deleted: bool) -> (IndexedFile, EncodedChunk) {
        let hash = ChunkHash::of(data);
        let entry = FileEntry {
            path: RelPath::new(path).unwrap(),
            kind: FileKind::File,
            size: data.len() as u64,
            mtime_ns: 0,
            executable: false,
            content_hash: hash,
            chunks: vec![ChunkRef {
                hash,
                len: data.len() as u32,
            }],
            symlink_target: None,
            deleted,
            version: VersionVector::new(),
            sequence: 1,
            modified_by: String::new(),
        };
        (IndexedFile { entry, stat: None }, encode_chunk(hash, data))
    }

    /// A pull's progress is keyed by its workspace and saved as the pull
    /// ends, maybe just after `workspace remove` forgot it: it must not
    /// come back then, nor count for a workspace added after the removal.
    #[test]
    fn progress_of_a_removed_workspace_is_never_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let first = store.add_workspace(&record(3)).unwrap();
        let id = WorkspaceId([3; 16]);
        let save = |number, id, value: &[u8]| {
            store
                .meta_put_lazy_for(number, id, "progress/x", Some(value))
                .unwrap()
        };
        let saved = || store.meta_get("progress/x").unwrap();
        assert!(save(first, id, b"7"));
        assert_eq!(saved().as_deref(), Some(&b"7"[..]));
        // Another workspace id under that number is not this one.
        assert!(!save(first, WorkspaceId([4; 16]), b"1"));
        assert_eq!(saved().as_deref(), Some(&b"7"[..]));

        store.remove_workspace(first).unwrap();
        store.meta_put("progress/x", None).unwrap();
        assert!(!save(first, id, b"9"));
        assert_eq!(saved(), None, "written back after the removal");

        // Added again (it was the last one): a new number, so a pull that
        // began before the removal still cannot write.
        let second = store.add_workspace(&record(3)).unwrap();
        assert_ne!(
            second, first,
            "a removed workspace's number was given again"
        );
        assert!(!save(first, id, b"9"));
        assert!(save(second, id, b"2"));
        assert_eq!(saved().as_deref(), Some(&b"2"[..]));
        // Numbers stay unique across a restart too.
        drop(store);
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        store.remove_workspace(second).unwrap();
        let third = store.add_workspace(&record(3)).unwrap();
        assert!(third > second, "{third} after {second}");
    }

    #[test]
    fn gc_rewrites_mostly_dead_packs_and_keeps_live_chunks_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let ws = store.add_workspace(&record(3)).unwrap();
        // Ten 100 KB chunks in one pack, spanning parts.
        let contents: Vec<Vec<u8>> = (0..10u8)
            .map(|i| {
                (0..100_000u32)
                    .map(|j| (j.wrapping_mul(2654435761) >> (i % 7)) as u8 ^ i)
                    .collect()
            })
            .collect();
        let mut batch = Batch::default();
        for (i, data) in contents.iter().enumerate() {
            let (entry, chunk) = file(&format!("f{i}"), data, false);
            batch.upserts.push(entry);
            batch.chunks.push(chunk);
        }
        store.commit_batch(ws, &batch, 2, true).unwrap();
        let before = store.stats().unwrap();
        assert_eq!(before.chunks, 10);

        // Eight of them deleted: their chunks are garbage, the pack mostly dead.
        let mut batch = Batch::default();
        for (i, data) in contents.iter().enumerate().skip(2) {
            batch.upserts.push(file(&format!("f{i}"), data, true).0);
        }
        store.commit_batch(ws, &batch, 3, true).unwrap();
        let (removed, freed) = store.collect_garbage().unwrap();
        assert_eq!(removed, 8);
        let after = store.stats().unwrap();
        assert_eq!(after.chunks, 2);
        // The pack was rewritten: every dead byte is gone.
        assert_eq!(freed, before.stored_bytes - after.stored_bytes);
        let reader = store.reader().unwrap();
        for data in &contents[..2] {
            assert_eq!(
                &reader
                    .read(&ChunkHash::of(data), data.len() as u32)
                    .unwrap()[..],
                &data[..]
            );
        }
        for data in &contents[2..] {
            assert!(matches!(
                reader.read(&ChunkHash::of(data), data.len() as u32),
                Err(StoreError::MissingChunk(_))
            ));
        }
        assert!(store.verify().unwrap().corrupt.is_empty());
    }

    /// A peer's pushed chunks are read before they are stored, then stored
    /// (and counted as fetched) by the commit of the entries that use them.
    #[test]
    fn received_chunks_are_read_before_they_are_stored_with_their_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let ws = store.add_workspace(&record(3)).unwrap();
        let data = b"a save on a peer".to_vec();
        let (entry, chunk) = file("saved.txt", &data, false);
        let hash = chunk.hash;
        let len = data.len() as u32;
        let stored_len = chunk.stored.len() as u64;

        let mut reader = store.reader().unwrap().with_received(vec![chunk]);
        assert!(reader.contains(&hash).unwrap());
        assert_eq!(&reader.read(&hash, len).unwrap()[..], &data[..]);
        assert_eq!(&reader.read_unhashed(&hash, len).unwrap()[..], &data[..]);
        // Not in the store yet: another reader does not see it.
        assert!(!store.reader().unwrap().contains(&hash).unwrap());

        let batch = Batch {
            chunks: reader.take_received(),
            chunks_fetched: true,
            upserts: vec![entry],
            forget: Vec::new(),
        };
        drop(reader);
        store.commit_batch(ws, &batch, 2, true).unwrap();
        let reader = store.reader().unwrap();
        assert_eq!(&reader.read(&hash, len).unwrap()[..], &data[..]);
        let stats = store.stats().unwrap();
        assert_eq!((stats.chunks, stats.fetched_chunks), (1, 1));
        assert_eq!(stats.fetched_bytes, stored_len);
        // The same chunk again (another peer relayed the save): stored
        // once, counted once.
        let (_, again) = file("saved.txt", &data, false);
        store.commit_fetched_chunks(&[again]).unwrap();
        let stats = store.stats().unwrap();
        assert_eq!((stats.chunks, stats.fetched_chunks), (1, 1));
        assert_eq!(stats.fetched_bytes, stored_len);
    }
}

#[cfg(test)]
mod change_feed_tests {
    use super::*;
    use mariesync_protocol::{FileKind, VersionVector};

    /// A workspace record with an id made of `id` (the other tests' too).
    pub(super) fn record(id: u8) -> WorkspaceRecord {
        WorkspaceRecord {
            id: WorkspaceId([id; 16]),
            name: "w".into(),
            path: "/w".into(),
            state: WorkspaceState::Active,
            next_sequence: 1,
            created_ms: 0,
        }
    }

    /// A batch of these index entries and nothing else.
    fn upserts(files: Vec<IndexedFile>) -> Batch {
        Batch {
            upserts: files,
            ..Default::default()
        }
    }

    /// An entry for a directory (no chunks needed).
    fn directory(path: &str, sequence: u64, version: VersionVector) -> IndexedFile {
        IndexedFile {
            entry: FileEntry {
                path: RelPath::new(path).unwrap(),
                kind: FileKind::Directory,
                size: 0,
                mtime_ns: 0,
                executable: false,
                content_hash: ChunkHash::of(b""),
                chunks: vec![],
                symlink_target: None,
                deleted: false,
                version,
                sequence,
                modified_by: String::new(),
            },
            stat: None,
        }
    }

    #[test]
    fn durable_entries_are_served_in_sequence_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let ws = store.add_workspace(&record(9)).unwrap();
        let entry = |path: &str, sequence: u64| directory(path, sequence, VersionVector::new());
        let batch = upserts(vec![entry("a", 1), entry("b", 2)]);
        store.commit_batch(ws, &batch, 3, false).unwrap();
        // Not durable yet: not served.
        assert_eq!(store.changes_since(ws, 0, 10).unwrap().entries.len(), 0);
        store.commit_batch(ws, &Batch::default(), 3, true).unwrap();
        let c = store.changes_since(ws, 0, 10).unwrap();
        assert_eq!(
            (c.entries.len(), c.more, c.covered, c.head),
            (2, false, 2, 2)
        );
        let c = store.changes_since(ws, 0, 1).unwrap();
        assert_eq!(
            (c.entries.len(), c.more, c.covered, c.head),
            (1, true, 1, 2)
        );
        store
            .commit_batch(ws, &upserts(vec![entry("c", 3)]), 4, true)
            .unwrap();
        let c = store.changes_since(ws, 2, 10).unwrap();
        assert_eq!((c.entries.len(), c.covered, c.head), (1, 3, 3));
    }

    /// A small scan's entries are served before they are durable, within
    /// the durable lease; after a crash that loses them, sequence numbers
    /// and version counters move past the lease, so nothing a peer was
    /// served is ever numbered again. A clean close moves nothing.
    #[test]
    fn entries_served_before_durable_are_never_numbered_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let crashed = dir.path().join("crashed.redb");
        let me = mariesync_protocol::DeviceKey(1);
        let store = Store::open(&path).unwrap();
        let ws = store.add_workspace(&record(3)).unwrap();
        let versioned = |path: &str, sequence: u64| {
            let mut version = VersionVector::new();
            version.bump_at(me, store.issue_version_counter(&version));
            directory(path, sequence, version)
        };
        // No durable lease yet: only durable entries are served.
        let told = store
            .commit_batch(ws, &upserts(vec![versioned("a", 1)]), 2, false)
            .unwrap();
        assert_eq!(store.changes_since(ws, 0, 10).unwrap().entries.len(), 0);
        assert!(store.make_durable(ws, told).unwrap(), "served only now");
        assert_eq!(store.changes_since(ws, 0, 10).unwrap().head, 1);

        // With the lease durable, a commit without durability is served.
        let told = store
            .commit_batch(ws, &upserts(vec![versioned("b", 2)]), 3, false)
            .unwrap();
        assert_eq!(told, 3);
        let served = store.changes_since(ws, 0, 10).unwrap();
        assert_eq!((served.entries.len(), served.head), (2, 2));
        let counter_served = served.entries[1].version.top();

        // A crash now: the disk has only what was durable.
        std::fs::copy(&path, &crashed).unwrap();
        {
            let after = Store::open(&crashed).unwrap();
            assert!(after.file(ws, "b").unwrap().is_none(), "b was not durable");
            let next = after.workspace(ws).unwrap().unwrap().next_sequence;
            assert!(
                next > 2 + LEASE_AHEAD - 1,
                "next sequence {next} reuses a served one"
            );
            let head = after.changes_since(ws, 0, 10).unwrap().head;
            assert!(
                head >= 2,
                "a peer that has 2 must not be ahead of the head {head}"
            );
            let counter = after.issue_version_counter(&VersionVector::new());
            assert!(
                counter > counter_served,
                "counter {counter} was served before"
            );
        }
        // And once more, without a crash in between: no second move.
        let next_before = Store::open(&crashed)
            .unwrap()
            .workspace(ws)
            .unwrap()
            .unwrap()
            .next_sequence;
        let reopened = Store::open(&crashed).unwrap();
        assert_eq!(
            reopened.workspace(ws).unwrap().unwrap().next_sequence,
            next_before
        );
        drop(reopened);

        // A clean close keeps everything and moves nothing.
        assert!(!store.make_durable(ws, told).unwrap(), "served already");
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(store.file(ws, "b").unwrap().is_some());
        assert_eq!(store.workspace(ws).unwrap().unwrap().next_sequence, 3);
        assert_eq!(
            store.issue_version_counter(&VersionVector::new()),
            counter_served + 1
        );
    }

    /// A batch numbered before the database moved the workspace's numbering
    /// on (a reopen that found the lease) is refused: its entries would sit
    /// below a head peers may have acknowledged. An entry committed again
    /// under its own number (a repair) is not renumbered.
    #[test]
    fn entries_numbered_below_the_next_sequence_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let ws = store.add_workspace(&record(4)).unwrap();
        let entry = |path: &str, sequence: u64| directory(path, sequence, VersionVector::new());
        store
            .commit_batch(ws, &upserts(vec![entry("a", 1), entry("b", 2)]), 3, true)
            .unwrap();
        assert!(matches!(
            store.commit_batch(ws, &upserts(vec![entry("c", 2)]), 3, true),
            Err(StoreError::Renumbered)
        ));
        assert!(matches!(
            store.commit_batch(ws, &upserts(vec![entry("a", 2)]), 3, true),
            Err(StoreError::Renumbered)
        ));
        store
            .commit_batch(ws, &upserts(vec![entry("a", 1), entry("c", 3)]), 4, true)
            .unwrap();
        assert_eq!(store.changes_since(ws, 0, 10).unwrap().head, 3);
    }

    /// Version counters only grow, across workspaces, their removal and
    /// restarts: a device that joins a workspace again never makes a
    /// version older than one it made before.
    #[test]
    fn version_counters_outlive_workspaces_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let record = record(7);
        let me = mariesync_protocol::DeviceKey(1);
        let versioned = |version: VersionVector| directory("f", 1, version);
        {
            let store = Store::open(&path).unwrap();
            let ws = store.add_workspace(&record).unwrap();
            let mut version = VersionVector::new();
            for expected in 1..=3 {
                let counter = store.issue_version_counter(&version);
                assert_eq!(counter, expected);
                version.bump_at(me, counter);
            }
            // A counter issued for a fresh vector still moves past them.
            assert_eq!(store.issue_version_counter(&VersionVector::new()), 4);
            store
                .commit_batch(ws, &upserts(vec![versioned(version)]), 2, true)
                .unwrap();
            store.remove_workspace(ws).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.issue_version_counter(&VersionVector::new()), 5);
        // A vector ahead of everything issued here: past it.
        let mut ahead = VersionVector::new();
        ahead.bump_at(mariesync_protocol::DeviceKey(2), 40);
        assert_eq!(store.issue_version_counter(&ahead), 41);

        // A database from before counters were saved: the index's highest.
        let old = dir.path().join("old.redb");
        let ws = {
            let store = Store::open(&old).unwrap();
            let ws = store.add_workspace(&record).unwrap();
            let txn = store.db().unwrap().begin_write().unwrap();
            {
                let mut files = txn.open_table(FILES).unwrap();
                let mut version = VersionVector::new();
                version.bump_at(me, 17);
                let file = versioned(version);
                files
                    .insert((ws, "f"), records::encode(&file).as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
            ws
        };
        {
            let store = Store::open(&old).unwrap();
            assert_eq!(store.issue_version_counter(&VersionVector::new()), 18);
            // Saved from then on, with the next commit.
            store.commit_batch(ws, &Batch::default(), 2, true).unwrap();
        }
        let store = Store::open(&old).unwrap();
        assert_eq!(store.issue_version_counter(&VersionVector::new()), 19);
    }
}
