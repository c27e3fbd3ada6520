//! Tenant limits and tiers as values: what the claim script enforces before
//! a job starts, their ranges, and the text forms operators write them in.
//!
//! Limits resolve in layers: the tenant's own settings, then its tier's,
//! then the partition defaults, then [`BUILTIN`] (the scripts get their copy
//! of it from here, see `src/queue/scripts.rs`). Reading and writing them in
//! Redis is `crate::queue::limits`; enforcing them is `src/queue/scripts/`.
//! Property: every [`LimitsUpdate`] that [`LimitsUpdate::validate`] accepts
//! writes fields the scripts read back as the same values (whole
//! milliseconds, integer micro-dollars).

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::names::{InvalidInput, validate_name};

/// Effective limits of a tenant (field names as stored in Redis).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TenantLimits {
    /// Most jobs running at once, fleet-wide, across all queues.
    pub max_concurrency: u64,
    /// Longest timeout a job may request, ms.
    pub max_timeout_ms: u64,
    /// Largest memory cap a job may request, bytes.
    pub max_memory: u64,
    /// Share of starts relative to other backlogged tenants.
    pub weight: u64,
    /// Job starts allowed per `rate_period_ms` (0: unlimited).
    pub rate: u64,
    /// The rate's period, ms.
    pub rate_period_ms: u64,
    /// Starts allowed at once on top of the steady rate (0: equal to `rate`).
    pub burst: u64,
    /// Agent time per calendar month (UTC), ms (0: no quota).
    pub quota_ms: u64,
    /// Price per agent-minute, micro-dollars.
    pub price_minute_micros: u64,
    /// Price per 1,000 reported tokens, micro-dollars.
    pub price_ktok_micros: u64,
    /// Starts per minute the tier expects; twice this raises an alert (0: off).
    pub expected_rate_per_min: u64,
    /// Spend per calendar month (UTC) at which the tenant is held,
    /// micro-dollars (0: no cap).
    pub spend_cap_micros: u64,
}

/// Built-in limits for tenants nobody configured (the scripts' copy is
/// generated from [`builtin_fields`]).
pub const BUILTIN: TenantLimits = TenantLimits {
    max_concurrency: 10,
    max_timeout_ms: 3_600_000,
    max_memory: 4 << 30,
    weight: 1,
    rate: 0,
    rate_period_ms: 1000,
    burst: 0,
    quota_ms: 0,
    price_minute_micros: 10_000,
    price_ktok_micros: 0,
    expected_rate_per_min: 0,
    spend_cap_micros: 0,
};

impl TenantLimits {
    /// Resolve each field from the first layer that sets it, else built-in.
    pub fn resolve(layers: &[&HashMap<String, String>]) -> TenantLimits {
        let get = |name: &str, builtin: u64| {
            layers
                .iter()
                .find_map(|l| l.get(name).and_then(|v| v.parse::<f64>().ok()))
                .map_or(builtin, |v| v.max(0.0) as u64)
        };
        let b = BUILTIN;
        TenantLimits {
            max_concurrency: get("max_concurrency", b.max_concurrency),
            max_timeout_ms: get("max_timeout_ms", b.max_timeout_ms),
            max_memory: get("max_memory", b.max_memory),
            weight: get("weight", b.weight),
            rate: get("rate", b.rate),
            rate_period_ms: get("rate_period_ms", b.rate_period_ms),
            burst: get("burst", b.burst),
            quota_ms: get("quota_ms", b.quota_ms),
            price_minute_micros: get("price_minute_micros", b.price_minute_micros),
            price_ktok_micros: get("price_ktok_micros", b.price_ktok_micros),
            expected_rate_per_min: get("expected_rate_per_min", b.expected_rate_per_min),
            spend_cap_micros: get("spend_cap_micros", b.spend_cap_micros),
        }
    }
}

