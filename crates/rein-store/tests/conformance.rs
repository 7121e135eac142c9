//! One conformance suite for every store engine: the embedded SQLite store and PostgreSQL (the
//! real server on 127.0.0.1; `scripts/test` starts it when it is down). Each PostgreSQL test
//! gets a schema of its own, so tests run side by side and leave nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rein_core::budget::{Amount, Cap, Reservation, Scope, Standing};
use rein_core::{
    Event, EventKind, GENESIS_HASH, RunId, RunStatus, SealedEvent, SessionId, TenantId,
    TerminationReason, ToolResult, Usage, Usd, UserId,
};
use rein_store::prelude::*;
use rein_store::testing::TestSchema;
use rein_store::{
    CostGroup, Hold, Lease, PgStore, RunFilter, RunInfo, Settlement, SqliteStore, Store,
    StoreError, api_key_id,
};
use std::sync::Arc;
use std::time::Duration;

/// A store for one test and what must outlive it.
struct Fixture {
    store: Arc<dyn Store>,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Schema(TestSchema),
}

impl Fixture {
    async fn done(self) {
        self.store.close().await;
        if let Cleanup::Schema(schema) = self.cleanup {
            schema.drop_schema().await.unwrap();
        }
    }
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("rein.db"), Default::default())
        .await
        .unwrap();
    Fixture {
        store: Arc::new(store),
        cleanup: Cleanup::Dir(dir),
    }
}

/// A PostgreSQL store in a fresh schema of the test database.
async fn postgres_store() -> (PgStore, TestSchema) {
    let schema = TestSchema::create().await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL must be running at {} for these tests (scripts/test starts it): {e}",
            rein_store::testing::postgres_url()
        )
    });
    (PgStore::connect(&schema.url()).await.unwrap(), schema)
}

async fn postgres() -> Fixture {
    let (store, schema) = postgres_store().await;
    Fixture {
        store: Arc::new(store),
        cleanup: Cleanup::Schema(schema),
    }
}

