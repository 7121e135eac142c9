//! The Anthropic Messages client, with prompt caching on the stable prefix.
//!
//! The instructions (system prompt) and the tool definitions are the same on every call of a
//! run, so both end in a `cache_control` breakpoint: later calls read them from the cache at a
//! tenth of the input price. Cache reads and writes are reported and priced separately.

use crate::exchange::{MAX_BODY_BYTES, billed, error_from, read_limited, transport_error};
use crate::sse::{SseReader, broke};
use crate::{BoxFuture, Model, ModelError, ModelRequest, TokenSink};
use rein_core::spec::ToolChoice;
use rein_core::{ErrorType, ModelReply, Role, ToolCall, Usage};
use serde_json::{Value, json};
use std::fmt;

/// Anthropic's public endpoint, used when `ANTHROPIC_BASE_URL` names no other.
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// The API version Rein speaks.
const API_VERSION: &str = "2023-06-01";

/// A Messages API client.
#[derive(Clone)]
pub struct AnthropicClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

impl fmt::Debug for AnthropicClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicClient")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl AnthropicClient {
    /// A client for `base_url` (without `/v1`) with an optional key.
    pub fn new(
        http: reqwest::Client,
        base_url: impl Into<String>,
        api_key: Option<String>,
    ) -> Self {
        AnthropicClient {
            http,
            base_url: base_url.into().trim_end_matches('/').to_string(),
            api_key: api_key.filter(|k| !k.is_empty()),
        }
    }

    /// Configured as the official SDKs are: `ANTHROPIC_BASE_URL` (else Anthropic's endpoint)
    /// with `ANTHROPIC_API_KEY`, which only ever goes to this endpoint.
    pub fn from_env(http: reqwest::Client) -> Self {
        let base = std::env::var("ANTHROPIC_BASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| ANTHROPIC_BASE_URL.to_string());
        AnthropicClient::new(http, base, std::env::var("ANTHROPIC_API_KEY").ok())
    }

    /// The HTTP client requests go through.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The endpoint this client calls.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn send(&self, body: &Value) -> Result<reqwest::Response, ModelError> {
        let mut http = self
            .http
            .post(format!("{}/v1/messages", self.base_url))
            .header("anthropic-version", API_VERSION)
            .json(body);
        if let Some(key) = &self.api_key {
            http = http.header("x-api-key", key);
        }
        let response = http.send().await.map_err(transport_error)?;
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        Ok(response)
    }

    async fn call(&self, request: ModelRequest<'_>) -> Result<ModelReply, ModelError> {
        let response = self.send(&request_body(&request)).await?;
        let bytes = read_limited(response)
            .await
            .map_err(|e| billed(e.message))?;
        let parsed: Value = serde_json::from_slice(&bytes).map_err(|e| {
            billed(format!(
                "the provider sent a response Rein cannot read: {e}"
            ))
        })?;
        reply_from(&parsed, request.model).map_err(|e| billed(e.message))
    }

    /// The same call, streamed: the message is rebuilt from its events (`message_start`,
    /// content blocks opened, extended by text or partial-JSON deltas and closed,
    /// `message_delta` with the stop reason and the output usage, `message_stop`) and then read
    /// exactly as a whole answer is, so usage and cache tokens are priced the same either way.
    async fn call_streaming(
        &self,
        request: ModelRequest<'_>,
        sink: &TokenSink,
    ) -> Result<ModelReply, ModelError> {
        let mut body = request_body(&request);
        body["stream"] = json!(true);
        let response = self.send(&body).await?;
        let mut events = SseReader::new(response, MAX_BODY_BYTES);
        let mut message: Option<Value> = None;
        // Text and tool inputs (pieces of JSON text) arrive in deltas, joined per block and
        // written into the block at its end.
        let mut partial_json: Vec<String> = Vec::new();
        let mut stopped = false;
        while let Some(data) = events.next().await? {
            let event: Value =
                serde_json::from_str(&data).map_err(|_| broke("sent an event Rein cannot read"))?;
            let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
            if kind == "error" {
                let what = event
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("error");
                return Err(broke(&format!("reported an error ({what})")));
            }
            if kind == "message_start" {
                // The shape is checked here so that the indexing below cannot fail: an object
                // with an empty content list (blocks arrive as events) and an object of usage.
                let Some(Value::Object(mut started)) = event.get("message").cloned() else {
                    return Err(broke("began without a message"));
                };
                started.insert("content".into(), json!([]));
                if !started.get("usage").is_some_and(Value::is_object) {
                    started.insert("usage".into(), json!({}));
                }
                message = Some(Value::Object(started));
                partial_json.clear();
                continue;
            }
            let Some(message) = message.as_mut() else {
                if kind == "ping" {
                    continue;
                }
                return Err(broke("did not begin with message_start"));
            };
            let index = event.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            let opened = index < partial_json.len();
            if matches!(kind, "content_block_delta" | "content_block_stop") && !opened {
                return Err(broke("named a content block it had not opened"));
            }
            match kind {
                "content_block_start" => {
                    if index > 128 || index != partial_json.len() {
                        return Err(broke("opened content blocks out of order"));
                    }
                    let block = event
                        .get("content_block")
                        .filter(|b| b.is_object())
                        .cloned()
                        .ok_or_else(|| broke("opened a content block that is not an object"))?;
                    match message.get_mut("content").and_then(Value::as_array_mut) {
                        Some(blocks) => blocks.push(block),
                        None => message["content"] = json!([block]),
                    }
                    partial_json.push(String::new());
                }
                "content_block_delta" => {
                    let delta = event.get("delta").cloned().unwrap_or(Value::Null);
                    match delta.get("type").and_then(Value::as_str) {
                        Some("text_delta") => {
                            let text = delta.get("text").and_then(Value::as_str).unwrap_or("");
                            // Joined per block and written at its end: appending to the JSON
                            // string on every delta would copy the whole text each time.
                            partial_json[index].push_str(text);
                            if !text.is_empty() {
                                sink(text);
                            }
                        }
                        Some("input_json_delta") => {
                            let piece = delta
                                .get("partial_json")
                                .and_then(Value::as_str)
                                .unwrap_or("");
                            partial_json[index].push_str(piece);
                        }
                        _ => {}
                    }
                }
                "content_block_stop" => {
                    let content = &mut message["content"][index];
                    let joined = std::mem::take(&mut partial_json[index]);
                    match content.get("type").and_then(Value::as_str) {
                        Some("tool_use") if !joined.trim().is_empty() => {
                            content["input"] = serde_json::from_str(joined.trim())
                                .map_err(|_| broke("sent tool input that is not JSON"))?;
                        }
                        Some("text") => {
                            let start = content.get("text").and_then(Value::as_str).unwrap_or("");
                            content["text"] = json!(format!("{start}{joined}"));
                        }
                        _ => {}
                    }
                }
                "message_delta" => {
                    if let Some(reason) = event.pointer("/delta/stop_reason") {
                        message["stop_reason"] = reason.clone();
                    }
                    // Counts in `message_delta` are cumulative: they replace the start's.
                    if let Some(usage) = event.get("usage").and_then(Value::as_object) {
                        for (key, count) in usage {
                            if count.is_u64() {
                                message["usage"][key.as_str()] = count.clone();
                            }
                        }
                    }
                }
                "message_stop" => {
                    stopped = true;
                    break;
                }
                _ => {}
            }
        }
        let message = message.filter(|_| stopped);
        let Some(message) = message else {
            return Err(broke("ended before it was complete"));
        };
        reply_from(&message, request.model).map_err(|e| broke(&e.message))
    }
}

