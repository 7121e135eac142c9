use super::*;
use crate::prelude::*;
use rein_core::{Event, EventKind};
use rein_core::{SessionId, UserId};

fn new_run(id: &str, tenant: &str) -> RunInfo {
    RunInfo {
        id: RunId::new(id),
        tenant: TenantId::new(tenant),
        user: UserId::new("u"),
        session: SessionId::new("s"),
        job: None,
        agent: "a".into(),
        agent_version: 1,
        spec: "name: a".into(),
        input: "hi".into(),
        created_ms: 1,
        parent: None,
    }
}

fn started(seq: u64) -> Event {
    Event {
        seq,
        ts_ms: 10 + seq as i64,
        kind: EventKind::RunStarted {
            agent: "a".into(),
            agent_version: 1,
            spec_sha256: String::new(),
            input: "hi".into(),
            tenant: TenantId::new("t1"),
            user: UserId::new("u"),
            session: SessionId::new("s"),
            job: None,
            granted_scopes: Vec::new(),
            trace_parent: None,
            fence: None,
            parent: None,
            trust: Some(rein_core::Trust::Operator),
        },
    }
}

/// Processes that open a new database at the same moment (`rein serve` and `rein worker`
/// started together) each bring its schema up to date or find it done; none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_opened_at_once_on_a_new_file_all_open() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rein.db");
        let opens: Vec<_> = (0..6)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move { SqliteStore::open(path, Durability::Process).await })
            })
            .collect();
        for open in opens {
            let store = open.await.unwrap().unwrap();
            store.close().await;
        }
    }
}

/// Writes are held back only after a short pass: never after the first (which copies
/// the whole log, so many pages are written while it runs), unless it is the last.
#[test]
fn writes_are_held_back_only_after_a_short_pass_or_the_last() {
    let pass = |number, log, copied, log_before| Pass {
        number,
        log,
        copied,
        log_before,
    };
    assert!(!pass(1, 5000, 5000, None).then_hold_writes());
    assert!(!pass(2, 5140, 5140, Some(5000)).then_hold_writes());
    assert!(pass(3, 5170, 5170, Some(5140)).then_hold_writes());
    assert!(pass(2, 5000, 5000, Some(5000)).then_hold_writes());
    // Readers kept too much of the log from being copied.
    assert!(!pass(3, 5170, 4000, Some(5140)).then_hold_writes());
    assert!(pass(MAX_PASSES, 9000, 9000, Some(8000)).then_hold_writes());
    assert!(!pass(MAX_PASSES, 9000, 8000, Some(8000)).then_hold_writes());
}

/// Under writes that never pause, the log still starts over: a background checkpoint
/// always leaves behind what was written while it ran, so past [`CHECKPOINT_REST_FRAMES`]
/// the rest is copied with writes held back for that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_starts_over_under_writes_that_never_pause() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = SqliteStore::open(&path, Durability::Process).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (store, stop) = (store.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w{w}-{i}");
                let first = started(0).seal(&RunId::new(&id), GENESIS_HASH);
                store
                    .create_run(&new_run(&id, "t1"), std::slice::from_ref(&first), None)
                    .await
                    .unwrap();
                i += 1;
            }
        }));
    }
    // A log that starts over gets a new salt in its header.
    let wal = dir.path().join("s.db-wal");
    let salt = || {
        std::fs::read(&wal)
            .ok()
            .and_then(|b| b.get(16..20).map(<[u8]>::to_vec))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut first = None;
    while first.is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        first = salt();
    }
    let mut started_over = false;
    while !started_over && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        started_over = first.is_some() && salt() != first;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(
        started_over,
        "the log never started over under steady writes ({} bytes)",
        std::fs::metadata(&wal).map_or(0, |m| m.len())
    );
    store.close().await;
}

/// The writer never checkpoints; the background task does, so the log is reused rather than
/// growing for as long as the process writes.
#[tokio::test]
async fn the_write_ahead_log_is_checkpointed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let store = SqliteStore::open(&path, Durability::Process).await.unwrap();
    let wal = dir.path().join("c.db-wal");
    let write = |from: usize| {
        let store = store.clone();
        async move {
            for i in from..from + 300 {
                let id = format!("r{i}");
                let first = started(0).seal(&RunId::new(&id), GENESIS_HASH);
                store
                    .create_run(&new_run(&id, "t1"), std::slice::from_ref(&first), None)
                    .await
                    .unwrap();
            }
        }
    };
    write(0).await;
    let grown = std::fs::metadata(&wal).unwrap().len();
    assert!(grown > 0);
    // Three checkpoint periods: the log is copied into the database, and the writes that
    // follow start it over from the beginning instead of appending to it.
    tokio::time::sleep(CHECKPOINT_EVERY * 3).await;
    write(300).await;
    let after = std::fs::metadata(&wal).unwrap().len();
    assert!(
        after <= grown + grown / 5,
        "the log grew from {grown} to {after} bytes: it was not checkpointed"
    );
    store.close().await;
}

#[tokio::test]
async fn stored_events_and_run_identities_cannot_be_changed_through_sql() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("f.db"), Durability::Process)
        .await
        .unwrap();
    let first = started(0).seal(&RunId::new("r1"), GENESIS_HASH);
    store
        .create_run(&new_run("r1", "t1"), std::slice::from_ref(&first), None)
        .await
        .unwrap();
    assert!(
        store
            .create_tenant(&TenantId::new("t1"), 1, "cli")
            .await
            .unwrap()
    );
    for forbidden in [
        "DELETE FROM events",
        "UPDATE events SET hash = 'x'",
        "UPDATE events SET payload = NULL",
        "UPDATE runs SET tenant = 't2'",
        "UPDATE runs SET parent_run_id = 'r0'",
        "DELETE FROM runs",
        "UPDATE admin_log SET actor = 'someone else'",
        "DELETE FROM admin_log",
    ] {
        let refused = store.write(move |c| Ok(c.execute(forbidden, [])?)).await;
        assert!(refused.is_err(), "{forbidden}");
    }
    // A refused write undoes only itself: the writer goes on.
    let second = started(1).seal(&RunId::new("r1"), &first.hash);
    store.append(&TenantId::new("t1"), &second).await.unwrap();
    assert_eq!(
        store
            .events(&TenantId::new("t1"), &RunId::new("r1"))
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(store.orphaned_logs().await.unwrap().is_empty());
    assert_eq!(store.admin_log(0, 10).await.unwrap().len(), 1);
}