fn info(id: &str, tenant: &str, session: &str, created_ms: i64) -> RunInfo {
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

fn started(tenant: &str) -> EventKind {
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

fn responded(model: &str, input: u64, output: u64, dollars: f64) -> EventKind {
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

fn finished(output: serde_json::Value) -> EventKind {
    EventKind::RunFinished {
        status: RunStatus::Completed,
        reason: TerminationReason::Completed,
        detail: Some("done".into()),
        output: Some(output),
    }
}

/// A refund held for approval until 5,000 ms.
fn approval_requested(step: u32, call_id: &str) -> EventKind {
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
struct Log {
    run: RunInfo,
    sealed: Vec<SealedEvent>,
}

impl Log {
    fn new(run: RunInfo) -> Self {
        let mut log = Log {
            run,
            sealed: Vec::new(),
        };
        let tenant = log.run.tenant.as_str().to_string();
        log.seal(started(&tenant));
        log
    }

    fn seal(&mut self, kind: EventKind) -> SealedEvent {
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

    async fn create(&self, store: &dyn Store, lease: Option<Lease<'_>>) {
        store
            .create_run(&self.run, &self.sealed[..1], lease)
            .await
            .unwrap();
    }

    async fn append(&mut self, store: &dyn Store, kind: EventKind) {
        let sealed = self.seal(kind);
        store.append(&self.run.tenant, &sealed).await.unwrap();
    }
}

fn status(status: RunStatus) -> RunFilter {
    RunFilter {
        status: Some(status),
        ..Default::default()
    }
}

fn lease(owner: &str, until_ms: i64) -> Lease<'_> {
    Lease { owner, until_ms }
}

async fn events_round_trip_verify_and_project_onto_the_run(store: &dyn Store) {
    let mut log = Log::new(info("r1", "t1", "s", 1_000));
    log.create(store, None).await;
    let t1 = TenantId::new("t1");
    let queued = store.run(&t1, &RunId::new("r1")).await.unwrap();
    assert_eq!(queued.progress.status, RunStatus::Queued);
    assert_eq!(queued.info, log.run);

    log.append(store, responded("openai/m", 100, 20, 0.25))
        .await;
    log.append(
        store,
        EventKind::ToolResult {
            step: 1,
            call_id: "c1".into(),
            tool: "t".into(),
            result: ToolResult::success(serde_json::json!({"ok": true})),
            latency_ms: 3,
            attempts: 1,
        },
    )
    .await;
    log.append(store, responded("openai/m", 50, 10, 0.5)).await;
    log.append(store, finished(serde_json::json!({"answer": [1, "two"]})))
        .await;

    let events = store.events(&t1, &RunId::new("r1")).await.unwrap();
    assert_eq!(events, log.sealed, "stored byte for byte");
    let run = store.run(&t1, &RunId::new("r1")).await.unwrap();
    rein_core::verify_chain(&events, Some((run.event_count, &run.head_hash))).unwrap();
    let p = &run.progress;
    assert_eq!(p.status, RunStatus::Completed);
    assert_eq!(p.reason, Some(TerminationReason::Completed));
    assert_eq!(p.detail.as_deref(), Some("done"));
    assert_eq!(p.output, Some(serde_json::json!({"answer": [1, "two"]})));
    assert_eq!((p.iterations, p.tool_calls), (2, 1));
    assert_eq!(
        (
            p.usage.input_tokens,
            p.usage.cached_input_tokens,
            p.usage.output_tokens
        ),
        (150, 4, 30)
    );
    assert_eq!(p.cost, Usd::from_dollars(0.75).unwrap());
    assert_eq!(run.event_count, 5);
    assert_eq!(run.updated_ms, 1_004);
}

async fn a_run_is_stored_only_with_its_own_first_event(store: &dyn Store) {
    let log = Log::new(info("r1", "t1", "s", 1));
    let other = Log::new(info("r2", "t1", "s", 1));
    for first in [&[][..], &other.sealed[..]] {
        let err = store.create_run(&log.run, first, None).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { seq: 0, .. }), "{err}");
    }
    assert!(matches!(
        store.run(&log.run.tenant, &log.run.id).await,
        Err(StoreError::NotFound(_))
    ));
}

/// A run id is stored once: a second run under it, of the same tenant or another, is refused
/// and changes nothing (a retried `POST /v1/runs` with an idempotency key relies on this).
async fn a_run_id_is_stored_once(store: &dyn Store) {
    let first = Log::new(info("r1", "t1", "s", 1));
    first.create(store, None).await;
    for tenant in ["t1", "t2"] {
        let again = Log::new(info("r1", tenant, "s2", 2));
        assert!(
            store
                .create_run(&again.run, &again.sealed, None)
                .await
                .is_err(),
            "{tenant}"
        );
    }
    let t1 = TenantId::new("t1");
    let stored = store.run(&t1, &first.run.id).await.unwrap();
    assert_eq!(stored.info, first.run);
    assert_eq!(
        store.events(&t1, &first.run.id).await.unwrap(),
        first.sealed
    );
    assert!(matches!(
        store.run(&TenantId::new("t2"), &first.run.id).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn a_run_is_claimed_by_one_worker_and_taken_over_only_once_its_lease_expires(
    store: &dyn Store,
) {
    Log::new(info("r1", "t1", "s", 1)).create(store, None).await;
    let claimed = store.claim(lease("w1", 1_000), 1, None).await.unwrap();
    assert_eq!(claimed, Some((TenantId::new("t1"), RunId::new("r1"))));
    assert_eq!(
        store.claim(lease("w2", 1_000), 10, None).await.unwrap(),
        None,
        "w1 holds it"
    );
    let r1 = RunId::new("r1");
    assert!(!store.acquire(&r1, lease("w2", 2_000), 500).await.unwrap());
    assert!(store.acquire(&r1, lease("w1", 1_200), 500).await.unwrap());
    assert_eq!(
        store
            .run(&TenantId::new("t1"), &r1)
            .await
            .unwrap()
            .progress
            .status,
        RunStatus::Running,
        "acquiring a queued run starts it"
    );
    assert!(store.renew(&r1, lease("w1", 1_500)).await.unwrap());
    assert_eq!(
        store.claim(lease("w2", 3_000), 1_200, None).await.unwrap(),
        None,
        "renewed"
    );
    // w1 died: once its lease runs out, w2 takes the run over, and w1 cannot renew it.
    let taken = store.claim(lease("w2", 3_000), 1_600, None).await.unwrap();
    assert_eq!(taken.map(|(_, id)| id), Some(r1.clone()));
    assert!(!store.renew(&r1, lease("w1", 4_000)).await.unwrap());
    assert_eq!(store.unfinished().await.unwrap(), 1);
    // A released lease can be claimed at once.
    store.release(&r1, "w2").await.unwrap();
    let again = store.claim(lease("w3", 9_000), 1_700, None).await.unwrap();
    assert_eq!(again.map(|(_, id)| id), Some(r1));
}

/// A worker agent's run is continued by its caller only: its lease running out does not make
/// it claimable, though its caller's does; its caller (any process continuing it) can still
/// acquire it.
async fn a_workers_run_is_never_claimed_on_its_own(store: &dyn Store) {
    let caller = Log::new(info("r1", "t1", "s", 1));
    caller.create(store, Some(lease("w1", 100))).await;
    let child = Log::new(RunInfo {
        parent: Some(RunId::new("r1")),
        ..info("r2", "t1", "s", 2)
    });
    child.create(store, Some(lease("w1", 100))).await;
    let shown = store
        .run(&TenantId::new("t1"), &RunId::new("r2"))
        .await
        .unwrap();
    assert_eq!(shown.info.parent, Some(RunId::new("r1")));
    let claimed = store.claim(lease("w2", 1_000), 500, None).await.unwrap();
    assert_eq!(claimed.map(|(_, id)| id), Some(RunId::new("r1")));
    assert_eq!(
        store.claim(lease("w3", 1_000), 500, None).await.unwrap(),
        None
    );
    assert!(
        store
            .acquire(&RunId::new("r2"), lease("w2", 1_000), 500)
            .await
            .unwrap()
    );
}

async fn claims_take_the_oldest_run_first_and_never_a_finished_one(store: &dyn Store) {
    let mut done = Log::new(info("r0", "t1", "s", 1));
    done.create(store, None).await;
    done.append(store, finished(serde_json::json!("x"))).await;
    Log::new(info("r2", "t2", "s", 20))
        .create(store, None)
        .await;
    Log::new(info("r1", "t1", "s", 10))
        .create(store, None)
        .await;
    let order: Vec<_> = [
        store.claim(lease("w", 100), 1, None).await.unwrap(),
        store.claim(lease("w", 100), 1, None).await.unwrap(),
        store.claim(lease("w", 100), 1, None).await.unwrap(),
    ]
    .into_iter()
    .map(|c| c.map(|(t, id)| format!("{t}/{id}")))
    .collect();
    assert_eq!(
        order,
        [Some("t1/r1".to_string()), Some("t2/r2".to_string()), None]
    );
    assert_eq!(store.unfinished().await.unwrap(), 2);
}

/// A tenant with a backlog does not hold another tenant's first run back: claims go to the
/// tenant with the fewest runs being driven, and a tenant at its cap gets none.
async fn claims_are_fair_between_tenants_and_hold_a_cap(store: &dyn Store) {
    for (id, tenant, created) in [
        ("a1", "big", 1),
        ("a2", "big", 2),
        ("a3", "big", 3),
        ("a4", "big", 4),
        ("b1", "small", 10),
    ] {
        Log::new(info(id, tenant, "s", created))
            .create(store, None)
            .await;
    }
    let claim = async |cap: Option<u32>| {
        store
            .claim(lease("w", 1_000), 5, cap)
            .await
            .unwrap()
            .map(|(_, id)| id.to_string())
    };
    assert_eq!(claim(None).await.as_deref(), Some("a1"), "the oldest first");
    assert_eq!(
        claim(None).await.as_deref(),
        Some("b1"),
        "the small tenant's first run before the big one's backlog"
    );
    assert_eq!(claim(Some(2)).await.as_deref(), Some("a2"));
    assert_eq!(claim(Some(2)).await, None, "big is at its cap of two");
    assert_eq!(claim(None).await.as_deref(), Some("a3"));
    // A run whose holder died no longer counts as driven.
    assert_eq!(
        store
            .claim(lease("w", 9_000), 2_000, Some(1))
            .await
            .unwrap()
            .map(|(_, id)| id.to_string())
            .as_deref(),
        Some("a1")
    );
}

/// A tenant's secrets: stored sealed (the store never sees a value), replaced, listed by name,
/// read back only by name and tenant, deleted; every change in the admin log, by name.
async fn tenant_secrets_are_kept_by_name_and_logged(store: &dyn Store) {
    let acme = TenantId::new("acme");
    let other = TenantId::new("other");
    assert!(
        !store
            .set_secret(&acme, "TOKEN", b"s1", 1, "cli")
            .await
            .unwrap(),
        "no such tenant yet"
    );
    store.create_tenant(&acme, 1, "cli").await.unwrap();
    store.create_tenant(&other, 1, "cli").await.unwrap();
    assert!(
        store
            .set_secret(&acme, "TOKEN", b"s1", 2, "cli")
            .await
            .unwrap()
    );
    assert!(
        store
            .set_secret(&acme, "TOKEN", b"s2", 3, "cli")
            .await
            .unwrap()
    );
    assert!(
        store
            .set_secret(&acme, "OTHER", b"o", 4, "cli")
            .await
            .unwrap()
    );
    let names: Vec<(String, i64)> = store
        .secret_names(&acme)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.updated_ms))
        .collect();
    assert_eq!(names, [("OTHER".to_string(), 4), ("TOKEN".to_string(), 3)]);
    let wanted = ["TOKEN".to_string(), "MISSING".to_string()];
    assert_eq!(
        store.sealed_secrets(&acme, &wanted).await.unwrap(),
        [("TOKEN".to_string(), b"s2".to_vec())]
    );
    assert!(
        store
            .sealed_secrets(&other, &wanted)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.delete_secret(&acme, "TOKEN", 5, "cli").await.unwrap());
    assert!(!store.delete_secret(&acme, "TOKEN", 6, "cli").await.unwrap());
    assert!(
        store
            .sealed_secrets(&acme, &wanted)
            .await
            .unwrap()
            .is_empty()
    );
    let log = store.admin_log(0, 100).await.unwrap();
    let secrets: Vec<(&str, Option<&str>)> = log
        .iter()
        .filter(|e| e.action.starts_with("secret"))
        .map(|e| (e.action.as_str(), e.key_id.as_deref()))
        .collect();
    assert_eq!(
        secrets,
        [
            ("secret_set", Some("TOKEN")),
            ("secret_set", Some("TOKEN")),
            ("secret_set", Some("OTHER")),
            ("secret_deleted", Some("TOKEN")),
        ]
    );
    rein_core::admin_log::verify_admin_log(&log, None).unwrap();
}

/// Audit anchors: the runs they cover come a page at a time in id order across tenants, with
/// the final head of each that had ended by the cutoff; anchors round-trip, one per position.
async fn audit_anchors_cover_runs_in_id_order_and_keep_their_place(store: &dyn Store) {
    let mut ended = Log::new(info("r1", "t2", "s", 1));
    ended.create(store, None).await;
    ended.append(store, finished(serde_json::json!("x"))).await;
    Log::new(info("r2", "t1", "s", 2)).create(store, None).await;
    Log::new(info("r3", "t1", "s", 50))
        .create(store, None)
        .await;
    let page = |after: Option<&'static str>, cutoff: i64| async move {
        let after = after.map(RunId::new);
        store.anchor_runs(cutoff, after.as_ref(), 1).await.unwrap()
    };
    let first = page(None, 10).await;
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].id.as_str(), first[0].tenant.as_str()),
        ("r1", "t2")
    );
    let head = ended.sealed.last().unwrap().hash.clone();
    assert_eq!(first[0].ended, Some((2, head)));
    let second = page(Some("r1"), 10).await;
    assert_eq!(
        (second[0].id.as_str(), second[0].ended.clone()),
        ("r2", None)
    );
    assert!(
        page(Some("r2"), 10).await.is_empty(),
        "r3 is after the cutoff"
    );
    // Ended after the cutoff: covered by its id alone.
    assert_eq!(page(None, 1).await[0].ended, None);

    let a0 =
        rein_core::anchor::Anchor::after(None, 100, 10, Some((3, "h".into())), (2, "d".into()));
    assert!(store.append_anchor(&a0).await.unwrap());
    assert!(
        !store.append_anchor(&a0).await.unwrap(),
        "one anchor per position"
    );
    let a1 = rein_core::anchor::Anchor::after(Some(&a0), 200, 110, None, (3, "e".into()));
    assert!(store.append_anchor(&a1).await.unwrap());
    assert_eq!(store.last_anchor().await.unwrap(), Some(a1.clone()));
    assert_eq!(store.anchors(0, 10).await.unwrap(), [a0, a1]);
}

