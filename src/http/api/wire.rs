//! The HTTP job format and its decoder (pure, so it can be fuzzed).

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use super::ApiError;
use crate::model::json::PlainJson;
use crate::queue::JobSpec;

/// Most jobs in one request.
pub const MAX_BATCH: usize = 1000;

/// One job in a request body. Durations read like `30s`, sizes like `256MiB`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiJob {
    /// Queue name.
    pub queue: String,
    /// Task kind.
    pub kind: String,
    /// Any JSON value (missing: `{}`).
    #[serde(default, deserialize_with = "plain_json")]
    pub payload: Option<Value>,
    /// For example "30s".
    pub timeout: Option<String>,
    /// For example "256MiB".
    pub memory: Option<String>,
    /// For example "5m".
    pub delay: Option<String>,
    /// -100..=100.
    pub priority: Option<i32>,
    /// 1..=1000.
    pub max_attempts: Option<u32>,
    /// Per-tenant idempotency key.
    pub idempotency_key: Option<String>,
    /// Refused: the tenant comes from the API key.
    pub tenant: Option<Value>,
}

/// Read a payload that is present as plain JSON (see
/// `executor::process::PlainJson`): every object stays an object, whatever
/// its keys, and `null` stays `null` (only a missing payload means `{}`).
fn plain_json<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Ok(Some(PlainJson::deserialize(d)?.0))
}

impl ApiJob {
    fn into_spec(self, tenant: &str, n: usize) -> Result<JobSpec, ApiError> {
        let at = |m: String| if n > 0 { format!("job {n}: {m}") } else { m };
        if self.tenant.is_some() {
            return Err(ApiError::bad(at(
                "remove the tenant field: the tenant comes from the API key".into(),
            )));
        }
        let dur = |v: Option<String>, what: &str| {
            v.map(|s| {
                let d = crate::model::units::parse_duration(&s)
                    .map_err(|e| ApiError::bad(at(format!("{what}: {e}"))))?;
                check_ms(d).map_err(|m| ApiError::bad(at(format!("{what}: {s:?} {m}"))))
            })
            .transpose()
        };
        let memory = self
            .memory
            .map(|s| {
                crate::model::units::parse_size(&s)
                    .map_err(|e| ApiError::bad(at(format!("memory: {e}"))))
            })
            .transpose()?;
        let spec = JobSpec {
            tenant: tenant.to_string(),
            queue: self.queue,
            kind: self.kind,
            payload: self
                .payload
                .unwrap_or_else(|| Value::Object(Default::default()))
                .to_string(),
            timeout: dur(self.timeout, "timeout")?,
            memory,
            delay: dur(self.delay, "delay")?,
            priority: self.priority.unwrap_or(0),
            max_attempts: self.max_attempts,
            idempotency_key: self.idempotency_key,
        };
        spec.validate(1 << 20).map_err(|e| {
            let mut err = ApiError::from(e);
            err.message = at(err.message);
            err
        })?;
        Ok(spec)
    }
}

/// Longest timeout or delay the enqueue script takes, in ms (about 31,700 years).
const MAX_MS: u128 = 1_000_000_000_000_000;

/// Timeouts and delays go to the queue in whole milliseconds: refuse what
/// would not arrive as written (a fraction of a millisecond, where a
/// timeout of `0.5ms` would become 0 = the kind's default; or more ms than
/// fit, which wrapped around to a short timeout).
fn check_ms(d: std::time::Duration) -> Result<std::time::Duration, &'static str> {
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        Err("is not a whole number of milliseconds")
    } else if d.as_millis() > MAX_MS {
        Err("is too long: at most 1000000000000000ms")
    } else {
        Ok(d)
    }
}

/// A decoded enqueue request.
#[derive(Clone, Debug)]
pub struct Decoded {
    /// The jobs, tenant taken from the key.
    pub specs: Vec<JobSpec>,
    /// Whether the body was a batch (`[...]` or `{"jobs": [...]}`): a batch
    /// is answered with a list, one job with one object.
    pub batch: bool,
}

