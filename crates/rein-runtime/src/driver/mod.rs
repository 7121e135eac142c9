//! The driver: one run carried through the engine's effects, each outcome sealed into the log
//! before the next effect starts.

mod model;
mod spend;
mod tool;

use crate::*;
use rein_core::meter::{Measure, RunMeter};
use rein_core::{
    Effect, Engine, Event, EventKind, RunId, RunStatus, SessionId, TenantId, TerminationReason,
    UserId,
};
use rein_providers::{Model, TokenSink};
use rein_store::RunInfo;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One run being driven.
pub(crate) struct Driver<'a> {
    pub(crate) runtime: &'a Runtime,
    pub(crate) model: &'a dyn Model,
    pub(crate) sink: Option<&'a TokenSink>,
    pub(crate) tenant: TenantId,
    pub(crate) user: UserId,
    pub(crate) session: SessionId,
    pub(crate) run_id: RunId,
    pub(crate) engine: Engine,
    pub(crate) prev_hash: String,
    pub(crate) next_seq: u64,
    pub(crate) overheads: Vec<u64>,
    pub(crate) detail: Option<String>,
    pub(crate) models_used: std::collections::BTreeMap<String, u32>,
    /// Events sealed and folded into the engine but not yet in the store: they are written
    /// with the next event that must be durable (before any call goes out, and at the end).
    pub(crate) unsaved: Vec<rein_core::SealedEvent>,
    /// A new run not yet in the store: it goes in with the first events written, under a
    /// fresh lease (one write fewer per run; nothing outside the run acts before then).
    pub(crate) unstored: Option<RunInfo>,
    /// The run's meter, when the runtime measures runs.
    pub(crate) meter: Option<RunMeter>,
    /// The run's trace id (its own, or the caller's it continues).
    pub(crate) trace: [u8; 16],
    /// What the staged events add to the metrics, applied once they are durable.
    pub(crate) unmeasured: Vec<Measure>,
    /// Who asked to cancel this run, once someone has (set while it is driven; before, a
    /// request found in the store when this process took the run up).
    pub(crate) cancel: Option<Arc<std::sync::OnceLock<String>>>,
    /// For a worker's run: its caller's cancel flag (a cancelled caller stops its workers).
    pub(crate) caller_cancel: Option<Arc<std::sync::OnceLock<String>>>,
}

