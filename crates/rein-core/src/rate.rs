//! Rate limits: requests and tokens per window, per user, session and tenant.
//!
//! The algorithm is GCRA (the generic cell rate algorithm): a limit of N per window admits a
//! burst of up to N and then one unit every window/N, tracked by a single number per scope,
//! the theoretical arrival time. Like breakers, the state is plain data that any counter
//! backend stores by compare-and-swap; this module holds the only logic.

use serde::{Deserialize, Serialize};

/// At most `limit` units (requests or tokens) per `window_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Units per window.
    pub limit: u64,
    /// The window, in milliseconds.
    pub window_ms: i64,
}

/// A rate limiter's stored state: the theoretical arrival time, exactly: `tat_ns` whole
/// nanoseconds plus `frac` / limit of a nanosecond (so no rounding ever lets more through).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateState {
    /// When the scope will have spent everything admitted so far at the allowed pace.
    pub tat_ns: i64,
    /// The fractional nanosecond of `tat_ns`, in units of 1/limit.
    #[serde(default)]
    pub frac: u64,
}

/// The answer to taking units from a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Taken.
    Granted,
    /// Not taken: it would be admitted after this many milliseconds.
    Wait {
        /// Milliseconds to wait.
        wait_ms: i64,
    },
    /// Not taken, and never will be: more than the whole limit at once.
    TooLarge,
}

impl RateState {
    /// Tries to take `amount` units at `now_ms`; returns the answer and the state after it.
    pub fn take(&self, limit: &RateLimit, amount: u64, now_ms: i64) -> (Take, RateState) {
        if limit.limit == 0 || amount > limit.limit {
            return (Take::TooLarge, *self);
        }
        // All in units of 1/limit of a nanosecond, so the arithmetic is exact.
        // In these units one unit of the resource costs exactly `window_ns`: the window is
        // `window_ns * limit` units long and holds `limit` of them.
        let n = i128::from(limit.limit);
        let window_ns = i128::from(limit.window_ms.max(1)) * 1_000_000;
        let window = window_ns * n;
        let now = i128::from(now_ms) * 1_000_000 * n;
        // A remainder from a different limit (the configuration changed) is dropped.
        let frac = if self.frac < limit.limit {
            i128::from(self.frac)
        } else {
            0
        };
        let tat = (i128::from(self.tat_ns) * n + frac).max(now);
        let new_tat = tat + window_ns * i128::from(amount);
        let allowed_at = new_tat - window;
        if allowed_at > now {
            let per_ms = 1_000_000 * n;
            let wait_ms =
                i64::try_from((allowed_at - now + per_ms - 1) / per_ms).unwrap_or(i64::MAX);
            return (Take::Wait { wait_ms }, *self);
        }
        let tat_ns = i64::try_from(new_tat / n).unwrap_or(i64::MAX);
        let frac = u64::try_from(new_tat % n).unwrap_or(0);
        (Take::Granted, RateState { tat_ns, frac })
    }
}

/// The limits of one tenant's runs; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RatePolicy {
    /// Model calls per window for the whole tenant.
    pub tenant_requests: Option<RateLimit>,
    /// Tokens (worst case of each call) per window for the whole tenant.
    pub tenant_tokens: Option<RateLimit>,
    /// Model calls per window per user.
    pub user_requests: Option<RateLimit>,
    /// Tokens per window per user.
    pub user_tokens: Option<RateLimit>,
    /// Model calls per window per session.
    pub session_requests: Option<RateLimit>,
    /// Tokens per window per session.
    pub session_tokens: Option<RateLimit>,
}

/// What happens to a call over a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    /// Wait until it is admitted, if that is at most this many milliseconds away (and inside
    /// the run's wall-clock limit); otherwise reject.
    Delay {
        /// Longest wait accepted.
        max_wait_ms: i64,
    },
    /// Reject at once, saying how long to wait.
    Reject,
}

