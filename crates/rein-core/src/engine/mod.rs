//! The run engine: a deterministic ReAct state machine with no I/O.
//!
//! The engine does two things. [`Engine::apply`] folds one recorded [`Event`] into the run's
//! state; [`Engine::next_effect`] looks at that state (and the time, passed in) and says what
//! must happen next as an [`Effect`] value. The driver executes effects, records their outcomes
//! as events and feeds them back. Because state is only ever changed by events, replaying a
//! run's log through `apply` rebuilds the exact state it had: that is checkpoint and resume.
//!
//! Limits are enforced here, not in the driver: before every model call the worst case
//! (estimated input + `max_output_tokens`, priced) is checked against the remaining tokens and
//! money, so the call that would cross a cap is never made; after every call the actual usage
//! is checked again.

mod apply;
mod approvals;
mod effects;
mod model;
mod planning;
mod review;
mod tools;
mod walk;
mod workers;
pub use effects::*;
use model::*;
pub use model::{JUDGE_INSTRUCTIONS, SUMMARIZE_INSTRUCTIONS, session_summary_message};
use tools::*;
pub use workers::WorkerChild;
#[cfg(test)]
mod tests;

use crate::Usd;
use crate::event::{Event, EventKind};
use crate::guard::{self};
use crate::message::{Message, ToolCall, ToolDefinition, Usage};
use crate::run::{RunStatus, TerminationReason};
use crate::spec::{Agent, OnTimeout};
use crate::tokens::TokenCounter;
use serde_json::{Map, Value};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
/// Why a log could not be replayed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The first event is not `run_started`, or `run_started` appears twice.
    #[error("event {seq}: a run log must begin with exactly one run_started")]
    BadStart {
        /// Offending event.
        seq: u64,
    },
    /// An event arrived after `run_finished`.
    #[error("event {seq}: the run had already finished")]
    AfterFinish {
        /// Offending event.
        seq: u64,
    },
}

/// How many times a run's time lying unattended after its process stopped is counted out of
/// its wall clock.
const MAX_TAKEOVERS: u32 = 5;

/// The state of one run, rebuilt from its events.
#[derive(Clone, Debug)]
pub struct Engine {
    agent: Arc<Agent>,
    step: u32,
    pending_tools: VecDeque<ToolCall>,
    model_in_flight: bool,
    /// A tool call recorded as requested whose result is not recorded (only after a crash):
    /// its call id and step.
    tool_in_flight: Option<(String, u32)>,
    /// Scopes the tenant granted, pinned at the start of the run.
    granted_scopes: Vec<String>,
    /// Who wrote the spec, pinned at the start of the run (`None` in older logs).
    trust: Option<crate::Trust>,
    repairs: u32,
    /// The user's input, for a handoff.
    input: String,
    /// The first model call condenses the session's earlier conversation.
    summarizing: bool,
    /// Model calls spent on a session summary (so the run's own first call is still `plan`).
    summary_calls: u32,
    /// Each tool call's outcome so far, for a handoff.
    steps_done: Vec<Value>,
    /// A final answer held for a person's approval (low confidence), with its model step.
    held_answer: Option<(u32, Value)>,
    /// Approvals by the step of the call they hold.
    approvals: BTreeMap<u32, Approval>,
    /// The last thing sent to the model is a request to repair its answer.
    repair_pending: bool,
    finish: Option<Finish>,
    finished: Option<(RunStatus, TerminationReason)>,
    output: Option<Value>,
    /// A gateway call: one model call on the caller's conversation, whose answer is the output.
    chat: Option<Chat>,
    /// For `flow: graph`: where the run is in its graph.
    graph: Option<Box<GraphRun>>,
    /// For `flow: plan_execute`: where the run is in its plan.
    plan: Option<Box<planning::PlanRun>>,
    /// The run's time: when it started and was last recorded, who took it up, and what is
    /// counted out of its wall clock.
    clock: Clock,
    /// What the model sees, and what it costs in tokens.
    context: Context,
    /// What the run has used, held against its limits.
    spend: Spend,
    /// Loop detection: repeated calls and errors, failures in a row, results that bring nothing
    /// new.
    loops: Loops,
    /// Content under review: untrusted content waiting for its verdict, where it first entered the
    /// run, the fenced input, and the final answer's sanitisation, classifier and judge.
    review: Review,
    /// The run's place in a tree of worker agents, and what its workers hold.
    tree: Tree,
}

