//! Tenant and key management (the admin API and `rein tenants` / `rein keys`), and the
//! `[server]` table's request limits, against `rein serve` as a process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const ADMIN_KEY: &str = "admin-key-for-tests-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_key_manages_tenants_and_keys_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db"],
        &[("REIN_ADMIN_KEY", ADMIN_KEY), ("REIN_LOG_FORMAT", "json")],
    );
    let base = &server.base;
    let http = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{base}/v1/admin{path}"))
            .bearer_auth(ADMIN_KEY)
    };

    // Nobody else gets in. (Each answer names its request: the client's id when it is a plain
    // token, else a new one.)
    let anonymous = http
        .get(format!("{base}/v1/admin/tenants"))
        .header("x-request-id", "anon-request-1")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["x-request-id"], "anon-request-1");
    let problem: Value = anonymous.json().await.unwrap();
    assert_eq!(problem["request_id"], "anon-request-1", "{problem}");
    let wrong = http
        .get(format!("{base}/v1/admin/tenants"))
        .bearer_auth("not-the-admin-key")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.headers()["content-type"], "application/problem+json");
    let wrong_id = wrong.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(wrong_id.len(), 36, "a UUID: {wrong_id}");
    for odd in ["has spaces in it", &"x".repeat(129)] {
        let answer = http
            .get(format!("{base}/healthz"))
            .header("x-request-id", odd)
            .send()
            .await
            .unwrap();
        let named = answer.headers()["x-request-id"].to_str().unwrap();
        assert!(
            named != odd && named.len() == 36 && named != wrong_id,
            "{named}"
        );
    }

    // Tenants: created once, named strictly.
    let created = admin(reqwest::Method::POST, "/tenants")
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let again = admin(reqwest::Method::POST, "/tenants")
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["created"], false);
    let bad = admin(reqwest::Method::POST, "/tenants")
        .json(&json!({"name": "a b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let unknown_field = admin(reqwest::Method::POST, "/tenants")
        .json(&json!({"name": "x", "plan": "gold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_field.status(), 422);

    // A key, shown once, that works for its tenant and not as the admin key.
    let issued: Value = admin(reqwest::Method::POST, "/tenants/acme/keys")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = issued["key"].as_str().unwrap().to_string();
    let id = issued["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 16);
    assert!(key.starts_with("rein_"));
    let agents = http
        .get(format!("{base}/v1/agents"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(agents.status(), 200);
    let as_admin = http
        .get(format!("{base}/v1/admin/tenants"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        as_admin.status(),
        401,
        "a tenant's key is not the admin key"
    );
    let no_tenant = admin(reqwest::Method::POST, "/tenants/nobody/keys")
        .send()
        .await
        .unwrap();
    assert_eq!(no_tenant.status(), 404);

    // Listed by id, never by key or whole hash.
    let tenants: Value = admin(reqwest::Method::GET, "/tenants")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tenants[0]["name"], "acme");
    assert_eq!(tenants[0]["keys"], 1);
    let keys = admin(reqwest::Method::GET, "/tenants/acme/keys")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(keys.contains(&id) && !keys.contains(&key), "{keys}");
    let missing = admin(reqwest::Method::GET, "/tenants/nobody/keys")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // A key may be given a lifetime, shown when made and when listed; a wrong one changes
    // nothing.
    let before = admin(reqwest::Method::GET, "/tenants/acme/keys")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    for bad in [
        json!({"expires_in": "5s"}),
        json!({"expires_in": "0d"}),
        json!({"expires_in": "90d", "scope": "read"}),
    ] {
        let refused = admin(reqwest::Method::POST, "/tenants/acme/keys")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 422, "{bad}");
    }
    let brief: Value = admin(reqwest::Method::POST, "/tenants/acme/keys")
        .json(&json!({"expires_in": "90d"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expires_at = brief["expires_at"].as_str().unwrap().to_string();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let in_90_days = rein_core::time::format_utc(now_ms + 90 * 86_400_000)[..10].to_string();
    assert!(
        expires_at.starts_with(&in_90_days),
        "{expires_at} vs {in_90_days}"
    );
    let brief_works = http
        .get(format!("{base}/v1/agents"))
        .bearer_auth(brief["key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(brief_works.status(), 200);
    let listed = admin(reqwest::Method::GET, "/tenants/acme/keys")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        before.as_array().unwrap().len() + 1
    );
    let listed_brief = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == brief["id"])
        .unwrap();
    assert_eq!(listed_brief["expires_at"], expires_at.as_str());
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .unwrap()
            .get("expires_at")
            .is_none(),
        "a key made without a lifetime never expires"
    );
    let brief_id = brief["id"].as_str().unwrap().to_string();
    assert_eq!(
        admin(
            reqwest::Method::DELETE,
            &format!("/tenants/acme/keys/{brief_id}")
        )
        .send()
        .await
        .unwrap()
        .status(),
        204
    );

    // Revoked: the key signs in no more.
    let revoked = admin(reqwest::Method::DELETE, &format!("/tenants/acme/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let after = http
        .get(format!("{base}/v1/agents"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);
    let twice = admin(reqwest::Method::DELETE, &format!("/tenants/acme/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 404);

    // The log says who may now call Rein and who tried the admin API without its key: one line
    // per change, under its own target, by key id, never with a key.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let admin_lines = loop {
        let logs = server.logs.lock().unwrap().clone();
        let lines: Vec<Value> = logs
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["target"] == "rein::admin")
            .collect();
        if lines.len() >= 8 || std::time::Instant::now() > deadline {
            for line in &logs {
                assert!(!line.contains(&key) && !line.contains(ADMIN_KEY), "{line}");
            }
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let said: Vec<(&str, &str, &str, &str)> = admin_lines
        .iter()
        .map(|l| {
            let field = |name: &str| l[name].as_str().unwrap_or("");
            (
                field("level"),
                field("message"),
                field("tenant"),
                field("key_id"),
            )
        })
        .collect();
    assert_eq!(
        said,
        [
            ("WARN", "admin request refused: no key", "", ""),
            ("WARN", "admin request refused: not the admin key", "", ""),
            ("INFO", "tenant created", "acme", ""),
            ("INFO", "key created", "acme", id.as_str()),
            ("WARN", "admin request refused: not the admin key", "", ""),
            ("INFO", "key created", "acme", brief_id.as_str()),
            ("INFO", "key revoked", "acme", brief_id.as_str()),
            ("INFO", "key revoked", "acme", id.as_str()),
        ],
        "{admin_lines:#?}"
    );
    assert_eq!(admin_lines[0]["path"], "/v1/admin/tenants");
    assert_eq!(admin_lines[1]["path"], "/v1/admin/tenants");
    // Each line names the request it was written for.
    let request_of = |line: &Value| line["spans"][0]["request_id"].clone();
    assert_eq!(
        request_of(&admin_lines[0]),
        "anon-request-1",
        "{:#}",
        admin_lines[0]
    );
    assert_eq!(request_of(&admin_lines[1]), wrong_id.as_str());
    assert!(request_of(&admin_lines[2]).as_str().unwrap().len() == 36);
    drop(server);

    // The CLI sees what the API did, and does the same.
    let listed: Value = serde_json::from_str(&common::rein_ok(
        dir.path(),
        &["tenants", "list", "--json", "--db", "rein.db"],
    ))
    .unwrap();
    assert_eq!(listed[0]["name"], "acme");
    assert_eq!(listed[0]["keys"], 0);
    common::rein_ok(
        dir.path(),
        &["keys", "create", "--tenant", "acme", "--db", "rein.db"],
    );
    let keys: Value = serde_json::from_str(&common::rein_ok(
        dir.path(),
        &[
            "keys", "list", "--tenant", "acme", "--json", "--db", "rein.db",
        ],
    ))
    .unwrap();
    let id = keys[0]["id"].as_str().unwrap().to_string();
    common::rein_ok(
        dir.path(),
        &["keys", "revoke", "--tenant", "acme", &id, "--db", "rein.db"],
    );
    let out = common::rein(
        dir.path(),
        &["keys", "revoke", "--tenant", "acme", &id, "--db", "rein.db"],
    );
    assert_eq!(out.status.code(), Some(2));
    let out = common::rein(
        dir.path(),
        &["keys", "list", "--tenant", "nobody", "--db", "rein.db"],
    );
    assert_eq!(out.status.code(), Some(2));
    let brief = common::rein(
        dir.path(),
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--expires-in",
            "12h",
            "--db",
            "rein.db",
        ],
    );
    assert!(brief.status.success());
    let said = String::from_utf8_lossy(&brief.stderr);
    assert!(said.contains("valid until"), "{said}");
    let listed = common::rein_ok(
        dir.path(),
        &["keys", "list", "--tenant", "acme", "--db", "rein.db"],
    );
    assert!(listed.contains("  expires "), "{listed}");
    let out = common::rein(
        dir.path(),
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--expires-in",
            "4000d",
            "--db",
            "rein.db",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--expires-in"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_log_records_every_change_chained_and_the_audit_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db"],
        &[("REIN_ADMIN_KEY", ADMIN_KEY)],
    );
    let base = &server.base;
    let http = reqwest::Client::new();
    let admin = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{base}/v1/admin{path}"))
            .bearer_auth(ADMIN_KEY)
    };
    for tenant in ["acme", "zebra-co"] {
        let created = admin(reqwest::Method::POST, "/tenants")
            .json(&json!({ "name": tenant }))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
    }
    let issued: Value = admin(reqwest::Method::POST, "/tenants/acme/keys")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key, id) = (
        issued["key"].as_str().unwrap(),
        issued["id"].as_str().unwrap(),
    );
    let revoked = admin(reqwest::Method::DELETE, &format!("/tenants/acme/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    // Changes that change nothing are not entries.
    let again = admin(reqwest::Method::DELETE, &format!("/tenants/acme/keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);

    let log: Value = admin(reqwest::Method::GET, "/log")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["ok"], true, "{log}");
    assert!(log.get("next").is_none(), "{log}");
    let entries: Vec<(u64, &str, &str, &str, &str)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["action"].as_str().unwrap(),
                e["tenant"].as_str().unwrap(),
                e["key_id"].as_str().unwrap_or(""),
                e["actor"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (0, "tenant_created", "acme", "", "admin_api"),
            (1, "tenant_created", "zebra-co", "", "admin_api"),
            (2, "key_created", "acme", id, "admin_api"),
            (3, "key_revoked", "acme", id, "admin_api"),
        ]
    );
    assert!(!log.to_string().contains(key), "never the key");
    // A page at a time, each page checked against the entry before it.
    let first: Value = admin(reqwest::Method::GET, "/log?limit=2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["entries"].as_array().unwrap().len(), 2);
    assert_eq!(first["next"], 1, "{first}");
    let rest: Value = admin(reqwest::Method::GET, "/log?after=1&limit=2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&rest["ok"], &rest["entries"][0]["seq"]),
        (&json!(true), &json!(2))
    );
    assert!(rest.get("next").is_none(), "{rest}");
    assert_eq!(rest["entries"][0]["prev_hash"], log["entries"][1]["hash"]);
    for (path, status) in [("/log?after=4", 404), ("/log?limit=many", 400)] {
        let answer = admin(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(answer.status(), status, "{path}");
    }
    let tenant_key = common::tenant_key(dir.path(), "beta");
    for bearer in [None, Some(tenant_key.as_str())] {
        let mut request = http.get(format!("{base}/v1/admin/log"));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        assert_eq!(request.send().await.unwrap().status(), 401, "{bearer:?}");
    }
    drop(server);

    // The CLI's changes are entries too, by the user who made them; the operator's audit checks
    // the whole log.
    let by_alice = common::rein_command(dir.path())
        .env("USER", "alice")
        .args(["tenants", "create", "gamma", "--db", "rein.db"])
        .output()
        .unwrap();
    assert!(by_alice.status.success());
    let audit = || {
        let out = common::rein(
            dir.path(),
            &["audit", "verify", "--all-tenants", "--db", "rein.db"],
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, stdout) = audit();
    assert_eq!(code, Some(0), "{stdout}");
    // beta's tenant and key (made by tenant_key through the CLI), then gamma.
    assert!(stdout.contains("7 admin log entries"), "{stdout}");
    // An entry altered in the file is found, by position.
    let db = dir.path().join("rein.db");
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(
        bytes.windows(9).any(|w| w == b"cli:alice"),
        "the CLI's change is recorded as alice's"
    );
    let needle = b"zebra-co";
    let copies: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| w == needle)
        .map(|(at, _)| at)
        .collect();
    assert!(!copies.is_empty());
    for at in copies {
        bytes[at] = b'Z';
    }
    std::fs::write(&db, &bytes).unwrap();
    let (code, stdout) = audit();
    assert_eq!(code, Some(6), "{stdout}");
    assert!(
        stdout.contains("TAMPERED admin log entry 1: its fields do not match its hash"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_key_made_by_the_cli_works_through_its_hash_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::rein(dir.path(), &["keys", "create", "--admin"]);
    assert_eq!(out.status.code(), Some(0));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let hash_line = stderr
        .lines()
        .find(|l| l.starts_with("admin_key_sha256 = "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(!stderr.contains(&key), "the key is shown once, on stdout");
    std::fs::write(
        dir.path().join("rein.toml"),
        format!("[server]\n{hash_line}\n"),
    )
    .unwrap();
    let server = common::serve(dir.path(), &["--db", "rein.db"], &[]);
    let http = reqwest::Client::new();
    let tenants = http
        .get(format!("{}/v1/admin/tenants", server.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(tenants.status(), 200);
    drop(server);

    // The key itself in the config is refused, naming the field.
    std::fs::write(
        dir.path().join("rein.toml"),
        format!("[server]\nadmin_key_sha256 = \"{key}\"\n"),
    )
    .unwrap();
    let out = common::rein(dir.path(), &["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("server.admin_key_sha256"), "{stderr}");
    assert!(!stderr.contains(&key), "the key is not echoed: {stderr}");
}

/// The server remembers keys for 10 s, yet a key revoked by another process (here the CLI)
/// stops working there within about a second: the server watches the admin log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_by_the_cli_stops_working_in_a_running_server_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = common::serve(dir.path(), &["--db", "rein.db"], &[]);
    let http = reqwest::Client::new();
    let runs = || {
        http.get(format!("{}/v1/runs", server.base))
            .bearer_auth(&key)
            .send()
    };
    assert_eq!(
        runs().await.unwrap().status(),
        200,
        "remembered from now on"
    );
    let keys: Value = serde_json::from_str(&common::rein_ok(
        dir.path(),
        &[
            "keys", "list", "--tenant", "acme", "--json", "--db", "rein.db",
        ],
    ))
    .unwrap();
    let id = keys[0]["id"].as_str().unwrap();
    common::rein_ok(
        dir.path(),
        &["keys", "revoke", "--tenant", "acme", id, "--db", "rein.db"],
    );
    let revoked = Instant::now();
    loop {
        let status = runs().await.unwrap().status();
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < Duration::from_secs(4),
            "the revoked key still works after {:?}",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_key_the_admin_api_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::serve(dir.path(), &["--db", "rein.db"], &[]);
    let answer = reqwest::Client::new()
        .get(format!("{}/v1/admin/tenants", server.base))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    let problem: Value = answer.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("REIN_ADMIN_KEY"),
        "{problem}"
    );
}

#[test]
fn a_request_is_bounded_in_size_and_in_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rein.toml"),
        "[server]\nrequest_timeout = \"1s\"\nbody_timeout = \"1s\"\nmax_body_bytes = 2048\n",
    )
    .unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = common::serve(dir.path(), &["--db", "rein.db"], &[]);
    let address = server.base.trim_start_matches("http://").to_string();

    // A body over `max_body_bytes`: 413.
    let big = format!("{{\"agent\": \"a\", \"input\": \"{}\"}}", "x".repeat(4096));
    let answer = raw(
        &address,
        &format!(
            "POST /v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
            big.len()
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A client that never finishes its body is cut off after `body_timeout`.
    let started = Instant::now();
    let answer = raw(
        &address,
        &format!(
            "POST /v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/yaml\r\nContent-Length: 1000\r\nConnection: close\r\n\r\nname: half"
        ),
    );
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}

/// Writes `request` to a new connection to `address` and reads the answer until the server
/// closes it (or 15 s pass).
fn raw(address: &str, request: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}
