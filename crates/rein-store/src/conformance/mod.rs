//! The conformance suite every store engine passes, exported so a third engine can run it:
//! each check is a function of a `&dyn Store`, and [`conformance_suite!`](crate::conformance_suite)
//! turns them into one `#[tokio::test]` each for an engine, given how to make a fresh store.
//!
//! ```ignore
//! // In the engine's tests, with `rein-store = { features = ["testing"] }` and `tokio` (its
//! // `macros` and `rt-multi-thread` features) among the dev-dependencies:
//! async fn my_store() -> rein_store::conformance::Subject {
//!     rein_store::conformance::Subject::new(std::sync::Arc::new(MyStore::open_fresh().await))
//! }
//! rein_store::conformance_suite!(my_engine, super::my_store());
//! ```
//!
//! Test support: it panics on the first broken expectation, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod budgets;
mod follow;
mod leases;
mod runs;
mod tenancy;

pub use budgets::*;
pub use follow::*;
pub use leases::*;
pub use runs::*;
pub use tenancy::*;

use crate::{Hold, Lease, RunFilter, RunInfo, Store};
use rein_core::budget::BoxFuture;
use rein_core::budget::{Amount, Cap, Scope};
use rein_core::{
    Event, EventKind, GENESIS_HASH, RunId, RunStatus, SealedEvent, SessionId, TenantId,
    TerminationReason, Usage, Usd, UserId,
};
use std::sync::Arc;
use std::time::Duration;

/// A store under test, and what to do once a check is done with it (a temporary directory to
/// remove, a schema to drop).
pub struct Subject {
    /// The store the checks use.
    pub store: Arc<dyn Store>,
    cleanup: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
}

impl Subject {
    /// A fresh, empty store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Subject {
            store,
            cleanup: None,
        }
    }

    /// Runs `cleanup` once the store is closed.
    pub fn with_cleanup(
        mut self,
        cleanup: impl FnOnce() -> BoxFuture<'static, ()> + Send + 'static,
    ) -> Self {
        self.cleanup = Some(Box::new(cleanup));
        self
    }

    /// Closes the store, then cleans up.
    pub async fn done(self) {
        self.store.close().await;
        if let Some(cleanup) = self.cleanup {
            cleanup().await;
        }
    }
}

/// One `#[tokio::test]` per conformance check for an engine: `conformance_suite!(name, make)`,
/// where `make` is a future of a fresh [`Subject`] (evaluated inside the generated module, so a
/// function of the calling module is `super::f()`). The calling crate needs `tokio` with its
/// `macros` and `rt-multi-thread` features. A new check is added to the list below, or it does
/// not run.
#[macro_export]
macro_rules! conformance_suite {
    ($engine:ident, $make:expr) => {
        $crate::conformance_suite!(@checks $engine, $make, events_round_trip_verify_and_project_onto_the_run, a_run_is_stored_only_with_its_own_first_event, a_run_id_is_stored_once, an_approval_pauses_the_run_until_decided_or_timed_out, listings_filter_by_status_session_and_tenant, another_tenants_runs_are_invisible, costs_group_recorded_spend, events_appended_together_land_in_order_or_not_at_all, a_runs_row_is_the_same_whatever_its_events_batches, requests_to_cancel_wait_in_the_store_for_the_runs_driver, a_run_is_claimed_by_one_worker_and_taken_over_only_once_its_lease_expires, a_workers_run_is_never_claimed_on_its_own, claims_take_the_oldest_run_first_and_never_a_finished_one, claims_are_fair_between_tenants_and_hold_a_cap, tenant_secrets_are_kept_by_name_and_logged, audit_anchors_cover_runs_in_id_order_and_keep_their_place, tenants_keys_and_versioned_agents, dashboard_sessions_end_at_sign_out_expiry_or_revocation, budget_changes_and_their_events_commit_together, a_runs_followers_hear_each_write_that_appends_to_it, idle_workers_hear_of_runs_that_become_claimable);
    };
    (@checks $engine:ident, $make:expr, $($check:ident),* $(,)?) => {
        mod $engine {
            $(
                #[tokio::test]
                async fn $check() {
                    let subject = $make.await;
                    $crate::conformance::$check(&*subject.store).await;
                    subject.done().await;
                }
            )*

            #[tokio::test]
            async fn concurrent_claims_never_hand_one_run_to_two_workers() {
                let subject = $make.await;
                $crate::conformance::concurrent_claims_never_hand_one_run_to_two_workers(
                    subject.store.clone(),
                )
                .await;
                subject.done().await;
            }

            #[tokio::test]
            async fn writers_racing_for_one_position_never_both_win() {
                let subject = $make.await;
                $crate::conformance::racing_writers(subject.store.clone()).await;
                subject.done().await;
            }
        }
    };
}

