//! Tenants, keys, secrets, agents, dashboard sessions and audit anchors.

use super::*;
use crate::{Store, api_key_id};
use rein_core::{RunId, TenantId};

/// A tenant's secrets: stored sealed (the store never sees a value), replaced, listed by name,
/// read back only by name and tenant, deleted; every change in the admin log, by name.
pub async fn tenant_secrets_are_kept_by_name_and_logged(store: &dyn Store) {
    let acme = TenantId::new("acme");
    let other = TenantId::new("other");
    assert!(
        !store
            .set_secret(&acme, "TOKEN", b"s1", 1, "cli")
            .await
            .unwrap(),
        "no such tenant yet"
    );
    store.create_tenant(&acme, 1, "cli").await.unwrap();
    store.create_tenant(&other, 1, "cli").await.unwrap();
    assert!(
        store
            .set_secret(&acme, "TOKEN", b"s1", 2, "cli")
            .await
            .unwrap()
    );
    assert!(
        store
            .set_secret(&acme, "TOKEN", b"s2", 3, "cli")
            .await
            .unwrap()
    );
    assert!(
        store
            .set_secret(&acme, "OTHER", b"o", 4, "cli")
            .await
            .unwrap()
    );
    let names: Vec<(String, i64)> = store
        .secret_names(&acme)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.updated_ms))
        .collect();
    assert_eq!(names, [("OTHER".to_string(), 4), ("TOKEN".to_string(), 3)]);
    let wanted = ["TOKEN".to_string(), "MISSING".to_string()];
    assert_eq!(
        store.sealed_secrets(&acme, &wanted).await.unwrap(),
        [("TOKEN".to_string(), b"s2".to_vec())]
    );
    assert!(
        store
            .sealed_secrets(&other, &wanted)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.delete_secret(&acme, "TOKEN", 5, "cli").await.unwrap());
    assert!(!store.delete_secret(&acme, "TOKEN", 6, "cli").await.unwrap());
    assert!(
        store
            .sealed_secrets(&acme, &wanted)
            .await
            .unwrap()
            .is_empty()
    );
    let log = store.admin_log(0, 100).await.unwrap();
    let secrets: Vec<(&str, Option<&str>)> = log
        .iter()
        .filter(|e| e.action.starts_with("secret"))
        .map(|e| (e.action.as_str(), e.key_id.as_deref()))
        .collect();
    assert_eq!(
        secrets,
        [
            ("secret_set", Some("TOKEN")),
            ("secret_set", Some("TOKEN")),
            ("secret_set", Some("OTHER")),
            ("secret_deleted", Some("TOKEN")),
        ]
    );
    rein_core::admin_log::verify_admin_log(&log, None).unwrap();
}

/// Audit anchors: the runs they cover come a page at a time in id order across tenants, with
/// the final head of each that had ended by the cutoff; anchors round-trip, one per position.
pub async fn audit_anchors_cover_runs_in_id_order_and_keep_their_place(store: &dyn Store) {
    let mut ended = Log::new(info("r1", "t2", "s", 1));
    ended.create(store, None).await;
    ended.append(store, finished(serde_json::json!("x"))).await;
    Log::new(info("r2", "t1", "s", 2)).create(store, None).await;
    Log::new(info("r3", "t1", "s", 50))
        .create(store, None)
        .await;
    let page = |after: Option<&'static str>, cutoff: i64| async move {
        let after = after.map(RunId::new);
        store.anchor_runs(cutoff, after.as_ref(), 1).await.unwrap()
    };
    let first = page(None, 10).await;
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].id.as_str(), first[0].tenant.as_str()),
        ("r1", "t2")
    );
    let head = ended.sealed.last().unwrap().hash.clone();
    assert_eq!(first[0].ended, Some((2, head)));
    let second = page(Some("r1"), 10).await;
    assert_eq!(
        (second[0].id.as_str(), second[0].ended.clone()),
        ("r2", None)
    );
    assert!(
        page(Some("r2"), 10).await.is_empty(),
        "r3 is after the cutoff"
    );
    // Ended after the cutoff: covered by its id alone.
    assert_eq!(page(None, 1).await[0].ended, None);

    let a0 =
        rein_core::anchor::Anchor::after(None, 100, 10, Some((3, "h".into())), (2, "d".into()));
    assert!(store.append_anchor(&a0).await.unwrap());
    assert!(
        !store.append_anchor(&a0).await.unwrap(),
        "one anchor per position"
    );
    let a1 = rein_core::anchor::Anchor::after(Some(&a0), 200, 110, None, (3, "e".into()));
    assert!(store.append_anchor(&a1).await.unwrap());
    assert_eq!(store.last_anchor().await.unwrap(), Some(a1.clone()));
    assert_eq!(store.anchors(0, 10).await.unwrap(), [a0, a1]);
}

