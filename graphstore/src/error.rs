//! Errors of the store. Every message says what was being done and, for input
//! problems, where: the caller can print it as is.

use std::path::PathBuf;

use crate::read::ReadError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // RocksDB's error is shown in the message and deliberately not exposed
    // as `source()`: callers print errors with their chain (`{:#}`), which
    // would repeat it.
    #[error("RocksDB error at {path}: {error}")]
    Db {
        path: PathBuf,
        error: rocksdb::Error,
    },
    /// The file system holding the store ran out of space. RocksDB refuses
    /// the write whole (a diff is one write batch), so nothing stored is
    /// lost: freeing space and running the same command again resumes.
    #[error(
        "the file system holding the store at {path} is full ({error}); free space and run the same command again: a diff is applied whole or not at all, so nothing already stored is lost"
    )]
    DiskFull {
        path: PathBuf,
        error: rocksdb::Error,
    },
    /// RocksDB found a damaged file (a checksum mismatch, a bad magic
    /// number, a truncated table): the disk or something beside osmvec
    /// changed the store's files. Nothing can be trusted to be repaired in
    /// place; the message says how to rebuild.
    #[error(
        "the store at {path} is damaged ({error}); osmvec does not repair it in place: restore it from a backup (e.g. a `cp -a` of a stopped store) or rebuild it with `osmvec import` and replicate from the extract's sequence"
    )]
    Damaged {
        path: PathBuf,
        error: rocksdb::Error,
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

    /// A RocksDB error on the store at `path`, sorted into what the user
    /// must do about it: a full disk and a damaged file get their own
    /// variants (and advice), anything else stays [`StoreError::Db`].
    pub fn db(path: &std::path::Path, error: rocksdb::Error) -> Self {
        let path = path.to_path_buf();
        match error.kind() {
            rocksdb::ErrorKind::Corruption => StoreError::Damaged { path, error },
            rocksdb::ErrorKind::IOError if is_no_space(&error) => {
                StoreError::DiskFull { path, error }
            }
            _ => StoreError::Db { path, error },
        }
    }

    /// True for a full disk, whatever layer reported it.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull { .. } => true,
            StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}

/// RocksDB reports ENOSPC as an IO error carrying strerror's text (and,
/// once a background flush failed for it, as "NoSpace" in later writes).
fn is_no_space(e: &rocksdb::Error) -> bool {
    let s = e.as_ref();
    s.contains("No space left on device") || s.contains("NoSpace")
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_byte_in_a_table_is_a_damaged_store_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let store = crate::Store::open_or_create(&path, Default::default()).unwrap();
            let mut b = rocksdb::WriteBatch::default();
            for i in 0..20_000u32 {
                let value = format!("value {i} of a table that spans many blocks");
                b.put_cf(store.cf(crate::store::cf::META), i.to_be_bytes(), value);
            }
            store.write(b, true).unwrap();
            store.flush().unwrap();
        }
        let sst = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sst"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .expect("a table file");
        let mut bytes = std::fs::read(&sst).unwrap();
        let mid = bytes.len() / 3;
        bytes[mid] ^= 0xff;
        std::fs::write(&sst, bytes).unwrap();
        let store = crate::Store::open(&path).unwrap();
        let err = (0..20_000u32)
            .find_map(|i| store.get_meta(&i.to_be_bytes()).err())
            .expect("reading every key meets the damaged block");
        let text = err.to_string();
        assert!(matches!(err, StoreError::Damaged { .. }), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("osmvec import"), "{text}");
    }
}
