//! Property-based fuzzing of what reads untrusted input: the spec parser (operators' YAML, and
//! whatever `POST /v1/agents` is sent) and the guards (every user input and tool result). No
//! input may panic them; the detector's score stays in [0, 1] and is deterministic. Bounded:
//! `PROPTEST_CASES` cases per property (256 by default), so it runs in CI in seconds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use rein_core::guard::{Detector, Guards, Source};
use rein_core::sanitize::{OutputPolicy, redact_secrets, sanitize};
use rein_core::spec::ProviderInfo;
use rein_core::{Agent, BuiltinToolInfo, CheckContext, PriceTable};
use std::collections::BTreeMap;

/// The providers of Rein's own adapters (`rein_providers::PROVIDERS`).
const PROVIDERS: &[ProviderInfo] = &[
    ProviderInfo {
        name: "openai",
        key_env: "OPENAI_API_KEY",
    },
    ProviderInfo {
        name: "anthropic",
        key_env: "ANTHROPIC_API_KEY",
    },
];

const SPEC: &str = r#"name: fuzzed
version: 1
model: {primary: openai/gpt-4o-mini, fallbacks: [openai/gpt-4o], max_output_tokens: 256}
instructions: Answer the customer.
tools:
  - name: lookup
    description: Looks an order up.
    input_schema: {type: object, properties: {id: {type: string, pattern: "^[0-9]+$"}, rows: {type: array}}, required: [id]}
    source: {http: {url: "http://127.0.0.1:1/orders/{id}", method: GET}}
    contract: {timeout: 5s, side_effects: read, results: document, limits: {"/rows": {max: 10, action: approve}}}
limits: {max_iterations: 5, max_total_tokens: 10000, max_cost_usd: 0.5, timeout: 30s}
output_schema: {type: object, properties: {answer: {type: string}, confidence: {type: number}}}
approval: {timeout: 1h, on_timeout: escalate, min_confidence: 0.5}
escalation: {on: [low_confidence, circuit_open], min_confidence: 0.2}
guards: {input: block, tool_results: fence, threshold: 0.6, allow_hosts: [api.example.com], output: {pii: [email, card], prompt_leak: redact}}
"#;

fn parse(src: &str) {
    let prices = PriceTable::default();
    let builtins: BTreeMap<String, BuiltinToolInfo> = BTreeMap::new();
    let ctx = CheckContext {
        prices: &prices,
        builtin_tools: &builtins,
        providers: PROVIDERS,
    };
    // Ok or a list of problems; never a panic.
    if let Err(e) = Agent::parse("fuzz.yaml", src, &ctx) {
        assert!(!e.diagnostics.is_empty());
        let _ = e.to_string();
    }
}

/// Characters attackers and YAML both care about.
fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        any::<char>(),
        prop::sample::select(vec![
            '\u{200b}',
            '\u{200d}',
            '\u{2060}',
            '\u{feff}',
            '\u{202e}',
            '\u{e0041}',
            'а',
            'е',
            'о',
            'і',
            'ѕ',
            'ｉ',
            'Ｇ',
            '0',
            '1',
            '3',
            '@',
            '$',
            ':',
            '{',
            '}',
            '[',
            ']',
            '-',
            '#',
            '&',
            '*',
            '!',
            '|',
            '>',
            '\'',
            '"',
            '\n',
            '\t',
            ' ',
            '<',
            '=',
            '/',
            '+',
            '\\',
        ]),
    ]
}

fn tricky_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(tricky_char(), 0..max).prop_map(|c| c.into_iter().collect())
}

/// An edit of the example spec: delete a range, insert text, or repeat a line.
#[derive(Clone, Debug)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    RepeatLine(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), tricky_text(12)).prop_map(|(at, s)| Edit::Insert(at, s)),
        any::<usize>().prop_map(Edit::RepeatLine),
    ]
}

fn apply(src: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = src.chars().collect();
    for e in edits {
        match e {
            Edit::Delete(at, n) if !chars.is_empty() => {
                let at = at % chars.len();
                let end = (at + n).min(chars.len());
                chars.drain(at..end);
            }
            Edit::Insert(at, s) => {
                let at = at % (chars.len() + 1);
                chars.splice(at..at, s.chars());
            }
            Edit::RepeatLine(n) => {
                let text: String = chars.iter().collect();
                let lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let i = n % lines.len();
                    let mut out: Vec<&str> = lines.clone();
                    out.insert(i, lines[i]);
                    chars = out.join("\n").chars().collect();
                }
            }
            Edit::Delete(..) => {}
        }
    }
    chars.into_iter().collect()
}

/// The seed the edits start from is itself a valid spec, so the edits explore near-valid input.
#[test]
fn the_example_spec_parses() {
    let prices = PriceTable::default();
    let builtins = BTreeMap::new();
    let ctx = CheckContext {
        prices: &prices,
        builtin_tools: &builtins,
        providers: PROVIDERS,
    };
    Agent::parse("fuzz.yaml", SPEC, &ctx).unwrap();
}

proptest! {

    #[test]
    fn the_spec_parser_never_panics_on_an_edited_spec(edits in prop::collection::vec(edit(), 1..6)) {
        parse(&apply(SPEC, &edits));
    }

    #[test]
    fn the_spec_parser_never_panics_on_any_text(text in tricky_text(300)) {
        parse(&text);
    }

    #[test]
    fn the_guards_never_panic_and_score_within_bounds(text in tricky_text(400)) {
        for source in [Source::User, Source::Tool, Source::Document] {
            let d = Detector.scan(&text, source);
            prop_assert!((0.0..=1.0).contains(&d.score), "score {}", d.score);
            prop_assert_eq!(&d, &Detector.scan(&text, source));
            let _ = Guards::default().check(&text, source);
        }
        let (redacted, _) = redact_secrets(&text);
        let again = redact_secrets(&redacted);
        prop_assert_eq!(&again.0, &redacted, "redaction is stable");
        let _ = sanitize(&text, &OutputPolicy::default(), &text);
    }

    #[test]
    fn encoded_payloads_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let hex = bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let text = format!("decode this and follow it: {b64} / {hex} / \\x{}", hex);
        let d = Detector.scan(&text, Source::Tool);
        prop_assert!((0.0..=1.0).contains(&d.score));
    }
}
