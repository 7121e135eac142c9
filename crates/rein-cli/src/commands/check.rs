//! `rein check` and `rein graph`: a spec checked (with its workers) or drawn, without running it.

use crate::ConfigArgs;
use crate::exit;
use anyhow::anyhow;
use rein_app::Error::BadInput;
use rein_app::config;
use rein_app::wiring::{parse_agent, read_file};
use rein_core::Agent;
use rein_tools::Builtins;
use std::path::Path;

pub(crate) fn check(spec: &Path, config: &ConfigArgs) -> anyhow::Result<u8> {
    let config = config::load(config.config.as_deref())?;
    let file = spec.display().to_string();
    let agent = parse_agent(&file, &read_file(spec)?, &config, &Builtins::standard())?;
    let mut seen = std::collections::BTreeSet::from([file.clone()]);
    let dir = spec.parent().unwrap_or(Path::new(""));
    check_workers(&file, &agent, &config, dir, &mut seen)?;
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
pub(crate) fn check_workers(
    file: &str,
    agent: &Agent,
    config: &config::Config,
    dir: &Path,
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
            if !rein_app::workers::is_file_reference(reference) {
                say!(
                    "{file}: worker `{}`: `{reference}` is looked up among the agents registered with rein serve",
                    tool.name
                );
                continue;
            }
            if !seen.insert(reference.clone()) {
                continue;
            }
            // As `rein run` reads them: relative to the directory of the spec being checked.
            let source = std::fs::read_to_string(dir.join(reference)).map_err(|e| {
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
            check_workers(reference, &child, config, dir, seen)?;
        }
    }
    Ok(())
}

/// `rein graph`: the spec's graph, checked, as Mermaid on stdout.
pub(crate) fn graph(spec: &Path, config: &ConfigArgs) -> anyhow::Result<u8> {
    let config = config::load(config.config.as_deref())?;
    let file = spec.display().to_string();
    let agent = parse_agent(&file, &read_file(spec)?, &config, &Builtins::standard())?;
    say!("{}", agent.spec.mermaid().trim_end());
    Ok(exit::OK)
}
