//! The conformance suite (`rein_store::conformance`) on both store engines: the embedded SQLite
//! store and PostgreSQL (the real server on 127.0.0.1; `scripts/test` starts it when it is down),
//! and what is particular to PostgreSQL. Each PostgreSQL test gets a schema of its own, so tests
//! run side by side and leave nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rein_core::{RunId, TenantId};
use rein_store::conformance::{HEARD, Log, NOT_HEARD, Subject, finished, info};
use rein_store::prelude::*;
use rein_store::testing::TestSchema;
use rein_store::{PgStore, SqliteStore};
use std::sync::Arc;
use std::time::Duration;

/// A fresh SQLite store in a temporary directory.
async fn sqlite() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("rein.db"), Default::default())
        .await
        .unwrap();
    Subject::new(Arc::new(store)).with_cleanup(move || Box::pin(async move { drop(dir) }))
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

/// A fresh PostgreSQL store in a schema of its own.
async fn postgres() -> Subject {
    let (store, schema) = postgres_store().await;
    Subject::new(Arc::new(store))
        .with_cleanup(move || Box::pin(async move { schema.drop_schema().await.unwrap() }))
}

rein_store::conformance_suite!(sqlite, super::sqlite());
rein_store::conformance_suite!(postgres, super::postgres());

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
    Subject::new(Arc::new(store))
        .with_cleanup(move || Box::pin(async move { schema.drop_schema().await.unwrap() }))
        .done()
        .await;
}
