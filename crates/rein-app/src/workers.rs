//! Where a spec's worker agents come from (`source: {agent: {spec: ...}}`): files for a local
//! user, registered agents for everyone else.

use crate::config::Config;
use rein_core::{Agent, CheckContext, TenantId, Trust};
use rein_runtime::workers::BoxFuture;
use rein_store::Store;
use rein_tools::Builtins;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Finds the worker agents a spec calls: a reference ending in `.yaml` or `.yml` is a file,
/// relative to the directory of the spec being run (`rein run`; `rein runs resume` and `rein
/// approve` take it as `--spec-dir`), for nested workers too, where files are allowed at all; any
/// other is an agent registered for the caller's tenant (`POST /v1/agents`), in its newest
/// version.
pub struct WorkerSpecs {
    prices: rein_core::PriceTable,
    builtins: Builtins,
    store: Arc<dyn Store>,
    /// Where file references are read from; `None`: they are not read. Not for runs whose specs
    /// came over the API (`rein serve`, and `rein worker`, which drives them too): a tenant must
    /// not make the server read its files.
    files: Option<PathBuf>,
}

impl WorkerSpecs {
    /// File references relative to `dir` (the directory of the spec being run), and registered
    /// agents.
    pub fn files_relative_to(
        config: &Config,
        store: &Arc<dyn Store>,
        builtins: Builtins,
        dir: &Path,
    ) -> Arc<Self> {
        Arc::new(WorkerSpecs {
            prices: config.prices.clone(),
            builtins,
            store: store.clone(),
            files: Some(dir.to_path_buf()),
        })
    }

    /// Registered agents only: for processes that drive runs other people submitted.
    pub fn registered_only(
        config: &Config,
        store: &Arc<dyn Store>,
        builtins: Builtins,
    ) -> Arc<Self> {
        Arc::new(WorkerSpecs {
            prices: config.prices.clone(),
            builtins,
            store: store.clone(),
            files: None,
        })
    }
}

/// Whether a worker reference names a spec file rather than a registered agent.
pub fn is_file_reference(reference: &str) -> bool {
    reference.ends_with(".yaml") || reference.ends_with(".yml")
}

impl rein_runtime::Workers for WorkerSpecs {
    fn resolve<'a>(
        &'a self,
        tenant: &'a TenantId,
        reference: &'a str,
        trust: Trust,
    ) -> BoxFuture<'a, Result<(Agent, String, Trust), String>> {
        Box::pin(async move {
            let (source, author) = if is_file_reference(reference) {
                let dir = match &self.files {
                    Some(dir) if trust == Trust::Operator => dir,
                    _ => {
                        return Err(format!(
                            "`{reference}` is a file, and this process only runs registered agents as workers (register it with POST /v1/agents and name it)"
                        ));
                    }
                };
                let path = dir.join(reference);
                let source = tokio::fs::read_to_string(&path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (source, Trust::Operator)
            } else {
                // An agent registered over the API is the tenant's text, whoever calls it.
                let stored = self
                    .store
                    .agent(tenant, reference, None)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no agent `{reference}` is registered"))?;
                (stored.spec, Trust::Tenant)
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
        providers: rein_providers::PROVIDERS,
    };
    let agent = Agent::parse(reference, &source, &ctx).map_err(|e| e.to_string())?;
    Ok((agent, source))
}
