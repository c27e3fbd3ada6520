//! Text that came from outside (a task program's stderr or stdout, an error
//! a client sent) made safe to store, bill from and show.
//!
//! A task program may write any bytes. Stored as they are, one NUL byte makes
//! PostgreSQL refuse the ledger row (`text` cannot hold NUL), invalid UTF-8
//! breaks every reader, terminal escape sequences reach the operator's
//! terminal through `agentq inspect`, and an unbounded error grows Redis.
//!
//! Property (checked by the property tests below): for every input, [`clean`] and [`clean_tail`] return
//! valid UTF-8 of at most `max` bytes that contains no control character
//! other than `\n` and `\t` (NUL, the other C0 controls, DEL and the C1
//! controls become U+FFFD), and leave clean text within the bound unchanged.

#![warn(missing_docs)]

/// What replaces invalid UTF-8 and control characters.
const REPLACEMENT: char = '\u{FFFD}';

/// True for characters that are kept as they are.
fn allowed(c: char) -> bool {
    c == '\n' || c == '\t' || !c.is_control()
}

/// Replace control characters (but `\n` and `\t`) with U+FFFD.
fn scrub(text: &str) -> String {
    text.chars()
        .map(|c| if allowed(c) { c } else { REPLACEMENT })
        .collect()
}

/// True when `text` needs no cleaning to be stored (within `max` bytes).
pub fn is_clean(text: &str, max: usize) -> bool {
    text.len() <= max && text.chars().all(allowed)
}

/// The start of `text`, cleaned, in at most `max` bytes (cut on a character
/// boundary).
pub fn clean(text: &str, max: usize) -> String {
    if is_clean(text, max) {
        return text.to_string();
    }
    let mut s = scrub(text);
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

/// The end of `bytes` (any bytes, such as a stderr tail), as cleaned text
/// in at most `max` bytes: invalid UTF-8 becomes U+FFFD, and the cut is on
/// a character boundary.
pub fn clean_tail(bytes: &[u8], max: usize) -> String {
    // A replacement character takes 3 bytes where an invalid byte took 1, so
    // look at no more than `max` input bytes and cut again after scrubbing.
    let mut start = bytes.len().saturating_sub(max);
    // Do not start inside a character (at most 3 continuation bytes).
    for _ in 0..3 {
        if bytes.get(start).is_some_and(|b| b & 0xC0 == 0x80) {
            start += 1;
        }
    }
    let s = scrub(&String::from_utf8_lossy(&bytes[start..]));
    let mut from = s.len().saturating_sub(max);
    while !s.is_char_boundary(from) {
        from += 1;
    }
    s[from..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_safe(s: &str, max: usize) {
        assert!(s.len() <= max, "{} bytes over {max}", s.len());
        assert!(
            s.chars().all(|c| c == '\n' || c == '\t' || !c.is_control()),
            "{s:?}"
        );
    }

    #[test]
    fn nul_escapes_and_bad_utf8_are_replaced() {
        assert_eq!(clean("a\0b", 100), "a\u{FFFD}b");
        assert_eq!(clean("\x1b[31mred", 100), "\u{FFFD}[31mred");
        assert_eq!(clean("line 1\n\tline 2", 100), "line 1\n\tline 2");
        assert_eq!(
            clean_tail(b"ok \xff\xfe\0 done", 100),
            "ok \u{FFFD}\u{FFFD}\u{FFFD} done"
        );
        assert_eq!(clean("\u{85}next line", 100), "\u{FFFD}next line");
    }

    #[test]
    fn bounds_cut_on_character_boundaries() {
        assert_eq!(clean("héllo", 2), "h");
        assert_eq!(clean_tail("héllo".as_bytes(), 5), "éllo");
        assert_eq!(clean_tail("héllo".as_bytes(), 4), "llo");
        assert_eq!(clean_tail(b"\xff\xff\xff", 4), "\u{FFFD}");
        assert_eq!(clean("", 0), "");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_come_out_safe(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), max in 0usize..600) {
            assert_safe(&clean_tail(&bytes, max), max);
            assert_safe(&clean(&String::from_utf8_lossy(&bytes), max), max);
        }

        #[test]
        fn clean_text_is_kept(s in "[^\\p{Cc}]{0,80}|[a-z\n\t]{0,80}") {
            proptest::prop_assert_eq!(clean(&s, s.len()), s.clone());
            proptest::prop_assert_eq!(clean_tail(s.as_bytes(), s.len()), s);
        }
    }
}
