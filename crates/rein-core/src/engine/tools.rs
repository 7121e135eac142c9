//! Tool calls: a requested call checked against its contract (unknown tool, arguments, scopes,
//! call caps, magnitude rules, repetition) before it becomes an effect, and interrupted calls.

use super::*;
use crate::event::EventKind;
use crate::guard::DataFlow;
use crate::message::ToolCall;
use crate::run::TerminationReason;
use crate::spec::{RuleAction, SideEffects, ToolSource};
use crate::tool::{ErrorType, ToolResult};
use serde_json::Value;

/// The identity of a call for loop detection: tool name and canonical arguments (object keys
/// sorted, as `serde_json` orders them), or the raw text when it is not JSON.
pub(super) fn call_signature(call: &ToolCall) -> (String, String) {
    let args = serde_json::from_str::<Value>(&call.arguments)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| call.arguments.clone());
    (call.name.clone(), args)
}

impl Engine {
    pub(super) fn tool_effect(&self, call: &ToolCall, now_ms: i64) -> Effect {
        if let Some((call_id, step)) = &self.tool_in_flight
            && call_id == &call.id
        {
            return self.interrupted_tool_effect(call, *step, now_ms);
        }
        let limits = &self.agent.spec.limits;
        let step = self.step + 1;
        let signature = call_signature(call);
        let repeats = self
            .loops
            .repeated_calls
            .get(&signature)
            .copied()
            .unwrap_or(0);
        if repeats + 1 >= limits.max_repeated_tool_calls {
            let detail = format!(
                "the model asked for `{}` with the same arguments {} times; the call was not made again",
                call.name,
                repeats + 1
            );
            return self.finish_effect(TerminationReason::LoopDetected, Some(detail), None);
        }
        let refuse = |message: String| {
            Effect::Record(EventKind::ToolResult {
                step,
                call_id: call.id.clone(),
                tool: call.name.clone(),
                result: ToolResult::error(ErrorType::Permanent, message),
                latency_ms: 0,
                attempts: 0,
            })
        };
        if self.spend.tool_calls >= limits.max_tool_calls {
            return refuse(format!(
                "this run has used all {} tool calls it is allowed; answer with what you have",
                limits.max_tool_calls
            ));
        }
        let Some((tool, validator)) = self
            .agent
            .tool(&call.name)
            .filter(|_| self.may_call(&call.name))
        else {
            let names: Vec<&str> = self
                .context
                .tool_definitions
                .iter()
                .map(|d| d.name.as_str())
                .collect();
            let available = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            return refuse(format!(
                "there is no tool named `{}`; available tools: {available}",
                call.name
            ));
        };
        if let Some(scope) = &tool.contract.auth_scope {
            let held = self.agent.spec.scopes.contains(scope);
            let granted = self.granted_scopes.contains(scope);
            if !(held && granted) {
                let who = match (held, granted) {
                    (false, false) => "this agent and its tenant are",
                    (false, true) => "this agent is",
                    _ => "this agent's tenant is",
                };
                return refuse(format!(
                    "not authorised: `{}` needs the scope `{scope}`, which {who} not granted; do not call it again",
                    call.name
                ));
            }
        }
        let arguments: Value = match serde_json::from_str(if call.arguments.trim().is_empty() {
            "{}"
        } else {
            &call.arguments
        }) {
            Ok(v) => v,
            Err(e) => {
                return refuse(format!(
                    "the arguments are not valid JSON ({e}); send a JSON object"
                ));
            }
        };
        let problems: Vec<String> = validator
            .iter_errors(&arguments)
            .take(5)
            .map(|e| describe_schema_error(&e))
            .collect();
        if !problems.is_empty() {
            return refuse(format!(
                "the arguments do not match the input schema of `{}`: {}",
                call.name,
                problems.join("; ")
            ));
        }
        if let Some(cap) = tool.contract.max_calls_per_run
            && self
                .spend
                .calls_per_tool
                .get(&call.name)
                .copied()
                .unwrap_or(0)
                >= cap
        {
            return refuse(format!(
                "`{}` may be called at most {cap} times per run and that many calls were made",
                call.name
            ));
        }
        if let Some(violation) = tool
            .contract
            .limits
            .iter()
            .filter(|rule| rule.action == RuleAction::Refuse)
            .find_map(|rule| rule.violation(&arguments))
        {
            return refuse(format!(
                "the call to `{}` was refused before it was made: {violation}; split the work into smaller calls",
                call.name
            ));
        }
        let guards = &self.agent.spec.guards;
        let data_flow = self.review.tainted.as_ref().filter(|_| {
            tool.contract.side_effects == SideEffects::External
                && guards.data_flow != DataFlow::Off
                && !guards.allows_host_of(&tool.source)
        });
        let data_flow = data_flow.map(|taint| {
            format!(
                "data flow: `{}` acts outside (side_effects: external) after untrusted content entered the run ({taint})",
                call.name
            )
        });
        if let Some(why) = &data_flow
            && guards.data_flow == DataFlow::Refuse
        {
            return refuse(format!(
                "the call to `{}` was refused: {why}; do not try to send data out",
                call.name
            ));
        }
        let needs_approval = if tool.contract.confirm {
            Some(format!(
                "every call to `{}` needs a person's approval (confirm: true)",
                call.name
            ))
        } else {
            tool.contract
                .limits
                .iter()
                .filter(|rule| rule.action == RuleAction::Approve)
                .find_map(|rule| rule.violation(&arguments))
                .map(|v| format!("{v}, which needs a person's approval"))
                .or(data_flow.map(|why| format!("{why}, which needs a person's approval")))
        };
        if let Some(reason) = needs_approval {
            match self.approvals.get(&step) {
                Some(Approval::Approved) => {}
                Some(Approval::Denied { by, reason }) => {
                    let why = reason
                        .as_deref()
                        .map_or(String::new(), |r| format!(": {r}"));
                    return refuse(format!(
                        "a person ({by}) denied this call to `{}`{why}; do not make it again as it was, and tell the user if it matters",
                        call.name
                    ));
                }
                Some(Approval::Pending(_) | Approval::Used) | None => {
                    return self.approval_request(
                        step,
                        (&call.id, &call.name),
                        arguments,
                        reason,
                        None,
                        now_ms,
                    );
                }
            }
        }
        let budget = match self.worker_budget(tool) {
            Ok(budget) => budget,
            Err((reason, detail)) => return self.finish_effect(reason, Some(detail), None),
        };
        Effect::CallTool(ToolInvocation {
            step,
            call_id: call.id.clone(),
            tool: call.name.clone(),
            arguments,
            budget,
        })
    }
}

