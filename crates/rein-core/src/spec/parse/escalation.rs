//! Parsing `escalation` and `approval`: when a run hands over to a person.

use super::*;
use crate::spec::*;
use crate::yaml::Node;

impl Parser<'_> {
    /// `escalation: {on: [...], min_confidence}`.
    pub(super) fn escalation(&mut self, node: &Node, has_schema: bool) -> Option<Escalation> {
        let f = self.fields(node, "escalation", &["on", "min_confidence"])?;
        let triggers = [
            EscalationTrigger::RepeatedToolFailure,
            EscalationTrigger::CircuitOpen,
            EscalationTrigger::LowConfidence,
            EscalationTrigger::BudgetWarning,
        ];
        let choices: Vec<(&str, EscalationTrigger)> =
            triggers.iter().map(|t| (t.as_str(), *t)).collect();
        let on = match f.get("on") {
            None => {
                self.error(
                    node.pos,
                    "escalation.on",
                    "name what escalates: repeated_tool_failure, circuit_open, low_confidence, budget_warning",
                );
                None
            }
            Some(n) => self.list(n, "escalation.on", "a list of triggers", |p, item, path| {
                p.one_of(item, path, &choices)
            }),
        };
        let min_confidence = match f.get("min_confidence") {
            None => Some(None),
            Some(n) => self.number(n, "escalation.min_confidence").and_then(|c| {
                if (0.0..=1.0).contains(&c) {
                    Some(Some(c))
                } else {
                    self.error(
                        n.pos,
                        "escalation.min_confidence",
                        "must be between 0 and 1",
                    );
                    None
                }
            }),
        };
        let (on, min_confidence) = (on?, min_confidence?);
        if on.contains(&EscalationTrigger::LowConfidence)
            && (min_confidence.is_none() || !has_schema)
        {
            self.error(
                node.pos,
                "escalation.on",
                "low_confidence needs `escalation.min_confidence` and an `output_schema` with a numeric `confidence` field",
            );
            return None;
        }
        Some(Escalation { on, min_confidence })
    }

    /// `approval: {timeout, on_timeout, on_deny}`.
    pub(super) fn approval(&mut self, node: &Node, has_schema: bool) -> Option<ApprovalPolicy> {
        let f = self.fields(
            node,
            "approval",
            &["timeout", "on_timeout", "on_deny", "min_confidence"],
        )?;
        let d = DEFAULT_APPROVAL;
        let min_confidence = match f.get("min_confidence") {
            None => Some(None),
            Some(_) if !has_schema => {
                self.error(
                    node.pos,
                    "approval.min_confidence",
                    "needs an `output_schema` with a numeric `confidence` field",
                );
                None
            }
            Some(n) => self.number(n, "approval.min_confidence").and_then(|c| {
                if (0.0..=1.0).contains(&c) {
                    Some(Some(c))
                } else {
                    self.error(n.pos, "approval.min_confidence", "must be between 0 and 1");
                    None
                }
            }),
        };
        let timeout = f
            .get("timeout")
            .map_or(Some(d.timeout), |n| self.duration(n, "approval.timeout"));
        let on_timeout = f.get("on_timeout").map_or(Some(d.on_timeout), |n| {
            self.one_of(
                n,
                "approval.on_timeout",
                &[("deny", OnTimeout::Deny), ("escalate", OnTimeout::Escalate)],
            )
        });
        let on_deny = f.get("on_deny").map_or(Some(d.on_deny), |n| {
            self.one_of(
                n,
                "approval.on_deny",
                &[("continue", OnDeny::Continue), ("end", OnDeny::End)],
            )
        });
        Some(ApprovalPolicy {
            min_confidence: min_confidence?,
            timeout: timeout?,
            on_timeout: on_timeout?,
            on_deny: on_deny?,
        })
    }
}
