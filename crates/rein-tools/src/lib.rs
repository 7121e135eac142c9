//! Tool sources for Rein: built-in Rust tools and HTTP tools.
//!
//! Whatever happens inside a tool, its caller gets a typed [`ToolResult`]: a panic-free,
//! classified outcome with a message the model can act on. Transport details (status lines,
//! stack traces, raw bodies) are translated here and never reach the model.
//!
//! Contracts (timeouts, retries, call caps) are enforced by the driver and the engine, not
//! here, so every source is governed the same way. This crate depends on the core only.

mod builtin;
mod http;

pub use builtin::{BoxFuture, Builtin, Builtins};
pub use http::{CONNECT_TIMEOUT, HttpTools};

use rein_core::{ErrorType, ToolResult, ToolSource, ToolSpec};
use serde_json::Value;

/// Every tool source, ready to call.
#[derive(Clone)]
pub struct ToolBox {
    builtins: Builtins,
    http: HttpTools,
}

impl ToolBox {
    /// A toolbox with the given built-ins and a shared HTTP client.
    pub fn new(builtins: Builtins, http: HttpTools) -> Self {
        ToolBox { builtins, http }
    }

    /// The built-in tools.
    pub fn builtins(&self) -> &Builtins {
        &self.builtins
    }

    /// Calls `tool` once with validated `args`. `idempotency_key` (`run_id:step`) lets a
    /// side-effecting service recognise a repeated call; `traceparent` (W3C) is the call's span
    /// in the run's trace, sent to HTTP tools so their own spans join it.
    pub async fn call(
        &self,
        tool: &ToolSpec,
        args: &Value,
        idempotency_key: &str,
        traceparent: &str,
    ) -> ToolResult {
        match &tool.source {
            ToolSource::Builtin(name) => self.builtins.call(name, args.clone()).await,
            ToolSource::Http(source) => {
                self.http
                    .call(&tool.name, source, args, idempotency_key, traceparent)
                    .await
            }
            // A worker is a run of its own, which the runtime's driver starts.
            ToolSource::Agent(_) => ToolResult::error(
                ErrorType::Permanent,
                format!(
                    "`{}` is a worker agent: only the runtime can run it",
                    tool.name
                ),
            ),
        }
    }
}
