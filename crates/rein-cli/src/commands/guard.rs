//! `rein guard scan`: text scanned by the injection detector the runtime uses.

use crate::ConfigArgs;
use crate::exit;
use anyhow::anyhow;
use clap::Subcommand;
use rein_app::Error::BadInput;
use rein_app::config;
use rein_app::wiring::{parse_agent, read_file};
use rein_tools::Builtins;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(crate) enum GuardCommand {
    /// Read text on stdin and print the verdict (`allow`, `flag`, `fence` or `block`), the
    /// score and the matched rules. Exit 0 for allow, 1 otherwise.
    Scan {
        /// Where the text would come from; picks the policy.
        #[arg(long, value_enum, default_value = "user")]
        source: GuardSource,
        /// Apply this agent's `guards` (policy and threshold) instead of the defaults.
        #[arg(long)]
        spec: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum GuardSource {
    User,
    Tool,
    Document,
}

/// `rein guard scan`: the runtime's own check (`Guards::check`) on stdin.
pub(crate) fn guard_scan(
    source: GuardSource,
    spec: Option<&Path>,
    json: bool,
    config: &ConfigArgs,
) -> anyhow::Result<u8> {
    use rein_core::guard::{Guards, Source, Verdict};
    use std::io::Read as _;
    let guards = match spec {
        None => Guards::default(),
        Some(spec) => {
            let config = config::load(config.config.as_deref())?;
            let file = spec.display().to_string();
            parse_agent(&file, &read_file(spec)?, &config, &Builtins::standard())?
                .spec
                .guards
                .clone()
        }
    };
    let source = match source {
        GuardSource::User => Source::User,
        GuardSource::Tool => Source::Tool,
        GuardSource::Document => Source::Document,
    };
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| anyhow!(BadInput(format!("stdin is not readable UTF-8 text: {e}"))))?;
    let (verdict, detection) = guards.check(&text, source);
    // `escalate` keeps the text from the model like `block`; it is shown as `block` with the
    // action named, so the four verdicts stay the interface.
    let shown = if verdict == Verdict::Escalate {
        Verdict::Block
    } else {
        verdict
    };
    if json {
        say!(
            "{}",
            serde_json::json!({
                "verdict": shown.as_str(),
                "escalate": verdict == Verdict::Escalate,
                "source": source.as_str(),
                "policy": guards.policy(source).as_str(),
                "score": detection.score,
                "threshold": guards.threshold,
                "rules": detection.rules,
            })
        );
    } else {
        let action = if verdict == Verdict::Escalate {
            " (escalate to a person)"
        } else {
            ""
        };
        say!("verdict: {}{action}", shown.as_str());
        say!(
            "score: {} (threshold {}, policy for {}: {})",
            detection.score,
            guards.threshold,
            source.as_str(),
            guards.policy(source).as_str()
        );
        for r in &detection.rules {
            say!(
                "rule: {} ({}, in {}): {:?}",
                r.rule,
                r.weight,
                r.view,
                r.excerpt
            );
        }
    }
    Ok(if verdict == Verdict::Allow {
        exit::OK
    } else {
        exit::NOT_ALLOWED
    })
}
