//! The price table: turns token usage into cost on every step.
//!
//! A cost cap on a model whose price is unknown would mean nothing, so an unpriced model is
//! refused at `rein check` (see [`crate::spec::check`]) instead of being treated as free.

use crate::Usd;
use crate::message::Usage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What one model costs, in micro-dollars per million tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    /// Uncached input (prompt) tokens.
    pub input: Usd,
    /// Input tokens served from the provider's prompt cache.
    pub cached_input: Usd,
    /// Output (completion) tokens.
    pub output: Usd,
    /// Input tokens written into the prompt cache (Anthropic: 1.25 times `input`; OpenAI bills
    /// no separate write, so it equals `input`).
    pub cache_write: Usd,
}

impl Price {
    /// A price from dollars per million tokens, as providers publish them.
    pub fn per_million(input: f64, cached_input: f64, output: f64) -> Option<Price> {
        Some(Price {
            input: Usd::from_dollars(input)?,
            cached_input: Usd::from_dollars(cached_input)?,
            output: Usd::from_dollars(output)?,
            cache_write: Usd::from_dollars(input)?,
        })
    }

    /// The same price with cache writes at `cache_write` dollars per million tokens.
    pub fn with_cache_write(mut self, cache_write: f64) -> Option<Price> {
        self.cache_write = Usd::from_dollars(cache_write)?;
        Some(self)
    }

    /// The cost of `usage`, rounded up to the next micro-dollar so that caps err on the safe side.
    pub fn cost(&self, usage: &Usage) -> Usd {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let written = usage.cache_write_tokens.min(usage.input_tokens - cached);
        let uncached = usage.input_tokens - cached - written;
        let per_million = u128::from(uncached) * self.input.micros().max(0) as u128
            + u128::from(cached) * self.cached_input.micros().max(0) as u128
            + u128::from(written) * self.cache_write.micros().max(0) as u128
            + u128::from(usage.output_tokens) * self.output.micros().max(0) as u128;
        let micros = per_million.div_ceil(1_000_000);
        Usd::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }
}

/// Prices by `provider/model` name: built-in defaults, overridable from configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceTable {
    prices: BTreeMap<String, Price>,
}

/// Built-in list prices (USD per million tokens: input, cached input, output), as published
/// by the providers in 2026. Override them in `rein.toml` under `[prices]` when yours differ.
const DEFAULT_PRICES: &[(&str, f64, f64, f64)] = &[
    ("openai/gpt-4o", 2.50, 1.25, 10.00),
    ("openai/gpt-4o-mini", 0.15, 0.075, 0.60),
    ("openai/gpt-4.1", 2.00, 0.50, 8.00),
    ("openai/gpt-4.1-mini", 0.40, 0.10, 1.60),
    ("openai/gpt-4.1-nano", 0.10, 0.025, 0.40),
    ("openai/o4-mini", 1.10, 0.275, 4.40),
    ("openai/gpt-5", 1.25, 0.125, 10.00),
    ("openai/gpt-5-mini", 0.25, 0.025, 2.00),
    ("openai/gpt-5-nano", 0.05, 0.005, 0.40),
    ("anthropic/claude-opus-4-5", 5.00, 0.50, 25.00),
    ("anthropic/claude-sonnet-4-5", 3.00, 0.30, 15.00),
    ("anthropic/claude-haiku-4-5", 1.00, 0.10, 5.00),
];

impl Default for PriceTable {
    fn default() -> Self {
        let prices = DEFAULT_PRICES
            .iter()
            .filter_map(|&(name, input, cached, output)| {
                // Anthropic bills prompt-cache writes at 1.25 times the input price.
                let write = if name.starts_with("anthropic/") {
                    input * 1.25
                } else {
                    input
                };
                Price::per_million(input, cached, output)
                    .and_then(|p| p.with_cache_write(write))
                    .map(|p| (name.to_string(), p))
            })
            .collect();
        PriceTable { prices }
    }
}

impl PriceTable {
    /// A table with no prices at all (every model is unpriced).
    pub fn empty() -> Self {
        PriceTable {
            prices: BTreeMap::new(),
        }
    }

    /// Sets or replaces the price of `model` (`provider/model`).
    pub fn set(&mut self, model: impl Into<String>, price: Price) {
        self.prices.insert(model.into(), price);
    }

    /// The price of `model`, if known.
    pub fn get(&self, model: &str) -> Option<&Price> {
        self.prices.get(model)
    }

    /// All priced models, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &Price)> {
        self.prices.iter().map(|(k, v)| (k.as_str(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_4o_mini_costs_what_openai_charges() {
        let table = PriceTable::default();
        let price = table.get("openai/gpt-4o-mini").unwrap();
        let usage = Usage {
            input_tokens: 1_000_000,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 1_000_000,
        };
        assert_eq!(price.cost(&usage), Usd::from_dollars(0.75).unwrap());
    }

    #[test]
    fn anthropic_cache_reads_and_writes_are_priced_at_their_own_rates() {
        let table = PriceTable::default();
        let sonnet = table.get("anthropic/claude-sonnet-4-5").unwrap();
        // 1,000 plain input at $3/M, 2,000 read at $0.30/M, 4,000 written at $3.75/M, 100 out at $15/M.
        let usage = Usage {
            input_tokens: 7_000,
            cached_input_tokens: 2_000,
            cache_write_tokens: 4_000,
            output_tokens: 100,
        };
        assert_eq!(sonnet.cost(&usage).micros(), 3_000 + 600 + 15_000 + 1_500);
    }

    #[test]
    fn cached_tokens_are_priced_separately_and_costs_round_up() {
        let price = Price::per_million(1.0, 0.1, 2.0).unwrap();
        let usage = Usage {
            input_tokens: 1000,
            cached_input_tokens: 400,
            cache_write_tokens: 0,
            output_tokens: 1,
        };
        // 600 * 1.0 + 400 * 0.1 + 1 * 2.0 = 642 dollars per million = 642 micro-dollars
        assert_eq!(price.cost(&usage).micros(), 642);
        let tiny = Usage {
            input_tokens: 1,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 0,
        };
        assert_eq!(
            price.cost(&tiny).micros(),
            1,
            "a fraction of a micro-dollar rounds up"
        );
    }
}
