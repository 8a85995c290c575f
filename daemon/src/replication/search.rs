//! Finding where to start following a feed, given the time data is from.

use super::{ReplicationError, Source};

/// The sequence to start from for data as of `ts` (unix seconds): the largest
/// sequence whose state timestamp is `<= ts`. The first diff to apply is the
/// one after it.
///
/// Why that one: state `N` at time `T_N` means diffs `..=N` hold the changes
/// up to `T_N`, so diff `N + 1` and its successors hold every change after
/// `T_N`, and therefore every change after `ts`. Choosing the *largest* such
/// state keeps the overlap small; the overlap is not harmful, because
/// re-applying a change the store already has is idempotent, whereas
/// starting one diff too late would silently lose changes. A state exactly at
/// `ts` is chosen (the changes up to `ts` are in the extract), and a `ts` at
/// or after the latest state gives the latest sequence (the next diff is
/// simply not published yet). pyosmium's
/// `ReplicationServer.timestamp_to_sequence` differs in two details: it
/// takes the state *before* one exactly at `ts` (one diff of extra overlap),
/// and it answers the oldest state instead of failing when `ts` is older.
///
/// How: a binary search between sequence 0 and the latest state, fetching
/// about `log2(latest) + 1` state files (24 for today's planet minutely
/// feed). A missing state file counts as "too old": mirrors prune old
/// sequences, so the published states are taken to be a contiguous range
/// ending at the latest. Should the state just before the first one later
/// than `ts` be missing after all, up to 16 older sequences are tried (a gap
/// in the feed), then the newest suitable state seen during the search.
///
/// If `ts` precedes the oldest state the feed still has, this returns
/// [`ReplicationError::TimestampTooOld`] rather than the oldest sequence:
/// the changes between `ts` and that state are not in the feed, so following
/// it would leave the database silently incomplete. Re-import a newer
/// extract instead.
pub fn sequence_for_timestamp(source: &dyn Source, ts: i64) -> Result<u64, ReplicationError> {
    /// How far below a missing state to look for a published one.
    const MAX_GAP: usize = 16;

    let latest = source.latest_state()?;
    if latest.timestamp <= ts {
        return Ok(latest.sequence);
    }
    // Invariants: `above` is a published state later than `ts`; every
    // sequence up to `below` is missing or not later than `ts` (`None`: no
    // such sequence is known yet); `fits` is the newest published sequence
    // not later than `ts` seen so far.
    let mut above = latest;
    let mut below: Option<u64> = None;
    let mut fits: Option<u64> = None;
    loop {
        let low = below.map_or(0, |seq| seq + 1);
        if low >= above.sequence {
            break;
        }
        let mid = low + (above.sequence - low) / 2;
        match source.state(mid)? {
            Some(state) if state.timestamp > ts => above = state,
            Some(_) => {
                below = Some(mid);
                fits = Some(mid);
            }
            None => below = Some(mid),
        }
    }
    // Now `below` is `above.sequence - 1`, or `None` if `above` is state 0.
    if below.is_some() && below == fits {
        return Ok(above.sequence - 1);
    }
    if let Some(missing) = below {
        // State `missing` is not published: look for an older one that is.
        let floor = fits.map_or(0, |seq| seq + 1);
        for seq in (floor..missing).rev().take(MAX_GAP) {
            if let Some(state) = source.state(seq)?
                && state.timestamp <= ts
            {
                return Ok(gap_warning(source, missing, seq));
            }
        }
        if let Some(seq) = fits {
            return Ok(gap_warning(source, missing, seq));
        }
    }
    Err(ReplicationError::TimestampTooOld {
        timestamp: ts,
        oldest_sequence: above.sequence,
        oldest_timestamp: above.timestamp,
    })
}

