//! The OpenAI Chat Completions client, for OpenAI and every compatible server.

use crate::exchange::{MAX_BODY_BYTES, billed, error_from, read_limited, transport_error};
use crate::sse::{SseReader, broke};
use crate::{BoxFuture, Model, ModelError, ModelRequest, TokenSink};
use rein_core::{ErrorType, Message, ModelReply, Role, ToolCall, Usage, estimate_tokens};
use serde::Deserialize;
use serde_json::{Value, json};
use std::fmt;

/// OpenAI's public endpoint, used when neither the spec nor `OPENAI_BASE_URL` names another.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// More tokens than any one call can use: a provider reporting more is broken, and its numbers
/// must not reach cost sums.
const MAX_PLAUSIBLE_TOKENS: u64 = 100_000_000;

/// A Chat Completions client.
#[derive(Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl OpenAiClient {
    /// A client for `base_url` (e.g. `http://127.0.0.1:8000/v1`) with an optional key.
    pub fn new(
        http: reqwest::Client,
        base_url: impl Into<String>,
        api_key: Option<String>,
    ) -> Self {
        OpenAiClient {
            http,
            base_url: base_url.into().trim_end_matches('/').to_string(),
            api_key: api_key.filter(|k| !k.is_empty()),
        }
    }

    /// A client configured as the official SDKs are: `OPENAI_BASE_URL`, else OpenAI's endpoint,
    /// with the key from `OPENAI_API_KEY`. That key only ever goes to this endpoint: a server a
    /// spec names gets a client of its own (see [`crate::ProviderRouter`]).
    pub fn from_env(http: reqwest::Client) -> Self {
        let base = std::env::var("OPENAI_BASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
        OpenAiClient::new(http, base, std::env::var("OPENAI_API_KEY").ok())
    }

    /// The HTTP client requests go through.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Whether a key is attached to requests.
    pub fn has_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// The endpoint this client calls.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn call(&self, request: ModelRequest<'_>) -> Result<ModelReply, ModelError> {
        let body = request_body(&request, self.base_url == DEFAULT_BASE_URL);
        let mut http = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .json(&body);
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key);
        }
        let response = http.send().await.map_err(transport_error)?;
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        let bytes = read_limited(response)
            .await
            .map_err(|e| billed(e.message))?;
        let parsed: ChatResponse = serde_json::from_slice(&bytes).map_err(|e| {
            billed(format!(
                "the provider sent a response Rein cannot read: {e}"
            ))
        })?;
        reply_from(parsed, &body, request.model).map_err(|e| billed(e.message))
    }
}

impl Model for OpenAiClient {
    fn complete<'a>(
        &'a self,
        request: ModelRequest<'a>,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        Box::pin(self.call(request))
    }

    fn complete_streaming<'a>(
        &'a self,
        request: ModelRequest<'a>,
        sink: &'a TokenSink,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        Box::pin(self.call_streaming(request, sink))
    }
}

/// A tool call being assembled from stream deltas (they arrive by index, in pieces).
#[derive(Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

impl OpenAiClient {
    async fn call_streaming(
        &self,
        request: ModelRequest<'_>,
        sink: &TokenSink,
    ) -> Result<ModelReply, ModelError> {
        let mut body = request_body(&request, self.base_url == DEFAULT_BASE_URL);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let mut http = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .json(&body);
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key);
        }
        let response = http.send().await.map_err(transport_error)?;
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        let mut events = SseReader::new(response, MAX_BODY_BYTES);
        let mut content = String::new();
        let mut calls: Vec<PartialCall> = Vec::new();
        let mut usage: Option<WireUsage> = None;
        let mut finish_reason = None;
        let mut model = None;
        let mut done = false;
        while let Some(data) = events.next().await? {
            // Each event's data is one JSON chunk; `[DONE]` ends the stream.
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                break;
            }
            let value: Value =
                serde_json::from_str(data).map_err(|_| broke("sent a chunk Rein cannot read"))?;
            if let Some(m) = value.get("model").and_then(Value::as_str) {
                model = Some(m.to_string());
            }
            if let Some(u) = value.get("usage").filter(|u| !u.is_null()) {
                usage = serde_json::from_value(u.clone()).ok();
            }
            let Some(choice) = value.pointer("/choices/0") else {
                continue;
            };
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                finish_reason = Some(reason.to_string());
            }
            let delta = &choice["delta"];
            if let Some(text) = delta
                .get("content")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                content.push_str(text);
                sink(text);
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                if index > 128 {
                    return Err(broke("named an impossible tool-call index"));
                }
                if calls.len() <= index {
                    calls.resize_with(index + 1, PartialCall::default);
                }
                let part = &mut calls[index];
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    part.id = id.to_string();
                }
                if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                    part.name.push_str(name);
                }
                if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    part.arguments.push_str(args);
                }
            }
        }
        if !done {
            return Err(broke("ended before it was complete"));
        }
        let parsed = ChatResponse {
            model,
            choices: vec![Choice {
                message: WireMessage {
                    content: (!content.is_empty()).then_some(content),
                    tool_calls: calls
                        .into_iter()
                        .map(|c| WireToolCall {
                            id: c.id,
                            function: WireFunction {
                                name: c.name,
                                arguments: c.arguments,
                            },
                        })
                        .collect(),
                },
                finish_reason,
            }],
            usage,
        };
        reply_from(parsed, &body, request.model).map_err(|e| broke(&e.message))
    }
}

