//! The `hapg` package's library part: what the CLI, the end-to-end tests and
//! the benchmarks share beyond the four library crates.

pub mod cluster;
pub mod drill;
pub mod etcd;
pub mod invariants;
pub mod netns;
