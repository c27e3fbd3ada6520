//! The webhook duty: delivers tenant alerts (quota and spend thresholds,
//! rate alerts, dead-lettered jobs) to each tenant's webhook, at least once.
//!
//! The scripts record an alert in the partition's stream `B:alerts` in the
//! step that raises it ([`crate::queue::alerts`]); this duty reads the
//! streams as one consumer of the group `webhooks`, POSTs each alert signed
//! ([`sign`]) and acknowledges it only after a 2xx. A failed delivery waits
//! [`crate::model::backoff::retry_delay`] (exponential, jittered) and is
//! tried again, until [`WebhooksConfig::max_attempts`] or
//! [`WebhooksConfig::max_age`], when it is dead-lettered to `B:alerts:dead`.
//! Entries stay pending with this consumer while it holds them (their idle
//! time renewed every third of [`WebhooksConfig::claim_idle`]); a dead
//! worker's are taken over with `XAUTOCLAIM` after `claim_idle`, so a crash
//! loses nothing (the alert may then arrive twice, with the same
//! `Agentq-Delivery-Id`).
//!
//! Deliveries run concurrently, at most [`WebhooksConfig::concurrency`] in
//! all and [`WebhooksConfig::per_tenant`] per tenant, each bounded by
//! [`WebhooksConfig::timeout`], so a slow or hostile receiver holds up only
//! its own tenant's alerts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{ConfigError, pause};
use crate::model::backoff::{Pacing, retry_delay};
use crate::queue::alerts::{Alert, AlertReader, Read, Webhook, webhook};
use crate::queue::{Queue, QueueError};

/// How the webhook duty works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhooksConfig {
    /// Time for one delivery: connect, send, response headers and the part
    /// of the body read (default 5 s).
    pub timeout: Duration,
    /// Response body bytes read at most (default 4 KiB; the rest is not
    /// read: only the status counts).
    pub max_response: usize,
    /// Deliveries in flight at once, all tenants (default 32).
    pub concurrency: usize,
    /// Deliveries in flight at once per tenant (default 2).
    pub per_tenant: usize,
    /// First retry delay; doubles per failed attempt, jittered to [d/2, d]
    /// (default 5 s).
    pub retry_base: Duration,
    /// Longest retry delay (default 10 min).
    pub retry_max: Duration,
    /// Failed attempts after which an alert is dead-lettered (default 15:
    /// about 1.5 h of retries at the default delays).
    pub max_attempts: u64,
    /// Age after which a failing alert is dead-lettered (default 24 h).
    pub max_age: Duration,
    /// Entries pending this long with another worker are taken over
    /// (default 60 s; longer than `timeout`, and held entries are renewed
    /// every third of it).
    pub claim_idle: Duration,
    /// Entries read per partition per pass (default 100).
    pub batch: usize,
    /// Alerts held (waiting or in flight) by this worker at most; above it
    /// no new ones are read (default 10,000).
    pub max_held: usize,
    /// Alerts of one tenant held at most: a new one beyond it is
    /// dead-lettered at once (reason `backlog`), so one tenant's failing
    /// receiver cannot fill `max_held` (default 1,000).
    pub max_held_per_tenant: usize,
    /// Refuse receivers at loopback, private, link-local and other
    /// non-public addresses (SSRF guard; default off).
    pub public_only: bool,
    /// Wait after a pass with nothing to do (default 250 ms).
    pub idle_pause: Duration,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            timeout: Duration::from_secs(5),
            max_response: 4096,
            concurrency: 32,
            per_tenant: 2,
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(600),
            max_attempts: 15,
            max_age: Duration::from_secs(24 * 3600),
            claim_idle: Duration::from_secs(60),
            batch: 100,
            max_held: 10_000,
            max_held_per_tenant: 1_000,
            public_only: false,
            idle_pause: Duration::from_millis(250),
        }
    }
}

impl WebhooksConfig {
    /// Check the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |problem: &str| {
            Err(ConfigError {
                duty: "webhooks",
                problem: problem.to_string(),
            })
        };
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return bad("timeout must be above zero and at most 60s, for example 5s");
        }
        if self.concurrency == 0 || self.per_tenant == 0 {
            return bad("concurrency and per_tenant must be at least 1");
        }
        if self.retry_base.is_zero() || self.retry_max < self.retry_base {
            return bad("retry_base must be above zero and retry_max at least retry_base");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if self.claim_idle < self.timeout * 2 {
            return bad("claim_idle must be at least twice the timeout, for example 60s");
        }
        if self.batch == 0 || self.max_held < self.batch || self.max_held_per_tenant == 0 {
            return bad(
                "batch must be at least 1, max_held at least batch, max_held_per_tenant at least 1",
            );
        }
        Ok(())
    }
}

