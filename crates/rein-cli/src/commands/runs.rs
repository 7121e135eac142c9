//! `rein runs`: recorded runs listed, shown, exported, cancelled.

use crate::StoreArgs;
use crate::commands::run::{ResumeArgs, resume};
use crate::commands::worker::parse_lease;
use crate::exit;
use anyhow::anyhow;
use clap::Subcommand;
use rein_app::Error::BadInput;
use rein_app::render;
use rein_app::views;
use rein_app::wiring::{http_client, open_existing_store};
use rein_core::{Event, RunId, RunStatus, SessionId, TenantId, UserId};
use rein_runtime::Runtime;
use rein_store::Store;
use rein_tools::{Builtins, CONNECT_TIMEOUT, HttpTools, ToolBox};

#[derive(Subcommand)]
pub(crate) enum RunsCommand {
    /// The newest runs of a tenant.
    List {
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Only runs in this state (e.g. `awaiting-approval`: the approvals queue).
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Only runs of this agent (`gateway`: the gateway's calls).
        #[arg(long)]
        agent: Option<String>,
        /// Only runs for this user.
        #[arg(long)]
        user: Option<String>,
        /// Only runs of this session.
        #[arg(long)]
        session: Option<String>,
        /// Only runs older than this one: the next page after a list that ended with it.
        #[arg(long, value_name = "RUN_ID")]
        before: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// One run's trace tree: every step, then totals and the termination reason.
    Show {
        run_id: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Print the run and its events as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Continue a run that stopped before it finished (its process crashed or was killed),
    /// under the spec it pinned.
    Resume(ResumeArgs),
    /// Cancel a run: at once when nobody drives it (queued, awaiting approval, its process
    /// dead); before its next step in the process that drives it, whichever that is.
    Cancel {
        run_id: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Wait until the run has ended, at most this long (`--wait` alone: 60s; `--wait=5m`),
        /// and say how it ended; exit 1 if it is still running then (the request stays).
        #[arg(long, value_parser = parse_lease, num_args = 0..=1, require_equals = true, default_missing_value = "60s")]
        wait: Option<std::time::Duration>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// A run state, as `--status` takes it.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum StatusArg {
    Queued,
    Running,
    AwaitingApproval,
    Completed,
    Failed,
    LimitExceeded,
    Cancelled,
    Escalated,
}

impl From<StatusArg> for RunStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Queued => RunStatus::Queued,
            StatusArg::Running => RunStatus::Running,
            StatusArg::AwaitingApproval => RunStatus::AwaitingApproval,
            StatusArg::Completed => RunStatus::Completed,
            StatusArg::Failed => RunStatus::Failed,
            StatusArg::LimitExceeded => RunStatus::LimitExceeded,
            StatusArg::Cancelled => RunStatus::Cancelled,
            StatusArg::Escalated => RunStatus::Escalated,
        }
    }
}

/// `rein runs cancel`: recorded as `cli:$USER`, as the admin commands are.
pub(crate) async fn cancel(
    id: RunId,
    tenant: TenantId,
    wait: Option<std::time::Duration>,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let store = open_existing_store(&store.db).await?;
    let tools = ToolBox::new(
        Builtins::standard(),
        HttpTools::new(http_client()?, rein_tools::Egress::closed(CONNECT_TIMEOUT)?),
    );
    let runtime = Runtime::new(store.clone(), tools);
    let actor = rein_app::admin::cli_actor();
    let done = runtime.cancel(&tenant, &id, &actor).await;
    let code = match (&done, wait) {
        (Ok(rein_runtime::Cancelled::Requested), Some(limit)) => {
            say!("run {id}: cancel requested; waiting for the process driving it to end it");
            until_ended(&runtime, &*store, (&tenant, &id, &actor), limit).await
        }
        _ => Ok(exit::OK),
    };
    store.close().await;
    let code = code?;
    match done {
        Ok(rein_runtime::Cancelled::Ended) => say!("run {id}: cancelled"),
        Ok(rein_runtime::Cancelled::Requested) if wait.is_some() => {}
        Ok(rein_runtime::Cancelled::Requested) => say!(
            "run {id}: cancel requested; the process driving it ends it before its next step (it looks every {} s; the step in flight finishes first)",
            rein_runtime::CANCEL_POLL.as_secs()
        ),
        Err(rein_runtime::RuntimeError::Store(rein_store::StoreError::NotFound(_))) => {
            return Err(anyhow!(BadInput(format!(
                "run {id} not found for tenant {tenant}"
            ))));
        }
        Err(e @ rein_runtime::RuntimeError::Ended(..)) => {
            return Err(anyhow!(BadInput(e.to_string())));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(code)
}

/// Waits, `limit` at most, until run `id`, whose cancel `actor` requested, has ended,
/// following its log (a process that drives it on SQLite is not heard: its row is read every
/// 250 ms), and says how it ended: exit 0, or 1 if it still runs. A run that stopped to wait
/// for a person before its driver saw the request is cancelled here (nobody drives it now).
pub(crate) async fn until_ended(
    runtime: &Runtime,
    store: &dyn Store,
    (tenant, id, actor): (&TenantId, &RunId, &str),
    limit: std::time::Duration,
) -> anyhow::Result<u8> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut appends = store.follow(id);
    loop {
        appends.seen();
        let record = store.run(tenant, id).await?;
        let status = record.progress.status;
        if status == RunStatus::AwaitingApproval {
            match runtime.cancel(tenant, id, actor).await {
                // Ended now, or by someone else meanwhile: the next read says how.
                Ok(rein_runtime::Cancelled::Ended) | Err(rein_runtime::RuntimeError::Ended(..)) => {
                    continue;
                }
                // Another process holds it still: wait for it as for a running run.
                Ok(rein_runtime::Cancelled::Requested) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if status.is_terminal() {
            let detail = record.progress.detail.as_deref().unwrap_or("");
            say!(
                "run {id}: {status}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            );
            return Ok(exit::OK);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            say!("run {id}: still {status} after {limit:?}; the cancel stays requested");
            return Ok(exit::INTERNAL);
        }
        appends
            .changed(left.min(std::time::Duration::from_millis(250)))
            .await;
    }
}

pub(crate) async fn runs(command: RunsCommand) -> anyhow::Result<u8> {
    match command {
        RunsCommand::Resume(args) => resume(args).await,
        RunsCommand::Cancel {
            run_id,
            tenant,
            wait,
            store,
        } => cancel(RunId::new(run_id), TenantId::new(tenant), wait, &store).await,
        RunsCommand::List {
            tenant,
            status,
            agent,
            user,
            session,
            before,
            limit,
            json,
            store,
        } => {
            let store = open_existing_store(&store.db).await?;
            let tenant = TenantId::new(tenant);
            let before = before.map(RunId::new);
            if let Some(before) = &before {
                match store.run(&tenant, before).await {
                    Ok(_) => {}
                    Err(rein_store::StoreError::NotFound(_)) => {
                        return Err(anyhow!(BadInput(format!(
                            "--before {before}: no such run for tenant {tenant}"
                        ))));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let runs = store
                .list_runs(
                    &tenant,
                    &rein_store::RunFilter {
                        status: status.map(RunStatus::from),
                        agent,
                        user: user.map(UserId::new),
                        session: session.map(SessionId::new),
                        before,
                        reason: None,
                    },
                    limit,
                )
                .await?;
            if json {
                let list: Vec<_> = runs.iter().map(render::record_json).collect();
                say!("{}", serde_json::Value::Array(list));
            } else if runs.is_empty() {
                say!("no runs");
            } else {
                say!("{}", render::run_table(&runs));
            }
            Ok(exit::OK)
        }
        RunsCommand::Show {
            run_id,
            tenant,
            json,
            store,
        } => {
            let store = open_existing_store(&store.db).await?;
            let tenant = TenantId::new(tenant);
            let id = RunId::new(run_id);
            let record = match store.run(&tenant, &id).await {
                Ok(r) => r,
                Err(rein_store::StoreError::NotFound(_)) => {
                    return Err(anyhow!(BadInput(format!(
                        "run {id} not found for tenant {tenant}"
                    ))));
                }
                Err(e) => return Err(e.into()),
            };
            let sealed = store.events(&tenant, &id).await?;
            let events: Vec<Event> = sealed.iter().filter_map(|e| e.decode().ok()).collect();
            if json {
                let events: Vec<_> = sealed
                    .iter()
                    .map(|e| serde_json::json!(views::EventView::of(e)))
                    .collect();
                let mut out = render::record_json(&record);
                out["events"] = serde_json::Value::Array(events);
                say!("{out}");
            } else {
                say!("{}", render::trace(&record, &events));
            }
            Ok(exit::OK)
        }
    }
}
