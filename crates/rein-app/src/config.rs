//! `rein.toml`: operator configuration: prices, shared budgets, and where their counters live.
//!
//! ```toml
//! [prices."openai/my-finetune"]   # USD per million tokens
//! input = 0.30
//! cached_input = 0.15             # defaults to `input`
//! cache_write = 0.375             # prompt-cache writes; defaults to `input`
//! output = 1.20
//!
//! [budgets]                       # defaults for every tenant; absent keys are uncapped
//! warn_at_percent = 75            # a budget_warning event when spend crosses this share of a cap
//! tenant_daily_usd = 50.0
//! user_daily_usd = 5.0
//!
//! scopes = ["orders:read"]        # (top level) authorisation scopes every tenant is granted
//!
//! [tenants.acme]                  # per-tenant overrides of [budgets] keys, and its own scopes
//! tenant_daily_usd = 200.0
//! scopes = ["orders:read", "orders:write"]
//!
//! [rate_limits]                   # model calls and tokens per window; absent keys: unlimited
//! window = "1m"
//! mode = "delay"                  # or "reject"
//! max_wait = "30s"                # delay at most this long, else reject
//! tenant_requests = 600           # also tenant_tokens, user_requests/_tokens, session_requests/_tokens
//!
//! [tenants.acme.rate_limits]      # per-tenant overrides
//! tenant_requests = 6000
//!
//! [bulkheads]                     # concurrently executing runs per tenant; absent: no cap
//! max_concurrent_runs = 10        # per tenant: [tenants.acme] max_concurrent_runs = 50
//! max_queued = 100                # waiting runs beyond this are refused
//! queue_wait = "60s"              # and so is a run that waited this long
//!
//! [gateway]                       # POST /v1/chat/completions (rein serve)
//! max_output_tokens = 4096        # the most one call may ask for
//! max_cost_usd = 1.0              # the most one call may cost, worst case
//! timeout = "120s"                # one call, retries and fallbacks included
//! cache_ttl = "10m"               # exact-match response cache per tenant; absent: off
//! cache_max_bytes = 67108864      # the cache's memory bound
//! [gateway.fallbacks]             # tried in order when a model fails or its breaker is open
//! "openai/gpt-4o" = ["openai/gpt-4o-mini"]
//!
//! [server]                        # rein serve; flags override these
//! listen = "127.0.0.1:8080"
//! workers = 8                     # runs this process drives at once (0: none, API only)
//! lease = "30s"                   # how long a run's lease lasts unless renewed
//! request_timeout = "30s"         # any request but an event stream, a `wait` run or a gateway call
//! max_body_bytes = 1048576
//! header_timeout = "10s"          # a connection's request head (and, between requests, the
//!                                 # next one) must arrive within this, or it is closed
//! body_timeout = "30s"            # a request's body must arrive within this
//! max_connections = 4096          # open connections at once; more wait to be accepted
//! max_runs_per_tenant = 6         # runs of one tenant the workers drive at once (rein serve:
//!                                 # three quarters of its workers by default)
//! admin_key_sha256 = "9f86d0..."  # the admin key's SHA-256 (`rein keys create --admin`), or
//!                                 # the key itself in REIN_ADMIN_KEY; absent: no admin API
//!
//! [egress]                        # where tenants' specs (registered over the API) may connect:
//! allow = ["10.1.0.0/16", "tools.internal"]  # internal ranges, addresses and hosts opened to
//!                                 # them; loopback, private, link-local and metadata addresses
//!                                 # are otherwise refused
//!
//! [audit]
//! anchor_every = "10m"            # rein serve anchors the store this often ("0s": never)
//! anchor_file = "/var/lib/rein-anchors/anchors.jsonl"   # and appends each anchor here too,
//!                                 # where the database's writers cannot write
//!
//! [counters]                      # absent: the embedded store (one process)
//! url = "redis://127.0.0.1:6379"  # shared by several Rein processes
//! prefix = "rein"
//! ```

