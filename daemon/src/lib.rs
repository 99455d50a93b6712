//! The MarieSync daemon and its command-line client.

/// Gives memory freed by a large operation (a full scan, a checkpoint of a
/// big workspace) back to the operating system. glibc keeps freed memory in
/// per-thread arenas; without this an idle daemon holds the peak of its
/// busiest moment.
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs a short piece of blocking work (a small page of the index, a few
/// pushed chunks, a few paths to resolve) on this runtime thread, which
/// hands its other tasks to another thread meanwhile. A save's way to a
/// peer passes through such work several times; `spawn_blocking` there
/// costs two thread wake-ups each time (a pool thread's, then this
/// task's): 0.1 to 0.3 ms each on the development VM. Outside a
/// multi-threaded runtime (a unit test), the work just runs.
pub fn short_blocking<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Blocking work: [`short_blocking`] when the caller knows it is `short`,
/// else on tokio's blocking pool.
pub async fn run_blocking<R: Send + 'static>(
    short: bool,
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<R, tokio::task::JoinError> {
    if short {
        Ok(short_blocking(work))
    } else {
        tokio::task::spawn_blocking(work).await
    }
}

pub mod checkpoint;
pub mod cli;
pub mod daemon;
pub mod events;
pub mod gate;
pub mod identity;
pub mod invite;
pub mod ipc;
pub mod materialize;
pub mod network;
pub mod replicate;
pub mod scan;
pub mod settings;
pub mod sharing;
pub mod store;
pub mod workspace;
