//! `rein run`, `rein approve` and `rein runs resume`: one run driven in this process until it
//! ends or pauses.

use crate::exit;
use crate::{ConfigArgs, StoreArgs, status_code};
use anyhow::anyhow;
use clap::Args;
use rein_app::Error::BadInput;
use rein_app::config;
use rein_app::render;
use rein_app::wiring::{
    http_client, model_for, open_existing_store, open_store, parse_agent, read_file, runtime_for,
};
use rein_app::workers::WorkerSpecs;
use rein_core::{JobId, RunId, SessionId, TenantId, UserId};
use rein_runtime::RunRequest;
use rein_tools::Builtins;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a run is executed and reported: shared by `run` and `runs resume`.
#[derive(Args)]
pub(crate) struct ExecArgs {
    /// Replay model responses from this script instead of calling a provider.
    #[arg(long)]
    pub(crate) script: Option<PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// The agent spec (YAML).
    spec: PathBuf,
    /// The input to the agent.
    #[arg(long)]
    input: String,
    /// Tenant that owns the run.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// User the run is attributed to.
    #[arg(long, default_value = "cli")]
    user: String,
    /// Session the run belongs to (default: a new one).
    #[arg(long)]
    session: Option<String>,
    /// Batch job the run belongs to.
    #[arg(long)]
    job: Option<String>,
    /// Queue the run for `rein worker` and print its id at once, instead of running it here.
    #[arg(long)]
    detach: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(Args)]
pub(crate) struct ResumeArgs {
    run_id: String,
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Resume even while another process holds the run's lease (it is known to be dead).
    #[arg(long)]
    take_over: bool,
    /// Where the worker spec files the run's spec names are: the directory of the spec it was
    /// started from [default: the working directory].
    #[arg(long)]
    spec_dir: Option<PathBuf>,
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(Args)]
pub(crate) struct ApproveArgs {
    run_id: String,
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Refuse the held action instead of approving it.
    #[arg(long)]
    deny: bool,
    /// Why, recorded with the decision (and told to the model on a denial).
    #[arg(long)]
    reason: Option<String>,
    /// Who decides, recorded with the decision (default: $USER).
    #[arg(long)]
    by: Option<String>,
    /// Where the worker spec files the run's spec names are: the directory of the spec it was
    /// started from [default: the working directory].
    #[arg(long)]
    spec_dir: Option<PathBuf>,
    #[command(flatten)]
    exec: ExecArgs,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let config = config::load(args.exec.config.config.as_deref())?;
    let builtins = Builtins::standard();
    let file = args.spec.display().to_string();
    let source = read_file(&args.spec)?;
    let agent = parse_agent(&file, &source, &config, &builtins)?;
    let http = http_client()?;
    // A detached run is executed by a worker, which brings its own model.
    let model = match args.detach {
        true => None,
        false => Some(model_for(
            &agent,
            args.exec.script.as_deref(),
            http.clone(),
        )?),
    };
    let store = open_store(&args.exec.store.db).await?;
    // Worker spec files are named relative to the spec that names them.
    let spec_dir = args.spec.parent().unwrap_or(Path::new(""));
    let runtime = runtime_for(&config, &store, builtins.clone(), http)
        .await?
        .with_workers(WorkerSpecs::files_relative_to(
            &config, &store, builtins, spec_dir,
        ));
    let tenant = TenantId::new(args.tenant.clone());
    let request = RunRequest {
        agent,
        spec_source: source,
        input: args.input,
        granted_scopes: config.granted_scopes(&TenantId::new(args.tenant.clone())),
        chat: None,
        // The environment carrier OpenTelemetry proposes for processes: a script that traces
        // itself passes its span on to the run.
        trust: rein_core::Trust::Operator,
        trace_parent: std::env::var("TRACEPARENT")
            .ok()
            .filter(|t| rein_core::spans::parse_traceparent(t).is_some()),
        tenant: TenantId::new(args.tenant),
        user: UserId::new(args.user),
        session: SessionId::new(
            args.session
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        ),
        job: args.job.map(JobId::new),
    };
    let Some(model) = model else {
        let id = runtime.enqueue(request).await?;
        store.close().await;
        say!("{id}");
        return Ok(exit::OK);
    };
    // The run id comes first, on stderr, before anything can go wrong: a process killed
    // mid-run is resumed by it (`rein runs resume RUN_ID`).
    let run_id = rein_runtime::Runtime::new_run_id();
    eprintln!("{run_id}");
    let outcome = if args.exec.json {
        runtime
            .run_as(run_id, request, model.as_ref(), None)
            .await?
    } else {
        // A person is watching: print the model's text as it arrives.
        let streamed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = streamed.clone();
        let sink = move |piece: &str| {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            if out
                .write_all(piece.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                std::process::exit(0);
            }
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
        };
        let outcome = runtime
            .run_as(run_id, request, model.as_ref(), Some(&sink))
            .await?;
        if streamed.load(std::sync::atomic::Ordering::Relaxed) {
            say!("\n");
        }
        outcome
    };
    let notes = match args.exec.json {
        true => Vec::new(),
        false => notes(store.as_ref(), &tenant, &outcome).await?,
    };
    store.close().await;
    print_outcome(&outcome, args.exec.json, args.exec.json);
    for note in notes {
        say!("{note}");
    }
    Ok(status_code(outcome.status))
}

