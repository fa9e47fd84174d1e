//! Unix timestamps for people: UTC dates and "in 23h59m" (no date crate for two functions).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2026-11-30T02:34:21Z` (the days-to-civil conversion of H. Hinnant's `chrono`-compatible
/// algorithms).
pub fn utc(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(i64::MAX);
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

/// How long until `unix`: `in 23h59m`, `in 45s`, `EXPIRED 3m ago`.
pub fn until(unix: u64, now: u64) -> String {
    let short = |s: u64| match s {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, s % 86_400 / 3_600),
        s if s >= 3_600 => format!("{}h{}m", s / 3_600, s % 3_600 / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    };
    if unix >= now {
        format!("in {}", short(unix - now))
    } else {
        format!("EXPIRED {} ago", short(now - unix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_796_092_436), "2026-12-01T02:33:56Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(until(100 + 86_399, 100), "in 23h59m");
        assert_eq!(until(100 + 2 * 86_400 + 3_600, 100), "in 2d1h");
        assert_eq!(until(145, 100), "in 45s");
        assert_eq!(until(100, 280), "EXPIRED 3m0s ago");
    }
}
