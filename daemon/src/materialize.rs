//! Writing files from stored chunks into a workspace without ever leaving a
//! torn file: write a temporary file beside the target, fsync it, rename it
//! over the target, fsync the directory.
//!
//! **Architecture Invariant:** every chunk is verified (decompressed, length
//! and blake3 checked) as it is read; a file whose chunk fails is not
//! written, and the target keeps its previous content.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use mariesync_protocol::{FileKind, RelPath};

use crate::scan::TEMP_PREFIX;
use crate::store::{ChunkReader, ManifestEntry, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("{path}: a parent is not a directory inside the workspace")]
    Escapes { path: String },
}

/// Resolves `path` under `root`, refusing a path whose parent directories
/// are symlinks (they could lead outside the workspace).
pub fn resolve_inside(root: &Path, path: &RelPath) -> Result<PathBuf, WriteError> {
    resolve_inside_known(root, path, None)
}

/// Directories found to be real directories (not links) while one batch of
/// a peer's files is written: the batch's other files in them are not
/// checked again (5,000 files in 200 directories were 20,000 lstats).
pub type KnownDirs = std::sync::Mutex<std::collections::HashSet<PathBuf>>;

/// [`resolve_inside`], skipping the parents in `known` and adding those
/// it finds to be directories.
pub fn resolve_inside_known(
    root: &Path,
    path: &RelPath,
    known: Option<&KnownDirs>,
) -> Result<PathBuf, WriteError> {
    let is_known = |dir: &Path| {
        known.is_some_and(|k| k.lock().unwrap_or_else(|e| e.into_inner()).contains(dir))
    };
    let mut current = root.to_path_buf();
    let components: Vec<&str> = path.components().collect();
    for component in &components[..components.len() - 1] {
        current.push(component);
        if is_known(&current) {
            continue;
        }
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() || !meta.is_dir() => {
                return Err(WriteError::Escapes {
                    path: path.to_string(),
                });
            }
            Ok(_) => {
                if let Some(known) = known {
                    known
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(current.clone());
                }
            }
            Err(_) => {}
        }
    }
    current.push(components[components.len() - 1]);
    Ok(current)
}

/// `path` under `root`, unchecked: for a path just written through
/// [`resolve_inside`].
pub fn join(root: &Path, path: &RelPath) -> PathBuf {
    let mut joined = root.to_path_buf();
    joined.extend(path.components());
    joined
}

fn temp_path(target: &Path) -> PathBuf {
    let unique = format!("{TEMP_PREFIX}{}-{:x}", std::process::id(), rand_u64());
    target.with_file_name(unique)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

/// What must be at a path for a write to replace it: checked once before
/// the write and again just before the rename, so a file saved meanwhile, or
/// one the index never knew (an ignored file), is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Nothing, or an empty directory.
    Absent,
    /// The file or link with this identity.
    Present(Identity),
}

/// What tells two versions of a path apart without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
}

impl Identity {
    pub fn of(path: &Path) -> Option<Identity> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        let stat = crate::scan::stat_of(&meta);
        Some(Identity {
            size: stat.size,
            mtime_ns: stat.mtime_ns,
            ctime_ns: stat.ctime_ns,
            inode: stat.inode,
        })
    }
}

/// True if what is at `path` is what `expected` says.
fn still_expected(path: &Path, expected: Expected) -> bool {
    match expected {
        Expected::Absent => match std::fs::symlink_metadata(path) {
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            Ok(meta) => {
                meta.is_dir() && std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
            }
        },
        Expected::Present(identity) => Identity::of(path) == Some(identity),
    }
}

/// Writes one manifest entry (file or symlink) at its path, atomically.
/// Directories are created by the caller.
pub fn write_entry(
    root: &Path,
    entry: &ManifestEntry,
    reader: &ChunkReader,
    expected: Expected,
) -> Result<(), WriteError> {
    prepare_entry(root, entry, reader, Durability::Fsync)?.finish(expected)
}

/// How a prepared file's bytes become durable before it is renamed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Durability {
    /// fsync the temporary file now.
    Fsync,
    /// The caller makes the whole batch durable at once ([`sync_batch`])
    /// before it finishes any of them.
    Batched,
}

/// A new version written beside its target, not yet in place.
#[derive(Debug)]
pub struct Prepared {
    temp: PathBuf,
    target: PathBuf,
    path: String,
}