/// Decode a request body: one job object, `{"jobs": [...]}` or `[...]`.
pub fn decode_jobs(tenant: &str, body: &[u8]) -> Result<Decoded, ApiError> {
    let PlainJson(v) = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("body is not valid JSON: {e}")))?;
    let (items, batch) = match v {
        Value::Array(items) => (items, true),
        Value::Object(mut o) if o.contains_key("jobs") => match o.remove("jobs") {
            Some(Value::Array(items)) if o.is_empty() => (items, true),
            _ => {
                return Err(ApiError::bad(
                    "\"jobs\" must be an array of jobs and the only field",
                ));
            }
        },
        obj @ Value::Object(_) => (vec![obj], false),
        _ => {
            return Err(ApiError::bad(
                "body must be a job object, an array of jobs or {\"jobs\": [...]}",
            ));
        }
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("a batch holds 1..={MAX_BATCH} jobs"),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let n = if batch { i + 1 } else { 0 };
            let job: ApiJob = serde_json::from_value(item).map_err(|e| {
                ApiError::bad(if batch {
                    format!("job {n}: {e}")
                } else {
                    e.to_string()
                })
            })?;
            job.into_spec(tenant, n)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|specs| Decoded { specs, batch })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shapes_decode() {
        let Decoded { specs: one, batch } = decode_jobs(
            "t",
            br#"{"queue":"q","kind":"echo","payload":{"a":1},"timeout":"30s"}"#,
        )
        .unwrap();
        assert!(!batch);
        assert_eq!(
            (one[0].tenant.as_str(), one[0].payload.as_str()),
            ("t", r#"{"a":1}"#)
        );
        assert_eq!(
            decode_jobs(
                "t",
                br#"[{"queue":"q","kind":"k"},{"queue":"q","kind":"k"}]"#
            )
            .unwrap()
            .specs
            .len(),
            2
        );
        assert!(
            decode_jobs("t", br#"{"jobs":[{"queue":"q","kind":"k"}]}"#)
                .unwrap()
                .batch
        );
    }

    #[test]
    fn bad_bodies_are_400_or_413_with_a_reason() {
        for (body, status, needle) in [
            (&b"{nope"[..], 400, "not valid JSON"),
            (
                br#"{"queue":"q","kind":"k","tenant":"other"}"#,
                400,
                "tenant comes from the API key",
            ),
            (
                br#"{"queue":"q","kind":"k","colour":"red"}"#,
                400,
                "unknown field",
            ),
            (br#"{"queue":"q q","kind":"k"}"#, 400, "queue"),
            (
                br#"{"queue":"q","kind":"k","timeout":"soon"}"#,
                400,
                "timeout",
            ),
            (br#"[]"#, 400, "1..="),
            (br#"42"#, 400, "body must be"),
        ] {
            let e = decode_jobs("t", body).unwrap_err();
            assert_eq!(
                e.status().as_u16(),
                status,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(
                e.message.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
        let big = format!(
            r#"{{"queue":"q","kind":"k","payload":"{}"}}"#,
            "x".repeat(2 << 20)
        );
        assert_eq!(
            decode_jobs("t", big.as_bytes())
                .unwrap_err()
                .status()
                .as_u16(),
            413
        );
    }

    /// Found by `fuzz/` (target `job_decoder`): durations are sent to the
    /// enqueue script in whole ms (`as_millis() as u64`), so `0.5ms` went out
    /// as 0 (the kind's default timeout) and `18446744073709552s` wrapped to
    /// a 384 ms timeout that passed every cap.
    #[test]
    fn durations_arrive_as_written_or_are_refused() {
        for (body, needle) in [
            (
                r#"{"queue":"q","kind":"k","timeout":"0.5ms"}"#,
                "whole number of milliseconds",
            ),
            (
                r#"{"queue":"q","kind":"k","delay":"1.0005s"}"#,
                "whole number of milliseconds",
            ),
            (
                r#"{"queue":"q","kind":"k","timeout":"18446744073709552s"}"#,
                "too long",
            ),
            (
                r#"{"queue":"q","kind":"k","timeout":"2826180644664.689s"}"#,
                "too long",
            ),
            (
                r#"{"queue":"q","kind":"k","delay":"99999999999999d"}"#,
                "too long",
            ),
        ] {
            let e = decode_jobs("t", body.as_bytes()).unwrap_err();
            assert_eq!(e.status().as_u16(), 400, "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        let Decoded { specs, .. } = decode_jobs(
            "t",
            br#"{"queue":"q","kind":"k","timeout":"1.5s","delay":"1000000000000000ms"}"#,
        )
        .unwrap();
        let wire = specs[0].wire_fields();
        assert_eq!(
            (wire[4].as_str(), wire[6].as_str()),
            ("1500", "1000000000000000")
        );
    }

    /// The payload reaches the task as sent, even an object whose key is
    /// serde_json's raw-value token (its Value parser, feature raw_value,
    /// replaced `{"$serde_json::private::RawValue": "[1]"}` with `[1]`).
    #[test]
    fn payload_objects_stay_objects() {
        let body =
            br#"{"queue":"q","kind":"k","payload":{"$serde_json::private::RawValue":"[1]"}}"#;
        let Decoded { specs, .. } = decode_jobs("t", body).unwrap();
        assert_eq!(
            specs[0].payload,
            r#"{"$serde_json::private::RawValue":"[1]"}"#
        );
        let e = decode_jobs(
            "t",
            br#"{"$serde_json::private::RawValue":"{\"queue\":\"q\",\"kind\":\"k\"}"}"#,
        )
        .unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
        // Found by tests/proptests.rs: an explicit null payload became {}.
        let Decoded { specs, .. } =
            decode_jobs("t", br#"{"queue":"q","kind":"k","payload":null}"#).unwrap();
        assert_eq!(specs[0].payload, "null");
        let Decoded { specs, .. } = decode_jobs("t", br#"{"queue":"q","kind":"k"}"#).unwrap();
        assert_eq!(specs[0].payload, "{}");
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = decode_jobs("t", &body) {
                prop_assert!(e.status().is_client_error());
            }
        }

        #[test]
        fn random_json_never_panics(
            queue in ".{0,80}", kind in ".{0,80}", timeout in ".{0,12}", prio in any::<i32>(), attempts in any::<u32>(),
        ) {
            let body = serde_json::json!({"queue": queue, "kind": kind, "timeout": timeout, "priority": prio, "max_attempts": attempts});
            if let Err(e) = decode_jobs("t", body.to_string().as_bytes()) {
                prop_assert!(e.status().is_client_error());
            }
        }
    }
}
