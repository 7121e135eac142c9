//! Helpers shared by the tests that run the `rein` binary.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

/// `rein` in `dir`, cut off from the caller's provider and store settings.
pub fn rein_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rein"));
    command
        .current_dir(dir)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("REIN_DB")
        .env_remove("REIN_CONFIG");
    command
}

/// Runs `rein args` in `dir` to the end.
pub fn rein(dir: &Path, args: &[&str]) -> Output {
    rein_command(dir).args(args).output().unwrap()
}

/// An agent whose one tool, `pay`, makes a payment at the tool service `url`, which takes
/// `apply_ms` to apply it once per idempotency key.
pub fn payer_spec(url: &str, apply_ms: u32, max_iterations: u32) -> String {
    format!(
        r#"
name: payer
version: 1
model: {{primary: openai/gpt-4o-mini}}
instructions: Pay.
tools:
  - name: pay
    description: Makes a payment.
    input_schema: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    source: {{http: {{url: "{url}/apply?ms={apply_ms}", method: POST}}}}
    contract: {{timeout: 5s, side_effects: external}}
limits: {{max_iterations: {max_iterations}, max_total_tokens: 20000, max_cost_usd: 0.10}}
"#
    )
}
