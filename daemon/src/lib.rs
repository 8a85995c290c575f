//! The `osmvec` daemon as a library: the binary in `main.rs` is a thin CLI
//! over these modules, and the end-to-end tests drive the binary.

pub mod bench;
pub mod cli;
pub mod config;
pub mod embedding;
pub mod export;
pub mod follow;
pub mod jobs;
pub mod observe;
pub mod publish;
pub mod replication;
pub mod run;
pub mod tuner;
pub mod worker;
