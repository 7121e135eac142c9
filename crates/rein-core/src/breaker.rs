//! Circuit breakers: stop calling a dependency that keeps failing, then probe it carefully.
//!
//! Closed: calls go through; from a call's failure on, calls and failures inside a window are
//! counted. Once at least `failures` of them have failed and they are at least
//! `failure_rate` percent of the calls counted, the breaker opens: calls are refused without
//! reaching the dependency (no retry storm). A count alone would open it on any busy
//! dependency with a modest error rate (5 failures among 200 calls), and every run asking for
//! it then fails for the whole cool-down: more failed runs than the dependency causes.
//! After `cool_down` one probe is let through (half-open): its success closes the breaker, its
//! failure opens it again. The state is plain data so that any counter backend can store it
//! and update it with compare-and-swap; the transitions here are the only logic.

use serde::{Deserialize, Serialize};

/// When a breaker opens and how long it stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BreakerPolicy {
    /// The fewest failures within `window_ms` that open the breaker.
    pub failures: u32,
    /// The share of the window's calls (in percent) that must have failed for it to open.
    pub failure_rate: u32,
    /// The counting window.
    pub window_ms: i64,
    /// How long the breaker stays open before one probe is let through.
    pub cool_down_ms: i64,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures: 5,
            failure_rate: 50,
            window_ms: 60_000,
            cool_down_ms: 30_000,
        }
    }
}

/// A breaker's stored state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerState {
    /// Failures counted in the current window.
    pub failures: u32,
    /// Calls counted in the current window (its failures included).
    #[serde(default)]
    pub calls: u32,
    /// Start of the current window.
    pub window_start_ms: i64,
    /// When the breaker opened, while open.
    pub opened_ms: Option<i64>,
    /// While a probe is out: until when it may take.
    pub probe_until_ms: Option<i64>,
}

/// Whether a call may go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Allowed,
    /// Half-open: this call is the one probe.
    Probe,
    /// Open: do not call; try again after this many milliseconds.
    Refused {
        /// Milliseconds until a probe may be let through.
        retry_in_ms: i64,
    },
}

impl BreakerState {
    /// Decides whether a call at `now_ms` may go through, and the state after deciding (a probe
    /// is marked out until `now_ms + probe_ms`, so no second caller probes at the same time).
    pub fn admit(
        &self,
        policy: &BreakerPolicy,
        now_ms: i64,
        probe_ms: i64,
    ) -> (Admission, BreakerState) {
        let Some(opened) = self.opened_ms else {
            return (Admission::Allowed, self.clone());
        };
        let reopen_at = opened + policy.cool_down_ms;
        if now_ms < reopen_at {
            return (
                Admission::Refused {
                    retry_in_ms: reopen_at - now_ms,
                },
                self.clone(),
            );
        }
        if let Some(until) = self.probe_until_ms.filter(|until| now_ms < *until) {
            return (
                Admission::Refused {
                    retry_in_ms: until - now_ms,
                },
                self.clone(),
            );
        }
        let mut next = self.clone();
        next.probe_until_ms = Some(now_ms + probe_ms.max(1));
        (Admission::Probe, next)
    }

    /// The state after a call that went through ended at `now_ms`; `was_probe` says whether it
    /// was let through as the half-open probe.
    ///
    /// While open, only the probe's outcome counts: a slow call admitted before the breaker
    /// opened cannot close it by succeeding late. While closed, a success does not wipe the
    /// failures counted in the current window (a tool failing 4 calls in 5 still opens it).
    pub fn record(
        &self,
        policy: &BreakerPolicy,
        succeeded: bool,
        was_probe: bool,
        now_ms: i64,
    ) -> BreakerState {
        if self.opened_ms.is_some() {
            return match (was_probe, succeeded) {
                (true, true) => BreakerState::default(),
                (true, false) => BreakerState {
                    failures: self.failures,
                    calls: self.calls,
                    window_start_ms: self.window_start_ms,
                    opened_ms: Some(now_ms),
                    probe_until_ms: None,
                },
                (false, _) => self.clone(),
            };
        }
        let in_window = self.failures > 0 && now_ms - self.window_start_ms < policy.window_ms;
        if succeeded {
            // Successes count only within a window a failure opened: a healthy breaker stays
            // clear and is never written.
            return if in_window {
                BreakerState {
                    calls: self.calls.max(self.failures).saturating_add(1),
                    ..self.clone()
                }
            } else {
                BreakerState::default()
            };
        }
        let (failures, calls, window_start_ms) = if in_window {
            (
                self.failures + 1,
                self.calls.max(self.failures).saturating_add(1),
                self.window_start_ms,
            )
        } else {
            (1, 1, now_ms)
        };
        let rate_reached =
            u64::from(failures) * 100 >= u64::from(policy.failure_rate) * u64::from(calls);
        BreakerState {
            failures,
            calls,
            window_start_ms,
            opened_ms: (failures >= policy.failures && rate_reached).then_some(now_ms),
            probe_until_ms: None,
        }
    }

