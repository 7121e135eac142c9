//! Building a [`Runtime`]: its store and tools, then the policies an embedding program adds
//! (governor, rate limits, bulkheads, workers, secrets, metrics, spans, leases).

use crate::*;
use rein_core::TenantId;
use rein_core::budget::Counters;
use rein_core::bulkhead::Bulkheads;
use rein_core::rate::RateLimits;
use rein_store::Store;
use rein_tools::{Secrets, ToolBox};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

impl Runtime {
    /// A runtime over a store and a toolbox.
    pub fn new(store: Arc<dyn Store>, tools: ToolBox) -> Self {
        // The guards' patterns are compiled now, once, not by the first run that needs them.
        rein_core::guard::warm();
        let counters: Arc<dyn Counters> = store.clone();
        Runtime {
            breakers: Arc::new(breakers::Breakers::new(
                counters.clone(),
                meters::Meters::default(),
            )),
            meters: meters::Meters::default(),
            spans: None,
            counters,
            rate_limits: None,
            bulkheads: None,
            store,
            tools,
            governor: None,
            step_timings: false,
            owner: holder_name(),
            lease_ms: DEFAULT_LEASE_MS,
            leases: Arc::default(),
            driving: Arc::default(),
            workers: None,
            secret_key: None,
            unrecorded_trust: rein_core::Trust::Operator,
            per_tenant: None,
        }
    }

    /// Whose spec a run is taken to be when its log does not say, as logs written before the
    /// author was recorded do not: a process that drives runs submitted over the API takes
    /// them as a tenant's (the operator's, by default).
    pub fn with_unrecorded_trust(mut self, trust: rein_core::Trust) -> Self {
        self.unrecorded_trust = trust;
        self
    }

    /// Caps the runs of one tenant that [`Runtime::work_one`] claims while that many are being
    /// driven (by any process on the store), so its backlog leaves workers free for other
    /// tenants. Claims are fair either way: the next run claimed is the oldest of the tenant
    /// with the fewest runs being driven.
    pub fn with_runs_per_tenant(mut self, cap: Option<u32>) -> Self {
        self.per_tenant = cap;
        self
    }

    /// `tenant`'s secrets among `names`, opened for one call. A name the tenant has no secret
    /// of (or whose secret does not open, which is logged for the operator) is left out: the
    /// call then says it is not set. `Err` when the store could not be read.
    pub(crate) async fn open_secrets(
        &self,
        tenant: &TenantId,
        names: &[String],
    ) -> Result<Secrets, ()> {
        if names.is_empty() {
            return Ok(Secrets::default());
        }
        let Some(key) = &self.secret_key else {
            tracing::warn!(
                tenant = tenant.as_str(),
                "a tenant's spec names secrets, but {SECRETS_KEY_ENV} is not set: none can be opened"
            );
            return Ok(Secrets::default());
        };
        let sealed = match self.store.sealed_secrets(tenant, names).await {
            Ok(sealed) => sealed,
            Err(e) => {
                tracing::warn!(tenant = tenant.as_str(), error = %e, "a tenant's secrets could not be read");
                return Err(());
            }
        };
        let mut open = HashMap::with_capacity(sealed.len());
        for (name, sealed) in sealed {
            match key.open(tenant, &name, &sealed) {
                Ok(value) => {
                    open.insert(name, value);
                }
                Err(e) => {
                    tracing::warn!(tenant = tenant.as_str(), error = %e, "a tenant's secret could not be opened")
                }
            }
        }
        Ok(Secrets::new(open))
    }

    /// The key tenants' secrets are sealed with ([`SecretKey::from_env`]): a tenant's spec's
    /// `${NAME}` and `api_key_env: NAME` are opened with it, for the call that sends them.
    pub fn with_secret_key(mut self, key: Option<SecretKey>) -> Self {
        self.secret_key = key;
        self
    }

    /// How this runtime finds the specs of worker agents (tools with `source: {agent: ...}`).
    pub fn with_workers(mut self, workers: Arc<dyn Workers>) -> Self {
        self.workers = Some(workers);
        self
    }

    /// How long this process's leases on runs last unless renewed.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(30);
        // Leases of another length are renewed on their own schedule.
        self.leases = Arc::default();
        self
    }

    /// Enforces shared budgets: every model call reserves its worst case in every capped scope
    /// first, and is not made if any scope cannot cover it.
    ///
    /// The governor's counters also hold the tools' circuit breakers, so processes that share
    /// budgets share breakers too.
    pub fn with_governor(mut self, governor: Governor) -> Self {
        self.breakers = Arc::new(breakers::Breakers::new(
            governor.counters.clone(),
            self.meters.clone(),
        ));
        self.counters = governor.counters.clone();
        self.governor = governor.budgets.any().then_some(governor);
        self
    }

    /// Measures every run this runtime drives into `recorder` (tokens, cost, calls, latencies,
    /// outcomes; see `rein_core::meter`), from the events as they are made durable, plus the
    /// budget and circuit-breaker gauges.
    pub fn with_metrics(mut self, recorder: meters::Recorder) -> Self {
        self.meters = meters::Meters::new(recorder);
        self.breakers = Arc::new(breakers::Breakers::new(
            self.counters.clone(),
            self.meters.clone(),
        ));
        self
    }

    /// Exports the trace of every run this runtime drives to its end to `sink`, made from the
    /// run's whole log (`rein_core::spans`) once `run_finished` is durable.
    pub fn with_spans(mut self, sink: Arc<dyn rein_core::spans::SpanSink>) -> Self {
        self.spans = Some(sink);
        self
    }

    /// Enforces rate limits on model calls (in the governor's counters if one is set, so set
    /// the governor first).
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = limits.any().then_some(limits);
        self
    }

    /// Caps concurrently executing runs per tenant (in the governor's counters if one is set,
    /// so set the governor first).
    pub fn with_bulkheads(mut self, bulkheads: Bulkheads) -> Self {
        self.bulkheads = bulkheads.any().then_some(bulkheads);
        self
    }

    /// Records each step's own overhead in [`RunOutcome::step_overheads_ns`] (benchmarks).
    pub fn with_step_timings(mut self, on: bool) -> Self {
        self.step_timings = on;
        self
    }

    /// The store runs are recorded in.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }
}
