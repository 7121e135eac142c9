//! Sessions: where a run continues its session's conversation from (`session_context`).

use crate::*;
use rein_core::{EventKind, RunStatus, SessionId, TenantId};
use serde_json::Value;
use std::time::Duration;

impl Runtime {
    /// The conversation a new run of `session` continues: the context of the session's latest
    /// run, plus that run's own turn (its input and answer). A session idle past `ttl` is
    /// closed, and a conversation longer than `max_tokens` (estimated) is condensed: either
    /// way the new run starts by summarizing it.
    pub(crate) async fn session_context(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        ttl: Duration,
        max_tokens: u64,
    ) -> Result<Option<EventKind>, RuntimeError> {
        let Some(last) = self.store.latest_in_session(tenant, session).await? else {
            return Ok(None);
        };
        let events = self.store.events(tenant, &last.info.id).await?;
        let mut messages = Vec::new();
        let mut summarized = false;
        for sealed in &events {
            match sealed.decode()?.kind {
                EventKind::SessionContext {
                    messages: earlier,
                    summarize,
                } => {
                    // Kept even when a summary was due: if it never arrived (the call failed,
                    // the run crashed), the raw conversation is still there to carry on.
                    summarized = summarize;
                    messages = earlier;
                }
                // A summarized run's first answer is the summary it continued from.
                EventKind::ModelResponded { content, .. } if summarized => {
                    messages = vec![rein_core::engine::session_summary_message(
                        content.as_deref().unwrap_or_default(),
                    )];
                    summarized = false;
                }
                _ => {}
            }
        }
        if let (RunStatus::Completed, Some(output)) = (last.progress.status, &last.progress.output)
        {
            let answer = match output {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            messages.push(rein_core::Message::text(
                rein_core::Role::User,
                last.info.input.clone(),
            ));
            messages.push(rein_core::Message::text(rein_core::Role::Assistant, answer));
        }
        if messages.is_empty() {
            return Ok(None);
        }
        let idle_ms = now_ms() - last.updated_ms;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let tokens: u64 = messages
            .iter()
            .map(|m| rein_core::estimate_tokens(m.content.as_deref().unwrap_or_default()))
            .sum();
        Ok(Some(EventKind::SessionContext {
            messages,
            summarize: idle_ms >= ttl_ms || tokens > max_tokens,
        }))
    }
}
