//! The OpenAI-compatible gateway: `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! An application keeps its own loop and points its OpenAI client at Rein with a tenant key.
//! Each call is a one-step run of a `gateway` agent made per model from `[gateway]` in
//! rein.toml: it passes the same governor as an agent's model call (rate limits, the
//! worst-case reservation in every capped budget scope, retries, fallbacks, breakers), and its
//! log (`run_started`, `chat_request` with the caller's conversation, the call, `run_finished`
//! with the answer) is its audit trail, its trace and its cost line. Tool calls in the answer
//! go back to the caller, which runs them.

use crate::App;
use crate::auth::Caller;
use crate::cache;
use crate::problem::Problem;
use crate::request::{MAX_ID_LEN, check_len, json_body};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use rein_app::config::Gateway;
use rein_app::views::ProblemView;
use rein_core::spec::{Agent, ToolChoice};
use rein_core::{
    ChatRequest, EventKind, Message, Role, SessionId, TenantId, TerminationReason, ToolCall,
    ToolDefinition, UserId,
};
use rein_runtime::{RunOutcome, RunRequest, Runtime, RuntimeError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use utoipa::ToSchema;

/// The agent every gateway call is a run of (a name tenants cannot register).
pub(super) const AGENT: &str = "gateway";

/// A checked agent with its spec source.
type Checked = (Arc<Agent>, Arc<str>);

/// The gateway's agent per model (`provider/model`), checked once, with its spec source.
#[derive(Default)]
pub(super) struct Agents(Mutex<HashMap<String, Checked>>);

impl Agents {
    fn get(&self, app: &App, model: &str) -> Result<Checked, Problem> {
        if let Some(found) = self.0.lock().ok().and_then(|m| m.get(model).cloned()) {
            return Ok(found);
        }
        let source: Arc<str> = spec_source(model, &app.config.gateway).into();
        let agent = rein_app::wiring::parse_agent(AGENT, &source, &app.config, &app.builtins)
            .map_err(|e| {
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the gateway cannot call `{model}`: {e:#}"),
                )
                .openai("api_error", "gateway_misconfigured")
            })?;
        if let Ok(mut agents) = self.0.lock() {
            agents.insert(model.to_string(), (agent.clone(), source.clone()));
        }
        Ok((agent, source))
    }
}

/// The one-call agent the gateway runs for `model`.
fn spec_source(model: &str, gateway: &Gateway) -> String {
    let fallbacks = gateway.fallbacks.get(model).cloned().unwrap_or_default();
    format!(
        "name: {AGENT}
version: 1
instructions: A call through the OpenAI-compatible gateway; the caller's conversation is sent as it is.
model:
  primary: {primary}
  fallbacks: {fallbacks}
  max_output_tokens: {max_output}
guards: {{input: off, tool_results: off, documents: off, spotlight: false, data_flow: off}}
limits:
  max_iterations: 1
  max_total_tokens: 100000000
  max_cost_usd: {cost}
  timeout: {timeout}ms
",
        primary = json!(model),
        fallbacks = json!(fallbacks),
        max_output = gateway.max_output_tokens,
        cost = gateway.max_cost_usd,
        timeout = gateway.timeout.as_millis(),
    )
}

/// The part of OpenAI's Chat Completions request the gateway forwards. Any other field is
/// refused by name rather than silently dropped.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    model: String,
    messages: Vec<WireMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    tools: Option<Vec<WireTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A message as OpenAI clients send it (fields the gateway does not use, such as `refusal`
/// echoed back from an earlier answer, are ignored).
#[derive(Deserialize, ToSchema)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
enum WireContent {
    Text(String),
    Parts(Vec<WirePart>),
}

#[derive(Deserialize, ToSchema)]
struct WirePart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, ToSchema)]
struct WireToolCall {
    id: String,
    function: WireFunctionCall,
}

#[derive(Deserialize, ToSchema)]
struct WireFunctionCall {
    name: String,
    arguments: String,
}

#[derive(Deserialize, ToSchema)]
struct WireTool {
    #[serde(rename = "type")]
    kind: String,
    function: WireFunction,
}

#[derive(Deserialize, ToSchema)]
struct WireFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

fn invalid(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
        .openai("invalid_request_error", "invalid_request")
}

