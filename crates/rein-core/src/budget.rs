//! Shared budgets: caps that many runs draw on at once (a session, a user's day, a tenant's
//! day, the whole deployment's hour), enforced by reservation.
//!
//! Check-then-increment races: two runs both see room and both spend it. Reserve-then-settle
//! cannot overspend: before a model call its worst case is reserved atomically in every scope
//! it belongs to (all or nothing); after the call the actual amount is settled and the rest
//! released. A reservation whose holder died expires and is released. The run's own limits are
//! the engine's business; these are the scopes beyond one run.
//!
//! This module only describes scopes and the [`Counters`] interface; the backends (SQLite,
//! Redis) live in adapter crates.

use crate::Usd;
use crate::ids::{SessionId, TenantId, UserId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future (the backends are async).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One part of a counter key: `%` and `:` are percent-encoded, so ids that contain `:` can
/// never make two different scopes share a key (tenant `a` with user `b:c` vs tenant `a:b`
/// with user `c`).
///
/// ```
/// assert_eq!(rein_core::budget::key_part("a:b%c"), "a%3Ab%25c");
/// ```
pub fn key_part(part: &str) -> String {
    part.replace('%', "%25").replace(':', "%3A")
}

/// Caps of one scope; `None` means uncapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cap {
    /// Money.
    pub usd: Option<Usd>,
    /// Tokens (input + output).
    pub tokens: Option<u64>,
}

impl Cap {
    /// Whether the scope is capped at all.
    pub fn is_set(&self) -> bool {
        self.usd.is_some() || self.tokens.is_some()
    }
}

/// The shared budgets that apply to one tenant's runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetPolicy {
    /// Per session, over its lifetime.
    pub session: Cap,
    /// Per user, per UTC day.
    pub user_daily: Cap,
    /// Per tenant, per UTC day.
    pub tenant_daily: Cap,
    /// The whole deployment, per UTC hour.
    pub global_hourly: Cap,
}

/// Budget policies for every tenant: defaults, and per-tenant overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// What applies to a tenant without its own policy.
    pub defaults: BudgetPolicy,
    /// Per-tenant policies (each replaces the defaults for that tenant).
    pub tenants: std::collections::BTreeMap<TenantId, BudgetPolicy>,
    /// A `budget_warning` event is recorded when a scope's spend crosses this percentage of a cap.
    pub warn_percent: u8,
}

/// Default for [`Budgets::warn_percent`].
pub const DEFAULT_WARN_PERCENT: u8 = 75;

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            defaults: BudgetPolicy::default(),
            tenants: std::collections::BTreeMap::new(),
            warn_percent: DEFAULT_WARN_PERCENT,
        }
    }
}

/// The caps of `scope` whose warning line (`percent` of the cap) the spend crossed when it went
/// from `before` to `after`: `(usd crossed, tokens crossed)`.
pub fn crossed_warning(cap: &Cap, percent: u8, before: &Amount, after: &Amount) -> (bool, bool) {
    let line = |cap: i128| cap * i128::from(percent);
    let crossed = |cap: Option<i128>, before: i128, after: i128| {
        cap.is_some_and(|c| before * 100 < line(c) && after * 100 >= line(c))
    };
    (
        crossed(
            cap.usd.map(|u| i128::from(u.micros())),
            i128::from(before.usd.micros()),
            i128::from(after.usd.micros()),
        ),
        crossed(
            cap.tokens.map(i128::from),
            i128::from(before.tokens),
            i128::from(after.tokens),
        ),
    )
}

/// The scopes whose warning line (`percent` of a cap) a settlement of `spent` crossed, each with
/// its spend after it, given every scope's standing read in the same atomic step as the
/// settlement (so exactly one settlement is the one that crossed a line).
pub fn warnings<'a>(
    scopes: &'a [Scope],
    standings: &[Standing],
    spent: &Amount,
    percent: u8,
) -> Vec<(&'a Scope, Amount)> {
    if *spent == Amount::default() {
        return Vec::new();
    }
    scopes
        .iter()
        .zip(standings)
        .filter_map(|(scope, standing)| {
            let after = standing.spent;
            let before = Amount {
                usd: after.usd - spent.usd,
                tokens: after.tokens.saturating_sub(spent.tokens),
            };
            let (usd, tokens) = crossed_warning(&scope.cap, percent, &before, &after);
            (usd || tokens).then_some((scope, after))
        })
        .collect()
}

impl Budgets {
    /// The policy for `tenant`.
    pub fn policy(&self, tenant: &TenantId) -> &BudgetPolicy {
        self.tenants.get(tenant).unwrap_or(&self.defaults)
    }

    /// Whether any scope of any tenant is capped.
    pub fn any(&self) -> bool {
        let capped = |p: &BudgetPolicy| {
            [p.session, p.user_daily, p.tenant_daily, p.global_hourly]
                .iter()
                .any(Cap::is_set)
        };
        capped(&self.defaults) || self.tenants.values().any(capped)
    }
}

/// One capped scope, named by its counter key (which includes its time window).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Counter key, e.g. `tenant:acme:2026-11-23`.
    pub key: String,
    /// Its caps.
    pub cap: Cap,
}

impl BudgetPolicy {
    /// The capped scopes a model call at `now_ms` draws on.
    pub fn scopes(
        &self,
        tenant: &TenantId,
        user: &UserId,
        session: &SessionId,
        now_ms: i64,
    ) -> Vec<Scope> {
        let stamp = crate::time::format_utc(now_ms);
        let day = &stamp[..10];
        let hour = &stamp[..13];
        let (tenant, user, session) = (
            key_part(tenant.as_str()),
            key_part(user.as_str()),
            key_part(session.as_str()),
        );
        [
            (format!("session:{tenant}:{session}"), self.session),
            (format!("user:{tenant}:{user}:{day}"), self.user_daily),
            (format!("tenant:{tenant}:{day}"), self.tenant_daily),
            (format!("global:{hour}"), self.global_hourly),
        ]
        .into_iter()
        .filter(|(_, cap)| cap.is_set())
        .map(|(key, cap)| Scope { key, cap })
        .collect()
    }
}

