//! Per-tenant recurring schedules: a job enqueued at every slot of a cron
//! expression (in an IANA time zone) or of a fixed interval.
//!
//! A schedule lives in its tenant's partition: hash
//! `B:schedule:<tenant>:<name>` (its spec and what it last did), member
//! `<tenant>:<name>` of zset `B:schedules` scored by its next-due slot (ms,
//! the one record of when it is due), and `<name>` in set
//! `B:schedules:<tenant>` (a tenant's listing reads only its own).
//!
//! Lua cannot read cron expressions, so the Rust side computes slots
//! ([`Recurrence`], [`plan`]) and `schedule_fire.lua` decides: it fires a
//! slot only when the schedule's next-due still is the slot the caller read
//! (compare-and-set), by Redis's clock, enqueueing the job exactly as
//! `enqueue.lua` does (`lib/jobs.lua`) in the same call. However many
//! workers run the duty ([`crate::duties::schedules`]), each slot fires at
//! most once; a call repeated after a lost reply finds next-due moved and
//! does nothing.
//!
//! Missed slots (nothing ran the duty for a while): a slot is *late* while
//! it is at most the grace period (duty config, default 60 s) old by Redis's
//! clock, and *missed* after that. Late slots fire one by one, in order,
//! under both policies. Missed slots:
//! - `skip` (default): fire nothing for them; the schedule moves to its
//!   first slot that is not missed (firing it in the same call if it is due);
//! - `once`: fire one job for all of them, for the latest missed slot; the
//!   schedule moves to the slot after it.
//!
//! Crates: [`croner`] reads the cron expressions (Vixie-cron syntax with
//! an optional seconds field, `MON-FRI`, `L`, `#`, `@daily`; kept up,
//! 4.x in 2025/26) and searches occurrences on an absolute time line in any
//! `chrono` time zone, handling DST gaps and repeated hours explicitly,
//! where the `cron` crate needs a seconds field (so `0 9 * * MON-FRI` is
//! refused); [`chrono_tz`] provides the IANA zones.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use fred::prelude::*;
use serde::Serialize;

use super::job::{JobSpec, validate_name};
use super::{Queue, QueueError, ScriptName, strings};

/// The shortest interval of an `every` schedule.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// The longest interval of an `every` schedule.
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 86_400);
/// Where a schedule that can never fire again is parked: 9999-12-31 (ms).
const NEVER_MS: i64 = 253_402_300_799_000;

/// When a schedule's slots fall.
#[derive(Clone, Debug)]
pub enum Recurrence {
    /// Every `ms` milliseconds, aligned to the Unix epoch (UTC): `every 5m`
    /// fires at :00, :05, ...; `every 1h` on the hour (UTC).
    Every {
        /// The interval in ms.
        ms: i64,
    },
    /// The occurrences of a cron expression in a time zone.
    Cron {
        /// The expression as given.
        expr: String,
        /// The zone its wall-clock times are read in.
        tz: Tz,
        /// The parsed expression.
        cron: Box<Cron>,
    },
}

impl Recurrence {
    /// An interval schedule; 1 s to 366 days.
    pub fn every(d: Duration) -> Result<Recurrence, QueueError> {
        if d < MIN_EVERY || d > MAX_EVERY {
            return Err(QueueError::Invalid(format!(
                "interval {} ms is out of range: use 1s to 366d (e.g. --every 5m)",
                d.as_millis()
            )));
        }
        Ok(Recurrence::Every {
            ms: d.as_millis() as i64,
        })
    }

    /// A cron schedule: `expr` (5 fields, or 6 with seconds first) read in
    /// IANA zone `tz` (e.g. `Europe/Paris`, `UTC`).
    pub fn cron(expr: &str, tz: &str) -> Result<Recurrence, QueueError> {
        let zone = Tz::from_str(tz).map_err(|_| {
            QueueError::Invalid(format!(
                "unknown time zone {tz:?}: use an IANA name such as Europe/Paris, \
                 America/New_York or UTC"
            ))
        })?;
        let cron = Cron::from_str(expr).map_err(|e| {
            QueueError::Invalid(format!(
                "bad cron expression {expr:?}: {e}; use 5 fields (minute hour day-of-month \
                 month day-of-week, e.g. \"0 9 * * MON-FRI\") or 6 with seconds first"
            ))
        })?;
        let r = Recurrence::Cron {
            expr: expr.trim().to_string(),
            tz: zone,
            cron: Box::new(cron),
        };
        // A pattern that matches nothing (30 February) would never fire.
        if r.next_after(0).is_none() && r.next_after(Utc::now().timestamp_millis()).is_none() {
            return Err(QueueError::Invalid(format!(
                "cron expression {expr:?} never matches a date: check the day and month fields"
            )));
        }
        Ok(r)
    }