/// Partition settings the scripts fall back to (`B:defaults` may set
/// them): the payload limit, how long idempotency keys and finished jobs
/// are kept, attempts per job, and the retention of each tenant's job
/// events (at most `events_max` entries, gone `events_ttl_ms` after the
/// last one; a result over `events_result_max` bytes is left out of its
/// event, which gives its size instead).
pub const PARTITION_BUILTIN: [(&str, u64); 7] = [
    ("max_payload", 1 << 20),
    ("idem_ttl_ms", 86_400_000),
    ("retention_ms", 86_400_000),
    ("default_max_attempts", 3),
    ("events_max", 10_000),
    ("events_ttl_ms", 3_600_000),
    ("events_result_max", 16_384),
];

/// Every built-in field by its stored name: [`BUILTIN`] and
/// [`PARTITION_BUILTIN`] (the scripts' `BUILTIN` table is generated from
/// this).
pub fn builtin_fields() -> Vec<(&'static str, u64)> {
    let b = BUILTIN;
    let mut v = vec![
        ("max_concurrency", b.max_concurrency),
        ("max_timeout_ms", b.max_timeout_ms),
        ("max_memory", b.max_memory),
        ("weight", b.weight),
        ("rate", b.rate),
        ("rate_period_ms", b.rate_period_ms),
        ("burst", b.burst),
        ("quota_ms", b.quota_ms),
        ("price_minute_micros", b.price_minute_micros),
        ("price_ktok_micros", b.price_ktok_micros),
        ("expected_rate_per_min", b.expected_rate_per_min),
        ("spend_cap_micros", b.spend_cap_micros),
    ];
    v.extend(PARTITION_BUILTIN);
    v
}

/// Valid ranges, checked before anything is written.
pub const MAX_CONCURRENCY_RANGE: std::ops::RangeInclusive<u64> = 1..=100_000;
/// Weight range (relative share of starts among backlogged tenants).
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u64> = 1..=1000;
/// Timeout cap range.
pub const MAX_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600);
/// Memory cap range.
pub const MAX_MEMORY_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 40);

/// A start rate: `starts` per `period` (`starts` 0: unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    /// Starts allowed per period.
    pub starts: u64,
    /// The period.
    pub period: Duration,
}

/// True when `d` is a whole number of milliseconds, as limits are stored.
fn whole_ms(d: Duration) -> bool {
    d.subsec_nanos().is_multiple_of(1_000_000)
}

/// Parse a rate: `10/s`, `600/m`, `100/1h`, `5/500ms`, or `none`. The period
/// must be a whole number of milliseconds (it is stored in ms: `3/1.5ms`
/// would otherwise become 3 per 1 ms, a third faster than asked).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || {
        format!(
            "invalid rate {s:?}: use STARTS/PERIOD, for example 10/s, 600/m or 100/1h (or none)"
        )
    };
    if matches!(s.trim(), "none" | "off" | "0") {
        return Ok(Rate {
            starts: 0,
            period: Duration::from_secs(1),
        });
    }
    let (n, per) = s.trim().split_once('/').ok_or_else(bad)?;
    let starts: u64 = n.trim().parse().map_err(|_| bad())?;
    let per = per.trim();
    let period = match per {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86400),
        other => crate::model::units::parse_duration(other).map_err(|_| bad())?,
    };
    if starts == 0
        || starts > 1_000_000
        || period < Duration::from_millis(1)
        || period > Duration::from_secs(86400)
    {
        return Err(format!(
            "rate {s:?} is out of range: 1..=1000000 starts per 1ms..=1d"
        ));
    }
    if !whole_ms(period) {
        return Err(format!(
            "rate {s:?}: the period must be a whole number of milliseconds, for example 3/2ms"
        ));
    }
    Ok(Rate { starts, period })
}

/// Parse a monthly quota of agent time: `100h`, `100h/month`, `30m`, or `none`.
/// It must be a whole number of milliseconds (it is stored in ms, where 0
/// means no quota: `0.5ms` would otherwise lift the quota altogether).
pub fn parse_quota(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if matches!(t, "none" | "off" | "0") {
        return Ok(Duration::ZERO);
    }
    let amount = t
        .strip_suffix("/month")
        .or_else(|| t.strip_suffix("/mo"))
        .unwrap_or(t);
    let quota = crate::model::units::parse_duration(amount).map_err(|_| {
        format!(
            "invalid quota {s:?}: use agent time per month, for example 100h/month or 30m (or none)"
        )
    })?;
    if !whole_ms(quota) {
        return Err(format!(
            "quota {s:?} must be a whole number of milliseconds, for example 100h/month or 30m (or none)"
        ));
    }
    Ok(quota)
}

