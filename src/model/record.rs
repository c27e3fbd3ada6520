//! One attempt's usage record: the outbox entry a completing script writes
//! (`lib.lua`, `outbox()`) and the ledger row it becomes.
//!
//! An entry is packed into two stream fields (`r`: the values in
//! [`PACKED_FIELDS`] order joined by tabs, the worker id last so nothing it
//! holds can shift the others; `e`: the error text), far cheaper for the
//! script than one field per value. Entries written by earlier versions,
//! one field per value, still parse. Property: [`Record::from_fields`]
//! never panics, and refuses (None) an entry without a job id, an attempt
//! of 1 or more, or an outcome.

use std::collections::HashMap;

/// Order of the values in a packed outbox entry (`lib.lua`, `outbox()`);
/// the worker id is last so that nothing it contains can shift the others.
pub const PACKED_FIELDS: [&str; 20] = [
    "job",
    "attempt",
    "tenant",
    "queue",
    "kind",
    "outcome",
    "enqueued_at",
    "started_at",
    "finished_at",
    "wait_ms",
    "run_ms",
    "cpu_ms",
    "peak_rss",
    "exit_code",
    "signal",
    "api_calls",
    "input_tokens",
    "output_tokens",
    "cost_micros",
    "worker",
];

/// An outbox entry's fields by name (`job`, `attempt`, ..., `error`), whether
/// the entry is packed or written by an earlier version field by field.
pub fn outbox_fields(mut f: HashMap<String, String>) -> HashMap<String, String> {
    match f.remove("r") {
        Some(packed) => {
            let mut u = unpack(&packed, f.get("e").map_or("", |e| e.as_str()));
            if let Some(b) = f.remove("b") {
                u.insert("billing".into(), b);
            }
            u
        }
        None => f,
    }
}

fn unpack(packed: &str, error: &str) -> HashMap<String, String> {
    let mut f: HashMap<String, String> = PACKED_FIELDS
        .iter()
        .zip(packed.splitn(PACKED_FIELDS.len(), '\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    f.insert("error".into(), error.to_string());
    f
}

/// One attempt's usage record, as stored in the outbox and the ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Job id.
    pub job_id: String,
    /// Attempt number.
    pub attempt: i32,
    /// Tenant.
    pub tenant: String,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Outcome.
    pub outcome: String,
    /// Times, ms since the epoch (Redis clock).
    pub enqueued_at: i64,
    /// Start of the attempt.
    pub started_at: i64,
    /// End of the attempt (when its slot was released).
    pub finished_at: i64,
    /// Wait from ready to start.
    pub wait_ms: i64,
    /// Wall time of the attempt.
    pub run_ms: i64,
    /// CPU time.
    pub cpu_ms: i64,
    /// Peak RSS.
    pub peak_rss_bytes: i64,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Signal.
    pub signal: Option<i32>,
    /// Worker id.
    pub worker: String,
    /// Reported API calls.
    pub api_calls: i64,
    /// Reported input tokens.
    pub input_tokens: i64,
    /// Reported output tokens.
    pub output_tokens: i64,
    /// Price of the attempt at its tenant's rates, micro-dollars.
    pub cost_micros: i64,
    /// Error text.
    pub error: String,
    /// How the attempt was priced, for tenants with price steps (stream
    /// field `b`, column `billing`; empty for everyone else): words
    /// `u<ms before>`, `k<tokens before>` (the month's usage before the
    /// attempt) and `m|t<from>:<micros>:<qty>:<amount>` (agent ms or tokens
    /// priced in the step starting at `from`, at `micros` per minute or per
    /// 1,000 tokens, for `amount` micro-dollars). The amounts sum to
    /// `cost_micros`.
    pub billing: String,
}

impl Record {
    /// Parse an outbox entry's fields; None if the entry is malformed.
    ///
    /// Entries are packed (`r`: the values in [`PACKED_FIELDS`] order joined
    /// by tabs, worker id last; `e`: the error text), one field per entry
    /// being far cheaper for the completing script than 21. Entries written
    /// by earlier versions, one stream field per record field, still parse.
    pub fn from_fields(f: &HashMap<String, String>) -> Option<Record> {
        match f.get("r") {
            Some(packed) => Self::from_packed(
                packed,
                f.get("e").map_or("", |e| e.as_str()),
                f.get("b").map_or("", |b| b.as_str()),
            ),
            None => Self::from_named(f),
        }
    }

    fn from_packed(packed: &str, error: &str, billing: &str) -> Option<Record> {
        let mut f = unpack(packed, error);
        if f.len() != PACKED_FIELDS.len() + 1 {
            return None;
        }
        f.insert("billing".into(), billing.to_string());
        Self::from_named(&f)
    }

    fn from_named(f: &HashMap<String, String>) -> Option<Record> {
        let n = |k: &str| f.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let opt = |k: &str| f.get(k).and_then(|v| v.parse::<i32>().ok());
        let s = |k: &str| f.get(k).cloned().unwrap_or_default();
        let r = Record {
            job_id: f.get("job")?.clone(),
            attempt: f.get("attempt")?.parse().ok()?,
            tenant: s("tenant"),
            queue: s("queue"),
            kind: s("kind"),
            outcome: f.get("outcome")?.clone(),
            enqueued_at: n("enqueued_at"),
            started_at: n("started_at"),
            finished_at: n("finished_at"),
            wait_ms: n("wait_ms"),
            run_ms: n("run_ms"),
            cpu_ms: n("cpu_ms"),
            peak_rss_bytes: n("peak_rss"),
            exit_code: opt("exit_code"),
            signal: opt("signal"),
            worker: s("worker"),
            api_calls: n("api_calls"),
            input_tokens: n("input_tokens"),
            output_tokens: n("output_tokens"),
            cost_micros: n("cost_micros"),
            error: s("error"),
            billing: s("billing"),
        };
        (r.attempt >= 1).then_some(r)
    }
}

/// Why an outbox entry was set aside: the `reason` column of
/// `usage_ledger_rejects` and the label of `agentq_ledger_rejects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// Refused by PostgreSQL; a copy with its text cleaned is in the ledger.
    Repaired,
    /// Refused by PostgreSQL even cleaned: not in the ledger.
    Unrepairable,
    /// Not a usage record: not in the ledger.
    Malformed,
}

