//! The Lua scripts, loaded once per connection and called by SHA.
//!
//! Each script in `scripts/` is prepended with the shared helpers of
//! `scripts/lib/`, one file per concern in dependency order (as BullMQ's
//! `includes/`), and with the built-in limits generated from
//! [`crate::model::limits`] (one table, in Rust); the result is what
//! `SCRIPT LOAD` receives and what [`script_source`] publishes for clients
//! in other languages.
//!
//! A script call is written to Redis once and never re-sent by the client:
//! after a lost reply nobody knows whether it ran, and a re-sent claim or
//! enqueue would act twice. The caller learns [`QueueError::Unknown`]
//! instead; worker-side calls are repeated safely with the same
//! [`super::Call`] id.

use fred::prelude::*;
use fred::types::scripts::Script as FredScript;

use super::QueueError;

/// The helper files, in the order they are joined (each uses only those
/// before it).
const LIB: [(&str, &str); 12] = [
    ("keys", include_str!("scripts/lib/keys.lua")),
    ("events", include_str!("scripts/lib/events.lua")),
    ("time", include_str!("scripts/lib/time.lua")),
    ("limits", include_str!("scripts/lib/limits.lua")),
    ("calls", include_str!("scripts/lib/calls.lua")),
    ("tenants", include_str!("scripts/lib/tenants.lua")),
    ("sched", include_str!("scripts/lib/sched.lua")),
    ("outbox", include_str!("scripts/lib/outbox.lua")),
    ("feed", include_str!("scripts/lib/feed.lua")),
    ("attempt", include_str!("scripts/lib/attempt.lua")),
    ("flush", include_str!("scripts/lib/flush.lua")),
    ("jobs", include_str!("scripts/lib/jobs.lua")),
];

/// `local BUILTIN = {...}`: the limits and partition settings used when
/// neither a tenant, its tier nor the partition defaults set a field.
fn builtin_table() -> String {
    let mut t = String::from(
        "-- Built-in defaults (generated from src/model/limits.rs), used when neither\n\
         -- the tenant, its tier nor B:defaults sets a field.\nlocal BUILTIN = {\n",
    );
    for (name, value) in crate::model::limits::builtin_fields() {
        t.push_str(&format!("  {name} = {value},\n"));
    }
    t.push_str("}\n");
    t
}

/// The helpers, BUILTIN placed before the limits file that reads it.
fn library() -> String {
    let mut lib = String::new();
    for (name, text) in LIB {
        if name == "limits" {
            lib.push_str(&builtin_table());
        }
        lib.push_str(&format!("-- ==== lib/{name}.lua ====\n{text}"));
    }
    lib
}

/// The scripts agentq runs; one atomic script per state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScriptName {
    /// Add jobs (the published wire format).
    Enqueue,
    /// Fair, capped batch claim.
    Claim,
    /// Fenced batch completion, with the ledger outbox append.
    Complete,
    /// Batched lease extension.
    Extend,
    /// Return expired leases to ready.
    Reap,
    /// Hand running attempts back on shutdown.
    Release,
    /// Pause or resume a queue or a tenant on it.
    Pause,
    /// Change tenant limits or defaults.
    TenantSet,
    /// Retry or purge dead jobs.
    Dead,
    /// Delete a queue's ready and delayed jobs.
    Purge,
    /// Cancel a job that has not finished (queued, or running: its attempt is closed as cancelled).
    Cancel,
    /// Raise a usage counter to at least a value (reconcile).
    UsageRaise,
    /// Fire due slots of recurring schedules (compare-and-set on next-due).
    ScheduleFire,
    /// Add, replace or remove a recurring schedule.
    ScheduleSet,
    /// Publish a running attempt's progress report (fenced by attempt).
    Progress,
}

