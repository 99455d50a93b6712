//! Benchmarks of MarieSync: a realistic workspace generator, and helpers
//! shared by the criterion benches and the end-to-end benchmark.

pub mod args;
pub mod measure;
pub mod workspace_gen;
