//! The HTTP job format and its decoder (pure, so it can be fuzzed).

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use super::ApiError;
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
    /// Any JSON value.
    #[serde(default)]
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
                crate::units::parse_duration(&s)
                    .map_err(|e| ApiError::bad(at(format!("{what}: {e}"))))
            })
            .transpose()
        };
        let memory = self
            .memory
            .map(|s| {
                crate::units::parse_size(&s).map_err(|e| ApiError::bad(at(format!("memory: {e}"))))
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

/// Decode a request body: one job object, `{"jobs": [...]}` or `[...]`.
/// Returns the specs (tenant from the key) and whether it was a batch.
pub fn decode_jobs(tenant: &str, body: &[u8]) -> Result<(Vec<JobSpec>, bool), ApiError> {
    let v: Value = serde_json::from_slice(body)
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
        .map(|specs| (specs, batch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shapes_decode() {
        let (one, batch) = decode_jobs(
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
            .0
            .len(),
            2
        );
        assert!(
            decode_jobs("t", br#"{"jobs":[{"queue":"q","kind":"k"}]}"#)
                .unwrap()
                .1
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
