use super::*;

pub(crate) const EXAMPLE: &str = r#"name: order-support
version: 1
model:
  primary: openai/gpt-4o-mini
  max_output_tokens: 512
instructions: You answer questions about orders. Use the tools.
flow: react
tools:
  - name: get_order_status
    description: Look up an order by its numeric id.
    input_schema:
      type: object
      properties: {order_id: {type: string, pattern: "^[0-9]+$"}}
      required: [order_id]
      additionalProperties: false
    source:
      http: {url: "http://127.0.0.1:8089/orders/{order_id}", method: GET}
    contract: {timeout: 5s, idempotent: true, side_effects: none, max_calls_per_run: 3, retry: {max_attempts: 3}}
limits:
  max_iterations: 10
  max_total_tokens: 20000
  max_cost_usd: 0.50
  timeout: 60s
"#;

fn check(src: &str) -> Result<Agent, SpecErrors> {
    let prices = PriceTable::default();
    let builtins = BTreeMap::new();
    Agent::parse(
        "agent.yaml",
        src,
        &CheckContext {
            prices: &prices,
            builtin_tools: &builtins,
            providers: crate::spec::TEST_PROVIDERS,
        },
    )
}

#[test]
fn the_issue_example_is_accepted_as_written() {
    let agent = check(EXAMPLE).unwrap();
    let spec = &agent.spec;
    assert_eq!(spec.name, "order-support");
    assert_eq!(spec.model.max_output_tokens, 512);
    assert_eq!(spec.limits.max_cost_usd, Usd::from_micros(500_000));
    assert_eq!(spec.limits.timeout, Duration::from_secs(60));
    assert_eq!(spec.limits.max_tool_calls, DEFAULT_MAX_TOOL_CALLS);
    let tool = &spec.tools[0];
    assert_eq!(tool.contract.timeout, Duration::from_secs(5));
    assert_eq!(tool.contract.max_calls_per_run, Some(3));
    assert!(tool.contract.may_retry());
    assert!(matches!(&tool.source, ToolSource::Http(h) if h.method == HttpMethod::Get));
}

#[test]
fn missing_cost_cap_is_rejected_naming_the_field() {
    let src = EXAMPLE.replace("  max_cost_usd: 0.50\n", "");
    let err = check(&src).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(
            "agent.yaml:20:3: limits.max_cost_usd: missing required field `max_cost_usd`"
        ),
        "{text}"
    );
}

#[test]
fn every_problem_is_reported_with_line_and_field() {
    let src = EXAMPLE
        .replace("flow: react", "flow: react\ncolour: blue")
        .replace("timeout: 5s", "timeout: 5 parsecs")
        .replace("max_iterations: 10", "max_iterations: ten")
        .replace("type: string, pattern", "type: strng, pattern");
    let err = check(&src).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.diagnostics.len(), 4, "{text}");
    assert!(
        text.contains("agent.yaml:8:1: colour: unknown field `colour`"),
        "{text}"
    );
    assert!(
        text.contains("tools[0].input_schema: invalid JSON Schema"),
        "{text}"
    );
    assert!(
        text.contains("tools[0].contract.timeout: bad duration"),
        "{text}"
    );
    assert!(
        text.contains("limits.max_iterations: expected an integer, found a string"),
        "{text}"
    );
}

#[test]
fn duplicate_tool_names_point_at_the_first() {
    let tool = EXAMPLE
        .split("tools:\n")
        .nth(1)
        .unwrap()
        .split("limits:")
        .next()
        .unwrap();
    let src = EXAMPLE.replace("limits:", &format!("{tool}limits:"));
    let text = check(&src).unwrap_err().to_string();
    assert!(
        text.contains("duplicate tool name `get_order_status` (first defined at line 9)"),
        "{text}"
    );
}

#[test]
fn unpriced_models_are_refused() {
    let src = EXAMPLE.replace("gpt-4o-mini", "my-local-llama");
    let text = check(&src).unwrap_err().to_string();
    assert!(
        text.contains("no price is known for `openai/my-local-llama`"),
        "{text}"
    );
}

