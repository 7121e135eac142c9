//! Worker agents called as tools: the driver runs each as a child run of its own, under the
//! budget and depth the engine gave the call, in the caller's trace, and turns its outcome
//! into the call's `ToolResult` (its answer, or its fallback's, or a failure the caller's model
//! can act on).
//!
//! Which spec a worker reference names is the embedding program's business ([`Workers`]): the
//! CLI reads files and registered agents; a program embedding Rein can resolve its own way.

use crate::{Driver, RunOutcome, RunRequest, Runtime};
use rein_core::event::{ParentLink, WorkerBudget};
use rein_core::spec::{ToolSpec, WorkerFallback, WorkerSource};
use rein_core::{
    Agent, ErrorType, EventKind, RunId, RunStatus, SessionId, TenantId, ToolInvocation, ToolResult,
    Usd, WorkerChild,
};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// A boxed future, as object-safe traits return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Finds the spec a worker reference names, checked: the agent and its source (pinned with
/// the worker's run). The error is a message for the caller's model and log.
pub trait Workers: Send + Sync {
    /// Resolves `reference` for `tenant`, for a caller whose spec's author is `trust` (a
    /// tenant's spec names registered agents only: it never makes the process read a file):
    /// the worker's agent, its source, and who wrote it (an agent registered over the API is
    /// the tenant's, whoever calls it).
    fn resolve<'a>(
        &'a self,
        tenant: &'a TenantId,
        reference: &'a str,
        trust: rein_core::Trust,
    ) -> BoxFuture<'a, Result<(Agent, String, rein_core::Trust), String>>;

    /// Parses a worker's spec as its run pinned it (`source`, first found as `reference`), to
    /// continue that run after a crash.
    fn pinned(&self, reference: &str, source: String) -> Result<Agent, String>;
}

/// How one worker's run went.
struct Ran {
    outcome: Option<RunOutcome>,
    /// Why its answer was not taken, if it was not.
    rejected: Option<String>,
    cost: Usd,
    tokens: u64,
}

impl<'a> Driver<'a> {
    /// Carries out a call of a worker tool: the worker's run, then (if it failed) its
    /// fallback, each recorded as `worker_started` / `worker_finished` before the call's
    /// `tool_result`.
    pub(crate) async fn call_worker(
        &mut self,
        invocation: ToolInvocation,
        tool: &ToolSpec,
        worker: &WorkerSource,
    ) -> Result<std::time::Duration, crate::RuntimeError> {
        self.record(invocation.requested()).await?;
        let started = Instant::now();
        let result = match invocation.budget {
            None => ToolResult::error(
                ErrorType::Permanent,
                format!(
                    "`{}` is a worker agent, but the call has no budget",
                    tool.name
                ),
            ),
            Some(budget) => self.run_workers(&invocation, tool, worker, budget).await?,
        };
        let waited = started.elapsed();
        self.record(EventKind::ToolResult {
            step: invocation.step,
            call_id: invocation.call_id,
            tool: invocation.tool,
            result,
            latency_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            attempts: 1,
        })
        .await?;
        Ok(waited)
    }

    async fn run_workers(
        &mut self,
        invocation: &ToolInvocation,
        tool: &ToolSpec,
        worker: &WorkerSource,
        budget: WorkerBudget,
    ) -> Result<ToolResult, crate::RuntimeError> {
        let first = self
            .run_worker(invocation, tool, worker, &worker.spec, budget, false)
            .await?;
        let failure = match &first.rejected {
            None => {
                let output = first.outcome.and_then(|o| o.output).unwrap_or(Value::Null);
                return Ok(ToolResult::success(output));
            }
            Some(why) => why.clone(),
        };
        Ok(match &worker.fallback {
            Some(WorkerFallback::Answer(answer)) => ToolResult::success(answer.clone()),
            Some(WorkerFallback::Agent(reference)) => {
                let left = WorkerBudget {
                    max_cost_usd: budget.max_cost_usd.saturating_sub(first.cost),
                    max_total_tokens: budget.max_total_tokens.saturating_sub(first.tokens),
                    ..budget
                };
                if left.max_cost_usd <= Usd::ZERO || left.max_total_tokens == 0 {
                    ToolResult::error(
                        ErrorType::Permanent,
                        format!("{failure}; no budget was left for its fallback"),
                    )
                } else {
                    let second = self
                        .run_worker(invocation, tool, worker, reference, left, true)
                        .await?;
                    match second.rejected {
                        None => ToolResult::success(
                            second.outcome.and_then(|o| o.output).unwrap_or(Value::Null),
                        ),
                        Some(why) => ToolResult::error(
                            ErrorType::Permanent,
                            format!("{failure}; its fallback failed too: {why}"),
                        ),
                    }
                }
            }
            Some(WorkerFallback::Escalate) | None => {
                ToolResult::error(ErrorType::Permanent, failure)
            }
        })
    }

