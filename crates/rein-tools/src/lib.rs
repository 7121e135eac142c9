//! Tool sources for Rein: built-in Rust tools and HTTP tools.
//!
//! Whatever happens inside a tool, its caller gets a typed [`ToolResult`]: a panic-free,
//! classified outcome with a message the model can act on. Transport details (status lines,
//! stack traces, raw bodies) are translated here and never reach the model.
//!
//! Contracts (timeouts, retries, call caps) are enforced by the driver and the engine, not
//! here, so every source is governed the same way. What a call may reach, whose secrets and
//! which addresses, follows who wrote the run's spec ([`Reach`]): a tenant's calls go through
//! the egress policy's client ([`Egress`]). This crate depends on the core only.

mod builtin;
mod egress;
mod http;

pub use builtin::{BoxFuture, Builtin, Builtins};
pub use egress::Egress;
pub use http::{CONNECT_TIMEOUT, HttpCall, HttpTools};

use rein_core::egress::EgressRefusal;
use rein_core::{ErrorType, ToolResult, ToolSource, ToolSpec};
use serde_json::Value;
use std::collections::HashMap;

/// What one call may reach, by who wrote its run's spec ([`rein_core::Trust`]).
#[derive(Clone, Copy, Debug)]
pub enum Reach<'a> {
    /// The operator's (or a local user's): `${NAME}` reads the environment; any address.
    Operator,
    /// A tenant's: `${NAME}` names one of the tenant's secrets, and only these; addresses
    /// pass the egress policy.
    Tenant(&'a Secrets),
}

impl Reach<'_> {
    /// The value `${name}` stands for, if there is one.
    pub fn secret(&self, name: &str) -> Option<String> {
        match self {
            Reach::Operator => std::env::var(name).ok(),
            Reach::Tenant(secrets) => secrets.get(name).map(str::to_string),
        }
    }
}

/// A tenant's secrets, by name, decrypted for the calls that name them. `Debug` shows the
/// names only.
#[derive(Clone, Default)]
pub struct Secrets(HashMap<String, String>);

impl Secrets {
    /// The secrets given.
    pub fn new(values: HashMap<String, String>) -> Self {
        Secrets(values)
    }

    /// One secret's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Replaces every one of these secrets' values in `result` (its data and its message)
    /// with `[REDACTED]`: a service that echoes a header back must not put it in the log or
    /// before the model.
    pub fn scrub(&self, result: &mut ToolResult) {
        // Longest first, so a secret containing another is replaced whole.
        let mut values: Vec<&str> = self.0.values().map(String::as_str).collect();
        values.retain(|v| !v.is_empty());
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        if values.is_empty() {
            return;
        }
        let scrub = |text: &mut String| {
            for value in &values {
                if text.contains(value) {
                    *text = text.replace(value, "[REDACTED]");
                }
            }
        };
        rein_core::sanitize::walk_strings(&mut result.data, &mut |s| scrub(s));
        if let Some(message) = result.message.as_mut() {
            scrub(message);
        }
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort();
        f.debug_tuple("Secrets").field(&names).finish()
    }
}

/// Every tool source, ready to call.
#[derive(Clone)]
pub struct ToolBox {
    builtins: Builtins,
    http: HttpTools,
}

impl ToolBox {
    /// A toolbox with the given built-ins and HTTP tools.
    pub fn new(builtins: Builtins, http: HttpTools) -> Self {
        ToolBox { builtins, http }
    }

    /// The built-in tools.
    pub fn builtins(&self) -> &Builtins {
        &self.builtins
    }

    /// The client and policy tenants' calls go through (their models' endpoints too).
    pub fn egress(&self) -> &Egress {
        self.http.egress()
    }

    /// Calls `tool` once with validated `args`, reaching what `reach` allows.
    /// `idempotency_key` (`run_id:step`) lets a side-effecting service recognise a repeated
    /// call; `traceparent` (W3C) is the call's span in the run's trace, sent to HTTP tools so
    /// their own spans join it. A call the egress policy refused comes with the refusal.
    pub async fn call(
        &self,
        tool: &ToolSpec,
        args: &Value,
        idempotency_key: &str,
        traceparent: &str,
        reach: Reach<'_>,
    ) -> (ToolResult, Option<EgressRefusal>) {
        match &tool.source {
            ToolSource::Builtin(name) => (self.builtins.call(name, args.clone()).await, None),
            ToolSource::Http(source) => {
                self.http
                    .call(
                        &tool.name,
                        source,
                        args,
                        idempotency_key,
                        traceparent,
                        reach,
                    )
                    .await
            }
            // A worker is a run of its own, which the runtime's driver starts.
            ToolSource::Agent(_) => (
                ToolResult::error(
                    ErrorType::Permanent,
                    format!(
                        "`{}` is a worker agent: only the runtime can run it",
                        tool.name
                    ),
                ),
                None,
            ),
        }
    }
}
