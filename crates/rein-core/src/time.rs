//! Formatting of timestamps. Time itself is never read here: callers pass it in.

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC, e.g. `2026-11-23T09:30:00.123Z`.
///
/// ```
/// assert_eq!(rein_core::time::format_utc(0), "1970-01-01T00:00:00.000Z");
/// assert_eq!(rein_core::time::format_utc(1_795_426_200_123), "2026-11-23T09:30:00.123Z");
/// ```
pub fn format_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after Howard Hinnant's
/// published `civil_from_days` algorithm.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Milliseconds since the epoch at the start of a UTC day written `YYYY-MM-DD`; `None` for
/// anything else (including days that do not exist, such as `2026-02-30`).
pub fn parse_utc_day(day: &str) -> Option<i64> {
    let mut parts = day.split('-');
    let (y, m, d): (i64, i64, i64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's days_from_civil), the inverse of format_utc.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = days * 86_400_000;
    (format_utc(ms).get(..10) == Some(day)).then_some(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_days_parse_to_their_first_millisecond() {
        assert_eq!(parse_utc_day("1970-01-01"), Some(0));
        assert_eq!(
            parse_utc_day("2026-11-23").map(format_utc).as_deref(),
            Some("2026-11-23T00:00:00.000Z")
        );
        assert_eq!(
            parse_utc_day("2024-02-29").map(format_utc).as_deref(),
            Some("2024-02-29T00:00:00.000Z")
        );
        assert_eq!(parse_utc_day("2026-02-30"), None);
        assert_eq!(parse_utc_day("yesterday"), None);
    }

    #[test]
    fn leap_days_and_year_ends_format_correctly() {
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_utc(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
    }
}
