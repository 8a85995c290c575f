//! Errors of the store. Every message says what was being done and, for input
//! problems, where: the caller can print it as is.

use std::path::PathBuf;

use crate::read::ReadError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB error at {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("store at {path} is not an osmvec store ({why})")]
    NotAStore { path: PathBuf, why: String },
    #[error("store at {} does not exist (run `osmvec import --store {} FILE` first)", .0.display(), .0.display())]
    Missing(PathBuf),
    #[error("store schema version {found} is not supported (this build reads {expected})")]
    Schema { found: u32, expected: u32 },
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "an import into this store was interrupted; re-run `osmvec import` with the same files to finish it ({0})"
    )]
    ImportInterrupted(String),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid diff {diff}: {why}")]
    InvalidDiff { diff: String, why: String },
}

impl StoreError {
    pub fn corrupt(what: &str) -> Self {
        StoreError::Corrupt(what.to_string())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