    fn at(tz: &Tz, secs: i64) -> Option<DateTime<Tz>> {
        tz.timestamp_opt(secs, 0).single()
    }

    /// The first slot strictly after `ms`.
    pub fn next_after(&self, ms: i64) -> Option<i64> {
        match self {
            Recurrence::Every { ms: e } => Some((ms.div_euclid(*e) + 1) * e),
            Recurrence::Cron { tz, cron, .. } => {
                let start = Self::at(tz, ms.div_euclid(1000))?;
                let next = cron.find_next_occurrence(&start, false).ok()?;
                Some(next.timestamp_millis())
            }
        }
    }

    /// The first slot at or after `ms`.
    pub fn at_or_after(&self, ms: i64) -> Option<i64> {
        match self {
            Recurrence::Every { ms: e } => Some((ms + e - 1).div_euclid(*e) * e),
            Recurrence::Cron { tz, cron, .. } => {
                let start = Self::at(tz, (ms + 999).div_euclid(1000))?;
                let next = cron.find_next_occurrence(&start, true).ok()?;
                Some(next.timestamp_millis())
            }
        }
    }

    /// The latest slot strictly before `ms`.
    pub fn last_before(&self, ms: i64) -> Option<i64> {
        match self {
            Recurrence::Every { ms: e } => Some((ms + e - 1).div_euclid(*e) * e - e),
            Recurrence::Cron { tz, cron, .. } => {
                let start = Self::at(tz, (ms + 999).div_euclid(1000))?;
                let prev = cron.find_previous_occurrence(&start, false).ok()?;
                Some(prev.timestamp_millis())
            }
        }
    }

    /// The zone its slots are shown in (UTC for intervals).
    pub fn zone(&self) -> Tz {
        match self {
            Recurrence::Every { .. } => Tz::UTC,
            Recurrence::Cron { tz, .. } => *tz,
        }
    }
}

/// What happens to slots missed while nothing ran (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Missed {
    /// Missed slots fire nothing; the schedule moves on to its first slot
    /// within the grace period.
    #[default]
    Skip,
    /// One job stands for all missed slots (for the latest of them).
    Once,
}

impl Missed {
    /// `skip` or `once`.
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::Once => "once",
        }
    }
}

impl FromStr for Missed {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Missed, QueueError> {
        match s {
            "skip" => Ok(Missed::Skip),
            "once" => Ok(Missed::Once),
            other => Err(QueueError::Invalid(format!(
                "missed-slot policy {other:?} is not known: use skip or once"
            ))),
        }
    }
}

/// One step of a schedule: from its next-due slot `expected`, fire `fire`
/// (if any) and move next-due to `next`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirePlan {
    /// `<tenant>:<name>`.
    pub member: String,
    /// The next-due slot as read (compare-and-set).
    pub expected: i64,
    /// The slot to enqueue a job for.
    pub fire: Option<i64>,
    /// The next-due slot after this step.
    pub next: i64,
}

/// The step a schedule due at `expected` takes at `now` (Redis's clock,
/// ms), with missed-slot policy `missed` and grace period `grace_ms`: the
/// slot to fire (if any) and the next-due slot. None if not due yet.
pub fn plan(
    r: &Recurrence,
    missed: Missed,
    expected: i64,
    now: i64,
    grace_ms: i64,
) -> Option<(Option<i64>, i64)> {
    if expected > now {
        return None;
    }
    let after = |s: i64| r.next_after(s).unwrap_or(NEVER_MS).max(s + 1);
    if now - expected <= grace_ms {
        return Some((Some(expected), after(expected)));
    }
    let horizon = now - grace_ms;
    match missed {
        Missed::Skip => match r.at_or_after(horizon) {
            Some(f) if f <= now => Some((Some(f), after(f))),
            Some(f) => Some((None, f)),
            None => Some((None, NEVER_MS)),
        },
        Missed::Once => {
            let m = r
                .last_before(horizon)
                .filter(|m| *m >= expected)
                .unwrap_or(expected);
            Some((Some(m), after(m)))
        }
    }
}

