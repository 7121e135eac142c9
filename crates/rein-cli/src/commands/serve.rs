//! `rein serve`: the HTTP server (`rein_server`) over the configured store, with this process's
//! own workers, until SIGINT or SIGTERM.

use crate::{ConfigArgs, StoreArgs, exit};
use anyhow::Context;
use rein_app::admin::{ADMIN_KEY_ENV, admin_key_sha256};
use rein_app::wiring::{http_client, open_store, runtime_for, scripted_model};
use rein_providers::Model;
use rein_server::{Parts, Server, runs_per_tenant};
use rein_tools::Builtins;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// `rein serve`'s options.
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: `[server] listen`, else 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Runs this process drives at once [default: `[server] workers`, else 8]. 0: it drives
    /// none (an API-only server; `rein worker` processes or other servers sharing the store
    /// drive the runs, and `wait`, cancel and approvals still reach them).
    #[arg(long)]
    workers: Option<usize>,
    /// How long a run's lease lasts unless renewed: after a crash, another process (or this
    /// one, restarted) takes the run over once it expires [default: `[server] lease`, else 30s].
    #[arg(long, value_parser = crate::commands::worker::parse_lease)]
    lease: Option<Duration>,
    /// Replay model responses from this script instead of calling providers (offline demos).
    #[arg(long)]
    script: Option<std::path::PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    config: ConfigArgs,
}

/// Runs the server until SIGINT or SIGTERM.
pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<u8> {
    let config = rein_app::config::load(args.config.config.as_deref())?;
    rein_app::telemetry::init_logs(&config.telemetry)?;
    let store = open_store(&args.store.db).await?;
    let builtins = Builtins::standard();
    let http = http_client()?;
    let model: Arc<dyn Model> = match args.script.as_deref() {
        Some(path) => Arc::new(scripted_model(path)?),
        None => Arc::new(rein_providers::ProviderRouter::from_env(http.clone())),
    };
    let admin_key = admin_key_sha256(
        std::env::var(ADMIN_KEY_ENV).ok(),
        config.server.admin_key_sha256.as_deref(),
    )?;
    let listen = args
        .listen
        .or(config.server.listen)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)));
    let workers = args.workers.or(config.server.workers).unwrap_or(8);
    let lease = args
        .lease
        .or(config.server.lease)
        .unwrap_or(Duration::from_secs(30));
    let runtime = runtime_for(&config, &store, builtins.clone(), http)
        .await?
        .with_lease(lease)
        .with_runs_per_tenant(Some(runs_per_tenant(&config, workers)))
        // Its runs came over the API: one whose log predates the recorded author is a tenant's.
        .with_unrecorded_trust(rein_core::Trust::Tenant);
    let server = Server::new(Parts {
        config,
        store: store.clone(),
        runtime,
        builtins,
        model,
        admin_key_sha256: admin_key,
    })?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("rein serve: listening on http://{}", listener.local_addr()?);
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty());
    if args.script.is_none() && !set("OPENAI_API_KEY") && !set("ANTHROPIC_API_KEY") {
        tracing::warn!(
            "no OPENAI_API_KEY or ANTHROPIC_API_KEY is set and no --script is given: calls to the configured OpenAI and Anthropic endpoints will fail (a spec's own compatible server, with its own key, still answers)"
        );
    }
    if std::env::var(rein_runtime::SECRETS_KEY_ENV).is_err() {
        tracing::warn!(
            "{} is not set: tenants' specs can use none of the secrets stored for them (`rein secrets key` makes one)",
            rein_runtime::SECRETS_KEY_ENV
        );
    }
    server.run(listener, workers, shutdown_signal()).await?;
    store.close().await;
    eprintln!("rein serve: stopped");
    Ok(exit::OK)
}

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