pub async fn tenants_keys_and_versioned_agents(store: &dyn Store) {
    let acme = TenantId::new("acme");
    let other = TenantId::new("other");
    assert_eq!(store.admin_log_head().await.unwrap(), None, "an empty log");
    assert!(
        !store
            .add_api_key(&acme, "k1", 1, None, "cli")
            .await
            .unwrap(),
        "no such tenant yet"
    );
    assert!(store.create_tenant(&acme, 1, "cli").await.unwrap());
    assert!(
        !store.create_tenant(&acme, 2, "cli").await.unwrap(),
        "exists"
    );
    assert!(store.create_tenant(&other, 1, "cli").await.unwrap());
    assert!(
        store
            .add_api_key(&acme, "k1", 3, None, "cli")
            .await
            .unwrap()
    );
    let tenant_of = async |key: &str, now_ms: i64| {
        store
            .tenant_by_key(key, now_ms)
            .await
            .unwrap()
            .map(|grant| grant.tenant)
    };
    assert_eq!(tenant_of("k1", 3).await, Some(acme.clone()));
    assert_eq!(tenant_of("k2", 3).await, None);
    let k2 = "b".repeat(64);
    assert!(store.add_api_key(&acme, &k2, 4, None, "cli").await.unwrap());
    assert!(
        store
            .add_api_key(&other, &"c".repeat(64), 4, None, "cli")
            .await
            .unwrap()
    );
    let tenants: Vec<_> = store
        .registered_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name.as_str().to_string(), t.created_ms, t.keys))
        .collect();
    assert_eq!(
        tenants,
        [("acme".to_string(), 1, 2), ("other".to_string(), 1, 1)]
    );
    let keys = store.api_keys(&acme).await.unwrap();
    assert_eq!(
        keys.iter()
            .map(|k| (k.id.as_str(), k.created_ms))
            .collect::<Vec<_>>(),
        [("k1", 3), ("bbbbbbbbbbbbbbbb", 4)]
    );
    assert!(
        !store
            .revoke_api_key(&other, "bbbbbbbbbbbbbbbb", 9, "cli")
            .await
            .unwrap(),
        "another tenant's key is not revoked"
    );
    assert!(
        !store.revoke_api_key(&acme, "bbbb", 9, "cli").await.unwrap(),
        "a short id matches nothing"
    );
    assert!(
        store
            .revoke_api_key(&acme, "bbbbbbbbbbbbbbbb", 9, "cli")
            .await
            .unwrap()
    );
    assert_eq!(tenant_of(&k2, 9).await, None, "revoked");
    assert!(
        !store
            .revoke_api_key(&acme, "bbbbbbbbbbbbbbbb", 9, "cli")
            .await
            .unwrap()
    );
    assert_eq!(store.api_keys(&acme).await.unwrap().len(), 1);

    // Each change made, and only those, is in the admin log, in order, chained.
    let log = store.admin_log(0, 100).await.unwrap();
    let seen: Vec<_> = log
        .iter()
        .map(|e| {
            (
                e.seq,
                e.ts_ms,
                e.action.as_str(),
                e.tenant.as_str(),
                e.key_id.as_deref(),
                e.actor.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (0, 1, "tenant_created", "acme", None, "cli"),
            (1, 1, "tenant_created", "other", None, "cli"),
            (2, 3, "key_created", "acme", Some("k1"), "cli"),
            (3, 4, "key_created", "acme", Some("bbbbbbbbbbbbbbbb"), "cli"),
            (
                4,
                4,
                "key_created",
                "other",
                Some("cccccccccccccccc"),
                "cli"
            ),
            (5, 9, "key_revoked", "acme", Some("bbbbbbbbbbbbbbbb"), "cli"),
        ]
    );
    rein_core::admin_log::verify_admin_log(&log, None).unwrap();
    let tail = store.admin_log(4, 100).await.unwrap();
    assert_eq!(tail, log[4..]);
    assert!(store.admin_log(6, 100).await.unwrap().is_empty());
    assert_eq!(store.admin_log_head().await.unwrap(), Some(5));

    assert_eq!(
        store.register_agent(&acme, "a", "v: 1", 5).await.unwrap(),
        1
    );
    assert_eq!(
        store.register_agent(&acme, "a", "v: 2", 6).await.unwrap(),
        2
    );
    assert_eq!(
        store.register_agent(&acme, "b", "b: 1", 7).await.unwrap(),
        1
    );
    assert_eq!(
        store.register_agent(&other, "a", "o: 1", 8).await.unwrap(),
        1
    );
    let newest = store.agent(&acme, "a", None).await.unwrap().unwrap();
    assert_eq!((newest.version, newest.spec.as_str()), (2, "v: 2"));
    let first = store.agent(&acme, "a", Some(1)).await.unwrap().unwrap();
    assert_eq!(
        (first.version, first.spec.as_str(), first.created_ms),
        (1, "v: 1", 5)
    );
    assert!(store.agent(&acme, "a", Some(3)).await.unwrap().is_none());
    assert!(store.agent(&acme, "zzz", None).await.unwrap().is_none());
    let listed: Vec<_> = store
        .agents(&acme)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, a.version))
        .collect();
    assert_eq!(listed, [("a".to_string(), 2), ("b".to_string(), 1)]);
    let theirs = store.agent(&other, "a", None).await.unwrap().unwrap();
    assert_eq!(theirs.spec, "o: 1", "each tenant has its own agents");
}

