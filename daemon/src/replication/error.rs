//! The one error type of the replication module.

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::state::format_timestamp;

/// What went wrong while reading a replication feed.
///
/// Every variant names where the problem is (a URL, a path, or a phrase such
/// as "state of sequence 12 (http://…)"), because the daemon's log line is
/// often all an operator has. [`is_retryable`](Self::is_retryable) splits the
/// variants into transient failures, which [`with_retry`](super::with_retry)
/// rides out, and fatal ones, which waiting will not fix.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReplicationError {
    /// A state file was read but is not an Osmosis `state.txt` (garbled,
    /// truncated, the changeset feed's YAML form, the wrong sequence). Fatal:
    /// replication servers write state files atomically, so a bad one means a
    /// wrong URL or a broken mirror, not a race.
    BadState {
        /// Which state file, e.g. "state of sequence 12 (http://…)".
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server answered with a status other than success or 404. 5xx, 408
    /// and 429 are retryable; any other 4xx means the request is wrong.
    Http {
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// No response: connection refused or reset, timeout, DNS failure,
    /// protocol error. Retryable unless it is a configuration problem such as
    /// a malformed URL, a TLS failure or a redirect loop.
    Transport {
        /// The URL requested.
        url: String,
        /// The underlying error.
        error: ureq::Error,
    },
    /// A local file could not be read. Retryable (a disk or NFS hiccup, a
    /// permission an operator can fix); a missing file is not an error but
    /// `Ok(None)`, except for the top-level `state.txt`.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// A file that should exist is not there yet, e.g. the diff of a sequence
    /// that `state.txt` already announces: mirrors and CDNs publish the files
    /// of a sequence at slightly different times. Retryable. Sources never
    /// return this themselves (they answer `Ok(None)`); callers that know the
    /// file must exist make it with [`not_published`](Self::not_published).
    NotPublished {
        /// The missing file, e.g. "diff of sequence 12".
        what: String,
    },
    /// A response or file is larger than the configured cap. Fatal: it will
    /// be just as large next time.
    TooLarge {
        /// The URL or path.
        what: String,
        /// The cap in bytes.
        limit: u64,
    },
    /// The top-level `state.txt` does not exist, so this is not a replication
    /// feed (or the URL is wrong). Fatal.
    NotFound {
        /// The URL or path of the missing file.
        what: String,
    },
    /// The source cannot be used at all: a malformed URL, an unsupported
    /// scheme, a directory that does not exist. Fatal.
    Config(String),
    /// [`sequence_for_timestamp`](super::sequence_for_timestamp) was asked for
    /// a time before the oldest state the feed still has, so the changes
    /// between that time and the oldest state cannot be fetched. Fatal.
    TimestampTooOld {
        /// The requested time (unix seconds).
        timestamp: i64,
        /// The oldest sequence found.
        oldest_sequence: u64,
        /// Its timestamp (unix seconds), later than `timestamp`.
        oldest_timestamp: i64,
    },
    /// A stop was requested (SIGTERM, SIGINT) while waiting to retry. Fatal:
    /// the caller is shutting down.
    Stopped {
        /// What was being attempted.
        what: String,
    },
    /// The source's newest sequence is older than the one the store has
    /// applied: a wrong source (another feed, a stale mirror) or one that
    /// was rolled back. Nothing can be applied from it until it passes the
    /// store; fatal where the caller expects to catch up.
    Behind {
        /// Where the source is.
        source: String,
        /// Its newest sequence.
        latest: u64,
        /// The store's sequence.
        stored: u64,
    },
    /// [`with_retry`](super::with_retry) gave up after `attempts` attempts.
    /// Retryable if the last error was: a caller with a longer horizon (the
    /// daemon's main loop) may try again later.
    RetriesExhausted {
        /// What was being attempted.
        what: String,
        /// How many attempts were made.
        attempts: u32,
        /// The error of the last attempt.
        last: Box<ReplicationError>,
    },
}

impl ReplicationError {
    /// The retryable error for a file that is announced but not there yet.
    pub fn not_published(what: impl Into<String>) -> Self {
        Self::NotPublished { what: what.into() }
    }

    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Self::Transport { error, .. } => matches!(
                error,
                ureq::Error::Io(_)
                    | ureq::Error::Timeout(_)
                    | ureq::Error::ConnectionFailed
                    | ureq::Error::HostNotFound
                    | ureq::Error::Protocol(_)
            ),
            Self::Io { .. } | Self::NotPublished { .. } => true,
            Self::RetriesExhausted { last, .. } => last.is_retryable(),
            Self::BadState { .. }
            | Self::Stopped { .. }
            | Self::Behind { .. }
            | Self::TooLarge { .. }
            | Self::NotFound { .. }
            | Self::Config(_)
            | Self::TimestampTooOld { .. } => false,
        }
    }
}

impl fmt::Display for ReplicationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadState { what, reason } => write!(f, "invalid {what}: {reason}"),
            Self::Http { url, status } => write!(f, "HTTP status {status} from {url}"),
            Self::Transport { url, error } => write!(f, "cannot fetch {url}: {error}"),
            Self::Io { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            Self::NotPublished { what } => write!(f, "{what} is not published yet"),
            Self::TooLarge { what, limit } => {
                write!(f, "{what} is larger than the limit of {limit} bytes")
            }
            Self::NotFound { what } => write!(
                f,
                "{what} does not exist; is this the root of a replication feed?"
            ),
            Self::Config(message) => f.write_str(message),
            Self::TimestampTooOld {
                timestamp,
                oldest_sequence,
                oldest_timestamp,
            } => write!(
                f,
                "{} is before the oldest available state (sequence {oldest_sequence} at {}), \
                 so the changes in between cannot be fetched from this feed",
                format_timestamp(*timestamp),
                format_timestamp(*oldest_timestamp),
            ),
            Self::Stopped { what } => write!(f, "{what}: stopped before it succeeded"),
            Self::Behind {
                source,
                latest,
                stored,
            } => write!(
                f,
                "the replication source {source} is behind the store: its newest sequence is \
                 {latest}, the store has applied {stored} (a wrong source, a stale mirror, or a \
                 feed that was rolled back); nothing is applied from it"
            ),
            Self::RetriesExhausted {
                what,
                attempts,
                last,
            } => write!(f, "{what}: gave up after {attempts} attempts: {last}"),
        }
    }
}

/// The causes are part of the `Display` text (a log line shows them all), so
/// `source()` stays `None` to keep `anyhow`'s `{:#}` chains from repeating them.
impl std::error::Error for ReplicationError {}
