//! The wiring every surface shares: the HTTP client, the store, the model, and the runtime the
//! configuration asks for, each opened once here so `rein run`, `rein serve` and `rein worker`
//! build them the same way.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::workers::WorkerSpecs;
use rein_core::{Agent, CheckContext};
use rein_providers::{Model, ProviderRouter, ScriptedModel};
use rein_runtime::Runtime;
use rein_store::{Durability, Store};
use rein_tools::{Builtins, CONNECT_TIMEOUT, HttpTools, ToolBox};
use std::path::Path;
use std::sync::Arc;

/// A reqwest client for providers and HTTP tools.
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("rein/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::unavailable("cannot build the HTTP client", e))
}

/// Parses and checks a spec, turning every problem into [`Error::BadInput`].
pub fn parse_agent(
    file: &str,
    source: &str,
    config: &Config,
    builtins: &Builtins,
) -> Result<Arc<Agent>> {
    let infos = builtins.infos();
    let ctx = CheckContext {
        prices: &config.prices,
        builtin_tools: &infos,
        providers: rein_providers::PROVIDERS,
    };
    Agent::parse(file, source, &ctx)
        .map(Arc::new)
        .map_err(|errors| {
            let n = errors.diagnostics.len();
            Error::BadInput(format!(
                "{errors}\n{file}: {n} problem{} found",
                if n == 1 { "" } else { "s" }
            ))
        })
}

/// A file the user named (a spec, a script, a guard text): unreadable is bad input.
pub fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::BadInput(format!("{}: cannot read: {e}", path.display())))
}

/// A model script (`--script FILE`): scripted responses replayed instead of calling providers.
pub fn scripted_model(path: &Path) -> Result<ScriptedModel> {
    ScriptedModel::parse(&path.display().to_string(), &read_file(path)?)
        .map_err(|e| Error::BadInput(e.to_string()))
}

/// The model a spec runs on: the script if one is given, else its provider from the environment.
pub fn model_for(
    agent: &Agent,
    script: Option<&Path>,
    http: reqwest::Client,
) -> Result<Box<dyn Model>> {
    if let Some(path) = script {
        return Ok(Box::new(scripted_model(path)?));
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
        return Err(Error::bad_input(
            "OPENAI_API_KEY is not set: set it, point OPENAI_BASE_URL at a compatible server (or name one in the spec as `{name, provider: openai, base_url}`), or pass --script FILE to replay scripted responses",
        ));
    }
    if uses("anthropic")
        && router.anthropic.base_url() == rein_providers::ANTHROPIC_BASE_URL
        && missing("ANTHROPIC_API_KEY")
    {
        return Err(Error::bad_input(
            "ANTHROPIC_API_KEY is not set: set it, point ANTHROPIC_BASE_URL at a compatible endpoint, or pass --script FILE to replay scripted responses",
        ));
    }
    Ok(Box::new(router))
}

/// The runtime the configuration asks for: shared budgets, rate limits and breakers kept in
/// Redis when `[counters]` names one, else in the embedded store. Its worker agents are
/// registered agents only ([`WorkerSpecs::registered_only`]); a local user's run reads worker
/// spec files by replacing them with [`WorkerSpecs::files_relative_to`].
pub async fn runtime_for(
    config: &Config,
    store: &Arc<dyn Store>,
    builtins: Builtins,
    http: reqwest::Client,
) -> Result<Runtime> {
    let counters: Arc<dyn rein_core::budget::Counters> = match &config.counters {
        Some(c) => Arc::new(
            rein_redis::RedisCounters::connect(&c.url, &c.prefix)
                .await
                .map_err(|e| {
                    Error::unavailable(format!("cannot reach the shared counters at {}", c.url), e)
                })?,
        ),
        None => store.clone(),
    };
    let workers = WorkerSpecs::registered_only(config, store, builtins.clone());
    let egress = rein_tools::Egress::new(config.egress.clone(), CONNECT_TIMEOUT)
        .map_err(|e| Error::unavailable("cannot build the HTTP client for tenants' calls", e))?;
    let secret_key =
        rein_runtime::SecretKey::from_env().map_err(|e| Error::BadInput(e.to_string()))?;
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
    Ok(match crate::telemetry::exporter(&config.telemetry)? {
        Some(otlp) => runtime.with_spans(otlp),
        None => runtime,
    })
}

/// Opens (and creates, for a new SQLite file) the store at `db`: an SQLite path or a
/// PostgreSQL URL.
pub async fn open_store(db: &str) -> Result<Arc<dyn Store>> {
    rein_store::open(db, Durability::Process)
        .await
        .map_err(|e| {
            Error::unavailable(
                format!("cannot open the store {}", rein_store::redact_url(db)),
                e,
            )
        })
}

/// Opens a store that must already hold runs: a missing SQLite file is a mistake (a typo in
/// `--db`), not a reason to create an empty one.
pub async fn open_existing_store(db: &str) -> Result<Arc<dyn Store>> {
    if !rein_store::is_postgres_url(db) && !Path::new(db).exists() {
        return Err(Error::BadInput(format!(
            "{db}: no such store; run an agent first (e.g. `rein demo`) or pass --db PATH"
        )));
    }
    open_store(db).await
}
