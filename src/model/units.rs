//! Human-readable durations (`500ms`, `30s`, `5m`, `2h`, `1d`, `1.5s`) and
//! sizes (`256MiB`, `1GiB`, `100MB`, `123B`, `4096`).
//!
//! Parsing uses exact integer arithmetic (no floating point), so
//! `parse_duration(&format_duration(d)) == Ok(d)` and
//! `parse_size(&format_size(n)) == Ok(n)` hold for every value.

#![warn(missing_docs)]

use std::time::Duration;

/// Longest part of the offending input quoted back in an error message.
const MAX_QUOTED: usize = 64;

/// A duration or size that could not be parsed. The message is one line that
/// says what was wrong and how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The text is not a valid duration.
    #[error("invalid duration {input}: {reason}")]
    Duration {
        /// The offending input, quoted and shortened.
        input: String,
        /// What was wrong and how to fix it.
        reason: String,
    },
    /// The text is not a valid size.
    #[error("invalid size {input}: {reason}")]
    Size {
        /// The offending input, quoted and shortened.
        input: String,
        /// What was wrong and how to fix it.
        reason: String,
    },
}

const DURATION_HINT: &str =
    "expected a number followed by ms, s, m, h or d (for example 500ms, 30s, 5m or 1.5h)";
const SIZE_HINT: &str = "expected a number optionally followed by B, KiB, MiB, GiB, TiB (1024-based) or kB, MB, GB, TB (1000-based), for example 256MiB";

fn quote(s: &str) -> String {
    if s.chars().count() > MAX_QUOTED {
        let short: String = s.chars().take(MAX_QUOTED).collect();
        format!("{:?}...", short)
    } else {
        format!("{:?}", s)
    }
}

fn duration_err(input: &str, reason: impl Into<String>) -> UnitError {
    UnitError::Duration {
        input: quote(input),
        reason: reason.into(),
    }
}

fn size_err(input: &str, reason: impl Into<String>) -> UnitError {
    UnitError::Size {
        input: quote(input),
        reason: reason.into(),
    }
}

/// A non-negative decimal number split into its integer digits and fraction digits.
struct Decimal<'a> {
    int: &'a str,
    frac: &'a str,
}

/// Splits `s` into a leading decimal number and the (trimmed) unit after it.
/// Returns `None` when there is no number.
fn split_number(s: &str) -> Option<(Decimal<'_>, &str)> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let num = &s[..end];
    let unit = s[end..].trim_start();
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return None;
    }
    Some((Decimal { int, frac }, unit))
}

/// Computes `number * unit`, rounded down to an integer, exactly.
/// Returns `None` on overflow of u128.
fn scale(d: &Decimal<'_>, unit: u128) -> Option<u128> {
    let mut int: u128 = 0;
    for b in d.int.bytes() {
        int = int.checked_mul(10)?.checked_add(u128::from(b - b'0'))?;
    }
    let mut total = int.checked_mul(unit)?;
    // Only the first 20 fraction digits are used: with units below 10^14
    // the rest is worth less than 10^-6 of the smallest step (1 ns or 1 byte).
    let frac = &d.frac[..d.frac.len().min(20)];
    if !frac.is_empty() {
        let mut f: u128 = 0;
        for b in frac.bytes() {
            f = f * 10 + u128::from(b - b'0');
        }
        let denom = 10u128.pow(frac.len() as u32);
        // f < 10^20 and unit < 10^14, so f * unit fits in u128.
        total = total.checked_add(f.checked_mul(unit)? / denom)?;
    }
    Some(total)
}

const NANOS_PER_MS: u128 = 1_000_000;
const NANOS_PER_S: u128 = 1_000_000_000;

