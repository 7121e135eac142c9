//! Built-in tools: Rust code behind the [`Builtin`] trait.

use rein_core::{BuiltinToolInfo, ErrorType, ToolResult};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A tool implemented in Rust. Implement this to embed your own tools.
///
/// A built-in returns a [`ToolResult`] for every input: it never panics on bad input (the
/// engine has already checked `args` against [`Builtin::info`]'s schema).
pub trait Builtin: Send + Sync {
    /// Description and input schema.
    fn info(&self) -> BuiltinToolInfo;
    /// Runs the tool.
    fn call(&self, args: Value) -> BoxFuture<'_, ToolResult>;
}

/// Built-in tools by name.
#[derive(Clone, Default)]
pub struct Builtins {
    tools: BTreeMap<String, Arc<dyn Builtin>>,
}

impl Builtins {
    /// No built-ins.
    pub fn empty() -> Self {
        Builtins::default()
    }

    /// The built-ins that ship with Rein: `echo`, `current_time` and `sleep`.
    pub fn standard() -> Self {
        let mut b = Builtins::empty();
        b.register("echo", Echo);
        b.register("current_time", CurrentTime);
        b.register("sleep", Sleep);
        b
    }

    /// Adds (or replaces) a built-in.
    pub fn register(&mut self, name: impl Into<String>, tool: impl Builtin + 'static) {
        self.tools.insert(name.into(), Arc::new(tool));
    }

    /// What `rein check` needs to know about each built-in.
    pub fn infos(&self) -> BTreeMap<String, BuiltinToolInfo> {
        self.tools
            .iter()
            .map(|(k, v)| (k.clone(), v.info()))
            .collect()
    }

    /// Calls the built-in `name`.
    pub async fn call(&self, name: &str, args: Value) -> ToolResult {
        match self.tools.get(name) {
            Some(tool) => tool.call(args).await,
            None => ToolResult::error(
                ErrorType::Permanent,
                format!("built-in tool `{name}` is not available"),
            ),
        }
    }
}

/// Returns its `text` argument.
struct Echo;

impl Builtin for Echo {
    fn info(&self) -> BuiltinToolInfo {
        BuiltinToolInfo {
            description: "Returns the given text unchanged.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {"text": {"type": "string", "maxLength": 100000}},
                "required": ["text"],
                "additionalProperties": false
            }),
        }
    }

    fn call(&self, args: Value) -> BoxFuture<'_, ToolResult> {
        Box::pin(async move {
            ToolResult::success(json!({"text": args.get("text").cloned().unwrap_or_default()}))
        })
    }
}

/// The current UTC time.
struct CurrentTime;

impl Builtin for CurrentTime {
    fn info(&self) -> BuiltinToolInfo {
        BuiltinToolInfo {
            description: "Returns the current date and time in UTC (RFC 3339).".into(),
            input_schema: json!({"type": "object", "properties": {}, "additionalProperties": false}),
        }
    }

    fn call(&self, _args: Value) -> BoxFuture<'_, ToolResult> {
        Box::pin(async move {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            ToolResult::success(json!({"utc": rein_core::time::format_utc(ms)}))
        })
    }
}

/// Waits, then answers: a stand-in for a slow dependency in examples and tests of timeouts.
struct Sleep;

impl Builtin for Sleep {
    fn info(&self) -> BuiltinToolInfo {
        BuiltinToolInfo {
            description:
                "Waits the given number of seconds, then returns. For exercising timeouts.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 3600}},
                "required": ["seconds"],
                "additionalProperties": false
            }),
        }
    }

    fn call(&self, args: Value) -> BoxFuture<'_, ToolResult> {
        Box::pin(async move {
            let seconds = args
                .get("seconds")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
                .clamp(0.0, 3600.0);
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            ToolResult::success(json!({"slept_seconds": seconds}))
        })
    }
}