impl Engine {
    /// A tool call was recorded as requested but its result never was: the process stopped
    /// mid-call. Whether the call took effect is unknown. It is made again, as the same step
    /// (so with the same idempotency key), when that is safe: the contract says repeating it
    /// has no further effect, or the tool is an HTTP tool, which sends the key so the service
    /// applies the effect once. Otherwise a person decides: approved, it is made again;
    /// denied, it is reported to the model as failed with an unknown outcome.
    ///
    /// A worker agent's call is always continued: the worker's run it started (if it had) is
    /// taken up where its own log ends, with the budget it was given, and that log keeps its
    /// steps from being repeated.
    pub(super) fn interrupted_tool_effect(
        &self,
        call: &ToolCall,
        step: u32,
        now_ms: i64,
    ) -> Effect {
        let tool = self.agent.tool(&call.name).map(|(tool, _)| tool);
        let arguments = serde_json::from_str::<Value>(&call.arguments).ok();
        let again = |arguments: Value| {
            let started = self.worker_child(step, &call.id, false);
            let budget = match tool.map(|t| match started {
                Some(child) => Ok(Some(child.budget)),
                None => self.worker_budget(t),
            }) {
                Some(Err((reason, detail))) => {
                    return self.finish_effect(reason, Some(detail), None);
                }
                Some(Ok(budget)) => budget,
                None => None,
            };
            Effect::CallTool(ToolInvocation {
                step,
                call_id: call.id.clone(),
                tool: call.name.clone(),
                arguments,
                budget,
            })
        };
        match (tool, arguments, self.approvals.get(&step)) {
            (Some(tool), Some(arguments), _)
                if tool.contract.may_retry()
                    || tool.sends_idempotency_key()
                    || matches!(tool.source, ToolSource::Agent(_)) =>
            {
                again(arguments)
            }
            (Some(_), Some(arguments), Some(Approval::Approved)) => again(arguments),
            (Some(_), Some(arguments), None | Some(Approval::Used)) => self.approval_request(
                step,
                (&call.id, &call.name),
                arguments,
                format!(
                    "the call to `{}` was interrupted before its result was recorded, so whether it took effect is unknown, and the tool has side effects and no idempotency key; approve to make it again, deny to report it as failed",
                    call.name
                ),
                None,
                now_ms,
            ),
            _ => Effect::Record(EventKind::ToolResult {
                step,
                call_id: call.id.clone(),
                tool: call.name.clone(),
                result: ToolResult::error(
                    ErrorType::Permanent,
                    format!(
                        "the call to `{}` was interrupted before its result was recorded, so whether it took effect is unknown; it was not repeated because the tool has side effects",
                        call.name
                    ),
                ),
                latency_ms: 0,
                attempts: 0,
            }),
        }
    }
}
