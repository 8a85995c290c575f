//! The replication loop: next sequence, fetch with retries, parse, apply in
//! one batch, repeat. Shared by `osmvec replicate` and the daemon.
//!
//! The invariant: the store's sequence only ever moves to N after diff N is
//! applied, in the same write batch, and N is always the stored sequence + 1.
//! Nothing is skipped: a diff that cannot be fetched or parsed stops the loop
//! (after retries) with an error naming the sequence.
//!
//! Fetching runs on a thread of its own ([`Fetcher`]): the thread that owns
//! the store asks for sequence N and goes on with its own work (the daemon
//! embeds and drains the outbox meanwhile); the fetcher retries on its own
//! schedule, and every one of its waits ends when a stop is requested. The
//! caller never waits for a download: on a stop it returns at once, and a
//! request still in flight dies with the process (it wrote nothing).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use osmvec_graphstore::Store;
use osmvec_graphstore::apply::{ApplyReport, DiffApplier};
use osmvec_graphstore::read::OscOptions;
use osmvec_graphstore::store::format_timestamp;

use crate::replication::{
    Backoff, ReplicationError, ReplicationState, Source, sequence_for_timestamp,
    sleep_unless_stopped, with_retry_until_stopped,
};

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
pub const PARSE_ATTEMPTS: u32 = 3;

/// Where following starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After this applied sequence.
    After(u64),
    /// After the newest sequence at or before this time (a fresh extract).
    Timestamp(i64),
}

/// What the fetcher thread reports.
#[derive(Debug)]
pub enum Fetched {
    /// The sequence the store is at, found from its timestamp.
    StartsAfter(u64),
    /// Diff `seq`, fetched whole; `latest` is the newest sequence the source
    /// announced when it was fetched.
    Diff {
        seq: u64,
        state: ReplicationState,
        bytes: Vec<u8>,
        latest: u64,
    },
    /// Nothing after `wanted - 1` is published yet. The fetcher keeps
    /// asking every poll interval (a `Diff` follows once there is one).
    NotYet { wanted: u64, latest: u64 },
    /// The source's newest sequence is below the one the store has applied
    /// (`wanted - 1`); it keeps asking every poll interval.
    Behind { wanted: u64, latest: u64 },
    /// A request failed for good (a fatal error, or retries exhausted).
    Failed(anyhow::Error),
}

enum Request {
    Start(Start),
    /// Diff `seq`, after waiting `after` (a refetch of a diff that did not
    /// parse waits a little first).
    Diff {
        seq: u64,
        after: Duration,
    },
}

/// Counters of the fetcher, readable while it runs.
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Failed requests (each retry counts).
    pub errors: AtomicU64,
    /// The newest sequence the source announced (0 before the first answer).
    pub latest: AtomicU64,
}

/// The source on a thread of its own (see the module docs).
pub struct Fetcher {
    requests: mpsc::Sender<Request>,
    results: mpsc::Receiver<Fetched>,
    pub stats: Arc<FetchStats>,
    describe: String,
}