    /// One worker's run, recorded in this run's log around it. A call interrupted by a crash
    /// after its worker started continues that worker's run instead of starting another.
    async fn run_worker(
        &mut self,
        invocation: &ToolInvocation,
        tool: &ToolSpec,
        worker: &WorkerSource,
        reference: &str,
        budget: WorkerBudget,
        fallback: bool,
    ) -> Result<Ran, crate::RuntimeError> {
        let started = self
            .engine
            .worker_child(invocation.step, &invocation.call_id, fallback)
            .cloned();
        let (run_id, name, ran, finished) = match started {
            Some(child) => {
                let (name, ran) = self
                    .take_up_child(invocation, tool, worker, reference, &child)
                    .await;
                (child.run_id, name, ran, child.finished)
            }
            None => {
                let run_id = Runtime::new_run_id();
                let (agent, source, trust) =
                    match self.resolve_worker(tool, worker, reference, budget).await {
                        Ok(found) => found,
                        Err(why) => {
                            return Ok(Ran {
                                outcome: None,
                                rejected: Some(format!(
                                    "the worker `{reference}` could not be started: {why}"
                                )),
                                cost: Usd::ZERO,
                                tokens: 0,
                            });
                        }
                    };
                let name = agent.spec.name.clone();
                self.record(EventKind::WorkerStarted {
                    step: invocation.step,
                    call_id: invocation.call_id.clone(),
                    tool: tool.name.clone(),
                    spec: reference.to_string(),
                    run_id: run_id.clone(),
                    budget,
                    fallback,
                })
                .await?;
                let ran = self
                    .start_child(invocation, &run_id, (agent, source, trust), budget)
                    .await;
                (run_id, name, ran.map_err(|e| e.to_string()), false)
            }
        };
        let ran = match ran {
            // Its caller does not wait for a person on a worker's behalf: the worker is ended
            // (not left waiting, able to spend outside its caller's accounting) and counts as
            // failed.
            Ok(outcome) if outcome.status == RunStatus::AwaitingApproval => {
                let by = format!(
                    "its caller, run {}, which does not wait for a worker's approvals",
                    self.run_id
                );
                match self.runtime.cancel(&self.tenant, &run_id, &by).await {
                    Ok(_) => Ok(RunOutcome {
                        status: RunStatus::Cancelled,
                        reason: Some(rein_core::TerminationReason::Cancelled),
                        detail: Some(format!(
                            "it waited for a person's approval; cancelled by {by}"
                        )),
                        awaiting: None,
                        ..outcome
                    }),
                    Err(e) => Err(e.to_string()),
                }
            }
            other => other,
        };
        if ran.is_err() {
            // Counted as failed here, so it must not go on running (or waiting, or stay
            // `running`) there, where no one else would end it.
            self.runtime
                .end_orphaned_workers(&self.tenant, &self.run_id, vec![run_id.clone()])
                .await;
        }
        let (outcome, rejected) = match ran {
            Ok(outcome) => {
                let rejected = self.rejection(tool, worker, &outcome);
                (Some(outcome), rejected)
            }
            Err(e) => (
                None,
                Some(format!("the worker `{name}` could not run: {e}")),
            ),
        };
        let (cost, usage) = outcome
            .as_ref()
            .map_or((Usd::ZERO, Default::default()), |o| (o.cost, o.usage));
        if !finished {
            self.record(EventKind::WorkerFinished {
                step: invocation.step,
                call_id: invocation.call_id.clone(),
                tool: tool.name.clone(),
                run_id,
                agent: name,
                status: outcome.as_ref().map_or(RunStatus::Failed, |o| o.status),
                reason: outcome.as_ref().and_then(|o| o.reason),
                detail: rejected.clone(),
                cost,
                usage,
                accepted: rejected.is_none(),
            })
            .await?;
        }
        Ok(Ran {
            outcome,
            rejected,
            cost,
            tokens: usage.total(),
        })
    }

