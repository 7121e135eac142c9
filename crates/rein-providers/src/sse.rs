//! Server-sent events, as both providers stream them: `data:` lines (Anthropic adds `event:`
//! lines, which repeat the `type` inside the data), each event ended by a blank line. Read
//! incrementally from the response, with a cap on the total size.

use crate::ModelError;
use crate::exchange::billed;

/// Reads events off a streaming response.
pub(crate) struct SseReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no event end, so each byte is scanned once.
    scanned: usize,
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
            scanned: 0,
            received: 0,
            limit,
        }
    }

    /// The next event's data, or `None` when the stream ends.
    pub(crate) async fn next(&mut self) -> Result<Option<String>, ModelError> {
        loop {
            // An event ends with a blank line: two line ends in a row, each `\n` or `\r\n`.
            if let Some(end) = event_end(&self.buffer, self.scanned) {
                self.scanned = 0;
                let raw: Vec<u8> = self.buffer.drain(..end).collect();
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
            // Resume the scan a few bytes back, where an event end could straddle chunks.
            self.scanned = self.buffer.len().saturating_sub(3);
            self.buffer.extend_from_slice(&chunk);
        }
    }
}

/// Where the first event in `buffer` ends (just past its blank line), scanning from `from`.
fn event_end(buffer: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buffer.len() {
        if buffer[i] == b'\n' {
            let next = i + 1;
            if buffer.get(next) == Some(&b'\n') {
                return Some(next + 1);
            }
            if buffer.get(next) == Some(&b'\r') && buffer.get(next + 1) == Some(&b'\n') {
                return Some(next + 2);
            }
        }
        i += 1;
    }
    None
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
        assert_eq!(event_end(b"data: a\n\ndata: b", 0), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\nx", 0), Some(11));
        assert_eq!(event_end(b"data: a\n\r\nx", 0), Some(10));
        assert_eq!(event_end(b"data: a\r\ndata: b\r\n", 0), None);
    }
}