impl ScriptName {
    /// Every script, in load order.
    pub const ALL: [ScriptName; 15] = [
        ScriptName::Enqueue,
        ScriptName::Claim,
        ScriptName::Complete,
        ScriptName::Extend,
        ScriptName::Reap,
        ScriptName::Release,
        ScriptName::Pause,
        ScriptName::TenantSet,
        ScriptName::Dead,
        ScriptName::Purge,
        ScriptName::Cancel,
        ScriptName::UsageRaise,
        ScriptName::ScheduleFire,
        ScriptName::ScheduleSet,
        ScriptName::Progress,
    ];

    /// The script's file name without `.lua`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScriptName::Enqueue => "enqueue",
            ScriptName::Claim => "claim",
            ScriptName::Complete => "complete",
            ScriptName::Extend => "extend",
            ScriptName::Reap => "reap",
            ScriptName::Release => "release",
            ScriptName::Pause => "pause",
            ScriptName::TenantSet => "tenant_set",
            ScriptName::Dead => "dead",
            ScriptName::Purge => "purge",
            ScriptName::Cancel => "cancel",
            ScriptName::UsageRaise => "usage_raise",
            ScriptName::ScheduleFire => "schedule_fire",
            ScriptName::ScheduleSet => "schedule_set",
            ScriptName::Progress => "progress",
        }
    }

    fn body(self) -> &'static str {
        match self {
            ScriptName::Enqueue => include_str!("scripts/enqueue.lua"),
            ScriptName::Claim => include_str!("scripts/claim.lua"),
            ScriptName::Complete => include_str!("scripts/complete.lua"),
            ScriptName::Extend => include_str!("scripts/extend.lua"),
            ScriptName::Reap => include_str!("scripts/reap.lua"),
            ScriptName::Release => include_str!("scripts/release.lua"),
            ScriptName::Pause => include_str!("scripts/pause.lua"),
            ScriptName::TenantSet => include_str!("scripts/tenant_set.lua"),
            ScriptName::Dead => include_str!("scripts/dead.lua"),
            ScriptName::Purge => include_str!("scripts/purge.lua"),
            ScriptName::Cancel => include_str!("scripts/cancel.lua"),
            ScriptName::UsageRaise => include_str!("scripts/usage_raise.lua"),
            ScriptName::ScheduleFire => include_str!("scripts/schedule_fire.lua"),
            ScriptName::ScheduleSet => include_str!("scripts/schedule_set.lua"),
            ScriptName::Progress => include_str!("scripts/progress.lua"),
        }
    }
}

/// The full source of a script as loaded into Redis (library + body).
pub fn script_source(name: ScriptName) -> String {
    format!(
        "{}\n-- ==== {}.lua ====\n{}",
        library(),
        name.as_str(),
        name.body()
    )
}

/// The comment in `now_ms()` (lib/time.lua) where test builds put the test clock.
#[cfg(feature = "test-clock")]
const CLOCK_MARK: &str = "-- @test-clock";

/// What test builds put at [`CLOCK_MARK`]: the script's time is the
/// partition's `B:testclock` key (ms) when that key exists, else Redis
/// `TIME` as always. Only the simulation test (tests/sim.rs) sets the key,
/// to move time at will; without the `test-clock` feature this text is not
/// even compiled in, so production scripts (and their SHAs) never have it.
#[cfg(feature = "test-clock")]
const TEST_CLOCK: &str = "local fake = tonumber(redis.call('GET', B .. ':testclock')) \
                          if fake then now_cached = fake end";

/// A script's source with the test clock (feature `test-clock` only).
#[cfg(feature = "test-clock")]
fn test_clock_source(name: ScriptName) -> String {
    script_source(name).replacen(CLOCK_MARK, TEST_CLOCK, 1)
}

#[cfg(test)]
mod tests {
    use super::ScriptName;

    #[test]
    fn all_is_in_declaration_order() {
        for (i, n) in ScriptName::ALL.iter().enumerate() {
            assert_eq!(*n as usize, i, "{n:?}");
        }
    }

