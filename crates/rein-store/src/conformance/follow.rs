//! Followers: appends and claimable runs announced.

use super::*;
use crate::{RunInfo, Store, StoreError};
use rein_core::budget::Reservation;
use rein_core::{RunId, TenantId};

/// A run's followers hear each write that appends to its log (a new run, an append, a budget
/// change with its events), and nothing else: another run's appends, a refused append, a
/// refused reservation. What they heard, they heard once.
pub async fn a_runs_followers_hear_each_write_that_appends_to_it(store: &dyn Store) {
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
pub async fn idle_workers_hear_of_runs_that_become_claimable(store: &dyn Store) {
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