    /// Starts the worker's run `run_id` as `agent` and drives it until it ends.
    async fn start_child(
        &mut self,
        invocation: &ToolInvocation,
        run_id: &RunId,
        (agent, source, trust): (Agent, String, rein_core::Trust),
        budget: WorkerBudget,
    ) -> Result<RunOutcome, crate::RuntimeError> {
        let traceparent = rein_core::spans::traceparent(
            &self.trace,
            &rein_core::spans::tool_span_id(&self.run_id, invocation.step, &invocation.call_id),
        );
        let request = RunRequest {
            agent: Arc::new(agent),
            spec_source: source,
            input: match &invocation.arguments {
                Value::String(text) => text.clone(),
                args => args.to_string(),
            },
            tenant: self.tenant.clone(),
            user: self.user.clone(),
            session: SessionId::new(format!("{}:{}", self.run_id, invocation.step)),
            job: None,
            granted_scopes: self.engine.granted_scopes().to_vec(),
            chat: None,
            trace_parent: Some(traceparent),
            trust,
        };
        let parent = ParentLink {
            run_id: self.run_id.clone(),
            step: invocation.step,
            depth: budget.depth,
            max_depth: budget.max_depth,
        };
        // A worker's run is a run like any other, driven here until it ends (boxed: the call
        // recurses through the driver).
        Box::pin(self.runtime.run_admitted(
            run_id.clone(),
            request,
            self.model,
            None,
            Some(parent),
            self.cancel.clone(),
        ))
        .await
    }

    /// The worker `reference`, found and fitted to `budget`, with its source and the reach its
    /// run gets: a tenant's if its caller's spec or its own is a tenant's; or why not.
    async fn resolve_worker(
        &mut self,
        tool: &ToolSpec,
        worker: &WorkerSource,
        reference: &str,
        budget: WorkerBudget,
    ) -> Result<(Agent, String, rein_core::Trust), String> {
        let caller = self.trust();
        let (agent, source, author) = self
            .workers()?
            .resolve(&self.tenant, reference, caller)
            .await?;
        let trust = if caller == rein_core::Trust::Tenant || author == rein_core::Trust::Tenant {
            rein_core::Trust::Tenant
        } else {
            rein_core::Trust::Operator
        };
        Ok((self.fit_worker(agent, tool, worker, budget), source, trust))
    }