/// `Agentq-Signature` of `body` at unix time `t`: see
/// [`crate::model::events::webhook_signature`].
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    crate::model::events::webhook_signature(secret.as_bytes(), t, body)
}

/// How one delivery attempt went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered(u16),
    /// Any other status, a timeout, or a connection failure: try again.
    Failed(String),
}

/// POST `alert` to `hook`, signed, as attempt `attempt` (1-based).
pub async fn post(hook: &Webhook, alert: &Alert, attempt: u64, cfg: &WebhooksConfig) -> Outcome {
    let body = alert.payload().to_string().into_bytes();
    let now = chrono::Utc::now().timestamp();
    let req = crate::net::Request {
        method: "POST",
        url: &hook.url,
        headers: vec![
            ("content-type", "application/json".into()),
            (
                "user-agent",
                concat!("agentq-webhooks/", env!("CARGO_PKG_VERSION")).into(),
            ),
            ("agentq-signature", sign(&hook.secret, now, &body)),
            ("agentq-delivery-id", alert.delivery_id()),
            ("agentq-event", alert.kind.clone()),
            ("agentq-attempt", attempt.to_string()),
        ],
        body,
        max_body: cfg.max_response,
        fail_on_long_body: false,
        public_only: cfg.public_only,
    };
    match tokio::time::timeout(cfg.timeout, crate::net::send(req)).await {
        Err(_) => Outcome::Failed(format!("no answer within {:?}", cfg.timeout)),
        Ok(Err(e)) => Outcome::Failed(e),
        Ok(Ok(r)) if (200..300).contains(&r.status) => Outcome::Delivered(r.status),
        Ok(Ok(r)) => Outcome::Failed(format!(
            "HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).trim()
        )),
    }
}