/// Writes `entry` to a temporary file beside its target.
pub fn prepare_entry(
    root: &Path,
    entry: &ManifestEntry,
    reader: &ChunkReader,
    durability: Durability,
) -> Result<Prepared, WriteError> {
    let target = resolve_inside(root, &entry.path)?;
    prepare_entry_at(target, entry, reader, durability)
}

/// [`prepare_entry`] for a target the caller resolved just before.
pub fn prepare_entry_at(
    target: PathBuf,
    entry: &ManifestEntry,
    reader: &ChunkReader,
    durability: Durability,
) -> Result<Prepared, WriteError> {
    let io = |source| WriteError::Io {
        path: entry.path.to_string(),
        source,
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let temp = temp_path(&target);
    let written = match entry.kind {
        FileKind::File => write_file(&temp, entry, reader, durability),
        FileKind::Symlink => {
            let link = entry.symlink_target.as_deref().unwrap_or_default();
            symlink(link, &temp).map_err(io)
        }
        FileKind::Directory => unreachable!("directories are created by the caller"),
    };
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    Ok(Prepared {
        temp,
        target,
        path: entry.path.to_string(),
    })
}

impl Prepared {
    /// Puts the new version in place if the target is still what
    /// `expected` says (re-checked just before the rename: a file saved
    /// meanwhile is kept, and the new version dropped).
    pub fn finish(self, expected: Expected) -> Result<(), WriteError> {
        let io = |source| WriteError::Io {
            path: self.path.clone(),
            source,
        };
        let result = (|| {
            if !still_expected(&self.target, expected) {
                return Err(io(std::io::Error::other(
                    "changed on disk while the new version was written; kept",
                )));
            }
            // A directory where a file must go is removed only if empty.
            if let Ok(meta) = std::fs::symlink_metadata(&self.target)
                && meta.is_dir()
            {
                std::fs::remove_dir(&self.target).map_err(io)?;
            }
            match expected {
                // Nothing may appear there in the meantime either.
                Expected::Absent => rename_noreplace(&self.temp, &self.target).map_err(io),
                Expected::Present(_) => std::fs::rename(&self.temp, &self.target).map_err(io),
            }
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.temp);
        }
        result
    }

    /// Where the new version goes.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Drops the new version.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Makes every file written under `root` durable: one `syncfs` for a whole
/// batch of [`Durability::Batched`] files costs less than their fsyncs,
/// even in parallel (5,000 files of 10 KiB here: 0.25 s against 0.59 s).
pub fn sync_batch(root: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let dir = File::open(root)?;
        // SAFETY: syncfs only reads the descriptor, valid while `dir` lives.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = root;
        Err(std::io::Error::other(
            "no syncfs here; use Durability::Fsync",
        ))
    }
}

/// Whether [`Durability::Batched`] works on this platform.
pub const BATCHED_DURABILITY: bool = cfg!(target_os = "linux");

fn write_file(
    temp: &Path,
    entry: &ManifestEntry,
    reader: &ChunkReader,
    durability: Durability,
) -> Result<(), WriteError> {
    let io = |source| WriteError::Io {
        path: entry.path.to_string(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if entry.executable { 0o755 } else { 0o644 });
    }
    let mut file = options.open(temp).map_err(io)?;
    let store_error = |source| WriteError::Store {
        path: entry.path.to_string(),
        source,
    };
    // The whole must match the content hash (a peer could pair valid
    // chunks with a wrong one), which covers every chunk's bytes: they are
    // hashed once, here, and each checked against its own hash only to
    // name the one at fault.
    let mut hasher = blake3::Hasher::new();
    for chunk in &entry.chunks {
        let data = reader
            .read_unhashed(&chunk.hash, chunk.len)
            .map_err(store_error)?;
        hasher.update(&data);
        file.write_all(&data).map_err(io)?;
    }
    if mariesync_protocol::ChunkHash::from(hasher.finalize()) != entry.content_hash {
        for chunk in &entry.chunks {
            reader.read(&chunk.hash, chunk.len).map_err(store_error)?;
        }
        return Err(WriteError::Io {
            path: entry.path.to_string(),
            source: std::io::Error::other("content does not match its hash"),
        });
    }
    set_mtime(&file, entry.mtime_ns);
    if durability == Durability::Fsync {
        file.sync_all().map_err(io)?;
    }
    Ok(())
}

fn set_mtime(file: &File, mtime_ns: i64) {
    if mtime_ns > 0 {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(mtime_ns as u64);
        let _ = file.set_modified(time);
    }
}

/// Sets or clears the executable bits of an existing file.
pub fn set_executable(path: &Path, executable: bool) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut perms = std::fs::metadata(path)?.permissions();
        let mode = perms.mode();
        perms.set_mode(if executable {
            mode | ((mode & 0o444) >> 2)
        } else {
            mode & !0o111
        });
        std::fs::set_permissions(path, perms)?;
    }
    #[cfg(not(unix))]
    let _ = (path, executable);
    Ok(())
}

