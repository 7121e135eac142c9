//! Scale-out: queued runs (`rein run --detach`) executed by three `rein worker` processes on
//! one store (an SQLite file; PostgreSQL, the real server on 127.0.0.1), one of them killed
//! with SIGKILL midway. Every run finishes exactly once: the tool service saw each run's side
//! effect applied once, and no run was lost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::rein;
use rein_fakes::ToolService;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
responses:
  - tool_calls: [{name: pay, arguments: {n: 1}}]
  - text: paid
"#;

fn worker(dir: &Path, db: &str) -> Child {
    common::rein_command(dir)
        .args([
            "worker",
            "--until-idle",
            "--lease",
            "1s",
            "--script",
            "script.yaml",
        ])
        .args(["--db", db])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn three_workers_on_sqlite_one_killed_midway_finish_every_queued_run_exactly_once() {
    scale_out("runs.db", 60);
}

#[test]
fn three_workers_on_postgres_one_killed_midway_finish_300_queued_runs_exactly_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schema = rt
        .block_on(rein_store::testing::TestSchema::create())
        .expect("PostgreSQL must be running on 127.0.0.1:5432 (scripts/test starts it)");
    scale_out(&schema.url(), 300);
    rt.block_on(schema.drop_schema()).unwrap();
}

fn scale_out(db: &str, runs: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let service = rt.block_on(ToolService::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent.yaml"),
        common::payer_spec(&service.url(), 40, 4),
    )
    .unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();

    let mut queued = Vec::new();
    for i in 0..runs {
        let input = format!("payment {i}");
        let out = rein(
            dir.path(),
            &[
                "run",
                "agent.yaml",
                "--input",
                &input,
                "--detach",
                "--db",
                db,
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        queued.push(String::from_utf8(out.stdout).unwrap().trim().to_string());
    }
    let listed = rein(
        dir.path(),
        &["runs", "list", "--json", "--limit", "1000", "--db", db],
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "queued")
    );
    assert_eq!(service.hits("apply"), 0, "queued, not run");

    let mut workers: Vec<Child> = (0..3).map(|_| worker(dir.path(), db)).collect();
    let started = Instant::now();
    while service.applied().len() < runs / 4 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the workers made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = workers[0].kill(); // SIGKILL, possibly in the middle of a payment
    let _ = workers[0].wait();
    for w in &mut workers[1..] {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if w.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "a worker never went idle");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let listed = rein(
        dir.path(),
        &["runs", "list", "--json", "--limit", "1000", "--db", db],
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), runs);
    for run in listed {
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(run["tool_calls"], 1, "{run}");
    }
    let applied = service.applied();
    assert_eq!(
        applied.len(),
        runs,
        "one effect per run, none lost, none doubled"
    );
    for id in &queued {
        assert_eq!(applied.get(&format!("{id}:2")), Some(&1), "{id}");
    }
    assert!(
        service.hits("apply") <= runs + 1,
        "only a run cut off by the kill was called again (under its key): {} calls",
        service.hits("apply")
    );
    let out = rein(dir.path(), &["audit", "verify", "--db", db]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