use crate::error::{Error, Result};
use rein_core::budget::{BudgetPolicy, Budgets, Cap};
use rein_core::bulkhead::{BulkheadPolicy, Bulkheads};
use rein_core::rate::{OverLimit, RateLimit, RateLimits, RatePolicy};
use rein_core::{Price, PriceTable, TenantId, Usd};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A problem in the config file: bad input, named by file and key.
macro_rules! bad {
    ($($arg:tt)*) => {
        Error::BadInput(format!($($arg)*))
    };
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    prices: BTreeMap<String, PriceEntry>,
    #[serde(default)]
    budgets: BudgetEntry,
    /// Authorisation scopes granted to every tenant without its own `scopes`.
    #[serde(default)]
    scopes: Vec<String>,
    /// Per-tenant tables: budget keys and `scopes`.
    #[serde(default)]
    tenants: BTreeMap<String, toml::Table>,
    #[serde(default)]
    counters: Option<CountersConfig>,
    #[serde(default)]
    rate_limits: RateEntry,
    #[serde(default)]
    bulkheads: BulkheadEntry,
    #[serde(default)]
    gateway: GatewayEntry,
    #[serde(default)]
    server: ServerEntry,
    #[serde(default)]
    telemetry: Telemetry,
    #[serde(default)]
    egress: EgressEntry,
    #[serde(default)]
    audit: AuditEntry,
}

/// `[audit]`: audit anchors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditEntry {
    anchor_every: Option<String>,
    anchor_file: Option<PathBuf>,
}

/// Audit anchors (`rein_core::anchor`): how often `rein serve` makes one, and the file outside
/// the database each is appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// `None`: never.
    pub anchor_every: Option<std::time::Duration>,
    /// Where each anchor is appended as a JSON line, if anywhere.
    pub anchor_file: Option<PathBuf>,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            anchor_every: Some(std::time::Duration::from_secs(600)),
            anchor_file: None,
        }
    }
}

/// `[egress]`: what tenants' tools and models may reach besides public addresses.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressEntry {
    #[serde(default)]
    allow: Vec<String>,
}

/// `[telemetry]`: what `rein serve` exposes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// Serve Prometheus metrics at `/metrics` (on by default).
    #[serde(default = "yes")]
    pub metrics: bool,
    /// Who may read `/metrics`: anyone who reaches the port (`none`, the default, as
    /// Prometheus scrapes) or only callers with the admin key (`admin`).
    #[serde(default)]
    pub metrics_auth: MetricsAuth,
    /// Where to export traces over OTLP/HTTP (the base URL, as in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, which takes precedence); none: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// How `rein serve` and `rein worker` write their logs to standard error (`REIN_LOG_FORMAT`
    /// overrides it).
    #[serde(default)]
    pub log_format: LogFormat,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line, its fields at the top level (run_id, trace_id, ...).
    Json,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            metrics: true,
            metrics_auth: MetricsAuth::None,
            otlp_endpoint: None,
            log_format: LogFormat::Text,
        }
    }
}

fn yes() -> bool {
    true
}

/// Who may read `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAuth {
    /// Anyone who reaches the port.
    #[default]
    None,
    /// Callers with the admin key.
    Admin,
}

/// `[server]`: `rein serve`'s listener, workers, request limits and admin key.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerEntry {
    listen: Option<String>,
    workers: Option<usize>,
    lease: Option<String>,
    request_timeout: Option<String>,
    max_body_bytes: Option<usize>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    max_connections: Option<usize>,
    max_runs_per_tenant: Option<u32>,
    admin_key_sha256: Option<String>,
}

