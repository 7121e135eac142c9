//! `rein secrets`: the operator's store of each tenant's secrets.
//!
//! A spec registered over the API can never read the server's environment: its `${NAME}` (in an
//! HTTP tool's headers) and `api_key_env: NAME` (in a model entry) name the tenant's secrets,
//! which only the operator sets, here. Values are read from standard input (never from the
//! command line, where `ps` and shell histories would show them), sealed with the key in
//! `REIN_SECRETS_KEY` before they reach the store, and never printed again; listing shows
//! names and times. Each change is an admin-log entry naming the secret, never its value.

use crate::{StoreArgs, exit};
use anyhow::anyhow;
use clap::Subcommand;
use rein_app::Error::BadInput;
use rein_core::TenantId;
use rein_core::time::format_utc;
use rein_runtime::{SecretKey, now_ms};
use serde_json::json;
use std::io::Read;

#[derive(Subcommand)]
pub(crate) enum SecretsCommand {
    /// Print a new random key for REIN_SECRETS_KEY.
    Key,
    /// Set a tenant's secret to the value on standard input (never an argument, which `ps`
    /// would show).
    Set {
        #[arg(long)]
        tenant: String,
        /// The name specs use: `${NAME}` in a tool's headers, `api_key_env: NAME`.
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List a tenant's secrets by name (values are never shown).
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a tenant's secret.
    Delete {
        #[arg(long)]
        tenant: String,
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// The longest secret value accepted.
const MAX_VALUE_BYTES: usize = 64 * 1024;

/// `rein secrets key`: prints a new random key for `REIN_SECRETS_KEY`.
pub fn new_key() -> anyhow::Result<u8> {
    let key = SecretKey::generate()?;
    eprintln!(
        "a new key for {} is below; keep it where the server's environment gets it, never in the repository or the database",
        rein_runtime::SECRETS_KEY_ENV
    );
    println!("{key}");
    Ok(exit::OK)
}

/// `rein secrets set --tenant T NAME`: the value from standard input (one trailing newline
/// dropped).
pub async fn set(tenant: &str, name: &str, store: &StoreArgs) -> anyhow::Result<u8> {
    check_name(name)?;
    let key = configured_key()?;
    let mut value = String::new();
    std::io::stdin()
        .take(MAX_VALUE_BYTES as u64 + 2)
        .read_to_string(&mut value)
        .map_err(|e| anyhow!(BadInput(format!("cannot read the secret from stdin: {e}"))))?;
    let value = value
        .strip_suffix('\n')
        .map(|v| v.strip_suffix('\r').unwrap_or(v))
        .unwrap_or(&value);
    if value.is_empty() {
        return Err(anyhow!(BadInput(format!(
            "no value on stdin for {name}: pipe it in, for example `printf %s \"$TOKEN\" | rein secrets set --tenant {tenant} {name}`"
        ))));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(anyhow!(BadInput(format!(
            "the value of {name} is longer than {} KiB",
            MAX_VALUE_BYTES / 1024
        ))));
    }
    let tenant_id = TenantId::new(tenant);
    let sealed = key.seal(&tenant_id, name, value)?;
    let store = rein_app::wiring::open_store(&store.db).await?;
    let set = store
        .set_secret(
            &tenant_id,
            name,
            &sealed,
            now_ms(),
            &rein_app::admin::cli_actor(),
        )
        .await;
    store.close().await;
    if !set? {
        return Err(rein_app::admin::no_tenant(tenant).into());
    }
    eprintln!("secret {name} of tenant {tenant} set");
    Ok(exit::OK)
}

/// `rein secrets list --tenant T [--json]`: names and when each was set, never values.
pub async fn list(tenant: &str, json: bool, store: &StoreArgs) -> anyhow::Result<u8> {
    let store = rein_app::wiring::open_store(&store.db).await?;
    let names = store.secret_names(&TenantId::new(tenant)).await;
    store.close().await;
    let names = names?;
    if json {
        let rows: Vec<_> = names
            .iter()
            .map(|s| json!({"name": s.name, "updated_at": format_utc(s.updated_ms)}))
            .collect();
        println!("{}", json!(rows));
    } else {
        for s in &names {
            println!("{:<32} set {}", s.name, format_utc(s.updated_ms));
        }
    }
    Ok(exit::OK)
}

/// `rein secrets delete --tenant T NAME`.
pub async fn delete(tenant: &str, name: &str, store: &StoreArgs) -> anyhow::Result<u8> {
    let store = rein_app::wiring::open_store(&store.db).await?;
    let deleted = store
        .delete_secret(
            &TenantId::new(tenant),
            name,
            now_ms(),
            &rein_app::admin::cli_actor(),
        )
        .await;
    store.close().await;
    if !deleted? {
        return Err(anyhow!(BadInput(format!(
            "tenant {tenant:?} has no secret {name:?}; `rein secrets list --tenant {tenant}` shows their names"
        ))));
    }
    eprintln!("secret {name} of tenant {tenant} deleted");
    Ok(exit::OK)
}

fn configured_key() -> anyhow::Result<SecretKey> {
    SecretKey::from_env()
        .map_err(|e| anyhow!(BadInput(e.to_string())))?
        .ok_or_else(|| anyhow!(BadInput(rein_runtime::SecretError::NoKey.to_string())))
}

/// A secret's name is what a spec writes between `${` and `}`: an environment-variable-like
/// name, so one spec runs the same locally (from the environment) and on a server.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(anyhow!(BadInput(format!(
            "secret name {name:?}: use 1 to 128 letters, digits and `_`, not starting with a digit (as `${{NAME}}` writes it)"
        ))))
    }
}