/// The run's time: when it started and was last recorded, who took it up, and what is
/// counted out of its wall clock.
#[derive(Clone, Debug, Default)]
struct Clock {
    /// Who took the run up last (`run_claimed`), and how many times it was taken up again
    /// after its process stopped.
    pub(super) last_claimed_by: Option<String>,
    pub(super) takeovers: u32,
    /// When the last event applied was recorded.
    pub(super) last_ts_ms: Option<i64>,
    pub(super) started_ms: Option<i64>,
    /// Time spent awaiting approvals: it does not count against the run's wall clock.
    pub(super) paused_ms: i64,
}

/// What the model sees, and what it costs in tokens.
#[derive(Clone, Debug)]
struct Context {
    pub(super) counter: TokenCounter,
    pub(super) tool_definitions: Vec<ToolDefinition>,
    pub(super) fixed_tokens: u64,
    pub(super) messages: Vec<Message>,
    /// Tokens of the first `counted` messages. Messages are counted when an estimate first
    /// needs them, not as they arrive: a reply a run ends on, or the spec's conversation a
    /// gateway call replaces with its caller's, is never counted.
    pub(super) message_tokens: Cell<u64>,
    pub(super) counted: Cell<usize>,
}

/// What the run has used, held against its limits.
#[derive(Clone, Debug, Default)]
struct Spend {
    pub(super) iterations: u32,
    pub(super) usage: Usage,
    pub(super) cost: Usd,
    pub(super) tool_calls: u32,
    pub(super) calls_per_tool: HashMap<String, u32>,
}

/// Loop detection: repeated calls and errors, failures in a row, results that bring nothing
/// new.
#[derive(Clone, Debug, Default)]
struct Loops {
    pub(super) repeated_calls: HashMap<(String, String), u32>,
    pub(super) repeated_errors: HashMap<(String, String), u32>,
    pub(super) consecutive_failures: u32,
    pub(super) seen_results: HashSet<(String, String)>,
    pub(super) steps_without_progress: u32,
}

/// Content under review: untrusted content waiting for its verdict, where it first entered the
/// run, the fenced input, and the final answer's sanitisation, classifier and judge.
#[derive(Clone, Debug, Default)]
struct Review {
    /// The run's spotlighting boundary (from `run_started`), when the spec fences content.
    pub(super) fence: Option<String>,
    /// Untrusted content waiting for its guard verdict before the model may see it.
    pub(super) unchecked: Option<ContentCheck>,
    /// The user's input as the model sees it (fenced when the guard said so).
    pub(super) input_message: String,
    /// Where untrusted content first entered the run, for the data-flow rule.
    pub(super) tainted: Option<String>,
    /// The final answer's sanitisation is recorded (`output_sanitized`) or found nothing.
    pub(super) output_checked: bool,
    /// An answer the judge is scoring, with the conversation set aside meanwhile.
    pub(super) judging: Option<(Value, Vec<Message>)>,
    /// Content the classifier model is judging, with the conversation set aside meanwhile.
    pub(super) classifying: Option<(ContentCheck, Vec<Message>)>,
    /// The classifier's reply, parsed, waiting to be recorded: the content, whether it is an
    /// injection, and the model's confidence.
    pub(super) classified: Option<(ContentCheck, bool, f64)>,
    /// The judge's reply, parsed, waiting to be recorded: its step, the answer, score, reason.
    pub(super) judged: Option<(u32, Value, f64, String)>,
    /// Answers the judge sent back for revision.
    pub(super) judge_repairs: u32,
    /// Why the held answer waits for a person, when it is not its confidence.
    pub(super) held_reason: Option<String>,
}

