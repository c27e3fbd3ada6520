//! Job events: one state change of one job, as the scripts append it to
//! the job's tenant stream (`lib/feed.lua`) and as every reader (SSE,
//! WebSocket, `agentq watch`, the clients) hands it on.
//!
//! Property: [`JobEvent::from_fields`] turns any field list, whatever its
//! bytes, into an event or `None`; it never panics, and the JSON a reader
//! sends for an event is always valid (a `result` or `progress` that is not
//! JSON is sent as a string).
//!
//! [`EventId`] is a position in a tenant's stream (`<ms>-<seq>`, Redis's
//! stream ids): what a client resumes from (`Last-Event-ID`, `?after=`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What happened to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobEventType {
    /// Added to its queue (`run_at` when delayed).
    Enqueued,
    /// An attempt started (`attempt`).
    Started,
    /// A running attempt reported progress (`progress`).
    Progress,
    /// An attempt failed (`outcome`, `error`); a `retrying` or `dead` follows.
    Failed,
    /// The job will run again (`run_at`).
    Retrying,
    /// An attempt succeeded (`result`): the job is done.
    Succeeded,
    /// The job failed for good (dead-lettered).
    Dead,
    /// The job was cancelled, queued or running.
    Cancelled,
    /// A type this version does not know (a newer script).
    #[serde(other)]
    Unknown,
}

impl JobEventType {
    /// Parse a stream's `type` field.
    pub fn parse(s: &str) -> JobEventType {
        match s {
            "enqueued" => Self::Enqueued,
            "started" => Self::Started,
            "progress" => Self::Progress,
            "failed" => Self::Failed,
            "retrying" => Self::Retrying,
            "succeeded" => Self::Succeeded,
            "dead" => Self::Dead,
            "cancelled" => Self::Cancelled,
            _ => Self::Unknown,
        }
    }

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueued => "enqueued",
            Self::Started => "started",
            Self::Progress => "progress",
            Self::Failed => "failed",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
            Self::Unknown => "unknown",
        }
    }

    /// Whether the job has ended with this event (succeeded, dead or
    /// cancelled). A dead job retried by an operator starts again with
    /// `retrying`.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead | Self::Cancelled)
    }
}

/// A position in a tenant's event stream: Redis's `<ms>-<seq>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    /// Redis time of the event, ms.
    pub ms: u64,
    /// Its order within that ms.
    pub seq: u64,
}

impl EventId {
    /// Before every event.
    pub const START: EventId = EventId { ms: 0, seq: 0 };

    /// Parse `<ms>-<seq>` or `<ms>` (seq 0); None for anything else.
    pub fn parse(s: &str) -> Option<EventId> {
        let s = s.trim();
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(EventId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One job event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Its position in the tenant's stream (`<ms>-<seq>`): resume after it.
    pub id: String,
    /// The job.
    pub job: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: JobEventType,
    /// The job's queue.
    pub queue: String,
    /// When (Redis time, ms since the epoch).
    pub at: u64,
    /// The attempt (absent for enqueued, and for cancels and retries of a
    /// job that was not running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
    /// How the attempt ended (failed events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The attempt's error (failed events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The task's result (succeeded events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// A result too large for the event (over the partition's
    /// `events_result_max`, 16 KiB): its size in bytes. Read it from the
    /// job (`GET /v1/jobs/{id}`) while the job is retained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_bytes: Option<u64>,
    /// The task's report (progress events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
    /// When the job runs (enqueued with a delay, retrying), ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<u64>,
}

impl JobEvent {
    /// Build an event from a stream entry: its id and its field/value
    /// pairs. None when the id is not a stream id or job, type or queue is
    /// missing; unknown fields are ignored.
    pub fn from_fields<'a>(
        id: &str,
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<JobEvent> {
        let at = EventId::parse(id)?.ms;
        let (mut job, mut kind, mut queue) = (None, None, None);
        let mut e = JobEvent {
            id: id.to_string(),
            job: String::new(),
            kind: JobEventType::Unknown,
            queue: String::new(),
            at,
            attempt: None,
            outcome: None,
            error: None,
            result: None,
            result_bytes: None,
            progress: None,
            run_at: None,
        };
        for (f, v) in fields {
            match f {
                "job" => job = Some(v),
                "type" => kind = Some(v),
                "queue" => queue = Some(v),
                "attempt" => e.attempt = v.parse().ok(),
                "outcome" => e.outcome = Some(v.to_string()),
                "error" => e.error = Some(v.to_string()),
                "result" => e.result = Some(json_or_text(v)),
                "result_bytes" => e.result_bytes = v.parse().ok(),
                "progress" => e.progress = Some(json_or_text(v)),
                "run_at" => e.run_at = v.parse().ok(),
                _ => {}
            }
        }
        e.job = job?.to_string();
        e.kind = JobEventType::parse(kind?);
        e.queue = queue?.to_string();
        Some(e)
    }
}

/// A stored JSON text as JSON; anything else as a string.
fn json_or_text(v: &str) -> Value {
    serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_parse_strictly() {
        assert_eq!(
            EventId::parse("1733000000000-7"),
            Some(EventId {
                ms: 1_733_000_000_000,
                seq: 7
            })
        );
        assert_eq!(EventId::parse("12"), Some(EventId { ms: 12, seq: 0 }));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "x",
            "1-x",
            "+",
            "$",
            "99999999999999999999999",
        ] {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            EventId::parse("5-1").map(|e| e.to_string()).as_deref(),
            Some("5-1")
        );
        assert!(EventId::parse("5-2") > EventId::parse("5-1"));
    }

    #[test]
    fn entries_become_events() {
        let e = JobEvent::from_fields(
            "10-1",
            [
                ("job", "0-ab"),
                ("type", "succeeded"),
                ("queue", "q"),
                ("attempt", "2"),
                ("result", "{\"ok\":true}"),
                ("new_field", "x"),
            ],
        )
        .expect("event");
        assert_eq!(e.kind, JobEventType::Succeeded);
        assert!(e.kind.is_final());
        assert_eq!(e.at, 10);
        assert_eq!(e.attempt, Some(2));
        assert_eq!(e.result, Some(serde_json::json!({"ok": true})));
        let wire = serde_json::to_value(&e).expect("json");
        assert_eq!(wire["type"], "succeeded");
        assert!(wire.get("error").is_none());

        let odd = JobEvent::from_fields(
            "10-2",
            [
                ("job", "0-ab"),
                ("type", "later"),
                ("queue", "q"),
                ("progress", "\u{1}not json"),
            ],
        )
        .expect("event");
        assert_eq!(odd.kind, JobEventType::Unknown);
        assert_eq!(odd.progress, Some(Value::String("\u{1}not json".into())));
        assert!(JobEvent::from_fields("10-3", [("type", "started"), ("queue", "q")]).is_none());
        assert!(
            JobEvent::from_fields("nope", [("job", "j"), ("type", "started"), ("queue", "q")])
                .is_none()
        );
    }
}
