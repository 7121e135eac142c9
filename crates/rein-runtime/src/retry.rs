//! Retries with exponential backoff and full jitter, bounded by a deadline.

use std::future::Future;
use std::time::Duration;

/// How often and how patiently to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Attempts in all, including the first.
    pub max_attempts: u32,
    /// Upper bound of the first delay; doubles per retry.
    pub base: Duration,
    /// Upper bound of any delay.
    pub cap: Duration,
}

impl Backoff {
    /// The delay before retry number `retry` (from 1): uniformly random in
    /// `[0, min(cap, base * 2^(retry-1))]` ("full jitter"), so that many clients failing
    /// together do not retry together.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)))
            .min(self.cap);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(0..=millis))
    }
}

/// The output of the last attempt, how many attempts were made, and each earlier attempt's
/// output with the wait that followed it.
pub struct Attempted<T> {
    pub output: T,
    pub attempts: u32,
    pub retried: Vec<(T, Duration)>,
}

/// Runs `attempt` until it succeeds, fails for good, runs out of attempts or `budget` runs out.
///
/// `retry_after(&output)` returns `None` when the output must not be retried, or
/// `Some(advised)` when it may be, with the wait the service advised (which replaces the
/// computed backoff when longer). Each attempt is cut off at `attempt_timeout` or at the end
/// of `budget`, whichever comes first; `on_timeout(by_budget)` supplies its output. No retry
/// is started that could not finish inside the budget's remaining time.
pub async fn with_retries<T, F, Fut>(
    backoff: &Backoff,
    budget: Duration,
    attempt_timeout: Duration,
    mut attempt: F,
    retry_after: impl Fn(&T) -> Option<Option<Duration>>,
    on_timeout: impl Fn(bool) -> T,
) -> Attempted<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + budget;
    let mut attempts = 0;
    let mut retried = Vec::new();
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let by_budget = left <= attempt_timeout;
        let output = match tokio::time::timeout(left.min(attempt_timeout), attempt()).await {
            Ok(output) => output,
            Err(_) => on_timeout(by_budget),
        };
        if attempts >= backoff.max_attempts.max(1) {
            return Attempted {
                output,
                attempts,
                retried,
            };
        }
        let Some(advised) = retry_after(&output) else {
            return Attempted {
                output,
                attempts,
                retried,
            };
        };
        let wait = advised.map_or_else(
            || backoff.delay(attempts),
            |a| a.max(backoff.delay(attempts)),
        );
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if wait >= left {
            return Attempted {
                output,
                attempts,
                retried,
            };
        }
        retried.push((output, wait));
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const FAST: Backoff = Backoff {
        max_attempts: 3,
        base: Duration::from_millis(100),
        cap: Duration::from_millis(250),
    };

    #[test]
    fn delays_stay_under_the_exponential_ceiling_and_the_cap() {
        for retry in 1..8 {
            let ceiling = Duration::from_millis(100 * (1 << (retry - 1))).min(FAST.cap);
            for _ in 0..50 {
                assert!(FAST.delay(retry) <= ceiling);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_success() {
        let calls = AtomicU32::new(0);
        let out = with_retries(
            &FAST,
            Duration::from_secs(60),
            Duration::from_secs(1),
            || async { calls.fetch_add(1, Ordering::SeqCst) + 1 },
            |n: &u32| (*n < 2).then_some(None),
            |_| 0,
        )
        .await;
        assert_eq!((out.output, out.attempts), (2, 2));
        assert_eq!(
            out.retried.len(),
            1,
            "the failed first attempt is handed back"
        );
        assert_eq!(out.retried[0].0, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let out = with_retries(
            &FAST,
            Duration::from_secs(60),
            Duration::from_secs(1),
            || async { "no" },
            |_| None,
            |_| "timeout",
        )
        .await;
        assert_eq!(out.attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_cut_off_and_the_budget_is_never_overrun() {
        let started = tokio::time::Instant::now();
        let out = with_retries(
            &FAST,
            Duration::from_secs(5),
            Duration::from_secs(2),
            || tokio::time::sleep(Duration::from_secs(100)),
            |_| Some(None),
            |_| (),
        )
        .await;
        assert_eq!(out.attempts, 3);
        assert!(
            started.elapsed() <= Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_advised_wait_longer_than_the_budget_ends_retrying() {
        let out = with_retries(
            &FAST,
            Duration::from_secs(5),
            Duration::from_secs(1),
            || async { 429 },
            |_| Some(Some(Duration::from_secs(30))),
            |_| 0,
        )
        .await;
        assert_eq!(out.attempts, 1);
    }
}
