//! `rein audit`: hash chains, records, the admin log and anchors verified; anchors made.

use crate::exit;
use crate::{ConfigArgs, Exit, StoreArgs};
use anyhow::anyhow;
use clap::Subcommand;
use rein_app::Error::BadInput;
use rein_app::anchors;
use rein_app::audit::{held, verify_runs};
use rein_app::config;
use rein_app::wiring::open_existing_store;
use rein_core::{RunId, TenantId};

/// A duration that may be zero (`0s`: no lag, for a store only one machine writes).
pub(crate) fn parse_lag(text: &str) -> Result<std::time::Duration, String> {
    rein_core::duration::parse_duration_or_zero(text)
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Recompute hash chains; name the first altered, removed or reordered event.
    Verify {
        /// One run (default: every run of the tenant).
        run_id: Option<String>,
        #[arg(long, default_value = "default", conflicts_with = "all_tenants")]
        tenant: String,
        /// Verify every run of every tenant, the admin log, and the audit anchors.
        #[arg(long)]
        all_tenants: bool,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Anchor the store now: record the admin log's head and a digest of every run (and append
    /// it to `[audit] anchor_file`), so a later audit finds a run removed or a log cut short.
    Anchor {
        /// Runs created within this last stretch are left to the next anchor (processes on
        /// several machines, whose clocks differ a little, may still be creating them).
        #[arg(long, default_value = "60s", value_parser = parse_lag)]
        lag: std::time::Duration,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// Runs read and verified at a time when `rein audit verify` checks every run of a tenant.
pub(crate) const AUDIT_PAGE: u32 = 1000;

/// `rein audit anchor`.
pub(crate) async fn anchor(
    lag: std::time::Duration,
    store: &StoreArgs,
    config: &ConfigArgs,
) -> anyhow::Result<u8> {
    let config = config::load(config.config.as_deref())?;
    let store = open_existing_store(&store.db).await?;
    let made = anchors::make(
        store.as_ref(),
        rein_runtime::now_ms(),
        lag,
        config.audit.anchor_file.as_deref(),
    )
    .await;
    store.close().await;
    match made? {
        Some(anchor) => say!(
            "audit anchor {}: {} runs, admin log head {}",
            anchor.seq,
            anchor.runs,
            anchor
                .admin_head
                .map_or_else(|| "none".to_string(), |(seq, _)| seq.to_string())
        ),
        None => say!("another process anchored the store at the same moment; nothing to add"),
    }
    Ok(exit::OK)
}

pub(crate) async fn audit(
    run_id: Option<String>,
    tenant: &str,
    all_tenants: bool,
    store: &StoreArgs,
    config: &ConfigArgs,
) -> anyhow::Result<u8> {
    let config = config::load(config.config.as_deref())?;
    let store = open_existing_store(&store.db).await?;
    let tenants = if all_tenants {
        store.tenants().await?
    } else {
        vec![TenantId::new(tenant)]
    };
    // Verified a page at a time, so memory stays bounded whatever the store holds.
    let (mut runs_checked, mut events_checked) = (0usize, 0usize);
    let mut problems = Vec::new();
    let mut check = async |page: &[(TenantId, RunId)]| -> anyhow::Result<()> {
        let (events, found) = verify_runs(store.as_ref(), page).await?;
        runs_checked += page.len();
        events_checked += events;
        problems.extend(found);
        Ok(())
    };
    for tenant in &tenants {
        match &run_id {
            Some(id) => {
                let id = RunId::new(id.clone());
                if store.run(tenant, &id).await.is_ok() {
                    check(&[(tenant.clone(), id)]).await?;
                }
            }
            None => {
                let mut after: Option<RunId> = None;
                loop {
                    let page = store.run_ids(tenant, after.as_ref(), AUDIT_PAGE).await?;
                    let full = page.len() == AUDIT_PAGE as usize;
                    after = page.last().cloned();
                    let page: Vec<_> = page.into_iter().map(|id| (tenant.clone(), id)).collect();
                    check(&page).await?;
                    if !full {
                        break;
                    }
                }
            }
        }
    }
    if let (Some(id), 0) = (&run_id, runs_checked) {
        let scope = if all_tenants {
            "any tenant".to_string()
        } else {
            format!("tenant {tenant}")
        };
        return Err(anyhow!(BadInput(format!("run {id} not found for {scope}"))));
    }
    if run_id.is_none() {
        for orphan in store.orphaned_logs().await? {
            problems.push(format!(
                "run {orphan}: its event log is stored but its run record was removed"
            ));
        }
    }
    // The operator's audit also checks the admin log (tenants and keys), a page at a time.
    let mut admin_entries = None;
    if all_tenants && run_id.is_none() {
        let (mut after, mut checked) = (None, 0usize);
        let mut recorded = rein_core::admin_log::Recorded::default();
        let mut intact = true;
        let mut last_seq = None;
        while let Some(page) =
            rein_app::admin::admin_log_page(store.as_ref(), after, AUDIT_PAGE).await?
        {
            checked += page.entries.len();
            for entry in &page.entries {
                recorded.fold(entry);
                last_seq = Some(entry.seq);
            }
            if let Err(problem) = page.verdict {
                problems.push(problem);
                intact = false;
                break;
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        // What the store holds must be what the log records: a key inserted by hand
        // authenticates, and nothing else would show it.
        if intact {
            let (held, predating) = held(store.as_ref()).await?;
            // Changes made while the store was read are in the log's tail by now.
            let from = last_seq.map_or(0, |seq| seq + 1);
            for entry in store.admin_log(from, u32::MAX).await? {
                recorded.fold(&entry);
            }
            problems.extend(recorded.compare(&held));
            if predating > 0 {
                say!(
                    "note: {predating} tenant(s) and key(s) predate the admin log, so it cannot vouch for them"
                );
            }
        }
        let (anchors, found) =
            anchors::check(store.as_ref(), config.audit.anchor_file.as_deref()).await?;
        problems.extend(found);
        admin_entries = Some((checked, anchors));
    }
    if !problems.is_empty() {
        for p in &problems {
            say!("TAMPERED {p}");
        }
        say!("{} problem(s) in {runs_checked} runs", problems.len());
        return Err(anyhow!(Exit(exit::TAMPERED)));
    }
    let admin = admin_entries
        .map(|(n, anchors)| format!(", {n} admin log entries, {anchors} audit anchors"))
        .unwrap_or_default();
    say!(
        "ok: {runs_checked} runs, {events_checked} events{admin}: every hash chain is intact and every run agrees with its log"
    );
    Ok(exit::OK)
}
