//! `rein tenants` and `rein keys`: the tenants of `rein serve` and their API keys, each change
//! an admin-log entry.

use crate::StoreArgs;
use crate::exit;
use clap::Subcommand;
use rein_app::Error::BadInput;
use rein_app::admin::{
    ADMIN_KEY_ENV, add_key, check_name, cli_actor, key_expiry, keys_json, new_api_key,
    tenant_exists, tenants_json,
};
use rein_app::wiring::open_store;
use rein_core::TenantId;
use rein_core::event::sha256_hex;
use rein_core::time::format_utc;
use rein_runtime::now_ms;
use serde_json::json;

#[derive(Subcommand)]
pub(crate) enum TenantsCommand {
    /// Create a tenant.
    Create {
        /// Its name (letters, digits, `-`, `_`, `.`).
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List the tenants, with how many API keys each has.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Create an API key for a tenant and print it, alone, on stdout; only its SHA-256 is
    /// stored, so it cannot be shown again.
    Create {
        #[arg(long, required_unless_present = "admin")]
        tenant: Option<String>,
        /// Create an admin key instead (for `/v1/admin`): printed on stdout, with the
        /// rein.toml line for its hash on stderr; nothing is stored.
        #[arg(long, conflicts_with = "tenant")]
        admin: bool,
        /// How long the key works: days (`90d`) or hours and minutes (`12h`, `30m`); by
        /// default, until revoked.
        #[arg(long, value_name = "LIFETIME", conflicts_with = "admin")]
        expires_in: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List a tenant's API keys by id (the first 16 hex digits of each key's SHA-256).
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke one of a tenant's API keys, by id: it authenticates no more.
    Revoke {
        #[arg(long)]
        tenant: String,
        /// The key's id, as `rein keys list` shows it.
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `rein tenants create NAME`.
pub async fn create_tenant(name: &str, store: &StoreArgs) -> anyhow::Result<u8> {
    check_name(name).map_err(|e| anyhow::anyhow!(BadInput(e)))?;
    let store = open_store(&store.db).await?;
    let created = store
        .create_tenant(&TenantId::new(name), now_ms(), &cli_actor())
        .await?;
    store.close().await;
    if created {
        eprintln!("tenant {name} created");
    } else {
        eprintln!("tenant {name} already exists");
    }
    Ok(exit::OK)
}

/// `rein tenants list [--json]`.
pub async fn list_tenants(json: bool, store: &StoreArgs) -> anyhow::Result<u8> {
    let store = open_store(&store.db).await?;
    let tenants = store.registered_tenants().await?;
    store.close().await;
    if json {
        println!("{}", json!(tenants_json(&tenants)));
    } else {
        for t in &tenants {
            println!(
                "{:<24} {:>3} keys  created {}",
                t.name,
                t.keys,
                format_utc(t.created_ms)
            );
        }
    }
    Ok(exit::OK)
}

/// `rein keys create --tenant NAME`: prints the new key alone on stdout (it is not shown
/// again). With `--admin` instead: a new admin key, and on stderr the line that puts its hash in
/// rein.toml.
pub async fn create_key(
    tenant: Option<&str>,
    expires_in: Option<&str>,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let Some(tenant) = tenant else {
        let key = new_api_key()?;
        eprintln!(
            "the admin key is below, shown once; give it to rein serve as {ADMIN_KEY_ENV}, or put its hash in rein.toml:\n[server]\nadmin_key_sha256 = \"{}\"",
            sha256_hex(key.as_bytes())
        );
        println!("{key}");
        return Ok(exit::OK);
    };
    let expires_ms = expires_in
        .map(|text| key_expiry(text, now_ms()))
        .transpose()
        .map_err(|e| anyhow::anyhow!(BadInput(format!("--expires-in {e}"))))?;
    let store = open_store(&store.db).await?;
    let added = add_key(
        store.as_ref(),
        &TenantId::new(tenant),
        expires_ms,
        &cli_actor(),
    )
    .await;
    store.close().await;
    let (key, id) = added?.ok_or_else(|| rein_app::admin::no_tenant(tenant))?;
    let until = expires_ms
        .map(|ms| format!(", valid until {}", format_utc(ms)))
        .unwrap_or_default();
    eprintln!("key {id} created for tenant {tenant}{until}; it is shown once, below");
    println!("{key}");
    Ok(exit::OK)
}

/// `rein keys list --tenant NAME [--json]`: each key's id and creation time.
pub async fn list_keys(tenant: &str, json: bool, store: &StoreArgs) -> anyhow::Result<u8> {
    let store = open_store(&store.db).await?;
    let tenant = TenantId::new(tenant);
    let known = tenant_exists(store.as_ref(), &tenant).await;
    let keys = store.api_keys(&tenant).await;
    store.close().await;
    if !known? {
        return Err(rein_app::admin::no_tenant(tenant.as_str()).into());
    }
    let keys = keys?;
    if json {
        println!("{}", json!(keys_json(&keys)));
    } else {
        let now = now_ms();
        for k in &keys {
            let until = k
                .expires_ms
                .map(|ms| {
                    let state = if ms <= now { "expired" } else { "expires" };
                    format!("  {state} {}", format_utc(ms))
                })
                .unwrap_or_default();
            println!("{}  created {}{until}", k.id, format_utc(k.created_ms));
        }
    }
    Ok(exit::OK)
}

/// `rein keys revoke --tenant NAME ID`.
pub async fn revoke_key(tenant: &str, id: &str, store: &StoreArgs) -> anyhow::Result<u8> {
    let store = open_store(&store.db).await?;
    let revoked = store
        .revoke_api_key(&TenantId::new(tenant), id, now_ms(), &cli_actor())
        .await;
    store.close().await;
    if !revoked? {
        return Err(anyhow::anyhow!(BadInput(format!(
            "tenant {tenant:?} has no key {id:?}; `rein keys list --tenant {tenant}` shows their ids"
        ))));
    }
    eprintln!("key {id} of tenant {tenant} revoked");
    Ok(exit::OK)
}
