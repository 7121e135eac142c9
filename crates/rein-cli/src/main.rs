//! `rein`: run agents with hard limits, inspect their traces, verify their audit trail.
//!
//! Reading order for newcomers: this file (commands) → `rein_runtime::Runtime::run` (the
//! driver loop) → `rein_core::Engine` (the state machine) → `rein_store::Store` (the log: SQLite or PostgreSQL).

/// `println!` for command output that ends quietly when stdout's reader has gone away
/// (`rein runs list | head`), instead of panicking on the broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod commands;

use clap::{Args, Parser, Subcommand};
use commands::{audit, check, costs, guard, run, runs, secrets, serve, tenants, worker};
#[cfg(feature = "demo")]
use commands::{bench, demo};
use rein_core::RunStatus;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit codes, stable for scripts and CI.
pub mod exit {
    /// The run completed (or the command succeeded).
    pub const OK: u8 = 0;
    /// Rein itself failed (store unreadable, I/O error).
    pub const INTERNAL: u8 = 1;
    /// Bad input: an invalid spec, script, config or flag. Nothing was run.
    pub const BAD_INPUT: u8 = 2;
    /// The run was stopped by a hard limit (`status: limit_exceeded`).
    pub const LIMIT: u8 = 3;
    /// The run failed (`status: failed`).
    pub const FAILED: u8 = 4;
    /// The run needs a person (`escalated`, `cancelled`, `awaiting_approval`).
    pub const NEEDS_PERSON: u8 = 5;
    /// `rein audit verify` found a tampered log.
    pub const TAMPERED: u8 = 6;
    /// `rein guard scan`: the text is not allowed as it is (flag, fence or block).
    pub const NOT_ALLOWED: u8 = 1;
}

/// An already-reported outcome that only needs its exit code.
#[derive(Debug)]
pub(crate) struct Exit(pub(crate) u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

#[derive(Parser)]
#[command(
    name = "rein",
    version,
    about = "A production runtime for LLM agents: hard limits, governed tools, a tamper-evident log."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Debug)]
pub(crate) struct StoreArgs {
    /// Where runs and their event logs live: an SQLite file, or a PostgreSQL URL
    /// (`postgres://user@host:5432/db`) shared by several Rein processes.
    #[arg(long, env = "REIN_DB", default_value = "rein.db")]
    pub(crate) db: String,
}

