//! Output sanitisation: what leaves Rein (answers, API responses, logs, traces, the dashboard)
//! is cleared of secrets, configured kinds of personal data, internal URLs, stack traces and
//! leaks of the agent's own instructions.
//!
//! Pure functions over text and JSON. Secrets are also cleared where they *enter* a run (tool
//! results and the user's input, by the driver), so the model never sees one and the log never
//! keeps one; the same [`redact_secrets`] runs again over every payload the API and the
//! dashboard serve, for what a model may produce on its own.

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::LazyLock;

/// What a detector does with what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Nothing.
    Off,
    /// Replaced by `[REDACTED:<kind>]`.
    Redact,
    /// The answer is withheld and the run ends `guardrail_blocked`.
    Block,
}

impl Action {
    /// The name used in specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Off => "off",
            Action::Redact => "redact",
            Action::Block => "block",
        }
    }
}

/// Personal data a spec may ask to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pii {
    /// Email addresses.
    Email,
    /// Phone numbers (nine digits or more).
    Phone,
    /// Payment card numbers (13 to 19 digits that pass the Luhn check).
    Card,
    /// National identifiers: US social security numbers, UK national insurance numbers.
    NationalId,
}

impl Pii {
    /// Every kind, with its name, for parsing.
    pub const ALL: [(&'static str, Pii); 4] = [
        ("email", Pii::Email),
        ("phone", Pii::Phone),
        ("card", Pii::Card),
        ("national_id", Pii::NationalId),
    ];

    fn kind(self) -> &'static str {
        match self {
            Pii::Email => "pii.email",
            Pii::Phone => "pii.phone",
            Pii::Card => "pii.card",
            Pii::NationalId => "pii.national_id",
        }
    }
}

/// A spec's `guards.output`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputPolicy {
    /// API keys, bearer tokens, private keys, passwords in assignments.
    pub secrets: Action,
    /// Which personal data to find.
    pub pii: BTreeSet<Pii>,
    /// What to do with the personal data found.
    pub pii_action: Action,
    /// URLs of loopback, private-network and `.internal`/`.local`/`.corp` hosts.
    pub internal_urls: Action,
    /// Stack traces (Python, Java/JavaScript, Rust panics).
    pub stack_traces: Action,
    /// An answer repeating the agent's instructions.
    pub prompt_leak: Action,
    /// Share of the instructions' word 5-grams an answer must repeat to count as a leak.
    pub prompt_leak_threshold: f64,
}

impl Default for OutputPolicy {
    fn default() -> Self {
        OutputPolicy {
            secrets: Action::Redact,
            pii: [Pii::Card, Pii::NationalId].into_iter().collect(),
            pii_action: Action::Redact,
            internal_urls: Action::Redact,
            stack_traces: Action::Redact,
            prompt_leak: Action::Block,
            prompt_leak_threshold: 0.5,
        }
    }
}

/// One kind of thing found, and how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// E.g. `secret.openai_key`, `pii.card`, `internal_url`, `stack_trace`, `prompt_leak`.
    pub kind: String,
    /// How many.
    pub count: u32,
    /// What was done.
    pub action: Action,
}

/// A sanitised text.
#[derive(Clone, Debug, PartialEq)]
pub struct Sanitized {
    /// The text with redactions made.
    pub text: String,
    /// What was found.
    pub findings: Vec<Finding>,
}

impl Sanitized {
    /// Whether a finding's action is to block.
    pub fn blocked(&self) -> bool {
        self.findings.iter().any(|f| f.action == Action::Block)
    }
}

/// A compiled pattern, the kind it reports and how much of the match to redact.
struct Pattern {
    kind: &'static str,
    re: Regex,
    /// Redact only this capture group (the value of `password=...`), not the whole match.
    group: usize,
}