/// The request body. OpenAI's own endpoint takes `max_completion_tokens` (its reasoning models
/// refuse `max_tokens`); compatible servers (vLLM, Ollama, llama.cpp) read `max_tokens`.
fn request_body(request: &ModelRequest<'_>, openai_endpoint: bool) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| wire_message(m, openai_endpoint))
        .collect();
    let cap = if openai_endpoint {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let mut body = json!({
        "model": request.model.strip_prefix("openai/").unwrap_or(request.model),
        "messages": messages,
        cap: request.max_output_tokens,
    });
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": wire_schema(&t.parameters, openai_endpoint)}}))
            .collect();
    }
    if let Some(choice) = request.tool_choice.filter(|_| !request.tools.is_empty()) {
        use rein_core::spec::ToolChoice;
        body["tool_choice"] = match choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Required => json!("required"),
            ToolChoice::None => json!("none"),
            ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
        };
    }
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(schema) = request.output_schema {
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": "final_answer", "schema": wire_schema(schema, openai_endpoint), "strict": false}
        });
    }
    body
}

/// A JSON Schema as sent to the provider. Compatible servers get it without `maxLength` and
/// `maxItems`: constrained decoders such as llama.cpp's expand each bound into that many grammar
/// repetitions, and a bound of a few thousand kills its server. Nothing is lost: Rein checks
/// every tool call's arguments and every final answer against the full schema itself.
fn wire_schema(schema: &Value, openai_endpoint: bool) -> Value {
    let mut schema = schema.clone();
    if !openai_endpoint {
        drop_repetition_bounds(&mut schema);
    }
    schema
}

fn drop_repetition_bounds(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    map.remove("maxLength");
    map.remove("maxItems");
    for (keyword, value) in map.iter_mut() {
        match (keyword.as_str(), value) {
            // Maps from names to subschemas: the names are data, not keywords.
            (
                "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas",
                Value::Object(subschemas),
            ) => subschemas.values_mut().for_each(drop_repetition_bounds),
            (
                "items"
                | "additionalProperties"
                | "not"
                | "if"
                | "then"
                | "else"
                | "contains"
                | "propertyNames"
                | "unevaluatedProperties"
                | "unevaluatedItems"
                | "additionalItems",
                v,
            ) if v.is_object() => drop_repetition_bounds(v),
            ("anyOf" | "oneOf" | "allOf" | "prefixItems" | "items", Value::Array(subschemas)) => {
                subschemas.iter_mut().for_each(drop_repetition_bounds)
            }
            _ => {}
        }
    }
}

/// One message on the wire. Compatible servers (llama.cpp) reject an assistant turn whose
/// `content` is null, so they get an empty string; OpenAI gets null, as its SDKs send.
fn wire_message(m: &Message, openai_endpoint: bool) -> Value {
    let role = match m.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let content = match &m.content {
        None if !openai_endpoint => Some(String::new()),
        other => other.clone(),
    };
    let mut out = json!({"role": role, "content": content});
    if !m.tool_calls.is_empty() {
        out["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = json!(id);
    }
    out
}

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
}

#[derive(Deserialize)]
struct WireToolCall {
    id: String,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: u64,
}