/// The run's place in a tree of worker agents, and what its workers hold.
#[derive(Clone, Debug, Default)]
struct Tree {
    /// This run's depth in its tree of worker agents (0 at the top).
    pub(super) depth: u32,
    /// The deepest the tree may grow.
    pub(super) max_depth: u32,
    /// Budget held by workers running (or whose end is not recorded): cost and tokens.
    pub(super) worker_reserved: (Usd, u64),
    /// Each worker call's runs (its worker's, then its fallback's), by the step and call id of
    /// its tool call.
    pub(super) worker_children: HashMap<(u32, String), Vec<WorkerChild>>,
}

/// A graph run's place in its graph, rebuilt from `node_entered` and `node_finished`.
#[derive(Clone, Debug)]
struct GraphRun {
    /// The graph's state: the fields nodes have written.
    state: Map<String, Value>,
    /// The node the run is in, or goes to next.
    node: String,
    /// Whether `node_entered` is recorded for it.
    entered: bool,
    /// How many times each node was entered.
    visits: HashMap<String, u32>,
    /// The node's outcome, decided but not yet recorded: its writes, the next node, why.
    exit: Option<(Map<String, Value>, String, String)>,
}

/// The call id of a tool node's call, and of a human node's approval: `node:NAME:VISIT`.
fn node_call_id(node: &str, visit: u32) -> String {
    format!("node:{node}:{visit}")
}

/// A conservative token estimate for text when no tokenizer is known: see
/// [`crate::tokens::TokenCounter::Bytes`] for how it was measured.
pub fn estimate_tokens(text: &str) -> u64 {
    TokenCounter::Bytes.count(text)
}

/// Per-message overhead (role and separators) in the estimate.
const MESSAGE_OVERHEAD_TOKENS: u64 = 4;

/// Input tokens of one message: its text counted by `counter`, plus OpenAI's documented
/// per-message overhead (which the other providers' formats stay within).
fn message_tokens(counter: TokenCounter, message: &Message) -> u64 {
    let mut tokens = MESSAGE_OVERHEAD_TOKENS;
    if let Some(content) = &message.content {
        tokens += counter.count(content);
    }
    for call in &message.tool_calls {
        tokens +=
            counter.count(&call.name) + counter.count(&call.arguments) + MESSAGE_OVERHEAD_TOKENS;
    }
    tokens
}

/// Input tokens the tool definitions add to every call.
fn tool_tokens(counter: TokenCounter, tools: &[ToolDefinition]) -> u64 {
    tools
        .iter()
        .map(|d| {
            counter.count(&d.name)
                + counter.count(&d.description)
                + counter.count(&d.parameters.to_string())
                + MESSAGE_OVERHEAD_TOKENS
        })
        .sum()
}