#[test]
fn every_fallback_must_be_a_priced_supported_model() {
    let src = EXAMPLE.replace(
        "max_output_tokens: 512",
        "max_output_tokens: 512\n  fallbacks: [openai/gpt-4o, openai/my-llama, cohere/command]",
    );
    let text = check(&src).unwrap_err().to_string();
    assert!(
        text.contains("model.fallbacks[1]: no price is known for `openai/my-llama`"),
        "{text}"
    );
    assert!(
        text.contains("model.fallbacks[2]: provider `cohere` is not supported"),
        "{text}"
    );
    let ok = check(&EXAMPLE.replace(
        "max_output_tokens: 512",
        "max_output_tokens: 512\n  fallbacks: [openai/gpt-4o]",
    ))
    .unwrap();
    let chain: Vec<&ModelRef> = ok.spec.model.chain().collect();
    assert_eq!(
        ok.worst_price(&chain).output,
        ok.prices["openai/gpt-4o"].output,
        "pre-flight uses the dearest model of the chain"
    );
}

fn check_with_price(src: &str, id: &str) -> Result<Agent, SpecErrors> {
    let mut prices = PriceTable::default();
    prices.set(id, crate::price::Price::default());
    let builtins = BTreeMap::new();
    Agent::parse(
        "agent.yaml",
        src,
        &CheckContext {
            prices: &prices,
            builtin_tools: &builtins,
            providers: crate::spec::TEST_PROVIDERS,
        },
    )
}

#[test]
fn a_compatible_server_is_a_map_entry_with_its_own_url_and_key_variable() {
    let src = EXAMPLE.replace(
            "primary: openai/gpt-4o-mini",
            "primary: {name: gemma3, provider: openai, base_url: \"http://127.0.0.1:8080/v1/\", api_key_env: LOCAL_LLM_KEY}",
        );
    let agent = check_with_price(&src, "openai/gemma3").unwrap();
    assert_eq!(
        agent.spec.model.primary,
        ModelRef {
            id: "openai/gemma3".into(),
            base_url: Some("http://127.0.0.1:8080/v1".into()),
            api_key_env: Some("LOCAL_LLM_KEY".into()),
        }
    );
    assert_eq!(agent.spec.model.primary.name(), "gemma3");
    assert_eq!(
        agent.spec.model.primary.endpoint_key(),
        "openai/gemma3@http://127.0.0.1:8080/v1"
    );
}

#[test]
fn a_map_entry_may_not_send_the_operators_keys_to_its_url() {
    for var in TEST_PROVIDERS.iter().map(|p| p.key_env) {
        let src = EXAMPLE.replace(
                "primary: openai/gpt-4o-mini",
                &format!("primary: {{name: gemma3, provider: openai, base_url: \"https://evil.example\", api_key_env: {var}}}"),
            );
        let text = check_with_price(&src, "openai/gemma3")
            .unwrap_err()
            .to_string();
        assert!(
                text.contains(&format!("model.primary.api_key_env: `{var}` is only sent to the endpoint the operator configured")),
                "{text}"
            );
    }
}

#[test]
fn a_bad_map_entry_names_each_field_at_fault() {
    let src = EXAMPLE.replace(
            "primary: openai/gpt-4o-mini",
            "primary: {name: gemma3, provider: ollama, base_url: \"ftp://x\", api_key_env: lower, port: 1}",
        );
    let text = check_with_price(&src, "openai/gemma3")
        .unwrap_err()
        .to_string();
    for expected in [
        "model.primary.port: unknown field",
        "model.primary.provider: `ollama` is not a wire format Rein speaks",
        "model.primary.base_url: must start with http:// or https://",
        "model.primary.api_key_env: `lower` is not an environment variable name",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in {text}");
    }
    let unpriced = EXAMPLE.replace(
        "primary: openai/gpt-4o-mini",
        "primary: {name: qwen, provider: openai, base_url: \"http://127.0.0.1:1/v1\"}",
    );
    let text = check(&unpriced).unwrap_err().to_string();
    assert!(
        text.contains("no price is known for `openai/qwen`"),
        "{text}"
    );
}