fn reply_from(
    parsed: ChatResponse,
    body: &Value,
    requested_model: &str,
) -> Result<ModelReply, ModelError> {
    let choice = parsed.choices.into_iter().next().ok_or_else(|| {
        ModelError::new(
            ErrorType::Transient,
            "the provider answered with no choices",
        )
    })?;
    let tool_calls: Vec<ToolCall> = choice
        .message
        .tool_calls
        .into_iter()
        .map(|c| ToolCall {
            id: c.id,
            name: c.function.name,
            arguments: c.function.arguments,
        })
        .collect();
    // Some compatible servers omit usage; a cost cap must still count something, so estimate
    // conservatively from what was sent and received.
    let usage = match parsed.usage {
        Some(u) => Usage {
            input_tokens: u.prompt_tokens,
            cached_input_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            cache_write_tokens: 0,
            output_tokens: u.completion_tokens,
        },
        None => Usage {
            input_tokens: estimate_tokens(&body.to_string()),
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: estimate_tokens(choice.message.content.as_deref().unwrap_or(""))
                + tool_calls
                    .iter()
                    .map(|c| estimate_tokens(&c.name) + estimate_tokens(&c.arguments))
                    .sum::<u64>(),
        },
    };
    if [
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.output_tokens,
    ]
    .iter()
    .any(|&n| n > MAX_PLAUSIBLE_TOKENS)
    {
        return Err(ModelError::new(
            ErrorType::Permanent,
            "the provider reported an impossible token usage",
        ));
    }
    Ok(ModelReply {
        model: parsed.model.unwrap_or_else(|| requested_model.to_string()),
        content: choice.message.content,
        tool_calls,
        usage,
        finish_reason: choice.finish_reason,
        cached: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_gets_max_completion_tokens_and_compatible_servers_max_tokens() {
        let messages = [Message::text(Role::User, "hi")];
        let request = ModelRequest {
            model: "gpt-5-mini",
            messages: &messages,
            tools: &[],
            max_output_tokens: 64,
            temperature: None,
            output_schema: None,
            tool_choice: None,
            endpoint: None,
        };
        let official = request_body(&request, true);
        assert_eq!(
            (
                official["max_completion_tokens"].as_u64(),
                official.get("max_tokens")
            ),
            (Some(64), None)
        );
        let local = request_body(&request, false);
        assert_eq!(
            (
                local["max_tokens"].as_u64(),
                local.get("max_completion_tokens")
            ),
            (Some(64), None)
        );
    }

    #[test]
    fn tool_choice_and_assistant_turns_match_each_servers_expectations() {
        use rein_core::spec::ToolChoice;
        let messages = [Message {
            role: Role::Assistant,
            content: None,
            tool_calls: vec![ToolCall {
                id: "c1".into(),
                name: "lookup".into(),
                arguments: "{}".into(),
            }],
            tool_call_id: None,
        }];
        let tools = [rein_core::ToolDefinition {
            name: "lookup".into(),
            description: "d".into(),
            parameters: json!({"type": "object"}),
        }];
        let choice = ToolChoice::Tool("lookup".into());
        let request = ModelRequest {
            model: "m",
            messages: &messages,
            tools: &tools,
            max_output_tokens: 8,
            temperature: None,
            output_schema: None,
            tool_choice: Some(&choice),
            endpoint: None,
        };
        let local = request_body(&request, false);
        assert_eq!(
            local["tool_choice"],
            json!({"type": "function", "function": {"name": "lookup"}})
        );
        assert_eq!(
            local["messages"][0]["content"],
            json!(""),
            "llama.cpp rejects null content"
        );
        let official = request_body(&request, true);
        assert_eq!(official["messages"][0]["content"], Value::Null);
    }

    #[test]
    fn compatible_servers_get_schemas_without_repetition_bounds() {
        let schema = json!({
            "type": "object",
            "properties": {
                "text": {"type": "string", "maxLength": 100000, "minLength": 1},
                "maxLength": {"type": "array", "maxItems": 5000, "items": {"type": "string", "maxLength": 9}},
                "choice": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]}
            },
            "additionalProperties": false
        });
        let relaxed = wire_schema(&schema, false);
        assert_eq!(
            relaxed,
            json!({
                "type": "object",
                "properties": {
                    "text": {"type": "string", "minLength": 1},
                    "maxLength": {"type": "array", "items": {"type": "string"}},
                    "choice": {"anyOf": [{"type": "string"}, {"type": "integer"}]}
                },
                "additionalProperties": false
            }),
            "a property named `maxLength` is data and stays"
        );
        assert_eq!(
            wire_schema(&schema, true),
            schema,
            "OpenAI gets the schema as written"
        );
    }

    #[test]
    fn impossible_usage_is_refused() {
        let parsed: ChatResponse = serde_json::from_value(json!({
            "choices": [{"message": {"content": "hi"}}],
            "usage": {"prompt_tokens": u64::MAX, "completion_tokens": 1}
        }))
        .unwrap();
        assert_eq!(
            reply_from(parsed, &json!({}), "m").unwrap_err().kind,
            ErrorType::Permanent
        );
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let c = OpenAiClient::new(
            reqwest::Client::new(),
            "http://x/v1",
            Some("sk-secret-123".into()),
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("sk-secret-123") && shown.contains("[redacted]"),
            "{shown}"
        );
    }
}