/// The caller's conversation in Rein's terms, or what is wrong with it.
fn conversation(body: &ChatBody) -> Result<ChatRequest, Problem> {
    if body.messages.is_empty() {
        return Err(invalid("`messages` is empty; send at least one message"));
    }
    if body.n.is_some_and(|n| n != 1) {
        return Err(invalid(
            "`n` must be 1: the gateway makes one call per request",
        ));
    }
    if let Some(t) = body.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(invalid("`temperature` must be from 0 to 2"));
    }
    let max_output_tokens = body.max_completion_tokens.or(body.max_tokens);
    if max_output_tokens == Some(0) {
        return Err(invalid("`max_tokens` must be at least 1"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(invalid(format!(
                    "`messages[{i}].role` is `{other}`; use system, developer, user, assistant or tool"
                )));
            }
        };
        let content = match &m.content {
            None => None,
            Some(WireContent::Text(text)) => Some(text.clone()),
            Some(WireContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(invalid(format!(
                                "`messages[{i}].content[{j}]` is a `{kind}` part; the gateway forwards text parts only"
                            )));
                        }
                    }
                }
                Some(text)
            }
        };
        if role == Role::Tool && m.tool_call_id.is_none() {
            return Err(invalid(format!(
                "`messages[{i}]` is a tool message without `tool_call_id`"
            )));
        }
        messages.push(Message {
            role,
            content,
            tool_calls: m
                .tool_calls
                .iter()
                .flatten()
                .map(|c| ToolCall {
                    id: c.id.clone(),
                    name: c.function.name.clone(),
                    arguments: c.function.arguments.clone(),
                })
                .collect(),
            tool_call_id: m.tool_call_id.clone(),
        });
    }
    let mut tools = Vec::new();
    for (i, t) in body.tools.iter().flatten().enumerate() {
        if t.kind != "function" {
            return Err(invalid(format!(
                "`tools[{i}].type` is `{}`; the gateway forwards `function` tools only",
                t.kind
            )));
        }
        tools.push(ToolDefinition {
            name: t.function.name.clone(),
            description: t.function.description.clone().unwrap_or_default(),
            parameters: t
                .function
                .parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        });
    }
    let tool_choice = match &body.tool_choice {
        None => None,
        Some(Value::String(s)) if s == "auto" => Some(ToolChoice::Auto),
        Some(Value::String(s)) if s == "none" => Some(ToolChoice::None),
        Some(Value::String(s)) if s == "required" => Some(ToolChoice::Required),
        Some(choice) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if choice.get("type").and_then(Value::as_str) == Some("function") => {
                Some(ToolChoice::Tool(name.to_string()))
            }
            _ => {
                return Err(invalid(
                    "`tool_choice` must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ));
            }
        },
    };
    Ok(ChatRequest {
        messages,
        tools,
        max_output_tokens,
        temperature: body.temperature,
        tool_choice,
    })
}

/// The `provider/model` a request names: as listed by `GET /v1/models`, or an OpenAI model
/// without its `openai/` prefix.
fn resolve(app: &App, model: &str) -> Result<String, Problem> {
    let prices = &app.config.prices;
    if prices.get(model).is_some() {
        return Ok(model.to_string());
    }
    let prefixed = format!("openai/{model}");
    if !model.contains('/') && prices.get(&prefixed).is_some() {
        return Ok(prefixed);
    }
    Err(Problem::new(
        StatusCode::NOT_FOUND,
        format!(
            "the model `{model}` is not available: the gateway calls priced models only (GET /v1/models lists them; an operator adds one under [prices] in rein.toml)"
        ),
    )
    .openai("invalid_request_error", "model_not_found"))
}