#[derive(Args, Clone, Debug)]
pub(crate) struct ConfigArgs {
    /// Operator configuration (prices, budgets, rate limits, bulkheads, scopes, counters); default ./rein.toml when present.
    #[arg(long, env = "REIN_CONFIG")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run an agent on one input until it ends.
    Run(run::RunArgs),
    /// Check an agent spec and report every problem with file, line and field.
    Check {
        /// The agent spec (YAML).
        spec: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print an agent's state graph (`flow: graph`) as a Mermaid flowchart.
    Graph {
        /// The agent spec (YAML).
        spec: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List and inspect recorded runs.
    Runs {
        #[command(subcommand)]
        command: runs::RunsCommand,
    },
    /// Decide a run's pending approval, then continue the run: the held tool call is made
    /// (or, with --deny, reported to the model as refused).
    Approve(run::ApproveArgs),
    /// Verify the hash chains of recorded runs.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Spend from recorded model calls, grouped by tenant, user, agent, model or day.
    Costs {
        /// How to group.
        #[arg(long, value_enum, default_value = "agent")]
        by: costs::CostBy,
        /// Only calls on or after this UTC day (`YYYY-MM-DD`).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value = "default", conflicts_with = "all_tenants")]
        tenant: String,
        /// Every tenant's spend (an operator view).
        #[arg(long)]
        all_tenants: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run the bundled example agents offline and show the guarantees at work.
    #[cfg(feature = "demo")]
    Demo {
        /// Serve only the example tool service (orders, refunds, tickets) on 127.0.0.1:8089
        /// until Ctrl-C, for running the specs in `examples/` by hand.
        #[arg(long)]
        serve_tools: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Measure the engine's own overhead per step and its memory per in-flight run.
    #[cfg(feature = "demo")]
    Bench(bench::BenchArgs),
    /// Execute queued runs (`rein run --detach`), and take over runs whose process died,
    /// under leases: several workers share one store and never drive one run at once.
    Worker(worker::WorkerArgs),
    /// Serve the multi-tenant HTTP API (`/v1`), driving runs with this process's own workers.
    Serve(serve::ServeArgs),
    /// Manage the tenants of `rein serve`.
    Tenants {
        #[command(subcommand)]
        command: tenants::TenantsCommand,
    },
    /// Manage the API keys of `rein serve`'s tenants.
    Keys {
        #[command(subcommand)]
        command: tenants::KeysCommand,
    },
    /// Manage the secrets each tenant's specs may name (`${NAME}`, `api_key_env`), sealed with
    /// the key in REIN_SECRETS_KEY.
    Secrets {
        #[command(subcommand)]
        command: secrets::SecretsCommand,
    },
    /// Guardrails: scan text with the injection detector the runtime uses.
    Guard {
        #[command(subcommand)]
        command: guard::GuardCommand,
    },
}

/// mimalloc rather than the C library's allocator: a gateway call allocates and frees many small
/// buffers across the async worker threads (HTTP, JSON, SQL parameters), and glibc's malloc
/// took about 9% of the gateway benchmark's CPU in a profile, arena-lock contention included.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The most threads tokio's blocking pool starts (its default is 512): the guards' checks run
/// there, and a burst of runs would otherwise start a thread each, every one with its own stack
/// and allocator heap, which stay resident until the thread idles out.
const BLOCKING_THREADS: usize = 32;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let result = runtime.block_on(dispatch(cli.command));
    // `rein run` and every other command: the spans of the runs that ended are exported
    // before the process exits.
    rein_app::telemetry::shutdown();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(*code);
            }
            if let Some(rein_runtime::RuntimeError::Busy { .. }) =
                e.downcast_ref::<rein_runtime::RuntimeError>()
            {
                eprintln!("{e}");
                return ExitCode::from(exit::LIMIT);
            }
            if let Some(bad @ rein_app::Error::BadInput(_)) = e.downcast_ref::<rein_app::Error>() {
                eprintln!("{bad}");
                return ExitCode::from(exit::BAD_INPUT);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(exit::INTERNAL)
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Run(args) => run::run(args).await,
        Command::Check { spec, config } => check::check(&spec, &config),
        Command::Graph { spec, config } => check::graph(&spec, &config),
        Command::Runs { command } => runs::runs(command).await,
        Command::Approve(args) => run::approve(args).await,
        Command::Audit {
            command:
                audit::AuditCommand::Verify {
                    run_id,
                    tenant,
                    all_tenants,
                    store,
                    config,
                },
        } => audit::audit(run_id, &tenant, all_tenants, &store, &config).await,
        Command::Audit {
            command: audit::AuditCommand::Anchor { lag, store, config },
        } => audit::anchor(lag, &store, &config).await,
        Command::Costs {
            by,
            since,
            tenant,
            all_tenants,
            json,
            store,
        } => costs::costs(by, since.as_deref(), &tenant, all_tenants, json, &store).await,
        #[cfg(feature = "demo")]
        Command::Demo {
            serve_tools: true, ..
        } => demo::serve_tools().await,
        #[cfg(feature = "demo")]
        Command::Demo { store, .. } => demo::run(&store).await,
        #[cfg(feature = "demo")]
        Command::Bench(args) => bench::run(args).await,
        Command::Worker(args) => worker::worker(args).await,
        Command::Serve(args) => serve::serve(args).await,
        Command::Tenants { command } => match command {
            tenants::TenantsCommand::Create { name, store } => {
                tenants::create_tenant(&name, &store).await
            }
            tenants::TenantsCommand::List { json, store } => {
                tenants::list_tenants(json, &store).await
            }
        },
        Command::Secrets { command } => match command {
            secrets::SecretsCommand::Key => secrets::new_key(),
            secrets::SecretsCommand::Set {
                tenant,
                name,
                store,
            } => secrets::set(&tenant, &name, &store).await,
            secrets::SecretsCommand::List {
                tenant,
                json,
                store,
            } => secrets::list(&tenant, json, &store).await,
            secrets::SecretsCommand::Delete {
                tenant,
                name,
                store,
            } => secrets::delete(&tenant, &name, &store).await,
        },
        Command::Guard {
            command:
                guard::GuardCommand::Scan {
                    source,
                    spec,
                    json,
                    config,
                },
        } => guard::guard_scan(source, spec.as_deref(), json, &config),
        Command::Keys { command } => match command {
            tenants::KeysCommand::Create {
                tenant,
                expires_in,
                store,
                ..
            } => tenants::create_key(tenant.as_deref(), expires_in.as_deref(), &store).await,
            tenants::KeysCommand::List {
                tenant,
                json,
                store,
            } => tenants::list_keys(&tenant, json, &store).await,
            tenants::KeysCommand::Revoke { tenant, id, store } => {
                tenants::revoke_key(&tenant, &id, &store).await
            }
        },
    }
}

/// Exit code for a finished run's status.
pub fn status_code(status: RunStatus) -> u8 {
    match status {
        RunStatus::Completed => exit::OK,
        RunStatus::LimitExceeded => exit::LIMIT,
        RunStatus::Failed => exit::FAILED,
        _ => exit::NEEDS_PERSON,
    }
}