#[test]
fn routes_name_known_step_kinds_and_priced_models() {
    let src = EXAMPLE.replace(
        "max_output_tokens: 512",
        "max_output_tokens: 512\n  routes: {plan: openai/gpt-5, final: openai/gpt-4.1-nano}",
    );
    let agent = check(&src).unwrap();
    let ids = |kind| -> Vec<String> {
        agent
            .spec
            .model
            .step_chain(kind)
            .into_iter()
            .map(|m| m.id.clone())
            .collect()
    };
    assert_eq!(ids(StepKind::Plan), ["openai/gpt-5", "openai/gpt-4o-mini"]);
    assert_eq!(ids(StepKind::ToolCall), ["openai/gpt-4o-mini"]);
    let bad = EXAMPLE.replace(
        "max_output_tokens: 512",
        "max_output_tokens: 512\n  routes: {think: openai/gpt-5, final: openai/nope}",
    );
    let text = check(&bad).unwrap_err().to_string();
    assert!(text.contains("model.routes.think: unknown field"), "{text}");
    assert!(
        text.contains("model.routes.final: no price is known for `openai/nope`"),
        "{text}"
    );
}

#[test]
fn max_repairs_needs_an_output_schema_and_a_small_bound() {
    let text = check(&format!("{EXAMPLE}max_repairs: 3\n"))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("max_repairs: repairs are of answers that fail `output_schema`"),
        "{text}"
    );
    let schema = "output_schema: {type: object}\n";
    assert_eq!(
        check(&format!("{EXAMPLE}{schema}max_repairs: 3\n"))
            .unwrap()
            .spec
            .max_repairs,
        3
    );
    assert_eq!(
        check(&format!("{EXAMPLE}{schema}"))
            .unwrap()
            .spec
            .max_repairs,
        DEFAULT_MAX_REPAIRS
    );
    assert!(check(&format!("{EXAMPLE}{schema}max_repairs: 11\n")).is_err());
}

#[test]
fn approval_policy_and_rule_actions_are_checked() {
    let ok = check(&format!(
        "{EXAMPLE}approval: {{timeout: 2h, on_timeout: escalate, on_deny: end}}\n"
    ))
    .unwrap();
    assert_eq!(
        ok.spec.approval,
        ApprovalPolicy {
            min_confidence: None,
            timeout: Duration::from_secs(7200),
            on_timeout: OnTimeout::Escalate,
            on_deny: OnDeny::End,
        }
    );
    assert_eq!(check(EXAMPLE).unwrap().spec.approval, DEFAULT_APPROVAL);
    let bad = EXAMPLE.replace(
        "max_calls_per_run: 3,",
        "max_calls_per_run: 3, limits: {\"/order_id\": {max: 9, action: ask}},",
    );
    let text = check(&format!("{bad}approval: {{on_timeout: wait}}\n"))
        .unwrap_err()
        .to_string();
    assert!(text.contains("limits./order_id.action"), "{text}");
    assert!(text.contains("approval.on_timeout"), "{text}");
}

#[test]
fn escalation_names_known_triggers_and_low_confidence_needs_its_threshold() {
    let ok = check(&format!(
        "{EXAMPLE}escalation: {{on: [repeated_tool_failure, budget_warning]}}\n"
    ))
    .unwrap();
    assert!(ok.spec.escalation.on(EscalationTrigger::BudgetWarning));
    assert!(!ok.spec.escalation.on(EscalationTrigger::CircuitOpen));
    let text = check(&format!("{EXAMPLE}escalation: {{on: [tired]}}\n"))
        .unwrap_err()
        .to_string();
    assert!(text.contains("escalation.on[0]"), "{text}");
    let text = check(&format!("{EXAMPLE}escalation: {{on: [low_confidence]}}\n"))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("low_confidence needs `escalation.min_confidence`"),
        "{text}"
    );
}