/// A change to the limits of a tenant, a tier or the defaults; `None` leaves a
/// field alone. Build it, [`validate`](Self::validate) it, then [`apply`](Self::apply).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitsUpdate {
    /// New concurrency cap.
    pub max_concurrency: Option<u64>,
    /// New timeout cap.
    pub max_timeout: Option<Duration>,
    /// New memory cap, bytes.
    pub max_memory: Option<u64>,
    /// New weight.
    pub weight: Option<u64>,
    /// New start rate (`starts` 0: unlimited).
    pub rate: Option<Rate>,
    /// New burst (0: equal to the rate).
    pub burst: Option<u64>,
    /// New monthly quota of agent time (zero: none).
    pub quota: Option<Duration>,
    /// Tier name (a tenant only).
    pub tier: Option<String>,
    /// Price per agent-minute in dollars (a tier or the defaults).
    pub price_per_minute: Option<f64>,
    /// Price per 1,000 tokens in dollars (a tier or the defaults).
    pub price_per_1k_tokens: Option<f64>,
    /// Expected start rate; twice it raises an alert.
    pub expected_rate: Option<Rate>,
    /// Graduated price per agent-minute by the month's agent time (empty:
    /// none, the flat `price_per_minute` applies).
    pub price_steps: Option<PriceSteps>,
    /// Graduated price per 1,000 tokens by the month's tokens (empty: none).
    pub token_price_steps: Option<PriceSteps>,
    /// Monthly spend cap, micro-dollars (0: none).
    pub spend_cap: Option<u64>,
}

