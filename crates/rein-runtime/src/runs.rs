//! Starting, resuming and deciding runs: each path ends in the driver, under the run's lease.

use crate::*;
use rein_core::event::ParentLink;
use rein_core::meter::RunMeter;
use rein_core::{
    Agent, CheckContext, Engine, Event, EventKind, PriceTable, RunId, RunStatus, TenantId,
    TerminationReason,
};
use rein_providers::{Model, TokenSink};
use rein_store::RunInfo;
use std::sync::Arc;

/// One log line per stop of a run this process drove: it ended, it waits for a person, or an
/// error stopped it (the run resumes from its log). It carries the run and trace ids, so a log
/// line leads to `rein runs show` and to the trace.
pub(crate) fn log_outcome(
    tenant: &TenantId,
    run_id: &RunId,
    trace: &[u8; 16],
    outcome: &Result<RunOutcome, RuntimeError>,
) {
    let trace_id = rein_core::event::hex(trace);
    match outcome {
        Ok(o) => tracing::info!(
            run_id = run_id.as_str(),
            trace_id,
            tenant = tenant.as_str(),
            status = o.status.as_str(),
            reason = o.reason.map(|r| r.as_str()),
            iterations = o.iterations,
            tool_calls = o.tool_calls,
            input_tokens = o.usage.input_tokens,
            output_tokens = o.usage.output_tokens,
            cost_usd = o.cost.micros() as f64 / 1e6,
            detail = o.detail.as_deref(),
            "{}",
            if o.status.is_terminal() {
                "run ended"
            } else {
                "run waits for a person"
            }
        ),
        Err(e) => tracing::warn!(
            run_id = run_id.as_str(),
            trace_id,
            tenant = tenant.as_str(),
            error = %e,
            "run stopped by an error; it resumes from its log"
        ),
    }
}

/// Seals a new run's first events into the start of its chain.
pub(crate) fn seal_first(
    run_id: &RunId,
    ts_ms: i64,
    kinds: Vec<EventKind>,
) -> Vec<(Event, rein_core::SealedEvent)> {
    let mut prev = rein_core::GENESIS_HASH.to_string();
    kinds
        .into_iter()
        .enumerate()
        .map(|(seq, kind)| {
            let event = Event {
                seq: seq as u64,
                ts_ms,
                kind,
            };
            let sealed = event.seal(run_id, &prev);
            prev = sealed.hash.clone();
            (event, sealed)
        })
        .collect()
}

/// Whether `events` are the log of a gateway call stopped before its model answered (or
/// failed): resuming it would call the model for a caller who is no longer there.
pub(crate) fn interrupted_gateway_call(events: &[Event]) -> bool {
    let gateway = events
        .iter()
        .any(|e| matches!(e.kind, EventKind::ChatRequest(_)));
    let answered = events.iter().any(|e| {
        matches!(
            e.kind,
            EventKind::ModelResponded { .. }
                | EventKind::ModelFailed { .. }
                | EventKind::RunFinished { .. }
        )
    });
    gateway && !answered
}

impl Runtime {
    /// Hands the trace of `run_id`, which has just ended, to the span sink. A log that cannot be
    /// read is not traced: tracing never fails a run.
    pub(crate) async fn trace_ended(&self, tenant: &TenantId, run_id: &RunId) {
        let Some(sink) = &self.spans else {
            return;
        };
        let Ok(sealed) = self.store.events(tenant, run_id).await else {
            return;
        };
        let Ok(events) = sealed
            .iter()
            .map(|e| e.decode())
            .collect::<Result<Vec<_>, _>>()
        else {
            return;
        };
        sink.export(rein_core::spans::spans(run_id, &events));
    }

    /// Starts a run and drives it to its end. When the tenant's bulkhead is full the run waits
    /// for a slot in a first-come, first-served queue (or is refused with
    /// [`RuntimeError::Busy`] before anything is recorded).
    pub async fn run(
        &self,
        request: RunRequest,
        model: &dyn Model,
    ) -> Result<RunOutcome, RuntimeError> {
        self.run_streaming(request, model, None).await
    }

    /// [`Runtime::run`], handing the text of every answer to `sink` as the provider streams it.
    /// (Text of an attempt that then fails is not taken back.)
    pub async fn run_streaming(
        &self,
        request: RunRequest,
        model: &dyn Model,
        sink: Option<&TokenSink>,
    ) -> Result<RunOutcome, RuntimeError> {
        self.run_as(Runtime::new_run_id(), request, model, sink)
            .await
    }

