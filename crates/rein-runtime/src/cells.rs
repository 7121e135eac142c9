//! Shared state updated by compare-and-swap: the one way breakers and rate limiters change
//! their stored state, so racing processes never lose an update.

use rein_core::budget::{Counters, CountersError};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Compare-and-swap attempts before giving up on a contended cell.
const MAX_SWAPS: usize = 32;

/// Applies `step` to the cell's state until a compare-and-swap lands (or nothing changes);
/// returns `step`'s decision and the state it left.
pub(crate) async fn update<S, T>(
    counters: &dyn Counters,
    key: &str,
    step: impl Fn(&S) -> (T, S),
) -> Result<(T, S), CountersError>
where
    S: Serialize + DeserializeOwned + Default + PartialEq,
{
    for _ in 0..MAX_SWAPS {
        let raw = counters.cell(key).await?;
        let current: S = raw
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or_default();
        let (decision, next) = step(&current);
        if next == current {
            return Ok((decision, next));
        }
        let encoded = serde_json::to_string(&next).map_err(|e| CountersError(e.to_string()))?;
        if counters.swap_cell(key, raw.as_deref(), &encoded).await? {
            return Ok((decision, next));
        }
    }
    Err(CountersError(format!("{key} is too contended to update")))
}
