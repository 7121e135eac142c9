//! The injection detector: every rule over every view of a text, scored.

use super::rules::*;
use super::views::*;
use super::*;
use std::collections::BTreeMap;

/// The detector.
#[derive(Clone, Copy, Debug, Default)]
pub struct Detector;

impl Detector {
    /// Scans one text that came from `source`.
    pub fn scan(&self, text: &str, source: Source) -> Detection {
        let rules: Vec<&Rule> = COMPILED
            .iter()
            .filter(|r| source != Source::User || !r.indirect_only)
            .collect();
        let mut hits: BTreeMap<&'static str, RuleHit> = BTreeMap::new();
        let mut record = |name: &'static str, weight: f64, view: &str, excerpt: &str| {
            hits.entry(name).or_insert_with(|| RuleHit {
                rule: name.to_string(),
                weight,
                view: view.to_string(),
                excerpt: excerpt.chars().take(80).collect(),
            });
        };

        let norm = normalise(text);
        if norm.disguised {
            record(
                "disguise.invisible_or_lookalike",
                DISGUISE_WEIGHT,
                "text",
                "",
            );
        }
        let mut views: Vec<(&str, String)> = vec![("normalised", norm.text.clone())];
        if let Some(spaced) = join_spaced_letters(text) {
            views.push(("spaced", normalise(&spaced).text));
        }
        if let Some(leet) = unleet(&norm.text) {
            views.push(("leet", leet));
        }
        let mut hidden_views: Vec<(&str, String)> = Vec::new();
        for hidden in hidden_segments(text) {
            hidden_views.push(("hidden", normalise(&hidden).text));
        }
        for decoded in decoded_payloads(text) {
            hidden_views.push((decoded.0, normalise(&decoded.1).text));
        }
        hidden_views.push(("rot13", rot13(&norm.text)));
        hidden_views.push(("reversed", norm.text.chars().rev().collect()));

        for (view, body) in &views {
            for rule in &rules {
                if let Some(m) = rule.pattern.find(body) {
                    record(rule.name, rule.weight, view, m.as_str());
                }
            }
        }
        for (view, body) in &hidden_views {
            let mut found = false;
            for rule in &rules {
                if let Some(m) = rule.pattern.find(body) {
                    found = true;
                    record(rule.name, rule.weight, view, m.as_str());
                }
            }
            if found {
                let name = if *view == "hidden" {
                    "hidden.instructions"
                } else {
                    "obfuscation.encoded_instructions"
                };
                record(name, OBFUSCATED_WEIGHT, view, "");
            }
        }

        let mut rules: Vec<RuleHit> = hits.into_values().collect();
        rules.sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.rule.cmp(&b.rule)));
        let miss: f64 = rules.iter().map(|r| 1.0 - r.weight).product();
        let score = ((1.0 - miss) * 1000.0).round() / 1000.0;
        Detection { score, rules }
    }
}
