//! Rein's core: agent specs, the run engine, limits, prices and the event model.
//!
//! This crate is pure: it never touches the network, the disk, the clock or randomness. Time is
//! passed in, ids are given, and every side effect is an [`Effect`] value that a driver outside
//! this crate executes. That is what makes runs replayable from their event log and the engine
//! testable with plain values. It must never depend on tokio, reqwest, sqlx or any other I/O
//! crate.

pub mod admin_log;
pub mod anchor;
pub mod breaker;
pub mod budget;
pub mod bulkhead;
pub mod diagnostic;
pub mod duration;
pub mod egress;
pub mod engine;
pub mod event;
pub mod graph;
pub mod guard;
pub mod ids;
pub mod message;
pub mod meter;
pub mod money;
pub mod plan;
pub mod price;
pub mod rate;
pub mod run;
pub mod sanitize;
pub mod spans;
pub mod spec;
pub mod time;
pub mod tokens;
pub mod tool;
pub mod trust;
pub mod yaml;

pub use duration::parse_duration;
pub use engine::{
    ContentCheck, Effect, Engine, ModelCall, ReplayError, ToolInvocation, WorkerChild,
    estimate_tokens,
};
pub use event::{
    ChainBreak, Event, EventKind, GENESIS_HASH, LogSummary, SealedEvent, verify_chain,
};
pub use ids::{JobId, RunId, SessionId, TenantId, UserId};
pub use message::{ChatRequest, Message, ModelReply, Role, ToolCall, ToolDefinition, Usage};
pub use money::Usd;
pub use price::{Price, PriceTable};
pub use run::{RunStatus, TerminationReason};
pub use spec::{
    Agent, AgentSpec, BuiltinToolInfo, CheckContext, SpecErrors, ToolContract, ToolSource, ToolSpec,
};
pub use tool::{ErrorType, ToolResult, ToolStatus};
pub use trust::Trust;
