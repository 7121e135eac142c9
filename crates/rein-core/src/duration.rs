//! Durations as written in specs: `500ms`, `5s`, `2m`, `1h`.

use std::time::Duration;

/// Parses a spec duration. A bare number is refused: the unit must be explicit so that
/// `timeout: 60` is never silently read as 60 ms or 60 minutes.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(rein_core::parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert!(rein_core::parse_duration("60").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{text}` has no unit; write e.g. `500ms`, `5s`, `2m` or `1h`"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    let millis_per_unit = match unit {
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        other => {
            return Err(format!(
                "`{other}` is not a duration unit; use `ms`, `s`, `m` or `h`"
            ));
        }
    };
    let millis = value * millis_per_unit;
    if !(millis.is_finite() && millis > 0.0 && millis <= 7.0 * 86_400_000.0) {
        return Err(format!("`{text}` must be more than 0 and at most 7 days"));
    }
    Ok(Duration::from_millis(millis.round() as u64))
}

/// [`parse_duration`], zero (`0s`, `0ms`, ...) allowed too: for settings where zero means none
/// or off.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(rein_core::duration::parse_duration_or_zero("0s"), Ok(Duration::ZERO));
/// assert!(rein_core::duration::parse_duration_or_zero("0").is_err());
/// ```
pub fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let number = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if number.len() < text.len() && number.parse::<f64>() == Ok(0.0) {
        // The unit is checked as it would be for any other number.
        return parse_duration(&format!("1{}", &text[number.len()..])).map(|_| Duration::ZERO);
    }
    parse_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_read_where_it_is_allowed() {
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0.0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration_or_zero("0").is_err());
        assert!(parse_duration_or_zero("0parsecs").is_err());
    }

    #[test]
    fn units_are_read() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(parse_duration("60").unwrap_err().contains("no unit"));
        assert!(
            parse_duration("5 parsecs")
                .unwrap_err()
                .contains("not a duration unit")
        );
        assert!(parse_duration("0s").unwrap_err().contains("more than 0"));
        assert!(parse_duration("s").unwrap_err().contains("number"));
    }
}
