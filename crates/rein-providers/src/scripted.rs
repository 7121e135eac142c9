//! The scripted test model: replays responses from a YAML file.
//!
//! ```yaml
//! # The Nth model call of a run gets the Nth response; `{n}` in arguments becomes N.
//! responses:
//!   - tool_calls:
//!       - {name: get_order_status, arguments: {order_id: "42"}}
//!     usage: {input_tokens: 120, output_tokens: 18}   # optional: estimated when absent
//!   - text: Order 42 has shipped.
//!   - error: {type: permanent, message: refused}     # this call fails, every attempt of it
//! repeat_last: false   # true: keep answering with the last response forever
//! ```
//!
//! A response with `when: TEXT` answers only conversations whose messages contain TEXT, and
//! one with `unless: TEXT` only those whose messages do not (the Nth such call gets the Nth
//! such response): a graph's nodes and a plan's steps each begin a conversation of their own,
//! and `when` names the node's instructions or the step.
//!
//! The script is stateless: which response to give is read off the conversation (how many
//! assistant turns it has), so one scripted model serves any number of concurrent runs and a
//! resumed run gets the same answers it would have had.

use crate::{BoxFuture, Model, ModelError, ModelRequest};
use rein_core::{ErrorType, ModelReply, Role, ToolCall, Usage, estimate_tokens};
use serde::Deserialize;
use serde_json::Value;

/// A script that could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ScriptError {
    /// The script file.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Script {
    responses: Vec<Step>,
    #[serde(default)]
    repeat_last: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    unless: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ScriptedCall>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<ScriptedError>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedCall {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
    /// Raw argument text, for scripting malformed JSON.
    #[serde(default)]
    raw_arguments: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedError {
    #[serde(rename = "type")]
    kind: ErrorType,
    message: String,
}

/// A model that answers from a script.
#[derive(Clone, Debug)]
pub struct ScriptedModel {
    script: Script,
}

impl ScriptedModel {
    /// Parses a script. `file` is only used in error messages.
    pub fn parse(file: &str, source: &str) -> Result<Self, ScriptError> {
        let fail = |message: String| ScriptError {
            file: file.to_string(),
            message,
        };
        let node = rein_core::yaml::parse(source)
            .map_err(|e| fail(format!("line {}: invalid YAML: {}", e.pos.line, e.message)))?;
        let script: Script =
            serde_json::from_value(node.to_json()).map_err(|e| fail(e.to_string()))?;
        if script.responses.is_empty() {
            return Err(fail("`responses` must list at least one response".into()));
        }
        Ok(ScriptedModel { script })
    }

    fn answer(&self, request: ModelRequest<'_>) -> Result<ModelReply, ModelError> {
        let n = request
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count()
            + 1;
        let says = |text: &str| {
            request
                .messages
                .iter()
                .any(|m| m.content.as_deref().is_some_and(|c| c.contains(text)))
        };
        let responses: Vec<&Step> = self
            .script
            .responses
            .iter()
            .filter(|s| s.when.as_deref().is_none_or(says))
            .filter(|s| s.unless.as_deref().is_none_or(|u| !says(u)))
            .collect();
        let step = match responses.get(n - 1) {
            Some(step) => *step,
            None if self.script.repeat_last && !responses.is_empty() => {
                responses[responses.len() - 1]
            }
            None => {
                return Err(ModelError::new(
                    ErrorType::Permanent,
                    format!(
                        "the script has {} responses and call {n} asked for one more",
                        responses.len()
                    ),
                ));
            }
        };
        if let Some(error) = &step.error {
            return Err(ModelError::new(error.kind, error.message.clone()));
        }
        let number = n.to_string();
        let tool_calls: Vec<ToolCall> = step
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| ToolCall {
                id: format!("call_{n}_{i}"),
                name: c.name.clone(),
                arguments: match (&c.raw_arguments, &c.arguments) {
                    (Some(raw), _) => raw.clone(),
                    (None, Some(args)) => args.to_string().replace("{n}", &number),
                    (None, None) => "{}".to_string(),
                },
            })
            .collect();
        let content = step.text.as_ref().map(|t| t.replace("{n}", &number));
        let usage = step.usage.unwrap_or_else(|| Usage {
            input_tokens: request
                .messages
                .iter()
                .map(|m| 4 + estimate_tokens(m.content.as_deref().unwrap_or("")))
                .sum(),
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: (estimate_tokens(content.as_deref().unwrap_or(""))
                + tool_calls
                    .iter()
                    .map(|c| 4 + estimate_tokens(&c.arguments))
                    .sum::<u64>())
            .min(u64::from(request.max_output_tokens)),
        });
        Ok(ModelReply {
            model: request.model.to_string(),
            content,
            tool_calls,
            usage,
            finish_reason: Some(
                if step.tool_calls.is_empty() {
                    "stop"
                } else {
                    "tool_calls"
                }
                .into(),
            ),
            cached: false,
        })
    }
}