pub async fn dashboard_sessions_end_at_sign_out_expiry_or_revocation(store: &dyn Store) {
    let (acme, other) = (TenantId::new("acme"), TenantId::new("other"));
    assert!(store.create_tenant(&acme, 1, "cli").await.unwrap());
    assert!(store.create_tenant(&other, 1, "cli").await.unwrap());
    let (key, other_key) = ("a".repeat(64), "c".repeat(64));
    assert!(
        store
            .add_api_key(&acme, &key, 1, None, "cli")
            .await
            .unwrap()
    );
    assert!(
        store
            .add_api_key(&other, &other_key, 1, None, "cli")
            .await
            .unwrap()
    );
    assert!(
        !store
            .open_dashboard_session("t0", &"d".repeat(64), 10, 100)
            .await
            .unwrap(),
        "no session for a key that does not exist"
    );
    assert!(
        store
            .open_dashboard_session("t1", &key, 10, 100)
            .await
            .unwrap()
    );
    assert!(
        store
            .open_dashboard_session("t2", &key, 10, 50)
            .await
            .unwrap()
    );
    assert!(
        store
            .open_dashboard_session("t3", &other_key, 10, 100)
            .await
            .unwrap()
    );
    assert_eq!(store.dashboard_session("t0", 20).await.unwrap(), None);
    assert_eq!(
        store.dashboard_session("t1", 20).await.unwrap(),
        Some(acme.clone())
    );
    assert_eq!(
        store.dashboard_session("t3", 20).await.unwrap(),
        Some(other.clone()),
        "each session signs in its own key's tenant"
    );
    assert_eq!(
        store.dashboard_session("t2", 50).await.unwrap(),
        None,
        "expired"
    );
    // Sweeping removes the expired ones and only those; so does opening a session, so the
    // table does not grow forever.
    assert!(
        store
            .open_dashboard_session("t5", &key, 10, 40)
            .await
            .unwrap()
    );
    assert_eq!(store.sweep_dashboard_sessions(45).await.unwrap(), 1);
    assert_eq!(store.sweep_dashboard_sessions(45).await.unwrap(), 0);
    assert_eq!(
        store.dashboard_session("t1", 45).await.unwrap(),
        Some(acme.clone())
    );
    assert!(
        store
            .open_dashboard_session("t4", &key, 60, 100)
            .await
            .unwrap()
    );
    assert!(!store.close_dashboard_session("t2").await.unwrap(), "swept");
    assert!(store.close_dashboard_session("t1").await.unwrap());
    assert!(!store.close_dashboard_session("t1").await.unwrap());
    assert_eq!(
        store.dashboard_session("t1", 20).await.unwrap(),
        None,
        "closed"
    );
    assert_eq!(
        store.dashboard_session("t4", 70).await.unwrap(),
        Some(acme.clone())
    );
    // Revoking the key ends its sessions, and only its own.
    assert!(
        store
            .revoke_api_key(&acme, api_key_id(&key), 9, "cli")
            .await
            .unwrap()
    );
    assert_eq!(store.dashboard_session("t4", 70).await.unwrap(), None);
    assert_eq!(
        store.dashboard_session("t3", 70).await.unwrap(),
        Some(other)
    );

    // A key valid until 200 authenticates, and signs sessions in, until then only.
    let brief = "e".repeat(64);
    assert!(
        store
            .add_api_key(&acme, &brief, 100, Some(200), "cli")
            .await
            .unwrap()
    );
    let grant = store.tenant_by_key(&brief, 199).await.unwrap().unwrap();
    assert_eq!((&grant.tenant, grant.expires_ms), (&acme, Some(200)));
    assert!(grant.valid_at(199) && !grant.valid_at(200));
    assert_eq!(
        store.tenant_by_key(&brief, 200).await.unwrap(),
        None,
        "expired"
    );
    let never = store
        .tenant_by_key(&other_key, 1 << 50)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        never.expires_ms, None,
        "a key without an expiry never expires"
    );
    let listed = store.api_keys(&acme).await.unwrap();
    assert_eq!(
        listed.iter().map(|k| k.expires_ms).collect::<Vec<_>>(),
        [Some(200)]
    );
    assert!(
        store
            .open_dashboard_session("t5", &brief, 150, 1000)
            .await
            .unwrap()
    );
    assert_eq!(
        store.dashboard_session("t5", 199).await.unwrap(),
        Some(acme.clone())
    );
    assert_eq!(
        store.dashboard_session("t5", 200).await.unwrap(),
        None,
        "a session ends when its key expires"
    );
    assert!(
        !store
            .open_dashboard_session("t6", &brief, 200, 1000)
            .await
            .unwrap(),
        "no session for an expired key"
    );
}
