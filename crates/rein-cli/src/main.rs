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

mod anchors;
mod bench;
mod bench_gateway;
mod config;
mod demo;
mod render;
mod secrets;
mod serve;
mod telemetry;
mod views;
use serve::admin;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use rein_core::{Agent, CheckContext, Event, JobId, RunId, RunStatus, SessionId, TenantId, UserId};
use rein_providers::{Model, ProviderRouter, ScriptedModel};
use rein_runtime::{RunRequest, Runtime};
use rein_store::{Durability, Store};
use rein_tools::{Builtins, CONNECT_TIMEOUT, HttpTools, ToolBox};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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

/// Bad input from the user: reported as is, exit code 2.
#[derive(Debug)]
struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// An already-reported outcome that only needs its exit code.
#[derive(Debug)]
struct Exit(u8);

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
struct StoreArgs {
    /// Where runs and their event logs live: an SQLite file, or a PostgreSQL URL
    /// (`postgres://user@host:5432/db`) shared by several Rein processes.
    #[arg(long, env = "REIN_DB", default_value = "rein.db")]
    db: String,
}

#[derive(Args, Clone, Debug)]
struct ConfigArgs {
    /// Operator configuration (prices, budgets, rate limits, bulkheads, scopes, counters); default ./rein.toml when present.
    #[arg(long, env = "REIN_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run an agent on one input until it ends.
    Run(RunArgs),
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
        command: RunsCommand,
    },
    /// Decide a run's pending approval, then continue the run: the held tool call is made
    /// (or, with --deny, reported to the model as refused).
    Approve(ApproveArgs),
    /// Verify the hash chains of recorded runs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Spend from recorded model calls, grouped by tenant, user, agent, model or day.
    Costs {
        /// How to group.
        #[arg(long, value_enum, default_value = "agent")]
        by: CostBy,
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
    Demo {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Measure the engine's own overhead per step and its memory per in-flight run.
    Bench(bench::BenchArgs),
    /// Execute queued runs (`rein run --detach`), and take over runs whose process died,
    /// under leases: several workers share one store and never drive one run at once.
    Worker(WorkerArgs),
    /// Serve the multi-tenant HTTP API (`/v1`), driving runs with this process's own workers.
    Serve(serve::ServeArgs),
    /// Manage the tenants of `rein serve`.
    Tenants {
        #[command(subcommand)]
        command: TenantsCommand,
    },
    /// Manage the API keys of `rein serve`'s tenants.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage the secrets each tenant's specs may name (`${NAME}`, `api_key_env`), sealed with
    /// the key in REIN_SECRETS_KEY.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Guardrails: scan text with the injection detector the runtime uses.
    Guard {
        #[command(subcommand)]
        command: GuardCommand,
    },
}

#[derive(Subcommand)]
enum GuardCommand {
    /// Read text on stdin and print the verdict (`allow`, `flag`, `fence` or `block`), the
    /// score and the matched rules. Exit 0 for allow, 1 otherwise.
    Scan {
        /// Where the text would come from; picks the policy.
        #[arg(long, value_enum, default_value = "user")]
        source: GuardSource,
        /// Apply this agent's `guards` (policy and threshold) instead of the defaults.
        #[arg(long)]
        spec: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GuardSource {
    User,
    Tool,
    Document,
}

#[derive(Subcommand)]
enum TenantsCommand {
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
enum KeysCommand {
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

#[derive(Subcommand)]
enum SecretsCommand {
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

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CostBy {
    Tenant,
    User,
    Agent,
    Model,
    Day,
}

impl CostBy {
    fn group(self) -> rein_store::CostGroup {
        match self {
            CostBy::Tenant => rein_store::CostGroup::Tenant,
            CostBy::User => rein_store::CostGroup::User,
            CostBy::Agent => rein_store::CostGroup::Agent,
            CostBy::Model => rein_store::CostGroup::Model,
            CostBy::Day => rein_store::CostGroup::Day,
        }
    }
}

/// How a run is executed and reported: shared by `run` and `runs resume`.
#[derive(Args)]
struct ExecArgs {
    /// Replay model responses from this script instead of calling a provider.
    #[arg(long)]
    script: Option<PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct RunArgs {
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
struct WorkerArgs {
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

/// A duration that may be zero (`0s`: no lag, for a store only one machine writes).
fn parse_lag(text: &str) -> Result<std::time::Duration, String> {
    rein_core::duration::parse_duration_or_zero(text)
}

fn parse_lease(text: &str) -> Result<std::time::Duration, String> {
    rein_core::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum RunsCommand {
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

#[derive(Args)]
struct ResumeArgs {
    run_id: String,
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Resume even while another process holds the run's lease (it is known to be dead).
    #[arg(long)]
    take_over: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

/// A run state, as `--status` takes it.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum StatusArg {
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

#[derive(Args)]
struct ApproveArgs {
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
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(Subcommand)]
enum AuditCommand {
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
const AUDIT_PAGE: u32 = 1000;

/// mimalloc rather than the C library's allocator: a gateway call allocates and frees many small
/// buffers across the async worker threads (HTTP, JSON, SQL parameters), and glibc's malloc
/// took about 9% of the gateway benchmark's CPU in a profile, arena-lock contention included.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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
    telemetry::shutdown();
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
            if let Some(bad) = e.downcast_ref::<BadInput>() {
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
        Command::Run(args) => run(args).await,
        Command::Check { spec, config } => check(&spec, &config),
        Command::Graph { spec, config } => graph(&spec, &config),
        Command::Runs { command } => runs(command).await,
        Command::Approve(args) => {
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
                exec: args.exec,
            };
            continue_run(resume, Some(decision)).await
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    run_id,
                    tenant,
                    all_tenants,
                    store,
                    config,
                },
        } => audit(run_id, &tenant, all_tenants, &store, &config).await,
        Command::Audit {
            command: AuditCommand::Anchor { lag, store, config },
        } => anchor(lag, &store, &config).await,
        Command::Costs {
            by,
            since,
            tenant,
            all_tenants,
            json,
            store,
        } => costs(by, since.as_deref(), &tenant, all_tenants, json, &store).await,
        Command::Demo { store } => demo::run(&store).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Worker(args) => worker(args).await,
        Command::Serve(args) => serve::serve(args).await,
        Command::Tenants { command } => match command {
            TenantsCommand::Create { name, store } => admin::create_tenant(&name, &store).await,
            TenantsCommand::List { json, store } => admin::list_tenants(json, &store).await,
        },
        Command::Secrets { command } => match command {
            SecretsCommand::Key => secrets::new_key(),
            SecretsCommand::Set {
                tenant,
                name,
                store,
            } => secrets::set(&tenant, &name, &store).await,
            SecretsCommand::List {
                tenant,
                json,
                store,
            } => secrets::list(&tenant, json, &store).await,
            SecretsCommand::Delete {
                tenant,
                name,
                store,
            } => secrets::delete(&tenant, &name, &store).await,
        },
        Command::Guard {
            command:
                GuardCommand::Scan {
                    source,
                    spec,
                    json,
                    config,
                },
        } => guard_scan(source, spec.as_deref(), json, &config),
        Command::Keys { command } => match command {
            KeysCommand::Create {
                tenant,
                expires_in,
                store,
                ..
            } => admin::create_key(tenant.as_deref(), expires_in.as_deref(), &store).await,
            KeysCommand::List {
                tenant,
                json,
                store,
            } => admin::list_keys(&tenant, json, &store).await,
            KeysCommand::Revoke { tenant, id, store } => {
                admin::revoke_key(&tenant, &id, &store).await
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

/// A reqwest client for providers and HTTP tools.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("rein/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the HTTP client")
}

/// Parses and checks a spec, turning every problem into a [`BadInput`].
pub fn parse_agent(
    file: &str,
    source: &str,
    config: &config::Config,
    builtins: &Builtins,
) -> anyhow::Result<Arc<Agent>> {
    let infos = builtins.infos();
    let ctx = CheckContext {
        prices: &config.prices,
        builtin_tools: &infos,
    };
    Agent::parse(file, source, &ctx)
        .map(Arc::new)
        .map_err(|errors| {
            let n = errors.diagnostics.len();
            anyhow!(BadInput(format!(
                "{errors}\n{file}: {n} problem{} found",
                if n == 1 { "" } else { "s" }
            )))
        })
}

fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow!(BadInput(format!("{}: cannot read: {e}", path.display()))))
}

fn check(spec: &Path, config: &ConfigArgs) -> anyhow::Result<u8> {
    let config =
        config::load(config.config.as_deref()).map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
    let file = spec.display().to_string();
    let agent = parse_agent(&file, &read_file(spec)?, &config, &Builtins::standard())?;
    let mut seen = std::collections::BTreeSet::from([file.clone()]);
    check_workers(&file, &agent, &config, &mut seen)?;
    let s = &agent.spec;
    say!(
        "{file}: ok: {} v{}, {} tool{}, model {} ({} per M input, {} per M output); limits: {} iterations, {} tokens, {}, {:?} wall clock",
        s.name,
        s.version,
        s.tools.len(),
        if s.tools.len() == 1 { "" } else { "s" },
        s.model.primary,
        agent.prices[&s.model.primary.id].input,
        agent.prices[&s.model.primary.id].output,
        s.limits.max_iterations,
        s.limits.max_total_tokens,
        s.limits.max_cost_usd,
        s.limits.timeout,
    );
    // The data-flow rule changes what a run does once untrusted content is in it: say so,
    // rather than let a first held call be the surprise.
    let guarded: Vec<&str> = s
        .tools
        .iter()
        .filter(|t| {
            t.contract.side_effects == rein_core::spec::SideEffects::External
                && !s.guards.allows_host_of(&t.source)
        })
        .map(|t| t.name.as_str())
        .collect();
    if !guarded.is_empty() && s.guards.data_flow != rein_core::guard::DataFlow::Off {
        let what = if s.guards.data_flow == rein_core::guard::DataFlow::Refuse {
            "are refused"
        } else {
            "wait for a person's approval"
        };
        say!(
            "{file}: note: once untrusted content (a flagged input, a tool's or document's result) is in a run, calls to {} (side_effects: external) {what}: the data-flow rule; `guards.allow_hosts` or `guards.data_flow` changes it",
            guarded
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(plan) = s.flow.plan() {
        say!(
            "{file}: flow: plan_execute, plans of at most {} steps, {} revision(s), {} retry(ies) per step",
            plan.max_steps,
            plan.max_revisions,
            plan.retries
        );
    }
    if let Some(graph) = s.flow.graph() {
        say!(
            "{file}: flow: a graph of {} nodes from `{}` (`rein graph {file}` draws it)",
            graph.nodes.len(),
            graph.start
        );
    }
    Ok(exit::OK)
}

/// The worker agents `agent` calls that are files, checked too (each once: an agent may call
/// itself, which `limits.max_depth` bounds at run time). Registered agents are only named.
fn check_workers(
    file: &str,
    agent: &Agent,
    config: &config::Config,
    seen: &mut std::collections::BTreeSet<String>,
) -> anyhow::Result<()> {
    use rein_core::spec::{ToolSource, WorkerFallback};
    for (i, tool) in agent.spec.tools.iter().enumerate() {
        let ToolSource::Agent(worker) = &tool.source else {
            continue;
        };
        let fallback = match &worker.fallback {
            Some(WorkerFallback::Agent(other)) => Some(("fallback.agent", other)),
            _ => None,
        };
        for (field, reference) in std::iter::once(("spec", &worker.spec)).chain(fallback) {
            if !(reference.ends_with(".yaml") || reference.ends_with(".yml")) {
                say!(
                    "{file}: worker `{}`: `{reference}` is looked up among the agents registered with rein serve",
                    tool.name
                );
                continue;
            }
            if !seen.insert(reference.clone()) {
                continue;
            }
            let source = std::fs::read_to_string(reference).map_err(|e| {
                anyhow!(BadInput(format!(
                    "{file}: tools[{i}].source.agent.{field}: cannot read the worker spec {reference}: {e}"
                )))
            })?;
            let child = parse_agent(reference, &source, config, &Builtins::standard())?;
            say!(
                "{reference}: ok: worker `{}` of {file} ({} v{})",
                tool.name,
                child.spec.name,
                child.spec.version
            );
            check_workers(reference, &child, config, seen)?;
        }
    }
    Ok(())
}

/// `rein graph`: the spec's graph, checked, as Mermaid on stdout.
fn graph(spec: &Path, config: &ConfigArgs) -> anyhow::Result<u8> {
    let config =
        config::load(config.config.as_deref()).map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
    let file = spec.display().to_string();
    let agent = parse_agent(&file, &read_file(spec)?, &config, &Builtins::standard())?;
    let Some(graph) = agent.spec.flow.graph() else {
        return Err(anyhow!(BadInput(format!(
            "{file}: flow: this agent's flow is `react`, not a graph"
        ))));
    };
    say!("{}", graph.mermaid().trim_end());
    Ok(exit::OK)
}

/// `rein guard scan`: the runtime's own check (`Guards::check`) on stdin.
fn guard_scan(
    source: GuardSource,
    spec: Option<&Path>,
    json: bool,
    config: &ConfigArgs,
) -> anyhow::Result<u8> {
    use rein_core::guard::{Guards, Source, Verdict};
    use std::io::Read as _;
    let guards = match spec {
        None => Guards::default(),
        Some(spec) => {
            let config = config::load(config.config.as_deref())
                .map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
            let file = spec.display().to_string();
            parse_agent(&file, &read_file(spec)?, &config, &Builtins::standard())?
                .spec
                .guards
                .clone()
        }
    };
    let source = match source {
        GuardSource::User => Source::User,
        GuardSource::Tool => Source::Tool,
        GuardSource::Document => Source::Document,
    };
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| anyhow!(BadInput(format!("stdin is not readable UTF-8 text: {e}"))))?;
    let (verdict, detection) = guards.check(&text, source);
    // `escalate` keeps the text from the model like `block`; it is shown as `block` with the
    // action named, so the four verdicts stay the interface.
    let shown = if verdict == Verdict::Escalate {
        Verdict::Block
    } else {
        verdict
    };
    if json {
        say!(
            "{}",
            serde_json::json!({
                "verdict": shown.as_str(),
                "escalate": verdict == Verdict::Escalate,
                "source": source.as_str(),
                "policy": guards.policy(source).as_str(),
                "score": detection.score,
                "threshold": guards.threshold,
                "rules": detection.rules,
            })
        );
    } else {
        let action = if verdict == Verdict::Escalate {
            " (escalate to a person)"
        } else {
            ""
        };
        say!("verdict: {}{action}", shown.as_str());
        say!(
            "score: {} (threshold {}, policy for {}: {})",
            detection.score,
            guards.threshold,
            source.as_str(),
            guards.policy(source).as_str()
        );
        for r in &detection.rules {
            say!(
                "rule: {} ({}, in {}): {:?}",
                r.rule,
                r.weight,
                r.view,
                r.excerpt
            );
        }
    }
    Ok(if verdict == Verdict::Allow {
        exit::OK
    } else {
        exit::NOT_ALLOWED
    })
}

/// The model a spec runs on: the script if one is given, else its provider from the environment.
pub fn model_for(
    agent: &Agent,
    script: Option<&Path>,
    http: reqwest::Client,
) -> anyhow::Result<Box<dyn Model>> {
    if let Some(path) = script {
        let model = ScriptedModel::parse(&path.display().to_string(), &read_file(path)?)
            .map_err(|e| anyhow!(BadInput(e.to_string())))?;
        return Ok(Box::new(model));
    }
    let router = ProviderRouter::from_env(http);
    // Only models of the configured endpoints need the operator's keys; a compatible server
    // named in the spec brings its own (or none).
    let uses = |provider: &str| {
        agent
            .spec
            .model
            .all()
            .any(|m| m.provider() == provider && m.base_url.is_none())
    };
    let missing = |var: &str| std::env::var(var).map_or(true, |k| k.is_empty());
    if uses("openai")
        && router.openai.base_url() == rein_providers::DEFAULT_BASE_URL
        && missing("OPENAI_API_KEY")
    {
        return Err(anyhow!(BadInput(
            "OPENAI_API_KEY is not set: set it, point OPENAI_BASE_URL at a compatible server (or name one in the spec as `{name, provider: openai, base_url}`), or pass --script FILE to replay scripted responses".into()
        )));
    }
    if uses("anthropic")
        && router.anthropic.base_url() == rein_providers::ANTHROPIC_BASE_URL
        && missing("ANTHROPIC_API_KEY")
    {
        return Err(anyhow!(BadInput(
            "ANTHROPIC_API_KEY is not set: set it, point ANTHROPIC_BASE_URL at a compatible endpoint, or pass --script FILE to replay scripted responses".into()
        )));
    }
    Ok(Box::new(router))
}

/// The runtime the configuration asks for: shared budgets, rate limits and breakers kept in
/// Redis when `[counters]` names one, else in the embedded store.
pub async fn runtime_for(
    config: &config::Config,
    store: &Arc<dyn Store>,
    builtins: Builtins,
    http: reqwest::Client,
) -> anyhow::Result<Runtime> {
    let counters: Arc<dyn rein_core::budget::Counters> = match &config.counters {
        Some(c) => Arc::new(
            rein_redis::RedisCounters::connect(&c.url, &c.prefix)
                .await
                .with_context(|| format!("cannot reach the shared counters at {}", c.url))?,
        ),
        None => store.clone(),
    };
    let workers = Arc::new(WorkerSpecs {
        prices: config.prices.clone(),
        builtins: builtins.clone(),
        store: store.clone(),
        files: true,
    });
    let egress = rein_tools::Egress::new(config.egress.clone(), CONNECT_TIMEOUT)
        .context("cannot build the HTTP client for tenants' calls")?;
    let secret_key = rein_runtime::SecretKey::from_env()
        .map_err(|e| anyhow::anyhow!(BadInput(e.to_string())))?;
    let runtime = Runtime::new(
        store.clone(),
        ToolBox::new(builtins, HttpTools::new(http, egress)),
    )
    .with_secret_key(secret_key)
    .with_workers(workers)
    .with_governor(rein_runtime::Governor {
        counters,
        budgets: config.budgets.clone(),
    })
    .with_rate_limits(config.rate_limits.clone())
    .with_bulkheads(config.bulkheads.clone());
    Ok(match telemetry::exporter(&config.telemetry)? {
        Some(otlp) => runtime.with_spans(otlp),
        None => runtime,
    })
}

/// Finds the worker agents a spec calls (`source: {agent: {spec: ...}}`): a reference ending in
/// `.yaml` or `.yml` is a file, relative to where rein runs; any other is an agent registered
/// for the caller's tenant (`POST /v1/agents`), in its newest version.
pub struct WorkerSpecs {
    prices: rein_core::PriceTable,
    builtins: Builtins,
    store: Arc<dyn Store>,
    /// Whether file references are read. Not for runs whose specs came over the API (`rein
    /// serve`, and `rein worker`, which drives them too): a tenant must not make the server
    /// read its files.
    files: bool,
}

impl WorkerSpecs {
    /// Registered agents only: for processes that drive runs other people submitted.
    pub fn registered_only(
        config: &config::Config,
        store: &Arc<dyn Store>,
        builtins: Builtins,
    ) -> Arc<Self> {
        Arc::new(WorkerSpecs {
            prices: config.prices.clone(),
            builtins,
            store: store.clone(),
            files: false,
        })
    }
}

impl rein_runtime::Workers for WorkerSpecs {
    fn resolve<'a>(
        &'a self,
        tenant: &'a TenantId,
        reference: &'a str,
        trust: rein_core::Trust,
    ) -> rein_runtime::workers::BoxFuture<'a, Result<(Agent, String, rein_core::Trust), String>>
    {
        Box::pin(async move {
            let file = reference.ends_with(".yaml") || reference.ends_with(".yml");
            let (source, author) = if file && (!self.files || trust == rein_core::Trust::Tenant) {
                return Err(format!(
                    "`{reference}` is a file, and this process only runs registered agents as workers (register it with POST /v1/agents and name it)"
                ));
            } else if file {
                let source = tokio::fs::read_to_string(reference)
                    .await
                    .map_err(|e| format!("cannot read {reference}: {e}"))?;
                (source, rein_core::Trust::Operator)
            } else {
                // An agent registered over the API is the tenant's text, whoever calls it.
                let stored = self
                    .store
                    .agent(tenant, reference, None)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no agent `{reference}` is registered"))?;
                (stored.spec, rein_core::Trust::Tenant)
            };
            let (agent, source) = parse_worker(&self.prices, &self.builtins, reference, source)?;
            Ok((agent, source, author))
        })
    }

    fn pinned(&self, reference: &str, source: String) -> Result<Agent, String> {
        parse_worker(&self.prices, &self.builtins, reference, source).map(|(agent, _)| agent)
    }
}

/// A worker's spec, checked: the agent and its source, or the problems as one message.
pub fn parse_worker(
    prices: &rein_core::PriceTable,
    builtins: &Builtins,
    reference: &str,
    source: String,
) -> Result<(Agent, String), String> {
    let infos = builtins.infos();
    let ctx = CheckContext {
        prices,
        builtin_tools: &infos,
    };
    let agent = Agent::parse(reference, &source, &ctx).map_err(|e| e.to_string())?;
    Ok((agent, source))
}

async fn open_store(store: &StoreArgs) -> anyhow::Result<Arc<dyn Store>> {
    rein_store::open(&store.db, Durability::Process)
        .await
        .with_context(|| {
            format!(
                "cannot open the store {}",
                rein_store::redact_url(&store.db)
            )
        })
}

/// Opens a store that must already hold runs: a missing SQLite file is a mistake (a typo in
/// `--db`), not a reason to create an empty one.
async fn open_existing_store(store: &StoreArgs) -> anyhow::Result<Arc<dyn Store>> {
    if !rein_store::is_postgres_url(&store.db) && !Path::new(&store.db).exists() {
        return Err(anyhow!(BadInput(format!(
            "{}: no such store; run an agent first (e.g. `rein demo`) or pass --db PATH",
            store.db
        ))));
    }
    open_store(store).await
}

async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let config = config::load(args.exec.config.config.as_deref())
        .map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
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
    let store = open_store(&args.exec.store).await?;
    let runtime = runtime_for(&config, &store, builtins, http).await?;
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
    store.close().await;
    print_outcome(&outcome, args.exec.json, args.exec.json);
    Ok(status_code(outcome.status))
}

/// Prints how a run ended; `show_output` is false when its text was already streamed.
fn print_outcome(outcome: &rein_runtime::RunOutcome, json: bool, show_output: bool) {
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

/// `rein worker`: claims and drives runs until stopped (or, with --until-idle, until none is
/// queued or running).
async fn worker(args: WorkerArgs) -> anyhow::Result<u8> {
    let config = config::load(args.exec.config.config.as_deref())
        .map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
    telemetry::init_logs(&config.telemetry)?;
    let store = open_store(&args.exec.store).await?;
    let builtins = Builtins::standard();
    let http = http_client()?;
    let model: Box<dyn Model> = match args.exec.script.as_deref() {
        Some(path) => Box::new(
            ScriptedModel::parse(&path.display().to_string(), &read_file(path)?)
                .map_err(|e| anyhow!(BadInput(e.to_string())))?,
        ),
        None => Box::new(ProviderRouter::from_env(http.clone())),
    };
    let runtime = runtime_for(&config, &store, builtins.clone(), http)
        .await?
        .with_workers(WorkerSpecs::registered_only(&config, &store, builtins))
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

/// `rein runs cancel`: recorded as `cli:$USER`, as the admin commands are.
async fn cancel(
    id: RunId,
    tenant: TenantId,
    wait: Option<std::time::Duration>,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let store = open_existing_store(store).await?;
    let tools = ToolBox::new(
        Builtins::standard(),
        HttpTools::new(http_client()?, rein_tools::Egress::closed(CONNECT_TIMEOUT)?),
    );
    let runtime = Runtime::new(store.clone(), tools);
    let actor = serve::admin::cli_actor();
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
async fn until_ended(
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

async fn resume(args: ResumeArgs) -> anyhow::Result<u8> {
    continue_run(args, None).await
}

/// Continues an unfinished run, after recording `decision` on its pending approval if given.
async fn continue_run(
    args: ResumeArgs,
    decision: Option<rein_runtime::Decision>,
) -> anyhow::Result<u8> {
    let config = config::load(args.exec.config.config.as_deref())
        .map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
    let store = open_existing_store(&args.exec.store).await?;
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
    let runtime = runtime_for(&config, &store, builtins, http).await?;
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
    store.close().await;
    print_outcome(&outcome, args.exec.json, true);
    Ok(status_code(outcome.status))
}

async fn runs(command: RunsCommand) -> anyhow::Result<u8> {
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
            let store = open_existing_store(&store).await?;
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
            let store = open_existing_store(&store).await?;
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

/// `rein audit anchor`.
async fn anchor(
    lag: std::time::Duration,
    store: &StoreArgs,
    config: &ConfigArgs,
) -> anyhow::Result<u8> {
    let config =
        config::load(config.config.as_deref()).map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
    let store = open_existing_store(store).await?;
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

async fn audit(
    run_id: Option<String>,
    tenant: &str,
    all_tenants: bool,
    store: &StoreArgs,
    config: &ConfigArgs,
) -> anyhow::Result<u8> {
    let config =
        config::load(config.config.as_deref()).map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
    let store = open_existing_store(store).await?;
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
        while let Some(page) = admin::admin_log_page(store.as_ref(), after, AUDIT_PAGE).await? {
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

/// The tenants, keys and secrets the store holds, for holding against the admin log, and how
/// many tenants and keys it held before the log began (its baseline): those have no entries,
/// and the log cannot vouch for them.
async fn held(
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
async fn verify_runs(
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

/// Spend per group as `rein costs --json` and `GET /v1/costs` print it.
fn costs_json(by: CostBy, lines: &[rein_store::CostLine]) -> views::CostsView {
    views::CostsView::of(&format!("{by:?}").to_lowercase(), lines)
}

async fn costs(
    by: CostBy,
    since: Option<&str>,
    tenant: &str,
    all_tenants: bool,
    json: bool,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let since_ms = match since {
        None => 0,
        Some(day) => rein_core::time::parse_utc_day(day).ok_or_else(|| {
            anyhow!(BadInput(format!(
                "--since {day}: expected a UTC day as YYYY-MM-DD"
            )))
        })?,
    };
    let store = open_existing_store(store).await?;
    let tenant = TenantId::new(tenant);
    let lines = store
        .costs((!all_tenants).then_some(&tenant), by.group(), since_ms)
        .await?;
    let total = lines
        .iter()
        .fold(rein_core::Usd::ZERO, |sum, l| sum + l.cost);
    if json {
        say!("{}", serde_json::json!(costs_json(by, &lines)));
        return Ok(exit::OK);
    }
    let mut rows = vec![[
        format!("{by:?}").to_uppercase(),
        "CALLS".into(),
        "TOKENS".into(),
        "COST".into(),
    ]];
    for l in &lines {
        rows.push([
            l.key.clone(),
            l.calls.to_string(),
            l.usage.total().to_string(),
            l.cost.to_string(),
        ]);
    }
    rows.push([
        "total".into(),
        lines.iter().map(|l| l.calls).sum::<u64>().to_string(),
        lines
            .iter()
            .map(|l| l.usage.total())
            .sum::<u64>()
            .to_string(),
        total.to_string(),
    ]);
    say!("{}", render::table(&rows));
    Ok(exit::OK)
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
