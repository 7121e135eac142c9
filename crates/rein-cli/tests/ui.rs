//! The dashboard at `/ui`, over HTTP as a browser uses it: signing in with a tenant key (a
//! session in the store; the HttpOnly, SameSite=Strict cookie holds the session's token, never
//! the key; signing out or revoking the key ends it), the runs list and its filters, a run's page showing
//! the very trace tree `rein runs show` prints, the approvals queue where approving a held run
//! lets it finish, the costs page, and one tenant never seeing another's run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use rein_fakes::ToolService;

const CONFIG: &str = "[prices.\"openai/gpt-4o-mini\"]\ninput = 10.0\noutput = 10.0\n\n[budgets]\ntenant_daily_usd = 1.0\n";

/// The text of the element `<tag id="id">…</tag>` in `html`, with HTML's escapes undone.
fn element(html: &str, tag: &str, id: &str) -> String {
    let open = format!("<{tag} id=\"{id}\">");
    let start = html
        .find(&open)
        .unwrap_or_else(|| panic!("no {open} in {html}"))
        + open.len();
    let end = start + html[start..].find(&format!("</{tag}>")).unwrap();
    html[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#x2f;", "/")
        .replace("&amp;", "&")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_shows_approves_and_keeps_tenants_apart() {
    let fake = common::paying_provider().await;
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rein.toml"), CONFIG).unwrap();
    common::open_loopback(dir.path());
    let key = common::tenant_key(dir.path(), "acme");
    let rival = common::tenant_key(dir.path(), "rival");
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db", "--config", "rein.toml"],
        &[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-test"),
        ],
    );
    let base = server.base.clone();
    let api = reqwest::Client::new();
    let (done_id, waiting_id) = common::paid_and_held_runs(&api, &base, &key, &service.url()).await;

    // A browser that has not signed in is sent to the sign-in page; a wrong key is refused.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let away = browser.get(format!("{base}/ui/runs")).send().await.unwrap();
    assert_eq!(away.status(), 303);
    assert_eq!(away.headers()["location"], "/ui/login");
    let wrong = browser
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={}", "rein_not-a-key"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.text().await.unwrap().contains("not an API key"));
    let signed = browser
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={}", key))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    assert!(
        cookie.contains("Max-Age=43200"),
        "a 12-hour session: {cookie}"
    );
    assert!(
        !cookie.contains(&key) && !cookie.contains(key.trim_start_matches("rein_")),
        "the cookie holds a session token, never the key: {cookie}"
    );
    let opens = |cookie: String| {
        let (browser, base) = (browser.clone(), base.clone());
        async move {
            let answer = browser
                .get(format!("{base}/ui/runs"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            match answer.status().as_u16() {
                200 => true,
                303 => {
                    assert_eq!(answer.headers()["location"], "/ui/login");
                    false
                }
                other => panic!("/ui/runs answered {other}"),
            }
        }
    };
    let session_of = |set_cookie: &str| set_cookie.split(';').next().unwrap().to_string();
    // Behind a proxy that ended HTTPS, the cookie is never to travel over plain HTTP. And
    // signing out ends the session in the store: a copy of its cookie opens nothing after.
    for (proto, secure) in [("https", true), ("HTTPS, http", true), ("http", false)] {
        let behind_tls = browser
            .post(format!("{base}/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-proto", proto)
            .body(format!("key={}", key))
            .send()
            .await
            .unwrap();
        let set = behind_tls.headers()["set-cookie"].to_str().unwrap();
        assert_eq!(set.ends_with("; Secure"), secure, "{proto}: {set}");
        let session = session_of(set);
        assert_ne!(
            session,
            session_of(&cookie),
            "every sign-in is a new session"
        );
        assert!(opens(session.clone()).await);
        let out = browser
            .post(format!("{base}/ui/logout"))
            .header("x-forwarded-proto", proto)
            .header("cookie", session.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(out.status(), 303);
        let cleared = out.headers()["set-cookie"].to_str().unwrap();
        assert!(cleared.contains("Max-Age=0"), "{cleared}");
        assert_eq!(cleared.ends_with("; Secure"), secure, "{proto}: {cleared}");
        assert!(!opens(session).await, "{proto}: signed out");
    }
    let cookie = session_of(&cookie);
    assert!(
        opens(cookie.clone()).await,
        "the first session is still open"
    );
    assert!(
        !opens(format!("rein_session={}", "0".repeat(64))).await,
        "a made-up token opens nothing"
    );
    let page = |path: String| {
        let (browser, cookie, base) = (browser.clone(), cookie.clone(), base.clone());
        async move {
            let answer = browser
                .get(format!("{base}{path}"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            (answer.status().as_u16(), answer.text().await.unwrap())
        }
    };
    let base = server.base.clone();

    // The runs, and their filters.
    let (status, runs) = page("/ui/runs".into()).await;
    assert_eq!(status, 200);
    assert!(
        runs.contains(&done_id) && runs.contains(&waiting_id),
        "{runs}"
    );
    let (_, completed) = page("/ui/runs?status=completed&agent=&user=&reason=".into()).await;
    assert!(completed.contains(&done_id) && !completed.contains(&waiting_id));
    let (_, by_reason) = page("/ui/runs?reason=max_cost".into()).await;
    assert!(!by_reason.contains(&done_id));
    let (_, by_agent) = page("/ui/runs?agent=held".into()).await;
    assert!(by_agent.contains(&waiting_id) && !by_agent.contains(&done_id));
    let done_run = common::get_json(&api, &format!("{base}/v1/runs/{done_id}"), &key).await;
    let session = done_run["session"].as_str().unwrap();
    let (_, by_session) = page(format!("/ui/runs?session={session}")).await;
    assert!(by_session.contains(&done_id), "{by_session}");
    let (_, no_session) = page("/ui/runs?session=no-such-session".into()).await;
    assert!(!no_session.contains(&done_id) && !no_session.contains(&waiting_id));

    // A run's page shows the tree `rein runs show` prints, character for character.
    let (status, run) = page(format!("/ui/runs/{done_id}")).await;
    assert_eq!(status, 200);
    let shown = common::rein_ok(
        dir.path(),
        &[
            "runs", "show", &done_id, "--tenant", "acme", "--db", "rein.db",
        ],
    );
    assert_eq!(element(&run, "pre", "tree").trim_end(), shown.trim_end());
    assert_eq!(element(&run, "td", "cost"), "0.001300");
    assert_eq!(element(&run, "td", "tokens"), "130");
    assert_eq!(element(&run, "td", "reason"), "completed");
    for kind in [
        "run_started",
        "model_responded",
        "tool_result",
        "run_finished",
    ] {
        assert!(run.contains(kind), "the timeline has no {kind}");
    }

    // Approving from the queue lets the held run finish, and pays once.
    let (_, queue) = page("/ui/approvals".into()).await;
    assert!(queue.contains(&waiting_id), "{queue}");
    let decided = browser
        .post(format!("{base}/ui/runs/{waiting_id}/approval"))
        .header("cookie", cookie.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .body("approved=true&reason=checked")
        .send()
        .await
        .unwrap();
    assert_eq!(decided.status(), 200);
    let decided = decided.text().await.unwrap();
    assert!(
        element(&decided, "p", "decided").contains("completed"),
        "{decided}"
    );
    assert!(decided.contains("No run is waiting for a person"));
    let after = common::get_json(&api, &format!("{base}/v1/runs/{waiting_id}"), &key).await;
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(service.applied().values().sum::<usize>(), 2);

    // Spend by day, agent and model.
    let (_, costs) = page("/ui/costs".into()).await;
    assert!(costs.contains("costs-agent") && costs.contains("held") && costs.contains("payer"));

    // The tenant's daily budget: two runs of $0.0013 each out of $1; the breakers it may see.
    let (_, status) = page("/ui/status".into()).await;
    let budgets = element(&status, "table", "budgets");
    assert!(
        budgets.contains("tenant:acme:") && budgets.contains("0.002600"),
        "{budgets}"
    );
    assert!(
        budgets.contains("1.000000") && budgets.contains("0.3 %"),
        "{budgets}"
    );
    let breakers = element(&status, "table", "breakers");
    assert!(breakers.contains("breaker:model:"), "{breakers}");
    assert!(
        breakers.contains("breaker:tool:acme:payer:pay"),
        "{breakers}"
    );
    assert!(
        breakers.contains("closed") && !breakers.contains("open<"),
        "{breakers}"
    );

    // Another tenant's cookie sees none of it.
    let theirs = browser
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={}", rival))
        .send()
        .await
        .unwrap();
    let theirs = theirs.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let peek = browser
        .get(format!("{base}/ui/runs/{done_id}"))
        .header("cookie", theirs.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(peek.status(), 404);
    let list = browser
        .get(format!("{base}/ui/runs"))
        .header("cookie", theirs.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!list.contains(&done_id));
    let status = browser
        .get(format!("{base}/ui/status"))
        .header("cookie", theirs.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!status.contains("breaker:tool:acme"), "{status}");

    // A run waiting for a person can be cancelled from its page (an ended one cannot). A form
    // sent from another site is refused before anything happens, as is another tenant.
    let held = common::run_waiting(
        &api,
        &base,
        &key,
        serde_json::json!({"agent": "held", "input": "pay 3"}),
        &[],
    )
    .await;
    let held_id = held["run_id"].as_str().unwrap().to_string();
    let (_, held_page) = page(format!("/ui/runs/{held_id}")).await;
    assert!(
        held_page.contains(&format!("action=\"/ui/runs/{held_id}/cancel\"")),
        "{held_page}"
    );
    assert!(!run.contains("id=\"cancel\""), "an ended run's page");
    let cancel = |cookie: String, headers: Vec<(&'static str, String)>| {
        let mut request = browser
            .post(format!("{base}/ui/runs/{held_id}/cancel"))
            .header("cookie", cookie);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move { request.send().await.unwrap() }
    };
    for forged in [
        ("sec-fetch-site", "cross-site".to_string()),
        ("sec-fetch-site", "same-site".to_string()),
        ("origin", "https://evil.example".to_string()),
        ("origin", "null".to_string()),
    ] {
        let answer = cancel(cookie.clone(), vec![forged.clone()]).await;
        assert_eq!(answer.status(), 403, "{forged:?}");
    }
    let answer = cancel(theirs.clone(), vec![]).await;
    assert_eq!(answer.status(), 404, "another tenant's run");
    let still = common::get_json(&api, &format!("{base}/v1/runs/{held_id}"), &key).await;
    assert_eq!(still["status"], "awaiting_approval", "{still}");
    let answer = cancel(cookie.clone(), vec![("origin", base.clone())]).await;
    assert_eq!(answer.status(), 303);
    assert_eq!(answer.headers()["location"], format!("/ui/runs/{held_id}"));
    let (_, cancelled) = page(format!("/ui/runs/{held_id}")).await;
    assert!(
        cancelled.contains("id=\"status\">cancelled<"),
        "{cancelled}"
    );
    assert!(cancelled.contains("cancelled by ui:acme"), "{cancelled}");
    assert!(!cancelled.contains("id=\"cancel\""));
    let again = cancel(cookie.clone(), vec![("origin", base.clone())]).await;
    assert_eq!(again.status(), 303, "a second click shows the ended run");

    // Revoking a key ends its sessions at once, even those of another process's dashboard.
    let rival_id = &rein_core::event::sha256_hex(rival.as_bytes())[..16];
    assert!(opens(theirs.clone()).await);
    common::rein_ok(
        dir.path(),
        &[
            "keys", "revoke", "--tenant", "rival", rival_id, "--db", "rein.db",
        ],
    );
    assert!(!opens(theirs).await, "revoked");
    assert!(opens(cookie).await, "another key's session stays open");
}
