//! Which payloads a job may carry: the same rule here as in the enqueue
//! script (`scripts/enqueue.lua`, `json_check`), so a payload one accepts is
//! never refused by the other, nor later by the worker, the HTTP API or a
//! handler (shared test vectors: `tests/payloads.rs`).
//!
//! A payload is one JSON text (RFC 8259) that every JSON reader agentq and
//! its clients use can take:
//! - valid UTF-8, no unescaped control character in a string, no
//!   `\u` escape of an unpaired surrogate;
//! - no `NaN`, `Infinity`, hex, `+1`, `01`, `1.`, `.5` or trailing commas
//!   (Redis's cjson takes some of these; serde_json does not);
//! - at most [`MAX_DEPTH`] nested arrays and objects (serde_json's limit);
//! - every number below 1e308 in magnitude, judged from its text (its
//!   decimal exponent), so both sides decide alike without comparing two
//!   float parsers near the largest double.
//!
//! The check is iterative (no recursion), linear in the length, and never
//! panics on any input (property-tested below).

/// Most arrays and objects nested in one another.
pub const MAX_DEPTH: usize = 127;

/// Largest decimal exponent a number may have (`9.99e307` is the largest).
const MAX_EXPONENT: i64 = 307;

/// Ok when `text` is an acceptable payload; otherwise what is wrong and
/// where (byte offset).
pub fn check(text: &str) -> Result<(), String> {
    Scanner {
        s: text.as_bytes(),
        pos: 0,
    }
    .document()
}

struct Scanner<'a> {
    s: &'a [u8],
    pos: usize,
}

