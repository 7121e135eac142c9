//! The run log: events, rows, listings, costs, tenants kept apart, cancel requests.

use super::*;
use crate::{CostGroup, RunFilter, Store, StoreError};
use rein_core::{
    EventKind, RunId, RunStatus, SealedEvent, SessionId, TenantId, TerminationReason, ToolResult,
    Usd, UserId,
};
use std::sync::Arc;

pub async fn events_round_trip_verify_and_project_onto_the_run(store: &dyn Store) {
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

pub async fn a_run_is_stored_only_with_its_own_first_event(store: &dyn Store) {
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
pub async fn a_run_id_is_stored_once(store: &dyn Store) {
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

pub async fn an_approval_pauses_the_run_until_decided_or_timed_out(store: &dyn Store) {
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

pub async fn listings_filter_by_status_session_and_tenant(store: &dyn Store) {
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
    let ids = |runs: Vec<crate::RunRecord>| -> Vec<String> {
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
    let open = |tenant: &str, runs| crate::RunCount {
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

pub async fn another_tenants_runs_are_invisible(store: &dyn Store) {
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

pub async fn costs_group_recorded_spend(store: &dyn Store) {
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
    let lines = |lines: Vec<crate::CostLine>| -> Vec<(String, u64, u64, i64)> {
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

pub async fn events_appended_together_land_in_order_or_not_at_all(store: &dyn Store) {
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

/// The events of a run with every kind the row counts, in the batches `batches` gives (how many
/// events each append takes), appended as run `id`; returns the row after each append.
pub async fn project_in_batches(
    store: &dyn Store,
    id: &str,
    batches: &[usize],
) -> Vec<crate::RunRecord> {
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

pub async fn a_runs_row_is_the_same_whatever_its_events_batches(store: &dyn Store) {
    let one_by_one = project_in_batches(store, "r1", &[1; 7]).await;
    let together = project_in_batches(store, "r2", &[4, 3]).await;
    let last = |rows: &[crate::RunRecord]| {
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

/// A request to cancel a run another process drives is kept for that process to find: the
/// first author stays, an ended run or another tenant's takes none, and only the runs asked
/// about are answered.
pub async fn requests_to_cancel_wait_in_the_store_for_the_runs_driver(store: &dyn Store) {
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

pub async fn racing_writers(store: Arc<dyn Store>) {
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