async fn an_approval_pauses_the_run_until_decided_or_timed_out(store: &dyn Store) {
    let mut log = Log::new(info("r1", "t1", "s", 1));
    log.create(store, Some(lease("w1", 100))).await;
    let t1 = TenantId::new("t1");
    let r1 = RunId::new("r1");
    log.append(store, approval_requested(1, "c1")).await;
    store.release(&r1, "w1").await.unwrap();
    let run = store.run(&t1, &r1).await.unwrap();
    assert_eq!(run.progress.status, RunStatus::AwaitingApproval);
    let waiting = store
        .list_runs(&t1, &status(RunStatus::AwaitingApproval), 10)
        .await
        .unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(store.unfinished().await.unwrap(), 0, "a person holds it");
    assert_eq!(
        store.claim(lease("w2", 9_000), 4_999, None).await.unwrap(),
        None
    );
    // Past its timeout, a worker claims it to apply the policy.
    let claimed = store.claim(lease("w2", 9_000), 5_000, None).await.unwrap();
    assert_eq!(claimed.map(|(_, id)| id), Some(r1.clone()));
    log.append(
        store,
        EventKind::ApprovalDecided {
            step: 1,
            call_id: "c1".into(),
            approved: false,
            by: "policy".into(),
            reason: None,
        },
    )
    .await;
    assert_eq!(
        store.run(&t1, &r1).await.unwrap().progress.status,
        RunStatus::Running
    );
}