impl Engine {
    /// A new, not yet started run of `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        let counter = TokenCounter::for_chain(agent.spec.model.all().map(|m| m.id.as_str()));
        let tool_definitions: Vec<ToolDefinition> =
            agent.spec.tools.iter().map(|t| t.definition()).collect();
        let fixed_tokens = tool_tokens(counter, &tool_definitions)
            + agent
                .spec
                .output_schema
                .as_ref()
                .map_or(0, |s| counter.count(&s.to_string()));
        Engine {
            agent,
            step: 0,
            pending_tools: VecDeque::new(),
            model_in_flight: false,
            tool_in_flight: None,
            granted_scopes: Vec::new(),
            trust: None,
            repairs: 0,
            input: String::new(),
            summarizing: false,
            summary_calls: 0,
            steps_done: Vec::new(),
            held_answer: None,
            approvals: BTreeMap::new(),
            repair_pending: false,
            finish: None,
            finished: None,
            output: None,
            chat: None,
            graph: None,
            plan: None,
            clock: Clock::default(),
            context: Context {
                counter,
                tool_definitions,
                fixed_tokens,
                messages: Vec::new(),
                message_tokens: Cell::new(0),
                counted: Cell::new(0),
            },
            spend: Spend::default(),
            loops: Loops::default(),
            review: Review::default(),
            tree: Tree::default(),
        }
    }

    /// Rebuilds a run's state from its log.
    pub fn replay<'a>(
        agent: Arc<Agent>,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<Engine, ReplayError> {
        let mut engine = Engine::new(agent);
        for event in events {
            engine.apply(event)?;
        }
        Ok(engine)
    }

    /// The agent this run executes.
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// The authorisation scopes the run's tenant was granted when it started.
    pub fn granted_scopes(&self) -> &[String] {
        &self.granted_scopes
    }

    /// The process that took the run up last (`run_claimed`), if any did.
    pub fn last_claimed_by(&self) -> Option<&str> {
        self.clock.last_claimed_by.as_deref()
    }

    /// Who wrote the run's spec, as `run_started` recorded it (`None` in logs from before it
    /// was), and so whose secrets and which addresses its tools and models may reach.
    pub fn trust(&self) -> Option<crate::Trust> {
        self.trust
    }

    /// The conversation so far, to send with the next model call.
    pub fn messages(&self) -> &[Message] {
        &self.context.messages
    }

    /// The tools as the model sees them.
    pub fn tool_definitions(&self) -> &[ToolDefinition] {
        &self.context.tool_definitions
    }

    /// Sampling temperature of the next call: a gateway caller's, else the spec's.
    pub fn temperature(&self) -> Option<f64> {
        match &self.chat {
            Some(chat) => chat.temperature.or(self.agent.spec.model.temperature),
            None => self.agent.spec.model.temperature,
        }
    }

    /// Model calls made.
    pub fn iterations(&self) -> u32 {
        self.spend.iterations
    }

    /// Tokens used so far.
    pub fn usage(&self) -> Usage {
        self.spend.usage
    }

    /// Money spent so far.
    pub fn cost(&self) -> Usd {
        self.spend.cost
    }

    /// Tool calls made or refused so far.
    pub fn tool_calls(&self) -> u32 {
        self.spend.tool_calls
    }

    /// When the run must end, in ms since the epoch (once started). Time spent waiting for a
    /// person's approval is not counted: a run's wall clock limits its own work.
    pub fn deadline_ms(&self) -> Option<i64> {
        let timeout = i64::try_from(self.agent.spec.limits.timeout.as_millis()).unwrap_or(i64::MAX);
        self.clock.started_ms.map(|s| {
            s.saturating_add(timeout)
                .saturating_add(self.clock.paused_ms)
        })
    }

    /// The tool call waiting for a person's decision, if any.
    pub fn pending_approval(&self) -> Option<&PendingApproval> {
        self.approvals.values().find_map(|a| match a {
            Approval::Pending(p) => Some(p),
            _ => None,
        })
    }

    /// How the run ended, once `run_finished` is recorded.
    pub fn outcome(&self) -> Option<(RunStatus, TerminationReason)> {
        self.finished
    }

    /// The final answer, once completed.
    pub fn output(&self) -> Option<&Value> {
        self.output.as_ref()
    }

    /// Whether `run_finished` has been recorded.
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    fn past_deadline(&self, ts_ms: i64) -> bool {
        self.deadline_ms().is_some_and(|d| ts_ms >= d)
    }

    fn push_message(&mut self, message: Message) {
        self.context.messages.push(message);
    }

    /// Tokens of the conversation as it stands, counting the messages not counted yet.
    fn conversation_tokens(&self) -> u64 {
        let counted = self.context.counted.get().min(self.context.messages.len());
        let more: u64 = self.context.messages[counted..]
            .iter()
            .map(|m| message_tokens(self.context.counter, m))
            .sum();
        self.context.counted.set(self.context.messages.len());
        self.context
            .message_tokens
            .set(self.context.message_tokens.get() + more);
        self.context.message_tokens.get()
    }

    /// Empties the conversation.
    fn forget_messages(&mut self) {
        self.context.messages.clear();
        self.context.message_tokens.set(0);
        self.context.counted.set(0);
    }

    fn finish_with(&mut self, reason: TerminationReason, detail: impl Into<String>) {
        if self.finish.is_none() {
            self.finish = Some(Finish {
                reason,
                detail: Some(detail.into()),
                output: None,
            });
        }
    }

    /// Decides what happens next, given the current time in ms since the epoch.
    ///
    /// Returns `None` once the run is finished (or before it is started).
    pub fn next_effect(&self, now_ms: i64) -> Option<Effect> {
        if self.finished.is_some() {
            return None;
        }
        self.clock.started_ms?;
        if let (Some((step, _, score, reason)), Some(judge)) =
            (&self.review.judged, &self.agent.spec.guards.judge)
        {
            return Some(Effect::Record(EventKind::JudgeVerdict {
                step: *step,
                score: *score,
                threshold: judge.threshold,
                passed: *score >= judge.threshold,
                reason: reason.clone(),
            }));
        }
        if let Some((findings, blocked)) = self.answer_findings() {
            return Some(Effect::Record(EventKind::OutputSanitized {
                findings,
                blocked,
            }));
        }
        if let Some(finish) = &self.finish {
            return Some(self.finish_effect(
                finish.reason,
                finish.detail.clone(),
                finish.output.clone(),
            ));
        }
        if let Some((check, injection, confidence)) = &self.review.classified {
            let policy = self.agent.spec.guards.policy(check.source);
            return Some(Effect::Record(check.verdict_event(
                policy.verdict(*injection),
                *confidence,
                vec![guard::CLASSIFIER_RULE.to_string()],
            )));
        }
        if self.review.classifying.is_some() {
            return Some(self.model_effect());
        }
        if let Some(check) = &self.review.unchecked {
            return Some(Effect::CheckContent(check.clone()));
        }
        if let Some(pending) = self.pending_approval() {
            // The run's clock is stopped while it waits; only the approval's own timeout runs.
            if now_ms < pending.expires_at_ms {
                return Some(Effect::AwaitApproval(pending.clone()));
            }
            let waited = self.agent.spec.approval.timeout;
            return Some(match pending.on_timeout {
                OnTimeout::Deny => Effect::Record(pending.decided(
                    false,
                    "policy",
                    Some(format!("no one decided within {waited:?}")),
                )),
                OnTimeout::Escalate => {
                    let why = format!(
                        "no one decided within {waited:?} whether `{}` may be called with {} ({})",
                        pending.tool, pending.arguments, pending.reason
                    );
                    let end = self.escalation("approval_timeout", &why, self.pending_action());
                    self.finish_effect(end.reason, end.detail, end.output)
                }
            });
        }
        if let Some((step, answer)) = &self.held_answer
            && !self.approvals.contains_key(step)
        {
            let confidence = answer
                .get("confidence")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            let reason = self.review.held_reason.clone().unwrap_or_else(|| {
                format!(
                    "the answer's confidence {confidence} is below {}",
                    self.agent.spec.approval.min_confidence.unwrap_or(0.0)
                )
            });
            return Some(self.approval_request(
                *step,
                ("", "final_answer"),
                answer.clone(),
                reason,
                Some(answer.clone()),
                now_ms,
            ));
        }
        if let Some(deadline) = self.deadline_ms()
            && now_ms >= deadline
        {
            let detail = format!(
                "the run passed its wall-clock limit of {:?}",
                self.agent.spec.limits.timeout
            );
            return Some(self.finish_effect(TerminationReason::Timeout, Some(detail), None));
        }
        if self.review.judging.is_none()
            && let Some(effect) = self.graph_effect(now_ms).or_else(|| self.plan_effect())
        {
            return Some(effect);
        }
        if let Some(call) = self.pending_tools.front() {
            return Some(self.tool_effect(call, now_ms));
        }
        Some(self.model_effect())
    }
}
