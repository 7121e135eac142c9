//! The dashboard in a real browser: Debian's chromium, headless, driven by playwright-core
//! (`tests/ui_browser.mjs`) opens the runs list, a run's trace and the approvals page, and
//! approves a held run; the test then checks through the API that the run continued. The
//! screenshots are kept under the target directory (`target/tmp/ui-screenshots`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use rein_fakes::ToolService;
use serde_json::json;
use std::process::Command;

/// `(playwright-core's directory, chromium's path)` (`REIN_TEST_PLAYWRIGHT`, `REIN_TEST_CHROMIUM`,
/// which `scripts/test` sets up); `None` to skip where they are not required.
fn browser() -> Option<(String, String)> {
    match (
        std::env::var("REIN_TEST_PLAYWRIGHT"),
        std::env::var("REIN_TEST_CHROMIUM"),
    ) {
        (Ok(pw), Ok(chromium)) if !pw.is_empty() && !chromium.is_empty() => Some((pw, chromium)),
        _ => {
            assert!(
                std::env::var("REIN_TEST_PYTHON_REQUIRED").as_deref() != Ok("1"),
                "scripts/test sets REIN_TEST_PLAYWRIGHT and REIN_TEST_CHROMIUM; they are missing"
            );
            eprintln!("skipped: the browser is set up by scripts/test");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_approves_a_held_run_from_the_dashboard_in_a_browser() {
    let Some((playwright, chromium)) = browser() else {
        return;
    };
    let fake = common::paying_provider().await;
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db"],
        &[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-test"),
        ],
    );
    let (base, http) = (server.base.clone(), reqwest::Client::new());
    let payer = common::payer_spec(&service.url(), 5, 4);
    common::register(&http, &base, &key, &payer).await;
    let held = payer.replace("name: payer", "name: held").replace(
        "side_effects: external}",
        "side_effects: external, confirm: true}",
    );
    common::register(&http, &base, &key, &held).await;
    let done = common::run_waiting(
        &http,
        &base,
        &key,
        json!({"agent": "payer", "input": "pay 1"}),
        &[],
    )
    .await;
    let waiting = common::run_waiting(
        &http,
        &base,
        &key,
        json!({"agent": "held", "input": "pay 2"}),
        &[],
    )
    .await;
    assert_eq!(waiting["status"], "awaiting_approval", "{waiting}");
    let (done_id, held_id) = (
        done["run_id"].as_str().unwrap().to_string(),
        waiting["run_id"].as_str().unwrap().to_string(),
    );

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ui_browser.mjs");
    let run = tokio::task::spawn_blocking({
        let (base, key, shots) = (base.clone(), key.clone(), shots.clone());
        move || {
            Command::new("node")
                .arg(script)
                .args([&base, &key, &done_id, &held_id])
                .arg(&shots)
                .env("PLAYWRIGHT_CORE", playwright)
                .env("CHROMIUM", chromium)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        run.status.success(),
        "the browser script failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    for name in [
        "1-sign-in",
        "2-runs",
        "3-trace",
        "4-approvals",
        "5-approved",
        "6-status",
    ] {
        let png = shots.join(format!("{name}.png"));
        assert!(
            std::fs::metadata(&png).is_ok_and(|m| m.len() > 1000),
            "no screenshot {png:?}"
        );
    }
    // The decision made in the browser drove the run on: it finished and paid once.
    let after = common::get_json(
        &http,
        &format!("{base}/v1/runs/{}", waiting["run_id"].as_str().unwrap()),
        &key,
    )
    .await;
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(service.applied().values().sum::<usize>(), 2);
    let trace = common::get_json(
        &http,
        &format!(
            "{base}/v1/runs/{}/trace",
            waiting["run_id"].as_str().unwrap()
        ),
        &key,
    )
    .await;
    let decided = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "approval_decided")
        .unwrap();
    assert_eq!(decided["payload"]["by"], "ui:acme", "{decided}");
}