    /// A new run id (UUIDv7: time-ordered).
    pub fn new_run_id() -> RunId {
        RunId::new(uuid::Uuid::now_v7().to_string())
    }

    /// [`Runtime::run_streaming`] under an id the caller chose (and may already have shown, so
    /// that a process killed mid-run can be resumed by it). The id must be new.
    pub async fn run_as(
        &self,
        run_id: RunId,
        request: RunRequest,
        model: &dyn Model,
        sink: Option<&TokenSink>,
    ) -> Result<RunOutcome, RuntimeError> {
        let tenant = request.tenant.clone();
        let lease = run_lease_ms(&request.agent);
        self.enter_bulkhead(&tenant, run_id.as_str(), lease).await?;
        let outcome = self
            .run_admitted(run_id.clone(), request, model, sink, None, None)
            .await;
        self.leave_bulkhead(&tenant, run_id.as_str()).await?;
        outcome
    }

    /// A run already admitted by its tenant's bulkhead (a worker's run is admitted with its
    /// caller's: the tree holds one slot, so a full bulkhead cannot deadlock it).
    pub(crate) async fn run_admitted(
        &self,
        run_id: RunId,
        request: RunRequest,
        model: &dyn Model,
        sink: Option<&TokenSink>,
        parent: Option<ParentLink>,
        caller_cancel: Option<Arc<std::sync::OnceLock<String>>>,
    ) -> Result<RunOutcome, RuntimeError> {
        let agent = request.agent.clone();
        let (tenant, user, session) = (
            request.tenant.clone(),
            request.user.clone(),
            request.session.clone(),
        );
        let (trace, _) = rein_core::spans::run_trace(&run_id, request.trace_parent.as_deref());
        let (info, kinds) = self.first_events(&run_id, request, parent).await?;
        let mut driver = Driver {
            runtime: self,
            model,
            sink,
            tenant: tenant.clone(),
            user,
            session,
            run_id: run_id.clone(),
            engine: Engine::new(agent),
            prev_hash: rein_core::GENESIS_HASH.to_string(),
            next_seq: 0,
            overheads: Vec::new(),
            detail: None,
            models_used: Default::default(),
            unsaved: Vec::new(),
            unstored: None,
            meter: None,
            unmeasured: Vec::new(),
            trace,
            cancel: None,
            caller_cancel,
        };
        driver.start(info, kinds)?;
        let keeper = self.keep_lease(&run_id);
        let outcome = driver.drive().await;
        drop(keeper);
        log_outcome(&tenant, &run_id, &driver.trace, &outcome);
        // No worker claims an ended run, so its lease needs no release: one write fewer per
        // run (a gateway call is a whole run).
        if matches!(&outcome, Ok(o) if o.status.is_terminal()) {
            self.trace_ended(&tenant, &run_id).await;
        } else {
            self.store.release(&run_id, &self.owner).await?;
        }
        outcome
    }

    /// A new run's identity and the events its log starts with: `run_started`, and the
    /// session's conversation when the spec continues sessions.
    pub(crate) async fn first_events(
        &self,
        run_id: &RunId,
        request: RunRequest,
        parent: Option<ParentLink>,
    ) -> Result<(RunInfo, Vec<EventKind>), RuntimeError> {
        let spec = &request.agent.spec;
        // A secret pasted into the input is kept out of the store, the log and the model's
        // view alike: the run row and `run_started` hold the same redacted text, so every view
        // shows it and the audit finds them equal.
        let input = if spec.guards.output.secrets == rein_core::sanitize::Action::Off {
            request.input.clone()
        } else {
            rein_core::sanitize::redact_secrets(&request.input).0
        };
        let info = RunInfo {
            id: run_id.clone(),
            tenant: request.tenant.clone(),
            user: request.user.clone(),
            session: request.session.clone(),
            job: request.job.clone(),
            agent: spec.name.clone(),
            agent_version: spec.version,
            spec: request.spec_source.clone(),
            input: input.clone(),
            created_ms: now_ms(),
            parent: parent.as_ref().map(|p| p.run_id.clone()),
        };
        let context = match spec.session {
            Some(policy) => {
                // Context beyond a quarter of the run's token cap is summarized too: a long
                // conversation must not crowd out the run's own work.
                let budget = spec.limits.max_total_tokens / 4;
                self.session_context(&request.tenant, &request.session, policy.ttl, budget)
                    .await?
            }
            None => None,
        };
        let kinds = std::iter::once(EventKind::RunStarted {
            agent: spec.name.clone(),
            agent_version: spec.version,
            spec_sha256: rein_core::event::sha256_hex(request.spec_source.as_bytes()),
            input,
            tenant: request.tenant,
            user: request.user,
            session: request.session,
            job: request.job,
            granted_scopes: request.granted_scopes,
            trace_parent: request.trace_parent,
            fence: spec
                .guards
                .fences(&spec.tools)
                .then(fence_boundary)
                .flatten(),
            parent,
            trust: Some(request.trust),
        })
        .chain(context)
        .chain(request.chat.map(|mut chat| {
            // A gateway call's conversation is its input: its secrets are kept out as well.
            if spec.guards.output.secrets != rein_core::sanitize::Action::Off {
                for message in &mut chat.messages {
                    if let Some(text) = message.content.as_mut() {
                        *text = rein_core::sanitize::redact_secrets(text).0;
                    }
                }
            }
            EventKind::ChatRequest(chat)
        }))
        .collect();
        Ok((info, kinds))
    }