impl RejectReason {
    /// Every reason (metrics start each at zero).
    pub const ALL: [RejectReason; 3] = [
        RejectReason::Repaired,
        RejectReason::Unrepairable,
        RejectReason::Malformed,
    ];

    /// The name stored and used as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Repaired => "repaired",
            RejectReason::Unrepairable => "unrepairable",
            RejectReason::Malformed => "malformed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(worker: &str) -> HashMap<String, String> {
        let values = [
            "0-1a", "2", "acme", "q", "echo", "failed", "1000", "1500", "1700", "5", "200", "30",
            "4096", "1", "", "0", "10", "20", "33", worker,
        ];
        HashMap::from([
            ("r".to_string(), values.join("\t")),
            ("e".to_string(), "exit 1\twith a tab".to_string()),
        ])
    }

    #[test]
    fn packed_entries_parse_with_the_worker_last() {
        let r = Record::from_fields(&packed("host-1\tweird")).expect("parses");
        assert_eq!((r.job_id.as_str(), r.attempt), ("0-1a", 2));
        assert_eq!((r.tenant.as_str(), r.outcome.as_str()), ("acme", "failed"));
        assert_eq!((r.started_at, r.finished_at, r.run_ms), (1500, 1700, 200));
        assert_eq!((r.exit_code, r.signal, r.cost_micros), (Some(1), None, 33));
        assert_eq!(r.worker, "host-1\tweird");
        assert_eq!(r.error, "exit 1\twith a tab");
    }

    #[test]
    fn the_billing_field_is_optional() {
        let mut f = packed("w");
        assert_eq!(Record::from_fields(&f).expect("parses").billing, "");
        f.insert("b".into(), "u0 m0:10000:60000:10000".into());
        let r = Record::from_fields(&f).expect("parses");
        assert_eq!(
            (r.billing.as_str(), r.cost_micros),
            ("u0 m0:10000:60000:10000", 33)
        );
        let named = outbox_fields(f);
        assert_eq!(
            named.get("billing").map(String::as_str),
            Some("u0 m0:10000:60000:10000")
        );
    }

    #[test]
    fn short_packed_entries_are_malformed_and_named_ones_still_parse() {
        let short = HashMap::from([("r".to_string(), "0-1a\t2\tacme".to_string())]);
        assert!(Record::from_fields(&short).is_none());
        let named = outbox_fields(packed("w"));
        assert_eq!(named.get("tenant").map(String::as_str), Some("acme"));
        let legacy = Record::from_fields(&named).expect("field-per-field entries parse");
        assert_eq!(legacy.attempt, 2);
    }
}