/// What the scanner expects next inside a container.
#[derive(Clone, Copy, PartialEq)]
enum Open {
    Array,
    Object,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn fail<T>(&self, what: &str) -> Result<T, String> {
        Err(format!(
            "payload is not valid JSON: {what} at byte {}",
            self.pos
        ))
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn document(mut self) -> Result<(), String> {
        let mut stack: Vec<Open> = Vec::new();
        self.ws();
        loop {
            // A value.
            match self.peek() {
                Some(b'[') | Some(b'{') => {
                    let open = if self.peek() == Some(b'[') {
                        Open::Array
                    } else {
                        Open::Object
                    };
                    self.pos += 1;
                    if stack.len() >= MAX_DEPTH {
                        return self.fail(&format!("nesting deeper than {MAX_DEPTH}"));
                    }
                    stack.push(open);
                    self.ws();
                    let close = if open == Open::Array { b']' } else { b'}' };
                    if self.eat(close) {
                        stack.pop();
                    } else {
                        if open == Open::Object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                Some(b'"') => self.string()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(_) => return self.fail("unexpected character"),
                None => return self.fail("unexpected end"),
            }
            // After a value: close containers, or a comma and the next one.
            loop {
                self.ws();
                let Some(&open) = stack.last() else {
                    return match self.peek() {
                        None => Ok(()),
                        Some(_) => self.fail("trailing characters"),
                    };
                };
                let close = if open == Open::Array { b']' } else { b'}' };
                if self.eat(close) {
                    stack.pop();
                    continue;
                }
                if !self.eat(b',') {
                    return self.fail("expected ',' or a closing bracket");
                }
                self.ws();
                if open == Open::Object {
                    self.key()?;
                }
                break;
            }
        }
    }

    /// `"key"` `:` in an object, leaving the scanner at the value.
    fn key(&mut self) -> Result<(), String> {
        if self.peek() != Some(b'"') {
            return self.fail("expected a string key");
        }
        self.string()?;
        self.ws();
        if !self.eat(b':') {
            return self.fail("expected ':'");
        }
        self.ws();
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), String> {
        if self.s[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            self.fail("unexpected word")
        }
    }

    fn string(&mut self) -> Result<(), String> {
        self.pos += 1; // the opening quote
        loop {
            let Some(b) = self.peek() else {
                return self.fail("unterminated string");
            };
            match b {
                b'"' => {
                    self.pos += 1;
                    return Ok(());
                }
                b'\\' => self.escape()?,
                0..=0x1f => return self.fail("control character in a string"),
                0x80..=0xff => self.utf8()?,
                _ => self.pos += 1,
            }
        }
    }

    fn escape(&mut self) -> Result<(), String> {
        self.pos += 1;
        match self.peek() {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.pos += 1;
                Ok(())
            }
            Some(b'u') => {
                let unit = self.hex4()?;
                match unit {
                    0xD800..=0xDBFF => {
                        if self.s[self.pos..].starts_with(b"\\u")
                            && matches!(self.hex4_at(self.pos + 1), Some(0xDC00..=0xDFFF))
                        {
                            self.pos += 6;
                            Ok(())
                        } else {
                            self.fail("unpaired surrogate escape")
                        }
                    }
                    0xDC00..=0xDFFF => self.fail("unpaired surrogate escape"),
                    _ => Ok(()),
                }
            }
            _ => self.fail("invalid escape"),
        }
    }

    /// The four hex digits after `u` at `self.pos` (which is on the `u`).
    fn hex4(&mut self) -> Result<u32, String> {
        match self.hex4_at(self.pos) {
            Some(v) => {
                self.pos += 5;
                Ok(v)
            }
            None => self.fail("invalid \\u escape"),
        }
    }

    /// The value of `uXXXX` starting at `at` (the `u`).
    fn hex4_at(&self, at: usize) -> Option<u32> {
        let digits = self.s.get(at + 1..at + 5)?;
        if self.s.get(at) != Some(&b'u') {
            return None;
        }
        digits.iter().try_fold(0u32, |v, &d| {
            let x = (d as char).to_digit(16)?;
            Some(v * 16 + x)
        })
    }

    /// One multi-byte UTF-8 sequence (input is `&str`, so always valid here;
    /// kept step for step with the Lua check).
    fn utf8(&mut self) -> Result<(), String> {
        let len = match self.peek() {
            Some(0xC2..=0xDF) => 2,
            Some(0xE0..=0xEF) => 3,
            Some(0xF0..=0xF4) => 4,
            _ => return self.fail("invalid UTF-8"),
        };
        match self.s.get(self.pos..self.pos + len) {
            Some(seq) if std::str::from_utf8(seq).is_ok() => {
                self.pos += len;
                Ok(())
            }
            _ => self.fail("invalid UTF-8"),
        }
    }

    fn digits(&mut self) -> usize {
        let from = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - from
    }

    fn number(&mut self) -> Result<(), String> {
        let start = self.pos;
        self.eat(b'-');
        let int_from = self.pos;
        if self.eat(b'0') {
            // a leading zero stands alone
        } else if self.digits() == 0 {
            return self.fail("invalid number");
        }
        let int = &self.s[int_from..self.pos];
        let mut frac: &[u8] = &[];
        if self.eat(b'.') {
            let from = self.pos;
            if self.digits() == 0 {
                return self.fail("invalid number");
            }
            frac = &self.s[from..self.pos];
        }
        let mut exp: i64 = 0;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            let negative = self.peek() == Some(b'-');
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            let from = self.pos;
            if self.digits() == 0 {
                return self.fail("invalid number");
            }
            // Saturate: any exponent of more than 15 digits is huge.
            let text = &self.s[from..self.pos];
            let magnitude = if text.len() > 15 {
                1_000_000_000_000_000
            } else {
                text.iter().fold(0i64, |v, &d| v * 10 + i64::from(d - b'0'))
            };
            exp = if negative { -magnitude } else { magnitude };
        }
        match decimal_exponent(int, frac, exp) {
            Some(e) if e > MAX_EXPONENT => {
                self.pos = start;
                self.fail("number out of range (1e308 or more)")
            }
            _ => Ok(()),
        }
    }
}

/// The power of ten of the leading digit of `int.frac e exp` (None for zero).
fn decimal_exponent(int: &[u8], frac: &[u8], exp: i64) -> Option<i64> {
    let first = int.iter().chain(frac).position(|&d| d != b'0')?;
    Some(int.len() as i64 - 1 - first as i64 + exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_in_examples() {
        for ok in [
            "{}",
            " [1, -0, 0.5, 1e-400, 9.99e307, \"\\ud83d\\ude00\", true, null] ",
            "\"é\\n\"",
            "123456789012345678901234567890e-10",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "NaN",
            "Infinity",
            "0x10",
            "+1",
            "01",
            "1.",
            ".5",
            "[1,]",
            "1e308",
            "{\"a\" 1}",
            "\"\\ud800\"",
            "\"\\udc00x\"",
            "\"a\u{1}\"",
            "[] []",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
        let deep = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        assert_eq!(check(&deep(MAX_DEPTH)), Ok(()));
        assert!(check(&deep(MAX_DEPTH + 1)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,64}|[\\[\\]{}\",:0-9eE+.\\-a-z\\\\ ]{0,64}") {
            let _ = check(&s);
        }

        /// Whatever the check accepts, serde_json's full parser reads.
        #[test]
        fn accepted_payloads_parse(s in "[\\[\\]{}\",:0-9eE+.\\-tfrunlsa\\\\ ]{0,48}") {
            if check(&s).is_ok() {
                proptest::prop_assert!(serde_json::from_str::<serde_json::Value>(&s).is_ok(), "{s:?}");
            }
        }
    }
}
