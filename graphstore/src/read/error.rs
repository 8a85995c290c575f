//! The one error type of every reader.
//!
//! Each message starts with the file's display name and, where known, the
//! position (XML line and column, or PBF blob index and byte offset), because
//! these errors end up in logs of a daemon that reads thousands of files: an
//! operator must be able to open the named file at the named place.

use std::fmt;
use std::io;

/// A position in an XML text. Both numbers start at 1; the column counts
/// bytes, not characters, so it matches `cut -b` and hex dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextPos {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for TextPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A compression format wrapped around an XML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Bzip2,
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::Gzip => "gzip",
            Codec::Bzip2 => "bzip2",
        })
    }
}

/// Why reading an OSM file failed.
///
/// `file` is the display name the caller gave (a path, or e.g. `sequence 123`
/// for a downloaded diff); `element` names the OSM object involved, e.g.
/// `node 123` or `<nd> of way 5`.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: io::Error,
    },

    /// The compressed stream is truncated or corrupt. A short read is never
    /// taken for the end of the data.
    #[error(
        "{file}: {codec} data is truncated or corrupt (after {offset} decompressed bytes): {source}"
    )]
    Compression {
        file: String,
        codec: Codec,
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// The decompressed data is larger than the caller allowed; protects the
    /// daemon against compression bombs from a replication server.
    #[error("{file}: decompressed data exceeds the limit of {limit} bytes")]
    TooLarge { file: String, limit: u64 },

    /// A cap on what one document may hold was reached (one XML event's
    /// bytes, one element's bytes, tags, way nodes or relation members, or
    /// changes per diff): such input would cost memory without bound, and
    /// real OSM data stays far below every cap (see [`super::ElementLimits`]).
    #[error("{file}, {at}: {what} exceeds osmvec's limit of {limit} ({setting})")]
    Limit {
        file: String,
        at: TextPos,
        what: String,
        limit: u64,
        /// The option that sets the cap.
        setting: &'static str,
    },

    /// The text is not well-formed XML, ends early, or does not have the
    /// structure of an OSM or osmChange file.
    #[error("{file}, {at}: invalid XML: {message}")]
    Xml {
        file: String,
        at: TextPos,
        message: String,
    },

    /// A required attribute is absent.
    #[error("{file}, {at}: {element}: missing attribute `{attribute}`")]
    MissingAttribute {
        file: String,
        at: TextPos,
        element: String,
        attribute: &'static str,
    },

    /// An attribute's value cannot be used.
    #[error("{file}, {at}: {element}: invalid `{attribute}` {value:?}: {reason}")]
    InvalidAttribute {
        file: String,
        at: TextPos,
        element: String,
        attribute: &'static str,
        value: String,
        reason: &'static str,
    },

    /// A node's location is missing, unparsable or outside lat [-90, 90],
    /// lon [-180, 180].
    #[error("{file}, {at}: {element}: bad coordinates: {detail}")]
    BadCoordinates {
        file: String,
        at: TextPos,
        element: String,
        detail: String,
    },

    /// An osmChange file holds an action other than create, modify, delete.
    #[error(
        "{file}, {at}: unknown osmChange action <{action}> (expected create, modify or delete)"
    )]
    UnknownAction {
        file: String,
        at: TextPos,
        action: String,
    },

    /// A PBF blob could not be framed or decoded.
    #[error("{file}: PBF blob {blob} at byte offset {offset}: {message}")]
    Pbf {
        file: String,
        /// Index of the blob in the file, 0 for the header blob.
        blob: u64,
        offset: u64,
        message: String,
    },

    /// The file name or content is not a format this reader handles.
    #[error("{file}: unsupported input: {reason}")]
    UnsupportedFormat { file: String, reason: String },

    /// The caller's batch or change consumer failed; reading stopped there.
    #[error("consumer failed: {0}")]
    Consumer(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ReadError {
    /// Wraps a consumer's own error so that a callback can return it through
    /// the reader (`store.put(batch).map_err(ReadError::consumer)`).
    pub fn consumer(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ReadError::Consumer(err.into())
    }

    pub(crate) fn io(file: &str, source: io::Error) -> Self {
        ReadError::Io {
            file: file.to_owned(),
            source,
        }
    }
}
