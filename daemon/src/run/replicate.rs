//! The replicate stage: at most one diff per cycle, from the fetcher thread
//! (which reads the source on its own, so retries and slow servers never
//! hold the loop nor a stop).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use osmvec_graphstore::Store;
use osmvec_graphstore::apply::ApplyReport;
use osmvec_graphstore::read::OscOptions;

use super::{CycleReport, Flow, RunOptions};
use crate::follow::{Fetched, Fetcher, apply_fetched, start_of};
use crate::observe::api::now_unix;
use crate::observe::metrics::Metrics;
use crate::replication::{ReplicationError, Source};

pub(super) struct Replicate {
    fetcher: Fetcher,
    stop: Arc<AtomicBool>,
    osc: OscOptions,
    /// The first retry's wait after an unreadable diff (then × attempt).
    retry_after: Duration,
    until_caught_up: bool,
    /// A report the idle wait took from the fetcher, handled next cycle.
    next: Option<Fetched>,
    parse_attempt: u32,
    behind_warned: Option<u64>,
    /// The source has nothing newer than the store (or is behind it).
    pub(super) caught_up: bool,
    /// When the oldest diff whose tiles are not embedded yet was applied.
    pub(super) pending_since: Option<Instant>,
}

impl Replicate {
    /// Starts the fetcher thread on `source` and asks for the store's next
    /// diff.
    pub(super) fn start(
        source: Box<dyn Source>,
        o: &RunOptions,
        store: &Store,
        stop: Arc<AtomicBool>,
    ) -> Result<Replicate> {
        let fetcher = Fetcher::spawn(source, o.backoff, o.poll_interval, stop.clone())?;
        fetcher.start(start_of(store)?)?;
        Ok(Replicate {
            fetcher,
            stop,
            osc: o.osc.clone(),
            retry_after: o.backoff.initial,
            until_caught_up: o.until_caught_up,
            next: None,
            parse_attempt: 0,
            behind_warned: None,
            caught_up: false,
            pending_since: None,
        })
    }

    /// The fetcher's counters into the metrics.
    pub(super) fn observe(&self, m: &Metrics) {
        let stats = &self.fetcher.stats;
        m.replication_fetch_errors_total
            .inc_by(stats.errors.load(Ordering::Relaxed) - m.replication_fetch_errors_total.get());
        let latest = stats.latest.load(Ordering::Relaxed);
        if latest > 0 {
            m.replication_source_sequence.set(latest as i64);
        }
    }

    /// Applies the fetched diff, if the fetcher has one (it polls the
    /// source every poll interval by itself once caught up). `Stop` when
    /// the fetcher ended on the stop.
    pub(super) fn step(
        &mut self,
        store: &Store,
        m: &Metrics,
        cycle: &mut CycleReport,
    ) -> Result<Flow> {
        let f = self.next.take().or_else(|| self.fetcher.try_take());
        match f {
            None => {}
            Some(Fetched::StartsAfter(s)) => self.want(s + 1, Duration::ZERO)?,
            Some(Fetched::Diff {
                seq,
                state,
                bytes,
                latest,
            }) => {
                let ta = Instant::now();
                let applied = apply_fetched(
                    store,
                    self.fetcher.describe(),
                    seq,
                    &state,
                    &bytes,
                    &self.osc,
                )?;
                drop(bytes);
                match applied {
                    Ok(report) => {
                        self.parse_attempt = 0;
                        record_diff(m, &report);
                        m.diff_apply_duration_seconds
                            .observe(ta.elapsed().as_secs_f64());
                        cycle.diffs_applied = 1;
                        cycle.sequence = Some(seq);
                        self.caught_up = latest <= seq;
                        if self.pending_since.is_none() {
                            self.pending_since = Some(Instant::now());
                        }
                        self.want(seq + 1, Duration::ZERO)?;
                    }
                    Err(e) => {
                        self.parse_attempt += 1;
                        let attempt = self.parse_attempt;
                        if attempt >= crate::follow::PARSE_ATTEMPTS {
                            return Err(anyhow::Error::new(e).context(format!(
                                "diff {seq} is unreadable after {attempt} downloads; the store stays at sequence {}",
                                seq - 1
                            )));
                        }
                        tracing::warn!(sequence = seq, attempt, error = %e, "diff unreadable, fetching it again");
                        self.want(seq, self.retry_after * attempt)?;
                    }
                }
            }
            Some(Fetched::NotYet { .. }) => self.caught_up = true,
            Some(Fetched::Behind { wanted, latest }) => {
                let e = ReplicationError::Behind {
                    source: self.fetcher.describe().to_string(),
                    latest,
                    stored: wanted - 1,
                };
                if self.until_caught_up {
                    return Err(e.into());
                }
                if self.behind_warned != Some(latest) {
                    tracing::error!(error = %e, "waiting for the source to pass the store");
                    self.behind_warned = Some(latest);
                }
                self.caught_up = true;
            }
            // The fetcher ends on the stop: then this is the stop.
            Some(Fetched::Failed(_)) if self.stop.load(Ordering::Relaxed) => return Ok(Flow::Stop),
            Some(Fetched::Failed(e)) => return Err(e),
        }
        Ok(Flow::Go)
    }

    /// Asks the fetcher for diff `seq`. A request it cannot take because
    /// it ended on the stop is no error: the loop's next turn sees the stop.
    fn want(&self, seq: u64, after: Duration) -> Result<()> {
        match self.fetcher.want(seq, after) {
            Err(_) if self.stop.load(Ordering::Relaxed) => Ok(()),
            r => r,
        }
    }

    /// Waiting for the source or the broker after a cycle that did
    /// nothing: no spinning, but a fetched diff or a stop wakes it at once.
    pub(super) fn idle(&mut self, stalled: bool, paused: bool) {
        let until = Instant::now() + Duration::from_millis(if stalled { 1000 } else { 100 });
        while self.next.is_none() && !self.stop.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if !paused {
                self.next = self.fetcher.take(left.min(Duration::from_millis(50)));
            } else {
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
        }
    }
}

/// Metrics of one applied diff.
fn record_diff(m: &Metrics, r: &ApplyReport) {
    if r.already_applied {
        return;
    }
    m.diffs_applied_total.inc();
    m.last_diff_applied_timestamp_seconds.set(now_unix());
    if let Some(seq) = r.sequence {
        m.replication_sequence.set(seq as i64);
    }
    if let Some(ts) = r.timestamp {
        m.replication_timestamp_seconds.set(ts as f64);
        m.refresh_lag(now_unix());
    }
    for (t, c) in [
        ("node", r.changes.node),
        ("way", r.changes.way),
        ("relation", r.changes.relation),
    ] {
        for (a, n) in [
            ("create", c.create),
            ("modify", c.modify),
            ("delete", c.delete),
        ] {
            m.objects_changed_total.with_label_values(&[t, a]).inc_by(n);
        }
    }
}
