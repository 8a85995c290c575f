//! Following an OpenStreetMap replication feed (minutely, hourly or daily
//! diffs, as published on planet.openstreetmap.org or by Geofabrik).
//!
//! A feed is a directory tree: `state.txt` at the top names the newest
//! sequence number, and each sequence `N` has `AAA/BBB/CCC.state.txt` (its
//! sequence number and timestamp) and `AAA/BBB/CCC.osc.gz` (the changes since
//! the previous sequence), where `AAABBBCCC` is `N` zero-padded to 9 digits.
//!
//! The pieces here are deliberately independent of the store:
//!
//! * [`parse_state`] and [`sequence_path`] understand the file format;
//! * a [`Source`] ([`DirSource`], [`HttpSource`], made by [`open_source`])
//!   fetches state files and diffs, reporting "not published yet" as
//!   `Ok(None)` so that the follower can poll without treating it as failure;
//! * [`with_retry`] and [`Backoff`] ride out transient failures, while
//!   [`ReplicationError::is_retryable`] lets fatal ones (a garbled state
//!   file, a wrong URL) stop the daemon at once instead of looping;
//! * [`sequence_for_timestamp`] finds where to start following a feed from
//!   the timestamp of an imported extract.

mod error;
mod retry;
mod search;
mod source;
mod state;

pub use error::ReplicationError;
pub use retry::{
    Backoff, sleep_unless_stopped, with_retry, with_retry_sleeping, with_retry_until_stopped,
};
pub use search::sequence_for_timestamp;
pub use source::{DirSource, HttpSource, Source, SourceOptions, open_source};
pub use state::{ReplicationState, parse_state, sequence_path};

#[cfg(test)]
mod test_util;