/// A test alert of `tenant`, delivered now, not recorded (`agentq webhook
/// test`, `POST /v1/admin/tenants/{tenant}/webhook/test`).
pub async fn send_test(
    q: &Queue,
    tenant: &str,
    cfg: &WebhooksConfig,
) -> Result<Outcome, QueueError> {
    let Some(hook) = webhook(q, tenant).await? else {
        return Err(QueueError::Invalid(format!(
            "tenant {tenant} has no webhook: set one with agentq webhook set {tenant} --url URL"
        )));
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let alert = Alert {
        partition: q.partition_of(tenant),
        entry: format!("{now_ms}-{}", rand::random::<u32>()),
        tenant: tenant.to_string(),
        kind: "test".into(),
        fields: vec![],
    };
    Ok(post(&hook, &alert, 1, cfg).await)
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Alerts read (new, taken over, or own pending).
    pub read: usize,
    /// Deliveries started.
    pub started: usize,
    /// Alerts held now (waiting for a retry or in flight).
    pub held: usize,
}

struct Held {
    alert: Alert,
    due: Instant,
    busy: bool,
}

#[derive(Default)]
struct State {
    held: BTreeMap<(u32, String), Held>,
    in_flight: HashMap<String, usize>,
    held_by_tenant: HashMap<String, usize>,
}

struct Inner {
    config: WebhooksConfig,
    queue: Queue,
    reader: AlertReader,
    state: Mutex<State>,
    slots: Arc<tokio::sync::Semaphore>,
}

/// Delivers tenant alerts; one per worker.
pub struct Webhooks {
    inner: Arc<Inner>,
    pending_read: Mutex<bool>,
    renewed: Mutex<Instant>,
    reclaimed: Mutex<Option<Instant>>,
}

impl Webhooks {
    /// A duty reading as consumer `consumer` (the worker id).
    pub fn new(queue: Queue, consumer: impl Into<String>, config: WebhooksConfig) -> Self {
        let reader = AlertReader::new(queue.clone(), consumer);
        Webhooks {
            inner: Arc::new(Inner {
                slots: Arc::new(tokio::sync::Semaphore::new(config.concurrency)),
                config,
                queue,
                reader,
                state: Mutex::new(State::default()),
            }),
            pending_read: Mutex::new(false),
            renewed: Mutex::new(Instant::now()),
            reclaimed: Mutex::new(None),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &WebhooksConfig {
        &self.inner.config
    }

    /// Run until `shutdown`; Redis errors are logged and retried with the
    /// shared pacing. Deliveries in flight at shutdown are dropped (their
    /// entries stay pending: another worker takes them over).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut pacing = Pacing::default();
        while !shutdown.is_cancelled() {
            let wait = match self.run_once().await {
                Ok(p) if p.read > 0 || p.started > 0 => {
                    pacing.reset();
                    Duration::from_millis(20)
                }
                Ok(_) => self.inner.config.idle_pause,
                Err(e) => {
                    let wait = pacing.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "webhook duty: redis failed; alerts stay in their streams");
                    wait
                }
            };
            if pause(wait, &shutdown).await {
                return;
            }
        }
    }

    /// One pass: renew the entries held (when due), read this worker's own
    /// pending entries (first pass), a dead worker's (every quarter of
    /// `claim_idle`) and new ones, then start the deliveries that are due,
    /// within the concurrency limits. Deliveries run on; their outcome is
    /// settled in Redis when they end.
    pub async fn run_once(&self) -> Result<Pass, QueueError> {
        let inner = &self.inner;
        let cfg = &inner.config;
        self.renew_if_due().await?;
        let mut pass = Pass::default();
        let first = !std::mem::replace(&mut *lock(&self.pending_read), true);
        let reclaim = {
            let mut last = lock(&self.reclaimed);
            let due = last.is_none_or(|t| t.elapsed() >= cfg.claim_idle / 4);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        for p in 0..inner.queue.partitions() {
            let mut sources = Vec::new();
            if first {
                sources.push(Read::OwnPending);
            }
            if reclaim {
                sources.push(Read::Reclaim(cfg.claim_idle));
            }
            sources.push(Read::New);
            for from in sources {
                if lock(&inner.state).held.len() >= cfg.max_held {
                    break;
                }
                let alerts = inner.reader.read(p, from, cfg.batch).await?;
                pass.read += alerts.len();
                for a in alerts {
                    self.hold(a).await?;
                }
            }
        }
        pass.started = self.start_due();
        pass.held = lock(&inner.state).held.len();
        Ok(pass)
    }

    /// Alerts held now (waiting for a retry or in flight).
    pub fn held(&self) -> usize {
        lock(&self.inner.state).held.len()
    }

    async fn hold(&self, a: Alert) -> Result<(), QueueError> {
        let key = (a.partition, a.entry.clone());
        let over = {
            let st = lock(&self.inner.state);
            if st.held.contains_key(&key) {
                return Ok(());
            }
            st.held_by_tenant.get(&a.tenant).copied().unwrap_or(0)
                >= self.inner.config.max_held_per_tenant
        };
        if over {
            let tries = self.inner.reader.tries(&a).await?;
            tracing::warn!(tenant = %a.tenant, kind = %a.kind, id = %a.delivery_id(),
                "webhook alert dead-lettered: the tenant has too many undelivered alerts");
            return self
                .inner
                .reader
                .dead_letter(
                    &a,
                    tries,
                    "backlog",
                    "too many undelivered alerts of this tenant",
                )
                .await;
        }
        let mut st = lock(&self.inner.state);
        *st.held_by_tenant.entry(a.tenant.clone()).or_default() += 1;
        st.held.insert(
            key,
            Held {
                alert: a,
                due: Instant::now(),
                busy: false,
            },
        );
        Ok(())
    }

    /// Start every due delivery the limits allow; returns how many.
    fn start_due(&self) -> usize {
        let inner = &self.inner;
        let now = Instant::now();
        let mut started = 0;
        let mut st = lock(&inner.state);
        let State {
            held, in_flight, ..
        } = &mut *st;
        for (key, h) in held.iter_mut() {
            if h.busy || h.due > now {
                continue;
            }
            let n = in_flight.get(&h.alert.tenant).copied().unwrap_or(0);
            if n >= inner.config.per_tenant {
                continue;
            }
            let Ok(permit) = Arc::clone(&inner.slots).try_acquire_owned() else {
                break;
            };
            h.busy = true;
            *in_flight.entry(h.alert.tenant.clone()).or_default() += 1;
            let inner = Arc::clone(&self.inner);
            let alert = h.alert.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let _permit = permit;
                inner.deliver(key, alert).await;
            });
            started += 1;
        }
        started
    }

    async fn renew_if_due(&self) -> Result<(), QueueError> {
        let every = self.inner.config.claim_idle / 3;
        if lock(&self.renewed).elapsed() < every {
            return Ok(());
        }
        *lock(&self.renewed) = Instant::now();
        let mut by_part: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (p, e) in lock(&self.inner.state).held.keys() {
            by_part.entry(*p).or_default().push(e.clone());
        }
        for (p, entries) in by_part {
            for chunk in entries.chunks(500) {
                let kept = self.inner.reader.renew(p, chunk).await?;
                if kept.len() == chunk.len() {
                    continue;
                }
                // Gone (acknowledged by a worker that took them over while
                // this one stalled): forget those not in flight.
                let kept: std::collections::HashSet<String> = kept.into_iter().collect();
                let mut st = lock(&self.inner.state);
                for e in chunk.iter().filter(|e| !kept.contains(*e)) {
                    if st.held.get(&(p, e.clone())).is_some_and(|h| !h.busy) {
                        st.forget(&(p, e.clone()));
                    }
                }
            }
        }
        Ok(())
    }
}