/// Parses a duration such as `500ms`, `30s`, `5m`, `2h`, `1d` or `1.5s`.
///
/// Units (case-insensitive): `ms`, `s`, `m`, `h`, `d`. A bare number is an
/// error (the unit is never guessed). Fractions are exact to the nanosecond.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(duration_err(s, format!("empty; {DURATION_HINT}")));
    }
    let Some((num, unit)) = split_number(t) else {
        return Err(duration_err(s, DURATION_HINT));
    };
    let unit_ns: u128 = match unit.to_ascii_lowercase().as_str() {
        "ms" => NANOS_PER_MS,
        "s" => NANOS_PER_S,
        "m" => 60 * NANOS_PER_S,
        "h" => 3600 * NANOS_PER_S,
        "d" => 86_400 * NANOS_PER_S,
        "" => {
            return Err(duration_err(
                s,
                format!(
                    "missing unit; write for example {}s for seconds or {}ms for milliseconds",
                    t, t
                ),
            ));
        }
        _ => {
            return Err(duration_err(
                s,
                format!("unknown unit {:?}; {DURATION_HINT}", unit),
            ));
        }
    };
    let too_large = || duration_err(s, "too large");
    let nanos = scale(&num, unit_ns).ok_or_else(too_large)?;
    let secs = u64::try_from(nanos / NANOS_PER_S).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (nanos % NANOS_PER_S) as u32))
}

/// Parses a size in bytes such as `256MiB`, `1GiB`, `512KiB`, `100MB`, `10kB`,
/// `123B` or `4096` (a bare integer is bytes).
///
/// Units (case-insensitive): `B`; `KiB`, `MiB`, `GiB`, `TiB` (1024-based);
/// `KB`, `MB`, `GB`, `TB` (1000-based). Fractions such as `1.5GiB` are
/// accepted and rounded down to a whole byte. Values above `u64::MAX` are an
/// error.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(size_err(s, format!("empty; {SIZE_HINT}")));
    }
    let Some((num, unit)) = split_number(t) else {
        return Err(size_err(s, SIZE_HINT));
    };
    let mult: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "m" | "g" | "t" => {
            return Err(size_err(
                s,
                format!(
                    "ambiguous unit {:?}; write {}{}iB for 1024-based or {}{}B for 1000-based",
                    unit,
                    num_text(&num),
                    unit.to_ascii_uppercase(),
                    num_text(&num),
                    unit.to_ascii_uppercase()
                ),
            ));
        }
        _ => {
            return Err(size_err(s, format!("unknown unit {:?}; {SIZE_HINT}", unit)));
        }
    };
    let too_large = || size_err(s, "too large (the maximum is 16EiB - 1)");
    let bytes = scale(&num, mult).ok_or_else(too_large)?;
    u64::try_from(bytes).map_err(|_| too_large())
}

fn num_text(d: &Decimal<'_>) -> String {
    if d.frac.is_empty() {
        d.int.to_string()
    } else {
        format!("{}.{}", d.int, d.frac)
    }
}

/// Formats a duration so that [`parse_duration`] reads it back exactly:
/// `1d`, `2h`, `5m`, `30s`, `1.5s`, `250ms`, `0.5ms`, `0s`.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (unit, name) in [
        (86_400 * NANOS_PER_S, "d"),
        (3600 * NANOS_PER_S, "h"),
        (60 * NANOS_PER_S, "m"),
        (NANOS_PER_S, "s"),
    ] {
        if nanos.is_multiple_of(unit) {
            return format!("{}{}", nanos / unit, name);
        }
    }
    if nanos >= NANOS_PER_S {
        return format!(
            "{}{}s",
            nanos / NANOS_PER_S,
            frac_text(nanos % NANOS_PER_S, 9)
        );
    }
    format!(
        "{}{}ms",
        nanos / NANOS_PER_MS,
        frac_text(nanos % NANOS_PER_MS, 6)
    )
}

/// `.5`, `.000001` etc. for `rem / 10^digits`; empty when rem is zero.
fn frac_text(rem: u128, digits: usize) -> String {
    if rem == 0 {
        return String::new();
    }
    let s = format!("{:0width$}", rem, width = digits);
    format!(".{}", s.trim_end_matches('0'))
}