    /// Continues a run from its log (after a crash, or a run left `running`), under the spec
    /// the run pinned when it started: changing a spec file never changes a running run's limits.
    pub async fn resume(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        prices: &PriceTable,
        model: &dyn Model,
    ) -> Result<RunOutcome, RuntimeError> {
        self.continue_run(tenant, run_id, prices, model, None, now_ms())
            .await
    }

    /// Records a person's decision on the run's pending approval, then drives the run on: an
    /// approved call is made, a denied one is reported to the model as refused (or ends the
    /// run, per the spec's `approval.on_deny`). A run not awaiting approval is left untouched.
    pub async fn decide(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        prices: &PriceTable,
        model: &dyn Model,
        decision: Decision,
    ) -> Result<RunOutcome, RuntimeError> {
        self.continue_run(tenant, run_id, prices, model, Some(decision), now_ms())
            .await
    }

    pub(crate) async fn continue_run(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        prices: &PriceTable,
        model: &dyn Model,
        decision: Option<Decision>,
        lease_as_of: i64,
    ) -> Result<RunOutcome, RuntimeError> {
        // The lease first: the log read below is then the one this process continues.
        let record = self.store.run(tenant, run_id).await?;
        if let Some(caller) = &record.info.parent {
            return Err(RuntimeError::WorkerRun {
                run: run_id.clone(),
                caller: caller.clone(),
            });
        }
        // An ended run (cancelled while it waited, say) takes no decision: there is nothing
        // left to approve.
        if decision.is_some() && record.progress.status.is_terminal() {
            return Err(RuntimeError::Ended(run_id.clone(), record.progress.status));
        }
        let now = lease_as_of;
        self.leased(
            run_id,
            now,
            self.continue_leased(tenant, run_id, record, prices, model, decision),
        )
        .await
    }

    pub(crate) async fn continue_leased(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        record: rein_store::RunRecord,
        prices: &PriceTable,
        model: &dyn Model,
        decision: Option<Decision>,
    ) -> Result<RunOutcome, RuntimeError> {
        let builtins = self.tools.builtins().infos();
        let ctx = CheckContext {
            prices,
            builtin_tools: &builtins,
            providers: rein_providers::PROVIDERS,
        };
        let agent = Agent::parse(
            &format!("run {run_id} (pinned spec)"),
            &record.info.spec,
            &ctx,
        )
        .map_err(RuntimeError::PinnedSpec)?;
        self.drive_logged(tenant, run_id, record, agent, model, decision, None, true)
            .await
    }

    /// Continues a worker agent's run that its caller started before a crash, as `agent` (its
    /// pinned spec, fitted to the budget its caller gave it), under the caller's cancellation
    /// and bulkhead slot. The caller's driver holds the whole tree, so it takes the worker's
    /// lease whoever held it: that process is gone with the caller's, and no other process
    /// claims a worker's run.
    pub(crate) async fn continue_worker(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        record: rein_store::RunRecord,
        agent: Agent,
        model: &dyn Model,
        caller_cancel: Option<Arc<std::sync::OnceLock<String>>>,
    ) -> Result<RunOutcome, RuntimeError> {
        let drive = self.drive_logged(
            tenant,
            run_id,
            record,
            agent,
            model,
            None,
            caller_cancel,
            false,
        );
        self.leased(run_id, i64::MAX, drive).await
    }