impl Driver<'_> {
    /// Who wrote the run's spec: as its log says, else as this runtime assumes.
    pub(crate) fn trust(&self) -> rein_core::Trust {
        self.engine.trust().unwrap_or(self.runtime.unrecorded_trust)
    }

    /// Records a connection the egress policy refused; the address goes to the operator's log
    /// only (the tenant sees the host and the kind of range).
    pub(crate) async fn egress_refused(
        &mut self,
        step: u32,
        target: &str,
        refusal: &rein_core::egress::EgressRefusal,
    ) -> Result<(), RuntimeError> {
        tracing::warn!(
            tenant = self.tenant.as_str(),
            run_id = self.run_id.as_str(),
            target,
            host = refusal.host.as_str(),
            address = %refusal.address,
            "the egress policy refused a tenant's connection"
        );
        self.record(EventKind::EgressRefused {
            step,
            target: target.to_string(),
            host: refusal.host.clone(),
            range: refusal.range.to_string(),
        })
        .await
        .map(|_| ())
    }

    pub(crate) async fn drive(&mut self) -> Result<RunOutcome, RuntimeError> {
        let cancel = Driving::register(self.runtime, &self.run_id, self.cancel.take());
        self.cancel = Some(cancel.flag.clone());
        let mut carried = Duration::ZERO;
        let mut awaiting = None;
        while let Some(effect) = self.engine.next_effect(now_ms()) {
            let by_caller = || {
                let by = self.caller_cancel.as_ref()?.get()?;
                Some(format!("{by} (who cancelled its caller)"))
            };
            if let Some(by) = cancel.requested().or_else(by_caller) {
                self.record(EventKind::RunFinished {
                    status: RunStatus::Cancelled,
                    reason: TerminationReason::Cancelled,
                    detail: Some(format!("cancelled by {by} while it ran")),
                    output: None,
                })
                .await?;
                continue;
            }
            let started = Instant::now();
            let io = match effect {
                Effect::AwaitApproval(pending) => {
                    awaiting = Some(pending);
                    break;
                }
                Effect::Record(kind) => {
                    self.record(kind).await?;
                    carried += started.elapsed();
                    continue;
                }
                Effect::CheckContent(check) => {
                    let agent = self.engine.agent().clone();
                    let off_thread = check.clone();
                    let verdict =
                        tokio::task::spawn_blocking(move || off_thread.verdict(&agent.spec.guards))
                            .await;
                    let kind = match verdict {
                        Ok(kind) => kind,
                        // The blocking pool is gone (shutdown): check here instead.
                        Err(_) => check.verdict(&self.engine.agent().spec.guards),
                    };
                    self.record(kind).await?;
                    carried += started.elapsed();
                    continue;
                }
                Effect::CallModel(call) => self.call_model(call).await?,
                Effect::CallTool(invocation) => self.call_tool(invocation).await?,
            };
            if self.runtime.step_timings {
                let own = started.elapsed().saturating_sub(io) + carried;
                self.overheads
                    .push(u64::try_from(own.as_nanos()).unwrap_or(u64::MAX));
            }
            carried = Duration::ZERO;
        }
        self.save().await?;
        let (status, reason) = match (self.engine.outcome(), &awaiting) {
            (Some((status, reason)), _) => (status, Some(reason)),
            (None, Some(_)) => (RunStatus::AwaitingApproval, None),
            (None, None) => (RunStatus::Failed, Some(TerminationReason::Error)),
        };
        if status.is_terminal() {
            // Workers a crash left running, which this run ended without continuing (it was
            // cancelled, or ran out of time, first): no one else would ever end them.
            let orphans = self.engine.unfinished_workers();
            if !orphans.is_empty() {
                self.runtime
                    .end_orphaned_workers(&self.tenant, &self.run_id, orphans)
                    .await;
            }
        }
        Ok(RunOutcome {
            run_id: self.run_id.clone(),
            status,
            reason,
            awaiting,
            // What the store shows: a run's detail is its `run_finished`'s.
            detail: self.detail.take(),
            iterations: self.engine.iterations(),
            tool_calls: self.engine.tool_calls(),
            usage: self.engine.usage(),
            cost: self.engine.cost(),
            output: self.engine.output().cloned(),
            models_used: std::mem::take(&mut self.models_used),
            events: self.next_seq,
            step_overheads_ns: std::mem::take(&mut self.overheads),
        })
    }

    /// Folds the run's first events (`run_started`, the session's context if any, the
    /// caller's conversation) into the engine and stages them: the run is stored with them
    /// and whatever follows them up to the first event that must be durable.
    pub(crate) fn start(
        &mut self,
        info: RunInfo,
        kinds: Vec<EventKind>,
    ) -> Result<(), RuntimeError> {
        for (event, one) in seal_first(&self.run_id, info.created_ms, kinds) {
            self.engine.apply(&event)?;
            self.measure(&event);
            self.unsaved.push(one);
        }
        self.prev_hash = self
            .unsaved
            .last()
            .map_or_else(|| rein_core::GENESIS_HASH.to_string(), |e| e.hash.clone());
        self.next_seq = self.unsaved.len() as u64;
        self.unstored = Some(info);
        Ok(())
    }

    /// Seals `kind` into the chain, folds it into the engine and makes it durable, with any
    /// event staged before it.
    pub(crate) async fn record(&mut self, kind: EventKind) -> Result<(), RuntimeError> {
        self.stage(kind)?;
        self.save().await
    }

    /// Writes the staged events, in one go (with the run itself, the first time).
    pub(crate) async fn save(&mut self) -> Result<(), RuntimeError> {
        let store = &self.runtime.store;
        if let Some((info, lease)) = self.new_run() {
            store.create_run(info, &self.unsaved, lease).await?;
        } else if !self.unsaved.is_empty() {
            store.append_all(&self.tenant, &self.unsaved).await?;
        }
        self.saved();
        Ok(())
    }

    /// The run's end, when recording it is all the engine does next and nobody asked to
    /// cancel the run.
    pub(crate) fn ending(&self) -> Option<EventKind> {
        let cancelled = [&self.cancel, &self.caller_cancel]
            .into_iter()
            .flatten()
            .any(|flag| flag.get().is_some());
        match self.engine.next_effect(now_ms()) {
            Some(Effect::Record(kind @ EventKind::RunFinished { .. })) if !cancelled => Some(kind),
            _ => None,
        }
    }

    /// The new run, if it is not stored yet, with the lease it is stored under.
    pub(crate) fn new_run(&self) -> Option<(&RunInfo, Option<rein_store::Lease<'_>>)> {
        let info = self.unstored.as_ref()?;
        Some((info, Some(self.runtime.fresh_lease())))
    }

    /// What [`Driver::save`] does after the staged events are written.
    pub(crate) fn saved(&mut self) {
        self.unstored = None;
        self.unsaved.clear();
        self.runtime
            .meters
            .apply(std::mem::take(&mut self.unmeasured));
    }

    /// Seals `kind` into the chain and folds it into the engine; it is written with the next
    /// [`Driver::record`] (or [`Driver::save`]). Only for an event that nothing outside the run
    /// acts on before that: a crash in between loses it as if it had not happened, and the
    /// run resumes from the event before it.
    pub(crate) fn stage(&mut self, kind: EventKind) -> Result<(), RuntimeError> {
        let event = self.seal(kind);
        self.fold(&event)
    }

    /// Seals `kind` into the chain and stages it, without folding it into the engine yet.
    pub(crate) fn seal(&mut self, mut kind: EventKind) -> Event {
        // A handoff says where the whole story is: the run's trace.
        if let EventKind::RunFinished {
            reason: TerminationReason::Escalated,
            output: Some(output),
            ..
        } = &mut kind
            && let Some(handoff) = output.get_mut("handoff").and_then(Value::as_object_mut)
        {
            let id = self.run_id.as_str();
            handoff.insert(
                "trace".into(),
                serde_json::json!({
                    "run_id": id,
                    "cli": format!("rein runs show {id}"),
                    "api": format!("/v1/runs/{id}/trace"),
                }),
            );
        }
        if let EventKind::ModelResponded { model, .. } = &kind {
            *self.models_used.entry(model.clone()).or_default() += 1;
        }
        if let EventKind::RunFinished { detail, .. } = &kind {
            self.detail = detail.clone();
        }
        let event = Event {
            seq: self.next_seq,
            ts_ms: now_ms(),
            kind,
        };
        let sealed = event.seal(&self.run_id, &self.prev_hash);
        self.prev_hash = sealed.hash.clone();
        self.next_seq += 1;
        self.unsaved.push(sealed);
        event
    }

    /// Folds a sealed event into the engine and the run's meter.
    pub(crate) fn fold(&mut self, event: &Event) -> Result<(), RuntimeError> {
        self.engine.apply(event)?;
        self.measure(event);
        Ok(())
    }

    /// Takes the events sealed since `mark` (`next_seq` and `prev_hash` then) back out of the
    /// chain; they were neither written nor folded.
    pub(crate) fn unseal(&mut self, (seq, hash): (u64, String)) {
        let sealed = usize::try_from(self.next_seq - seq).unwrap_or(usize::MAX);
        self.unsaved
            .truncate(self.unsaved.len().saturating_sub(sealed));
        self.next_seq = seq;
        self.prev_hash = hash;
    }

    /// Folds a staged event into the run's meter; what it adds is applied once it is durable.
    pub(crate) fn measure(&mut self, event: &Event) {
        if !self.runtime.meters.on() {
            return;
        }
        let meter = self.meter.get_or_insert_with(|| {
            RunMeter::new(self.tenant.as_str(), &self.engine.agent().spec.name)
        });
        self.unmeasured.extend(meter.observe(event));
    }

    /// Time left before the run's wall-clock limit.
    pub(crate) fn remaining(&self) -> Duration {
        let left = self.engine.deadline_ms().map_or(i64::MAX, |d| d - now_ms());
        Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }
}