/// Formats a byte count so that [`parse_size`] reads it back exactly:
/// `256MiB`, `1.5GiB`, `100MB`, `1025MiB`, `123B`. Tries, in order: the
/// largest fitting 1024-based unit (whole or with at most three exact
/// decimals), a whole 1000-based unit, a whole smaller 1024-based unit,
/// and otherwise plain bytes.
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0B".to_string();
    }
    let b = u128::from(bytes);
    const BINARY: [(u128, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    const DECIMAL: [(u128, &str); 4] = [
        (1_000_000_000_000, "TB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "kB"),
    ];
    if let Some((unit, name)) = BINARY.into_iter().find(|(unit, _)| b >= *unit)
        && (b * 1000).is_multiple_of(unit)
    {
        let milli = b * 1000 / unit;
        return format!("{}{}{}", milli / 1000, frac_text(milli % 1000, 3), name);
    }
    for (unit, name) in DECIMAL.into_iter().chain(BINARY) {
        if b.is_multiple_of(unit) {
            return format!("{}{}", b / unit, name);
        }
    }
    format!("{}B", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(
            parse_duration(" 1.5 S ").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration(".5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2.s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0.5ms").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn duration_errors() {
        let e = parse_duration("30").unwrap_err().to_string();
        assert!(e.contains("missing unit"), "{e}");
        assert!(e.contains("30s"), "{e}");
        let e = parse_duration("5x").unwrap_err().to_string();
        assert_eq!(
            e,
            r#"invalid duration "5x": unknown unit "x"; expected a number followed by ms, s, m, h or d (for example 500ms, 30s, 5m or 1.5h)"#
        );
        for bad in [
            "",
            "s",
            ".s",
            "-1s",
            "1..5s",
            "1.2.3s",
            "abc",
            "99999999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let e = parse_duration("a\nb").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("10kB").unwrap(), 10_000);
        assert_eq!(parse_size("123B").unwrap(), 123);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("256mib").unwrap(), 256 << 20);
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("16777216TiB").is_err());
        let e = parse_size("64M").unwrap_err().to_string();
        assert!(e.contains("64MiB"), "{e}");
        for bad in ["", "MiB", "-1", "1.2.3MiB", "5 parsecs", "1e3"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(86400)), "1d");
        assert_eq!(format_duration(Duration::from_micros(1)), "0.001ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_size(256 << 20), "256MiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
        assert_eq!(format_size(100_000_000), "100MB");
        assert_eq!(format_size(123), "123B");
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1025 << 20), "1025MiB");
        assert_eq!(format_size(1_000_000_000_000), "1TB");
        assert_eq!(format_size(1536), "1.5KiB");
        assert_eq!(format_size(100_000_256), "100000256B");
        assert_eq!(format_size(u64::MAX), "18446744073709551615B");
    }

    proptest! {
        #[test]
        fn duration_round_trip(secs in any::<u64>(), nanos in 0u32..1_000_000_000) {
            let d = Duration::new(secs, nanos);
            prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }

        #[test]
        fn duration_round_trip_small(ms in 0u64..10_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }

        #[test]
        fn size_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size(n)).unwrap(), n);
        }

        #[test]
        fn size_round_trip_mib(n in 0u64..(1 << 24), shift in 0u32..20) {
            let n = n << shift;
            prop_assert_eq!(parse_size(&format_size(n)).unwrap(), n);
        }

        #[test]
        fn parsers_never_panic(s in ".*") {
            let _ = parse_duration(&s);
            let _ = parse_size(&s);
        }

        #[test]
        fn parsers_never_panic_numbers(s in "[0-9. ]{0,45}[a-zA-Z ]{0,5}") {
            if let Err(e) = parse_duration(&s) {
                prop_assert!(!e.to_string().contains('\n'));
            }
            if let Err(e) = parse_size(&s) {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }
    }
}
