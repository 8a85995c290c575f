//! The replication loop: next sequence, fetch with retries, parse, apply in
//! one batch, repeat. Shared by `osmvec replicate` and the daemon.
//!
//! The invariant: the store's sequence only ever moves to N after diff N is
//! applied, in the same write batch, and N is always the stored sequence + 1.
//! Nothing is skipped: a diff that cannot be fetched or parsed stops the loop
//! (after retries) with an error naming the sequence.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use osmvec_graphstore::Store;
use osmvec_graphstore::apply::{ApplyReport, DiffApplier};
use osmvec_graphstore::read::OscOptions;
use osmvec_graphstore::store::format_timestamp;

use crate::cli::read_diff_into;
use crate::replication::{Backoff, ReplicationError, Source, sequence_for_timestamp, with_retry};

pub struct FollowOptions {
    /// Return once the source has nothing newer.
    pub until_caught_up: bool,
    /// Wait between polls when caught up.
    pub poll_interval: Duration,
    /// Stop after this many applied diffs.
    pub max_diffs: Option<u64>,
    /// Retry policy for every request (attempts: None retries forever).
    pub backoff: Backoff,
    pub osc: OscOptions,
    /// Set (by a signal handler) to stop after the diff in progress.
    pub stop: Arc<AtomicBool>,
}

#[derive(Debug)]
pub struct FollowOutcome {
    pub applied: u64,
    pub sequence: Option<u64>,
    /// The source has sequences after `sequence` (the loop stopped at
    /// `max_diffs` or on a stop request).
    pub behind: bool,
}

/// Attempts at parsing a downloaded diff: a parse error can be a download
/// cut short, so it is fetched again a few times before the loop stops.
const PARSE_ATTEMPTS: u32 = 3;

pub fn follow(
    store: &Store,
    source: &dyn Source,
    opts: &FollowOptions,
    on_applied: &mut dyn FnMut(&ApplyReport),
) -> Result<FollowOutcome> {
    store.ensure_consistent()?;
    let backoff = &opts.backoff;
    let (seq, ts) = store.replication_state()?;
    let mut current = match seq {
        Some(s) => s,
        None => {
            let ts = ts.ok_or_else(|| {
                anyhow!(
                    "the store has neither a replication sequence nor a timestamp; import an extract whose header has osmosis_replication_timestamp"
                )
            })?;
            let s = with_retry(backoff, "finding the start sequence", || {
                sequence_for_timestamp(source, ts)
            })
            .with_context(|| {
                format!(
                    "cannot find the sequence for {} on {}",
                    format_timestamp(ts),
                    source.describe()
                )
            })?;
            tracing::info!(
                timestamp = %format_timestamp(ts),
                sequence = s,
                "starting replication after the extract's timestamp"
            );
            s
        }
    };
    let mut applied = 0u64;
    loop {
        let latest = with_retry(backoff, "fetching the latest state", || {
            source.latest_state()
        })
        .with_context(|| format!("cannot read the latest state of {}", source.describe()))?;
        while current < latest.sequence {
            if opts.max_diffs.is_some_and(|m| applied >= m) || stopping(opts) {
                return Ok(FollowOutcome {
                    applied,
                    sequence: Some(current),
                    behind: true,
                });
            }
            let next = current + 1;
            let report = apply_one(store, source, next, opts, backoff)?;
            applied += 1;
            on_applied(&report);
            current = next;
        }
        if opts.until_caught_up {
            if applied > 0 {
                tracing::info!(sequence = current, "caught up");
            }
            return Ok(FollowOutcome {
                applied,
                sequence: Some(current),
                behind: false,
            });
        }
        if stopping(opts) {
            return Ok(FollowOutcome {
                applied,
                sequence: Some(current),
                behind: false,
            });
        }
        // Sleep in short steps so that a stop request is seen promptly.
        let until = Instant::now() + opts.poll_interval;
        while Instant::now() < until && !stopping(opts) {
            std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
        }
    }
}

fn stopping(opts: &FollowOptions) -> bool {
    let stop = opts.stop.load(Ordering::Relaxed);
    if stop {
        tracing::info!("stop requested; the last diff was applied whole");
    }
    stop
}

fn not_yet(what: String) -> ReplicationError {
    ReplicationError::not_published(what)
}

fn apply_one(
    store: &Store,
    source: &dyn Source,
    seq: u64,
    opts: &FollowOptions,
    backoff: &Backoff,
) -> Result<ApplyReport> {
    let started = Instant::now();
    let state = with_retry(backoff, &format!("state of sequence {seq}"), || {
        source
            .state(seq)?
            .ok_or_else(|| not_yet(format!("state of sequence {seq}")))
    })
    .with_context(|| {
        format!(
            "cannot fetch the state of sequence {seq} from {}",
            source.describe()
        )
    })?;
    if state.sequence != seq {
        anyhow::bail!(
            "state file of sequence {seq} on {} says sequence {}",
            source.describe(),
            state.sequence
        );
    }
    let name = format!("sequence {seq} from {}", source.describe());
    let mut attempt = 0;
    loop {
        attempt += 1;
        let bytes = with_retry(backoff, &format!("diff of sequence {seq}"), || {
            source
                .diff(seq)?
                .ok_or_else(|| not_yet(format!("diff of sequence {seq}")))
        })
        .with_context(|| format!("cannot fetch diff {seq} from {}", source.describe()))?;
        let mut applier = DiffApplier::new(store, name.clone())?;
        // Decide by content, not by name: a server may already have undone
        // the gzip (Content-Encoding), and a directory may hold plain XML.
        let gzip = bytes.starts_with(&[0x1f, 0x8b]);
        match read_diff_into(&mut applier, &name, bytes.as_slice(), gzip, &opts.osc) {
            Ok(()) => {
                let report = applier.commit(Some(seq), Some(state.timestamp), true)?;
                tracing::info!(
                    sequence = seq,
                    timestamp = %format_timestamp(state.timestamp),
                    changes = report.changes.total(),
                    dirty_tiles = report.dirty_tiles.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "applied diff"
                );
                return Ok(report);
            }
            Err(e) if attempt < PARSE_ATTEMPTS => {
                tracing::warn!(sequence = seq, attempt, error = %e, "diff unreadable, fetching it again");
                std::thread::sleep(backoff.initial * attempt);
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "diff {seq} is unreadable after {attempt} downloads; the store stays at sequence {}",
                    seq - 1
                )));
            }
        }
    }
}