/// OpenAI's Chat Completions, governed and recorded: each call is a one-step run of the
/// `gateway` agent. The answer is OpenAI's `chat.completion` (with `stream`, Server-Sent Events of
/// `chat.completion.chunk` and `[DONE]`), with the run in `x-rein-run-id` and its cost in
/// `x-rein-cost-usd`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "gateway", request_body = ChatBody, responses(
    (status = 200, description = "OpenAI's `chat.completion`, or with `stream` its `chat.completion.chunk` events", body = Object,
        headers(("x-rein-run-id" = String, description = "The call's run"), ("x-rein-cost-usd" = String, description = "What it cost"), ("x-rein-cache" = String, description = "`hit` or `miss`, when the response cache is on"))),
    (status = 400, description = "The call's worst case is over `[gateway] max_cost_usd`", body = ProblemView, content_type = "application/problem+json"),
    (status = 404, description = "No such model", body = ProblemView, content_type = "application/problem+json"),
    (status = 422, description = "A field the gateway does not forward, or content it cannot send", body = ProblemView, content_type = "application/problem+json"),
    (status = 429, description = "A rate limit (`Retry-After`) or an exhausted budget (`x-should-retry: false`)", body = ProblemView, content_type = "application/problem+json"),
    (status = 502, description = "The provider failed", body = ProblemView, content_type = "application/problem+json"),
    (status = 503, description = "Every model's circuit is open", body = ProblemView, content_type = "application/problem+json"),
    (status = 504, description = "The call ran past `[gateway] timeout`", body = ProblemView, content_type = "application/problem+json"),
))]
pub(super) async fn chat_completions(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let request_error = |p: Problem| p.openai("invalid_request_error", "invalid_request");
    let body: ChatBody = json_body(&headers, body).map_err(request_error)?;
    check_len("model", &body.model, MAX_ID_LEN).map_err(request_error)?;
    check_len("user", body.user.as_deref().unwrap_or(""), MAX_ID_LEN).map_err(request_error)?;
    let chat = conversation(&body)?;
    let model = resolve(&app, &body.model)?;
    let (agent, source) = app.gateway_agents.get(&app, &model)?;
    let input = chat
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .and_then(|m| m.content.as_deref())
        .map(|text| truncate(text, 4096).to_string())
        .unwrap_or_default();
    let run_id = Runtime::new_run_id();
    let request = RunRequest {
        agent,
        spec_source: source.to_string(),
        input,
        granted_scopes: Vec::new(),
        trust: rein_core::Trust::Operator,
        trace_parent: crate::request::trace_parent(&headers),
        chat: Some(chat),
        tenant: tenant.clone(),
        user: UserId::new(body.user.as_deref().unwrap_or(crate::runs::ANONYMOUS)),
        session: SessionId::new(run_id.as_str()),
        job: None,
    };
    let call = Call {
        id: format!("chatcmpl-{run_id}"),
        created: rein_runtime::now_ms() / 1000,
        model,
        include_usage: body
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    };
    let directives = cache::Directives::of(&headers);
    if body.stream != Some(true) {
        let hit = AtomicBool::new(false);
        let model = app
            .gateway_cache
            .front(app.model.as_ref(), &tenant, directives, &hit);
        let outcome = app
            .runtime
            .run_as(run_id, request, &model, None)
            .await
            .map_err(internal)?;
        let answer = answer(&app, &tenant, &outcome).await?;
        let mut response = axum::Json(call.completion(&outcome, &answer)).into_response();
        rein_headers(&mut response, &outcome);
        cache_header(&app, response.headers_mut(), &hit);
        return Ok(response);
    }
    stream(app, tenant, call, run_id, request, directives).await
}

/// `x-rein-cache: hit` or `miss`, when the cache is on.
fn cache_header(app: &App, headers: &mut HeaderMap, hit: &AtomicBool) {
    if app.gateway_cache.is_on() {
        let value = if hit.load(Ordering::Relaxed) {
            "hit"
        } else {
            "miss"
        };
        headers.insert("x-rein-cache", HeaderValue::from_static(value));
    }
}

