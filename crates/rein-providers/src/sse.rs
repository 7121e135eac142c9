//! Server-sent events, as both providers stream them: `data:` lines (Anthropic adds `event:`
//! lines, which repeat the `type` inside the data), each event ended by a blank line. Read
//! incrementally from the response, with a cap on the total size.

use crate::ModelError;
use crate::openai::billed;

/// Reads events off a streaming response.
pub(crate) struct SseReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
    received: usize,
    limit: usize,
}

/// A stream that failed after a 2xx: never retried, since the call may have been billed.
pub(crate) fn broke(what: &str) -> ModelError {
    billed(format!("the provider's stream {what}"))
}

impl SseReader {
    pub(crate) fn new(response: reqwest::Response, limit: usize) -> Self {
        SseReader {
            response,
            buffer: Vec::new(),
            received: 0,
            limit,
        }
    }

    /// The next event's data, or `None` when the stream ends.
    pub(crate) async fn next(&mut self) -> Result<Option<String>, ModelError> {
        loop {
            // Events end with a blank line (`\n\n`, or `\r\n\r\n` from some servers).
            let lf = self.buffer.windows(2).position(|w| w == b"\n\n");
            let crlf = self.buffer.windows(4).position(|w| w == b"\r\n\r\n");
            let end = match (lf, crlf) {
                (Some(a), Some(b)) if b < a => Some((b, 4)),
                (Some(a), _) => Some((a, 2)),
                (None, Some(b)) => Some((b, 4)),
                (None, None) => None,
            };
            if let Some((at, len)) = end {
                let raw: Vec<u8> = self.buffer.drain(..at + len).collect();
                if let Some(event) = parse(&String::from_utf8_lossy(&raw)) {
                    return Ok(Some(event));
                }
                continue;
            }
            let Some(chunk) = self
                .response
                .chunk()
                .await
                .map_err(|_| broke("broke off"))?
            else {
                return Ok(None);
            };
            self.received += chunk.len();
            if self.received > self.limit {
                return Err(broke("was too large"));
            }
            self.buffer.extend_from_slice(&chunk);
        }
    }
}

/// One event's data lines, joined; `None` for an event without data (a comment or keep-alive).
fn parse(raw: &str) -> Option<String> {
    let data: Vec<&str> = raw
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|value| value.strip_prefix(' ').unwrap_or(value))
        .collect();
    (!data.is_empty()).then(|| data.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_data_lines_are_joined_and_comments_skipped() {
        assert_eq!(
            parse("event: message_start\ndata: {\"a\":\ndata: 1}\n\n").as_deref(),
            Some("{\"a\":\n1}")
        );
        assert_eq!(parse("data:[DONE]\r\n\r\n").as_deref(), Some("[DONE]"));
        assert_eq!(parse(": keep-alive\n\n"), None);
    }
}