impl Model for AnthropicClient {
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

/// The Messages API body: system prompt and tools as the cached prefix, then the turns. Tool
/// results become `tool_result` blocks of a user turn; consecutive user content is merged, as
/// the API requires turns to alternate.
pub(crate) fn request_body(request: &ModelRequest<'_>) -> Value {
    let model = request
        .model
        .strip_prefix("anthropic/")
        .unwrap_or(request.model);
    let mut system = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    let mut push = |role: &str, block: Value| match turns.last_mut() {
        Some((last, blocks)) if last == role => blocks.push(block),
        _ => turns.push((role.to_string(), vec![block])),
    };
    for m in request.messages {
        match m.role {
            Role::System => {
                system.push(json!({"type": "text", "text": m.content.clone().unwrap_or_default()}))
            }
            Role::User => push(
                "user",
                json!({"type": "text", "text": m.content.clone().unwrap_or_default()}),
            ),
            Role::Tool => push(
                "user",
                json!({
                    "type": "tool_result",
                    "tool_use_id": m.tool_call_id.clone().unwrap_or_default(),
                    "content": m.content.clone().unwrap_or_default(),
                }),
            ),
            Role::Assistant => {
                if let Some(text) = m.content.as_deref().filter(|t| !t.is_empty()) {
                    push("assistant", json!({"type": "text", "text": text}));
                }
                for call in &m.tool_calls {
                    let input: Value =
                        serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
                    let input = if input.is_object() { input } else { json!({}) };
                    push(
                        "assistant",
                        json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}),
                    );
                }
            }
        }
    }
    if let Some(last) = system.last_mut() {
        last["cache_control"] = json!({"type": "ephemeral"});
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    let mut body = json!({
        "model": model,
        "max_tokens": request.max_output_tokens,
        "messages": messages,
    });
    if !system.is_empty() {
        body["system"] = Value::Array(system);
    }
    if !request.tools.is_empty() {
        let mut tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
            .collect();
        if let Some(last) = tools.last_mut() {
            last["cache_control"] = json!({"type": "ephemeral"});
        }
        body["tools"] = Value::Array(tools);
        if let Some(choice) = request.tool_choice {
            body["tool_choice"] = match choice {
                ToolChoice::Auto => json!({"type": "auto"}),
                ToolChoice::Required => json!({"type": "any"}),
                ToolChoice::None => json!({"type": "none"}),
                ToolChoice::Tool(name) => json!({"type": "tool", "name": name}),
            };
        }
    }
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t.min(1.0));
    }
    // Structured outputs (generally available since 2026-02): the answer is decoded against the
    // schema. Rein still validates it and asks for repairs, as for every provider.
    if let Some(schema) = request.output_schema {
        body["output_config"] = json!({"format": {"type": "json_schema", "schema": schema}});
    }
    body
}

