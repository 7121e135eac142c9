//! The driver's model call: the step's chain of models tried in order, each under its breaker,
//! retries and timeout, streamed where the caller listens.

use crate::*;
use rein_core::breaker::Admission;
use rein_core::budget::{Amount, key_part};
use rein_core::{ErrorType, EventKind, ModelCall};
use rein_providers::{Endpoint, ModelError, ModelRequest};
use rein_store::Settlement;
use retry::{Backoff, with_retries};
use std::time::{Duration, Instant};

impl Driver<'_> {
    /// Returns the time spent waiting on the provider (attempts and backoff).
    pub(crate) async fn call_model(&mut self, call: ModelCall) -> Result<Duration, RuntimeError> {
        if !self.throttle(&call).await? {
            return Ok(Duration::ZERO);
        }
        let reservation = match self.reserve(&call).await? {
            Ok(reservation) => reservation,
            Err(()) => return Ok(Duration::ZERO),
        };
        let agent = self.engine.agent().clone();
        let spec = &agent.spec;
        let model = self.model;
        let sink = self.sink;
        let started = Instant::now();
        let chain = spec.model.step_chain(call.kind);
        // A summary and a judge's verdict are asked for without tools or the answer's schema.
        let summary = matches!(
            call.kind,
            rein_core::spec::StepKind::Summarize | rein_core::spec::StepKind::Judge
        );
        let mut answered: Option<(&str, rein_core::ModelReply, u32)> = None;
        let mut last_failure: Option<(&str, ModelError, u32)> = None;
        let mut open_breakers = 0;
        for (index, &model_ref) in chain.iter().enumerate() {
            let entry = model_ref.id.as_str();
            let has_next = index + 1 < chain.len();
            // One breaker per tenant and provider/model (and server), shared by the tenant's
            // runs in every process: a provider that keeps failing is skipped without a network
            // attempt. Per tenant, since its policy (`model.breaker`, `model.timeout`) is the
            // spec's: one tenant's hair trigger must not stop another tenant's calls.
            let breaker = format!(
                "breaker:model:{}:{}",
                key_part(self.tenant.as_str()),
                key_part(&model_ref.endpoint_key())
            );
            let probe_ms = i64::try_from(spec.model.timeout.as_millis()).unwrap_or(i64::MAX);
            let policy = spec.model.breaker;
            let admission = self
                .runtime
                .breakers
                .admit(&breaker, &policy, now_ms(), probe_ms)
                .await
                .unwrap_or(Admission::Allowed);
            if let Admission::Refused { retry_in_ms } = admission {
                open_breakers += 1;
                self.record(EventKind::ModelFellBack {
                    step: call.step,
                    model: entry.to_string(),
                    reason: format!(
                        "its circuit breaker is open (about {} s to the next probe)",
                        (retry_in_ms + 999) / 1000
                    ),
                })
                .await?;
                continue;
            }

            // A map-form entry's own server gets the entry's own key, looked up now: from the
            // environment for the operator's spec, from the tenant's secrets for a tenant's,
            // whose call also goes through the egress policy.
            let runtime = self.runtime;
            let tenant_spec = self.trust() == rein_core::Trust::Tenant;
            let mut endpoint_key = None;
            let mut refusal = None;
            let mut key_unread = false;
            if let Some(base_url) = model_ref.base_url.as_deref() {
                let var = model_ref.api_key_env.as_deref();
                if tenant_spec {
                    refusal = runtime.tools.egress().check_url(base_url).err();
                    if let Some(var) = var {
                        let names = [var.to_string()];
                        match runtime.open_secrets(&self.tenant, &names).await {
                            Ok(secrets) => endpoint_key = secrets.get(var).map(str::to_string),
                            // Not sent without its key: the store will answer again.
                            Err(()) => key_unread = true,
                        }
                    }
                } else {
                    endpoint_key = var
                        .and_then(|v| std::env::var(v).ok())
                        .filter(|k| !k.is_empty());
                }
            }
            let endpoint = model_ref.base_url.as_deref().map(|base_url| Endpoint {
                base_url,
                api_key: endpoint_key.as_deref(),
                http: tenant_spec.then(|| runtime.tools.egress().client()),
            });
            let outcome = {
                let request = ModelRequest {
                    // The full `provider/model`: a router sends it to its provider, which
                    // strips its own prefix.
                    model: entry,
                    messages: self.engine.messages(),
                    tools: if summary {
                        &[]
                    } else {
                        self.engine.tool_definitions()
                    },
                    max_output_tokens: call.max_output_tokens,
                    temperature: self.engine.temperature(),
                    output_schema: self.engine.output_schema().filter(|_| !summary),
                    tool_choice: call.tool_choice.as_ref(),
                    endpoint,
                };
                with_retries(
                    &Backoff {
                        max_attempts: spec.model.retry.max_attempts,
                        base: spec.model.retry.backoff,
                        cap: spec.model.retry.max_backoff,
                    },
                    self.remaining(),
                    spec.model.timeout,
                    || match (&refusal, sink) {
                        (None, _) if key_unread => {
                            let unread = ModelError::new(
                                ErrorType::Transient,
                                "the model's key could not be read; the same call may work later",
                            );
                            Box::pin(std::future::ready(Err(unread)))
                        }
                        (Some(refusal), _) => {
                            // Refused as the client refuses a name, and recorded the same way.
                            let refused = ModelError::refused(refusal.clone());
                            Box::pin(std::future::ready(Err(refused)))
                        }
                        (None, Some(sink)) => model.complete_streaming(request, sink),
                        (None, None) => model.complete(request),
                    },
                    |result: &Result<_, ModelError>| match result {
                        Err(e) if e.is_retryable() => Some(e.retry_after),
                        _ => None,
                    },
                    |by_deadline| {
                        Err(ModelError::new(
                            ErrorType::Transient,
                            if by_deadline {
                                "the run's wall-clock limit was reached while waiting for the model"
                            } else {
                                "the model did not answer in time"
                            },
                        ))
                    },
                )
                .await
            };
            // Every attempt is named in the log: the ones that failed and were retried first.
            for (attempt, (failed, wait)) in outcome.retried.into_iter().enumerate() {
                if let Err(e) = failed {
                    self.record(EventKind::ModelAttemptFailed {
                        step: call.step,
                        model: entry.to_string(),
                        attempt: u32::try_from(attempt + 1).unwrap_or(u32::MAX),
                        error_type: e.kind,
                        message: e.message,
                        retry_in_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    })
                    .await?;
                }
            }
            if let Err(ModelError {
                egress: Some(refusal),
                ..
            }) = &outcome.output
            {
                self.egress_refused(call.step, entry, refusal).await?;
            }
            let provider_failed = matches!(&outcome.output, Err(e) if e.is_retryable());
            let _ = self
                .runtime
                .breakers
                .record(
                    &breaker,
                    &policy,
                    !provider_failed,
                    admission == Admission::Probe,
                    now_ms(),
                )
                .await;
            match outcome.output {
                Ok(reply) => {
                    answered = Some((entry, reply, outcome.attempts));
                    break;
                }
                Err(e) => {
                    if has_next {
                        self.record(EventKind::ModelFellBack {
                            step: call.step,
                            model: entry.to_string(),
                            reason: format!(
                                "it failed for good after {} attempt(s): {}",
                                outcome.attempts, e.message
                            ),
                        })
                        .await?;
                    }
                    last_failure = Some((entry, e, outcome.attempts));
                }
            }
        }
        let waited = started.elapsed();
        let latency_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        let kind = match (answered, last_failure) {
            (Some((entry, reply, attempts)), _) => EventKind::ModelResponded {
                step: call.step,
                cost: agent
                    .prices
                    .get(entry)
                    .copied()
                    .unwrap_or_else(|| agent.worst_price(&chain))
                    .cost(&reply.usage),
                model: entry.to_string(),
                content: reply.content,
                tool_calls: reply.tool_calls,
                usage: reply.usage,
                latency_ms,
                attempts,
                finish_reason: reply.finish_reason,
                cached: reply.cached,
            },
            (None, Some((entry, e, attempts))) => EventKind::ModelFailed {
                step: call.step,
                model: entry.to_string(),
                error_type: e.kind,
                message: e.message,
                latency_ms,
                attempts,
                all_circuits_open: false,
            },
            (None, None) => EventKind::ModelFailed {
                step: call.step,
                model: call.model.clone(),
                error_type: ErrorType::Transient,
                message: format!(
                    "all {open_breakers} model(s) of the chain are failing and were skipped"
                ),
                latency_ms,
                attempts: 0,
                all_circuits_open: true,
            },
        };
        let spent = match &kind {
            EventKind::ModelResponded { usage, cost, .. } => Amount {
                usd: *cost,
                tokens: usage.total(),
            },
            _ => Amount::default(),
        };
        let (Some((id, scopes)), Some(governor)) = (reservation, self.runtime.governor.clone())
        else {
            self.record(kind).await?;
            return Ok(waited);
        };
        let settled = EventKind::BudgetSettled {
            step: call.step,
            reservation: id.clone(),
            amount: spent,
        };
        let standings = if self.runtime.budget_in_store() {
            // One transaction: the answer, the settlement and its record, and the run's end
            // when that is all the engine does next (unless the settlement crosses a warning
            // line: the warning comes first, so the end is then left for the next step).
            self.stage(kind)?;
            self.stage(settled)?;
            let mark = (self.next_seq, self.prev_hash.clone());
            let end = self.ending().map(|kind| self.seal(kind));
            let settlement = Settlement {
                id: &id,
                scopes: &scopes,
                actual: spent,
                warn_percent: governor.budgets.warn_percent,
                end: usize::from(end.is_some()),
            };
            let store = &self.runtime.store;
            let standings = store
                .settle_and_write(&self.tenant, self.new_run(), &self.unsaved, settlement)
                .await?;
            match end {
                Some(_) if settlement.warns(&standings) => self.unseal(mark),
                Some(end) => self.fold(&end)?,
                None => {}
            }
            self.saved();
            standings
        } else {
            self.record(kind).await?;
            let standings = governor.counters.settle(&id, &scopes, spent).await?;
            // Written with the run's next event: lost in a crash, the settlement is made again
            // on resume (`settle_leftovers`), and the counters count it once.
            self.stage(settled)?;
            standings
        };
        self.warn_on_crossing(&governor, scopes, standings, spent)
            .await?;
        Ok(waited)
    }
}