/// A schedule to add (or replace, by tenant and name).
#[derive(Clone, Debug)]
pub struct ScheduleSpec {
    /// Owner.
    pub tenant: String,
    /// Name, unique per tenant.
    pub name: String,
    /// When it fires.
    pub recurrence: Recurrence,
    /// The job: queue, kind, payload and options as for an enqueue.
    pub queue: String,
    /// Task kind.
    pub kind: String,
    /// Payload, JSON text.
    pub payload: String,
    /// Requested timeout (None: the kind's default).
    pub timeout: Option<Duration>,
    /// Requested memory (None: the kind's default).
    pub memory: Option<u64>,
    /// Priority, -100..=100.
    pub priority: i32,
    /// Attempts before dead (None: the default).
    pub max_attempts: Option<u32>,
    /// Missed-slot policy.
    pub missed: Missed,
}

impl ScheduleSpec {
    /// A schedule of job `kind` on `queue` with an empty payload and default options.
    pub fn new(
        tenant: impl Into<String>,
        name: impl Into<String>,
        recurrence: Recurrence,
        queue: impl Into<String>,
        kind: impl Into<String>,
    ) -> ScheduleSpec {
        ScheduleSpec {
            tenant: tenant.into(),
            name: name.into(),
            recurrence,
            queue: queue.into(),
            kind: kind.into(),
            payload: "{}".into(),
            timeout: None,
            memory: None,
            priority: 0,
            max_attempts: None,
            missed: Missed::Skip,
        }
    }

    fn validate(&self, max_payload: usize) -> Result<(), QueueError> {
        validate_name("schedule", &self.name)?;
        let mut job = JobSpec::new(&self.tenant, &self.queue, &self.kind);
        job.payload = self.payload.clone();
        job.timeout = self.timeout;
        job.memory = self.memory;
        job.priority = self.priority;
        job.max_attempts = self.max_attempts;
        job.validate(max_payload)
    }
}

/// A stored schedule, as listed.
#[derive(Clone, Debug, Serialize)]
pub struct Schedule {
    /// Owner.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// Cron expression (cron schedules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Time zone of the cron expression.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// Interval in ms (interval schedules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<i64>,
    /// Queue of its jobs.
    pub queue: String,
    /// Kind of its jobs.
    pub kind: String,
    /// Payload of its jobs (JSON text; shown as the JSON it holds).
    #[serde(serialize_with = "as_json")]
    pub payload: String,
    /// Requested timeout in ms (absent: the kind's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Requested memory in bytes (absent: the kind's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Priority of its jobs.
    pub priority: i32,
    /// Max attempts of its jobs (absent: the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Missed-slot policy.
    pub missed: Missed,
    /// Next-due slot, ms since the epoch.
    pub next_due_ms: i64,
    /// Next-due slot, RFC 3339 in UTC.
    pub next_due: String,
    /// Next-due slot, RFC 3339 in the schedule's zone (UTC for intervals).
    pub next_due_local: String,
    /// Jobs fired so far.
    pub fired: u64,
    /// Slot of the latest job fired (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_slot_ms: Option<i64>,
    /// Id of the latest job fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_job: Option<String>,
    /// Why the latest due slot fired no job (the tenant's caps refused it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Schedule {
    fn from_hash(
        h: &std::collections::HashMap<String, String>,
        next_due_ms: i64,
    ) -> Option<Schedule> {
        let get = |f: &str| h.get(f).cloned();
        let num = |f: &str| h.get(f).and_then(|v| v.parse::<i64>().ok());
        let zone = get("tz")
            .and_then(|z| Tz::from_str(&z).ok())
            .unwrap_or(Tz::UTC);
        let (next_due, next_due_local) = show_times(next_due_ms, zone);
        Some(Schedule {
            tenant: get("tenant")?,
            name: get("name")?,
            cron: get("cron"),
            tz: get("tz"),
            every_ms: num("every_ms"),
            queue: get("queue")?,
            kind: get("kind")?,
            payload: get("payload").unwrap_or_else(|| "{}".into()),
            timeout_ms: num("timeout_ms").map(|v| v as u64),
            memory: num("memory").map(|v| v as u64),
            priority: num("priority").unwrap_or(0) as i32,
            max_attempts: num("max_attempts").map(|v| v as u32),
            missed: get("missed")
                .and_then(|m| m.parse().ok())
                .unwrap_or_default(),
            next_due_ms,
            next_due,
            next_due_local,
            fired: num("fired").unwrap_or(0).max(0) as u64,
            last_slot_ms: num("last_slot"),
            last_job: get("last_job"),
            last_error: get("last_error"),
        })
    }