#[test]
fn guards_are_read_with_secure_defaults_and_bad_values_are_named() {
    use crate::guard::{DataFlow, Policy, ResultTrust};
    let d = check(EXAMPLE).unwrap();
    assert_eq!(d.spec.guards, crate::guard::Guards::default());
    assert_eq!(d.spec.guards.tool_results, Policy::Fence);
    assert_eq!(d.spec.guards.data_flow, DataFlow::Approve);
    assert!(d.spec.guards.spotlight);
    assert_eq!(d.spec.tools[0].contract.results, ResultTrust::Untrusted);

    let ok = check(&format!(
            "{EXAMPLE}guards: {{input: block, documents: escalate, threshold: 0.7, spotlight: false, data_flow: refuse, allow_hosts: [API.Example.com]}}\n"
        ))
        .unwrap();
    let g = &ok.spec.guards;
    assert_eq!(
        (g.input, g.documents, g.tool_results),
        (Policy::Block, Policy::Escalate, Policy::Fence)
    );
    assert_eq!(
        (g.threshold, g.spotlight, g.data_flow),
        (0.7, false, DataFlow::Refuse)
    );
    assert_eq!(g.allow_hosts, vec!["api.example.com".to_string()]);

    let v6 = check(&format!(
        "{EXAMPLE}guards: {{allow_hosts: [\"::1\", \"[FE80:0:0:0:0:0:0:7]\", 10.0.0.7]}}\n"
    ))
    .unwrap();
    assert_eq!(v6.spec.guards.allow_hosts, ["::1", "fe80::7", "10.0.0.7"]);

    let text = check(&format!(
            "{EXAMPLE}guards: {{input: maybe, threshold: 2, allow_hosts: [\"http://x.example/\", \"x.example:443\", \"[::1\"], sentry: yes}}\n"
        ))
        .unwrap_err()
        .to_string();
    for needle in [
        "guards.input: `maybe` is not one of: off, flag, fence, block, escalate",
        "guards.threshold: must be above 0 and at most 1",
        "guards.allow_hosts[0]: `http://x.example/` is not a host name",
        "guards.allow_hosts[1]: `x.example:443` is not a host name",
        "guards.allow_hosts[2]: `[::1` is not a host name",
        "guards.sentry: unknown field `sentry`",
    ] {
        assert!(text.contains(needle), "missing {needle} in {text}");
    }

    use crate::sanitize::{Action, Pii};
    let out = check(&format!(
            "{EXAMPLE}guards: {{output: {{secrets: block, pii: [email, card], pii_action: block, internal_urls: off, prompt_leak_threshold: 0.8}}}}\n"
        ))
        .unwrap()
        .spec
        .guards
        .output;
    assert_eq!(
        (out.secrets, out.pii_action, out.internal_urls),
        (Action::Block, Action::Block, Action::Off)
    );
    assert_eq!(
        out.pii.into_iter().collect::<Vec<_>>(),
        vec![Pii::Email, Pii::Card]
    );
    assert_eq!(out.prompt_leak_threshold, 0.8);
    let text = check(&format!(
        "{EXAMPLE}guards: {{output: {{pii: [ssn], stack_traces: hide}}}}\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("guards.output.pii[0]: `ssn` is not one of: email, phone, card, national_id"),
        "{text}"
    );
    assert!(
        text.contains("guards.output.stack_traces: `hide` is not one of: off, redact, block"),
        "{text}"
    );

    use crate::guard::OnJudgeFail;
    let judge = check(&format!(
        "{EXAMPLE}guards: {{judge: {{rubric: Cites the order status., on_fail: approve}}}}\n"
    ))
    .unwrap()
    .spec
    .guards
    .judge
    .unwrap();
    assert_eq!(
        (judge.threshold, judge.on_fail, judge.max_repairs),
        (0.7, OnJudgeFail::Approve, 1)
    );
    let text = check(&format!("{EXAMPLE}guards: {{judge: {{threshold: 2}}}}\n"))
        .unwrap_err()
        .to_string();
    assert!(
        text.contains(
            "guards.judge.rubric: missing required field `rubric`: say what a good answer is"
        ),
        "{text}"
    );
    assert!(
        text.contains("guards.judge.threshold: must be between 0 and 1"),
        "{text}"
    );

    let guards = check(&format!("{EXAMPLE}guards: {{classifier: {{}}}}\n"))
        .unwrap()
        .spec
        .guards;
    assert_eq!(guards.classifier.map(|c| c.min_score), Some(0.25));
    let text = check(&format!(
        "{EXAMPLE}guards: {{classifier: {{min_score: -1, model: x}}}}\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("guards.classifier.min_score: must be between 0 and 1"),
        "{text}"
    );
    assert!(
        text.contains("guards.classifier.model: unknown field `model`"),
        "{text}"
    );
}

#[test]
fn the_model_breaker_policy_is_read_from_the_spec() {
    let src = EXAMPLE.replace(
        "max_output_tokens: 512",
        "max_output_tokens: 512\n  breaker: {failures: 2, window: 10s, cool_down: 5s}",
    );
    let policy = check(&src).unwrap().spec.model.breaker;
    assert_eq!(
        (policy.failures, policy.window_ms, policy.cool_down_ms),
        (2, 10_000, 5_000)
    );
    let bad = EXAMPLE.replace(
        "max_output_tokens: 512",
        "max_output_tokens: 512\n  breaker: {failures: 0}",
    );
    let text = check(&bad).unwrap_err().to_string();
    assert!(text.contains("model.breaker.failures"), "{text}");
}

#[test]
fn tool_choice_must_name_a_mode_or_one_of_the_agents_tools() {
    let ok = check(&EXAMPLE.replace(
        "max_output_tokens: 512",
        "max_output_tokens: 512\n  tool_choice: get_order_status",
    ))
    .unwrap();
    assert_eq!(
        ok.spec.model.tool_choice,
        Some(ToolChoice::Tool("get_order_status".into()))
    );
    let text = check(&EXAMPLE.replace(
        "max_output_tokens: 512",
        "max_output_tokens: 512\n  tool_choice: get_weather",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("model.tool_choice: `get_weather` is not `auto`, `required`, `none`"),
        "{text}"
    );
}

#[test]
fn url_placeholders_must_be_declared_arguments() {
    let src = EXAMPLE.replace("/orders/{order_id}", "/orders/{id}");
    let text = check(&src).unwrap_err().to_string();
    assert!(
        text.contains("placeholder `{id}` is not a property"),
        "{text}"
    );
}

#[test]
fn magnitude_rules_must_point_at_an_argument_and_be_satisfiable() {
    let src = EXAMPLE.replace(
        "max_calls_per_run: 3,",
        "max_calls_per_run: 3, limits: {\"/order_idd\": {max: 9}},",
    );
    let text = check(&src).unwrap_err().to_string();
    assert!(
        text.contains("`/order_idd` does not point into an argument"),
        "{text}"
    );
    let src = EXAMPLE.replace(
        "max_calls_per_run: 3,",
        "max_calls_per_run: 3, limits: {\"/order_id\": {min: 5, max: 1}},",
    );
    let text = check(&src).unwrap_err().to_string();
    assert!(text.contains("`min` (5) is above `max` (1)"), "{text}");
}

#[test]
fn magnitude_rules_need_a_pointer_and_a_bound() {
    let src = EXAMPLE.replace(
        "max_calls_per_run: 3,",
        "max_calls_per_run: 3, limits: {rows: {max: 1}, \"/n\": {}},",
    );
    let text = check(&src).unwrap_err().to_string();
    assert!(text.contains("`rows` is not a JSON pointer"), "{text}");
    assert!(text.contains("give `max`, `min` or both"), "{text}");
}

#[test]
fn bad_header_names_are_caught_at_check_time() {
    let src = EXAMPLE.replace("method: GET}", "method: GET, headers: {\"X Token\": abc}}");
    let text = check(&src).unwrap_err().to_string();
    assert!(
        text.contains("`X Token` is not a valid HTTP header name"),
        "{text}"
    );
}

#[test]
fn yaml_syntax_errors_have_a_line() {
    let text = check("name: [unclosed\nversion: 1\n")
        .unwrap_err()
        .to_string();
    assert!(text.starts_with("agent.yaml:"), "{text}");
    assert!(text.contains("invalid YAML"), "{text}");
}

#[test]
fn allow_listed_hosts_are_matched_by_host_alone() {
    use crate::guard::Guards;
    let http = |url: &str| {
        ToolSource::Http(HttpSource {
            url: url.into(),
            method: HttpMethod::Post,
            headers: Default::default(),
        })
    };
    let guards = Guards {
        allow_hosts: vec!["api.example.com".into(), "::1".into()],
        ..Guards::default()
    };
    assert!(guards.allows_host_of(&http("https://API.example.com:8443/mail/{to}")));
    assert!(guards.allows_host_of(&http("http://user@api.example.com/x")));
    assert!(guards.allows_host_of(&http("http://[::1]:9000/send")));
    assert!(guards.allows_host_of(&http("http://[0:0:0:0:0:0:0:1]/send")));
    assert!(!guards.allows_host_of(&http("http://[::2]/send")));
    assert!(!guards.allows_host_of(&http("https://api.example.com.evil.test/x")));
    assert!(!guards.allows_host_of(&http("https://evil.test/?h=api.example.com")));
    assert!(!guards.allows_host_of(&ToolSource::Builtin("echo".into())));
}
