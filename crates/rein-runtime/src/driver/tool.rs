//! The driver's tool call: guarded by the tool's breaker and contract, with safe retries and
//! the run's deadline, secrets redacted from what is recorded.

use crate::*;
use rein_core::breaker::Admission;
use rein_core::budget::key_part;
use rein_core::{ErrorType, EventKind, ToolInvocation, ToolResult};
use rein_tools::{Reach, Secrets};
use retry::{Backoff, with_retries};
use std::time::{Duration, Instant};

impl Driver<'_> {
    /// Returns the time spent waiting on the tool (attempts and backoff).
    pub(crate) async fn call_tool(
        &mut self,
        invocation: ToolInvocation,
    ) -> Result<Duration, RuntimeError> {
        let agent = self.engine.agent().clone();
        let Some((tool, _)) = agent.tool(&invocation.tool) else {
            // The engine only asks for tools the agent has; this is defence in depth.
            let result = ToolResult::error(
                ErrorType::Permanent,
                format!("there is no tool named `{}`", invocation.tool),
            );
            self.record(EventKind::ToolResult {
                step: invocation.step,
                call_id: invocation.call_id,
                tool: invocation.tool,
                result,
                latency_ms: 0,
                attempts: 0,
            })
            .await?;
            return Ok(Duration::ZERO);
        };
        if let rein_core::ToolSource::Agent(worker) = &tool.source {
            // A worker is a run of its own, with its own breakers on what it calls. (Boxed: its
            // state would otherwise make every run's future, worker or not, kilobytes larger.)
            return Box::pin(self.call_worker(invocation, tool, worker)).await;
        }
        let contract = &tool.contract;
        // One breaker per tenant, agent and tool: a failing dependency of one tenant does not
        // stop the others. Breaker bookkeeping is best effort: an outage of the counters must
        // neither stop tools nor lose what a tool did.
        let breaker = format!(
            "breaker:tool:{}:{}:{}",
            key_part(self.tenant.as_str()),
            key_part(&agent.spec.name),
            key_part(&tool.name)
        );
        let probe_ms = i64::try_from(contract.timeout.as_millis()).unwrap_or(i64::MAX);
        let admission = self
            .runtime
            .breakers
            .admit(&breaker, &contract.breaker, now_ms(), probe_ms)
            .await
            .unwrap_or(Admission::Allowed);
        if let Admission::Refused { retry_in_ms } = admission {
            // Refused before it was requested: the call was never made.
            let mut refused = ToolResult::error(
                ErrorType::Transient,
                format!(
                    "`{}` has been failing, so its circuit breaker is open and it was not called; it will be tried again in about {} s",
                    tool.name,
                    (retry_in_ms + 999) / 1000
                ),
            );
            refused.retry_safe = false;
            refused.retry_after_ms = u64::try_from(retry_in_ms).ok();
            self.record(EventKind::ToolResult {
                step: invocation.step,
                call_id: invocation.call_id,
                tool: invocation.tool,
                result: refused,
                latency_ms: 0,
                attempts: 0,
            })
            .await?;
            return Ok(Duration::ZERO);
        }
        self.record(invocation.requested()).await?;
        let started = Instant::now();
        let backoff = Backoff {
            max_attempts: if contract.may_retry() {
                contract.retry.max_attempts
            } else {
                1
            },
            base: contract.retry.backoff,
            cap: contract.retry.max_backoff,
        };
        // The key is stable across retries and resumes: the same step is the same call.
        let key = format!("{}:{}", self.run_id, invocation.step);
        // The tool's span of the run's trace, as its parent (what `rein_core::spans` exports).
        let traceparent = rein_core::spans::traceparent(
            &self.trace,
            &rein_core::spans::tool_span_id(&self.run_id, invocation.step, &invocation.call_id),
        );
        // The secrets a tenant's tool names are opened for this call only (a rotated one is
        // picked up at the next call) and never kept.
        let opened = match (&tool.source, self.trust()) {
            (rein_core::ToolSource::Http(source), rein_core::Trust::Tenant) => {
                let named: Vec<String> = source
                    .headers
                    .values()
                    .flat_map(|template| rein_core::trust::secret_references(template))
                    .map(str::to_string)
                    .collect();
                self.runtime
                    .open_secrets(&self.tenant, &named)
                    .await
                    .map(Some)
            }
            (_, rein_core::Trust::Tenant) => Ok(Some(Secrets::default())),
            (_, rein_core::Trust::Operator) => Ok(None),
        };
        let tools = &self.runtime.tools;
        let args = &invocation.arguments;
        let timeout = contract.timeout;
        let name = tool.name.as_str();
        let (mut result, refusal, attempts) = match &opened {
            Ok(secrets) => {
                let reach = secrets.as_ref().map_or(Reach::Operator, Reach::Tenant);
                let outcome = with_retries(
                    &backoff,
                    self.remaining(),
                    timeout,
                    || Box::pin(tools.call(tool, args, &key, &traceparent, reach)),
                    |(r, _): &(ToolResult, _)| {
                        (!r.is_success() && r.retry_safe)
                            .then(|| r.retry_after_ms.map(Duration::from_millis))
                    },
                    |by_deadline| {
                        let message = if by_deadline {
                            format!("`{name}` was cut off at the run's wall-clock limit")
                        } else {
                            format!("`{name}` did not answer within {timeout:?}")
                        };
                        (ToolResult::error(ErrorType::Transient, message), None)
                    },
                )
                .await;
                let (result, refusal) = outcome.output;
                (result, refusal, outcome.attempts)
            }
            Err(()) => (
                ToolResult::error(
                    ErrorType::Transient,
                    format!(
                        "`{name}` was not called: its configuration could not be read; the same call may work later"
                    ),
                ),
                None,
                0,
            ),
        };
        // A tenant's secret a service echoes back is never recorded, whatever it looks like.
        if let Ok(Some(secrets)) = &opened {
            secrets.scrub(&mut result);
        }
        if let Some(refusal) = &refusal {
            self.egress_refused(invocation.step, &tool.name, refusal)
                .await?;
        }
        // Secrets a tool returns are removed before anything records or reads them: the model
        // cannot repeat what it never saw, and the log keeps none.
        if self.engine.agent().spec.guards.output.secrets != rein_core::sanitize::Action::Off {
            rein_core::sanitize::redact_secrets_in_result(&mut result);
        }
        // The model must not be told a failed call is safe to repeat when the contract says
        // repeating it could do its side effect twice.
        if !contract.may_retry() {
            result.retry_safe = false;
        }
        // Only the service's own failures count against its breaker: a 4xx or a refused
        // argument says nothing about the dependency's health.
        let failed = matches!(
            result.error_type,
            Some(ErrorType::Transient | ErrorType::RateLimit)
        );
        let waited = started.elapsed();
        self.record(EventKind::ToolResult {
            step: invocation.step,
            call_id: invocation.call_id,
            tool: invocation.tool,
            result,
            latency_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            attempts,
        })
        .await?;
        let _ = self
            .runtime
            .breakers
            .record(
                &breaker,
                &contract.breaker,
                !failed,
                admission == Admission::Probe,
                now_ms(),
            )
            .await;
        Ok(waited)
    }
}
