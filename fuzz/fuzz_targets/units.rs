//! Durations, sizes, rates and quotas (`agentq::model::units::parse_duration`,
//! `parse_size`, `agentq::model::limits::parse_rate`, `parse_quota`): never
//! panic; errors are one line; parse(format(x)) == x for every duration and
//! size, and for every value parsed from text; surrounding whitespace and
//! the case of the unit change nothing; a rate or quota that is accepted is
//! stored (in whole milliseconds, `LimitsUpdate::fields`) exactly as given.
#![no_main]

use std::time::Duration;

use agentq::model::limits::{LimitsUpdate, parse_quota, parse_rate};
use agentq::model::units::{format_duration, format_size, parse_duration, parse_size};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        text(s);
    }
    if let Some((a, rest)) = data.split_first_chunk::<8>()
        && let Some((b, rest)) = rest.split_first_chunk::<4>()
        && let Some((c, _)) = rest.split_first_chunk::<8>()
    {
        let d = Duration::new(
            u64::from_le_bytes(*a),
            u32::from_le_bytes(*b) % 1_000_000_000,
        );
        assert_eq!(
            parse_duration(&format_duration(d)),
            Ok(d),
            "{}",
            format_duration(d)
        );
        let n = u64::from_le_bytes(*c);
        assert_eq!(parse_size(&format_size(n)), Ok(n), "{}", format_size(n));
    }
});

fn one_line(e: &str) {
    assert!(
        !e.contains('\n') && !e.contains('\r'),
        "error on one line: {e:?}"
    );
}

fn text(s: &str) {
    match parse_duration(s) {
        Ok(d) => {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{s:?}");
            assert_eq!(parse_duration(&format!(" {s}\t")), Ok(d), "{s:?} padded");
            assert_eq!(
                parse_duration(&s.to_ascii_uppercase()),
                Ok(d),
                "{s:?} upper"
            );
        }
        Err(e) => one_line(&e.to_string()),
    }
    match parse_size(s) {
        Ok(n) => {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{s:?}");
            assert_eq!(parse_size(&format!(" {s}\t")), Ok(n), "{s:?} padded");
            assert_eq!(parse_size(&s.to_ascii_lowercase()), Ok(n), "{s:?} lower");
        }
        Err(e) => one_line(&e.to_string()),
    }
    match parse_rate(s) {
        Ok(r) if r.starts == 0 => {}
        Ok(r) => {
            assert!((1..=1_000_000).contains(&r.starts), "{s:?}: {r:?}");
            assert!(
                r.period >= Duration::from_millis(1) && r.period <= Duration::from_secs(86_400),
                "{s:?}: {r:?}"
            );
            let u = LimitsUpdate {
                rate: Some(r),
                expected_rate: Some(r),
                ..Default::default()
            };
            u.validate().expect("a parsed rate validates");
            let period_ms = field(&u, "rate_period_ms");
            assert_eq!(
                Duration::from_millis(period_ms),
                r.period,
                "rate {s:?} accepted with period {:?} but stored as {period_ms}ms",
                r.period
            );
            assert_eq!(field(&u, "rate"), r.starts);
            assert!(field(&u, "expected_rate_per_min") >= 1);
        }
        Err(e) => one_line(&e),
    }
    match parse_quota(s) {
        Ok(q) => {
            let u = LimitsUpdate {
                quota: Some(q),
                ..Default::default()
            };
            if u.validate().is_ok() {
                let ms = field(&u, "quota_ms");
                assert_eq!(
                    Duration::from_millis(ms),
                    q,
                    "quota {s:?} accepted as {q:?} but stored as {ms}ms (0: no quota)"
                );
            }
        }
        Err(e) => one_line(&e),
    }
}

fn field(u: &LimitsUpdate, name: &str) -> u64 {
    let (_, v) = u
        .fields()
        .into_iter()
        .find(|(k, _)| *k == name)
        .unwrap_or_else(|| panic!("{name} written"));
    v.parse().expect("a number")
}
