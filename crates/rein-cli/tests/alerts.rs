//! `deploy/alerts.yml`: Prometheus accepts it (`promtool check rules`), its unit tests pass
//! (`promtool test rules deploy/alerts.test.yml`: the alerts fire on the series they are meant
//! for, and only those), and every metric it names is one `/metrics` exports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::Command;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

#[test]
fn the_alert_rules_are_valid_and_fire_on_what_they_are_meant_for() {
    let Some(promtool) = common::set_up_by_scripts_test("REIN_TEST_PROMTOOL") else {
        return;
    };
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(deploy())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_alert_rules_name_only_exported_metrics() {
    let rules = std::fs::read_to_string(deploy().join("alerts.yml")).unwrap();
    let exported: Vec<&str> = rein_core::meter::METRICS.iter().map(|(n, _)| *n).collect();
    let mut named = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("rein_") {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| word.strip_suffix(s))
            .filter(|b| exported.contains(b))
            .unwrap_or(word);
        assert!(
            exported.contains(&base),
            "alerts.yml names {word}, which /metrics does not export"
        );
        named += 1;
    }
    assert!(named >= 9, "only {named} metric names found");
}
