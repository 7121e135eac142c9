//! Worker agents called as tools (orchestrator-worker): the engine decides each worker's
//! budget and depth before the driver starts it, holds that budget against the run's own
//! limits while the worker runs, and takes what it spent as the run's own spend.
//!
//! A worker's budget is carved out of what its caller has left (cost and tokens, minus what
//! other workers hold), so a run's hard limits hold across its whole tree of workers: no
//! worker can spend what its caller does not have. A worker's `worker_started` reserves its
//! budget; its `worker_finished` releases the reservation and adds its actual spend. A worker
//! started but never finished (a crash) keeps its reservation, which errs on the safe side.

use super::Engine;
use crate::event::WorkerBudget;
use crate::message::Usage;
use crate::run::TerminationReason;
use crate::spec::{ToolSource, ToolSpec, WorkerFallback};
use crate::{RunId, Usd};

/// A worker's run that a call of a worker tool started, as the caller's log records it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerChild {
    /// The worker's run.
    pub run_id: RunId,
    /// What it was given.
    pub budget: WorkerBudget,
    /// Whether it ran as the call's fallback.
    pub fallback: bool,
    /// Whether its `worker_finished` is recorded.
    pub finished: bool,
    /// What its `worker_finished` recorded it spent, its own workers' spend included.
    pub spent: (Usd, Usage),
}

impl Engine {
    /// The run the worker tool call (`step`, `call_id`) started for its worker (or, with
    /// `fallback`, for its fallback), if the log records one: a call interrupted by a crash
    /// continues that run rather than starting another, so the worker's own recorded steps
    /// and side effects are not repeated.
    pub fn worker_child(&self, step: u32, call_id: &str, fallback: bool) -> Option<&WorkerChild> {
        self.tree
            .worker_children
            .get(&(step, call_id.to_string()))?
            .iter()
            .rev()
            .find(|c| c.fallback == fallback)
    }

    /// The worker runs this run started whose end its log does not record: after a crash,
    /// the ones to end when this run ends without continuing them.
    pub fn unfinished_workers(&self) -> Vec<RunId> {
        self.tree
            .worker_children
            .values()
            .flatten()
            .filter(|c| !c.finished)
            .map(|c| c.run_id.clone())
            .collect()
    }

    /// The budget of a call to `tool`, when it is a worker agent: `Ok(None)` for other tools;
    /// `Err` with how the run ends when the tree would grow past `max_depth` or nothing is
    /// left to give the worker.
    pub(super) fn worker_budget(
        &self,
        tool: &ToolSpec,
    ) -> Result<Option<WorkerBudget>, (TerminationReason, String)> {
        let ToolSource::Agent(worker) = &tool.source else {
            return Ok(None);
        };
        let depth = self.tree.depth + 1;
        if depth > self.tree.max_depth {
            let detail = format!(
                "calling `{}` (the agent {}) would make the tree of agents {depth} deep, past max_depth {}",
                tool.name, worker.spec, self.tree.max_depth
            );
            return Err((TerminationReason::MaxDepth, detail));
        }
        let limits = &self.agent.spec.limits;
        let (held_cost, held_tokens) = self.tree.worker_reserved;
        let cost_left = limits
            .max_cost_usd
            .saturating_sub(self.spend.cost)
            .saturating_sub(held_cost);
        let tokens_left = limits
            .max_total_tokens
            .saturating_sub(self.spend.usage.total())
            .saturating_sub(held_tokens);
        let half = Usd::from_micros(cost_left.micros() / 2);
        let cost = worker.max_cost_usd.unwrap_or(half).min(cost_left);
        let tokens = worker
            .max_total_tokens
            .unwrap_or(tokens_left / 2)
            .min(tokens_left);
        if cost <= Usd::ZERO || tokens == 0 {
            let detail = format!(
                "no budget is left to give the worker `{}`: {} and {tokens_left} tokens remain of the run's caps",
                tool.name, cost_left
            );
            return Err((TerminationReason::MaxCost, detail));
        }
        Ok(Some(WorkerBudget {
            max_cost_usd: cost,
            max_total_tokens: tokens,
            depth,
            max_depth: self.tree.max_depth,
        }))
    }

    /// Folds `worker_started`: the worker's budget is held against this run's limits.
    pub(super) fn worker_started(&mut self, budget: &WorkerBudget) {
        self.tree.worker_reserved.0 += budget.max_cost_usd;
        self.tree.worker_reserved.1 = self
            .tree
            .worker_reserved
            .1
            .saturating_add(budget.max_total_tokens);
    }

    /// Folds `worker_finished`: the hold is released and the worker's spend is this run's. A
    /// worker stopped by `max_depth` stops this run too: a cascade is a fault in the tree, not
    /// a failure a fallback can contain.
    pub(super) fn worker_finished(
        &mut self,
        budget: Option<WorkerBudget>,
        reason: Option<TerminationReason>,
        detail: Option<&str>,
        cost: Usd,
        usage: &Usage,
    ) {
        if let Some(b) = budget {
            self.tree.worker_reserved.0 =
                self.tree.worker_reserved.0.saturating_sub(b.max_cost_usd);
            self.tree.worker_reserved.1 = self
                .tree
                .worker_reserved
                .1
                .saturating_sub(b.max_total_tokens);
        }
        self.spend.cost += cost;
        self.spend.usage.add(usage);
        if reason == Some(TerminationReason::MaxDepth) {
            // The deepest run's own words say where the cascade was stopped.
            self.finish_with(
                TerminationReason::MaxDepth,
                detail.unwrap_or("a worker stopped at max_depth"),
            );
            return;
        }
        self.over_caps();
    }

    /// A worker tool's call failed for good and its fallback is `escalate`: the run goes to a
    /// person.
    pub(super) fn worker_failed(&mut self, tool: &str, message: &str) {
        let escalates = self.agent.tool(tool).is_some_and(|(t, _)| {
            matches!(
                &t.source,
                ToolSource::Agent(w) if w.fallback == Some(WorkerFallback::Escalate)
            )
        });
        if escalates && self.finish.is_none() {
            let why = format!("the worker `{tool}` failed: {message}");
            self.finish = Some(self.escalation("worker_failed", &why, serde_json::Value::Null));
        }
    }
}
