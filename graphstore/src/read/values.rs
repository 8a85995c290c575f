//! Parsers for the scalar values of OSM XML attributes.

use chrono::{DateTime, NaiveDate};

/// Parses a decimal degree string (`-12.3456789`, `7.4`, `1e-3`) into 1e-7
/// degree units.
///
/// Works on the digits rather than through `f64`, so that every coordinate
/// written with at most seven decimals comes back exactly, as libosmium's own
/// parser does; further digits round half away from zero. Returns `None` if
/// the text is not a number. Magnitudes far beyond any valid coordinate
/// saturate (at about 110,000 degrees) so that the caller's range check
/// rejects them instead of an overflow.
pub(crate) fn parse_coordinate(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let mut i = 0;
    let negative = match b.first() {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let int_start = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int = &b[int_start..i];
    let mut frac: &[u8] = &[];
    if b.get(i) == Some(&b'.') {
        i += 1;
        let frac_start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac = &b[frac_start..i];
    }
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut exp: i64 = 0;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exp_negative = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let exp_start = i;
        while let Some(d) = b.get(i).filter(|c| c.is_ascii_digit()) {
            exp = (exp * 10 + i64::from(d - b'0')).min(10_000);
            i += 1;
        }
        if i == exp_start {
            return None;
        }
        if exp_negative {
            exp = -exp;
        }
    }
    if i != b.len() {
        return None;
    }

    // The digits of `int` followed by `frac` form one digit string; the
    // fixed-point value consists of its first `int.len() + exp + 7` digits.
    let digit = |k: i64| -> i64 {
        let Ok(k) = usize::try_from(k) else {
            return 0;
        };
        let d = if k < int.len() {
            int[k]
        } else {
            frac.get(k - int.len()).copied().unwrap_or(b'0')
        };
        i64::from(d - b'0')
    };
    const SATURATE: i64 = 1 << 40;
    let end = int.len() as i64 + exp + 7;
    let mut value: i64 = 0;
    for k in 0..end.max(0) {
        value = value * 10 + digit(k);
        if value > SATURATE {
            value = SATURATE;
            break;
        }
    }
    if value < SATURATE && digit(end) >= 5 {
        value += 1;
    }
    Some(if negative { -value } else { value })
}

/// Parses an OSM timestamp (`2017-03-01T07:49:01Z`) into seconds since the
/// epoch. The fixed form every OSM tool writes takes a fast path; anything
/// else must be RFC 3339 (e.g. with an offset or fractional seconds).
pub(crate) fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
    {
        let num = |from: usize, to: usize| -> Option<u32> {
            b[from..to].iter().try_fold(0u32, |acc, &c| {
                c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
            })
        };
        let year = i32::try_from(num(0, 4)?).ok()?;
        let date = NaiveDate::from_ymd_opt(year, num(5, 7)?, num(8, 10)?)?;
        let time = date.and_hms_opt(num(11, 13)?, num(14, 16)?, num(17, 19)?)?;
        return Some(time.and_utc().timestamp());
    }
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp())
}

/// Formats seconds since the epoch the way OSM files write them.
#[cfg(test)]
pub(crate) fn format_timestamp(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_parse_exactly() {
        let cases = [
            ("0", 0),
            ("-0", 0),
            ("43.7370125", 437_370_125),
            ("-43.7370125", -437_370_125),
            ("7.4", 74_000_000),
            ("180", 1_800_000_000),
            ("-180.0000000", -1_800_000_000),
            (".5", 5_000_000),
            ("5.", 50_000_000),
            ("+1.25", 12_500_000),
            ("0.00000005", 1),
            ("-0.00000005", -1),
            ("0.000000049999", 0),
            ("1.23456785", 12_345_679),
            ("1.23456784999", 12_345_678),
            ("1e-3", 10_000),
            ("1.5E2", 1_500_000_000),
            ("0.5e-7", 1),
            ("0.5e-8", 0),
            ("9.5496806", 95_496_806),
            ("00000000000000000000001.5", 15_000_000),
        ];
        for (text, want) in cases {
            assert_eq!(parse_coordinate(text), Some(want), "{text}");
        }
        for bad in [
            "", "-", ".", "abc", "1.2.3", "1e", "1e+", " 1", "1 ", "0x10", "NaN",
        ] {
            assert_eq!(parse_coordinate(bad), None, "{bad:?}");
        }
        // Far out of range saturates instead of overflowing.
        assert!(parse_coordinate("99999999999999999999999").unwrap() > 1_800_000_000);
        assert!(parse_coordinate("1e9999999").unwrap() > 1_800_000_000);
        assert!(parse_coordinate("-1e9999999").unwrap() < -1_800_000_000);
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_timestamp("2017-03-01T07:49:00Z"), Some(1_488_354_540));
        assert_eq!(
            parse_timestamp("2017-03-01T08:49:00+01:00"),
            Some(1_488_354_540)
        );
        assert_eq!(parse_timestamp("2017-02-30T07:49:00Z"), None);
        assert_eq!(parse_timestamp("2017-03-01T07:49:0xZ"), None);
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(format_timestamp(1_488_354_540), "2017-03-01T07:49:00Z");
    }
}