fn reply_from(parsed: &Value, requested_model: &str) -> Result<ModelReply, ModelError> {
    let blocks = parsed
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ModelError::new(
                ErrorType::Transient,
                "the provider answered with no content",
            )
        })?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: block
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                name: block
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                arguments: block
                    .get("input")
                    .cloned()
                    .unwrap_or_else(|| json!({}))
                    .to_string(),
            }),
            _ => {}
        }
    }
    let n = |key: &str| {
        parsed
            .pointer(&format!("/usage/{key}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    // Anthropic reports the uncached input apart from cache reads and writes; Rein's usage
    // counts all input together and names the cached parts.
    let (read, written) = (
        n("cache_read_input_tokens"),
        n("cache_creation_input_tokens"),
    );
    let usage = Usage {
        input_tokens: n("input_tokens")
            .saturating_add(read)
            .saturating_add(written),
        cached_input_tokens: read,
        cache_write_tokens: written,
        output_tokens: n("output_tokens"),
    };
    if usage.input_tokens.max(usage.output_tokens) > 100_000_000 {
        return Err(ModelError::new(
            ErrorType::Permanent,
            "the provider reported an impossible token usage",
        ));
    }
    Ok(ModelReply {
        model: parsed
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(requested_model)
            .to_string(),
        content: (!text.is_empty()).then_some(text),
        tool_calls,
        usage,
        finish_reason: parsed
            .get("stop_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        cached: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rein_core::{Message, ToolDefinition};

    #[test]
    fn the_stable_prefix_is_cached_and_tool_results_join_one_user_turn() {
        let messages = vec![
            Message::text(Role::System, "Be brief."),
            Message::text(Role::User, "Where are orders 1 and 2?"),
            Message {
                role: Role::Assistant,
                content: None,
                tool_calls: vec![
                    ToolCall {
                        id: "t1".into(),
                        name: "lookup".into(),
                        arguments: r#"{"id":"1"}"#.into(),
                    },
                    ToolCall {
                        id: "t2".into(),
                        name: "lookup".into(),
                        arguments: r#"{"id":"2"}"#.into(),
                    },
                ],
                tool_call_id: None,
            },
            Message {
                role: Role::Tool,
                content: Some("shipped".into()),
                tool_calls: vec![],
                tool_call_id: Some("t1".into()),
            },
            Message {
                role: Role::Tool,
                content: Some("pending".into()),
                tool_calls: vec![],
                tool_call_id: Some("t2".into()),
            },
        ];
        let tools = [ToolDefinition {
            name: "lookup".into(),
            description: "d".into(),
            parameters: json!({"type": "object"}),
        }];
        let body = request_body(&ModelRequest {
            model: "anthropic/claude-haiku-4-5",
            messages: &messages,
            tools: &tools,
            max_output_tokens: 100,
            temperature: None,
            output_schema: None,
            tool_choice: None,
            endpoint: None,
        });
        assert_eq!(body["model"], "claude-haiku-4-5");
        assert_eq!(
            body["system"][0]["cache_control"],
            json!({"type": "ephemeral"})
        );
        assert_eq!(
            body["tools"][0]["cache_control"],
            json!({"type": "ephemeral"})
        );
        let turns = body["messages"].as_array().unwrap();
        assert_eq!(turns.len(), 3, "user, assistant, user: {turns:?}");
        assert_eq!(turns[1]["content"][1]["input"], json!({"id": "2"}));
        let results = turns[2]["content"].as_array().unwrap();
        assert_eq!(
            (results.len(), &results[1]["tool_use_id"]),
            (2, &json!("t2"))
        );
        assert!(body.get("output_config").is_none(), "no schema, no format");
    }

    #[test]
    fn an_output_schema_goes_as_the_native_json_schema_format() {
        let schema = json!({"type": "object", "properties": {"answer": {"type": "string"}}});
        let messages = vec![Message::text(Role::User, "hi")];
        let body = request_body(&ModelRequest {
            model: "anthropic/claude-haiku-4-5",
            messages: &messages,
            tools: &[],
            max_output_tokens: 100,
            temperature: None,
            output_schema: Some(&schema),
            tool_choice: None,
            endpoint: None,
        });
        assert_eq!(
            body["output_config"],
            json!({"format": {"type": "json_schema", "schema": schema}})
        );
    }

    #[test]
    fn cache_reads_and_writes_are_reported_apart() {
        let reply = reply_from(
            &json!({
                "model": "claude-haiku-4-5",
                "content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "id": "t", "name": "x", "input": {"a": 1}}],
                "stop_reason": "tool_use",
                "usage": {"input_tokens": 10, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 100, "output_tokens": 5}
            }),
            "m",
        )
        .unwrap();
        assert_eq!(
            reply.usage,
            Usage {
                input_tokens: 1010,
                cached_input_tokens: 900,
                cache_write_tokens: 100,
                output_tokens: 5
            }
        );
        assert_eq!(reply.tool_calls[0].arguments, r#"{"a":1}"#);
    }
}