/// Whose limits a [`LimitsUpdate`] changes.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// One tenant.
    Tenant(&'a str),
    /// A tier (every tenant on it).
    Tier(&'a str),
    /// The defaults for fields nobody set.
    Defaults,
}

fn micros(dollars: f64) -> u64 {
    (dollars * 1_000_000.0).round().max(0.0) as u64
}

impl LimitsUpdate {
    /// Check every field's range; the error names the flag and the range.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let out_of = |what: &str, range: &str| {
            Err(InvalidInput(format!("{what} is out of range: use {range}")))
        };
        if let Some(n) = self.max_concurrency
            && !MAX_CONCURRENCY_RANGE.contains(&n)
        {
            return out_of("--max-concurrency", "1..=100000");
        }
        if let Some(d) = self.max_timeout
            && !MAX_TIMEOUT_RANGE.contains(&d)
        {
            return out_of("--max-timeout", "1s..=7d");
        }
        if let Some(m) = self.max_memory
            && !MAX_MEMORY_RANGE.contains(&m)
        {
            return out_of("--max-memory", "1MiB..=1TiB");
        }
        if let Some(w) = self.weight
            && !WEIGHT_RANGE.contains(&w)
        {
            return out_of("--weight", "1..=1000");
        }
        if let Some(b) = self.burst
            && b > 1_000_000
        {
            return out_of("--burst", "0..=1000000");
        }
        if let Some(q) = self.quota
            && q > Duration::from_secs(31 * 24 * 3600 * 100_000)
        {
            return out_of("--quota", "up to 100000 agent-months");
        }
        for (flag, v) in [
            ("--price-per-minute", self.price_per_minute),
            ("--price-per-1k-tokens", self.price_per_1k_tokens),
        ] {
            if let Some(p) = v
                && !(0.0..=1000.0).contains(&p)
            {
                return out_of(flag, "0..=1000 dollars");
            }
        }
        if let Some(c) = self.spend_cap
            && c > MAX_SPEND_CAP_MICROS
        {
            return out_of("--spend-cap", "up to $1000000000/month");
        }
        for (flag, steps) in [
            ("--price-steps", &self.price_steps),
            ("--token-price-steps", &self.token_price_steps),
        ] {
            if let Some(s) = steps {
                s.check()
                    .map_err(|e| InvalidInput(format!("{flag}: {e}")))?;
            }
        }
        if let Some(t) = &self.tier {
            validate_name("tier", t)?;
        }
        Ok(())
    }

    /// True if nothing would change.
    pub fn is_empty(&self) -> bool {
        self.fields().is_empty()
    }

    /// The Redis fields this update writes.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f: Vec<(&'static str, String)> = Vec::new();
        let mut put = |k: &'static str, v: Option<u64>| {
            if let Some(v) = v {
                f.push((k, v.to_string()));
            }
        };
        put("max_concurrency", self.max_concurrency);
        put(
            "max_timeout_ms",
            self.max_timeout.map(|d| d.as_millis() as u64),
        );
        put("max_memory", self.max_memory);
        put("weight", self.weight);
        put("rate", self.rate.map(|r| r.starts));
        put(
            "rate_period_ms",
            self.rate.map(|r| r.period.as_millis() as u64),
        );
        put("burst", self.burst);
        put("quota_ms", self.quota.map(|d| d.as_millis() as u64));
        put("price_minute_micros", self.price_per_minute.map(micros));
        put("price_ktok_micros", self.price_per_1k_tokens.map(micros));
        put(
            "expected_rate_per_min",
            self.expected_rate.map(|r| {
                (r.starts as f64 * 60_000.0 / r.period.as_millis().max(1) as f64).ceil() as u64
            }),
        );
        put("spend_cap_micros", self.spend_cap);
        if let Some(s) = &self.price_steps {
            f.push(("price_minute_steps", s.to_field()));
        }
        if let Some(s) = &self.token_price_steps {
            f.push(("price_ktok_steps", s.to_field()));
        }
        if let Some(t) = &self.tier {
            f.push(("tier", t.clone()));
        }
        f
    }

    /// One-line summary of what this update sets, for the CLI.
    pub fn describe(&self) -> String {
        self.fields()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Highest spend cap, micro-dollars ($1,000,000,000 a month).
pub const MAX_SPEND_CAP_MICROS: u64 = 1_000_000_000_000_000;
/// Most steps in one price schedule.
pub const MAX_PRICE_STEPS: usize = 16;
/// Highest step threshold: 10^13 ms of agent time (317 years) or tokens.
/// With prices of at most $1000 per unit (10^9 micro-dollars) and at most
/// [`MAX_PRICE_STEPS`] steps, every intermediate value of the scripts'
/// arithmetic stays an exact integer in a double (below 2^53), see
/// [`step_amount`].
pub const MAX_STEP_FROM: u64 = 10_000_000_000_000;

/// One step of a graduated price: from `from` units of the month's usage
/// on (ms of agent time, or tokens), each unit costs `micros` per
/// [`PriceUnit::per`] units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceStep {
    /// Usage of the month where the step starts (ms, or tokens).
    pub from: u64,
    /// Price, micro-dollars per agent-minute (or per 1,000 tokens).
    pub micros: u64,
}

/// What a price schedule prices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriceUnit {
    /// Agent time: usage in ms, priced per minute.
    Minutes,
    /// Tokens: usage in tokens, priced per 1,000.
    Tokens,
}

impl PriceUnit {
    /// Usage units per priced unit: 60,000 ms per minute, 1,000 tokens.
    pub fn per(self) -> u64 {
        match self {
            PriceUnit::Minutes => 60_000,
            PriceUnit::Tokens => 1_000,
        }
    }
}

