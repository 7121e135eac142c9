//! The dashboard's pictures, drawn on the server as plain HTML and SVG (no script): a run's
//! trace as a waterfall, and spend by day as a column chart.

use rein_core::spans::{Span, Value};
use rein_store::CostLine;
use serde::Serialize;
use std::collections::HashMap;

/// One span of a run's trace as a bar on the run's time axis.
#[derive(Debug, Serialize)]
pub(super) struct WaterfallRow {
    /// The span's name (`chat openai/gpt-4o-mini`, `execute_tool lookup`), indented by depth.
    name: String,
    depth: usize,
    /// Where the bar starts and how wide it is, in percent of the run's duration.
    offset: f64,
    width: f64,
    /// Its duration, in ms.
    ms: i64,
    /// Its tokens (input and output) and cost, where it is a model call.
    tokens: Option<i64>,
    cost: Option<String>,
    /// `ok` or `error`.
    status: &'static str,
}

/// The waterfall of `spans` (one run's trace): every span in start order, nested under its
/// parent, its bar placed on the run's time axis.
pub(super) fn waterfall(spans: &[Span]) -> Vec<WaterfallRow> {
    let Some(start) = spans.iter().map(|s| s.start_ms).min() else {
        return Vec::new();
    };
    let end = spans.iter().map(|s| s.end_ms).max().unwrap_or(start);
    let total = end.saturating_sub(start).max(1) as f64;
    // Each span's depth under the run's span, computed once (a chain longer than the spans, a
    // cycle, cannot be: it stops there).
    let parents: HashMap<[u8; 8], Option<[u8; 8]>> =
        spans.iter().map(|s| (s.span_id, s.parent)).collect();
    let depth_of = |span: &Span| {
        let mut depth = 0;
        let mut parent = span.parent;
        while let Some(up) = parent.and_then(|id| parents.get(&id)) {
            if depth >= spans.len() {
                break;
            }
            depth += 1;
            parent = *up;
        }
        depth
    };
    let depths: HashMap<[u8; 8], usize> = spans.iter().map(|s| (s.span_id, depth_of(s))).collect();
    let depth = |span: &Span| depths.get(&span.span_id).copied().unwrap_or(0);
    let mut ordered: Vec<&Span> = spans.iter().collect();
    ordered.sort_by_key(|s| (s.start_ms, depth(s)));
    ordered
        .into_iter()
        .map(|span| {
            let int = |key: &str| match span.attribute(key) {
                Some(Value::Int(n)) => Some(*n),
                _ => None,
            };
            let tokens = match (
                int("gen_ai.usage.input_tokens"),
                int("gen_ai.usage.output_tokens"),
            ) {
                (None, None) => None,
                (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
            };
            let offset = span.start_ms.saturating_sub(start) as f64 / total * 100.0;
            WaterfallRow {
                name: span.name.clone(),
                depth: depth(span),
                offset: round(offset),
                // Wide enough to see, and never past the axis's end.
                width: round(
                    (span.end_ms.saturating_sub(span.start_ms) as f64 / total * 100.0)
                        .max(0.4)
                        .min((100.0 - offset).max(0.0)),
                ),
                ms: span.end_ms.saturating_sub(span.start_ms),
                tokens,
                cost: match span.attribute("rein.cost_usd") {
                    Some(Value::Float(usd)) => Some(format!("{usd:.6}")),
                    _ => None,
                },
                status: match span.status {
                    rein_core::spans::Status::Ok => "ok",
                    rein_core::spans::Status::Error(_) => "error",
                },
            }
        })
        .collect()
}

/// One day's column of the spend chart, in the chart's own units.
#[derive(Debug, Serialize)]
pub(super) struct Column {
    day: String,
    cost: String,
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

/// The spend chart's size.
pub(super) const CHART_WIDTH: u32 = 600;
pub(super) const CHART_HEIGHT: u32 = 120;

/// Spend by day (`lines` grouped by day, any order) as columns, oldest on the left: the last
/// `days` days that had any spend.
pub(super) fn spend_by_day(lines: &[CostLine], days: usize) -> Vec<Column> {
    let mut by_day: Vec<&CostLine> = lines.iter().collect();
    by_day.sort_by(|a, b| a.key.cmp(&b.key));
    let shown = &by_day[by_day.len().saturating_sub(days)..];
    let most = shown
        .iter()
        .map(|l| l.cost.micros())
        .max()
        .unwrap_or(0)
        .max(1);
    let slot = CHART_WIDTH / u32::try_from(shown.len().max(1)).unwrap_or(1);
    // A column is at most 40 units wide, so a few days do not fill the chart with one block.
    let bar = (slot * 3 / 4).clamp(1, 40);
    shown
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let height = u32::try_from(line.cost.micros().max(0) * i64::from(CHART_HEIGHT) / most)
                .unwrap_or(0)
                .max(1);
            Column {
                day: line.key.clone(),
                cost: line.cost.to_string(),
                x: u32::try_from(i).unwrap_or(0) * slot + (slot - bar) / 2,
                y: CHART_HEIGHT - height,
                width: bar,
                height,
            }
        })
        .collect()
}

fn round(percent: f64) -> f64 {
    (percent * 100.0).round() / 100.0
}
