//! The task program protocol (README, "Task programs"): the job
//! as one JSON line on stdin ([`TaskInput`]), the result as the last
//! non-empty line of stdout ([`parse_task_output`]), and progress lines
//! `{"progress": <any JSON>}` before it ([`progress_report`]).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::model::attempt::TaskUsage;
use crate::model::json::PlainJson;

/// What the task program receives on stdin: exactly the keys `id`, `tenant`,
/// `queue`, `kind`, `attempt` and `payload`, as one JSON object on one line.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TaskInput {
    /// Job id.
    pub id: String,
    /// Tenant the job belongs to.
    pub tenant: String,
    /// Queue the job was taken from.
    pub queue: String,
    /// Task kind (the folder name under the workers directory).
    pub kind: String,
    /// Attempt number, starting at 1.
    pub attempt: u32,
    /// The job's payload, passed through as given at enqueue.
    pub payload: Box<serde_json::value::RawValue>,
}

/// At most this many characters of a garbage result line are quoted.
const SHOWN_CHARS: usize = 200;

/// A progress line exactly: one key, `progress`. Any other key (or a
/// repeated `progress`) makes the line ordinary output.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressLine {
    progress: Box<RawValue>,
}

/// The report of a progress line, as compact JSON text; None when `line`
/// is anything else (not UTF-8, not JSON, not an object whose only key is
/// `progress`). Surrounding whitespace is ignored. Never panics on any
/// input; the caller bounds the line's length and the report's size.
pub fn progress_report(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?.trim();
    // Most output is not an object: skip the parser for it.
    if !text.starts_with('{') {
        return None;
    }
    let ProgressLine { progress } = serde_json::from_str(text).ok()?;
    Some(compact_json(progress.get()))
}

/// Parses a task program's stdout as the runtime does (README, "Task
/// programs"): the last non-empty line must be a JSON object with
/// optional `output` and `usage` keys; empty stdout is a valid empty result,
/// and so is a last line that is a progress line (it is never the result).
/// Returns the `output` value and the reported usage, or the one-line error
/// text an attempt that printed garbage fails with. Never panics on any
/// input (it is fuzzed: `fuzz/fuzz_targets/task_output.rs`).
pub fn parse_task_output(stdout: &[u8]) -> Result<TaskResult, String> {
    parse_result(stdout)
}

/// What a task program's result line said.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskResult {
    /// The `output` value (None: absent or null).
    pub output: Option<serde_json::Value>,
    /// The usage it reported (zeros where absent).
    pub usage: TaskUsage,
}

/// Parses the result line: the last non-empty line of stdout must be a JSON
/// object with optional `output` and `usage` keys. Empty stdout is a valid
/// empty result; so is a last line that is a progress line, as if the task
/// had printed no result line. Returns the error text for garbage.
pub(crate) fn parse_result(stdout: &[u8]) -> Result<TaskResult, String> {
    let text = String::from_utf8_lossy(stdout);
    let Some(line) = text.lines().map(str::trim).rev().find(|l| !l.is_empty()) else {
        return Ok(TaskResult::default());
    };
    if progress_report(line.as_bytes()).is_some() {
        return Ok(TaskResult::default());
    }
    let garbage = || {
        let shown: String = line.chars().take(SHOWN_CHARS).collect();
        // A character takes at most 4 bytes, cleaned too (U+FFFD takes 3).
        format!(
            "task program printed a result that is not a JSON object: {}",
            crate::model::text::clean(&shown, 4 * SHOWN_CHARS)
        )
    };
    let PlainJson(value) = serde_json::from_str(line).map_err(|_| garbage())?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err(garbage());
    };
    let output = match obj.remove("output") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(v),
    };
    let usage = match obj.get("usage") {
        None | Some(serde_json::Value::Null) => TaskUsage::default(),
        Some(serde_json::Value::Object(u)) => {
            let field = |key: &str| -> Result<u64, String> {
                match u.get(key) {
                    None | Some(serde_json::Value::Null) => Ok(0),
                    Some(v) => v.as_u64().ok_or_else(|| {
                        let shown: String = v.to_string().chars().take(50).collect();
                        format!(
                            "task program printed a result with invalid usage: usage.{key} must be a non-negative integer, got {shown}"
                        )
                    }),
                }
            };
            TaskUsage {
                api_calls: field("api_calls")?,
                input_tokens: field("input_tokens")?,
                output_tokens: field("output_tokens")?,
            }
        }
        Some(_) => {
            return Err(
                "task program printed a result with invalid usage: usage must be an object like {\"api_calls\": 1, \"input_tokens\": 10, \"output_tokens\": 5}"
                    .to_string(),
            );
        }
    };
    Ok(TaskResult { output, usage })
}

