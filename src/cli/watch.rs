//! `agentq watch`, `agentq jobs --follow` (its following half) and
//! `agentq job-events`: job events on the command line, read through the
//! Rust client's followers ([`crate::client`]) so the CLI and the client
//! share one implementation.

use std::io::Write;
use std::time::Duration;

use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde_json::Value;

use super::output;
use super::{CliError, CliResult, Global, duration_arg};
use crate::client::{Client, Followed, JobFollow};
use crate::model::job_event::{EventId, JobEvent, JobEventType};
use crate::queue::inspect::{JobState, rfc3339_ms};
use crate::queue::job::validate_name;
use crate::queue::{Queue, QueueError};

/// Exit codes of `agentq watch` (its `--help`).
pub const WATCH_EXIT_CODES: &str = "Exit codes: 0 the job succeeded; 3 it went dead; \
4 it was cancelled; 5 --timeout ran out first (the job is still running or waiting); \
2 no such job or bad input; 1 Redis unreachable when it started.";

/// Exit code: the job went dead.
const EXIT_DEAD: u8 = 3;
/// Exit code: the job was cancelled.
const EXIT_CANCELLED: u8 = 4;
/// Exit code: the timeout ran out before the job ended.
const EXIT_TIMEOUT: u8 = 5;

/// `agentq watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Job id (as printed by enqueue).
    id: String,
    /// One JSON event per line (as GET /v1/jobs/{id}/events sends them).
    #[arg(long)]
    json: bool,
    /// Give up after this long, e.g. 10m (default: wait until the job ends).
    #[arg(long, value_parser = duration_arg)]
    timeout: Option<Duration>,
}

/// Print a job's events from its enqueue until it ends; the exit code says
/// how it ended.
pub(super) async fn watch(g: &Global, a: WatchArgs) -> CliResult {
    let client = Client::from_queue(g.queue().await?);
    let mut follow = JobFollow::new(client, &a.id);
    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut end = None;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, follow.next()).await {
                Ok(next) => next,
                Err(_) => return timed_out(&a),
            },
            None => follow.next().await,
        };
        match next {
            None => break,
            Some(Ok(f)) => {
                end = Some(f.event.kind);
                emit(&watch_line(&f, a.json))?;
            }
            Some(Err(e)) if e.is_input() => return Err(e.into()),
            // Redis went away: the follower resumes where it stood.
            Some(Err(e)) => eprintln!("warning: reading job events failed ({e}); retrying"),
        }
    }
    match end {
        Some(JobEventType::Succeeded) => Ok(()),
        Some(JobEventType::Cancelled) => Err(CliError::Exit(EXIT_CANCELLED)),
        _ => Err(CliError::Exit(EXIT_DEAD)),
    }
}

fn timed_out(a: &WatchArgs) -> CliResult {
    let waited = a.timeout.map(crate::model::units::format_duration);
    eprintln!(
        "timed out after {}: job {} has not ended",
        waited.unwrap_or_default(),
        a.id
    );
    Err(CliError::Exit(EXIT_TIMEOUT))
}

/// One line of `agentq watch`.
fn watch_line(f: &Followed, json: bool) -> String {
    if json {
        let mut v = serde_json::to_value(&f.event).unwrap_or(Value::Null);
        if f.from_record {
            v["from_record"] = Value::Bool(true);
        }
        return v.to_string();
    }
    let mut line = format!("{}  {}", time_of(&f.event), describe(&f.event));
    if f.from_record {
        line.push_str("  (from the job record: its queue's events are off or were trimmed)");
    }
    line
}

/// Redis time of an event, RFC 3339 with ms.
fn time_of(e: &JobEvent) -> String {
    rfc3339_ms(e.at as i64).unwrap_or_else(|| e.at.to_string())
}

/// Type, attempt, and what the event says, short: one line.
fn describe(e: &JobEvent) -> String {
    let mut parts = vec![format!("{:<9}", e.kind.as_str())];
    if let Some(a) = e.attempt {
        parts.push(format!("attempt {a}"));
    }
    // "failed  failed" says nothing twice: only an outcome that adds to the type.
    if let Some(o) = e.outcome.as_ref().filter(|o| o.as_str() != e.kind.as_str()) {
        parts.push(o.clone());
    }
    if e.error.is_some() {
        parts.push(output::first_line(&e.error, 80));
    }
    for v in [&e.progress, &e.result].into_iter().flatten() {
        parts.push(short_json(v, 80));
    }
    if let Some(n) = e.result_bytes {
        parts.push(format!("result of {n} bytes (agentq inspect shows it)"));
    }
    if let Some(at) = e.run_at {
        let when = rfc3339_ms(at as i64).unwrap_or_else(|| at.to_string());
        parts.push(format!("runs at {when}"));
    }
    parts.join("  ").trim_end().to_string()
}

/// Compact JSON cut to `max` characters.
fn short_json(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() <= max {
        return s;
    }
    s.chars().take(max.saturating_sub(3)).collect::<String>() + "..."
}

/// Print one line; a closed stdout (`| head`) ends the command quietly.
fn emit(line: &str) -> CliResult {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::Exit(0)),
        Err(e) => Err(CliError::Runtime(e.into())),
    }
}