fn patterns(list: &[(&'static str, &str, usize)]) -> Vec<Pattern> {
    list.iter()
        .filter_map(|(kind, re, group)| {
            // Constants, checked by `every_pattern_compiles`.
            Regex::new(re).ok().map(|re| Pattern {
                kind,
                re,
                group: *group,
            })
        })
        .collect()
}

const SECRET_PATTERNS: &[(&str, &str, usize)] = &[
    (
        "secret.private_key",
        r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----",
        0,
    ),
    ("secret.anthropic_key", r"\bsk-ant-[A-Za-z0-9_-]{16,}", 0),
    (
        "secret.openai_key",
        r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{16,}",
        0,
    ),
    (
        "secret.stripe_key",
        r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",
        0,
    ),
    ("secret.aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", 0),
    (
        "secret.github_token",
        r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",
        0,
    ),
    ("secret.slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", 0),
    ("secret.google_key", r"\bAIza[0-9A-Za-z_-]{35}", 0),
    ("secret.rein_key", r"\brein_[0-9a-f]{32,}\b", 0),
    (
        "secret.jwt",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        0,
    ),
    (
        "secret.bearer_token",
        r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{16,}=*)",
        1,
    ),
    (
        "secret.assignment",
        r#"(?i)\b(?:api[_-]?key|apikey|secret(?:[_-]?key)?|password|passwd|pwd|access[_-]?token|auth[_-]?token|client[_-]?secret)["']?\s*[:=]\s*["']?([^\s"',;]{8,})"#,
        1,
    ),
];

static SECRETS: LazyLock<Vec<Pattern>> = LazyLock::new(|| patterns(SECRET_PATTERNS));

static EMAIL: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    patterns(&[(
        "pii.email",
        r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
        0,
    )])
});
static PHONE: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    patterns(&[(
        "pii.phone",
        r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}[\s.-]\d{3,4}[\s.-]\d{3,4}\b",
        0,
    )])
});
static CARD: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").ok());
static NATIONAL_ID: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    patterns(&[
        (
            "pii.national_id",
            r"\b(?:00[1-9]|0[1-9]\d|[1-578]\d\d|6[0-57-9]\d|66[0-57-9])-(?:0[1-9]|[1-9]\d)-(?:000[1-9]|00[1-9]\d|0[1-9]\d\d|[1-9]\d{3})\b",
            0,
        ),
        (
            "pii.national_id",
            r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b",
            0,
        ),
    ])
});
static INTERNAL_URL: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    patterns(&[(
        "internal_url",
        r#"(?i)\bhttps?://(?:localhost|127(?:\.\d{1,3}){3}|10(?:\.\d{1,3}){3}|192\.168(?:\.\d{1,3}){2}|172\.(?:1[6-9]|2\d|3[01])(?:\.\d{1,3}){2}|169\.254(?:\.\d{1,3}){2}|\[::1\]|[A-Za-z0-9.-]+\.(?:internal|local|localdomain|corp|lan|intranet|home\.arpa))(?::\d+)?(?:[/?#](?:[^\s)"'<>]*[^\s)"'<>.,;:!?])?)?"#,
        0,
    )])
});
static STACK_TRACE: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    patterns(&[
        (
            "stack_trace",
            r"Traceback \(most recent call last\):\n(?:[ \t]+.*\n?)+(?:\w[\w.]*(?:Error|Exception|Exit|Interrupt)\b.*)?",
            0,
        ),
        (
            "stack_trace",
            r"(?m)(?:^.*(?:Exception|Error)\b.*\n)?(?:^[ \t]+at [\w.$<>/\\ :\[\]-]+(?:\(.*\))?[ \t]*\n?){2,}",
            0,
        ),
        (
            "stack_trace",
            r"thread '[^']*' panicked at [^\n]*\n(?:.*\n){0,3}?(?:stack backtrace:\n(?:[ \t]+.*\n?)*)?",
            0,
        ),
    ])
});

/// Compiles the patterns now rather than at their first use.
pub fn warm() {
    LazyLock::force(&SECRETS);
    LazyLock::force(&EMAIL);
    LazyLock::force(&PHONE);
    LazyLock::force(&CARD);
    LazyLock::force(&NATIONAL_ID);
    LazyLock::force(&INTERNAL_URL);
    LazyLock::force(&STACK_TRACE);
}

/// Secrets in `text` replaced by `[REDACTED:<kind>]`, and what was found.
pub fn redact_secrets(text: &str) -> (String, Vec<Finding>) {
    let mut out = Sanitizing::new(text);
    out.apply(&SECRETS, Action::Redact);
    (out.text, out.findings)
}