/// The job as one JSON line: `{"id","tenant","queue","kind","attempt","payload"}`.
/// The payload is passed through verbatim except that insignificant
/// whitespace is removed, so the object always fits on one line.
pub(crate) fn encode_input(input: &TaskInput) -> Vec<u8> {
    #[derive(Serialize)]
    struct Wire<'a> {
        id: &'a str,
        tenant: &'a str,
        queue: &'a str,
        kind: &'a str,
        attempt: u32,
        payload: &'a RawValue,
    }
    let compacted = RawValue::from_string(compact_json(input.payload.get())).ok();
    let payload: &RawValue = compacted.as_deref().unwrap_or(&input.payload);
    let wire = Wire {
        id: &input.id,
        tenant: &input.tenant,
        queue: &input.queue,
        kind: &input.kind,
        attempt: input.attempt,
        payload,
    };
    let mut out = serde_json::to_vec(&wire).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// Removes whitespace outside strings from (valid) JSON text.
pub(crate) fn compact_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in s.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line() {
        assert_eq!(parse_result(b"").unwrap(), TaskResult::default());
        assert_eq!(parse_result(b"\n  \n").unwrap(), TaskResult::default());
        let TaskResult {
            output: o,
            usage: u,
        } = parse_result(
            b"log line\n{\"output\": {\"a\": 1}, \"usage\": {\"api_calls\": 2, \"input_tokens\": 3}}\n\n",
        )
        .unwrap();
        assert_eq!(o, Some(serde_json::json!({"a": 1})));
        assert_eq!(
            u,
            TaskUsage {
                api_calls: 2,
                input_tokens: 3,
                output_tokens: 0
            }
        );
        assert_eq!(parse_result(b"{}").unwrap(), TaskResult::default());
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"42",
            b"{\"usage\": {\"api_calls\": -1}}",
            b"{\"usage\": {\"api_calls\": 1.5}}",
            b"{\"usage\": 3}",
            b"{\"output\": 1}\ntrailing",
        ] {
            assert!(
                parse_result(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Found by `fuzz/` (target `task_output`): serde_json's Value parser
        // (feature raw_value) took this key for an embedded raw value and
        // refused, or rewrote, a valid result object.
        let magic = "$serde_json::private::RawValue";
        let line = format!(r#"{{"{magic}":"ignored","output":{{"{magic}":"[1]"}}}}"#);
        assert_eq!(
            parse_result(line.as_bytes()).unwrap(),
            TaskResult {
                output: Some(serde_json::json!({ magic: "[1]" })),
                usage: TaskUsage::default()
            }
        );
        // Quoted garbage is clean text: no NUL, escape or invalid UTF-8.
        let e = parse_result(b"x\0y\x1b[2J\xff z").unwrap_err();
        assert!(e.ends_with(": x\u{FFFD}y\u{FFFD}[2J\u{FFFD} z"), "{e:?}");
        let e = parse_result(b"hello").unwrap_err();
        assert_eq!(
            e,
            "task program printed a result that is not a JSON object: hello"
        );
    }

    #[test]
    fn progress_lines_are_objects_with_only_progress() {
        let report = |l: &[u8]| progress_report(l);
        assert_eq!(report(br#"{"progress": 0.5}"#).as_deref(), Some("0.5"));
        assert_eq!(
            report(b"  {\"progress\" : {\"step\": \"a b\", \"of\": [1, 2]}}\r").as_deref(),
            Some(r#"{"step":"a b","of":[1,2]}"#)
        );
        assert_eq!(report(br#"{"progress":null}"#).as_deref(), Some("null"));
        for not in [
            &b""[..],
            b"progress",
            b"[{\"progress\":1}]",
            b"{\"progress\":1,\"output\":2}",
            b"{\"output\":1}",
            b"{}",
            b"{\"progress\":1,\"progress\":2}",
            b"{\"progress\":1} trailing",
            b"{\"progress\":\"\xff\"}",
            b"{\"progress\":",
            b"{\"$serde_json::private::RawValue\":\"1\"}",
        ] {
            assert_eq!(report(not), None, "{}", String::from_utf8_lossy(not));
        }
        // A progress line last: no result, as if none was printed.
        let r = parse_result(b"{\"output\":1}\n{\"progress\":2}\n");
        assert_eq!(r, Ok(TaskResult::default()));
    }

    proptest::proptest! {
        #[test]
        fn progress_lines_never_panic(line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Some(r) = progress_report(&line) {
                // RawValue checks the syntax only (a Value would read serde's
                // private raw-value key as a token, see `result_line`).
                proptest::prop_assert!(serde_json::from_str::<Box<RawValue>>(&r).is_ok(), "{r:?}");
                proptest::prop_assert!(!r.contains('\n'), "{r:?}");
            }
        }

        #[test]
        fn task_output_never_panics(stdout in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            if let Err(e) = parse_task_output(&stdout) {
                proptest::prop_assert!(!e.contains('\n'), "{e:?}");
                proptest::prop_assert!(crate::model::text::is_clean(&e, usize::MAX), "{e:?}");
            }
        }

        #[test]
        fn task_output_jsonish_never_panics(
            lines in proptest::collection::vec(r#"[ {}\[\]":,0-9a-z_.\\-]{0,40}"#, 0..5),
        ) {
            let stdout = lines.join("\n");
            match parse_task_output(stdout.as_bytes()) {
                Err(e) => proptest::prop_assert!(!e.contains('\n'), "{e:?}"),
                Ok(r) => proptest::prop_assert_ne!(r.output, Some(serde_json::Value::Null)),
            }
        }

        /// A result line as task programs write it, after log lines and
        /// before trailing blank lines, reads back exactly.
        #[test]
        fn result_lines_round_trip(
            log in proptest::collection::vec("[^\n]{0,60}", 0..4),
            output in proptest::option::of(proptest::prelude::any::<(String, i64, bool)>()),
            usage in proptest::option::of(proptest::prelude::any::<[Option<u64>; 3]>()),
            trailing in "[ \t\r\n]{0,6}",
        ) {
            let mut obj = serde_json::Map::new();
            let want_output = output.map(|(s, n, b)| serde_json::json!({"s": s, "n": n, "b": b}));
            if let Some(o) = &want_output {
                obj.insert("output".into(), o.clone());
            }
            let mut want = TaskUsage::default();
            if let Some([a, i, o]) = usage {
                let mut u = serde_json::Map::new();
                for (k, v, slot) in [
                    ("api_calls", a, &mut want.api_calls),
                    ("input_tokens", i, &mut want.input_tokens),
                    ("output_tokens", o, &mut want.output_tokens),
                ] {
                    if let Some(v) = v {
                        u.insert(k.into(), v.into());
                        *slot = v;
                    }
                }
                obj.insert("usage".into(), serde_json::Value::Object(u));
            }
            let mut stdout = log.join("\n");
            stdout.push('\n');
            stdout.push_str(&serde_json::Value::Object(obj).to_string());
            stdout.push_str(&trailing);
            let got = parse_task_output(stdout.as_bytes());
            proptest::prop_assert_eq!(got, Ok(TaskResult { output: want_output, usage: want }), "{:?}", stdout);
        }
    }

    #[test]
    fn compacting_keeps_strings() {
        assert_eq!(
            compact_json("{ \"a b\" : [1,\n 2],\r\n\t\"c\\\" d\": \" x \" }"),
            "{\"a b\":[1,2],\"c\\\" d\":\" x \"}"
        );
        let input = TaskInput {
            id: "1".into(),
            tenant: "t".into(),
            queue: "q".into(),
            kind: "k".into(),
            attempt: 1,
            payload: RawValue::from_string("{\n \"x\": \"a\\nb\"\n}".into()).unwrap(),
        };
        let line = encode_input(&input);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(line.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["payload"]["x"], "a\nb");
    }

    #[test]
    fn task_input_keys() {
        let input = TaskInput {
            id: "j1".into(),
            tenant: "t".into(),
            queue: "q".into(),
            kind: "echo".into(),
            attempt: 2,
            payload: serde_json::value::RawValue::from_string("{\"a\": 1}".into()).unwrap(),
        };
        let v: serde_json::Value = serde_json::to_value(&input).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["attempt", "id", "kind", "payload", "queue", "tenant"]
        );
    }
}