/// `rein serve`'s settings; `None` where the command line's flag or its default decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Address to listen on.
    pub listen: Option<std::net::SocketAddr>,
    /// Runs the process drives at once.
    pub workers: Option<usize>,
    /// A run's lease.
    pub lease: Option<std::time::Duration>,
    /// The longest an ordinary request may take. Event streams, `wait: true` runs and gateway
    /// calls have their own, longer bounds.
    pub request_timeout: std::time::Duration,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's head, and stay idle between
    /// requests.
    pub header_timeout: std::time::Duration,
    /// How long a request's body may take to arrive.
    pub body_timeout: std::time::Duration,
    /// Connections open at once; more wait in the listen queue.
    pub max_connections: usize,
    /// Runs of one tenant the workers claim while that many are driven; `None`: the command's
    /// default.
    pub max_runs_per_tenant: Option<u32>,
    /// The SHA-256 (lowercase hex) of the admin key, for tenant and key management over HTTP.
    pub admin_key_sha256: Option<String>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: None,
            workers: None,
            lease: None,
            request_timeout: std::time::Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(30),
            max_connections: 4096,
            max_runs_per_tenant: None,
            admin_key_sha256: None,
        }
    }
}

fn server(entry: &ServerEntry, file: &str) -> Result<Server> {
    let defaults = Server::default();
    let duration = |key: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|v| rein_core::parse_duration(v).map_err(|e| bad!("{file}: server.{key}: {e}")))
            .transpose()
    };
    let listen = entry
        .listen
        .as_deref()
        .map(|l| {
            l.parse().map_err(|_| {
                bad!("{file}: server.listen: {l:?} is not an address like 127.0.0.1:8080")
            })
        })
        .transpose()?;
    let max_body_bytes = entry.max_body_bytes.unwrap_or(defaults.max_body_bytes);
    if max_body_bytes < 1024 {
        return Err(bad!("{file}: server.max_body_bytes: must be at least 1024"));
    }
    let request_timeout =
        duration("request_timeout", &entry.request_timeout)?.unwrap_or(defaults.request_timeout);
    if request_timeout.is_zero() {
        return Err(bad!(
            "{file}: server.request_timeout: must be longer than 0s"
        ));
    }
    let header_timeout =
        duration("header_timeout", &entry.header_timeout)?.unwrap_or(defaults.header_timeout);
    let body_timeout =
        duration("body_timeout", &entry.body_timeout)?.unwrap_or(defaults.body_timeout);
    for (key, value) in [
        ("header_timeout", header_timeout),
        ("body_timeout", body_timeout),
    ] {
        if value.is_zero() {
            return Err(bad!("{file}: server.{key}: must be longer than 0s"));
        }
    }
    let max_connections = entry.max_connections.unwrap_or(defaults.max_connections);
    if max_connections == 0 {
        return Err(bad!("{file}: server.max_connections: must be at least 1"));
    }
    if entry.max_runs_per_tenant == Some(0) {
        return Err(bad!(
            "{file}: server.max_runs_per_tenant: must be at least 1"
        ));
    }
    let is_sha256 =
        |h: &str| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if entry
        .admin_key_sha256
        .as_deref()
        .is_some_and(|h| !is_sha256(h))
    {
        return Err(bad!(
            "{file}: server.admin_key_sha256: must be a SHA-256 as 64 lowercase hex digits (`rein keys create --admin` prints one); never put the key itself here"
        ));
    }
    Ok(Server {
        listen,
        workers: entry.workers,
        lease: duration("lease", &entry.lease)?,
        request_timeout,
        max_body_bytes,
        header_timeout,
        body_timeout,
        max_connections,
        max_runs_per_tenant: entry.max_runs_per_tenant,
        admin_key_sha256: entry.admin_key_sha256.clone(),
    })
}

/// `[gateway]`: the OpenAI-compatible gateway's per-call limits and fallbacks.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayEntry {
    max_output_tokens: Option<u32>,
    max_cost_usd: Option<f64>,
    timeout: Option<String>,
    cache_ttl: Option<String>,
    cache_max_bytes: Option<u64>,
    #[serde(default)]
    fallbacks: BTreeMap<String, Vec<String>>,
}