/// An amount of money and tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    /// Money.
    pub usd: Usd,
    /// Tokens.
    pub tokens: u64,
}

/// What one scope has used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    /// Settled spend.
    pub spent: Amount,
    /// Held by live reservations.
    pub reserved: Amount,
}

impl Standing {
    /// Whether `more` fits under `cap` on top of what is spent and reserved.
    pub fn admits(&self, cap: &Cap, more: &Amount) -> bool {
        let money_ok = cap
            .usd
            .is_none_or(|c| self.spent.usd + self.reserved.usd + more.usd <= c);
        let tokens_ok = cap.tokens.is_none_or(|c| {
            self.spent
                .tokens
                .saturating_add(self.reserved.tokens)
                .saturating_add(more.tokens)
                <= c
        });
        money_ok && tokens_ok
    }
}

/// The answer to a reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Held in every scope.
    Granted,
    /// Not held anywhere: this scope could not cover it.
    Refused {
        /// The first scope that could not.
        scope: Scope,
        /// What that scope had used.
        standing: Standing,
    },
}

/// A counter backend failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("budget counters unavailable: {0}")]
pub struct CountersError(pub String);

/// Atomic budget counters shared by every process that serves the same tenants.
///
/// Implementations must make [`Counters::reserve`] all-or-nothing across scopes and atomic with
/// respect to every other `reserve` and `settle`, in this process and in any other.
pub trait Counters: Send + Sync {
    /// Reserves `amount` in every scope, or in none. Expired reservations are released first.
    /// The reservation `id` expires at `expires_ms`.
    fn reserve<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [Scope],
        amount: Amount,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'a, Result<Reservation, CountersError>>;

    /// Releases reservation `id` (if it has not expired) and adds `actual` to every scope's
    /// spend. Spend is always counted, even after the reservation expired, and exactly once:
    /// settling the same id again changes nothing. Returns each scope's standing as this
    /// settlement left it (in `scopes` order), read in the same atomic step.
    fn settle<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [Scope],
        actual: Amount,
    ) -> BoxFuture<'a, Result<Vec<Standing>, CountersError>>;

    /// Reads a shared state cell (circuit breaker state and the like); `None` if never written.
    fn cell<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, CountersError>>;

    /// Sets a cell to `new` only if it still holds `expected` (`None`: never written), atomically
    /// across processes. Returns whether it did; on `false` the caller re-reads and retries.
    fn swap_cell<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a str>,
        new: &'a str,
    ) -> BoxFuture<'a, Result<bool, CountersError>>;

    /// What a scope has used (expired reservations released first).
    fn standing<'a>(
        &'a self,
        scope_key: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Standing, CountersError>>;
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)?;
        if let Some(usd) = self.cap.usd {
            write!(f, " (cap {usd}")?;
            if let Some(t) = self.cap.tokens {
                write!(f, ", {t} tokens")?;
            }
            f.write_str(")")
        } else if let Some(t) = self.cap.tokens {
            write!(f, " (cap {t} tokens)")
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_capped_scopes_apply_and_keys_carry_their_window() {
        let policy = BudgetPolicy {
            tenant_daily: Cap {
                usd: Usd::from_dollars(5.0),
                tokens: None,
            },
            global_hourly: Cap {
                usd: None,
                tokens: Some(1000),
            },
            ..BudgetPolicy::default()
        };
        // 2026-11-23T09:30:00Z
        let scopes = policy.scopes(
            &TenantId::new("acme"),
            &UserId::new("ann"),
            &SessionId::new("s"),
            1_795_426_200_000,
        );
        let keys: Vec<&str> = scopes.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["tenant:acme:2026-11-23", "global:2026-11-23T09"]);
    }

    #[test]
    fn a_warning_fires_once_when_the_line_is_crossed() {
        let cap = Cap {
            usd: Usd::from_dollars(1.0),
            tokens: None,
        };
        let at = |d: f64| Amount {
            usd: Usd::from_dollars(d).unwrap(),
            tokens: 0,
        };
        assert_eq!(
            crossed_warning(&cap, 75, &at(0.70), &at(0.75)),
            (true, false)
        );
        assert_eq!(
            crossed_warning(&cap, 75, &at(0.75), &at(0.90)),
            (false, false),
            "already past the line"
        );
        assert_eq!(
            crossed_warning(&cap, 75, &at(0.10), &at(0.74)),
            (false, false)
        );
    }

    #[test]
    fn admission_counts_spent_and_reserved() {
        let cap = Cap {
            usd: Usd::from_dollars(1.0),
            tokens: Some(100),
        };
        let standing = Standing {
            spent: Amount {
                usd: Usd::from_dollars(0.5).unwrap(),
                tokens: 40,
            },
            reserved: Amount {
                usd: Usd::from_dollars(0.3).unwrap(),
                tokens: 40,
            },
        };
        assert!(standing.admits(
            &cap,
            &Amount {
                usd: Usd::from_dollars(0.2).unwrap(),
                tokens: 20
            }
        ));
        assert!(!standing.admits(
            &cap,
            &Amount {
                usd: Usd::from_dollars(0.2).unwrap(),
                tokens: 21
            }
        ));
        assert!(!standing.admits(
            &cap,
            &Amount {
                usd: Usd::from_micros(200_001),
                tokens: 0
            }
        ));
    }
}
