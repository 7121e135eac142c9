//! Bulkheads: a cap on how many runs of one tenant execute at once, so one tenant's burst
//! cannot starve the others. Excess runs wait in a first-come, first-served queue of bounded
//! length, or are refused when it is full.
//!
//! Slots and queue places are leases that expire, so a process that dies while holding one
//! frees it. The state is plain data, updated by compare-and-swap in the shared counters.

use serde::{Deserialize, Serialize};

/// The cap and the queue of one tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BulkheadPolicy {
    /// Runs executing at once.
    pub max_concurrent_runs: u32,
    /// Runs waiting for a slot at once; more are refused.
    pub max_queued: u32,
}

/// Bulkheads for every tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bulkheads {
    /// For tenants without their own; `None`: no cap.
    pub defaults: Option<BulkheadPolicy>,
    /// Per tenant.
    pub tenants: std::collections::BTreeMap<crate::TenantId, BulkheadPolicy>,
    /// Longest a run waits in the queue before it is refused.
    pub queue_wait_ms: i64,
}

impl Default for Bulkheads {
    fn default() -> Self {
        Bulkheads {
            defaults: None,
            tenants: std::collections::BTreeMap::new(),
            queue_wait_ms: 60_000,
        }
    }
}

impl Bulkheads {
    /// The policy for `tenant`, if it is capped.
    pub fn policy(&self, tenant: &crate::TenantId) -> Option<&BulkheadPolicy> {
        self.tenants.get(tenant).or(self.defaults.as_ref())
    }

    /// Whether any tenant is capped.
    pub fn any(&self) -> bool {
        self.defaults.is_some() || !self.tenants.is_empty()
    }
}

/// Who holds the slots and who waits, each with a lease expiry (ms since the epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkheadState {
    /// Runs executing.
    pub running: Vec<(String, i64)>,
    /// Runs waiting, oldest first.
    pub queued: Vec<(String, i64)>,
}

/// The answer to asking for a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A slot is held: run.
    Admitted,
    /// In the queue: ask again later.
    Queued {
        /// Position in the queue, from 0.
        position: usize,
    },
    /// The queue is full: refused.
    Full,
}

impl BulkheadState {
    fn without_expired(&self, now_ms: i64) -> BulkheadState {
        BulkheadState {
            running: self
                .running
                .iter()
                .filter(|(_, exp)| *exp > now_ms)
                .cloned()
                .collect(),
            queued: self
                .queued
                .iter()
                .filter(|(_, exp)| *exp > now_ms)
                .cloned()
                .collect(),
        }
    }

    /// Asks for a slot for `id`. A slot goes to the oldest waiter first; a waiter keeps its
    /// place (its lease renewed to `queue_lease_ms`) by asking again.
    pub fn enter(
        &self,
        policy: &BulkheadPolicy,
        id: &str,
        now_ms: i64,
        run_lease_ms: i64,
        queue_lease_ms: i64,
    ) -> (Entry, BulkheadState) {
        let mut next = self.without_expired(now_ms);
        if next.running.iter().any(|(holder, _)| holder == id) {
            return (Entry::Admitted, next);
        }
        let position = next.queued.iter().position(|(waiter, _)| waiter == id);
        let free = next.running.len() < policy.max_concurrent_runs as usize;
        if free && position.unwrap_or(next.queued.len()) == 0 {
            next.queued.retain(|(waiter, _)| waiter != id);
            next.running.push((id.to_string(), now_ms + run_lease_ms));
            return (Entry::Admitted, next);
        }
        match position {
            Some(p) => {
                next.queued[p].1 = now_ms + queue_lease_ms;
                (Entry::Queued { position: p }, next)
            }
            None if next.queued.len() < policy.max_queued as usize => {
                next.queued.push((id.to_string(), now_ms + queue_lease_ms));
                let position = next.queued.len() - 1;
                (Entry::Queued { position }, next)
            }
            None => (Entry::Full, next),
        }
    }

    /// Gives up `id`'s slot or queue place.
    pub fn leave(&self, id: &str, now_ms: i64) -> BulkheadState {
        let mut next = self.without_expired(now_ms);
        next.running.retain(|(holder, _)| holder != id);
        next.queued.retain(|(waiter, _)| waiter != id);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: BulkheadPolicy = BulkheadPolicy {
        max_concurrent_runs: 2,
        max_queued: 1,
    };

    fn enter(s: &BulkheadState, id: &str, now: i64) -> (Entry, BulkheadState) {
        s.enter(&TWO, id, now, 10_000, 1_000)
    }

    #[test]
    fn admits_up_to_the_cap_queues_one_and_refuses_the_rest() {
        let s = BulkheadState::default();
        let (a, s) = enter(&s, "a", 0);
        let (b, s) = enter(&s, "b", 0);
        let (c, s) = enter(&s, "c", 0);
        let (d, s) = enter(&s, "d", 0);
        assert_eq!(
            (a, b, c, d),
            (
                Entry::Admitted,
                Entry::Admitted,
                Entry::Queued { position: 0 },
                Entry::Full
            )
        );
        let s = s.leave("a", 1);
        assert_eq!(
            enter(&s, "c", 2).0,
            Entry::Admitted,
            "the waiter takes the freed slot"
        );
    }

    #[test]
    fn the_oldest_waiter_goes_first() {
        let policy = BulkheadPolicy {
            max_concurrent_runs: 1,
            max_queued: 5,
        };
        let s = BulkheadState::default();
        let (_, s) = s.enter(&policy, "a", 0, 10_000, 1_000);
        let (_, s) = s.enter(&policy, "b", 0, 10_000, 1_000);
        let (_, s) = s.enter(&policy, "c", 0, 10_000, 1_000);
        let s = s.leave("a", 1);
        assert_eq!(
            s.enter(&policy, "c", 2, 10_000, 1_000).0,
            Entry::Queued { position: 1 },
            "c must wait for b"
        );
        assert_eq!(s.enter(&policy, "b", 2, 10_000, 1_000).0, Entry::Admitted);
    }

    #[test]
    fn leases_of_dead_holders_and_waiters_expire() {
        let s = BulkheadState::default();
        let (_, s) = enter(&s, "a", 0);
        let (_, s) = enter(&s, "b", 0);
        let (_, s) = enter(&s, "gone", 0);
        // The waiter stopped asking and both holders' leases ran out.
        assert_eq!(enter(&s, "new", 10_001).0, Entry::Admitted);
    }
}
