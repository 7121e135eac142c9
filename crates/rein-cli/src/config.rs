//! `rein.toml`: operator configuration. Today it holds price overrides.
//!
//! ```toml
//! [prices."openai/my-finetune"]   # USD per million tokens
//! input = 0.30
//! cached_input = 0.15             # defaults to `input`
//! output = 1.20
//! ```

use anyhow::{Context, anyhow};
use rein_core::{Price, PriceTable};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    prices: BTreeMap<String, PriceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    input: f64,
    #[serde(default)]
    cached_input: Option<f64>,
    output: f64,
}

/// The loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Built-in prices with the file's overrides applied.
    pub prices: PriceTable,
}

/// Loads `path` if given, else `./rein.toml` if it exists, else the defaults.
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from("rein.toml"), false),
    };
    let mut prices = PriceTable::default();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Config { prices });
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read config file {}", path.display()));
        }
    };
    let file: ConfigFile = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for (model, entry) in file.prices {
        let price = Price::per_million(entry.input, entry.cached_input.unwrap_or(entry.input), entry.output)
            .ok_or_else(|| {
                anyhow!(
                    "{}: prices.\"{model}\": prices must be non-negative USD per million tokens with at most 6 decimals",
                    path.display()
                )
            })?;
        prices.set(model, price);
    }
    Ok(Config { prices })
}