/// The gateway's settings: what one call may spend, and where a failing model falls back to.
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    /// The largest output a call may ask for (a larger `max_tokens` is lowered to it).
    pub max_output_tokens: u32,
    /// The most one call may cost, worst case, checked before it is made.
    pub max_cost_usd: f64,
    /// One call's wall-clock limit, retries and fallbacks included.
    pub timeout: std::time::Duration,
    /// Models tried in order after each model (`provider/model`).
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// The exact-match response cache; `None`: off.
    pub cache: Option<GatewayCache>,
}

/// `[gateway] cache_ttl`: identical calls of one tenant are answered from memory for a while.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatewayCache {
    /// How long an answer is reused.
    pub ttl: std::time::Duration,
    /// The most memory the cached answers take, roughly, in bytes.
    pub max_bytes: u64,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            max_output_tokens: 4096,
            max_cost_usd: 1.0,
            timeout: std::time::Duration::from_secs(120),
            fallbacks: BTreeMap::new(),
            cache: None,
        }
    }
}

/// `[bulkheads]`: a cap on concurrently executing runs per tenant.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkheadEntry {
    max_concurrent_runs: Option<u32>,
    max_queued: Option<u32>,
    queue_wait: Option<String>,
}

/// `[rate_limits]`: units per `window` for model calls; absent keys are unlimited.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateEntry {
    window: Option<String>,
    mode: Option<String>,
    max_wait: Option<String>,
    tenant_requests: Option<u64>,
    tenant_tokens: Option<u64>,
    user_requests: Option<u64>,
    user_tokens: Option<u64>,
    session_requests: Option<u64>,
    session_tokens: Option<u64>,
}

impl RateEntry {
    fn over(self, base: &RateEntry) -> RateEntry {
        RateEntry {
            window: self.window.or(base.window.clone()),
            mode: self.mode.or(base.mode.clone()),
            max_wait: self.max_wait.or(base.max_wait.clone()),
            tenant_requests: self.tenant_requests.or(base.tenant_requests),
            tenant_tokens: self.tenant_tokens.or(base.tenant_tokens),
            user_requests: self.user_requests.or(base.user_requests),
            user_tokens: self.user_tokens.or(base.user_tokens),
            session_requests: self.session_requests.or(base.session_requests),
            session_tokens: self.session_tokens.or(base.session_tokens),
        }
    }

    fn policy(&self, at: &str) -> Result<RatePolicy> {
        let window_ms = match &self.window {
            None => 60_000,
            Some(w) => {
                let d = rein_core::parse_duration(w).map_err(|e| bad!("{at}.window: {e}"))?;
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            }
        };
        let limit = |v: Option<u64>| v.map(|limit| RateLimit { limit, window_ms });
        Ok(RatePolicy {
            tenant_requests: limit(self.tenant_requests),
            tenant_tokens: limit(self.tenant_tokens),
            user_requests: limit(self.user_requests),
            user_tokens: limit(self.user_tokens),
            session_requests: limit(self.session_requests),
            session_tokens: limit(self.session_tokens),
        })
    }

    fn over_limit(&self, at: &str) -> Result<OverLimit> {
        match self.mode.as_deref() {
            None | Some("delay") => {
                let max_wait = self.max_wait.as_deref().unwrap_or("30s");
                let d =
                    rein_core::parse_duration(max_wait).map_err(|e| bad!("{at}.max_wait: {e}"))?;
                Ok(OverLimit::Delay {
                    max_wait_ms: i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
                })
            }
            Some("reject") => Ok(OverLimit::Reject),
            Some(other) => Err(bad!("{at}.mode: `{other}` is not `delay` or `reject`")),
        }
    }
}

/// Caps of the shared scopes; each key absent means uncapped (or, under a tenant, inherited).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetEntry {
    warn_at_percent: Option<u8>,
    session_usd: Option<f64>,
    session_tokens: Option<u64>,
    user_daily_usd: Option<f64>,
    user_daily_tokens: Option<u64>,
    tenant_daily_usd: Option<f64>,
    tenant_daily_tokens: Option<u64>,
    global_hourly_usd: Option<f64>,
    global_hourly_tokens: Option<u64>,
}