impl Fetcher {
    /// Starts the thread; it owns `source` from here on.
    pub fn spawn(
        source: Box<dyn Source>,
        backoff: Backoff,
        poll_interval: Duration,
        stop: Arc<AtomicBool>,
    ) -> Result<Fetcher> {
        let (requests, rx) = mpsc::channel::<Request>();
        let (tx, results) = mpsc::sync_channel::<Fetched>(1);
        let stats = Arc::new(FetchStats::default());
        let describe = source.describe();
        let st = stats.clone();
        std::thread::Builder::new()
            .name("osmvec-fetch".into())
            .spawn(move || {
                fetch_loop(
                    source.as_ref(),
                    &backoff,
                    poll_interval,
                    &stop,
                    &st,
                    &rx,
                    &tx,
                )
            })
            .context("starting the replication fetcher thread")?;
        Ok(Fetcher {
            requests,
            results,
            stats,
            describe,
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub fn start(&self, start: Start) -> Result<()> {
        self.send(Request::Start(start))
    }

    /// Asks for diff `seq` (after `after`); the answer comes through
    /// [`Fetcher::try_take`] / [`Fetcher::take`].
    pub fn want(&self, seq: u64, after: Duration) -> Result<()> {
        self.send(Request::Diff { seq, after })
    }

    fn send(&self, r: Request) -> Result<()> {
        self.requests
            .send(r)
            .map_err(|_| anyhow!("the replication fetcher thread ended"))
    }

    /// The next report, if one is ready.
    pub fn try_take(&self) -> Option<Fetched> {
        match self.results.try_recv() {
            Ok(f) => Some(f),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(Fetched::Failed(anyhow!(
                "the replication fetcher thread ended"
            ))),
        }
    }

    /// Waits up to `timeout` for the next report.
    pub fn take(&self, timeout: Duration) -> Option<Fetched> {
        match self.results.recv_timeout(timeout) {
            Ok(f) => Some(f),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Fetched::Failed(anyhow!(
                "the replication fetcher thread ended"
            ))),
        }
    }
}

fn not_yet(what: String) -> ReplicationError {
    ReplicationError::not_published(what)
}

/// The fetcher thread: serves requests until a stop, or until the caller
/// dropped its end.
fn fetch_loop(
    source: &dyn Source,
    backoff: &Backoff,
    poll_interval: Duration,
    stop: &AtomicBool,
    stats: &FetchStats,
    requests: &mpsc::Receiver<Request>,
    results: &mpsc::SyncSender<Fetched>,
) {
    let counted = |r: Result<ReplicationState, ReplicationError>| {
        if r.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    };
    // Sends one report; false when the caller is gone or a stop came.
    let report = |f: Fetched| -> bool {
        let mut f = f;
        loop {
            match results.try_send(f) {
                Ok(()) => return true,
                Err(mpsc::TrySendError::Disconnected(_)) => return false,
                Err(mpsc::TrySendError::Full(back)) => {
                    if sleep_unless_stopped(stop, Duration::from_millis(20)) {
                        return false;
                    }
                    f = back;
                }
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let request = match requests.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let outcome = match request {
            Request::Start(Start::After(s)) => Fetched::StartsAfter(s),
            Request::Start(Start::Timestamp(ts)) => {
                match with_retry_until_stopped(backoff, "finding the start sequence", stop, || {
                    let r = sequence_for_timestamp(source, ts);
                    if r.is_err() {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                }) {
                    Ok(s) => Fetched::StartsAfter(s),
                    Err(e) => Fetched::Failed(anyhow::Error::new(e).context(format!(
                        "cannot find the sequence for {} on {}",
                        format_timestamp(ts),
                        source.describe()
                    ))),
                }
            }
            Request::Diff { seq, after } => {
                if sleep_unless_stopped(stop, after) {
                    return;
                }
                match fetch_diff(
                    source,
                    backoff,
                    poll_interval,
                    stop,
                    stats,
                    seq,
                    &counted,
                    &report,
                ) {
                    Some(f) => f,
                    None => return,
                }
            }
        };
        if !report(outcome) {
            return;
        }
    }
}

/// Fetches diff `seq`, reporting `NotYet` / `Behind` and polling while it
/// is not published. None: stopped (or the caller is gone).
#[allow(clippy::too_many_arguments)]
fn fetch_diff(
    source: &dyn Source,
    backoff: &Backoff,
    poll_interval: Duration,
    stop: &AtomicBool,
    stats: &FetchStats,
    seq: u64,
    counted: &dyn Fn(
        Result<ReplicationState, ReplicationError>,
    ) -> Result<ReplicationState, ReplicationError>,
    report: &dyn Fn(Fetched) -> bool,
) -> Option<Fetched> {
    let describe = source.describe();
    let stopped = |e: &ReplicationError| matches!(e, ReplicationError::Stopped { .. });
    loop {
        let latest =
            match with_retry_until_stopped(backoff, "fetching the latest state", stop, || {
                counted(source.latest_state())
            }) {
                Ok(l) => l,
                Err(e) if stopped(&e) => return None,
                Err(e) => {
                    return Some(Fetched::Failed(
                        anyhow::Error::new(e)
                            .context(format!("cannot read the latest state of {describe}")),
                    ));
                }
            };
        stats.latest.store(latest.sequence, Ordering::Relaxed);
        if latest.sequence >= seq {
            break;
        }
        let f = if latest.sequence + 1 < seq {
            Fetched::Behind {
                wanted: seq,
                latest: latest.sequence,
            }
        } else {
            Fetched::NotYet {
                wanted: seq,
                latest: latest.sequence,
            }
        };
        if !report(f) || sleep_unless_stopped(stop, poll_interval) {
            return None;
        }
    }
    let latest = stats.latest.load(Ordering::Relaxed);
    let state =
        with_retry_until_stopped(backoff, &format!("state of sequence {seq}"), stop, || {
            counted(
                source
                    .state(seq)?
                    .ok_or_else(|| not_yet(format!("state of sequence {seq}"))),
            )
        });
    let state = match state {
        Ok(s) if s.sequence == seq => s,
        Ok(s) => {
            return Some(Fetched::Failed(anyhow!(
                "state file of sequence {seq} on {describe} says sequence {}",
                s.sequence
            )));
        }
        Err(e) if stopped(&e) => return None,
        Err(e) => {
            return Some(Fetched::Failed(anyhow::Error::new(e).context(format!(
                "cannot fetch the state of sequence {seq} from {describe}"
            ))));
        }
    };
    let bytes = with_retry_until_stopped(backoff, &format!("diff of sequence {seq}"), stop, || {
        let r = source
            .diff(seq)?
            .ok_or_else(|| not_yet(format!("diff of sequence {seq}")));
        if r.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    });
    match bytes {
        Ok(bytes) => Some(Fetched::Diff {
            seq,
            state,
            bytes,
            latest,
        }),
        Err(e) if stopped(&e) => None,
        Err(e) => Some(Fetched::Failed(
            anyhow::Error::new(e).context(format!("cannot fetch diff {seq} from {describe}")),
        )),
    }
}

/// Where the store says following starts.
pub fn start_of(store: &Store) -> Result<Start> {
    let (seq, ts) = store.replication_state()?;
    match (seq, ts) {
        (Some(s), _) => Ok(Start::After(s)),
        (None, Some(ts)) => Ok(Start::Timestamp(ts)),
        (None, None) => Err(anyhow!(
            "the store has neither a replication sequence nor a timestamp; import an extract whose header has osmosis_replication_timestamp"
        )),
    }
}

/// Parses a downloaded diff and commits it as sequence `seq`. `Ok(None)`: it
/// did not parse (the store is untouched; the error is returned for the log).
pub fn apply_fetched(
    store: &Store,
    describe: &str,
    seq: u64,
    state: &ReplicationState,
    bytes: &[u8],
    osc: &OscOptions,
) -> Result<std::result::Result<ApplyReport, osmvec_graphstore::StoreError>> {
    let started = Instant::now();
    let name = format!("sequence {seq} from {describe}");
    let mut applier = DiffApplier::new(store, name.clone())?;
    // Decide by content, not by name: a server may already have undone the
    // gzip (Content-Encoding), and a directory may hold plain XML.
    let gzip = bytes.starts_with(&[0x1f, 0x8b]);
    if let Err(e) = applier.read_osc(&name, bytes, gzip, osc) {
        return Ok(Err(e));
    }
    let report = applier.commit(Some(seq), Some(state.timestamp), true)?;
    tracing::info!(
        sequence = seq,
        timestamp = %format_timestamp(state.timestamp),
        changes = report.changes.total(),
        dirty_tiles = report.dirty_tiles.len(),
        ms = started.elapsed().as_millis() as u64,
        "applied diff"
    );
    Ok(Ok(report))
}

/// `osmvec replicate`'s loop: applies every diff after the stored sequence,
/// in order, until caught up (with `until_caught_up`), `max_diffs`, a stop,
/// or an error.
/// `follow`'s state between the fetcher's answers.
struct Follower<'a> {
    store: &'a Store,
    opts: &'a FollowOptions,
    fetcher: &'a Fetcher,
    describe: String,
    applied: u64,
    current: Option<u64>,
    parse_attempt: u32,
    behind_warned: Option<u64>,
}

impl Follower<'_> {
    fn stopping(&self) -> bool {
        self.opts.stop.load(Ordering::Relaxed)
    }

    /// Asks for `seq`; a request the fetcher cannot take because it ended
    /// on the stop is no error: the loop's next turn sees the stop.
    fn want(&self, seq: u64, after: Duration) -> Result<()> {
        match self.fetcher.want(seq, after) {
            Err(_) if self.stopping() => Ok(()),
            r => r,
        }
    }

    fn outcome(&self, behind: bool) -> FollowOutcome {
        FollowOutcome {
            applied: self.applied,
            sequence: self.current,
            behind,
        }
    }

    /// Handles one answer of the fetcher; `Some`: the loop is over.
    fn handle(
        &mut self,
        f: Fetched,
        on_applied: &mut dyn FnMut(&ApplyReport),
    ) -> Result<Option<FollowOutcome>> {
        match f {
            Fetched::StartsAfter(s) => {
                if self.store.replication_state()?.0.is_none() {
                    tracing::info!(
                        sequence = s,
                        "starting replication after the extract's timestamp"
                    );
                }
                self.current = Some(s);
                self.want(s + 1, Duration::ZERO)?;
            }
            Fetched::Diff {
                seq,
                state,
                bytes,
                latest,
            } => {
                let applied = apply_fetched(
                    self.store,
                    &self.describe,
                    seq,
                    &state,
                    &bytes,
                    &self.opts.osc,
                )?;
                return self.applied_or_retry(seq, latest, applied, on_applied);
            }
            Fetched::NotYet { wanted, .. } => {
                if self.opts.until_caught_up {
                    if self.applied > 0 {
                        tracing::info!(sequence = wanted - 1, "caught up");
                    }
                    return Ok(Some(self.outcome(false)));
                }
            }
            Fetched::Behind { wanted, latest } => {
                let e = ReplicationError::Behind {
                    source: self.describe.clone(),
                    latest,
                    stored: wanted - 1,
                };
                if self.opts.until_caught_up {
                    return Err(e.into());
                }
                if self.behind_warned != Some(latest) {
                    tracing::error!(error = %e, "waiting for the source to pass the store");
                    self.behind_warned = Some(latest);
                }
            }
            // The fetcher thread ends when it sees the stop: a stop that
            // lands between the loop's check and this answer is a stop, not
            // a failure.
            Fetched::Failed(_) if self.stopping() => {
                tracing::info!("stop requested; the last diff was applied whole");
                return Ok(Some(self.outcome(false)));
            }
            Fetched::Failed(e) => return Err(e),
        }
        Ok(None)
    }

    /// After diff `seq` was applied (ask for the next) or found unreadable
    /// (fetch it again, up to `PARSE_ATTEMPTS` downloads).
    fn applied_or_retry(
        &mut self,
        seq: u64,
        latest: u64,
        applied: std::result::Result<ApplyReport, osmvec_graphstore::StoreError>,
        on_applied: &mut dyn FnMut(&ApplyReport),
    ) -> Result<Option<FollowOutcome>> {
        match applied {
            Ok(report) => {
                self.parse_attempt = 0;
                self.applied += 1;
                on_applied(&report);
                self.current = Some(seq);
                if self.opts.max_diffs.is_some_and(|m| self.applied >= m) {
                    return Ok(Some(self.outcome(latest > seq)));
                }
                self.want(seq + 1, Duration::ZERO)?;
            }
            Err(e) => {
                self.parse_attempt += 1;
                if self.parse_attempt >= PARSE_ATTEMPTS {
                    return Err(anyhow::Error::new(e).context(format!(
                        "diff {seq} is unreadable after {} downloads; the store stays at sequence {}",
                        self.parse_attempt,
                        seq - 1
                    )));
                }
                tracing::warn!(sequence = seq, attempt = self.parse_attempt, error = %e, "diff unreadable, fetching it again");
                self.want(seq, self.opts.backoff.initial * self.parse_attempt)?;
            }
        }
        Ok(None)
    }
}

pub fn follow(
    store: &Store,
    source: Box<dyn Source>,
    opts: &FollowOptions,
    on_applied: &mut dyn FnMut(&ApplyReport),
) -> Result<FollowOutcome> {
    store.ensure_consistent()?;
    let fetcher = Fetcher::spawn(source, opts.backoff, opts.poll_interval, opts.stop.clone())?;
    let describe = fetcher.describe().to_string();
    fetcher.start(start_of(store)?)?;
    let mut f = Follower {
        store,
        opts,
        fetcher: &fetcher,
        describe,
        applied: 0,
        current: None,
        parse_attempt: 0,
        behind_warned: None,
    };
    loop {
        if f.stopping() {
            tracing::info!("stop requested; the last diff was applied whole");
            return Ok(f.outcome(false));
        }
        let Some(answer) = fetcher.take(Duration::from_millis(50)) else {
            continue;
        };
        if let Some(outcome) = f.handle(answer, on_applied)? {
            return Ok(outcome);
        }
    }
}
