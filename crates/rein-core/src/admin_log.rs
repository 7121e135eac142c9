//! The admin log: every tenant created and every API key created or revoked, by whom and when,
//! hash-chained like a run's events, so a removed, inserted or altered entry is found.
//!
//! A store appends an entry in the same transaction as the change it records (a change is
//! never made without its entry, nor an entry without its change); this module only defines
//! the entry, its hash and the check.

use crate::event::{ChainBreak, GENESIS_HASH};
use sha2::{Digest, Sha256};

/// What an admin change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAction {
    /// A tenant was created.
    TenantCreated,
    /// An API key was created for a tenant.
    KeyCreated,
    /// One of a tenant's API keys was revoked.
    KeyRevoked,
    /// A tenant's secret was set (stored or replaced; its name is the entry's `key_id`, its
    /// value is never logged).
    SecretSet,
    /// A tenant's secret was deleted (its name is the entry's `key_id`).
    SecretDeleted,
}

impl AdminAction {
    /// The name stored and shown: `tenant_created`, `key_created`, `key_revoked`,
    /// `secret_set`, `secret_deleted`.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminAction::TenantCreated => "tenant_created",
            AdminAction::KeyCreated => "key_created",
            AdminAction::KeyRevoked => "key_revoked",
            AdminAction::SecretSet => "secret_set",
            AdminAction::SecretDeleted => "secret_deleted",
        }
    }
}

/// A change to record: what, to which tenant and key, and who asked for it (`cli`,
/// `admin_api`, ...).
#[derive(Clone, Copy, Debug)]
pub struct AdminChange<'a> {
    /// What.
    pub action: AdminAction,
    /// The tenant changed.
    pub tenant: &'a str,
    /// The key's id (the first 16 hex digits of its SHA-256), for key changes; the secret's
    /// name, for secret changes.
    pub key_id: Option<&'a str>,
    /// Who asked for it.
    pub actor: &'a str,
}

/// One entry of the admin log, as stored. Fields are kept as stored text, so an entry altered
/// into something no change could have made still reads, and fails the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminEntry {
    /// Position in the log: 0, 1, 2, ...
    pub seq: u64,
    /// When, ms since the epoch.
    pub ts_ms: i64,
    /// What ([`AdminAction::as_str`]).
    pub action: String,
    /// The tenant changed.
    pub tenant: String,
    /// The key's id, for key changes.
    pub key_id: Option<String>,
    /// Who asked for it.
    pub actor: String,
    /// The hash of the entry before (the genesis hash for the first).
    pub prev_hash: String,
    /// This entry's hash ([`admin_hash`]).
    pub hash: String,
}

impl AdminEntry {
    /// The entry recording `change` at `seq` and `ts_ms`, after the entry whose hash is
    /// `prev_hash`.
    fn new(change: &AdminChange<'_>, seq: u64, ts_ms: i64, prev_hash: &str) -> AdminEntry {
        let mut entry = AdminEntry {
            seq,
            ts_ms,
            action: change.action.as_str().to_string(),
            tenant: change.tenant.to_string(),
            key_id: change.key_id.map(str::to_string),
            actor: change.actor.to_string(),
            prev_hash: prev_hash.to_string(),
            hash: String::new(),
        };
        entry.hash = admin_hash(&entry);
        entry
    }

    /// The entry that follows the log's last, `(seq, hash)` (or starts the log), recording
    /// `change` at `ts_ms`.
    pub fn after(last: Option<(u64, &str)>, change: &AdminChange<'_>, ts_ms: i64) -> AdminEntry {
        match last {
            Some((seq, hash)) => AdminEntry::new(change, seq + 1, ts_ms, hash),
            None => AdminEntry::new(change, 0, ts_ms, GENESIS_HASH),
        }
    }
}

