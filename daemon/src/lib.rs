//! The `osmvec` daemon as a library: the binary in `main.rs` is a thin CLI
//! over these modules, and the end-to-end tests drive the binary. The
//! embedding pipeline itself (graphs, inputs, train, embed, eval,
//! checkpoints, jobs) is the `osmvec-pipeline` crate in `daemon/pipeline/`;
//! these modules wire it to the replication source, Kafka and HTTP.

pub mod bench;
pub mod cli;
pub mod config;
pub mod export;
pub mod follow;
pub mod observe;
pub mod publish;
pub mod replication;
pub mod run;
pub mod tuner;
pub mod worker;
