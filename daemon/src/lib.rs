//! The MarieSync daemon and its command-line client.
pub mod checkpoint;
pub mod cli;
pub mod daemon;
pub mod events;
pub mod identity;
pub mod ipc;
pub mod materialize;
pub mod scan;
pub mod store;
pub mod workspace;