/// What `rein run`, `rein runs resume` and `rein approve` add below a run's summary: every tool
/// call that failed (a run can complete after one: the model answered without it), and, where
/// worker runs spent under its limits, the run's own share, as `rein runs list` counts it.
async fn notes(
    store: &dyn rein_store::Store,
    tenant: &TenantId,
    outcome: &rein_runtime::RunOutcome,
) -> anyhow::Result<Vec<String>> {
    let events: Vec<_> = store
        .events(tenant, &outcome.run_id)
        .await?
        .iter()
        .filter_map(|e| e.decode().ok())
        .collect();
    let mut notes: Vec<String> = render::failed_tool_calls(&events)
        .into_iter()
        .map(|failure| format!("tool call failed: {failure}"))
        .collect();
    let own = store.run(tenant, &outcome.run_id).await?.progress;
    if own.usage != outcome.usage {
        notes.push(format!(
            "with its worker runs: this run's own calls used {} tokens, {}",
            own.usage.total(),
            own.cost
        ));
    }
    Ok(notes)
}

/// Prints how a run ended; `show_output` is false when its text was already streamed.
pub(crate) fn print_outcome(outcome: &rein_runtime::RunOutcome, json: bool, show_output: bool) {
    if json {
        say!("{}", render::outcome_json(outcome));
    } else {
        say!(
            "run {}: {} ({}) after {} model calls and {} tool calls, {} tokens, {}",
            outcome.run_id,
            outcome.status,
            outcome
                .reason
                .map_or_else(|| "not finished".into(), |r| r.to_string()),
            outcome.iterations,
            outcome.tool_calls,
            outcome.usage.total(),
            outcome.cost
        );
        if let Some(detail) = &outcome.detail {
            say!("why: {detail}");
        }
        if let Some(pending) = &outcome.awaiting {
            say!(
                "awaiting approval: `{}` with {} ({}); decide with `rein approve {}` or `rein approve {} --deny --reason TEXT`; it times out at {}",
                pending.tool,
                pending.arguments,
                pending.reason,
                outcome.run_id,
                outcome.run_id,
                rein_core::time::format_utc(pending.expires_at_ms)
            );
        }
        match outcome.output.as_ref().filter(|_| show_output) {
            Some(serde_json::Value::String(text)) => say!("output:\n{text}"),
            Some(value) => say!("output:\n{value:#}"),
            None => {}
        }
    }
}

pub(crate) async fn resume(args: ResumeArgs) -> anyhow::Result<u8> {
    continue_run(args, None).await
}

