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