    /// Its recurrence, parsed again from what is stored.
    pub fn recurrence(&self) -> Result<Recurrence, QueueError> {
        match (&self.cron, self.every_ms) {
            (Some(expr), _) => Recurrence::cron(expr, self.tz.as_deref().unwrap_or("UTC")),
            (None, Some(ms)) => Recurrence::every(Duration::from_millis(ms.max(0) as u64)),
            (None, None) => Err(QueueError::Protocol(format!(
                "schedule {}:{} has neither cron nor every_ms",
                self.tenant, self.name
            ))),
        }
    }

    /// How it recurs, for people: `cron "0 9 * * MON-FRI" Europe/Paris` or `every 5m`.
    pub fn when(&self) -> String {
        match (&self.cron, self.every_ms) {
            (Some(c), _) => format!("cron \"{c}\" {}", self.tz.as_deref().unwrap_or("UTC")),
            (None, Some(ms)) => format!(
                "every {}",
                crate::model::units::format_duration(Duration::from_millis(ms.max(0) as u64))
            ),
            _ => "?".into(),
        }
    }
}

/// JSON text serialized as the JSON it holds (as a string if it is not JSON).
fn as_json<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::value::RawValue::from_string(text.to_string()) {
        Ok(raw) => raw.serialize(s),
        Err(_) => s.serialize_str(text),
    }
}