    /// Drives a leased run on from its log as `agent`, in a bulkhead slot of its own
    /// (`own_slot`), or in its caller's (a worker's run).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn drive_logged(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        record: rein_store::RunRecord,
        agent: Agent,
        model: &dyn Model,
        decision: Option<Decision>,
        caller_cancel: Option<Arc<std::sync::OnceLock<String>>>,
        own_slot: bool,
    ) -> Result<RunOutcome, RuntimeError> {
        let sealed = self.store.events(tenant, run_id).await?;
        let events = sealed
            .iter()
            .map(|e| e.decode())
            .collect::<Result<Vec<_>, _>>()?;
        let lease = run_lease_ms(&agent);
        let engine = Engine::replay(Arc::new(agent), &events)?;
        let decided = match (&decision, engine.pending_approval()) {
            (None, _) => None,
            (Some(d), Some(pending)) => Some(pending.decided(d.approved, &d.by, d.reason.clone())),
            (Some(_), None) => return Err(RuntimeError::NotAwaitingApproval(run_id.clone())),
        };
        if own_slot {
            self.enter_bulkhead(tenant, run_id.as_str(), lease).await?;
        }
        let mut driver = Driver {
            runtime: self,
            model,
            sink: None,
            tenant: tenant.clone(),
            user: record.info.user.clone(),
            session: record.info.session.clone(),
            run_id: run_id.clone(),
            engine,
            prev_hash: sealed
                .last()
                .map_or_else(|| rein_core::GENESIS_HASH.to_string(), |e| e.hash.clone()),
            next_seq: sealed.len() as u64,
            overheads: Vec::new(),
            detail: None,
            models_used: Default::default(),
            unsaved: Vec::new(),
            unstored: None,
            meter: None,
            unmeasured: Vec::new(),
            trace: rein_core::spans::log_trace(run_id, &events).0,
            // A request to cancel the run made while another process drove it.
            cancel: record
                .cancel_requested_by
                .clone()
                .map(|by| Arc::new(std::sync::OnceLock::from(by))),
            caller_cancel,
        };
        if self.meters.on() {
            // What the log already holds was measured when it was written.
            let mut meter = RunMeter::new(tenant.as_str(), &record.info.agent);
            events.iter().for_each(|e| meter.replay(e));
            driver.meter = Some(meter);
        }
        for event in &events {
            match &event.kind {
                EventKind::ModelResponded { model, .. } => {
                    *driver.models_used.entry(model.clone()).or_default() += 1;
                }
                EventKind::RunFinished { detail, .. } => driver.detail = detail.clone(),
                _ => {}
            }
        }
        let outcome = async {
            // Taken up from the queue, or by another process after the one driving it stopped:
            // the time it waited is not the run's (an approval's wait is counted out by its
            // decision). Taken up again by the process that last took it (after an error of
            // its own), its clock runs on: a run failing over and over still times out.
            let holder = shown_holder(&self.owner);
            let claim = match record.progress.status {
                RunStatus::Queued => true,
                RunStatus::Running => driver.engine.last_claimed_by() != Some(holder),
                _ => false,
            };
            if claim {
                driver
                    .record(EventKind::RunClaimed {
                        by: holder.to_string(),
                    })
                    .await?;
            }
            driver.settle_leftovers(&events).await?;
            if let Some(kind) = decided {
                driver.record(kind).await?;
            }
            if interrupted_gateway_call(&events) {
                // Its caller waited on a connection that the crash closed: no one would receive
                // the answer of a model call made now, so none is made and the run ends.
                driver
                    .record(EventKind::RunFinished {
                        status: RunStatus::Failed,
                        reason: TerminationReason::Error,
                        detail: Some(
                            "the gateway call was interrupted before the model answered (the \
                             process serving it stopped); its caller got no answer, so it is \
                             not called again"
                                .into(),
                        ),
                        output: None,
                    })
                    .await?;
            }
            driver.drive().await
        }
        .await;
        log_outcome(tenant, run_id, &driver.trace, &outcome);
        if matches!(&outcome, Ok(o) if o.status.is_terminal()) {
            self.trace_ended(tenant, run_id).await;
        }
        if own_slot {
            self.leave_bulkhead(tenant, run_id.as_str()).await?;
        }
        outcome
    }
}
