//! The client library of MarieSync: finds a device's daemon from its home and
//! talks JSON-RPC to it over the local socket.
//!
//! Three users share it: the `mariesync` CLI (a thin client), IDEs written in
//! Rust, and native IDEs through the C ABI in [`capi`]. It depends on no async
//! runtime so it can be embedded anywhere.

pub mod capi;
mod client;
mod paths;

pub use client::{Client, ClientError};
pub use paths::{HOME_ENV, HomePaths};