    /// Where this runtime finds worker agents.
    fn workers(&self) -> Result<&'a dyn Workers, String> {
        self.runtime
            .workers
            .as_deref()
            .ok_or_else(|| "this runtime has no way to find worker agents".to_string())
    }

    /// Takes up the worker's run `child` that this call started before a crash: one whose end
    /// is recorded is only reported; one never stored (the crash came before its first events
    /// were durable) is started now, as that run; any other is continued from its log, as its
    /// pinned spec fitted to the budget it was given. Returns the worker's agent name and how
    /// its run went.
    async fn take_up_child(
        &mut self,
        invocation: &ToolInvocation,
        tool: &ToolSpec,
        worker: &WorkerSource,
        reference: &str,
        child: &WorkerChild,
    ) -> (String, Result<RunOutcome, String>) {
        let record = match self.runtime.store.run(&self.tenant, &child.run_id).await {
            Ok(record) => record,
            Err(rein_store::StoreError::NotFound(_)) if !child.finished => {
                return match self
                    .resolve_worker(tool, worker, reference, child.budget)
                    .await
                {
                    Ok((agent, source, trust)) => {
                        let name = agent.spec.name.clone();
                        let ran = self
                            .start_child(
                                invocation,
                                &child.run_id,
                                (agent, source, trust),
                                child.budget,
                            )
                            .await;
                        (name, ran.map_err(|e| e.to_string()))
                    }
                    Err(why) => (
                        reference.to_string(),
                        Err(format!("it could not be started again: {why}")),
                    ),
                };
            }
            Err(e) => return (reference.to_string(), Err(e.to_string())),
        };
        let name = record.info.agent.clone();
        if child.finished {
            return (name, Ok(reported(child, record)));
        }
        let pinned = self
            .workers()
            .and_then(|workers| workers.pinned(reference, record.info.spec.clone()));
        let ran = match pinned {
            Ok(agent) => {
                let agent = self.fit_worker(agent, tool, worker, child.budget);
                Box::pin(self.runtime.continue_worker(
                    &self.tenant,
                    &child.run_id,
                    record,
                    agent,
                    self.model,
                    self.cancel.clone(),
                ))
                .await
                .map_err(|e| e.to_string())
            }
            Err(why) => Err(format!("its pinned spec: {why}")),
        };
        (name, ran)
    }

    /// The worker's agent within what the call may use: its caps no higher than its budget,
    /// its wall clock no longer than the tool's timeout or the caller's own deadline, and the
    /// tool's output schema as its own when it has none (so it repairs its own answer).
    fn fit_worker(
        &self,
        mut agent: Agent,
        tool: &ToolSpec,
        worker: &WorkerSource,
        budget: WorkerBudget,
    ) -> Agent {
        let limits = &mut agent.spec.limits;
        limits.max_cost_usd = limits.max_cost_usd.min(budget.max_cost_usd);
        limits.max_total_tokens = limits.max_total_tokens.min(budget.max_total_tokens);
        limits.timeout = limits
            .timeout
            .min(tool.contract.timeout)
            .min(self.remaining());
        if agent.spec.output_schema.is_none()
            && let (Some(schema), Some(validator)) = (
                &worker.output_schema,
                self.engine.agent().worker_validators.get(&tool.name),
            )
        {
            agent.spec.output_schema = Some(schema.clone());
            agent.output_validator = Some(validator.clone());
        }
        agent
    }

    /// Why a worker's answer is not taken: it did not complete, or its answer is outside the
    /// tool's output schema.
    fn rejection(
        &self,
        tool: &ToolSpec,
        worker: &WorkerSource,
        outcome: &RunOutcome,
    ) -> Option<String> {
        if outcome.reason == Some(rein_core::TerminationReason::MaxDepth) {
            // Passed up the tree as it is: the deepest run says where the cascade stopped.
            return Some(
                outcome
                    .detail
                    .clone()
                    .unwrap_or_else(|| "a worker stopped at max_depth".into()),
            );
        }
        if outcome.status != RunStatus::Completed {
            let reason = outcome
                .reason
                .map_or(outcome.status.as_str(), |r| r.as_str());
            let detail = outcome
                .detail
                .as_deref()
                .map_or(String::new(), |d| format!(": {d}"));
            return Some(format!(
                "the worker `{}` ended {reason}{detail}",
                worker.spec
            ));
        }
        let validator = self.engine.agent().worker_validators.get(&tool.name)?;
        let output = outcome.output.clone().unwrap_or(Value::Null);
        let output = match output {
            // A worker without a schema of its own answers in text; JSON text is read as JSON.
            Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            other => other,
        };
        let problems: Vec<String> = validator
            .iter_errors(&output)
            .take(3)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        (!problems.is_empty()).then(|| {
            format!(
                "the worker `{}` answered outside its output schema: {}",
                worker.spec,
                problems.join("; ")
            )
        })
    }
}

/// How the worker's run `child` ended: as its stored row shows it, with what its
/// `worker_finished` recorded it spent (the row counts its own model calls only).
fn reported(child: &WorkerChild, record: rein_store::RunRecord) -> RunOutcome {
    let progress = record.progress;
    RunOutcome {
        run_id: child.run_id.clone(),
        status: progress.status,
        reason: progress.reason,
        awaiting: None,
        detail: progress.detail,
        iterations: progress.iterations,
        tool_calls: progress.tool_calls,
        usage: child.spent.1,
        cost: child.spent.0,
        output: progress.output,
        models_used: Default::default(),
        events: record.event_count,
        step_overheads_ns: Vec::new(),
    }
}
