//! Per-tool circuit breakers, one per tenant and tool, shared through the counters.
//!
//! The transitions are `rein_core::breaker`'s; this module only loads and stores the state with
//! compare-and-swap, so racing processes never lose an update. A healthy (clear) state read in
//! the last second is trusted without a round trip: a breaker opened by another process is
//! seen within a second, and tool calls on healthy tools cost nothing extra.

use crate::meters::Meters;
use rein_core::breaker::{Admission, BreakerPolicy, BreakerState};
use rein_core::budget::{Counters, CountersError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a clear state read from the counters is trusted.
const CLEAR_STATE_TTL: Duration = Duration::from_secs(1);

pub(crate) struct Breakers {
    counters: Arc<dyn Counters>,
    meters: Meters,
    clear_since: Mutex<HashMap<String, Instant>>,
    /// Every breaker's state as this process last read or wrote it.
    seen: Mutex<std::collections::BTreeMap<String, BreakerState>>,
}

impl Breakers {
    pub(crate) fn new(counters: Arc<dyn Counters>, meters: Meters) -> Self {
        Breakers {
            counters,
            meters,
            clear_since: Mutex::new(HashMap::new()),
            seen: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    fn known_clear(&self, key: &str) -> bool {
        self.clear_since
            .lock()
            .map(|m| m.get(key).is_some_and(|at| at.elapsed() < CLEAR_STATE_TTL))
            .unwrap_or(false)
    }

    fn remember(&self, key: &str, state: &BreakerState) {
        if let Ok(mut m) = self.clear_since.lock() {
            if state.is_clear() {
                m.insert(key.to_string(), Instant::now());
            } else {
                m.remove(key);
            }
        }
    }

    async fn update<T>(
        &self,
        key: &str,
        step: impl Fn(&BreakerState) -> (T, BreakerState),
    ) -> Result<T, CountersError> {
        let (decision, state) = crate::cells::update(self.counters.as_ref(), key, step).await?;
        self.remember(key, &state);
        self.meters.apply([rein_core::meter::breaker(key, &state)]);
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(key.to_string(), state);
        }
        Ok(decision)
    }

    /// The breakers whose key starts with one of `prefixes`, as this process last saw them.
    pub(crate) fn seen(&self, prefixes: &[String]) -> Vec<(String, BreakerState)> {
        self.seen
            .lock()
            .map(|seen| {
                seen.iter()
                    .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p.as_str())))
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether a call may go through now.
    pub(crate) async fn admit(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        now_ms: i64,
        probe_ms: i64,
    ) -> Result<Admission, CountersError> {
        if self.known_clear(key) {
            return Ok(Admission::Allowed);
        }
        self.update(key, |s| s.admit(policy, now_ms, probe_ms))
            .await
    }

    /// Records how a call that went through ended.
    pub(crate) async fn record(
        &self,
        key: &str,
        policy: &BreakerPolicy,
        succeeded: bool,
        was_probe: bool,
        now_ms: i64,
    ) -> Result<(), CountersError> {
        if succeeded && !was_probe && self.known_clear(key) {
            return Ok(());
        }
        self.update(key, |s| {
            ((), s.record(policy, succeeded, was_probe, now_ms))
        })
        .await
    }
}