/// Renames `from` to `to` unless `to` exists (atomically where the system
/// can: renameat2 with RENAME_NOREPLACE on Linux).
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let from_c = std::ffi::CString::new(from.as_os_str().as_bytes())?;
        let to_c = std::ffi::CString::new(to.as_os_str().as_bytes())?;
        // SAFETY: both are valid NUL-terminated paths for the call's duration.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from_c.as_ptr(),
                libc::AT_FDCWD,
                to_c.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        // Filesystems without RENAME_NOREPLACE: fall back to check-then-rename.
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error);
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "exists and is not tracked; kept",
        ));
    }
    std::fs::rename(from, to)
}

pub fn sync_dir(path: &Path) {
    #[cfg(unix)]
    if let Ok(dir) = File::open(path) {
        let _ = dir.sync_all();
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(unix)]
fn symlink(target: &str, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &str, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "symlinks are not supported on this platform",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use mariesync_protocol::{ChunkHash, FileKind, RelPath};

    #[cfg(unix)]
    #[test]
    fn directories_known_in_a_batch_never_let_a_link_through() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        std::os::unix::fs::symlink("src", root.join("src-link")).unwrap();
        let rel = |p: &str| RelPath::new(p.to_owned()).unwrap();
        let known = KnownDirs::default();
        resolve_inside_known(root, &rel("src/deep/a.rs"), Some(&known)).unwrap();
        assert!(known.lock().unwrap().contains(&root.join("src/deep")));
        // A known directory is not looked at again; a link beside it still is.
        resolve_inside_known(root, &rel("src/deep/b.rs"), Some(&known)).unwrap();
        for escaping in ["link/passwd", "src-link/deep/c.rs"] {
            assert!(matches!(
                resolve_inside_known(root, &rel(escaping), Some(&known)),
                Err(WriteError::Escapes { .. })
            ));
        }
        // What is not there yet is not remembered (it is created later).
        resolve_inside_known(root, &rel("new/x.rs"), Some(&known)).unwrap();
        assert!(!known.lock().unwrap().contains(&root.join("new")));
    }

    /// A new version (empty: no chunks needed) of `path`.
    fn empty_version(path: &str) -> ManifestEntry {
        ManifestEntry {
            path: RelPath::new(path).unwrap(),
            kind: FileKind::File,
            size: 0,
            mtime_ns: 0,
            executable: false,
            content_hash: ChunkHash::of(b""),
            chunks: vec![],
            symlink_target: None,
        }
    }

    /// The user saves the file after the peer's version was written beside
    /// it and before the rename: the save stays, the peer's version goes
    /// (the scan of the save makes the conflict that keeps both).
    #[test]
    fn a_save_between_write_and_rename_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb")).unwrap();
        let reader = store.reader().unwrap();
        let root = dir.path().join("ws");
        std::fs::create_dir_all(&root).unwrap();
        let target = root.join("notes.txt");
        std::fs::write(&target, "as the index knows it\n").unwrap();
        let expected = Expected::Present(Identity::of(&target).unwrap());

        let prepared = prepare_entry(
            &root,
            &empty_version("notes.txt"),
            &reader,
            Durability::Fsync,
        )
        .unwrap();
        std::fs::write(&target, "saved meanwhile\n").unwrap();
        assert!(prepared.finish(expected).is_err());
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "saved meanwhile\n"
        );

        // A file created where there was none: kept too.
        let new = root.join("new.txt");
        let prepared =
            prepare_entry(&root, &empty_version("new.txt"), &reader, Durability::Fsync).unwrap();
        std::fs::write(&new, "created meanwhile\n").unwrap();
        assert!(prepared.finish(Expected::Absent).is_err());
        assert_eq!(
            std::fs::read_to_string(&new).unwrap(),
            "created meanwhile\n"
        );

        // Untouched: replaced. No temporary file is left either way.
        let expected = Expected::Present(Identity::of(&target).unwrap());
        prepare_entry(
            &root,
            &empty_version("notes.txt"),
            &reader,
            Durability::Fsync,
        )
        .unwrap()
        .finish(expected)
        .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"");
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".mariesync-tmp-")),
            "{names:?}"
        );
    }
}
