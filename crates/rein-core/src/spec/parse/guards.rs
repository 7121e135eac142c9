//! Parsing `guards`: detection policies, the data-flow rule, the classifier, the judge and output policy.

use super::*;
use crate::yaml::Node;

impl Parser<'_> {
    /// `guards: {input, tool_results, documents, threshold, spotlight, data_flow, allow_hosts}`.
    pub(super) fn guards(&mut self, node: &Node) -> Option<crate::guard::Guards> {
        use crate::guard::{DataFlow, Guards, Policy};
        let f = self.fields(
            node,
            "guards",
            &[
                "input",
                "tool_results",
                "documents",
                "threshold",
                "spotlight",
                "data_flow",
                "allow_hosts",
                "output",
                "judge",
                "classifier",
            ],
        )?;
        let d = Guards::default();
        let policies: Vec<(&str, Policy)> = Policy::ALL.iter().map(|p| (p.as_str(), *p)).collect();
        let policy = |p: &mut Self, key: &str, default: Policy| {
            f.get(key)
                .map_or(Some(default), |n| p.one_of(n, &f.child(key), &policies))
        };
        let input = policy(self, "input", d.input);
        let tool_results = policy(self, "tool_results", d.tool_results);
        let documents = policy(self, "documents", d.documents);
        let threshold = match f.get("threshold") {
            None => Some(d.threshold),
            Some(n) => self.number(n, "guards.threshold").and_then(|t| {
                if t > 0.0 && t <= 1.0 {
                    Some(t)
                } else {
                    self.error(n.pos, "guards.threshold", "must be above 0 and at most 1");
                    None
                }
            }),
        };
        let spotlight = f
            .get("spotlight")
            .map_or(Some(d.spotlight), |n| self.boolean(n, "guards.spotlight"));
        let data_flow = f.get("data_flow").map_or(Some(d.data_flow), |n| {
            self.one_of(
                n,
                "guards.data_flow",
                &[
                    ("approve", DataFlow::Approve),
                    ("refuse", DataFlow::Refuse),
                    ("off", DataFlow::Off),
                ],
            )
        });
        let allow_hosts = match f.get("allow_hosts") {
            None => Some(Vec::new()),
            Some(n) => self.list(
                n,
                "guards.allow_hosts",
                "a list of host names",
                |p, item, path| {
                    let host = p.string(item, path)?;
                    let canonical = crate::guard::canonical_host(&host);
                    if canonical.is_none() {
                        p.error(
                            item.pos,
                            path,
                            format!(
                                "`{host}` is not a host name; write e.g. `api.example.com`, `10.0.0.7` or `::1`"
                            ),
                        );
                    }
                    canonical
                },
            ),
        };
        let output = f
            .get("output")
            .map_or(Some(d.output.clone()), |n| self.output_policy(n));
        let judge = match f.get("judge") {
            None => Some(None),
            Some(n) => self.judge(n).map(Some),
        };
        let classifier = match f.get("classifier") {
            None => Some(None),
            Some(n) => self
                .fields(n, "guards.classifier", &["min_score"])
                .and_then(|cf| match cf.get("min_score") {
                    None => Some(0.25),
                    Some(m) => self.number(m, "guards.classifier.min_score").and_then(|v| {
                        if (0.0..=1.0).contains(&v) {
                            Some(v)
                        } else {
                            self.error(
                                m.pos,
                                "guards.classifier.min_score",
                                "must be between 0 and 1",
                            );
                            None
                        }
                    }),
                })
                .map(|min_score| Some(crate::guard::Classifier { min_score })),
        };
        Some(Guards {
            classifier: classifier?,
            judge: judge?,
            output: output?,
            input: input?,
            tool_results: tool_results?,
            documents: documents?,
            threshold: threshold?,
            spotlight: spotlight?,
            data_flow: data_flow?,
            allow_hosts: allow_hosts?,
        })
    }

    /// `guards.judge: {rubric, threshold, on_fail, max_repairs}`.
    pub(super) fn judge(&mut self, node: &Node) -> Option<crate::guard::Judge> {
        use crate::guard::{Judge, OnJudgeFail};
        let f = self.fields(
            node,
            "guards.judge",
            &["rubric", "threshold", "on_fail", "max_repairs"],
        )?;
        let rubric = self
            .required(&f, "rubric", ": say what a good answer is")
            .and_then(|n| self.string(n, "guards.judge.rubric"));
        let threshold = match f.get("threshold") {
            None => Some(0.7),
            Some(n) => self.number(n, "guards.judge.threshold").and_then(|t| {
                if (0.0..=1.0).contains(&t) {
                    Some(t)
                } else {
                    self.error(n.pos, "guards.judge.threshold", "must be between 0 and 1");
                    None
                }
            }),
        };
        let on_fail = f.get("on_fail").map_or(Some(OnJudgeFail::Repair), |n| {
            self.one_of(
                n,
                "guards.judge.on_fail",
                &[
                    ("repair", OnJudgeFail::Repair),
                    ("approve", OnJudgeFail::Approve),
                    ("escalate", OnJudgeFail::Escalate),
                ],
            )
        });
        let max_repairs = f.get("max_repairs").map_or(Some(1), |n| {
            self.integer(n, "guards.judge.max_repairs", 0, 5)
                .map(|v| v as u32)
        });
        Some(Judge {
            rubric: rubric?,
            threshold: threshold?,
            on_fail: on_fail?,
            max_repairs: max_repairs?,
        })
    }

    /// `guards.output: {secrets, pii, pii_action, internal_urls, stack_traces, prompt_leak,
    /// prompt_leak_threshold}`.
    pub(super) fn output_policy(&mut self, node: &Node) -> Option<crate::sanitize::OutputPolicy> {
        use crate::sanitize::{Action, OutputPolicy, Pii};
        let f = self.fields(
            node,
            "guards.output",
            &[
                "secrets",
                "pii",
                "pii_action",
                "internal_urls",
                "stack_traces",
                "prompt_leak",
                "prompt_leak_threshold",
            ],
        )?;
        let d = OutputPolicy::default();
        let actions = [
            ("off", Action::Off),
            ("redact", Action::Redact),
            ("block", Action::Block),
        ];
        let action = |p: &mut Self, key: &str, default: Action| {
            f.get(key)
                .map_or(Some(default), |n| p.one_of(n, &f.child(key), &actions))
        };
        let secrets = action(self, "secrets", d.secrets);
        let pii_action = action(self, "pii_action", d.pii_action);
        let internal_urls = action(self, "internal_urls", d.internal_urls);
        let stack_traces = action(self, "stack_traces", d.stack_traces);
        let prompt_leak = action(self, "prompt_leak", d.prompt_leak);
        let pii = match f.get("pii") {
            None => Some(d.pii.clone()),
            Some(n) => self
                .list(
                    n,
                    "guards.output.pii",
                    "a list of detectors",
                    |p, item, path| p.one_of(item, path, &Pii::ALL),
                )
                .map(|v| v.into_iter().collect()),
        };
        let prompt_leak_threshold = match f.get("prompt_leak_threshold") {
            None => Some(d.prompt_leak_threshold),
            Some(n) => self
                .number(n, "guards.output.prompt_leak_threshold")
                .and_then(|t| {
                    if t > 0.0 && t <= 1.0 {
                        Some(t)
                    } else {
                        self.error(
                            n.pos,
                            "guards.output.prompt_leak_threshold",
                            "must be above 0 and at most 1",
                        );
                        None
                    }
                }),
        };
        Some(OutputPolicy {
            secrets: secrets?,
            pii: pii?,
            pii_action: pii_action?,
            internal_urls: internal_urls?,
            stack_traces: stack_traces?,
            prompt_leak: prompt_leak?,
            prompt_leak_threshold: prompt_leak_threshold?,
        })
    }
}