/// `ms` as RFC 3339 (ms) in UTC and in `zone`.
pub fn show_times(ms: i64, zone: Tz) -> (String, String) {
    let utc = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
    (
        utc.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        utc.with_timezone(&zone)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// What one schedule's fire step did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fired {
    /// `<tenant>:<name>`.
    pub member: String,
    /// `fired`, `skipped`, `refused`, `forbidden`, `moved`, `gone` or
    /// `early` (see `schedule_fire.lua`).
    pub status: String,
    /// The job fired, if any.
    pub job: Option<String>,
    /// The slot fired, or why a job was refused.
    pub detail: String,
}

fn member(tenant: &str, name: &str) -> String {
    format!("{tenant}:{name}")
}

impl Queue {
    fn schedule_keys(&self, tenant: &str, name: &str) -> (u32, String, String, String) {
        let p = self.partition_of(tenant);
        let k = self.keys(p);
        (
            p,
            k.key(&["schedule", tenant, name]),
            k.key(&["schedules"]),
            k.key(&["schedules", tenant]),
        )
    }

    /// Add a schedule, or replace the tenant's schedule of that name (its
    /// counters start again). Its first slot is the first after now
    /// (Redis's clock). Returns it as stored.
    pub async fn add_schedule(&self, spec: &ScheduleSpec) -> Result<Schedule, QueueError> {
        spec.validate(self.config().max_payload)?;
        let now = self.server_time().await?.timestamp_millis();
        let first = spec.recurrence.next_after(now).ok_or_else(|| {
            QueueError::Invalid(format!(
                "schedule {} never fires after now: check its cron expression",
                spec.name
            ))
        })?;
        let p = self.partition_of(&spec.tenant);
        let mut f: Vec<(String, String)> = vec![
            ("tenant".into(), spec.tenant.clone()),
            ("name".into(), spec.name.clone()),
            ("queue".into(), spec.queue.clone()),
            ("kind".into(), spec.kind.clone()),
            ("payload".into(), spec.payload.clone()),
            ("missed".into(), spec.missed.as_str().into()),
            ("created_at".into(), now.to_string()),
        ];
        match &spec.recurrence {
            Recurrence::Every { ms } => f.push(("every_ms".into(), ms.to_string())),
            Recurrence::Cron { expr, tz, .. } => {
                f.push(("cron".into(), expr.clone()));
                f.push(("tz".into(), tz.name().to_string()));
            }
        }
        if let Some(t) = spec.timeout {
            f.push(("timeout_ms".into(), t.as_millis().to_string()));
        }
        if let Some(m) = spec.memory {
            f.push(("memory".into(), m.to_string()));
        }
        if spec.priority != 0 {
            f.push(("priority".into(), spec.priority.to_string()));
        }
        if let Some(n) = spec.max_attempts {
            f.push(("max_attempts".into(), n.to_string()));
        }
        let mut args = vec![
            "add".to_string(),
            spec.tenant.clone(),
            spec.name.clone(),
            first.to_string(),
        ];
        for (k, v) in f {
            args.push(k);
            args.push(v);
        }
        self.call(ScriptName::ScheduleSet, p, args).await?;
        self.schedule(&spec.tenant, &spec.name)
            .await?
            .ok_or_else(|| QueueError::Protocol("schedule vanished after add".into()))
    }

    /// A tenant's schedule by name.
    pub async fn schedule(&self, tenant: &str, name: &str) -> Result<Option<Schedule>, QueueError> {
        validate_name("tenant", tenant)?;
        validate_name("schedule", name)?;
        let (_, hk, zk, _) = self.schedule_keys(tenant, name);
        let h: std::collections::HashMap<String, String> = self.client().hgetall(&hk).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let score: Option<f64> = self.client().zscore(&zk, member(tenant, name)).await?;
        let Some(score) = score else { return Ok(None) };
        Ok(Schedule::from_hash(&h, score as i64))
    }

    /// A tenant's schedules (or every tenant's), by tenant then name.
    pub async fn schedules(&self, tenant: Option<&str>) -> Result<Vec<Schedule>, QueueError> {
        let mut out = Vec::new();
        match tenant {
            Some(t) => {
                validate_name("tenant", t)?;
                let (_, _, _, sk) = self.schedule_keys(t, "x");
                let names: Vec<String> = self.client().smembers(&sk).await?;
                for n in names {
                    if let Some(s) = self.schedule(t, &n).await? {
                        out.push(s);
                    }
                }
            }
            None => {
                for p in 0..self.partitions() {
                    let zk = self.keys(p).key(&["schedules"]);
                    let members: Vec<(String, f64)> = self
                        .client()
                        .zrange(&zk, 0, -1, None, false, None, true)
                        .await?;
                    for (m, score) in members {
                        let Some((t, n)) = m.split_once(':') else {
                            continue;
                        };
                        let hk = self.keys(p).key(&["schedule", t, n]);
                        let h: std::collections::HashMap<String, String> =
                            self.client().hgetall(&hk).await?;
                        if let Some(s) = Schedule::from_hash(&h, score as i64) {
                            out.push(s);
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
        Ok(out)
    }

    /// Remove a tenant's schedule; false if it had none of that name. A
    /// job it already fired stays.
    pub async fn remove_schedule(&self, tenant: &str, name: &str) -> Result<bool, QueueError> {
        validate_name("tenant", tenant)?;
        validate_name("schedule", name)?;
        let args = vec!["rm".to_string(), tenant.to_string(), name.to_string()];
        let reply = self
            .call(ScriptName::ScheduleSet, self.partition_of(tenant), args)
            .await?;
        Ok(reply.as_i64().unwrap_or(0) > 0)
    }

    /// Take the schedules duty's tick for `interval`: true for one caller
    /// per interval fleet-wide (`SET B:schedtick NX PX` in partition 0),
    /// which then runs every partition's pass; the others leave this tick
    /// to it ([`crate::duties::schedules`]).
    pub async fn take_schedules_tick(&self, interval: Duration) -> Result<bool, QueueError> {
        let key = self.keys(0).key(&["schedtick"]);
        let ms = (interval.as_millis() as i64).max(1);
        Ok(self
            .client()
            .set::<Option<String>, _, _>(
                &key,
                "1",
                Some(Expiration::PX(ms)),
                Some(SetOptions::NX),
                false,
            )
            .await?
            .is_some())
    }

    /// Up to `limit` schedules of partition `p` due at `now_ms` (by their
    /// next-due slot), earliest first.
    pub async fn due_schedules(
        &self,
        p: u32,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Schedule>, QueueError> {
        let zk = self.keys(p).key(&["schedules"]);
        let due: Vec<(String, f64)> = self
            .client()
            .zrangebyscore(&zk, "-inf", now_ms as f64, true, Some((0, limit as i64)))
            .await?;
        let mut out = Vec::with_capacity(due.len());
        for (m, score) in due {
            let Some((t, n)) = m.split_once(':') else {
                continue;
            };
            let hk = self.keys(p).key(&["schedule", t, n]);
            let h: std::collections::HashMap<String, String> = self.client().hgetall(&hk).await?;
            match Schedule::from_hash(&h, score as i64) {
                Some(s) => out.push(s),
                None => {
                    tracing::warn!(schedule = %m, "schedule without a readable spec; left alone")
                }
            }
        }
        Ok(out)
    }

    /// Run `schedule_fire.lua` on partition `p` with `plans` (see
    /// [`plan`]). Safe to repeat after an error: a repeat finds next-due
    /// moved (`moved`) and fires nothing.
    pub async fn fire_schedules(
        &self,
        p: u32,
        plans: &[FirePlan],
    ) -> Result<Vec<Fired>, QueueError> {
        if plans.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = Vec::with_capacity(plans.len() * 4);
        for pl in plans {
            args.push(pl.member.clone());
            args.push(pl.expected.to_string());
            args.push(pl.fire.map(|f| f.to_string()).unwrap_or_default());
            args.push(pl.next.to_string());
        }
        let flat = strings(self.call(ScriptName::ScheduleFire, p, args).await?)?;
        if flat.len() != plans.len() * 4 {
            return Err(QueueError::Protocol(format!(
                "schedule_fire returned {} values for {} schedules",
                flat.len(),
                plans.len()
            )));
        }
        Ok(flat
            .chunks(4)
            .map(|c| Fired {
                member: c[0].clone(),
                status: c[1].clone(),
                job: (!c[2].is_empty()).then(|| c[2].clone()),
                detail: c[3].clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn cron_in_a_zone_keeps_local_time_across_dst() {
        // Europe/Paris leaves CET (+01) for CEST (+02) on Sunday 2026-03-29.
        let r = Recurrence::cron("0 9 * * MON-FRI", "Europe/Paris").unwrap();
        let fri = r.next_after(ms("2026-03-26T12:00:00Z")).unwrap();
        assert_eq!(fri, ms("2026-03-27T08:00:00Z")); // 09:00 CET
        let mon = r.next_after(fri).unwrap();
        assert_eq!(mon, ms("2026-03-30T07:00:00Z")); // 09:00 CEST
        // and back on Sunday 2026-10-25
        let fri = r.next_after(ms("2026-10-23T06:00:00Z")).unwrap();
        assert_eq!(fri, ms("2026-10-23T07:00:00Z"));
        assert_eq!(r.next_after(fri), Some(ms("2026-10-26T08:00:00Z")));
    }

    #[test]
    fn hourly_cron_neither_loses_nor_repeats_an_hour_at_a_dst_change() {
        let r = Recurrence::cron("0 * * * *", "Europe/Paris").unwrap();
        // fall back: 03:00 CEST -> 02:00 CET at 01:00 UTC on 2026-10-25
        let mut t = ms("2026-10-24T22:30:00Z");
        let mut seen = Vec::new();
        for _ in 0..6 {
            t = r.next_after(t).unwrap();
            seen.push(t);
        }
        for w in seen.windows(2) {
            assert_eq!(w[1] - w[0], 3_600_000, "{seen:?}");
        }
        // spring forward: 02:00 CET -> 03:00 CEST at 01:00 UTC on 2026-03-29:
        // the 02:00 local hour does not exist, so one UTC hour has no slot.
        let mut t = ms("2026-03-28T22:30:00Z");
        let mut seen = Vec::new();
        for _ in 0..4 {
            t = r.next_after(t).unwrap();
            seen.push(t);
        }
        assert_eq!(
            seen,
            vec![
                ms("2026-03-28T23:00:00Z"), // 00:00 CET
                ms("2026-03-29T00:00:00Z"), // 01:00 CET
                ms("2026-03-29T01:00:00Z"), // 03:00 CEST
                ms("2026-03-29T02:00:00Z"), // 04:00 CEST
            ]
        );
    }

    #[test]
    fn a_daily_slot_in_a_skipped_hour_moves_to_the_jump_and_a_repeated_one_fires_once() {
        let r = Recurrence::cron("30 2 * * *", "Europe/Paris").unwrap();
        // 2026-10-25: 02:30 happens twice (CEST, then CET); it fires the first time only
        let first = r.next_after(ms("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(first, ms("2026-10-25T00:30:00Z"));
        assert_eq!(r.next_after(first), Some(ms("2026-10-26T01:30:00Z")));
        // 2026-03-29: 02:30 does not exist; it fires as the clocks jump to 03:00 CEST
        let jump = r.next_after(ms("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(jump, ms("2026-03-29T01:00:00Z"));
        assert_eq!(r.next_after(jump), Some(ms("2026-03-30T00:30:00Z")));
    }

    #[test]
    fn bad_expressions_and_zones_say_what_is_wrong() {
        let e = Recurrence::cron("0 9 * *", "UTC").unwrap_err().to_string();
        assert!(e.contains("bad cron expression"), "{e}");
        let e = Recurrence::cron("0 9 * * *", "Mars/Olympus")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown time zone"), "{e}");
        let e = Recurrence::cron("0 0 30 2 *", "UTC")
            .unwrap_err()
            .to_string();
        assert!(e.contains("never"), "{e}");
        assert!(Recurrence::every(Duration::from_millis(500)).is_err());
    }

    #[test]
    fn intervals_align_to_the_epoch() {
        let r = Recurrence::every(Duration::from_secs(300)).unwrap();
        assert_eq!(r.next_after(0), Some(300_000));
        assert_eq!(r.next_after(300_000), Some(600_000));
        assert_eq!(r.at_or_after(300_000), Some(300_000));
        assert_eq!(r.at_or_after(300_001), Some(600_000));
        assert_eq!(r.last_before(300_000), Some(0));
        assert_eq!(r.last_before(300_001), Some(300_000));
    }

    #[test]
    fn plans_fire_late_slots_in_order_and_apply_the_missed_policy() {
        let r = Recurrence::every(Duration::from_secs(60)).unwrap();
        let g = 10_000;
        // not due
        assert_eq!(plan(&r, Missed::Skip, 120_000, 119_999, g), None);
        // late within the grace: fires, next is the following slot
        assert_eq!(
            plan(&r, Missed::Skip, 120_000, 125_000, g),
            Some((Some(120_000), 180_000))
        );
        // missed (the slots up to 3_660_000 are over 10 s old at 3_675_000),
        // skip: nothing for them; the next slot is the first not missed
        assert_eq!(
            plan(&r, Missed::Skip, 120_000, 3_675_000, g),
            Some((None, 3_720_000))
        );
        // ... and it fires at once if it is due already
        assert_eq!(
            plan(&r, Missed::Skip, 120_000, 3_661_000, g),
            Some((Some(3_660_000), 3_720_000))
        );
        // once: one job for the latest missed slot, then the slot after it
        assert_eq!(
            plan(&r, Missed::Once, 120_000, 3_675_000, g),
            Some((Some(3_660_000), 3_720_000))
        );
        assert_eq!(
            plan(&r, Missed::Once, 120_000, 3_661_000, g),
            Some((Some(3_600_000), 3_660_000))
        );
    }
}