async fn listings_filter_by_status_session_and_tenant(store: &dyn Store) {
    let mut a = Log::new(info("a", "t1", "s1", 1));
    a.create(store, None).await;
    a.append(store, finished(serde_json::json!(1))).await;
    let mut b = info("b", "t1", "s1", 2);
    b.agent = "b".into();
    Log::new(b).create(store, None).await;
    let mut c = info("c", "t1", "s2", 3);
    c.user = UserId::new("v");
    Log::new(c).create(store, None).await;
    Log::new(info("d", "t2", "s1", 4)).create(store, None).await;
    let t1 = TenantId::new("t1");
    let ids = |runs: Vec<rein_store::RunRecord>| -> Vec<String> {
        runs.into_iter()
            .map(|r| r.info.id.as_str().to_string())
            .collect()
    };
    assert_eq!(
        ids(store
            .list_runs(&t1, &RunFilter::default(), 10)
            .await
            .unwrap()),
        ["c", "b", "a"]
    );
    assert_eq!(
        ids(store
            .list_runs(&t1, &RunFilter::default(), 2)
            .await
            .unwrap()),
        ["c", "b"]
    );
    assert_eq!(
        ids(store
            .list_runs(&t1, &status(RunStatus::Completed), 10)
            .await
            .unwrap()),
        ["a"]
    );
    let ended = |reason| RunFilter {
        reason: Some(reason),
        ..Default::default()
    };
    assert_eq!(
        ids(store
            .list_runs(&t1, &ended(TerminationReason::Completed), 10)
            .await
            .unwrap()),
        ["a"]
    );
    assert!(
        store
            .list_runs(&t1, &ended(TerminationReason::MaxCost), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let by = |agent: Option<&str>, user: Option<&str>| RunFilter {
        agent: agent.map(str::to_string),
        user: user.map(UserId::new),
        ..Default::default()
    };
    assert_eq!(
        ids(store
            .list_runs(&t1, &by(Some("b"), None), 10)
            .await
            .unwrap()),
        ["b"]
    );
    assert_eq!(
        ids(store
            .list_runs(&t1, &by(None, Some("v")), 10)
            .await
            .unwrap()),
        ["c"]
    );
    assert!(
        store
            .list_runs(&t1, &by(Some("b"), Some("v")), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let page = |session: Option<&str>, before: Option<&str>| RunFilter {
        session: session.map(SessionId::new),
        before: before.map(RunId::new),
        ..Default::default()
    };
    assert_eq!(
        ids(store
            .list_runs(&t1, &page(Some("s1"), None), 10)
            .await
            .unwrap()),
        ["b", "a"]
    );
    assert_eq!(
        ids(store
            .list_runs(&t1, &page(None, Some("c")), 1)
            .await
            .unwrap()),
        ["b"],
        "the page after one that ended with c"
    );
    assert_eq!(
        ids(store
            .list_runs(&t1, &page(None, Some("b")), 10)
            .await
            .unwrap()),
        ["a"]
    );
    assert_eq!(
        ids(store
            .list_runs(&t1, &page(Some("s2"), Some("c")), 10)
            .await
            .unwrap()),
        Vec::<String>::new()
    );
    for foreign in ["d", "zzz"] {
        assert!(
            store
                .list_runs(&t1, &page(None, Some(foreign)), 10)
                .await
                .unwrap()
                .is_empty(),
            "another tenant's run or none as the cursor matches nothing"
        );
    }
    let latest = store
        .latest_in_session(&t1, &SessionId::new("s1"))
        .await
        .unwrap();
    assert_eq!(latest.map(|r| r.info.id), Some(RunId::new("b")));
    assert!(
        store
            .latest_in_session(&t1, &SessionId::new("nope"))
            .await
            .unwrap()
            .is_none()
    );
    let ids = |after: Option<&str>, limit| {
        let after = after.map(RunId::new);
        let t1 = t1.clone();
        async move { store.run_ids(&t1, after.as_ref(), limit).await.unwrap() }
    };
    assert_eq!(ids(None, 10).await, ["a", "b", "c"].map(RunId::new));
    // A page at a time, oldest first, each starting after the last one's end.
    assert_eq!(ids(None, 2).await, ["a", "b"].map(RunId::new));
    assert_eq!(ids(Some("b"), 2).await, [RunId::new("c")]);
    assert!(ids(Some("c"), 2).await.is_empty());
    // A cursor that is no run of this tenant's (unknown, or another tenant's) starts nothing.
    assert!(ids(Some("nope"), 2).await.is_empty());
    assert!(ids(Some("d"), 2).await.is_empty());
    assert_eq!(
        store.tenants().await.unwrap(),
        [TenantId::new("t1"), TenantId::new("t2")]
    );
    // The operator's gauge: runs not yet ended, per tenant and status (a is completed).
    let open = |tenant: &str, runs| rein_store::RunCount {
        tenant: TenantId::new(tenant),
        status: RunStatus::Queued,
        runs,
    };
    assert_eq!(
        store.open_run_counts().await.unwrap(),
        [open("t1", 2), open("t2", 1)]
    );
    assert!(store.orphaned_logs().await.unwrap().is_empty());
}

async fn another_tenants_runs_are_invisible(store: &dyn Store) {
    let log = Log::new(info("r1", "t1", "s", 1));
    log.create(store, None).await;
    let other = TenantId::new("t2");
    assert!(matches!(
        store.run(&other, &RunId::new("r1")).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(
        store
            .list_runs(&other, &RunFilter::default(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.run_ids(&other, None, 10).await.unwrap().is_empty());
    assert!(
        store
            .run_ids(&other, Some(&RunId::new("r1")), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .latest_in_session(&other, &SessionId::new("s"))
            .await
            .unwrap()
            .is_none()
    );
    let mut next = Log {
        run: log.run.clone(),
        sealed: log.sealed.clone(),
    };
    let event = next.seal(finished(serde_json::json!(1)));
    assert!(
        store.append(&other, &event).await.is_err(),
        "cannot write into another tenant's run"
    );
    assert!(
        store
            .events(&other, &RunId::new("r1"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .costs(Some(&other), CostGroup::Tenant, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn costs_group_recorded_spend(store: &dyn Store) {
    // 2026-11-23T00:00:00Z and the next day.
    let day1 = 1_795_392_000_000;
    let day2 = day1 + 86_400_000;
    let mut a = Log::new(info("a", "t1", "s", day1));
    a.create(store, None).await;
    a.append(store, responded("openai/big", 100, 10, 1.0)).await;
    a.append(store, responded("openai/small", 10, 1, 0.01))
        .await;
    let mut b = Log::new(info("b", "t1", "s", day2));
    b.run.user = UserId::new("v");
    b.create(store, None).await;
    b.append(store, responded("openai/small", 20, 2, 0.02))
        .await;
    let mut c = Log::new(info("c", "t2", "s", day2));
    c.create(store, None).await;
    c.append(store, responded("openai/big", 5, 5, 2.0)).await;

    let t1 = TenantId::new("t1");
    let lines = |lines: Vec<rein_store::CostLine>| -> Vec<(String, u64, u64, i64)> {
        lines
            .into_iter()
            .map(|l| (l.key, l.calls, l.usage.input_tokens, l.cost.micros()))
            .collect()
    };
    assert_eq!(
        lines(store.costs(Some(&t1), CostGroup::Model, 0).await.unwrap()),
        [
            ("openai/big".to_string(), 1, 100, 1_000_000),
            ("openai/small".to_string(), 2, 30, 30_000)
        ]
    );
    assert_eq!(
        lines(store.costs(Some(&t1), CostGroup::Day, 0).await.unwrap()),
        [
            ("2026-11-23".to_string(), 2, 110, 1_010_000),
            ("2026-11-24".to_string(), 1, 20, 20_000)
        ]
    );
    assert_eq!(
        lines(store.costs(Some(&t1), CostGroup::User, 0).await.unwrap()),
        [
            ("u".to_string(), 2, 110, 1_010_000),
            ("v".to_string(), 1, 20, 20_000)
        ]
    );
    assert_eq!(
        lines(store.costs(None, CostGroup::User, day2).await.unwrap()),
        [
            ("t2/u".to_string(), 1, 5, 2_000_000),
            ("t1/v".to_string(), 1, 20, 20_000)
        ]
    );
    assert_eq!(
        lines(store.costs(None, CostGroup::Tenant, 0).await.unwrap()),
        [
            ("t2".to_string(), 1, 5, 2_000_000),
            ("t1".to_string(), 3, 130, 1_030_000)
        ]
    );
    assert_eq!(
        lines(store.costs(Some(&t1), CostGroup::Agent, 0).await.unwrap()),
        [("a".to_string(), 3, 130, 1_030_000)]
    );
}

/// Many workers claiming at once: every run is claimed exactly once.
async fn concurrent_claims_never_hand_one_run_to_two_workers(store: Arc<dyn Store>) {
    for i in 0..40 {
        Log::new(info(&format!("r{i:02}"), "t1", "s", i))
            .create(&*store, None)
            .await;
    }
    let mut workers = Vec::new();
    for w in 0..6 {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            let owner = format!("w{w}");
            let mut mine = Vec::new();
            while let Some((_, id)) = store
                .claim(lease(&owner, 1_000_000), 100, None)
                .await
                .unwrap()
            {
                mine.push(id);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!((n, all.len()), (40, 40), "each run claimed exactly once");
}

async fn tenants_keys_and_versioned_agents(store: &dyn Store) {
    let acme = TenantId::new("acme");
    let other = TenantId::new("other");
    assert_eq!(store.admin_log_head().await.unwrap(), None, "an empty log");
    assert!(
        !store
            .add_api_key(&acme, "k1", 1, None, "cli")
            .await
            .unwrap(),
        "no such tenant yet"
    );
    assert!(store.create_tenant(&acme, 1, "cli").await.unwrap());
    assert!(
        !store.create_tenant(&acme, 2, "cli").await.unwrap(),
        "exists"
    );
    assert!(store.create_tenant(&other, 1, "cli").await.unwrap());
    assert!(
        store
            .add_api_key(&acme, "k1", 3, None, "cli")
            .await
            .unwrap()
    );
    let tenant_of = async |key: &str, now_ms: i64| {
        store
            .tenant_by_key(key, now_ms)
            .await
            .unwrap()
            .map(|grant| grant.tenant)
    };
    assert_eq!(tenant_of("k1", 3).await, Some(acme.clone()));
    assert_eq!(tenant_of("k2", 3).await, None);
    let k2 = "b".repeat(64);
    assert!(store.add_api_key(&acme, &k2, 4, None, "cli").await.unwrap());
    assert!(
        store
            .add_api_key(&other, &"c".repeat(64), 4, None, "cli")
            .await
            .unwrap()
    );
    let tenants: Vec<_> = store
        .registered_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name.as_str().to_string(), t.created_ms, t.keys))
        .collect();
    assert_eq!(
        tenants,
        [("acme".to_string(), 1, 2), ("other".to_string(), 1, 1)]
    );
    let keys = store.api_keys(&acme).await.unwrap();
    assert_eq!(
        keys.iter()
            .map(|k| (k.id.as_str(), k.created_ms))
            .collect::<Vec<_>>(),
        [("k1", 3), ("bbbbbbbbbbbbbbbb", 4)]
    );
    assert!(
        !store
            .revoke_api_key(&other, "bbbbbbbbbbbbbbbb", 9, "cli")
            .await
            .unwrap(),
        "another tenant's key is not revoked"
    );
    assert!(
        !store.revoke_api_key(&acme, "bbbb", 9, "cli").await.unwrap(),
        "a short id matches nothing"
    );
    assert!(
        store
            .revoke_api_key(&acme, "bbbbbbbbbbbbbbbb", 9, "cli")
            .await
            .unwrap()
    );
    assert_eq!(tenant_of(&k2, 9).await, None, "revoked");
    assert!(
        !store
            .revoke_api_key(&acme, "bbbbbbbbbbbbbbbb", 9, "cli")
            .await
            .unwrap()
    );
    assert_eq!(store.api_keys(&acme).await.unwrap().len(), 1);

    // Each change made, and only those, is in the admin log, in order, chained.
    let log = store.admin_log(0, 100).await.unwrap();
    let seen: Vec<_> = log
        .iter()
        .map(|e| {
            (
                e.seq,
                e.ts_ms,
                e.action.as_str(),
                e.tenant.as_str(),
                e.key_id.as_deref(),
                e.actor.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (0, 1, "tenant_created", "acme", None, "cli"),
            (1, 1, "tenant_created", "other", None, "cli"),
            (2, 3, "key_created", "acme", Some("k1"), "cli"),
            (3, 4, "key_created", "acme", Some("bbbbbbbbbbbbbbbb"), "cli"),
            (
                4,
                4,
                "key_created",
                "other",
                Some("cccccccccccccccc"),
                "cli"
            ),
            (5, 9, "key_revoked", "acme", Some("bbbbbbbbbbbbbbbb"), "cli"),
        ]
    );
    rein_core::admin_log::verify_admin_log(&log, None).unwrap();
    let tail = store.admin_log(4, 100).await.unwrap();
    assert_eq!(tail, log[4..]);
    assert!(store.admin_log(6, 100).await.unwrap().is_empty());
    assert_eq!(store.admin_log_head().await.unwrap(), Some(5));

    assert_eq!(
        store.register_agent(&acme, "a", "v: 1", 5).await.unwrap(),
        1
    );
    assert_eq!(
        store.register_agent(&acme, "a", "v: 2", 6).await.unwrap(),
        2
    );
    assert_eq!(
        store.register_agent(&acme, "b", "b: 1", 7).await.unwrap(),
        1
    );
    assert_eq!(
        store.register_agent(&other, "a", "o: 1", 8).await.unwrap(),
        1
    );
    let newest = store.agent(&acme, "a", None).await.unwrap().unwrap();
    assert_eq!((newest.version, newest.spec.as_str()), (2, "v: 2"));
    let first = store.agent(&acme, "a", Some(1)).await.unwrap().unwrap();
    assert_eq!(
        (first.version, first.spec.as_str(), first.created_ms),
        (1, "v: 1", 5)
    );
    assert!(store.agent(&acme, "a", Some(3)).await.unwrap().is_none());
    assert!(store.agent(&acme, "zzz", None).await.unwrap().is_none());
    let listed: Vec<_> = store
        .agents(&acme)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, a.version))
        .collect();
    assert_eq!(listed, [("a".to_string(), 2), ("b".to_string(), 1)]);
    let theirs = store.agent(&other, "a", None).await.unwrap().unwrap();
    assert_eq!(theirs.spec, "o: 1", "each tenant has its own agents");
}

async fn events_appended_together_land_in_order_or_not_at_all(store: &dyn Store) {
    let mut log = Log::new(info("r1", "t1", "s", 1));
    log.create(store, None).await;
    let t1 = TenantId::new("t1");
    let batch = vec![
        log.seal(responded("m", 10, 5, 0.01)),
        log.seal(responded("m", 20, 5, 0.02)),
        log.seal(finished(serde_json::json!("done"))),
    ];
    // Not after the log's end, nor for another tenant: refused, and nothing is written.
    let skipped = store.append_all(&t1, &batch[1..]).await.unwrap_err();
    assert!(matches!(skipped, StoreError::Conflict { .. }), "{skipped}");
    let theirs = store
        .append_all(&TenantId::new("t2"), &batch)
        .await
        .unwrap_err();
    assert!(matches!(theirs, StoreError::Conflict { .. }), "{theirs}");
    assert_eq!(store.events(&t1, &RunId::new("r1")).await.unwrap().len(), 1);

    store.append_all(&t1, &batch).await.unwrap();
    let events = store.events(&t1, &RunId::new("r1")).await.unwrap();
    assert_eq!(events, log.sealed);
    // A live reader asks for what it has not seen yet, and gets only that.
    let r1 = RunId::new("r1");
    assert_eq!(
        store.events_from(&t1, &r1, 2).await.unwrap(),
        log.sealed[2..]
    );
    assert!(store.events_from(&t1, &r1, 4).await.unwrap().is_empty());
    assert!(
        store
            .events_from(&TenantId::new("t2"), &r1, 0)
            .await
            .unwrap()
            .is_empty()
    );
    rein_core::verify_chain(&events, None).unwrap();
    let run = store.run(&t1, &RunId::new("r1")).await.unwrap();
    assert_eq!(run.event_count, 4);
    assert_eq!(run.progress.status, RunStatus::Completed);
    assert_eq!(run.progress.cost, Usd::from_dollars(0.03).unwrap());
    let again = store.append_all(&t1, &batch).await.unwrap_err();
    assert!(matches!(again, StoreError::Conflict { .. }), "{again}");
    store.append_all(&t1, &[]).await.unwrap();
}

/// `dollars` and `tokens` as an amount.
fn amount(dollars: f64, tokens: u64) -> Amount {
    Amount {
        usd: Usd::from_dollars(dollars).unwrap(),
        tokens,
    }
}

/// A scope capped at $1 and no token cap.
fn one_dollar_cap(key: &str) -> Scope {
    Scope {
        key: key.into(),
        cap: Cap {
            usd: Usd::from_dollars(1.0),
            tokens: None,
        },
    }
}

/// A hold of `dollars` (and 100 tokens) on `scopes`, made at 1 ms, that does not expire.
fn hold_in<'a>(id: &'a str, scopes: &'a [Scope], dollars: f64) -> Hold<'a> {
    Hold {
        id,
        scopes,
        amount: amount(dollars, 100),
        now_ms: 1,
        expires_ms: i64::MAX / 2,
    }
}

async fn budget_changes_and_their_events_commit_together(store: &dyn Store) {
    let (t1, r1) = (TenantId::new("t1"), RunId::new("r1"));
    let scope = one_dollar_cap("tenant:t1:2026-11-27");
    let scopes = [scope.clone()];
    let hold = |id, dollars| hold_in(id, &scopes, dollars);
    let standing = || store.standing(&scope.key, 1);
    let mut log = Log::new(info("r1", "t1", "s", 1));
    log.seal(EventKind::BudgetReserved {
        step: 1,
        reservation: "h1".into(),
        scopes: vec![scope.key.clone()],
        amount: amount(0.6, 100),
    });
    let new_run = Some((&log.run, Some(lease("w", 10))));

    // Past the cap: refused, and neither the run nor its events are written.
    let refused = store
        .reserve_and_write(&t1, new_run, &log.sealed, hold("h0", 1.5))
        .await
        .unwrap();
    assert!(
        matches!(refused, Reservation::Refused { .. }),
        "{refused:?}"
    );
    let missing = store.run(&t1, &r1).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)), "{missing}");
    assert_eq!(standing().await.unwrap(), Standing::default());

    // Granted: the hold, the run and its events, together.
    let granted = store
        .reserve_and_write(&t1, new_run, &log.sealed, hold("h1", 0.6))
        .await
        .unwrap();
    assert_eq!(granted, Reservation::Granted);
    assert_eq!(store.events(&t1, &r1).await.unwrap(), log.sealed);
    assert_eq!(standing().await.unwrap().reserved, amount(0.6, 100));

    // A second hold that no longer fits: the events that would go with it are not appended.
    let mut more = Log {
        run: log.run.clone(),
        sealed: log.sealed.clone(),
    };
    more.seal(responded("m", 1, 1, 0.0));
    let refused = store
        .reserve_and_write(&t1, None, &more.sealed[2..], hold("h2", 0.6))
        .await
        .unwrap();
    assert!(
        matches!(refused, Reservation::Refused { .. }),
        "{refused:?}"
    );
    assert_eq!(store.events(&t1, &r1).await.unwrap().len(), 2);

    // Events that cannot be appended (a position already taken) undo their settlement.
    let answer = log.seal(responded("m", 60, 40, 0.4));
    let settled = log.seal(EventKind::BudgetSettled {
        step: 1,
        reservation: "h1".into(),
        amount: amount(0.4, 100),
    });
    let settlement = Settlement {
        id: "h1",
        scopes: &scopes,
        actual: amount(0.4, 100),
        warn_percent: 75,
        end: 1,
    };
    let taken = store
        .settle_and_write(&t1, None, &log.sealed[1..], settlement)
        .await
        .unwrap_err();
    assert!(matches!(taken, StoreError::Conflict { .. }), "{taken}");
    assert_eq!(
        standing().await.unwrap(),
        Standing {
            spent: Amount::default(),
            reserved: amount(0.6, 100),
        },
        "the settlement went with its events"
    );

    // Settled with its events: spend counted, the hold released, the answer on the run.
    let after = store
        .settle_and_write(&t1, None, &[answer, settled], settlement)
        .await
        .unwrap();
    let counted = Standing {
        spent: amount(0.4, 100),
        reserved: Amount::default(),
    };
    assert_eq!(after, [counted]);
    assert_eq!(standing().await.unwrap(), counted);
    assert_eq!(store.events(&t1, &r1).await.unwrap(), log.sealed);
    let run = store.run(&t1, &r1).await.unwrap();
    assert_eq!(run.progress.cost, Usd::from_dollars(0.4).unwrap());

    // Settling again counts nothing; its events are still written.
    let more = log.seal(responded("m", 0, 0, 0.0));
    let again = store
        .settle_and_write(&t1, None, &[more], settlement)
        .await
        .unwrap();
    assert_eq!(again, [counted]);
    assert_eq!(store.events(&t1, &r1).await.unwrap(), log.sealed);

    // A settlement that crosses a warning line (75% of the cap) leaves out the events that end
    // the run: its warning must be recorded before them.
    let from = log.sealed.len();
    log.seal(EventKind::BudgetReserved {
        step: 2,
        reservation: "h2".into(),
        scopes: vec![scope.key.clone()],
        amount: amount(0.5, 100),
    });
    log.seal(responded("m", 60, 40, 0.4));
    log.seal(EventKind::BudgetSettled {
        step: 2,
        reservation: "h2".into(),
        amount: amount(0.4, 100),
    });
    log.seal(finished(serde_json::json!("done")));
    let granted = store
        .reserve_and_write(&t1, None, &log.sealed[from..from + 1], hold("h2", 0.5))
        .await
        .unwrap();
    assert_eq!(granted, Reservation::Granted);
    let crossing = Settlement {
        id: "h2",
        actual: amount(0.4, 100),
        ..settlement
    };
    let after = store
        .settle_and_write(&t1, None, &log.sealed[from + 1..], crossing)
        .await
        .unwrap();
    assert_eq!(after[0].spent, amount(0.8, 200));
    let written = store.events(&t1, &r1).await.unwrap();
    assert_eq!(
        written,
        log.sealed[..log.sealed.len() - 1],
        "all but the end"
    );
    assert_eq!(
        store.run(&t1, &r1).await.unwrap().progress.status,
        RunStatus::Running
    );
}

/// The events of a run with every kind the row counts, in the batches `batches` gives (how many
/// events each append takes), appended as run `id`; returns the row after each append.
async fn project_in_batches(
    store: &dyn Store,
    id: &str,
    batches: &[usize],
) -> Vec<rein_store::RunRecord> {
    let mut log = Log::new(info(id, "t1", "s", 1));
    log.create(store, Some(lease("w1", 100))).await;
    let kinds = vec![
        responded("openai/m", 100, 20, 0.25),
        EventKind::ModelFailed {
            step: 2,
            model: "openai/m".into(),
            error_type: rein_core::ErrorType::Transient,
            message: "503".into(),
            latency_ms: 4,
            attempts: 2,
            all_circuits_open: false,
        },
        EventKind::ToolResult {
            step: 2,
            call_id: "c1".into(),
            tool: "t".into(),
            result: ToolResult::success(serde_json::json!({"ok": true})),
            latency_ms: 3,
            attempts: 1,
        },
        approval_requested(3, "c2"),
        EventKind::ApprovalDecided {
            step: 3,
            call_id: "c2".into(),
            approved: true,
            by: "ana".into(),
            reason: None,
        },
        responded("openai/m", 50, 10, 0.5),
        finished(serde_json::json!({"answer": null})),
    ];
    assert_eq!(batches.iter().sum::<usize>(), kinds.len());
    let mut kinds = kinds.into_iter();
    let mut rows = Vec::new();
    for &n in batches {
        let sealed: Vec<SealedEvent> = kinds.by_ref().take(n).map(|k| log.seal(k)).collect();
        store.append_all(&log.run.tenant, &sealed).await.unwrap();
        rows.push(store.run(&log.run.tenant, &log.run.id).await.unwrap());
    }
    rows
}

async fn a_runs_row_is_the_same_whatever_its_events_batches(store: &dyn Store) {
    let one_by_one = project_in_batches(store, "r1", &[1; 7]).await;
    let together = project_in_batches(store, "r2", &[4, 3]).await;
    let last = |rows: &[rein_store::RunRecord]| {
        let row = rows.last().unwrap().clone();
        (row.progress, row.event_count, row.updated_ms)
    };
    assert_eq!(last(&one_by_one), last(&together));
    let (progress, event_count, _) = last(&together);
    assert_eq!(event_count, 8);
    assert_eq!((progress.iterations, progress.tool_calls), (3, 1));
    assert_eq!(
        (progress.usage.input_tokens, progress.usage.output_tokens),
        (150, 30)
    );
    assert_eq!(progress.cost, Usd::from_dollars(0.75).unwrap());
    assert_eq!(progress.status, RunStatus::Completed);
    assert_eq!(progress.detail.as_deref(), Some("done"));
    assert_eq!(progress.output, Some(serde_json::json!({"answer": null})));
    // A batch that ends waiting for a person leaves the run waiting, claimable only once the
    // request times out; the same as one by one.
    assert_eq!(together[0].progress.status, RunStatus::AwaitingApproval);
    assert_eq!(together[0].progress, one_by_one[3].progress);
    let t1 = TenantId::new("t1");
    let r1 = RunId::new("r1");
    let ended = store.run(&t1, &r1).await.unwrap();
    rein_core::verify_chain(
        &store.events(&t1, &r1).await.unwrap(),
        Some((ended.event_count, &ended.head_hash)),
    )
    .unwrap();
}

async fn dashboard_sessions_end_at_sign_out_expiry_or_revocation(store: &dyn Store) {
    let (acme, other) = (TenantId::new("acme"), TenantId::new("other"));
    assert!(store.create_tenant(&acme, 1, "cli").await.unwrap());
    assert!(store.create_tenant(&other, 1, "cli").await.unwrap());
    let (key, other_key) = ("a".repeat(64), "c".repeat(64));
    assert!(
        store
            .add_api_key(&acme, &key, 1, None, "cli")
            .await
            .unwrap()
    );
    assert!(
        store
            .add_api_key(&other, &other_key, 1, None, "cli")
            .await
            .unwrap()
    );
    assert!(
        !store
            .open_dashboard_session("t0", &"d".repeat(64), 10, 100)
            .await
            .unwrap(),
        "no session for a key that does not exist"
    );
    assert!(
        store
            .open_dashboard_session("t1", &key, 10, 100)
            .await
            .unwrap()
    );
    assert!(
        store
            .open_dashboard_session("t2", &key, 10, 50)
            .await
            .unwrap()
    );
    assert!(
        store
            .open_dashboard_session("t3", &other_key, 10, 100)
            .await
            .unwrap()
    );
    assert_eq!(store.dashboard_session("t0", 20).await.unwrap(), None);
    assert_eq!(
        store.dashboard_session("t1", 20).await.unwrap(),
        Some(acme.clone())
    );
    assert_eq!(
        store.dashboard_session("t3", 20).await.unwrap(),
        Some(other.clone()),
        "each session signs in its own key's tenant"
    );
    assert_eq!(
        store.dashboard_session("t2", 50).await.unwrap(),
        None,
        "expired"
    );
    // Sweeping removes the expired ones and only those; so does opening a session, so the
    // table does not grow forever.
    assert!(
        store
            .open_dashboard_session("t5", &key, 10, 40)
            .await
            .unwrap()
    );
    assert_eq!(store.sweep_dashboard_sessions(45).await.unwrap(), 1);
    assert_eq!(store.sweep_dashboard_sessions(45).await.unwrap(), 0);
    assert_eq!(
        store.dashboard_session("t1", 45).await.unwrap(),
        Some(acme.clone())
    );
    assert!(
        store
            .open_dashboard_session("t4", &key, 60, 100)
            .await
            .unwrap()
    );
    assert!(!store.close_dashboard_session("t2").await.unwrap(), "swept");
    assert!(store.close_dashboard_session("t1").await.unwrap());
    assert!(!store.close_dashboard_session("t1").await.unwrap());
    assert_eq!(
        store.dashboard_session("t1", 20).await.unwrap(),
        None,
        "closed"
    );
    assert_eq!(
        store.dashboard_session("t4", 70).await.unwrap(),
        Some(acme.clone())
    );
    // Revoking the key ends its sessions, and only its own.
    assert!(
        store
            .revoke_api_key(&acme, api_key_id(&key), 9, "cli")
            .await
            .unwrap()
    );
    assert_eq!(store.dashboard_session("t4", 70).await.unwrap(), None);
    assert_eq!(
        store.dashboard_session("t3", 70).await.unwrap(),
        Some(other)
    );

    // A key valid until 200 authenticates, and signs sessions in, until then only.
    let brief = "e".repeat(64);
    assert!(
        store
            .add_api_key(&acme, &brief, 100, Some(200), "cli")
            .await
            .unwrap()
    );
    let grant = store.tenant_by_key(&brief, 199).await.unwrap().unwrap();
    assert_eq!((&grant.tenant, grant.expires_ms), (&acme, Some(200)));
    assert!(grant.valid_at(199) && !grant.valid_at(200));
    assert_eq!(
        store.tenant_by_key(&brief, 200).await.unwrap(),
        None,
        "expired"
    );
    let never = store
        .tenant_by_key(&other_key, 1 << 50)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        never.expires_ms, None,
        "a key without an expiry never expires"
    );
    let listed = store.api_keys(&acme).await.unwrap();
    assert_eq!(
        listed.iter().map(|k| k.expires_ms).collect::<Vec<_>>(),
        [Some(200)]
    );
    assert!(
        store
            .open_dashboard_session("t5", &brief, 150, 1000)
            .await
            .unwrap()
    );
    assert_eq!(
        store.dashboard_session("t5", 199).await.unwrap(),
        Some(acme.clone())
    );
    assert_eq!(
        store.dashboard_session("t5", 200).await.unwrap(),
        None,
        "a session ends when its key expires"
    );
    assert!(
        !store
            .open_dashboard_session("t6", &brief, 200, 1000)
            .await
            .unwrap(),
        "no session for an expired key"
    );
}

/// A request to cancel a run another process drives is kept for that process to find: the
/// first author stays, an ended run or another tenant's takes none, and only the runs asked
/// about are answered.
async fn requests_to_cancel_wait_in_the_store_for_the_runs_driver(store: &dyn Store) {
    let mut r1 = Log::new(info("r1", "t1", "s", 1));
    r1.create(store, Some(lease("w1", 10_000))).await;
    let r2 = Log::new(info("r2", "t1", "s", 2));
    r2.create(store, Some(lease("w1", 10_000))).await;
    let mut r3 = Log::new(info("r3", "t1", "s", 3));
    r3.create(store, None).await;
    r3.append(store, finished(serde_json::json!(1))).await;
    let (t1, t2) = (TenantId::new("t1"), TenantId::new("t2"));
    let ids = [r1.run.id.clone(), r2.run.id.clone(), r3.run.id.clone()];
    assert_eq!(store.cancel_requests(&ids).await.unwrap(), vec![]);
    assert!(
        store
            .run(&t1, &ids[0])
            .await
            .unwrap()
            .cancel_requested_by
            .is_none()
    );

    assert!(
        !store.request_cancel(&t2, &ids[0], "api:t2").await.unwrap(),
        "another tenant's run"
    );
    assert!(store.request_cancel(&t1, &ids[0], "api:t1").await.unwrap());
    assert!(
        store.request_cancel(&t1, &ids[0], "cli:ann").await.unwrap(),
        "still live: asked again"
    );
    assert!(
        !store.request_cancel(&t1, &ids[2], "api:t1").await.unwrap(),
        "an ended run takes no request"
    );
    assert_eq!(
        store.cancel_requests(&ids).await.unwrap(),
        vec![(ids[0].clone(), "api:t1".to_string())],
        "the first author stays"
    );
    assert_eq!(store.cancel_requests(&ids[1..]).await.unwrap(), vec![]);
    assert_eq!(store.cancel_requests(&[]).await.unwrap(), vec![]);
    let record = store.run(&t1, &ids[0]).await.unwrap();
    assert_eq!(record.cancel_requested_by.as_deref(), Some("api:t1"));
    // The run's log and summary are untouched by the request; it ends when its driver says.
    assert_eq!(record.event_count, 1);
    r1.append(store, finished(serde_json::json!(2))).await;
    assert!(!store.request_cancel(&t1, &ids[0], "api:t1").await.unwrap());
}

/// Long enough for an announcement that was made; a test that waits it out sees none was.
const HEARD: Duration = Duration::from_secs(5);
const NOT_HEARD: Duration = Duration::from_millis(100);

/// A run's followers hear each write that appends to its log (a new run, an append, a budget
/// change with its events), and nothing else: another run's appends, a refused append, a
/// refused reservation. What they heard, they heard once.
async fn a_runs_followers_hear_each_write_that_appends_to_it(store: &dyn Store) {
    let mut log = Log::new(info("r1", "t1", "s", 1));
    let t1 = TenantId::new("t1");
    let mut follower = store.follow(&log.run.id);
    let mut other = store.follow(&RunId::new("r2"));
    follower.seen();
    log.create(store, None).await;
    assert!(follower.changed(HEARD).await, "the new run");
    assert!(!follower.changed(NOT_HEARD).await, "heard once");

    follower.seen();
    log.append(store, responded("m", 1, 1, 0.01)).await;
    assert!(follower.changed(HEARD).await, "an append");

    follower.seen();
    let taken = store.append(&t1, &log.sealed[0]).await.unwrap_err();
    assert!(matches!(taken, StoreError::Conflict { .. }), "{taken}");
    assert!(!follower.changed(NOT_HEARD).await, "a refused append");

    let scopes = [one_dollar_cap("tenant:t1")];
    let next = log.seal(finished(serde_json::json!(1)));
    let hold = |id, dollars| hold_in(id, &scopes, dollars);
    follower.seen();
    let refused = store
        .reserve_and_write(&t1, None, std::slice::from_ref(&next), hold("h1", 5.0))
        .await
        .unwrap();
    assert!(
        matches!(refused, Reservation::Refused { .. }),
        "{refused:?}"
    );
    assert!(!follower.changed(NOT_HEARD).await, "a refused reservation");
    let granted = store
        .reserve_and_write(&t1, None, std::slice::from_ref(&next), hold("h2", 0.5))
        .await
        .unwrap();
    assert_eq!(granted, Reservation::Granted);
    assert!(
        follower.changed(HEARD).await,
        "a reservation with its events"
    );

    assert!(!other.changed(NOT_HEARD).await, "another run's follower");
    let mut r2 = Log::new(info("r2", "t1", "s", 2));
    other.seen();
    r2.create(store, None).await;
    assert!(other.changed(HEARD).await);
    r2.append(store, finished(serde_json::json!(2))).await;
    assert!(
        !follower.changed(NOT_HEARD).await,
        "r2's appends are not r1's"
    );
}

/// Idle workers hear of a queued run and of a lease given up, and not of a run created under a
/// lease, its appends, or a release by someone who does not hold the lease.
async fn idle_workers_hear_of_runs_that_become_claimable(store: &dyn Store) {
    let mut idle = store.follow_claimable();
    idle.seen();
    let mut leased = Log::new(info("r1", "t1", "s", 1));
    leased.create(store, Some(lease("w1", i64::MAX / 2))).await;
    leased.append(store, responded("m", 1, 1, 0.01)).await;
    assert!(
        !idle.changed(NOT_HEARD).await,
        "a leased run and its appends"
    );
    Log::new(info("r2", "t1", "s", 2)).create(store, None).await;
    assert!(idle.changed(HEARD).await, "a queued run");
    idle.seen();
    store.release(&leased.run.id, "w2").await.unwrap();
    assert!(!idle.changed(NOT_HEARD).await, "not w2's to give up");
    store.release(&leased.run.id, "w1").await.unwrap();
    assert!(idle.changed(HEARD).await, "a lease given up");

    // Given up while it awaits a person, or once ended, a run is not claimable.
    let mut paused = Log::new(info("r3", "t1", "s", 3));
    paused.create(store, Some(lease("w1", i64::MAX / 2))).await;
    paused.append(store, approval_requested(1, "c1")).await;
    leased.append(store, finished(serde_json::json!(1))).await;
    idle.seen();
    store.release(&paused.run.id, "w1").await.unwrap();
    store.release(&leased.run.id, "w1").await.unwrap();
    assert!(!idle.changed(NOT_HEARD).await, "a paused run, an ended one");

    // A worker's run given up while it runs is not claimable either: its caller continues it.
    let worker = Log::new(RunInfo {
        parent: Some(RunId::new("r3")),
        ..info("r4", "t1", "s", 4)
    });
    worker.create(store, Some(lease("w1", i64::MAX / 2))).await;
    idle.seen();
    store.release(&worker.run.id, "w1").await.unwrap();
    assert!(!idle.changed(NOT_HEARD).await, "a worker's run");
}

/// On PostgreSQL a follower also hears the appends of other processes on the database (another
/// store on its schema), and not those of a deployment in another schema of the same database.
#[tokio::test]
async fn postgres_followers_hear_other_processes_but_not_other_schemas() {
    let (here, schema) = postgres_store().await;
    let there = PgStore::connect(&schema.url()).await.unwrap();
    let (elsewhere, other_schema) = postgres_store().await;
    let mut log = Log::new(info("r1", "t1", "s", 1));
    let mut follower = here.follow(&log.run.id);
    let mut idle = here.follow_claimable();
    assert!(follower.hears_other_processes() && idle.hears_other_processes());
    follower.seen();
    idle.seen();
    // The listener starts with the first follower; give it time to connect before appending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let twin = Log::new(info("r1", "t1", "s", 1));
    twin.create(&elsewhere, None).await;
    assert!(
        !follower.changed(NOT_HEARD * 3).await,
        "another schema's r1"
    );
    assert!(
        !idle.changed(Duration::ZERO).await,
        "another schema's queued run"
    );

    log.create(&there, None).await;
    assert!(follower.changed(HEARD).await, "another process's new run");
    assert!(idle.changed(HEARD).await, "another process's queued run");
    follower.seen();
    log.append(&there, finished(serde_json::json!(1))).await;
    assert!(follower.changed(HEARD).await, "another process's append");

    for store in [&here, &there, &elsewhere] {
        store.close().await;
    }
    schema.drop_schema().await.unwrap();
    other_schema.drop_schema().await.unwrap();
}

/// Closing a PostgreSQL store stops its listener, and a follower that comes after the close
/// starts none (it would hold a connection until the store is dropped).
#[tokio::test]
async fn a_closed_postgres_store_listens_no_more() {
    let (store, schema) = postgres_store().await;
    let listeners_become = async |want: i64| {
        for _ in 0..100 {
            if schema.listeners().await.unwrap() == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    let open = PgStore::connect(&schema.url()).await.unwrap();
    store.close().await;
    let _late = store.follow_claimable();
    let _follower = open.follow(&RunId::new("r1"));
    assert!(
        listeners_become(1).await,
        "one listener, the open store's: a closed store's follower starts none"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        schema.listeners().await.unwrap(),
        1,
        "a closed store's follower starts none"
    );
    open.close().await;
    assert!(listeners_become(0).await, "closing stops the listener");
    schema.drop_schema().await.unwrap();
}

macro_rules! conformance {
    ($engine:ident: $($test:ident),* $(,)?) => {
        mod $engine {
            $(
                #[tokio::test]
                async fn $test() {
                    let fixture = super::$engine().await;
                    super::$test(&*fixture.store).await;
                    fixture.done().await;
                }
            )*

            #[tokio::test]
            async fn concurrent_claims_never_hand_one_run_to_two_workers() {
                let fixture = super::$engine().await;
                super::concurrent_claims_never_hand_one_run_to_two_workers(fixture.store.clone())
                    .await;
                fixture.done().await;
            }

            #[tokio::test]
            async fn writers_racing_for_one_position_never_both_win() {
                let fixture = super::$engine().await;
                super::racing_writers(fixture.store.clone()).await;
                fixture.done().await;
            }
        }
    };
}

async fn racing_writers(store: Arc<dyn Store>) {
    let mut log = Log::new(info("r1", "t1", "s", 1));
    log.create(&*store, None).await;
    let t1 = TenantId::new("t1");
    let err = store.append(&t1, &log.sealed[0]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { seq: 0, .. }), "{err}");
    let mut racers = Vec::new();
    for i in 0..8 {
        let mut mine = Log {
            run: log.run.clone(),
            sealed: log.sealed.clone(),
        };
        let event = mine.seal(responded(&format!("m{i}"), 1, 1, 0.0));
        let store = store.clone();
        let t1 = t1.clone();
        racers.push(tokio::spawn(async move {
            store.append(&t1, &event).await.is_ok()
        }));
    }
    let mut won = 0;
    for r in racers {
        won += usize::from(r.await.unwrap());
    }
    assert_eq!(won, 1, "one writer per position");
    let events = store.events(&t1, &RunId::new("r1")).await.unwrap();
    assert_eq!(events.len(), 2);
    rein_core::verify_chain(&events, None).unwrap();
    log.sealed = events;
    log.append(&*store, finished(serde_json::json!(1))).await;
}

conformance!(sqlite:
    requests_to_cancel_wait_in_the_store_for_the_runs_driver,
    a_runs_followers_hear_each_write_that_appends_to_it,
    idle_workers_hear_of_runs_that_become_claimable,
    a_run_id_is_stored_once,
    budget_changes_and_their_events_commit_together,
    a_runs_row_is_the_same_whatever_its_events_batches,
    events_round_trip_verify_and_project_onto_the_run,
    events_appended_together_land_in_order_or_not_at_all,
    a_run_is_stored_only_with_its_own_first_event,
    a_run_is_claimed_by_one_worker_and_taken_over_only_once_its_lease_expires,
    a_workers_run_is_never_claimed_on_its_own,
    claims_take_the_oldest_run_first_and_never_a_finished_one,
    claims_are_fair_between_tenants_and_hold_a_cap,
    tenant_secrets_are_kept_by_name_and_logged,
    audit_anchors_cover_runs_in_id_order_and_keep_their_place,
    an_approval_pauses_the_run_until_decided_or_timed_out,
    listings_filter_by_status_session_and_tenant,
    another_tenants_runs_are_invisible,
    costs_group_recorded_spend,
    tenants_keys_and_versioned_agents,
    dashboard_sessions_end_at_sign_out_expiry_or_revocation,
);

conformance!(postgres:
    requests_to_cancel_wait_in_the_store_for_the_runs_driver,
    a_runs_followers_hear_each_write_that_appends_to_it,
    idle_workers_hear_of_runs_that_become_claimable,
    a_run_id_is_stored_once,
    budget_changes_and_their_events_commit_together,
    a_runs_row_is_the_same_whatever_its_events_batches,
    events_round_trip_verify_and_project_onto_the_run,
    events_appended_together_land_in_order_or_not_at_all,
    a_run_is_stored_only_with_its_own_first_event,
    a_run_is_claimed_by_one_worker_and_taken_over_only_once_its_lease_expires,
    a_workers_run_is_never_claimed_on_its_own,
    claims_take_the_oldest_run_first_and_never_a_finished_one,
    claims_are_fair_between_tenants_and_hold_a_cap,
    tenant_secrets_are_kept_by_name_and_logged,
    audit_anchors_cover_runs_in_id_order_and_keep_their_place,
    an_approval_pauses_the_run_until_decided_or_timed_out,
    listings_filter_by_status_session_and_tenant,
    another_tenants_runs_are_invisible,
    costs_group_recorded_spend,
    tenants_keys_and_versioned_agents,
    dashboard_sessions_end_at_sign_out_expiry_or_revocation,
);

/// PostgreSQL refuses, like SQLite, to change a stored event or a run's identity, or to remove
/// either, even to someone holding a connection.
#[tokio::test]
async fn postgres_refuses_to_rewrite_history_through_sql() {
    let (store, schema) = postgres_store().await;
    let mut log = Log::new(info("r1", "t1", "s", 1));
    log.create(&store, None).await;
    log.append(&store, finished(serde_json::json!(1))).await;
    assert!(
        store
            .create_tenant(&TenantId::new("t1"), 1, "cli")
            .await
            .unwrap()
    );
    for forbidden in [
        "UPDATE admin_log SET actor = 'someone else'",
        "DELETE FROM admin_log",
        "TRUNCATE admin_log",
        "DELETE FROM events",
        "UPDATE events SET hash = 'x'",
        "UPDATE events SET payload = NULL",
        "TRUNCATE events CASCADE",
        "UPDATE runs SET tenant = 't2'",
        "UPDATE runs SET input = 'other'",
        "UPDATE runs SET parent_run_id = 'r0'",
        "DELETE FROM runs",
        "TRUNCATE runs CASCADE",
    ] {
        assert!(
            sqlx::query(forbidden).execute(store.pool()).await.is_err(),
            "{forbidden}"
        );
    }
    let events = store
        .events(&TenantId::new("t1"), &RunId::new("r1"))
        .await
        .unwrap();
    assert_eq!(events, log.sealed);
    assert_eq!(store.admin_log(0, 10).await.unwrap().len(), 1);
    Fixture {
        store: Arc::new(store),
        cleanup: Cleanup::Schema(schema),
    }
    .done()
    .await;
}