    /// Whether the state records nothing worth storing (a healthy, closed breaker).
    pub fn is_clear(&self) -> bool {
        *self == BreakerState::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: BreakerPolicy = BreakerPolicy {
        failures: 3,
        failure_rate: 50,
        window_ms: 1_000,
        cool_down_ms: 500,
    };

    #[test]
    fn opens_after_failures_in_a_window_and_refuses_until_the_cool_down() {
        let mut s = BreakerState::default();
        for t in [0, 100, 200] {
            assert_eq!(s.admit(&P, t, 50).0, Admission::Allowed);
            s = s.record(&P, false, false, t);
        }
        assert_eq!(s.opened_ms, Some(200));
        assert_eq!(
            s.admit(&P, 300, 50).0,
            Admission::Refused { retry_in_ms: 400 }
        );
    }

    #[test]
    fn failures_spread_beyond_the_window_do_not_open_it() {
        let mut s = BreakerState::default();
        for t in [0, 600, 1_200, 1_800] {
            s = s.record(&P, false, false, t);
        }
        assert_eq!(s.opened_ms, None, "{s:?}");
    }

    #[test]
    fn one_probe_after_the_cool_down_closes_or_reopens_it() {
        let mut s = BreakerState::default();
        for t in [0, 1, 2] {
            s = s.record(&P, false, false, t);
        }
        let (admission, probing) = s.admit(&P, 600, 50);
        assert_eq!(admission, Admission::Probe);
        assert!(
            matches!(probing.admit(&P, 610, 50).0, Admission::Refused { .. }),
            "one probe at a time"
        );
        let reopened = probing.record(&P, false, true, 620);
        assert_eq!(
            reopened.admit(&P, 700, 50).0,
            Admission::Refused { retry_in_ms: 420 }
        );
        let closed = probing.record(&P, true, true, 620);
        assert!(closed.is_clear());
        assert_eq!(closed.admit(&P, 621, 50).0, Admission::Allowed);
    }

    #[test]
    fn a_late_success_while_open_does_not_close_it() {
        let mut s = BreakerState::default();
        for t in [0, 1, 2] {
            s = s.record(&P, false, false, t);
        }
        assert_eq!(s.record(&P, true, false, 100), s, "not the probe: ignored");
    }

    #[test]
    fn successes_between_failures_do_not_hide_them() {
        let mut s = BreakerState::default();
        for (t, ok) in [(0, false), (10, true), (20, false), (30, true), (40, false)] {
            s = s.record(&P, ok, false, t);
        }
        assert_eq!(s.opened_ms, Some(40));
    }

    #[test]
    fn a_busy_dependency_with_a_modest_error_rate_stays_closed() {
        let mut s = BreakerState::default();
        // 200 calls in the window, every 37th a failure: 6 failures, 3 %.
        for t in 0..200 {
            s = s.record(&P, t % 37 != 0, false, t);
        }
        assert_eq!(s.opened_ms, None, "{s:?}");
        assert!(s.failures >= P.failures, "{s:?}");
        // Failing outright, it opens at its minimum count.
        let mut s = BreakerState::default();
        for t in 0..3 {
            s = s.record(&P, false, false, t);
        }
        assert_eq!(s.opened_ms, Some(2));
    }

    #[test]
    fn a_state_stored_before_calls_were_counted_reads_as_failures_only() {
        let old: BreakerState = serde_json::from_str(
            r#"{"failures": 2, "window_start_ms": 0, "opened_ms": null, "probe_until_ms": null}"#,
        )
        .unwrap();
        assert_eq!(old.calls, 0);
        assert_eq!(old.record(&P, false, false, 10).opened_ms, Some(10));
    }

    #[test]
    fn a_probe_that_never_reports_back_frees_the_slot_when_its_time_is_up() {
        let mut s = BreakerState::default();
        for t in [0, 1, 2] {
            s = s.record(&P, false, false, t);
        }
        let (_, probing) = s.admit(&P, 600, 50);
        assert_eq!(probing.admit(&P, 651, 50).0, Admission::Probe);
    }
}
