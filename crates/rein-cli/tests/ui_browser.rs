//! The dashboard in a real browser: Debian's chromium, headless, driven by playwright-core
//! (`tests/ui_browser.mjs`) opens the runs list, a run's trace and the approvals page, and
//! approves a held run; the test then checks through the API that the run continued. The
//! screenshots are kept under the target directory (`target/tmp/ui-screenshots`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use rein_fakes::ToolService;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_approves_a_held_run_from_the_dashboard_in_a_browser() {
    let (Some(playwright), Some(chromium)) = (
        common::set_up_by_scripts_test("REIN_TEST_PLAYWRIGHT"),
        common::set_up_by_scripts_test("REIN_TEST_CHROMIUM"),
    ) else {
        return;
    };
    let fake = common::paying_provider().await;
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    common::open_loopback(dir.path());
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db"],
        &[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-test"),
        ],
    );
    let (base, http) = (server.base.clone(), reqwest::Client::new());
    let (done_id, held_id) = common::paid_and_held_runs(&http, &base, &key, &service.url()).await;

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ui_browser.mjs");
    let run = tokio::task::spawn_blocking({
        let (base, key, shots, held) = (base.clone(), key.clone(), shots.clone(), held_id.clone());
        move || {
            Command::new("node")
                .arg(script)
                .args([&base, &key, &done_id, &held])
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
    let after = common::get_json(&http, &format!("{base}/v1/runs/{held_id}"), &key).await;
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(service.applied().values().sum::<usize>(), 2);
    let trace = common::get_json(&http, &format!("{base}/v1/runs/{held_id}/trace"), &key).await;
    let decided = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "approval_decided")
        .unwrap();
    assert_eq!(decided["payload"]["by"], "ui:acme", "{decided}");
}