    #[test]
    fn production_scripts_cannot_be_steered_by_a_test_clock() {
        for n in ScriptName::ALL {
            assert!(!super::script_source(n).contains("testclock"), "{n:?}");
        }
    }

    /// The hook lands in `now_ms()` exactly once, whatever file of the
    /// library `now_ms()` ends up in.
    #[cfg(feature = "test-clock")]
    #[test]
    fn the_test_clock_replaces_its_one_marker() {
        for n in ScriptName::ALL {
            let plain = super::script_source(n);
            assert_eq!(plain.matches(super::CLOCK_MARK).count(), 1, "{n:?}");
            let hooked = super::test_clock_source(n);
            assert!(!hooked.contains(super::CLOCK_MARK), "{n:?}");
            assert_eq!(hooked.matches("testclock").count(), 1, "{n:?}");
        }
    }
}

/// All scripts with their SHA1s, ready to call.
#[derive(Clone)]
pub(crate) struct Scripts {
    scripts: Vec<FredScript>,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self::from_sources(script_source)
    }

    /// The scripts with the test clock in `now_ms()` (see [`TEST_CLOCK`]).
    #[cfg(feature = "test-clock")]
    pub(crate) fn with_test_clock() -> Self {
        Self::from_sources(test_clock_source)
    }

    fn from_sources(source: fn(ScriptName) -> String) -> Self {
        let scripts = ScriptName::ALL
            .iter()
            .map(|n| FredScript::from_lua(source(*n)))
            .collect();
        Scripts { scripts }
    }

    fn get(&self, name: ScriptName) -> &FredScript {
        // `ALL` lists the variants in declaration order, and `new` loads them in that order.
        &self.scripts[name as usize]
    }

    /// `SCRIPT LOAD` every script (on every primary, in a cluster).
    pub(crate) async fn load(&self, client: &Client) -> Result<(), QueueError> {
        for s in &self.scripts {
            s.load(client).await?;
        }
        Ok(())
    }

    /// `EVALSHA`, loading the scripts again if the server lost them (restart:
    /// `NOSCRIPT` means nothing ran, so that one retry is safe).
    pub(crate) async fn call(
        &self,
        client: &Client,
        name: ScriptName,
        base: &str,
        args: Vec<Value>,
    ) -> Result<Value, QueueError> {
        let sha = self.get(name).sha1().to_string();
        match evalsha_once(client, &sha, base, args.clone()).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                self.load(client).await?;
                evalsha_once(client, &sha, base, args)
                    .await
                    .map_err(unknown_outcome)
            }
            other => other.map_err(unknown_outcome),
        }
    }
}

impl Scripts {
    /// [`Scripts::call`], then `WAIT replicas timeout` right behind it on
    /// the same connection (one pipeline, each command written at most
    /// once): the script's reply and how many replicas confirmed every
    /// write of this connection up to it.
    pub(crate) async fn call_then_wait(
        &self,
        client: &Client,
        name: ScriptName,
        base: &str,
        args: Vec<Value>,
        replicas: u32,
        timeout: std::time::Duration,
    ) -> Result<(Value, i64), QueueError> {
        let sha = self.get(name).sha1().to_string();
        match evalsha_then_wait(client, &sha, base, args.clone(), replicas, timeout).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                self.load(client).await?;
                evalsha_then_wait(client, &sha, base, args, replicas, timeout)
                    .await
                    .map_err(unknown_outcome)
            }
            other => other.map_err(unknown_outcome),
        }
    }
}

/// `EVALSHA` then `WAIT`, pipelined on one connection (the one of `base`'s
/// slot in a cluster), each written at most once. The script's error, if
/// any, comes first; then the WAIT's.
async fn evalsha_then_wait(
    client: &Client,
    sha: &str,
    base: &str,
    args: Vec<Value>,
    replicas: u32,
    timeout: std::time::Duration,
) -> Result<(Value, i64), fred::error::Error> {
    let eval = fred::cmd!("EVALSHA", hash: fred::types::ClusterHash::from(base));
    then_wait(
        client,
        eval,
        evalsha_args(sha, base, args),
        base,
        replicas,
        timeout,
    )
    .await
}

