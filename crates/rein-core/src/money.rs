//! Money as integer micro-dollars: sums of many small costs stay exact.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, AddAssign, Sub};

/// An amount in US dollars, stored as whole micro-dollars (1 USD = 1,000,000).
///
/// ```
/// use rein_core::Usd;
/// let cap = Usd::from_dollars(0.5).unwrap();
/// assert_eq!(cap.micros(), 500_000);
/// assert_eq!(cap.to_string(), "$0.500000");
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Usd(i64);

impl Usd {
    /// Zero dollars.
    pub const ZERO: Usd = Usd(0);

    /// An amount of micro-dollars.
    pub const fn from_micros(micros: i64) -> Self {
        Usd(micros)
    }

    /// Converts a dollar amount as written in a spec or config (e.g. `0.50`).
    ///
    /// Returns `None` for negative, non-finite or absurdly large amounts, or amounts
    /// finer than a micro-dollar.
    pub fn from_dollars(dollars: f64) -> Option<Self> {
        if !dollars.is_finite() || !(0.0..=1e9).contains(&dollars) {
            return None;
        }
        let micros = (dollars * 1e6).round();
        // More than six decimals cannot be represented; refuse instead of silently rounding a cap.
        if ((micros / 1e6) - dollars).abs() > 1e-9 {
            return None;
        }
        Some(Usd(micros as i64))
    }

    /// The amount in micro-dollars.
    pub const fn micros(self) -> i64 {
        self.0
    }

    /// The amount in dollars, for display and JSON output only (never for sums).
    pub fn as_dollars(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// `self - other`, never below zero.
    pub fn saturating_sub(self, other: Usd) -> Usd {
        Usd((self.0 - other.0).max(0))
    }
}

impl Add for Usd {
    type Output = Usd;
    fn add(self, rhs: Usd) -> Usd {
        Usd(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Usd {
    fn add_assign(&mut self, rhs: Usd) {
        *self = *self + rhs;
    }
}

impl Sub for Usd {
    type Output = Usd;
    fn sub(self, rhs: Usd) -> Usd {
        Usd(self.0.saturating_sub(rhs.0))
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_convert_exactly_to_micros() {
        assert_eq!(Usd::from_dollars(0.15).unwrap().micros(), 150_000);
        assert_eq!(Usd::from_dollars(0.000001).unwrap().micros(), 1);
        assert_eq!(Usd::from_dollars(12.0).unwrap().micros(), 12_000_000);
    }

    #[test]
    fn negative_and_sub_micro_amounts_are_refused() {
        assert!(Usd::from_dollars(-1.0).is_none());
        assert!(Usd::from_dollars(0.0000001).is_none());
        assert!(Usd::from_dollars(f64::NAN).is_none());
    }

    #[test]
    fn display_shows_six_decimals() {
        assert_eq!(Usd::from_micros(1_234_567).to_string(), "$1.234567");
        assert_eq!(Usd::from_micros(42).to_string(), "$0.000042");
    }
}