/// A graduated price schedule (volume pricing): the usage of the month
/// (agent time or tokens) is split at the steps' thresholds and each part
/// is priced at its step's rate. Empty: no steps (the flat price applies;
/// stored as `none`, which also overrides a tier's steps for a tenant).
///
/// Written `PRICE[, PRICE@FROM]...`: `0.010, 0.008@10000m, 0.006@50000m`
/// is $0.010 per agent-minute for the first 10,000 minutes of the month,
/// $0.008 from 10,000 to 50,000, $0.006 beyond. Prices are dollars (a
/// leading `$` is allowed); thresholds are agent time (`10000m`, `500h`)
/// or, for tokens, counts (`10M`, `500k`, `2500000`). Stored as
/// `from:micros,...` (ms or tokens, micro-dollars).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceSteps(pub Vec<PriceStep>);

fn parse_dollars(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_prefix('$').unwrap_or(t).trim();
    let v: f64 = t
        .parse()
        .map_err(|_| format!("{s:?} is not a price in dollars, for example 0.008"))?;
    if !(0.0..=1000.0).contains(&v) {
        return Err(format!("price {s:?} is out of range: use 0..=1000 dollars"));
    }
    Ok(micros(v))
}

fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000.0),
        Some((i, 'M')) => (&t[..i], 1_000_000.0),
        Some((i, 'G' | 'B')) => (&t[..i], 1_000_000_000.0),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a token count, for example 10M or 500k"))?;
    let n = v * mult;
    if !(n >= 0.0 && n.fract() == 0.0) {
        return Err(format!("{s:?} is not a whole number of tokens"));
    }
    Ok(n as u64)
}

impl PriceSteps {
    /// Parse `PRICE[, PRICE@FROM]...` (or `none`) for `unit`.
    pub fn parse(s: &str, unit: PriceUnit) -> Result<PriceSteps, String> {
        if matches!(s.trim(), "none" | "off" | "") {
            return Ok(PriceSteps::default());
        }
        let mut steps = Vec::new();
        for (i, item) in s.split(',').enumerate() {
            let (price, from) = match item.split_once('@') {
                Some((p, f)) => (p, Some(f.trim())),
                None => (item, None),
            };
            let micros = parse_dollars(price)?;
            let from = match (i, from) {
                (0, None) => 0,
                (_, None) => {
                    return Err(format!(
                        "step {item:?} needs a threshold: PRICE@FROM, for example 0.008@10000m"
                    ));
                }
                (_, Some(f)) => match unit {
                    PriceUnit::Minutes => {
                        let d = crate::model::units::parse_duration(f).map_err(|_| {
                            format!("threshold {f:?} is not agent time, for example 10000m or 500h")
                        })?;
                        if !whole_ms(d) {
                            return Err(format!(
                                "threshold {f:?} must be a whole number of milliseconds"
                            ));
                        }
                        d.as_millis().min(u64::MAX as u128) as u64
                    }
                    PriceUnit::Tokens => parse_count(f)?,
                },
            };
            steps.push(PriceStep { from, micros });
        }
        let p = PriceSteps(steps);
        p.check()?;
        Ok(p)
    }

    /// The schedule's rules: it starts at 0, thresholds rise strictly up to
    /// [`MAX_STEP_FROM`], at most [`MAX_PRICE_STEPS`] steps, prices up to
    /// $1000 per unit.
    pub fn check(&self) -> Result<(), String> {
        let s = &self.0;
        if s.is_empty() {
            return Ok(());
        }
        if s.len() > MAX_PRICE_STEPS {
            return Err(format!("at most {MAX_PRICE_STEPS} steps"));
        }
        if s[0].from != 0 {
            return Err("the first step must start at 0 (write its price without @)".into());
        }
        for w in s.windows(2) {
            if w[1].from <= w[0].from {
                return Err("thresholds must rise from step to step".into());
            }
        }
        if s.iter().any(|x| x.from > MAX_STEP_FROM) {
            return Err(format!("thresholds go up to {MAX_STEP_FROM}"));
        }
        if s.iter().any(|x| x.micros > 1_000_000_000) {
            return Err("prices go up to $1000 per unit".into());
        }
        Ok(())
    }

    /// True when there are no steps (the flat price applies).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stored form: `from:micros,...`, or `none`.
    pub fn to_field(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        let v: Vec<String> = self
            .0
            .iter()
            .map(|s| format!("{}:{}", s.from, s.micros))
            .collect();
        v.join(",")
    }

