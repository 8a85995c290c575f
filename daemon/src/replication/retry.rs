//! Retrying transient failures with exponential backoff and full jitter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::ReplicationError;

/// The longest a stop request waits in [`sleep_unless_stopped`].
const WAKE_STEP: Duration = Duration::from_millis(50);

/// Sleeps `d`, or less when `stop` is set meanwhile (checked every 50 ms);
/// returns whether it was. Every wait of the daemon and of `replicate` goes
/// through here, so SIGTERM is answered within 50 ms, whatever the delay.
pub fn sleep_unless_stopped(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now().checked_add(d);
    loop {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        let left = match until {
            Some(u) => u.saturating_duration_since(Instant::now()),
            None => WAKE_STEP,
        };
        if left.is_zero() {
            return stop.load(Ordering::Relaxed);
        }
        std::thread::sleep(left.min(WAKE_STEP));
    }
}

/// [`with_retry`] whose waits end early when `stop` is set; it then returns
/// [`ReplicationError::Stopped`] instead of trying again.
pub fn with_retry_until_stopped<T>(
    backoff: &Backoff,
    what: &str,
    stop: &AtomicBool,
    mut f: impl FnMut() -> Result<T, ReplicationError>,
) -> Result<T, ReplicationError> {
    with_retry_sleeping(
        backoff,
        what,
        |d| {
            sleep_unless_stopped(stop, d);
        },
        || {
            if stop.load(Ordering::Relaxed) {
                return Err(ReplicationError::Stopped {
                    what: what.to_owned(),
                });
            }
            f()
        },
    )
}

/// How [`with_retry`] spaces its attempts.
///
/// Before retry `n` (1-based) it sleeps a random time between zero and
/// `min(max, initial * 2^(n-1))` ("full jitter"): the growing bound backs off
/// from a struggling server, and the randomness keeps many followers that
/// failed together from hammering it again in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The bound on the first delay.
    pub initial: Duration,
    /// The bound on every delay.
    pub max: Duration,
    /// Give up after this many attempts in all (the first one included);
    /// `None` retries for as long as the errors are retryable, and `Some(0)`
    /// behaves like `Some(1)`: the operation always runs once.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    /// 1 s growing to 5 min, without a limit on attempts: what a daemon that
    /// must outlast an upstream outage wants. One-shot commands should set
    /// `max_attempts`.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The upper bound of the delay before retry `retry` (1-based).
    fn bound(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }

    /// A random delay before retry `retry`, uniform in `[0, bound(retry)]`.
    fn delay(&self, retry: u32) -> Duration {
        let bound = u64::try_from(self.bound(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..=bound))
    }
}

/// Runs `f` until it succeeds, sleeping between attempts as `backoff` says.
///
/// It stops early on an error that is not
/// [retryable](ReplicationError::is_retryable), returning that error as is,
/// and after `backoff.max_attempts` attempts, returning
/// [`ReplicationError::RetriesExhausted`] with the last error. Each retry is
/// logged at warn level with `what`, the attempt number, the delay and the
/// error, so that a flaky upstream is visible before it becomes an outage.
pub fn with_retry<T>(
    backoff: &Backoff,
    what: &str,
    f: impl FnMut() -> Result<T, ReplicationError>,
) -> Result<T, ReplicationError> {
    with_retry_sleeping(backoff, what, std::thread::sleep, f)
}