/// What `agentq jobs --follow` follows, fixed before the listing is read
/// so that no change during the listing is missed.
pub(super) struct JobsFollow {
    client: Client,
    tenant: Option<String>,
    after: EventId,
    queue: String,
    state: Option<JobState>,
}

impl JobsFollow {
    /// Start following `queue`'s events (of `tenant`, or of every tenant)
    /// from now.
    pub(super) async fn start(
        q: &Queue,
        queue: &str,
        tenant: Option<&str>,
        state: Option<JobState>,
    ) -> Result<JobsFollow, QueueError> {
        let after = match tenant {
            Some(t) => q.job_events_head(t).await?,
            None => EventId {
                ms: q.server_time().await?.timestamp_millis().max(0) as u64,
                seq: 0,
            },
        };
        Ok(JobsFollow {
            client: Client::from_queue(q.clone()),
            tenant: tenant.map(str::to_string),
            after,
            queue: queue.to_string(),
            state,
        })
    }

    /// Print matching events until Ctrl-C.
    pub(super) async fn run(self, json: bool) -> CliResult {
        let events = match &self.tenant {
            Some(t) => {
                let t = t.clone();
                let s = self.client.tenant_events(&t, Some(self.after));
                s.map(move |r| r.map(|e| (t.clone(), e))).boxed()
            }
            None => self.client.all_events(Some(self.after)).boxed(),
        };
        tokio::select! {
            r = self.print(events, json) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    }

    async fn print(
        &self,
        mut events: futures::stream::BoxStream<'static, Result<(String, JobEvent), QueueError>>,
        json: bool,
    ) -> CliResult {
        while let Some(item) = events.next().await {
            match item {
                Ok((tenant, e)) if self.wanted(&e) => emit(&jobs_line(&tenant, &e, json))?,
                Ok(_) => {}
                Err(e) if e.is_input() => return Err(e.into()),
                Err(e) => eprintln!("warning: reading job events failed ({e}); retrying"),
            }
        }
        Ok(())
    }

    /// The listing's filters, applied to events: the queue, and the events
    /// that bring a job into the `--state` asked for.
    fn wanted(&self, e: &JobEvent) -> bool {
        use JobEventType as T;
        e.queue == self.queue
            && match self.state {
                None => true,
                Some(JobState::Ready) => e.kind == T::Enqueued && e.run_at.is_none(),
                Some(JobState::Delayed) => {
                    e.kind == T::Retrying || (e.kind == T::Enqueued && e.run_at.is_some())
                }
                Some(JobState::Running) => matches!(e.kind, T::Started | T::Progress),
                Some(JobState::Dead) => e.kind == T::Dead,
            }
    }
}

/// One line of `agentq jobs --follow`: the event and its tenant.
fn jobs_line(tenant: &str, e: &JobEvent, json: bool) -> String {
    if json {
        let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
        v["tenant"] = Value::String(tenant.to_string());
        return v.to_string();
    }
    format!("{}  {tenant}  {}  {}", time_of(e), e.job, describe(e))
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Publish the queue's job events (the default).
    On,
    /// Publish none.
    Off,
}

/// `agentq job-events`.
#[derive(Debug, Args)]
pub struct JobEventsArgs {
    /// Queue name.
    queue: String,
    /// on: its jobs' state changes are published as job events (default);
    /// off: nothing is written to the tenant streams for them (watchers
    /// fall back to reading the job). Omitted: show the setting.
    #[arg(value_enum)]
    state: Option<OnOff>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn job_events(g: &Global, a: JobEventsArgs) -> CliResult {
    validate_name("queue", &a.queue)?;
    let q = g.queue().await?;
    if let Some(s) = a.state {
        q.set_job_events(&a.queue, s == OnOff::On).await?;
    }
    let on = q.job_events_on(&a.queue).await?;
    if a.json {
        output::json(&serde_json::json!({ "queue": a.queue, "job_events": on }));
    } else {
        let word = if on { "on" } else { "off" };
        println!("queue {}: job events {word}", a.queue);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, fields: &[(&str, &str)]) -> JobEvent {
        let mut all = vec![("job", "0-ab"), ("type", kind), ("queue", "q")];
        all.extend_from_slice(fields);
        JobEvent::from_fields("1733000000000-0", all).expect("event")
    }

    #[test]
    fn lines_say_type_attempt_and_outcome_in_one_line() {
        let failed = event(
            "failed",
            &[
                ("attempt", "2"),
                ("outcome", "failed"),
                ("error", "boom\nmore"),
            ],
        );
        let line = describe(&failed);
        assert!(line.starts_with("failed"), "{line}");
        assert!(
            line.contains("attempt 2") && line.contains("boom"),
            "{line}"
        );
        assert!(!line.contains('\n') && !line.contains("more"), "{line}");
        let done = event("succeeded", &[("result", &"x".repeat(500))]);
        assert!(
            describe(&done).chars().count() < 120,
            "results are cut short"
        );
        let f = Followed {
            event: done,
            from_record: true,
        };
        let v: Value = serde_json::from_str(&watch_line(&f, true)).expect("json line");
        assert_eq!(
            (v["type"].as_str(), v["from_record"].as_bool()),
            (Some("succeeded"), Some(true))
        );
        assert!(
            watch_line(&f, false).starts_with("2024-11-30T"),
            "RFC 3339 time first"
        );
    }
}