    /// Read the stored form (None: not a schedule).
    pub fn from_field(s: &str) -> Option<PriceSteps> {
        if s == "none" || s.is_empty() {
            return Some(PriceSteps::default());
        }
        let mut v = Vec::new();
        for item in s.split(',') {
            let (f, p) = item.split_once(':')?;
            v.push(PriceStep {
                from: f.parse().ok()?,
                micros: p.parse().ok()?,
            });
        }
        Some(PriceSteps(v))
    }

    /// As an operator writes it (`0.01, 0.008@10000m`).
    pub fn describe(&self, unit: PriceUnit) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        let v: Vec<String> = self
            .0
            .iter()
            .map(|s| {
                let price = format!("{}", s.micros as f64 / 1e6);
                if s.from == 0 {
                    price
                } else {
                    match unit {
                        PriceUnit::Minutes if s.from.is_multiple_of(60_000) => {
                            format!("{price}@{}m", s.from / 60_000)
                        }
                        PriceUnit::Minutes => format!("{price}@{}ms", s.from),
                        PriceUnit::Tokens => format!("{price}@{}", s.from),
                    }
                }
            })
            .collect();
        v.join(", ")
    }

    /// Price of usage `before..before + qty` of the month, micro-dollars:
    /// per step, `step_amount(part after) - step_amount(part before)`, the
    /// same arithmetic as `charge()` in lib/attempt.lua. Summed over a
    /// month's attempts it telescopes to [`total`](Self::total) of the
    /// month's usage, whatever the order the attempts were charged in.
    pub fn price(&self, unit: PriceUnit, before: u64, qty: u64) -> u64 {
        self.total(unit, before + qty) - self.total(unit, before)
    }

    /// Price of the first `used` units of a month: each step's part,
    /// floored per step ([`step_amount`]).
    pub fn total(&self, unit: PriceUnit, used: u64) -> u64 {
        let s = &self.0;
        let mut sum = 0;
        for (i, st) in s.iter().enumerate() {
            if used <= st.from {
                break;
            }
            let to = s.get(i + 1).map_or(used, |n| n.from.min(used));
            sum += step_amount(to - st.from, st.micros, unit.per());
        }
        sum
    }
}

/// `floor(qty * micros / per)` computed as the scripts do, exactly in
/// doubles: `qty = a * per + r`, so the value is `a * micros + floor(r *
/// micros / per)`, where `r * micros < per * 10^9 <= 6 * 10^13 < 2^53`
/// and `a * micros` is at most the bill itself (exact while a month's bill
/// stays below 2^53 micro-dollars, about $9 billion).
pub fn step_amount(qty: u64, micros: u64, per: u64) -> u64 {
    (qty / per) * micros + (qty % per) * micros / per
}

/// Parse a monthly spend cap: `$500/month`, `500`, `$1,200.50/mo`, or
/// `none`. Returns micro-dollars (0: none).
pub fn parse_spend_cap(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if matches!(t, "none" | "off" | "0") {
        return Ok(0);
    }
    let amount = t
        .strip_suffix("/month")
        .or_else(|| t.strip_suffix("/mo"))
        .unwrap_or(t)
        .trim();
    let amount = amount.strip_prefix('$').unwrap_or(amount).replace(',', "");
    let v: f64 = amount.trim().parse().map_err(|_| {
        format!(
            "invalid spend cap {s:?}: use dollars per month, for example '$500/month' (or none)"
        )
    })?;
    if !(v > 0.0 && v <= 1e9) {
        return Err(format!(
            "spend cap {s:?} is out of range: up to $1000000000/month"
        ));
    }
    Ok(micros(v))
}

/// A tier: a named set of limits and prices tenants are assigned to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    /// Tier name.
    pub name: String,
    /// Its limits and prices.
    pub limits: LimitsUpdate,
}

