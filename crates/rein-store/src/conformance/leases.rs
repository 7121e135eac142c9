//! Leases and claims: one driver per run, fair claims, takeovers.

use super::*;
use crate::{RunInfo, Store};
use rein_core::{RunId, RunStatus, TenantId};
use std::sync::Arc;

pub async fn a_run_is_claimed_by_one_worker_and_taken_over_only_once_its_lease_expires(
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
pub async fn a_workers_run_is_never_claimed_on_its_own(store: &dyn Store) {
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

pub async fn claims_take_the_oldest_run_first_and_never_a_finished_one(store: &dyn Store) {
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
pub async fn claims_are_fair_between_tenants_and_hold_a_cap(store: &dyn Store) {
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

/// Many workers claiming at once: every run is claimed exactly once.
pub async fn concurrent_claims_never_hand_one_run_to_two_workers(store: Arc<dyn Store>) {
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
