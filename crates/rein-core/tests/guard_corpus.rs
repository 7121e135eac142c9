//! The injection detector against Rein's adversarial corpus (`tests/guard-corpus`): attacks
//! (direct, indirect through tool results and documents, obfuscated, exfiltration, tool
//! coercion) and benign texts that look like them (support tickets quoting instructions, code,
//! base64 data, security articles). Fails below 95% detection or above 3% false positives.

#![allow(clippy::panic)]
// The corpus is read from files; the core itself never reads one.
#![allow(clippy::disallowed_methods)]

use rein_core::guard::{DEFAULT_THRESHOLD, Detector, Source};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Case {
    id: String,
    source: Source,
    category: String,
    text: String,
}

fn load(name: &str) -> Vec<Case> {
    let path = format!("{}/tests/guard-corpus/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path}:{}: {e}", i + 1)))
        .collect()
}

/// Per category: (cases, detected), printed as a table.
fn report(title: &str, cases: &[Case], detected: &[bool]) {
    let mut by: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (case, hit) in cases.iter().zip(detected) {
        let e = by.entry(case.category.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(*hit);
    }
    eprintln!("{title}");
    for (category, (n, hit)) in by {
        eprintln!("  {category:<28} {hit:>3} / {n:<3} detected");
    }
}

/// Detection and false-positive rates over an attack and a benign file, with every miss and
/// false positive printed.
fn rates(attack_file: &str, benign_file: &str) -> (f64, f64) {
    let attacks = load(attack_file);
    let benign = load(benign_file);
    for source in [Source::User, Source::Tool, Source::Document] {
        assert!(
            attacks.iter().any(|c| c.source == source),
            "no attack from {source:?} in {attack_file}"
        );
    }

    let detector = Detector;
    let hit = |c: &Case| detector.scan(&c.text, c.source).detected(DEFAULT_THRESHOLD);
    let attack_hits: Vec<bool> = attacks.iter().map(hit).collect();
    let benign_hits: Vec<bool> = benign.iter().map(hit).collect();
    report("attacks", &attacks, &attack_hits);
    report("benign (false positives)", &benign, &benign_hits);
    for (case, _) in attacks.iter().zip(&attack_hits).filter(|(_, h)| !**h) {
        let d = detector.scan(&case.text, case.source);
        eprintln!("missed {} ({}): score {}", case.id, case.category, d.score);
    }
    for (case, _) in benign.iter().zip(&benign_hits).filter(|(_, h)| **h) {
        let d = detector.scan(&case.text, case.source);
        eprintln!(
            "false positive {} ({}): score {} {:?}",
            case.id,
            case.category,
            d.score,
            d.rule_names()
        );
    }

    let detected = attack_hits.iter().filter(|h| **h).count() as f64 / attacks.len() as f64;
    let false_pos = benign_hits.iter().filter(|h| **h).count() as f64 / benign.len() as f64;
    eprintln!(
        "{attack_file}/{benign_file}: detection rate {:.1}% of {}, false-positive rate {:.1}% of {}",
        detected * 100.0,
        attacks.len(),
        false_pos * 100.0,
        benign.len()
    );
    (detected, false_pos)
}

#[test]
fn detector_meets_its_rates_on_the_corpus() {
    assert!(
        load("attack.jsonl").len() >= 150,
        "the corpus needs 150 attacks"
    );
    assert!(
        load("benign.jsonl").len() >= 150,
        "the corpus needs 150 benign texts"
    );
    let (detected, false_pos) = rates("attack.jsonl", "benign.jsonl");
    assert!(
        detected >= 0.95,
        "detection rate {detected:.3} is below 0.95"
    );
    assert!(
        false_pos <= 0.03,
        "false-positive rate {false_pos:.3} is above 0.03"
    );
}

/// The held-out files were written apart from the detector and never used to tune it: their
/// rates are the honest estimate of how it does on text it has not seen. The floor here only
/// catches a regression; the rates are printed for the record.
#[test]
fn detector_rates_on_the_held_out_corpus() {
    let (detected, false_pos) = rates("holdout-attack.jsonl", "holdout-benign.jsonl");
    // Measured when they were written (2026-11-27): 53.8% detected, 6.2% false positives.
    assert!(
        detected >= 0.50,
        "held-out detection rate {detected:.3} fell below 0.50"
    );
    assert!(
        false_pos <= 0.10,
        "held-out false-positive rate {false_pos:.3} rose above 0.10"
    );
}