/// A recorded payload made fit to show (the API, SSE, the dashboard, `runs show`): secrets,
/// card numbers (Luhn-checked) and national ids redacted from every string, as the default
/// output policy does for answers. The log itself keeps what was recorded.
pub fn redact_for_display(value: &mut Value) {
    walk_strings(value, &mut |s| {
        let mut out = Sanitizing::new(s);
        out.apply(&SECRETS, Action::Redact);
        out.cards(Action::Redact);
        out.apply(&NATIONAL_ID, Action::Redact);
        if !out.findings.is_empty() {
            *s = out.text;
        }
    });
}

/// `text` as [`redact_for_display`] leaves a string: secrets, card numbers and national ids
/// redacted.
pub fn redacted_for_display(text: &str) -> String {
    let mut value = Value::String(text.to_string());
    redact_for_display(&mut value);
    match value {
        Value::String(text) => text,
        _ => String::new(),
    }
}

/// A tool's result with the secrets in its data and message redacted; the kinds found.
pub fn redact_secrets_in_result(result: &mut crate::ToolResult) -> Vec<Finding> {
    let mut findings = redact_secrets_in_json(&mut result.data);
    if let Some(message) = result.message.as_mut() {
        let (text, found) = redact_secrets(message);
        *message = text;
        merge(&mut findings, found);
    }
    findings
}

/// Every string in `value` (object keys included) with its secrets redacted; the kinds found.
pub fn redact_secrets_in_json(value: &mut Value) -> Vec<Finding> {
    let mut findings: Vec<Finding> = Vec::new();
    walk_strings(value, &mut |s| {
        let (text, found) = redact_secrets(s);
        if !found.is_empty() {
            *s = text;
            merge(&mut findings, found);
        }
    });
    findings
}

/// Calls `f` on every string in `value`, object keys included.
pub fn walk_strings(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| walk_strings(v, f)),
        Value::Object(map) => {
            let entries: Vec<(String, Value)> = std::mem::take(map).into_iter().collect();
            for (mut k, mut v) in entries {
                f(&mut k);
                walk_strings(&mut v, f);
                map.insert(k, v);
            }
        }
        _ => {}
    }
}

/// Adds `found` to `into`, summing the counts of a kind found again.
pub fn merge(into: &mut Vec<Finding>, found: Vec<Finding>) {
    for f in found {
        match into.iter_mut().find(|g| g.kind == f.kind) {
            Some(g) => g.count += f.count,
            None => into.push(f),
        }
    }
}

/// `text` (an answer) sanitised by `policy`; `instructions` are the agent's own, for leaks.
pub fn sanitize(text: &str, policy: &OutputPolicy, instructions: &str) -> Sanitized {
    let mut out = Sanitizing::new(text);
    out.apply(&SECRETS, policy.secrets);
    if policy.pii.contains(&Pii::Card) {
        out.cards(policy.pii_action);
    }
    if policy.pii.contains(&Pii::NationalId) {
        out.apply(&NATIONAL_ID, policy.pii_action);
    }
    if policy.pii.contains(&Pii::Email) {
        out.apply(&EMAIL, policy.pii_action);
    }
    if policy.pii.contains(&Pii::Phone) {
        out.apply(&PHONE, policy.pii_action);
    }
    out.apply(&INTERNAL_URL, policy.internal_urls);
    out.apply(&STACK_TRACE, policy.stack_traces);
    if policy.prompt_leak != Action::Off {
        let overlap = instruction_overlap(text, instructions);
        if overlap >= policy.prompt_leak_threshold {
            out.findings.push(Finding {
                kind: "prompt_leak".into(),
                count: 1,
                action: policy.prompt_leak,
            });
            if policy.prompt_leak == Action::Redact {
                out.text = "[REDACTED:prompt_leak]".into();
            }
        }
    }
    Sanitized {
        text: out.text,
        findings: out.findings,
    }
}