/// Rate limits for every tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// For tenants without their own.
    pub defaults: RatePolicy,
    /// Per tenant.
    pub tenants: std::collections::BTreeMap<crate::TenantId, RatePolicy>,
    /// Delay or reject.
    pub over_limit: OverLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            defaults: RatePolicy::default(),
            tenants: std::collections::BTreeMap::new(),
            over_limit: OverLimit::Delay {
                max_wait_ms: 30_000,
            },
        }
    }
}

impl RateLimits {
    /// Whether any limit is set for anyone.
    pub fn any(&self) -> bool {
        self.defaults != RatePolicy::default()
            || self.tenants.values().any(|p| *p != RatePolicy::default())
    }

    /// The limits a model call of `tokens` worst-case tokens draws on: `(counter key, limit,
    /// amount)`.
    pub fn takes(
        &self,
        tenant: &crate::TenantId,
        user: &crate::UserId,
        session: &crate::SessionId,
        tokens: u64,
    ) -> Vec<(String, RateLimit, u64)> {
        let p = self.tenants.get(tenant).unwrap_or(&self.defaults);
        use crate::budget::key_part;
        let (tenant, user, session) = (
            key_part(tenant.as_str()),
            key_part(user.as_str()),
            key_part(session.as_str()),
        );
        [
            (
                format!("rate:tenant:{tenant}:requests"),
                p.tenant_requests,
                1,
            ),
            (
                format!("rate:tenant:{tenant}:tokens"),
                p.tenant_tokens,
                tokens,
            ),
            (
                format!("rate:user:{tenant}:{user}:requests"),
                p.user_requests,
                1,
            ),
            (
                format!("rate:user:{tenant}:{user}:tokens"),
                p.user_tokens,
                tokens,
            ),
            (
                format!("rate:session:{tenant}:{session}:requests"),
                p.session_requests,
                1,
            ),
            (
                format!("rate:session:{tenant}:{session}:tokens"),
                p.session_tokens,
                tokens,
            ),
        ]
        .into_iter()
        .filter_map(|(key, limit, amount)| limit.map(|l| (key, l, amount)))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE_PER_SECOND: RateLimit = RateLimit {
        limit: 3,
        window_ms: 1_000,
    };

    #[test]
    fn a_burst_up_to_the_limit_then_waits_at_the_pace() {
        let mut s = RateState::default();
        for _ in 0..3 {
            let (take, next) = s.take(&THREE_PER_SECOND, 1, 10_000);
            assert_eq!(take, Take::Granted);
            s = next;
        }
        assert_eq!(
            s.take(&THREE_PER_SECOND, 1, 10_000).0,
            Take::Wait { wait_ms: 334 }
        );
        assert_eq!(s.take(&THREE_PER_SECOND, 1, 10_334).0, Take::Granted);
    }

    #[test]
    fn a_refusal_changes_nothing_and_idle_time_refills() {
        let s = RateState::default();
        let (_, s) = s.take(&THREE_PER_SECOND, 3, 0);
        let (take, same) = s.take(&THREE_PER_SECOND, 1, 0);
        assert!(matches!(take, Take::Wait { .. }));
        assert_eq!(same, s);
        assert_eq!(
            s.take(&THREE_PER_SECOND, 3, 1_000).0,
            Take::Granted,
            "a full window later, a full burst"
        );
    }

    #[test]
    fn a_huge_limit_still_limits() {
        let huge = RateLimit {
            limit: 100_000_000,
            window_ms: 60_000,
        };
        let (take, s) = RateState::default().take(&huge, 100_000_000, 0);
        assert_eq!(take, Take::Granted);
        assert!(
            matches!(s.take(&huge, 1_000, 0).0, Take::Wait { .. }),
            "the window is spent"
        );
    }

    #[test]
    fn more_than_the_whole_limit_at_once_is_never_granted() {
        assert_eq!(
            RateState::default().take(&THREE_PER_SECOND, 4, 0).0,
            Take::TooLarge
        );
    }
}