/// Continues an unfinished run, after recording `decision` on its pending approval if given.
pub(crate) async fn continue_run(
    args: ResumeArgs,
    decision: Option<rein_runtime::Decision>,
) -> anyhow::Result<u8> {
    let config = config::load(args.exec.config.config.as_deref())?;
    let store = open_existing_store(&args.exec.store.db).await?;
    let tenant = TenantId::new(args.tenant);
    let id = RunId::new(args.run_id);
    let record = match store.run(&tenant, &id).await {
        Ok(r) => r,
        Err(rein_store::StoreError::NotFound(_)) => {
            return Err(anyhow!(BadInput(format!(
                "run {id} not found for tenant {tenant}"
            ))));
        }
        Err(e) => return Err(e.into()),
    };
    if record.progress.status.is_terminal() {
        let not_waiting = if decision.is_some() {
            "is not awaiting approval: it "
        } else {
            ""
        };
        return Err(anyhow!(BadInput(format!(
            "run {id} {not_waiting}already finished: {} ({})",
            record.progress.status,
            record
                .progress
                .reason
                .map_or_else(|| "-".into(), |r| r.to_string())
        ))));
    }
    let builtins = Builtins::standard();
    let agent = parse_agent(
        &format!("run {id} (pinned spec)"),
        &record.info.spec,
        &config,
        &builtins,
    )?;
    let http = http_client()?;
    let model = model_for(&agent, args.exec.script.as_deref(), http.clone())?;
    let spec_dir = args.spec_dir.as_deref().unwrap_or(Path::new(""));
    let runtime = runtime_for(&config, &store, builtins.clone(), http)
        .await?
        .with_workers(WorkerSpecs::files_relative_to(
            &config, &store, builtins, spec_dir,
        ));
    // A lease held by a process in this place that is gone (killed, crashed) is taken over at
    // once, unless someone claimed or renewed it meanwhile: waiting for it to expire would only
    // eat the run's time.
    let gone_holder_until = record
        .lease
        .as_ref()
        .filter(|(owner, until)| {
            *until > rein_runtime::now_ms() && rein_runtime::holder_is_gone(owner)
        })
        .map(|(_, until)| *until);
    if gone_holder_until.is_some() && !args.take_over {
        eprintln!("rein: the process holding run {id}'s lease is gone; taking it over");
    }
    let outcome = match decision {
        None if args.take_over || gone_holder_until.is_some() => match match gone_holder_until {
            Some(until) if !args.take_over => {
                runtime
                    .take_over_from(&tenant, &id, &config.prices, model.as_ref(), until)
                    .await
            }
            _ => {
                runtime
                    .take_over(&tenant, &id, &config.prices, model.as_ref())
                    .await
            }
        } {
            Err(e @ rein_runtime::RuntimeError::WorkerRun { .. }) => {
                return Err(anyhow!(BadInput(e.to_string())));
            }
            other => other?,
        },
        None => match runtime
            .resume(&tenant, &id, &config.prices, model.as_ref())
            .await
        {
            Err(e @ rein_runtime::RuntimeError::Leased(_)) => {
                return Err(anyhow!(BadInput(format!(
                    "{e} (pass --take-over if that process is known to be dead)"
                ))));
            }
            Err(e @ rein_runtime::RuntimeError::WorkerRun { .. }) => {
                return Err(anyhow!(BadInput(e.to_string())));
            }
            other => other?,
        },
        Some(decision) => match runtime
            .decide(&tenant, &id, &config.prices, model.as_ref(), decision)
            .await
        {
            Err(
                e @ (rein_runtime::RuntimeError::NotAwaitingApproval(_)
                | rein_runtime::RuntimeError::WorkerRun { .. }),
            ) => {
                return Err(anyhow!(BadInput(e.to_string())));
            }
            other => other?,
        },
    };
    let notes = match args.exec.json {
        true => Vec::new(),
        false => notes(store.as_ref(), &tenant, &outcome).await?,
    };
    store.close().await;
    print_outcome(&outcome, args.exec.json, true);
    for note in notes {
        say!("{note}");
    }
    Ok(status_code(outcome.status))
}

/// `rein approve`: decides the run's pending approval, then continues it.
pub(crate) async fn approve(args: ApproveArgs) -> anyhow::Result<u8> {
    let by = args
        .by
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "cli".into());
    let decision = rein_runtime::Decision {
        approved: !args.deny,
        by,
        reason: args.reason,
    };
    let resume = ResumeArgs {
        run_id: args.run_id,
        tenant: args.tenant,
        take_over: false,
        spec_dir: args.spec_dir,
        exec: args.exec,
    };
    continue_run(resume, Some(decision)).await
}
