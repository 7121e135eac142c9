//! One conformance suite for every budget counter backend: the embedded SQLite store, the
//! PostgreSQL store, and Redis (real servers on 127.0.0.1; `scripts/test` starts them when they
//! are down).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rein_core::Usd;
use rein_core::budget::{Amount, Cap, Counters, Reservation, Scope};
use rein_redis::RedisCounters;
use rein_store::SqliteStore;
use std::sync::Arc;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn scope(key: &str, usd: Option<f64>, tokens: Option<u64>) -> Scope {
    Scope {
        key: key.to_string(),
        cap: Cap {
            usd: usd.and_then(Usd::from_dollars),
            tokens,
        },
    }
}

fn amount(usd: f64, tokens: u64) -> Amount {
    Amount {
        usd: Usd::from_dollars(usd).unwrap(),
        tokens,
    }
}

async fn redis() -> RedisCounters {
    let prefix = format!("rein-test-{}", uuid::Uuid::now_v7());
    RedisCounters::connect(REDIS_URL, &prefix)
        .await
        .expect("Redis must be running on 127.0.0.1:6379 for these tests (.ci/run starts it)")
}

async fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("c.db"), Default::default())
        .await
        .unwrap();
    (store, dir)
}

async fn reservations_are_all_or_nothing(c: &dyn Counters) {
    let roomy = scope("tenant:t:day", Some(10.0), None);
    let tight = scope("user:t:u:day", Some(1.0), None);
    let both = [roomy.clone(), tight.clone()];
    assert_eq!(
        c.reserve("r1", &both, amount(0.8, 10), 0, 1000)
            .await
            .unwrap(),
        Reservation::Granted
    );
    let refused = c
        .reserve("r2", &both, amount(0.3, 10), 0, 1000)
        .await
        .unwrap();
    let Reservation::Refused { scope, standing } = refused else {
        panic!("expected a refusal")
    };
    assert_eq!(scope.key, tight.key);
    assert_eq!(standing.reserved.usd, Usd::from_dollars(0.8).unwrap());
    // Nothing of r2 is held in the scope that had room.
    let roomy_now = c.standing(&roomy.key, 0).await.unwrap();
    assert_eq!(roomy_now.reserved, amount(0.8, 10));
}

/// Every scope is checked before any is held: a hold taken in one scope never makes the same
/// reservation fail in the next (which would leave it held in some scopes only).
async fn a_reservation_is_checked_in_every_scope_before_any_hold(c: &dyn Counters) {
    let small = scope("user:t3:u:day", Some(1.0), Some(100));
    let large = scope("tenant:t3:day", Some(10.0), None);
    let both = [small.clone(), large.clone()];
    assert_eq!(
        c.reserve("r1", &both, amount(0.6, 60), 0, 1000)
            .await
            .unwrap(),
        Reservation::Granted
    );
    for s in [&small, &large] {
        assert_eq!(
            c.standing(&s.key, 0).await.unwrap().reserved,
            amount(0.6, 60)
        );
    }
    // Over the token cap only: refused, and nothing more is held anywhere.
    let refused = c
        .reserve("r2", &both, amount(0.1, 50), 0, 1000)
        .await
        .unwrap();
    assert!(
        matches!(&refused, Reservation::Refused { scope, .. } if scope.key == small.key),
        "{refused:?}"
    );
    assert_eq!(
        c.standing(&large.key, 0).await.unwrap().reserved,
        amount(0.6, 60)
    );
}

async fn settling_releases_the_rest_and_counts_the_spend(c: &dyn Counters) {
    let s = [scope("tenant:t2:day", Some(1.0), Some(1000))];
    assert_eq!(
        c.reserve("r1", &s, amount(0.6, 600), 0, 1000)
            .await
            .unwrap(),
        Reservation::Granted
    );
    let after = c.settle("r1", &s, amount(0.25, 200)).await.unwrap();
    let now = c.standing(&s[0].key, 0).await.unwrap();
    assert_eq!(after, vec![now], "settle returns the standing it left");
    assert_eq!(
        c.settle("r1", &s, amount(0.25, 200)).await.unwrap(),
        vec![now],
        "settling twice counts once"
    );
    assert_eq!(
        (now.spent, now.reserved),
        (amount(0.25, 200), amount(0.0, 0))
    );
    // The released headroom is usable again; the spend is not.
    assert_eq!(
        c.reserve("r2", &s, amount(0.75, 800), 0, 1000)
            .await
            .unwrap(),
        Reservation::Granted
    );
    assert!(matches!(
        c.reserve("r3", &s, amount(0.01, 1), 0, 1000).await.unwrap(),
        Reservation::Refused { .. }
    ));
}