/// `HINCRBY <meta> partitions 0` then `WAIT`, pipelined: a write that
/// changes nothing but is replicated, so the `WAIT` covers everything the
/// primary held before it (an earlier job an idempotency key found).
/// How many replicas confirmed.
pub(crate) async fn touch_then_wait(
    client: &Client,
    meta: &str,
    replicas: u32,
    timeout: std::time::Duration,
) -> Result<i64, QueueError> {
    let touch = fred::cmd!("HINCRBY", hash: fred::types::ClusterHash::from(meta));
    let args = vec![Value::from(meta), "partitions".into(), 0.into()];
    then_wait(client, touch, args, meta, replicas, timeout)
        .await
        .map(|(_, confirmed)| confirmed)
        .map_err(unknown_outcome)
}

/// One write command then `WAIT replicas timeout`, pipelined on the
/// connection of `key`'s slot, each written at most once: the command's
/// reply (its error first) and how many replicas confirmed.
async fn then_wait(
    client: &Client,
    command: fred::types::CustomCommand,
    args: Vec<Value>,
    key: &str,
    replicas: u32,
    timeout: std::time::Duration,
) -> Result<(Value, i64), fred::error::Error> {
    let pipe = fred::clients::Pipeline::from(once(client));
    let () = pipe.custom(command, args).await?;
    let wait = fred::cmd!("WAIT", hash: fred::types::ClusterHash::from(key));
    let () = pipe
        .custom(wait, vec![Value::from(replicas), wait_ms(timeout)])
        .await?;
    let mut replies = pipe.try_all::<Value>().await.into_iter();
    let reply = replies.next().unwrap_or(Ok(Value::Null))?;
    let confirmed = replies.next().unwrap_or(Ok(Value::Null))?;
    Ok((reply, confirmed.as_i64().unwrap_or(0)))
}

/// A WAIT timeout in ms, at least 1 (0 would wait forever).
fn wait_ms(timeout: std::time::Duration) -> Value {
    Value::from(timeout.as_millis().clamp(1, i64::MAX as u128) as i64)
}

/// The client with every command written at most once (no re-send after a
/// dropped connection: a script's outcome is then unknown, not repeated).
fn once(client: &Client) -> fred::clients::WithOptions<Client> {
    client.with_options(&Options {
        max_attempts: Some(1),
        ..Default::default()
    })
}

/// `sha 1 base args...`: EVALSHA's arguments with `base` as its one key.
fn evalsha_args(sha: &str, base: &str, args: Vec<Value>) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::with_capacity(args.len() + 3);
    all.push(sha.into());
    all.push(1.into());
    all.push(base.into());
    all.extend(args);
    all
}

/// `EVALSHA sha 1 base args...`, written at most once (no re-send after a
/// dropped connection), routed to the slot of `base` in a cluster.
async fn evalsha_once(
    client: &Client,
    sha: &str,
    base: &str,
    args: Vec<Value>,
) -> Result<Value, fred::error::Error> {
    let on_base = fred::types::ClusterHash::from(base);
    once(client)
        .custom(
            fred::cmd!("EVALSHA", hash: on_base),
            evalsha_args(sha, base, args),
        )
        .await
}

/// A timeout, a dropped connection or a cancelled command leaves a script
/// call's outcome unknown: it may have run.
fn unknown_outcome(e: fred::error::Error) -> QueueError {
    use fred::error::ErrorKind;
    match e.kind() {
        ErrorKind::Timeout | ErrorKind::IO | ErrorKind::Canceled => {
            QueueError::Unknown(e.to_string())
        }
        _ => QueueError::Redis(e),
    }
}