/// The streamed answer: the text as the provider sends it, then the tool calls and the finish
/// reason, then `[DONE]`. A call refused or failed before its first token is answered with
/// its status instead (429 for an exhausted budget), like the unstreamed call.
async fn stream(
    app: Arc<App>,
    tenant: TenantId,
    call: Call,
    run_id: rein_core::RunId,
    request: RunRequest,
    directives: cache::Directives,
) -> Result<Response, Problem> {
    enum Piece {
        Text(String),
        Done(Box<Result<RunOutcome, RuntimeError>>),
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let runner = app.clone();
    let text_tx = tx.clone();
    let hit = Arc::new(AtomicBool::new(false));
    let run_hit = hit.clone();
    let run_tenant = tenant.clone();
    let streamed_run = run_id.clone();
    // The run goes on to its end even if the caller hangs up: what it spent is recorded.
    tokio::spawn(async move {
        let sink = move |text: &str| {
            let _ = text_tx.send(Piece::Text(text.to_string()));
        };
        let model =
            runner
                .gateway_cache
                .front(runner.model.as_ref(), &run_tenant, directives, &run_hit);
        let result = runner
            .runtime
            .run_as(run_id, request, &model, Some(&sink))
            .await;
        let _ = tx.send(Piece::Done(Box::new(result)));
    });
    let first = match rx.recv().await {
        Some(Piece::Text(text)) => Some(text),
        Some(Piece::Done(result)) => {
            let outcome = (*result).map_err(internal)?;
            // Refusals and failures before any text keep their status.
            let answer = answer(&app, &tenant, &outcome).await?;
            let stream = futures_util::stream::iter(call.final_chunks(&outcome, &answer, true));
            let mut response = Sse::new(stream).into_response();
            rein_headers(&mut response, &outcome);
            cache_header(&app, response.headers_mut(), &hit);
            return Ok(response);
        }
        None => None,
    };
    // The first piece of text is here, so whether it came from the cache is known.
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(streamed_run.as_str()) {
        headers.insert("x-rein-run-id", v);
    }
    cache_header(&app, &mut headers, &hit);
    let state = (rx, first, Some((app, tenant, call)), true);
    let stream = futures_util::stream::unfold(state, |(mut rx, pending, rest, first)| async move {
        let (app, tenant, call) = rest?;
        let piece = match pending {
            Some(text) => Some(Piece::Text(text)),
            None => rx.recv().await,
        };
        match piece {
            Some(Piece::Text(text)) => {
                let mut delta = json!({"content": text});
                if first {
                    delta["role"] = json!("assistant");
                }
                let event = call.chunk(delta, Value::Null);
                Some((vec![event], (rx, None, Some((app, tenant, call)), false)))
            }
            Some(Piece::Done(result)) => {
                let events = match *result {
                    Ok(outcome) => match answer(&app, &tenant, &outcome).await {
                        Ok(answer) => call.final_chunks(&outcome, &answer, false),
                        Err(problem) => vec![error_chunk(&problem.detail)],
                    },
                    Err(e) => vec![error_chunk(&internal(e).detail)],
                };
                Some((events, (rx, None, None, false)))
            }
            None => None,
        }
    });
    let stream = futures_util::StreamExt::flat_map(stream, futures_util::stream::iter);
    Ok((headers, Sse::new(stream)).into_response())
}

/// Where the call's run is, and what it cost.
fn rein_headers(response: &mut Response, outcome: &RunOutcome) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(outcome.run_id.as_str()) {
        headers.insert("x-rein-run-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&outcome.cost.to_string()) {
        headers.insert("x-rein-cost-usd", v);
    }
}

fn internal(e: RuntimeError) -> Problem {
    Problem::from(e).openai("api_error", "gateway_error")
}

fn error_chunk(message: &str) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(
        json!({"error": {"message": message, "type": "api_error", "code": "gateway_error"}})
            .to_string(),
    ))
}

/// One call's identity in its answer.
struct Call {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
}

impl Call {
    fn completion(&self, outcome: &RunOutcome, answer: &Value) -> Value {
        let mut message = json!({
            "role": "assistant",
            "content": answer.get("content").cloned().unwrap_or(Value::Null),
        });
        let calls = wire_tool_calls(answer, false);
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": answered_by(outcome, &self.model),
            "choices": [{
                "index": 0,
                "message": message,
                "finish_reason": answer.get("finish_reason").cloned().unwrap_or(json!("stop")),
                "logprobs": null,
            }],
            "usage": usage_json(outcome),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Value) -> Result<SseEvent, Infallible> {
        self.chunk_of(
            json!([{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null}]),
            None,
        )
    }

    /// A `chat.completion.chunk` event with these choices (and usage, for the usage chunk).
    fn chunk_of(&self, choices: Value, usage: Option<Value>) -> Result<SseEvent, Infallible> {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        Ok(SseEvent::default().data(chunk.to_string()))
    }

    /// The end of a streamed answer: its tool calls, finish reason, usage (when asked for) and
    /// `[DONE]`; the whole text too when none of it was streamed (`whole`).
    fn final_chunks(
        &self,
        outcome: &RunOutcome,
        answer: &Value,
        whole: bool,
    ) -> Vec<Result<SseEvent, Infallible>> {
        let mut events = Vec::new();
        let mut delta = json!({});
        if whole {
            delta["role"] = json!("assistant");
            delta["content"] = answer.get("content").cloned().unwrap_or(Value::Null);
        }
        let calls = wire_tool_calls(answer, true);
        if !calls.is_empty() {
            delta["tool_calls"] = Value::Array(calls);
        }
        events.push(
            self.chunk(
                delta,
                answer
                    .get("finish_reason")
                    .cloned()
                    .unwrap_or(json!("stop")),
            ),
        );
        if self.include_usage {
            events.push(self.chunk_of(json!([]), Some(usage_json(outcome))));
        }
        events.push(Ok(SseEvent::default().data("[DONE]")));
        events
    }
}