async fn a_reservation_left_by_a_dead_process_expires(c: &dyn Counters) {
    let s = [scope("session:t:s", Some(1.0), None)];
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let t0 = now();
    assert_eq!(
        c.reserve("dead", &s, amount(1.0, 0), t0, t0 + 300)
            .await
            .unwrap(),
        Reservation::Granted
    );
    assert!(matches!(
        c.reserve("live", &s, amount(0.1, 0), now(), now() + 60_000)
            .await
            .unwrap(),
        Reservation::Refused { .. }
    ));
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(
        c.reserve("live", &s, amount(0.1, 0), now(), now() + 60_000)
            .await
            .unwrap(),
        Reservation::Granted
    );
    // The dead holder's late settle still counts what it spent.
    c.settle("dead", &s, amount(0.5, 0)).await.unwrap();
    let standing = c.standing(&s[0].key, now()).await.unwrap();
    assert_eq!(
        (standing.spent.usd, standing.reserved.usd),
        (
            Usd::from_dollars(0.5).unwrap(),
            Usd::from_dollars(0.1).unwrap()
        )
    );
}

async fn racing_reservations_never_overcommit(c: Arc<dyn Counters>) {
    let s = Arc::new([scope("tenant:race:day", Some(2.0), None)]);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (c, s) = (c.clone(), s.clone());
        tasks.spawn(async move {
            c.reserve(&format!("r{i}"), &s[..], amount(0.03, 1), 0, 60_000)
                .await
                .unwrap()
        });
    }
    let mut granted = 0;
    while let Some(r) = tasks.join_next().await {
        if r.unwrap() == Reservation::Granted {
            granted += 1;
        }
    }
    assert_eq!(granted, 66, "exactly floor(2.00 / 0.03) reservations fit");
    let now = c.standing(&s[0].key, 0).await.unwrap();
    assert_eq!(now.reserved.usd, Usd::from_dollars(1.98).unwrap());
}

async fn cells_change_only_by_compare_and_swap(c: &dyn Counters) {
    assert_eq!(c.cell("breaker:t:x").await.unwrap(), None);
    assert!(c.swap_cell("breaker:t:x", None, "a").await.unwrap());
    assert!(
        !c.swap_cell("breaker:t:x", None, "b").await.unwrap(),
        "already written"
    );
    assert!(
        !c.swap_cell("breaker:t:x", Some("stale"), "b")
            .await
            .unwrap()
    );
    assert!(c.swap_cell("breaker:t:x", Some("a"), "b").await.unwrap());
    assert_eq!(c.cell("breaker:t:x").await.unwrap().as_deref(), Some("b"));
}

#[tokio::test]
async fn sqlite_counters_conform() {
    let (store, _dir) = sqlite().await;
    reservations_are_all_or_nothing(&store).await;
    a_reservation_is_checked_in_every_scope_before_any_hold(&store).await;
    settling_releases_the_rest_and_counts_the_spend(&store).await;
    a_reservation_left_by_a_dead_process_expires(&store).await;
    cells_change_only_by_compare_and_swap(&store).await;
    racing_reservations_never_overcommit(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counters_conform() {
    let c = redis().await;
    reservations_are_all_or_nothing(&c).await;
    a_reservation_is_checked_in_every_scope_before_any_hold(&c).await;
    settling_releases_the_rest_and_counts_the_spend(&c).await;
    a_reservation_left_by_a_dead_process_expires(&c).await;
    cells_change_only_by_compare_and_swap(&c).await;
    racing_reservations_never_overcommit(Arc::new(c)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_counters_conform() {
    let schema = rein_store::testing::TestSchema::create().await.expect(
        "PostgreSQL must be running on 127.0.0.1:5432 for these tests (scripts/test starts it)",
    );
    let c = rein_store::PgStore::connect(&schema.url()).await.unwrap();
    reservations_are_all_or_nothing(&c).await;
    a_reservation_is_checked_in_every_scope_before_any_hold(&c).await;
    settling_releases_the_rest_and_counts_the_spend(&c).await;
    a_reservation_left_by_a_dead_process_expires(&c).await;
    cells_change_only_by_compare_and_swap(&c).await;
    racing_reservations_never_overcommit(Arc::new(c.clone())).await;
    rein_store::Store::close(&c).await;
    schema.drop_schema().await.unwrap();
}