/// Where the shared counters live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersConfig {
    /// `redis://HOST:PORT`.
    pub url: String,
    /// Key prefix, so several deployments can share one Redis.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "rein".to_string()
}

impl BudgetEntry {
    /// `self` over `base`: keys set here win.
    fn over(self, base: BudgetEntry) -> BudgetEntry {
        BudgetEntry {
            warn_at_percent: self.warn_at_percent.or(base.warn_at_percent),
            session_usd: self.session_usd.or(base.session_usd),
            session_tokens: self.session_tokens.or(base.session_tokens),
            user_daily_usd: self.user_daily_usd.or(base.user_daily_usd),
            user_daily_tokens: self.user_daily_tokens.or(base.user_daily_tokens),
            tenant_daily_usd: self.tenant_daily_usd.or(base.tenant_daily_usd),
            tenant_daily_tokens: self.tenant_daily_tokens.or(base.tenant_daily_tokens),
            global_hourly_usd: self.global_hourly_usd.or(base.global_hourly_usd),
            global_hourly_tokens: self.global_hourly_tokens.or(base.global_hourly_tokens),
        }
    }

    fn policy(&self, at: &str) -> Result<BudgetPolicy> {
        let usd = |v: Option<f64>, key: &str| -> Result<Option<Usd>> {
            v.map(|d| {
                Usd::from_dollars(d).ok_or_else(|| {
                    bad!("{at}.{key}: must be a non-negative USD amount with at most 6 decimals")
                })
            })
            .transpose()
        };
        Ok(BudgetPolicy {
            session: Cap {
                usd: usd(self.session_usd, "session_usd")?,
                tokens: self.session_tokens,
            },
            user_daily: Cap {
                usd: usd(self.user_daily_usd, "user_daily_usd")?,
                tokens: self.user_daily_tokens,
            },
            tenant_daily: Cap {
                usd: usd(self.tenant_daily_usd, "tenant_daily_usd")?,
                tokens: self.tenant_daily_tokens,
            },
            global_hourly: Cap {
                usd: usd(self.global_hourly_usd, "global_hourly_usd")?,
                tokens: self.global_hourly_tokens,
            },
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    input: f64,
    #[serde(default)]
    cached_input: Option<f64>,
    output: f64,
    /// Prompt-cache writes; defaults to `input`.
    #[serde(default)]
    cache_write: Option<f64>,
}

/// The loaded configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Built-in prices with the file's overrides applied.
    pub prices: PriceTable,
    /// Shared budgets per tenant.
    pub budgets: Budgets,
    /// Redis for the shared counters; `None`: the embedded store.
    pub counters: Option<CountersConfig>,
    /// Scopes granted to tenants without their own list.
    pub default_scopes: Vec<String>,
    /// Scopes granted per tenant.
    pub tenant_scopes: BTreeMap<TenantId, Vec<String>>,
    /// Rate limits on model calls.
    pub rate_limits: RateLimits,
    /// Caps on concurrently executing runs.
    pub bulkheads: Bulkheads,
    /// The OpenAI-compatible gateway.
    pub gateway: Gateway,
    /// `rein serve`.
    pub server: Server,
    /// Metrics (and, later, trace export).
    pub telemetry: Telemetry,
    /// Where tenants' specs may connect.
    pub egress: rein_core::egress::EgressPolicy,
    /// Audit anchors.
    pub audit: Audit,
}

impl Config {
    /// The authorisation scopes `tenant` is granted.
    pub fn granted_scopes(&self, tenant: &TenantId) -> Vec<String> {
        self.tenant_scopes
            .get(tenant)
            .unwrap_or(&self.default_scopes)
            .clone()
    }
}

/// Loads `path` if given, else `./rein.toml` if it exists, else the defaults.
pub fn load(path: Option<&Path>) -> Result<Config> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from("rein.toml"), false),
    };
    let mut prices = PriceTable::default();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Config {
                prices,
                ..Config::default()
            });
        }
        Err(e) => {
            return Err(Error::BadInput(format!(
                "cannot read config file {}: {e}",
                path.display()
            )));
        }
    };
    let file: ConfigFile = toml::from_str(&text).map_err(|e| bad!("{}: {e}", path.display()))?;
    for (model, entry) in file.prices {
        let price = Price::per_million(entry.input, entry.cached_input.unwrap_or(entry.input), entry.output)
        .and_then(|p| p.with_cache_write(entry.cache_write.unwrap_or(entry.input)))
            .ok_or_else(|| {
                bad!(
                    "{}: prices.\"{model}\": prices must be non-negative USD per million tokens with at most 6 decimals",
                    path.display()
                )
            })?;
        prices.set(model, price);
    }
    let file_name = path.display().to_string();
    let warn_percent = file
        .budgets
        .warn_at_percent
        .unwrap_or(rein_core::budget::DEFAULT_WARN_PERCENT);
    if !(1..=100).contains(&warn_percent) {
        return Err(bad!(
            "{file_name}: budgets.warn_at_percent: must be from 1 to 100"
        ));
    }
    let mut budgets = Budgets {
        defaults: file.budgets.policy(&format!("{file_name}: budgets"))?,
        warn_percent,
        ..Budgets::default()
    };
    let mut rate_limits = RateLimits {
        defaults: file
            .rate_limits
            .policy(&format!("{file_name}: rate_limits"))?,
        tenants: BTreeMap::new(),
        over_limit: file
            .rate_limits
            .over_limit(&format!("{file_name}: rate_limits"))?,
    };
    let max_queued = file.bulkheads.max_queued.unwrap_or(100);
    let bulkhead = |runs: u32| BulkheadPolicy {
        max_concurrent_runs: runs,
        max_queued,
    };
    let mut bulkheads = Bulkheads {
        defaults: file.bulkheads.max_concurrent_runs.map(bulkhead),
        tenants: BTreeMap::new(),
        queue_wait_ms: match &file.bulkheads.queue_wait {
            None => 60_000,
            Some(w) => {
                let d = rein_core::parse_duration(w)
                    .map_err(|e| bad!("{file_name}: bulkheads.queue_wait: {e}"))?;
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            }
        },
    };
    let gateway = gateway(&file.gateway, &prices, &file_name)?;
    let server = server(&file.server, &file_name)?;
    let mut tenant_scopes = BTreeMap::new();
    for (name, mut table) in file.tenants {
        let at = format!("{file_name}: tenants.{name}");
        if let Some(rates) = table.remove("rate_limits") {
            let entry: RateEntry = rates
                .try_into()
                .map_err(|e| bad!("{at}.rate_limits: {e}"))?;
            if entry.mode.is_some() || entry.max_wait.is_some() {
                return Err(bad!(
                    "{at}.rate_limits: `mode` and `max_wait` are set once for the whole deployment, under [rate_limits]"
                ));
            }
            let policy = entry
                .over(&file.rate_limits)
                .policy(&format!("{at}.rate_limits"))?;
            rate_limits
                .tenants
                .insert(TenantId::new(name.clone()), policy);
        }
        if let Some(runs) = table.remove("max_concurrent_runs") {
            let runs: u32 = runs
                .try_into()
                .map_err(|e| bad!("{at}.max_concurrent_runs: {e}"))?;
            bulkheads
                .tenants
                .insert(TenantId::new(name.clone()), bulkhead(runs));
        }
        if let Some(scopes) = table.remove("scopes") {
            let scopes: Vec<String> = scopes.try_into().map_err(|e| bad!("{at}.scopes: {e}"))?;
            tenant_scopes.insert(TenantId::new(name.clone()), scopes);
        }
        // A deployment-wide setting cannot differ per tenant: refuse it here rather than
        // silently ignore it.
        for key in [
            "warn_at_percent",
            "global_hourly_usd",
            "global_hourly_tokens",
        ] {
            if table.contains_key(key) {
                return Err(bad!(
                    "{at}.{key}: this is set once for the whole deployment, under [budgets]"
                ));
            }
        }
        let entry: BudgetEntry = toml::Value::Table(table)
            .try_into()
            .map_err(|e| bad!("{at}: {e}"))?;
        let policy = entry.over(file.budgets).policy(&at)?;
        budgets.tenants.insert(TenantId::new(name), policy);
    }
    Ok(Config {
        prices,
        budgets,
        counters: file.counters,
        default_scopes: file.scopes,
        tenant_scopes,
        rate_limits,
        bulkheads,
        gateway,
        server,
        telemetry: telemetry(file.telemetry, &file_name)?,
        egress: rein_core::egress::EgressPolicy::new(&file.egress.allow)
            .map_err(|e| bad!("{file_name}: egress.allow: {e}"))?,
        audit: Audit {
            anchor_every: match file.audit.anchor_every.as_deref() {
                None => Audit::default().anchor_every,
                Some(text) => Some(
                    rein_core::duration::parse_duration_or_zero(text)
                        .map_err(|e| bad!("{file_name}: audit.anchor_every: {e}"))?,
                )
                .filter(|d| !d.is_zero()),
            },
            anchor_file: file.audit.anchor_file,
        },
    })
}

