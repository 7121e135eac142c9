//! `rein worker`: a process that drives queued runs (and takes over runs whose process died)
//! under leases.

use crate::commands::run::{ExecArgs, print_outcome};
use crate::exit;
use clap::Args;
use rein_app::config;
use rein_app::wiring::{http_client, open_store, runtime_for};
use rein_providers::{Model, ProviderRouter};
use rein_tools::Builtins;

#[derive(Args)]
pub(crate) struct WorkerArgs {
    /// How long a claimed run's lease lasts unless renewed (it is, a third of the way in);
    /// a worker that dies loses its runs to the others once it expires.
    #[arg(long, default_value = "30s", value_parser = parse_lease)]
    lease: std::time::Duration,
    /// Exit once no run is queued or running (default: wait for more).
    #[arg(long)]
    until_idle: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

pub(crate) fn parse_lease(text: &str) -> Result<std::time::Duration, String> {
    rein_core::parse_duration(text).map_err(|e| e.to_string())
}

/// `rein worker`: claims and drives runs until stopped (or, with --until-idle, until none is
/// queued or running).
pub(crate) async fn worker(args: WorkerArgs) -> anyhow::Result<u8> {
    let config = config::load(args.exec.config.config.as_deref())?;
    rein_app::telemetry::init_logs(&config.telemetry)?;
    let store = open_store(&args.exec.store.db).await?;
    let builtins = Builtins::standard();
    let http = http_client()?;
    let model: Box<dyn Model> = match args.exec.script.as_deref() {
        Some(path) => Box::new(rein_app::wiring::scripted_model(path)?),
        None => Box::new(ProviderRouter::from_env(http.clone())),
    };
    let runtime = runtime_for(&config, &store, builtins, http)
        .await?
        .with_lease(args.lease)
        .with_runs_per_tenant(config.server.max_runs_per_tenant)
        // Its runs came over the API: one whose log predates the recorded author is a tenant's.
        .with_unrecorded_trust(rein_core::Trust::Tenant);
    // Idle, it looks for work every 100 ms, and on PostgreSQL at once when another process
    // queues a run.
    let mut claimable = store.follow_claimable();
    loop {
        claimable.seen();
        match runtime.work_one(&config.prices, model.as_ref()).await {
            Ok(Some(outcome)) => print_outcome(&outcome, args.exec.json, false),
            Ok(None) if args.until_idle && store.unfinished().await? == 0 => break,
            Ok(None) => {
                claimable
                    .changed(std::time::Duration::from_millis(100))
                    .await;
            }
            // One run's failure (a spec that no longer checks, a lost lease) is reported and
            // the worker goes on with the next.
            Err(e) => tracing::error!(error = %e, "worker: a run could not be driven"),
        }
    }
    store.close().await;
    Ok(exit::OK)
}
