//! What every handler shares: the store, the runtime, the configuration and the caches one
//! server process keeps.

use crate::ServerError;
use crate::auth::KeyCache;
use crate::{cache, gateway, metrics, ui};
use rein_app::config::Config;
use rein_providers::Model;
use rein_runtime::{RunOutcome, Runtime};
use rein_store::Store;
use rein_tools::Builtins;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, broadcast};

/// The longest a `wait: true` run request is held before answering 202 with the run so far.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(300);
/// How often an idle worker or event stream looks for new work without being woken.
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// Everything a handler needs.
pub(crate) struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) runtime: Runtime,
    pub(crate) config: Config,
    pub(crate) builtins: Builtins,
    pub(crate) model: Arc<dyn Model>,
    /// Woken when a run is queued or an event is appended by this process.
    pub(crate) wake: Notify,
    /// Runs this process's workers finished or paused, for `wait: true` requests.
    pub(crate) outcomes: broadcast::Sender<Arc<RunOutcome>>,
    /// The gateway's one-call agent per model, checked once.
    pub(crate) gateway_agents: gateway::Agents,
    /// The admin key's SHA-256; `None`: the admin API is off.
    pub(crate) admin_key_sha256: Option<String>,
    /// The gateway's exact-match response cache.
    pub(crate) gateway_cache: cache::ResponseCache,
    /// Tenants by API-key hash, as recently read from the store.
    pub(crate) keys: KeyCache,
    /// The Prometheus registry runs are measured into; `None` when `[telemetry] metrics` is
    /// off.
    pub(crate) metrics: Option<metrics::Metrics>,
    /// The dashboard's templates.
    pub(crate) ui: ui::Templates,
}

impl App {
    pub(crate) fn new(parts: crate::Parts) -> Result<Arc<Self>, ServerError> {
        let crate::Parts {
            config,
            store,
            runtime,
            builtins,
            model,
            admin_key_sha256,
        } = parts;
        let (outcomes, _) = broadcast::channel(1024);
        let metrics = config
            .telemetry
            .metrics
            .then(|| {
                metrics::Metrics::new(
                    config.telemetry.metrics_auth == rein_app::config::MetricsAuth::Admin,
                )
            })
            .transpose()?;
        let runtime = match &metrics {
            Some(m) => runtime.with_metrics(m.recorder()),
            None => runtime,
        };
        Ok(Arc::new(App {
            metrics,
            ui: ui::Templates::new()?,
            admin_key_sha256,
            gateway_cache: cache::ResponseCache::new(config.gateway.cache),
            keys: KeyCache::new(),
            store,
            runtime,
            config,
            builtins,
            model,
            wake: Notify::new(),
            outcomes,
            gateway_agents: gateway::Agents::default(),
        }))
    }
}