impl Model for ScriptedModel {
    fn complete<'a>(
        &'a self,
        request: ModelRequest<'a>,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        Box::pin(async move { self.answer(request) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rein_core::Message;

    fn request(messages: &[Message]) -> ModelRequest<'_> {
        ModelRequest {
            model: "gpt-4o-mini",
            messages,
            tools: &[],
            max_output_tokens: 100,
            temperature: None,
            output_schema: None,
            tool_choice: None,
            endpoint: None,
        }
    }

    #[test]
    fn responses_follow_the_conversation_and_repeat_with_a_counter() {
        let m = ScriptedModel::parse(
            "s.yaml",
            "responses:\n  - tool_calls: [{name: t, arguments: {page: \"{n}\"}}]\nrepeat_last: true\n",
        )
        .unwrap();
        let mut messages = vec![Message::text(Role::User, "hi")];
        let first = m.answer(request(&messages)).unwrap();
        assert_eq!(first.tool_calls[0].arguments, r#"{"page":"1"}"#);
        messages.push(Message::text(Role::Assistant, "x"));
        let second = m.answer(request(&messages)).unwrap();
        assert_eq!(second.tool_calls[0].arguments, r#"{"page":"2"}"#);
    }

    #[test]
    fn a_response_with_when_answers_only_the_conversations_it_names() {
        let m = ScriptedModel::parse(
            "s.yaml",
            "responses:\n  - {when: Classify, text: refund}\n  - {when: Answer, unless: twice, text: hello}\n  - {when: Answer, unless: twice, text: again}\n  - {when: twice, text: second}\n",
        )
        .unwrap();
        let ask = |system: &str, earlier: usize| {
            let mut messages = vec![Message::text(Role::System, system)];
            messages.extend((0..earlier).map(|_| Message::text(Role::Assistant, "x")));
            m.answer(request(&messages)).map(|r| r.content)
        };
        assert_eq!(
            ask("Classify the request.", 0).unwrap().as_deref(),
            Some("refund")
        );
        assert_eq!(
            ask("Answer the customer.", 0).unwrap().as_deref(),
            Some("hello")
        );
        assert_eq!(
            ask("Answer the customer.", 1).unwrap().as_deref(),
            Some("again")
        );
        assert_eq!(
            ask("Answer it twice.", 0).unwrap().as_deref(),
            Some("second")
        );
        assert!(ask("Something else.", 0).is_err(), "no response answers it");
    }

    #[test]
    fn a_script_that_runs_out_fails_permanently() {
        let m = ScriptedModel::parse("s.yaml", "responses:\n  - text: done\n").unwrap();
        let messages = vec![Message::text(Role::Assistant, "x")];
        assert_eq!(
            m.answer(request(&messages)).unwrap_err().kind,
            ErrorType::Permanent
        );
    }

    #[test]
    fn bad_scripts_name_the_file_and_field() {
        let err = ScriptedModel::parse("s.yaml", "responses:\n  - txt: done\n").unwrap_err();
        assert!(
            err.to_string().starts_with("s.yaml: unknown field `txt`"),
            "{err}"
        );
    }
}
