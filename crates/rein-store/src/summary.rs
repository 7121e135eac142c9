//! A run's row is a projection of its log: what appending events changes in it is computed
//! here, from the events themselves, and written by the store in the transaction that appends
//! them, so a listing never disagrees with the log.

use crate::StoreError;
use rein_core::SealedEvent;
use serde::Deserialize;
use serde_json::Value;

/// What appending a batch of consecutive events of one run changes in the run's row.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Appended {
    /// The run's event count after the batch.
    pub event_count: i64,
    /// The hash of the batch's last event.
    pub head_hash: String,
    /// The time of the batch's last event.
    pub updated_ms: i64,
    /// Model calls answered or failed.
    pub iterations: i64,
    /// Tool results.
    pub tool_calls: i64,
    /// Tokens and cost of the answered calls.
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micros: i64,
    /// The status the batch leaves the run in, with its approval deadline, when an event of it
    /// changes the status (`approval_requested`, `approval_decided`, `run_finished`).
    pub status: Option<(String, Option<i64>)>,
    /// The outcome `run_finished` records: reason, detail and output (JSON).
    pub finished: Option<Finished>,
}

/// The part of a `run_finished` event the run's row keeps.
#[derive(Debug, Default, Deserialize, PartialEq)]
pub(crate) struct Finished {
    pub status: String,
    pub reason: Option<String>,
    pub detail: Option<String>,
    #[serde(default, deserialize_with = "json_text")]
    pub output: Option<String>,
}

/// The part of a `model_responded` event the run's row adds up.
#[derive(Deserialize)]
struct Answered {
    #[serde(default)]
    usage: Tokens,
    #[serde(default)]
    cost: i64,
}

#[derive(Default, Deserialize)]
struct Tokens {
    #[serde(default)]
    input_tokens: i64,
    #[serde(default)]
    cached_input_tokens: i64,
    #[serde(default)]
    output_tokens: i64,
}

#[derive(Deserialize)]
struct ApprovalAsked {
    expires_at_ms: Option<i64>,
}

/// A JSON value kept as its text (`null` included, as the text `null`).
fn json_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Value::deserialize(d).map(|v| Some(v.to_string()))
}

impl Appended {
    /// The change `events` (consecutive, of one run, at least one) make to their run's row.
    /// Only the payloads of the events that carry a count or a status are read.
    pub(crate) fn of(events: &[SealedEvent]) -> Result<Self, StoreError> {
        let mut appended = Appended::default();
        if let Some(last) = events.last() {
            appended.event_count = crate::to_i64(last.seq).saturating_add(1);
            appended.head_hash.clone_from(&last.hash);
            appended.updated_ms = last.ts_ms;
        }
        for event in events {
            match event.kind.as_str() {
                "model_responded" => {
                    let a: Answered = payload(event)?;
                    appended.iterations += 1;
                    appended.input_tokens += a.usage.input_tokens;
                    appended.cached_input_tokens += a.usage.cached_input_tokens;
                    appended.output_tokens += a.usage.output_tokens;
                    appended.cost_micros += a.cost;
                }
                "model_failed" => appended.iterations += 1,
                "tool_result" => appended.tool_calls += 1,
                "approval_requested" => {
                    let asked: ApprovalAsked = payload(event)?;
                    appended.status = Some(("awaiting_approval".into(), asked.expires_at_ms));
                }
                "approval_decided" => appended.status = Some(("running".into(), None)),
                "run_finished" => {
                    let finished: Finished = payload(event)?;
                    appended.status = Some((finished.status.clone(), None));
                    appended.finished = Some(finished);
                }
                _ => {}
            }
        }
        Ok(appended)
    }
}

fn payload<'a, T: Deserialize<'a>>(event: &'a SealedEvent) -> Result<T, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        run_id: event.run_id.clone(),
        field: "payload",
        message: format!("event {} ({}): {message}", event.seq, event.kind),
    };
    let text = event
        .payload
        .as_deref()
        .ok_or_else(|| corrupt("appended without a payload".into()))?;
    serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rein_core::RunId;

    fn sealed(seq: u64, kind: &str, payload: Option<&str>) -> SealedEvent {
        SealedEvent {
            run_id: RunId::new("r1"),
            seq,
            ts_ms: 10 + i64::try_from(seq).unwrap_or(0),
            kind: kind.into(),
            payload: payload.map(str::to_string),
            payload_sha256: String::new(),
            prev_hash: String::new(),
            hash: format!("h{seq}"),
        }
    }

    #[test]
    fn the_last_status_change_of_a_batch_wins_and_counts_add_up() {
        let events = [
            sealed(
                3,
                "run_finished",
                Some(r#"{"status":"failed","reason":"error"}"#),
            ),
            sealed(4, "approval_requested", Some(r#"{"expires_at_ms":99}"#)),
            sealed(5, "model_failed", Some("{}")),
        ];
        let appended = Appended::of(&events).unwrap();
        assert_eq!(
            (
                appended.event_count,
                appended.head_hash.as_str(),
                appended.updated_ms
            ),
            (6, "h5", 15)
        );
        assert_eq!(appended.iterations, 1);
        assert_eq!(
            appended.status,
            Some(("awaiting_approval".to_string(), Some(99)))
        );
        let finished = appended.finished.unwrap();
        assert_eq!(
            (finished.reason.as_deref(), finished.output),
            (Some("error"), None)
        );
    }

    #[test]
    fn a_payload_the_row_needs_but_cannot_read_refuses_the_append() {
        for payload in [None, Some("{not json"), Some(r#"{"cost":"a lot"}"#)] {
            let err = Appended::of(&[sealed(1, "model_responded", payload)]).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Corrupt {
                        field: "payload",
                        ..
                    }
                ),
                "{err}"
            );
        }
        // Kinds the row does not count are not read at all.
        assert!(Appended::of(&[sealed(1, "budget_reserved", Some("{not json"))]).is_ok());
    }
}