/// The tiers used when the configuration defines none.
pub fn builtin_tiers() -> Vec<Tier> {
    let per_min = |n: u64| {
        Some(Rate {
            starts: n,
            period: Duration::from_secs(60),
        })
    };
    let hours = |h: u64| Some(Duration::from_secs(h * 3600));
    vec![
        Tier {
            name: "free".into(),
            limits: LimitsUpdate {
                max_concurrency: Some(2),
                max_timeout: Some(Duration::from_secs(300)),
                max_memory: Some(512 << 20),
                weight: Some(1),
                rate: per_min(60),
                quota: hours(10),
                price_per_minute: Some(0.01),
                price_per_1k_tokens: Some(0.002),
                expected_rate: per_min(20),
                ..Default::default()
            },
        },
        Tier {
            name: "pro".into(),
            limits: LimitsUpdate {
                max_concurrency: Some(10),
                max_timeout: Some(Duration::from_secs(1800)),
                max_memory: Some(2 << 30),
                weight: Some(3),
                rate: per_min(600),
                quota: hours(500),
                price_per_minute: Some(0.01),
                price_per_1k_tokens: Some(0.002),
                expected_rate: per_min(200),
                ..Default::default()
            },
        },
        Tier {
            name: "enterprise".into(),
            limits: LimitsUpdate {
                max_concurrency: Some(50),
                max_timeout: Some(Duration::from_secs(7200)),
                max_memory: Some(8 << 30),
                weight: Some(5),
                rate: Some(Rate {
                    starts: 0,
                    period: Duration::from_secs(1),
                }),
                quota: Some(Duration::ZERO),
                price_per_minute: Some(0.008),
                price_per_1k_tokens: Some(0.0015),
                expected_rate: per_min(1000),
                ..Default::default()
            },
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_enforced_with_the_flag_named() {
        let bad = LimitsUpdate {
            max_concurrency: Some(0),
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-concurrency")
        );
        let bad = LimitsUpdate {
            weight: Some(5000),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("--weight"));
        let bad = LimitsUpdate {
            max_timeout: Some(Duration::from_millis(10)),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = LimitsUpdate {
            price_per_minute: Some(-1.0),
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("--price-per-minute")
        );
        let ok = LimitsUpdate {
            max_concurrency: Some(4),
            weight: Some(3),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn rates_and_quotas_parse() {
        assert_eq!(
            parse_rate("10/s").unwrap(),
            Rate {
                starts: 10,
                period: Duration::from_secs(1)
            }
        );
        assert_eq!(parse_rate("600/m").unwrap().period, Duration::from_secs(60));
        assert_eq!(
            parse_rate("5/500ms").unwrap().period,
            Duration::from_millis(500)
        );
        assert_eq!(parse_rate("none").unwrap().starts, 0);
        for bad in ["10", "x/s", "10/fortnight", "0/s", "-1/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_quota("100h/month").unwrap(),
            Duration::from_secs(360_000)
        );
        assert_eq!(parse_quota("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_quota("none").unwrap(), Duration::ZERO);
        assert!(parse_quota("lots").is_err());
    }

    /// Found by `fuzz/` (target `units`): periods and quotas are stored in
    /// whole milliseconds, so fractions of one were silently truncated:
    /// `3/1.5ms` became 3 per 1 ms and a `0.5ms` quota became 0, no quota.
    #[test]
    fn sub_millisecond_periods_and_quotas_are_refused() {
        for bad in ["3/1.5ms", "1/1.0005s", "100/.333333333m"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("whole number of milliseconds"), "{bad}: {e}");
        }
        for bad in ["0.5ms", ".333333333m/month", "1.0000001s"] {
            let e = parse_quota(bad).unwrap_err();
            assert!(e.contains("whole number of milliseconds"), "{bad}: {e}");
        }
        let r = parse_rate("3/1.5s").unwrap();
        let u = LimitsUpdate {
            rate: Some(r),
            quota: Some(parse_quota("1.5s").unwrap()),
            ..Default::default()
        };
        let f = u.fields();
        assert!(f.contains(&("rate_period_ms", "1500".to_string())), "{f:?}");
        assert!(f.contains(&("quota_ms", "1500".to_string())), "{f:?}");
    }

    #[test]
    fn layers_resolve_in_order() {
        let own: HashMap<String, String> =
            [("max_concurrency".to_string(), "3".to_string())].into();
        let tier: HashMap<String, String> = [
            ("max_concurrency".to_string(), "7".to_string()),
            ("weight".to_string(), "4".to_string()),
        ]
        .into();
        let l = TenantLimits::resolve(&[&own, &tier]);
        assert_eq!(
            (l.max_concurrency, l.weight, l.max_timeout_ms),
            (3, 4, BUILTIN.max_timeout_ms)
        );
    }

    #[test]
    fn price_steps_parse_store_and_refuse_what_they_should() {
        let s =
            PriceSteps::parse("$0.010, 0.008@10000m, 0.006@50000m", PriceUnit::Minutes).unwrap();
        assert_eq!(s.to_field(), "0:10000,600000000:8000,3000000000:6000");
        assert_eq!(PriceSteps::from_field(&s.to_field()), Some(s.clone()));
        assert_eq!(
            s.describe(PriceUnit::Minutes),
            "0.01, 0.008@10000m, 0.006@50000m"
        );
        let t = PriceSteps::parse("0.002, 0.0015@10M, 0.001@500k0", PriceUnit::Tokens);
        assert!(t.is_err(), "{t:?}");
        let t = PriceSteps::parse("0.002, 0.001@500k, 0.0005@10M", PriceUnit::Tokens).unwrap();
        assert_eq!(t.to_field(), "0:2000,500000:1000,10000000:500");
        assert_eq!(
            PriceSteps::parse("none", PriceUnit::Minutes)
                .unwrap()
                .to_field(),
            "none"
        );
        for bad in [
            "0.01, 0.008",             // no threshold
            "0.01@5m, 0.008@10m",      // first not from 0
            "0.01, 0.02@1h, 0.01@30m", // thresholds fall
            "0.01, 0.008@1.5ms",       // not whole ms
            "2000",                    // price out of range
            "cheap",
        ] {
            assert!(PriceSteps::parse(bad, PriceUnit::Minutes).is_err(), "{bad}");
        }
        let many = vec!["0.01"; 17].join(", ");
        assert!(PriceSteps::parse(&many, PriceUnit::Minutes).is_err());
    }

    /// Graduated prices telescope: however a month's usage is split into
    /// attempts and in whatever order they are charged, the attempts' prices
    /// add up to the price of the month's total, and each step's amount is
    /// floor(part x price / unit); step_amount is exact against u128.
    #[test]
    fn graduated_prices_telescope_and_stay_exact() {
        let s = PriceSteps::parse("0.010, 0.008@3m, 0.006@10m", PriceUnit::Minutes).unwrap();
        let parts: Vec<u64> = (0..500).map(|i| 1 + (i * 7919) % 4999).collect();
        let total: u64 = parts.iter().sum();
        for order in [false, true] {
            let mut used = 0;
            let mut sum = 0;
            let it: Box<dyn Iterator<Item = &u64>> = if order {
                Box::new(parts.iter().rev())
            } else {
                Box::new(parts.iter())
            };
            for q in it {
                sum += s.price(PriceUnit::Minutes, used, *q);
                used += q;
            }
            assert_eq!(sum, s.total(PriceUnit::Minutes, total));
        }
        let by_hand = step_amount(180_000, 10_000, 60_000)
            + step_amount(420_000, 8_000, 60_000)
            + step_amount(total - 600_000, 6_000, 60_000);
        assert_eq!(s.total(PriceUnit::Minutes, total), by_hand);
        for (q, p) in [
            (MAX_STEP_FROM, 1_000_000_000u64),
            (59_999, 999_999_999),
            (123_456_789_012, 7),
        ] {
            let exact = (q as u128 * p as u128 / 60_000) as u64;
            assert_eq!(step_amount(q, p, 60_000), exact, "{q} x {p}");
        }
    }

    #[test]
    fn builtin_tiers_are_valid() {
        for t in builtin_tiers() {
            t.limits.validate().unwrap();
            assert!(!t.limits.is_empty());
        }
    }
}