/// The share of the instructions' word 5-grams (lowercased, punctuation dropped) that `text`
/// repeats; 0 for instructions shorter than five words.
pub fn instruction_overlap(text: &str, instructions: &str) -> f64 {
    fn grams(text: &str) -> BTreeSet<Vec<String>> {
        let words: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        words.windows(5).map(<[String]>::to_vec).collect()
    }
    let ours = grams(instructions);
    if ours.is_empty() {
        return 0.0;
    }
    let theirs = grams(text);
    ours.intersection(&theirs).count() as f64 / ours.len() as f64
}

/// Text being sanitised, and what was found so far.
struct Sanitizing {
    text: String,
    findings: Vec<Finding>,
}

impl Sanitizing {
    fn new(text: &str) -> Self {
        Sanitizing {
            text: text.to_string(),
            findings: Vec::new(),
        }
    }

    fn found(&mut self, kind: &str, action: Action) {
        merge(
            &mut self.findings,
            vec![Finding {
                kind: kind.to_string(),
                count: 1,
                action,
            }],
        );
    }

    fn apply(&mut self, patterns: &[Pattern], action: Action) {
        if action == Action::Off {
            return;
        }
        for p in patterns {
            let mut spans: Vec<(usize, usize)> = Vec::new();
            for caps in p.re.captures_iter(&self.text) {
                if let Some(m) = caps.get(p.group).or_else(|| caps.get(0)) {
                    spans.push((m.start(), m.end()));
                }
            }
            self.redact(p.kind, spans, action);
        }
    }

    /// Records each of `spans` (byte ranges, in order) as a finding of `kind`, and replaces
    /// them with `[REDACTED:<kind>]` when the action is to redact.
    fn redact(&mut self, kind: &str, spans: Vec<(usize, usize)>, action: Action) {
        for _ in &spans {
            self.found(kind, action);
        }
        if action == Action::Redact {
            for (start, end) in spans.into_iter().rev() {
                self.text
                    .replace_range(start..end, &format!("[REDACTED:{kind}]"));
            }
        }
    }

    fn cards(&mut self, action: Action) {
        if action == Action::Off {
            return;
        }
        let Some(re) = CARD.as_ref() else { return };
        let spans: Vec<(usize, usize)> = re
            .find_iter(&self.text)
            .filter(|m| luhn(m.as_str()))
            .map(|m| (m.start(), m.end()))
            .collect();
        self.redact(Pii::Card.kind(), spans, action);
    }
}