/// The model that answered (a fallback, perhaps), else the one asked for.
fn answered_by(outcome: &RunOutcome, asked: &str) -> String {
    outcome
        .models_used
        .keys()
        .next()
        .cloned()
        .unwrap_or_else(|| asked.to_string())
}

fn usage_json(outcome: &RunOutcome) -> Value {
    let u = &outcome.usage;
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total(),
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
    })
}

/// The answer's tool calls as OpenAI writes them (with their position when streamed).
fn wire_tool_calls(answer: &Value, indexed: bool) -> Vec<Value> {
    let calls: Vec<ToolCall> = answer
        .get("tool_calls")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default();
    calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut call = json!({
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if indexed {
                call["index"] = json!(i);
            }
            call
        })
        .collect()
}

/// The run's answer, or the problem that stopped it: an exhausted budget or a rate limit is
/// 429, a call over the gateway's per-call caps 400, a provider that failed 502, a call cut
/// off at its time limit 504.
async fn answer(app: &App, tenant: &TenantId, outcome: &RunOutcome) -> Result<Value, Problem> {
    let detail = outcome
        .detail
        .clone()
        .unwrap_or_else(|| "the call did not complete".to_string());
    let problem = match outcome.reason {
        Some(TerminationReason::Completed) => {
            return outcome
                .output
                .clone()
                .ok_or_else(|| internal_detail("the call completed without an answer"));
        }
        Some(TerminationReason::BudgetExhausted) => {
            Problem::new(StatusCode::TOO_MANY_REQUESTS, detail)
                .openai("insufficient_quota", "budget_exhausted")
                .no_retry()
        }
        Some(TerminationReason::MaxCost | TerminationReason::MaxTokens) => Problem::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{detail} (the gateway's per-call limit: ask for fewer `max_tokens` or send less)"
            ),
        )
        .openai("invalid_request_error", "call_limit_exceeded"),
        Some(TerminationReason::Timeout) => {
            Problem::new(StatusCode::GATEWAY_TIMEOUT, detail).openai("api_error", "timeout")
        }
        Some(TerminationReason::CircuitOpen) => {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, detail)
                .openai("api_error", "circuit_open")
                .retry_after(30)
        }
        _ => match rate_limited(app, tenant, outcome).await {
            Some(wait_ms) => Problem::new(StatusCode::TOO_MANY_REQUESTS, detail)
                .openai("rate_limit_exceeded", "rate_limit_exceeded")
                .retry_after(u64::try_from(wait_ms).unwrap_or(0).div_ceil(1000).max(1)),
            None => {
                Problem::new(StatusCode::BAD_GATEWAY, detail).openai("api_error", "provider_error")
            }
        },
    };
    Err(problem)
}

fn internal_detail(detail: &str) -> Problem {
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, detail).openai("api_error", "gateway_error")
}

/// How long a rate-limited call would have had to wait, if a limit (Rein's or the
/// provider's) is what stopped it.
async fn rate_limited(app: &App, tenant: &TenantId, outcome: &RunOutcome) -> Option<i64> {
    let events = app.store.events(tenant, &outcome.run_id).await.ok()?;
    events
        .iter()
        .rev()
        .find_map(|sealed| match sealed.decode().ok()?.kind {
            EventKind::RateLimited { wait_ms, .. } => Some(wait_ms),
            EventKind::ModelFailed {
                error_type: rein_core::ErrorType::RateLimit,
                ..
            } => Some(1000),
            _ => None,
        })
}

/// The first `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The models the gateway can call (every priced model), as OpenAI's model list.
#[utoipa::path(get, path = "/v1/models", tag = "gateway", responses((status = 200, description = "OpenAI's model list", body = Object)))]
pub(super) async fn models(State(app): State<Arc<App>>, _caller: Caller) -> axum::Json<Value> {
    let data: Vec<Value> = app
        .config
        .prices
        .models()
        .map(|(id, _)| {
            json!({
                "id": id,
                "object": "model",
                "created": 0,
                "owned_by": id.split('/').next().unwrap_or("rein"),
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