pub fn info(id: &str, tenant: &str, session: &str, created_ms: i64) -> RunInfo {
    RunInfo {
        id: RunId::new(id),
        tenant: TenantId::new(tenant),
        user: UserId::new("u"),
        session: SessionId::new(session),
        job: None,
        agent: "a".into(),
        agent_version: 3,
        spec: "name: a".into(),
        input: "hi".into(),
        created_ms,
        parent: None,
    }
}

pub fn started(tenant: &str) -> EventKind {
    EventKind::RunStarted {
        agent: "a".into(),
        agent_version: 3,
        spec_sha256: String::new(),
        input: "hi".into(),
        tenant: TenantId::new(tenant),
        user: UserId::new("u"),
        session: SessionId::new("s"),
        job: None,
        granted_scopes: Vec::new(),
        trace_parent: None,
        fence: None,
        parent: None,
        trust: Some(rein_core::Trust::Operator),
    }
}

pub fn responded(model: &str, input: u64, output: u64, dollars: f64) -> EventKind {
    EventKind::ModelResponded {
        step: 1,
        model: model.into(),
        content: Some("ok".into()),
        tool_calls: Vec::new(),
        usage: Usage {
            input_tokens: input,
            cached_input_tokens: 2,
            cache_write_tokens: 0,
            output_tokens: output,
        },
        cost: Usd::from_dollars(dollars).unwrap(),
        latency_ms: 5,
        attempts: 1,
        finish_reason: None,
        cached: false,
    }
}

pub fn finished(output: serde_json::Value) -> EventKind {
    EventKind::RunFinished {
        status: RunStatus::Completed,
        reason: TerminationReason::Completed,
        detail: Some("done".into()),
        output: Some(output),
    }
}

/// A refund held for approval until 5,000 ms.
pub fn approval_requested(step: u32, call_id: &str) -> EventKind {
    EventKind::ApprovalRequested {
        step,
        call_id: call_id.into(),
        tool: "refund".into(),
        arguments: serde_json::json!({"amount": 900}),
        reason: "confirm".into(),
        expires_at_ms: 5_000,
        on_timeout: rein_core::spec::OnTimeout::Deny,
        answer: None,
    }
}

/// A run's log as the engine writes it: sealed one after another.
pub struct Log {
    pub run: RunInfo,
    pub sealed: Vec<SealedEvent>,
}

impl Log {
    pub fn new(run: RunInfo) -> Self {
        let mut log = Log {
            run,
            sealed: Vec::new(),
        };
        let tenant = log.run.tenant.as_str().to_string();
        log.seal(started(&tenant));
        log
    }

    pub fn seal(&mut self, kind: EventKind) -> SealedEvent {
        let prev = self
            .sealed
            .last()
            .map_or(GENESIS_HASH.to_string(), |e| e.hash.clone());
        let event = Event {
            seq: self.sealed.len() as u64,
            ts_ms: self.run.created_ms + self.sealed.len() as i64,
            kind,
        };
        let sealed = event.seal(&self.run.id, &prev);
        self.sealed.push(sealed.clone());
        sealed
    }

    pub async fn create(&self, store: &dyn Store, lease: Option<Lease<'_>>) {
        store
            .create_run(&self.run, &self.sealed[..1], lease)
            .await
            .unwrap();
    }

    pub async fn append(&mut self, store: &dyn Store, kind: EventKind) {
        let sealed = self.seal(kind);
        store.append(&self.run.tenant, &sealed).await.unwrap();
    }
}

pub fn status(status: RunStatus) -> RunFilter {
    RunFilter {
        status: Some(status),
        ..Default::default()
    }
}

pub fn lease(owner: &str, until_ms: i64) -> Lease<'_> {
    Lease { owner, until_ms }
}

/// `dollars` and `tokens` as an amount.
pub fn amount(dollars: f64, tokens: u64) -> Amount {
    Amount {
        usd: Usd::from_dollars(dollars).unwrap(),
        tokens,
    }
}

/// A scope capped at $1 and no token cap.
pub fn one_dollar_cap(key: &str) -> Scope {
    Scope {
        key: key.into(),
        cap: Cap {
            usd: Usd::from_dollars(1.0),
            tokens: None,
        },
    }
}

/// A hold of `dollars` (and 100 tokens) on `scopes`, made at 1 ms, that does not expire.
pub fn hold_in<'a>(id: &'a str, scopes: &'a [Scope], dollars: f64) -> Hold<'a> {
    Hold {
        id,
        scopes,
        amount: amount(dollars, 100),
        now_ms: 1,
        expires_ms: i64::MAX / 2,
    }
}

/// Long enough for an announcement that was made; a test that waits it out sees none was.
pub const HEARD: Duration = Duration::from_secs(5);
pub const NOT_HEARD: Duration = Duration::from_millis(100);