fn telemetry(entry: Telemetry, file: &str) -> Result<Telemetry> {
    if let Some(url) = &entry.otlp_endpoint
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(bad!(
            "{file}: telemetry.otlp_endpoint: must be an http:// or https:// URL (the collector's OTLP/HTTP base, such as http://127.0.0.1:4318), not {url:?}"
        ));
    }
    Ok(entry)
}

fn gateway(entry: &GatewayEntry, prices: &PriceTable, file: &str) -> Result<Gateway> {
    let defaults = Gateway::default();
    let max_output_tokens = entry
        .max_output_tokens
        .unwrap_or(defaults.max_output_tokens);
    if max_output_tokens == 0 {
        return Err(bad!(
            "{file}: gateway.max_output_tokens: must be at least 1"
        ));
    }
    let max_cost_usd = entry.max_cost_usd.unwrap_or(defaults.max_cost_usd);
    if !(max_cost_usd.is_finite() && max_cost_usd > 0.0) {
        return Err(bad!(
            "{file}: gateway.max_cost_usd: must be a positive number of USD"
        ));
    }
    let timeout = match &entry.timeout {
        None => defaults.timeout,
        Some(t) => {
            rein_core::parse_duration(t).map_err(|e| bad!("{file}: gateway.timeout: {e}"))?
        }
    };
    let cache = match &entry.cache_ttl {
        None if entry.cache_max_bytes.is_some() => {
            return Err(bad!(
                "{file}: gateway.cache_max_bytes: the cache is off; set gateway.cache_ttl to turn it on"
            ));
        }
        None => None,
        Some(ttl) => {
            let ttl = rein_core::parse_duration(ttl)
                .map_err(|e| bad!("{file}: gateway.cache_ttl: {e}"))?;
            if ttl.is_zero() {
                return Err(bad!(
                    "{file}: gateway.cache_ttl: must be longer than 0s (leave it out to turn the cache off)"
                ));
            }
            Some(GatewayCache {
                ttl,
                max_bytes: entry.cache_max_bytes.unwrap_or(64 << 20),
            })
        }
    };
    for (model, fallbacks) in &entry.fallbacks {
        for m in std::iter::once(model).chain(fallbacks) {
            if prices.get(m).is_none() {
                return Err(bad!(
                    "{file}: gateway.fallbacks.\"{model}\": `{m}` has no price; name a `provider/model` from the price table or add it under [prices]"
                ));
            }
        }
    }
    Ok(Gateway {
        max_output_tokens,
        max_cost_usd,
        timeout,
        fallbacks: entry.fallbacks.clone(),
        cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rein.toml");
        std::fs::write(&path, text)?;
        Ok(load(Some(&path))?)
    }

    fn error(text: &str) -> String {
        format!("{:#}", load_text(text).unwrap_err())
    }

    #[test]
    fn audit_anchors_are_made_every_ten_minutes_unless_turned_off() {
        let defaults = load_text("").unwrap().audit;
        assert_eq!(
            defaults.anchor_every,
            Some(std::time::Duration::from_secs(600))
        );
        let off = load_text("[audit]\nanchor_every = \"0s\"\n").unwrap().audit;
        assert_eq!(off.anchor_every, None);
        let set = load_text("[audit]\nanchor_every = \"1h\"\nanchor_file = \"a.jsonl\"\n")
            .unwrap()
            .audit;
        assert_eq!(set.anchor_every, Some(std::time::Duration::from_secs(3600)));
        assert_eq!(set.anchor_file, Some(PathBuf::from("a.jsonl")));
        let bad = error("[audit]\nanchor_every = \"0\"\n");
        assert!(bad.contains("audit.anchor_every"), "{bad}");
    }

    #[test]
    fn the_telemetry_table_is_read_with_its_defaults_and_checked() {
        let defaults = load_text("").unwrap().telemetry;
        assert_eq!(defaults, Telemetry::default());
        assert!(defaults.metrics && defaults.otlp_endpoint.is_none());
        let set = load_text(
            "[telemetry]\nmetrics = false\nmetrics_auth = \"admin\"\notlp_endpoint = \"http://127.0.0.1:4318\"\n",
        )
        .unwrap()
        .telemetry;
        assert!(!set.metrics);
        assert_eq!(set.metrics_auth, MetricsAuth::Admin);
        assert_eq!(set.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
        let bad = error("[telemetry]\notlp_endpoint = \"127.0.0.1:4318\"\n");
        assert!(bad.contains("telemetry.otlp_endpoint"), "{bad}");
        let bad = error("[telemetry]\nmetrics_auth = \"everyone\"\n");
        assert!(
            bad.contains("metrics_auth") && bad.contains("everyone"),
            "{bad}"
        );
        assert_eq!(
            load_text("[telemetry]\nlog_format = \"json\"\n")
                .unwrap()
                .telemetry
                .log_format,
            LogFormat::Json
        );
        let bad = error("[telemetry]\nlog_format = \"xml\"\n");
        assert!(bad.contains("log_format") && bad.contains("xml"), "{bad}");
        let bad = error("[telemetry]\ntraces = true\n");
        assert!(bad.contains("traces"), "{bad}");
    }

    #[test]
    fn the_server_table_is_read_with_its_defaults() {
        let config =
            load_text("[server]\nlisten = \"0.0.0.0:9000\"\nrequest_timeout = \"5s\"\n").unwrap();
        assert_eq!(config.server.listen, Some("0.0.0.0:9000".parse().unwrap()));
        assert_eq!(
            config.server.request_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(config.server.max_body_bytes, 1 << 20);
        assert_eq!(config.server.workers, None);
        assert!(error("[server]\nlisten = \"here\"\n").contains("server.listen"));
        assert!(error("[server]\nrequest_timeout = \"soon\"\n").contains("server.request_timeout"));
        assert!(error("[server]\nmax_body_bytes = 10\n").contains("server.max_body_bytes"));
        assert!(error("[server]\nadmin_key_sha256 = \"hunter2\"\n").contains("64 lowercase hex"));
        assert!(error("[server]\nport = 1\n").contains("port"));
    }

    #[test]
    fn the_gateway_cache_is_off_unless_given_a_ttl() {
        assert_eq!(load_text("").unwrap().gateway.cache, None);
        let config = load_text("[gateway]\ncache_ttl = \"90s\"\n").unwrap();
        assert_eq!(
            config.gateway.cache,
            Some(GatewayCache {
                ttl: std::time::Duration::from_secs(90),
                max_bytes: 64 << 20
            })
        );
        assert!(error("[gateway]\ncache_max_bytes = 1000\n").contains("gateway.cache_ttl"));
        assert!(error("[gateway]\ncache_ttl = \"0s\"\n").contains("gateway.cache_ttl"));
    }
}
