//! Checking what the store holds against its own records: each run's hash chain and row, and
//! the tenants, keys and secrets against the admin log. `rein audit verify` and `GET
//! /v1/audit/verify` share these.

use rein_core::{Event, RunId, RunStatus, TenantId};

/// The tenants, keys and secrets the store holds, for holding against the admin log, and how
/// many tenants and keys it held before the log began (its baseline): those have no entries,
/// and the log cannot vouch for them.
pub async fn held(
    store: &dyn rein_store::Store,
) -> Result<(rein_core::admin_log::Held, usize), rein_store::StoreError> {
    let baseline: std::collections::BTreeSet<(String, Option<String>)> =
        store.admin_baseline().await?.into_iter().collect();
    let mut held = rein_core::admin_log::Held::default();
    let mut predating = 0;
    for tenant in store.registered_tenants().await? {
        let name = tenant.name.to_string();
        for key in store.api_keys(&tenant.name).await? {
            if baseline.contains(&(name.clone(), Some(key.id.clone()))) {
                predating += 1;
            } else {
                held.keys.push((name.clone(), key.id));
            }
        }
        for secret in store.secret_names(&tenant.name).await? {
            held.secrets.push((name.clone(), secret.name));
        }
        if baseline.contains(&(name.clone(), None)) {
            predating += 1;
        } else {
            held.tenants.push(name);
        }
    }
    Ok((held, predating))
}

/// Checks each run's hash chain, and its stored record against its log: the events checked,
/// and a line per problem.
pub async fn verify_runs(
    store: &dyn rein_store::Store,
    runs: &[(TenantId, RunId)],
) -> Result<(usize, Vec<String>), rein_store::StoreError> {
    let mut events_checked = 0usize;
    let mut problems = Vec::new();
    for (tenant, id) in runs {
        let record = store.run(tenant, id).await?;
        let events = store.events(tenant, id).await?;
        events_checked += events.len();
        if let Err(brk) =
            rein_core::verify_chain(&events, Some((record.event_count, &record.head_hash)))
        {
            let kind = events
                .iter()
                .find(|e| e.seq == brk.seq)
                .map(|e| format!(" ({})", e.kind))
                .unwrap_or_default();
            problems.push(format!(
                "run {id} (tenant {tenant}): event {}{kind}: {}",
                brk.seq, brk.reason
            ));
        } else if let Some(field) = record_mismatch(&record, &events) {
            problems.push(format!("run {id} (tenant {tenant}): the run's stored {field} disagrees with its intact event log"));
        }
    }
    Ok((events_checked, problems))
}

/// The first thing a run's stored record says that its verified log contradicts.
fn record_mismatch(
    record: &rein_store::RunRecord,
    events: &[rein_core::SealedEvent],
) -> Option<&'static str> {
    let decoded: Vec<Event> = match events.iter().map(|e| e.decode()).collect() {
        Ok(decoded) => decoded,
        Err(_) => return Some("log (an event payload cannot be read)"),
    };
    let log = rein_core::LogSummary::of(&decoded);
    let info = &record.info;
    match &log.started {
        Some(rein_core::EventKind::RunStarted {
            agent,
            agent_version,
            spec_sha256,
            input,
            tenant,
            user,
            session,
            job,
            ..
        }) => {
            if tenant != &info.tenant {
                return Some("tenant");
            }
            if (user, session, job) != (&info.user, &info.session, &info.job) {
                return Some("user, session or job");
            }
            if (agent, agent_version) != (&info.agent, &info.agent_version) {
                return Some("agent or version");
            }
            if spec_sha256 != &rein_core::event::sha256_hex(info.spec.as_bytes()) {
                return Some("pinned spec");
            }
            if input != &info.input {
                return Some("input");
            }
        }
        _ if events.is_empty() => {}
        _ => return Some("log (it does not begin with run_started)"),
    }
    let p = &record.progress;
    if log.usage != p.usage {
        Some("token usage")
    } else if log.cost != p.cost {
        Some("cost")
    } else if log.iterations != p.iterations {
        Some("iteration count")
    } else if log.tool_calls != p.tool_calls {
        Some("tool call count")
    } else if !same_status(log.status(), p.status) || log.finished.map(|(_, r)| r) != p.reason {
        Some("status")
    } else if log.output != p.output {
        Some("output")
    } else {
        None
    }
}

/// Whether a log's status and its run row's agree. A log cannot tell a queued run from a
/// running one (claiming a run is not an event), so those two agree with each other.
fn same_status(from_log: RunStatus, stored: RunStatus) -> bool {
    let settled = |s| match s {
        RunStatus::Queued => RunStatus::Running,
        other => other,
    };
    settled(from_log) == settled(stored)
}