/// The hash of an entry: every field but the hash itself, under a fixed, versioned layout
/// (`rein-admin-v1`): changing it would break the check of every stored log.
pub fn admin_hash(entry: &AdminEntry) -> String {
    let mut h = Sha256::new();
    h.update(b"rein-admin-v1\n");
    for part in [
        &entry.seq.to_string(),
        &entry.ts_ms.to_string(),
        entry.action.as_str(),
        entry.tenant.as_str(),
        entry.key_id.as_deref().unwrap_or(""),
        entry.actor.as_str(),
        entry.prev_hash.as_str(),
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    crate::event::hex(&h.finalize())
}

/// Checks a stretch of the log: consecutive positions, each entry linked to the one before and
/// matching its hash. `before` is the entry just before the stretch (`None` when the stretch
/// starts the log), so a log checked a page at a time is checked whole.
pub fn verify_admin_log(
    entries: &[AdminEntry],
    before: Option<&AdminEntry>,
) -> Result<(), ChainBreak> {
    let (mut seq, mut prev) = match before {
        Some(b) => (b.seq + 1, b.hash.as_str()),
        None => (0, GENESIS_HASH),
    };
    for entry in entries {
        let fail = |reason: &str| ChainBreak {
            seq: entry.seq,
            reason: reason.to_string(),
        };
        if entry.seq != seq {
            return Err(ChainBreak {
                seq,
                reason: format!(
                    "expected admin entry {seq} here, found entry {} (an entry was removed or reordered)",
                    entry.seq
                ),
            });
        }
        if entry.prev_hash != prev {
            return Err(fail(
                "its link to the entry before does not match (an entry was removed, inserted or reordered)",
            ));
        }
        if admin_hash(entry) != entry.hash {
            return Err(fail(
                "its fields do not match its hash (the time, action, tenant, key or author was altered)",
            ));
        }
        seq += 1;
        prev = &entry.hash;
    }
    Ok(())
}

/// What the admin log says exists now, folded from its entries: the tenants, and each tenant's
/// keys and secrets with whether they are live. Held against what the store holds, it finds a
/// tenant, key or secret written into the database without its entry (a key inserted by hand
/// authenticates), and one removed or revoked behind the log's back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    tenants: std::collections::BTreeSet<String>,
    /// (tenant, key id) → live.
    keys: std::collections::BTreeMap<(String, String), bool>,
    /// (tenant, name) → live.
    secrets: std::collections::BTreeMap<(String, String), bool>,
}

/// What the store holds of what the admin log records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Tenant names.
    pub tenants: Vec<String>,
    /// (tenant, key id) of every stored key.
    pub keys: Vec<(String, String)>,
    /// (tenant, name) of every stored secret.
    pub secrets: Vec<(String, String)>,
}

impl Recorded {
    /// Takes in one more entry, in log order.
    pub fn fold(&mut self, entry: &AdminEntry) {
        let subject = || {
            (
                entry.tenant.clone(),
                entry.key_id.clone().unwrap_or_default(),
            )
        };
        match entry.action.as_str() {
            "tenant_created" => {
                self.tenants.insert(entry.tenant.clone());
            }
            "key_created" => {
                self.keys.insert(subject(), true);
            }
            "key_revoked" => {
                self.keys.insert(subject(), false);
            }
            "secret_set" => {
                self.secrets.insert(subject(), true);
            }
            "secret_deleted" => {
                self.secrets.insert(subject(), false);
            }
            _ => {}
        }
    }