/// Logs that the tightest start, `missing`, had no state file, and returns
/// the older `start` used instead.
fn gap_warning(source: &dyn Source, missing: u64, start: u64) -> u64 {
    tracing::warn!(
        source = source.describe(),
        missing,
        start,
        "a state file is missing in the middle of the feed; starting from an older sequence",
    );
    start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::test_util::{CountingSource, data_path};
    use crate::replication::{DirSource, SourceOptions};

    /// 2017-03-01T07:49:00Z, the time of state 0 of the Maldives replica.
    const MALDIVES_T0: i64 = 1_488_354_540;
    /// 2017-01-15T00:00:00Z, the time of state 0 of the Andorra replica.
    const ANDORRA_T0: i64 = 1_484_438_400;

    fn maldives(hidden: impl Fn(u64) -> bool + Send + 'static) -> CountingSource {
        let dir = DirSource::new(
            data_path("replication/maldives/minute"),
            &SourceOptions::default(),
        )
        .unwrap();
        CountingSource::new(Box::new(dir), hidden)
    }

    /// ceil(log2(181)) probes plus the latest state.
    const MALDIVES_MAX_FETCHES: usize = 8 + 1;

    #[test]
    fn finds_the_last_state_at_or_before_the_timestamp() {
        let source = maldives(|_| false);
        let minute = 60;
        for (ts, expected) in [
            (MALDIVES_T0 + 90 * minute + 30, 90),
            (MALDIVES_T0 + 90 * minute, 90),
            (MALDIVES_T0 + 90 * minute - 1, 89),
            (MALDIVES_T0, 0),
            (MALDIVES_T0 + 59, 0),
            (MALDIVES_T0 + 179 * minute + 59, 179),
        ] {
            source.reset();
            assert_eq!(
                sequence_for_timestamp(&source, ts).unwrap(),
                expected,
                "{ts}"
            );
            assert!(
                source.fetches() <= MALDIVES_MAX_FETCHES,
                "{}",
                source.fetches()
            );
        }
    }

    #[test]
    fn answers_every_minute_with_logarithmically_many_fetches() {
        let source = maldives(|_| false);
        for seq in 0..=180 {
            source.reset();
            let ts = MALDIVES_T0 + 60 * seq as i64 + 17;
            assert_eq!(sequence_for_timestamp(&source, ts).unwrap(), seq);
            assert!(
                source.fetches() <= MALDIVES_MAX_FETCHES,
                "{} fetches for sequence {seq}",
                source.fetches()
            );
        }
    }

    #[test]
    fn a_timestamp_at_or_after_the_latest_state_gives_the_latest_sequence() {
        let source = maldives(|_| false);
        for ts in [MALDIVES_T0 + 180 * 60, MALDIVES_T0 + 10_000_000] {
            source.reset();
            assert_eq!(sequence_for_timestamp(&source, ts).unwrap(), 180);
            assert_eq!(source.fetches(), 1, "only state.txt is needed");
        }
    }

    #[test]
    fn a_timestamp_before_the_oldest_state_is_an_error() {
        let source = maldives(|_| false);
        let err = sequence_for_timestamp(&source, MALDIVES_T0 - 1).unwrap_err();
        assert!(
            matches!(
                err,
                ReplicationError::TimestampTooOld {
                    oldest_sequence: 0,
                    oldest_timestamp: MALDIVES_T0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            "2017-03-01T07:48:59Z is before the oldest available state \
             (sequence 0 at 2017-03-01T07:49:00Z), so the changes in between \
             cannot be fetched from this feed"
        );
    }

    #[test]
    fn copes_with_pruned_old_states() {
        let source = maldives(|seq| seq < 50);
        assert_eq!(
            sequence_for_timestamp(&source, MALDIVES_T0 + 60 * 60).unwrap(),
            60
        );
        assert_eq!(
            sequence_for_timestamp(&source, MALDIVES_T0 + 50 * 60).unwrap(),
            50
        );
        source.reset();
        let err = sequence_for_timestamp(&source, MALDIVES_T0 + 10 * 60).unwrap_err();
        assert!(
            matches!(
                err,
                ReplicationError::TimestampTooOld {
                    oldest_sequence: 50,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(source.fetches() <= MALDIVES_MAX_FETCHES + 16);
    }

    #[test]
    fn falls_back_to_an_older_state_when_the_answer_is_missing() {
        let source = maldives(|seq| seq == 90);
        assert_eq!(
            sequence_for_timestamp(&source, MALDIVES_T0 + 90 * 60 + 30).unwrap(),
            89
        );
        let source = maldives(|seq| (85..=90).contains(&seq));
        assert_eq!(
            sequence_for_timestamp(&source, MALDIVES_T0 + 90 * 60 + 30).unwrap(),
            84
        );
        // A gap wider than the search looks across: the newest state the
        // binary search saw is still a correct, if less tight, start.
        let source = maldives(|seq| (100..=150).contains(&seq));
        let start = sequence_for_timestamp(&source, MALDIVES_T0 + 150 * 60 + 30).unwrap();
        assert!(start < 100, "{start}");
    }

    #[test]
    fn works_on_a_daily_feed() {
        let dir = DirSource::new(
            data_path("replication/andorra/day"),
            &SourceOptions::default(),
        )
        .unwrap();
        let day = 86_400;
        // 2017-02-01T12:00:00Z, 17.5 days after 2017-01-15.
        assert_eq!(
            sequence_for_timestamp(&dir, ANDORRA_T0 + 17 * day + day / 2).unwrap(),
            17
        );
        assert_eq!(
            sequence_for_timestamp(&dir, ANDORRA_T0 + 35 * day).unwrap(),
            35
        );
    }

    #[test]
    fn propagates_source_errors() {
        let source = maldives(|_| false);
        source.fail_states();
        let err = sequence_for_timestamp(&source, MALDIVES_T0 + 60).unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
    }
}