impl State {
    fn forget(&mut self, key: &(u32, String)) {
        if let Some(h) = self.held.remove(key)
            && let Some(n) = self.held_by_tenant.get_mut(&h.alert.tenant)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held_by_tenant.remove(&h.alert.tenant);
            }
        }
    }
}

impl Inner {
    /// One delivery attempt of `alert`, then its outcome settled in Redis.
    async fn deliver(self: Arc<Self>, key: (u32, String), alert: Alert) {
        let result = self.attempt(&alert).await;
        let retry_at = match result {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(error = %e, id = %alert.delivery_id(), "webhook duty: redis failed settling a delivery; it will be tried again");
                Some(Instant::now() + Duration::from_secs(1))
            }
        };
        let mut st = lock(&self.state);
        if let Some(n) = st.in_flight.get_mut(&alert.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.in_flight.remove(&alert.tenant);
            }
        }
        match retry_at {
            None => st.forget(&key),
            Some(due) => {
                if let Some(h) = st.held.get_mut(&key) {
                    h.busy = false;
                    h.due = due;
                }
            }
        }
    }

    /// Deliver once; None when the alert is settled (delivered, dropped or
    /// dead-lettered), else when to try again.
    async fn attempt(&self, alert: &Alert) -> Result<Option<Instant>, QueueError> {
        let Some(hook) = webhook(&self.queue, &alert.tenant).await? else {
            tracing::info!(tenant = %alert.tenant, kind = %alert.kind, "webhook alert dropped: the tenant no longer has a webhook");
            self.reader.ack(alert).await?;
            return Ok(None);
        };
        let tries = self.reader.tries(alert).await?;
        match post(&hook, alert, tries + 1, &self.config).await {
            Outcome::Delivered(status) => {
                self.reader.ack(alert).await?;
                tracing::debug!(tenant = %alert.tenant, kind = %alert.kind, id = %alert.delivery_id(), status, "webhook alert delivered");
                Ok(None)
            }
            Outcome::Failed(error) => {
                let n = self.reader.failed(alert).await?;
                let age_ms = chrono::Utc::now().timestamp_millis() - alert.created_ms();
                let too_old =
                    age_ms > i64::try_from(self.config.max_age.as_millis()).unwrap_or(i64::MAX);
                if n >= self.config.max_attempts || too_old {
                    let reason = if too_old { "max_age" } else { "max_attempts" };
                    tracing::warn!(tenant = %alert.tenant, kind = %alert.kind, id = %alert.delivery_id(),
                        attempts = n, %error, reason, "webhook alert dead-lettered");
                    self.reader.dead_letter(alert, n, reason, &error).await?;
                    return Ok(None);
                }
                let wait = retry_delay(
                    self.config.retry_base,
                    self.config.retry_max,
                    u32::try_from(n).unwrap_or(u32::MAX),
                );
                tracing::info!(tenant = %alert.tenant, kind = %alert.kind, id = %alert.delivery_id(),
                    attempts = n, %error, retry_in = ?wait, "webhook delivery failed; will retry");
                Ok(Some(Instant::now() + wait))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(WebhooksConfig::default().validate(), Ok(()));
        let c = WebhooksConfig {
            claim_idle: Duration::from_secs(5),
            ..WebhooksConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