    /// Each disagreement between the log and what the store `held`, as a line for the audit.
    pub fn compare(&self, held: &Held) -> Vec<String> {
        let mut problems = Vec::new();
        for tenant in &held.tenants {
            if !self.tenants.contains(tenant) {
                problems.push(format!(
                    "tenant {tenant} is stored without its admin log entry (it was added outside Rein)"
                ));
            }
        }
        let mut stored_keys = std::collections::BTreeSet::new();
        for (tenant, id) in &held.keys {
            stored_keys.insert((tenant.clone(), id.clone()));
            match self.keys.get(&(tenant.clone(), id.clone())) {
                None => problems.push(format!(
                    "key {id} of tenant {tenant} is stored without its admin log entry (it was added outside Rein, and authenticates)"
                )),
                Some(false) => problems.push(format!(
                    "key {id} of tenant {tenant} was revoked in the admin log but is still stored"
                )),
                Some(true) => {}
            }
        }
        for ((tenant, id), live) in &self.keys {
            if *live && !stored_keys.contains(&(tenant.clone(), id.clone())) {
                problems.push(format!(
                    "key {id} of tenant {tenant} is live in the admin log but missing from the store (removed outside Rein)"
                ));
            }
        }
        let mut stored_secrets = std::collections::BTreeSet::new();
        for (tenant, name) in &held.secrets {
            stored_secrets.insert((tenant.clone(), name.clone()));
            if self.secrets.get(&(tenant.clone(), name.clone())) != Some(&true) {
                problems.push(format!(
                    "secret {name} of tenant {tenant} is stored without a live admin log entry (it was set outside Rein)"
                ));
            }
        }
        for ((tenant, name), live) in &self.secrets {
            if *live && !stored_secrets.contains(&(tenant.clone(), name.clone())) {
                problems.push(format!(
                    "secret {name} of tenant {tenant} is set in the admin log but missing from the store (removed outside Rein)"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn log(n: usize) -> Vec<AdminEntry> {
        let mut entries: Vec<AdminEntry> = Vec::new();
        for i in 0..n {
            let tenant = format!("t{i}");
            let change = AdminChange {
                action: if i % 2 == 0 {
                    AdminAction::TenantCreated
                } else {
                    AdminAction::KeyCreated
                },
                tenant: &tenant,
                key_id: (i % 2 == 1).then_some("0123456789abcdef"),
                actor: "cli",
            };
            let last = entries.last().map(|e| (e.seq, e.hash.as_str()));
            let entry = AdminEntry::after(last, &change, 1000 + i as i64);
            entries.push(entry);
        }
        entries
    }

    #[test]
    fn an_intact_log_verifies_whole_and_a_page_at_a_time() {
        let entries = log(5);
        assert_eq!(entries[0].prev_hash, GENESIS_HASH);
        assert_eq!(entries[4].seq, 4);
        verify_admin_log(&entries, None).unwrap();
        verify_admin_log(&entries[2..], Some(&entries[1])).unwrap();
        verify_admin_log(&[], Some(&entries[4])).unwrap();
    }

    #[test]
    fn every_kind_of_tampering_is_found_at_its_entry() {
        let entries = log(4);
        let altered = |change: &dyn Fn(&mut Vec<AdminEntry>)| {
            let mut copy = entries.clone();
            change(&mut copy);
            verify_admin_log(&copy, None).unwrap_err()
        };
        let tenant = altered(&|e| e[2].tenant = "other".into());
        assert_eq!(tenant.seq, 2, "{tenant}");
        assert!(tenant.reason.contains("altered"), "{tenant}");
        let actor = altered(&|e| e[1].actor = "admin_api".into());
        assert_eq!(actor.seq, 1);
        let key = altered(&|e| e[3].key_id = None);
        assert_eq!(key.seq, 3);
        let removed = altered(&|e| {
            e.remove(1);
        });
        assert_eq!(removed.seq, 1, "{removed}");
        assert!(removed.reason.contains("removed"), "{removed}");
        // A removed entry with the rest renumbered and rehashed still breaks the link.
        let rewritten = altered(&|e| {
            e.remove(1);
            for (i, entry) in e.iter_mut().enumerate().skip(1) {
                entry.seq = i as u64;
                entry.hash = admin_hash(entry);
            }
        });
        assert_eq!(rewritten.seq, 1, "{rewritten}");
        assert!(rewritten.reason.contains("link"), "{rewritten}");
        let wrong_start = verify_admin_log(&entries[1..], None).unwrap_err();
        assert_eq!(wrong_start.seq, 0);
    }

    #[test]
    fn what_the_store_holds_is_held_against_what_the_log_records() {
        let mut entries: Vec<AdminEntry> = Vec::new();
        for (action, tenant, key) in [
            (AdminAction::TenantCreated, "acme", None),
            (AdminAction::KeyCreated, "acme", Some("aaaaaaaaaaaaaaaa")),
            (AdminAction::KeyCreated, "acme", Some("bbbbbbbbbbbbbbbb")),
            (AdminAction::KeyRevoked, "acme", Some("bbbbbbbbbbbbbbbb")),
            (AdminAction::SecretSet, "acme", Some("TOKEN")),
        ] {
            let change = AdminChange {
                action,
                tenant,
                key_id: key,
                actor: "cli",
            };
            let last = entries.last().map(|e| (e.seq, e.hash.as_str()));
            entries.push(AdminEntry::after(last, &change, 1));
        }
        let mut recorded = Recorded::default();
        entries.iter().for_each(|e| recorded.fold(e));
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        let faithful = Held {
            tenants: vec!["acme".into()],
            keys: vec![pair("acme", "aaaaaaaaaaaaaaaa")],
            secrets: vec![pair("acme", "TOKEN")],
        };
        assert_eq!(recorded.compare(&faithful), Vec::<String>::new());
        let tampered = Held {
            tenants: vec!["acme".into(), "ghost".into()],
            keys: vec![
                pair("acme", "bbbbbbbbbbbbbbbb"),
                pair("ghost", "cccccccccccccccc"),
            ],
            secrets: vec![],
        };
        let problems = recorded.compare(&tampered);
        for expected in [
            "tenant ghost is stored without its admin log entry",
            "key bbbbbbbbbbbbbbbb of tenant acme was revoked in the admin log but is still stored",
            "key cccccccccccccccc of tenant ghost is stored without its admin log entry",
            "key aaaaaaaaaaaaaaaa of tenant acme is live in the admin log but missing from the store",
            "secret TOKEN of tenant acme is set in the admin log but missing from the store",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected}: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 5, "{problems:?}");
    }
}