/// [`with_retry`] with the sleep supplied by the caller: tests record the
/// delays instead of waiting, and the daemon can use a sleep that wakes up
/// early on shutdown (`f` then sees the shutdown flag and returns a fatal
/// error, or the caller checks it afterwards).
pub fn with_retry_sleeping<T>(
    backoff: &Backoff,
    what: &str,
    mut sleep: impl FnMut(Duration),
    mut f: impl FnMut() -> Result<T, ReplicationError>,
) -> Result<T, ReplicationError> {
    let max_attempts = backoff.max_attempts.map(|max| max.max(1));
    let mut attempt: u32 = 1;
    loop {
        let error = match f() {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if !error.is_retryable() {
            return Err(error);
        }
        if max_attempts.is_some_and(|max| attempt >= max) {
            return Err(ReplicationError::RetriesExhausted {
                what: what.to_owned(),
                attempts: attempt,
                last: Box::new(error),
            });
        }
        let delay = backoff.delay(attempt);
        tracing::warn!(
            what,
            attempt,
            max_attempts,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %error,
            "transient replication error, retrying",
        );
        sleep(delay);
        attempt = attempt.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error() -> ReplicationError {
        ReplicationError::Http {
            url: "http://example.org/state.txt".to_owned(),
            status: 503,
        }
    }

    fn backoff(max_attempts: Option<u32>) -> Backoff {
        Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(35),
            max_attempts,
        }
    }

    /// Runs `with_retry_sleeping` over `results`, returning its result, the
    /// number of calls and the delays slept.
    fn run(
        backoff: &Backoff,
        results: Vec<Result<u32, ReplicationError>>,
    ) -> (Result<u32, ReplicationError>, usize, Vec<Duration>) {
        let mut results = results.into_iter();
        let mut calls = 0;
        let mut delays = Vec::new();
        let result = with_retry_sleeping(
            backoff,
            "fetching a test file",
            |delay| delays.push(delay),
            || {
                calls += 1;
                results.next().unwrap_or_else(|| Err(server_error()))
            },
        );
        (result, calls, delays)
    }

    #[test]
    fn succeeds_after_transient_errors() {
        let (result, calls, delays) = run(
            &backoff(Some(5)),
            vec![Err(server_error()), Err(server_error()), Ok(7)],
        );
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls, 3);
        assert_eq!(delays.len(), 2);
        assert!(delays[0] <= Duration::from_millis(10), "{delays:?}");
        assert!(delays[1] <= Duration::from_millis(20), "{delays:?}");
    }

    #[test]
    fn gives_up_after_max_attempts_keeping_the_last_error() {
        let (result, calls, delays) = run(&backoff(Some(4)), vec![]);
        assert_eq!(calls, 4);
        assert_eq!(delays.len(), 3);
        let err = result.unwrap_err();
        assert!(
            matches!(&err, ReplicationError::RetriesExhausted { attempts: 4, last, .. }
                if matches!(**last, ReplicationError::Http { status: 503, .. })),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "fetching a test file: gave up after 4 attempts: \
             HTTP status 503 from http://example.org/state.txt"
        );
        // The last error was transient, so a caller may try again later.
        assert!(err.is_retryable());
    }

    #[test]
    fn does_not_retry_fatal_errors() {
        let fatal = ReplicationError::Http {
            url: "http://example.org/state.txt".to_owned(),
            status: 403,
        };
        let (result, calls, delays) = run(&backoff(None), vec![Err(server_error()), Err(fatal)]);
        assert_eq!(calls, 2);
        assert_eq!(delays.len(), 1);
        assert!(matches!(
            result,
            Err(ReplicationError::Http { status: 403, .. })
        ));
    }

    #[test]
    fn retries_files_that_are_announced_but_not_published_yet() {
        let not_yet = || Err(ReplicationError::not_published("diff of sequence 12"));
        let (result, calls, _) = run(&backoff(Some(5)), vec![not_yet(), Ok(12)]);
        assert_eq!((result.unwrap(), calls), (12, 2));
        let (result, _, _) = run(&backoff(Some(2)), vec![not_yet(), not_yet()]);
        assert_eq!(
            result.unwrap_err().to_string(),
            "fetching a test file: gave up after 2 attempts: \
             diff of sequence 12 is not published yet"
        );
    }

    #[test]
    fn always_makes_at_least_one_attempt() {
        for max_attempts in [Some(0), Some(1)] {
            let (result, calls, delays) = run(&backoff(max_attempts), vec![Ok(1)]);
            assert_eq!((result.unwrap(), calls, delays.len()), (1, 1, 0));
            let (result, calls, _) = run(&backoff(max_attempts), vec![]);
            assert_eq!(calls, 1);
            assert!(matches!(
                result,
                Err(ReplicationError::RetriesExhausted { attempts: 1, .. })
            ));
        }
    }

    #[test]
    fn retries_without_limit_when_max_attempts_is_none() {
        let mut results: Vec<_> = (0..50).map(|_| Err(server_error())).collect();
        results.push(Ok(3));
        let (result, calls, delays) = run(&backoff(None), results);
        assert_eq!((result.unwrap(), calls, delays.len()), (3, 51, 50));
        assert!(
            delays
                .iter()
                .all(|&delay| delay <= Duration::from_millis(35))
        );
    }

    #[test]
    fn bounds_double_up_to_the_maximum_without_overflow() {
        let b = backoff(None);
        let bounds: Vec<u128> = (1..=5).map(|n| b.bound(n).as_millis()).collect();
        assert_eq!(bounds, [10, 20, 35, 35, 35]);
        let huge = Backoff {
            initial: Duration::from_secs(u64::MAX / 2),
            max: Duration::MAX,
            max_attempts: None,
        };
        assert_eq!(huge.bound(u32::MAX), Duration::MAX);
        let _ = huge.delay(u32::MAX);
    }

    #[test]
    fn delays_are_jittered_within_the_bound() {
        let b = backoff(None);
        let delays: Vec<Duration> = (0..200).map(|_| b.delay(2)).collect();
        assert!(
            delays
                .iter()
                .all(|&delay| delay <= Duration::from_millis(20))
        );
        // Full jitter spreads the delays over the whole range.
        assert!(delays.iter().any(|&delay| delay < Duration::from_millis(5)));
        assert!(
            delays
                .iter()
                .any(|&delay| delay > Duration::from_millis(15))
        );
    }

    #[test]
    fn a_stop_ends_the_retry_wait_at_once() {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let slow = Backoff {
            initial: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
            max_attempts: None,
        };
        let flag = stop.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::Relaxed);
        });
        let mut calls = 0;
        let err = with_retry_until_stopped(&slow, "fetching state.txt", &stop, || {
            calls += 1;
            Err::<(), _>(server_error())
        })
        .unwrap_err();
        setter.join().unwrap();
        // A wait of up to an hour would keep this test running that long;
        // the stop ends it, and no attempt follows the stop.
        assert!(matches!(err, ReplicationError::Stopped { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(calls < 5, "{calls} attempts");
        assert!(sleep_unless_stopped(&stop, Duration::MAX));
    }

    #[test]
    fn with_retry_really_sleeps() {
        let fast = Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
            max_attempts: Some(3),
        };
        let mut calls = 0;
        let result = with_retry(&fast, "test", || {
            calls += 1;
            if calls < 3 {
                Err(server_error())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(result.unwrap(), 3);
    }
}