/// The Luhn checksum of the digits in `number` (13 to 19 of them).
pub fn luhn(number: &str) -> bool {
    let digits: Vec<u32> = number.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_compiles() {
        for (kind, re, _) in SECRET_PATTERNS {
            assert!(Regex::new(re).is_ok(), "{kind}");
        }
        assert_eq!(SECRETS.len(), SECRET_PATTERNS.len());
        assert_eq!(NATIONAL_ID.len(), 2);
        assert_eq!(STACK_TRACE.len(), 3);
        assert!(CARD.is_some() && EMAIL.len() == 1 && PHONE.len() == 1);
        assert_eq!(INTERNAL_URL.len(), 1);
    }

    #[test]
    fn secrets_of_every_common_format_are_redacted() {
        let text = "keys: sk-proj-abcdefghijklmnopqrstuv1234 and sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAA, AKIAIOSFODNN7EXAMPLE, ghp_abcdefghijklmnopqrstuvwxyz0123456789, Authorization: Bearer abc.def-ghi_jkl~mno123, password=hunter2hunter2, rein_00112233445566778899aabbccddeeff\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----";
        let (out, found) = redact_secrets(text);
        for leaked in [
            "sk-proj-abc",
            "sk-ant-api03",
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_",
            "abc.def-ghi",
            "hunter2",
            "rein_0011",
            "MIIEow",
        ] {
            assert!(!out.contains(leaked), "{leaked} in {out}");
        }
        let kinds: Vec<&str> = found.iter().map(|f| f.kind.as_str()).collect();
        assert!(kinds.contains(&"secret.openai_key") && kinds.contains(&"secret.anthropic_key"));
        assert!(
            out.contains("Authorization: Bearer [REDACTED:secret.bearer_token]"),
            "{out}"
        );
        assert!(
            out.contains("password=[REDACTED:secret.assignment]"),
            "{out}"
        );
        // Ordinary text keeps its words.
        let (same, none) =
            redact_secrets("ask-me-anything about skiing; the password policy is strict");
        assert!(none.is_empty(), "{none:?}");
        assert_eq!(
            same,
            "ask-me-anything about skiing; the password policy is strict"
        );
    }

    #[test]
    fn payloads_shown_to_people_lose_secrets_cards_and_national_ids() {
        let mut v = serde_json::json!({"result": {"data": "card 4111-1111-1111-1111, SSN 123-45-6789, key sk-abcdefghijklmnopqrstuvwx, order 4111"}});
        redact_for_display(&mut v);
        assert_eq!(
            v["result"]["data"],
            "card [REDACTED:pii.card], SSN [REDACTED:pii.national_id], key [REDACTED:secret.openai_key], order 4111"
        );
    }

    #[test]
    fn json_strings_and_keys_are_walked() {
        let mut v = serde_json::json!({"note": ["token sk-abcdefghijklmnopqrstuvwx"], "sk-abcdefghijklmnopqrstuvwx": 1});
        let found = redact_secrets_in_json(&mut v);
        assert_eq!(found[0].count, 2);
        assert!(!v.to_string().contains("sk-abcdef"), "{v}");
    }

    #[test]
    fn pii_follows_the_policy_and_cards_need_the_luhn_check() {
        let mut policy = OutputPolicy::default();
        let text = "Card 4111 1111 1111 1111, not 4111 1111 1111 1112; SSN 123-45-6789; mail ann@example.com, call +44 20 7946 0958.";
        let s = sanitize(text, &policy, "");
        assert!(
            s.text
                .contains("Card [REDACTED:pii.card], not 4111 1111 1111 1112"),
            "{}",
            s.text
        );
        assert!(
            s.text.contains("SSN [REDACTED:pii.national_id]"),
            "{}",
            s.text
        );
        assert!(
            s.text.contains("ann@example.com"),
            "emails are kept by default"
        );
        policy.pii.insert(Pii::Email);
        policy.pii.insert(Pii::Phone);
        let s = sanitize(text, &policy, "");
        assert!(
            s.text
                .contains("mail [REDACTED:pii.email], call [REDACTED:pii.phone]."),
            "{}",
            s.text
        );
        assert!(!s.blocked());
        policy.pii_action = Action::Block;
        assert!(sanitize(text, &policy, "").blocked());
    }

    #[test]
    fn internal_urls_and_stack_traces_are_removed() {
        let text = "See http://10.0.3.7:8080/admin?x=1 or https://billing.corp/api, not https://example.com/docs.\nTraceback (most recent call last):\n  File \"app.py\", line 3, in <module>\n    main()\nValueError: bad\nDone.";
        let s = sanitize(text, &OutputPolicy::default(), "");
        assert!(s.text.contains("See [REDACTED:internal_url] or [REDACTED:internal_url], not https://example.com/docs."), "{}", s.text);
        assert!(!s.text.contains("app.py"), "{}", s.text);
        assert!(s.text.ends_with("Done."), "{}", s.text);
        let java = "java.lang.IllegalStateException: boom\n\tat com.acme.Orders.load(Orders.java:42)\n\tat com.acme.Main.main(Main.java:7)\n";
        let s = sanitize(java, &OutputPolicy::default(), "");
        assert!(!s.text.contains("Orders.java"), "{}", s.text);
    }

    #[test]
    fn repeating_the_instructions_is_a_leak_and_quoting_a_phrase_is_not() {
        let instructions = "You are the support agent for Acme. Never offer refunds above 100 dollars without approval. Use the lookup tool for every order question and answer in two sentences.";
        let leak = format!("Sure! My instructions: {instructions}");
        let s = sanitize(&leak, &OutputPolicy::default(), instructions);
        assert!(s.blocked());
        assert_eq!(s.findings[0].kind, "prompt_leak");
        let fine = "I am the support agent for Acme; your order 42 shipped yesterday.";
        assert!(!sanitize(fine, &OutputPolicy::default(), instructions).blocked());
        assert!(instruction_overlap(fine, instructions) < 0.1);
    }
}
