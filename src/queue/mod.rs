//! The Redis data model and the atomic scripts that change it.
//!
//! [`Queue`] is a cheap-to-clone handle: one multiplexed connection, the
//! scripts loaded once, and the namespace/partition layout ([`keys`]). Every
//! state change is one script call (see `src/queue/scripts/*.lua`); reads for
//! operators live in [`inspect`].

pub mod alerts;
mod call;
mod group_reader;
pub mod hub;
pub mod inspect;
pub mod job;
pub mod job_events;
pub mod keys;
pub mod limits;
pub mod outbox;
pub mod schedules;
pub use crate::model::payload;
mod scripts;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;

pub use crate::model::attempt::{AttemptKey, HandBack};
pub use crate::model::events::QueueEvent;
pub use call::Call;
pub use job::{
    Claimed, ClaimedJob, CompleteStatus, Completed, Completion, Enqueued, JobSpec, Reaped, Released,
};
pub use keys::{Keys, partition_of, partition_of_job};
pub use scripts::{ScriptName, script_source};

/// The longest a queue may keep succeeded jobs ([`Queue::set_keep_completed`]).
pub const MAX_KEEP_COMPLETED: Duration = Duration::from_secs(365 * 86_400);

/// A keep-completed setting as people write it: `0` (removed as they
/// succeed), a duration such as `10m`, or `default` (None: the partition's
/// retention_ms).
pub fn parse_keep_completed(s: &str) -> Result<Option<Duration>, QueueError> {
    match s {
        "default" => Ok(None),
        "0" => Ok(Some(Duration::ZERO)),
        _ => crate::model::units::parse_duration(s)
            .map(Some)
            .map_err(|e| {
                QueueError::Invalid(format!(
                    "keep {s:?}: {e} (use 0, a duration such as 10m, or default)"
                ))
            }),
    }
}

/// Errors from the queue. `Invalid` and `OverCap` are the caller's input
/// (exit code 2, HTTP 4xx); the rest are runtime failures.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Bad input: names, payload, numbers out of range.
    #[error("{0}")]
    Invalid(String),
    /// A requested timeout or memory above the tenant's cap.
    #[error("{0}")]
    OverCap(String),
    /// A payload over the size limit.
    #[error("{0}")]
    TooLarge(String),
    /// No such job.
    #[error("no job {0}: check the id (agentq jobs --queue Q lists ids)")]
    NotFound(String),
    /// Redis refused a write because it reached `maxmemory` (policy
    /// `noeviction`): nothing was written. A runtime failure, not bad input.
    #[error(
        "redis is full ({0}); nothing was written: free memory in Redis (agentq dead Q \
         purge, agentq drain Q --purge, or raise maxmemory) and retry"
    )]
    Full(String),
    /// Redis failed or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Redis did not answer a state change in time, or the connection
    /// dropped after it was sent: it may or may not have taken effect.
    #[error(
        "redis did not answer ({0}); the change may or may not have been made: check before \
         repeating it (enqueue with an idempotency key to retry safely)"
    )]
    Unknown(String),
    /// Redis answered something agentq does not understand.
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// An enqueue or a claim ran on the primary, but fewer replicas than
    /// [`QueueConfig::min_replicas_ack`] confirmed it within
    /// [`QueueConfig::min_replicas_timeout`] (`WAIT`). An enqueue's jobs
    /// exist on the primary now, but a failover may lose them: retry with
    /// the same idempotency keys (a retry answers with the same job ids and
    /// waits for the replicas again). A claim's jobs were handed back
    /// unstarted ([`Queue::claim`]). The text says which and what to do.
    #[error("{0}")]
    NotReplicated(String),
}

impl From<crate::model::names::InvalidInput> for QueueError {
    fn from(e: crate::model::names::InvalidInput) -> Self {
        QueueError::Invalid(e.0)
    }
}

impl QueueError {
    /// True for errors caused by the caller's input.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            QueueError::Invalid(_)
                | QueueError::OverCap(_)
                | QueueError::TooLarge(_)
                | QueueError::NotFound(_)
        )
    }

    /// Map the scripts' `ERR agentq <kind>: ...` replies to typed errors.
    fn from_script(e: QueueError) -> QueueError {
        let QueueError::Redis(ref re) = e else {
            return e;
        };
        let d = re.details();
        let d = d.strip_prefix("ERR ").unwrap_or(d);
        if let Some(rest) = d.strip_prefix("agentq invalid: ") {
            return QueueError::Invalid(rest.to_string());
        }
        if let Some(rest) = d.strip_prefix("agentq over_cap: ") {
            return QueueError::OverCap(rest.to_string());
        }
        // A script's first write under maxmemory with noeviction: Redis
        // rejects it before anything is written (later writes of the same
        // call are never cut off), so the call had no effect.
        if d.starts_with("OOM ") || d.contains("OOM command not allowed") {
            let said = d.split(" script:").next().unwrap_or(d);
            return QueueError::Full(said.trim_end_matches('.').to_string());
        }
        e
    }
}

/// Where the queue lives and how it is laid out.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// `redis://`, `rediss://` (TLS), or for a Redis Cluster
    /// `redis-cluster://host:port?node=host:port&...` (`rediss-cluster://`
    /// with TLS): the scheme selects cluster mode, the nodes are seeds; or
    /// for a primary watched by Sentinels
    /// `redis-sentinel://sentinel:26379?sentinelServiceName=NAME&node=sentinel2:26379&...`
    /// (`rediss-sentinel://` with TLS): the hosts are Sentinels, asked for
    /// the current primary at every (re)connect.
    pub redis_url: String,
    /// Key namespace: every key starts with `{<namespace>:<partition>}`.
    pub namespace: String,
    /// Number of partitions tenants are spread over (1 unless on a cluster).
    /// Each partition is one hash tag, so one slot, so one shard: use at
    /// least as many partitions as the cluster has primaries (a few times
    /// more spreads them evenly). Fixed for the life of a namespace.
    pub partitions: u32,
    /// Payload limit checked client-side before sending (the script checks
    /// the partition's `max_payload` setting again).
    pub max_payload: usize,
    /// How long a command may wait for its reply before the caller gets an
    /// error (for a script: [`QueueError::Unknown`]).
    pub command_timeout: Duration,
    /// Replicas that must confirm an enqueue before it is acknowledged, and
    /// a claim before its jobs are handed to the caller (0: none, the
    /// default). Above 0, each enqueue and claim script call is followed by
    /// `WAIT <n> <min_replicas_timeout>` on the same connection (a dedicated
    /// one, so a slow `WAIT` never holds up other commands of this process,
    /// such as lease extensions and completions), and fewer confirmations
    /// fail the call with [`QueueError::NotReplicated`] (a claim's jobs are
    /// handed back unstarted). Bounds what a failover can lose to
    /// unacknowledged enqueues and unstarted claims; it does not make Redis
    /// strongly consistent (README, "Redis Sentinel").
    pub min_replicas_ack: u32,
    /// How long an enqueue or a claim waits for [`Self::min_replicas_ack`]
    /// replicas (keep it well below `command_timeout`).
    pub min_replicas_timeout: Duration,
}

impl QueueConfig {
    /// A config for `redis_url` with the default namespace `agentq`, one
    /// partition and a 1 MiB payload limit.
    pub fn new(redis_url: impl Into<String>) -> Self {
        QueueConfig {
            redis_url: redis_url.into(),
            namespace: "agentq".into(),
            partitions: 1,
            max_payload: 1 << 20,
            command_timeout: Duration::from_secs(10),
            min_replicas_ack: 0,
            min_replicas_timeout: Duration::from_secs(1),
        }
    }
}

/// A handle on the queue: clone it freely.
#[derive(Clone)]
pub struct Queue {
    client: Client,
    /// The connection acknowledged enqueues and claims use
    /// (`min_replicas_ack` > 0): its own, because `WAIT` holds up every
    /// later command of a connection.
    acked: Option<Client>,
    /// Per partition: its last claim on `acked` was not confirmed by enough
    /// replicas, so the next one first checks that they answer again
    /// ([`Queue::claim`]).
    replicas_short: Arc<Vec<std::sync::atomic::AtomicBool>>,
    cfg: Arc<QueueConfig>,
    scripts: Arc<scripts::Scripts>,
}

/// How every Redis connection of agentq reconnects: forever, from 100 ms
/// doubling to 5 s, so a Redis restart pauses agentq instead of killing it.
pub(crate) fn reconnect_policy() -> ReconnectPolicy {
    ReconnectPolicy::new_exponential(0, 100, 5_000, 2)
}

/// The reconnect policy for `url`: behind Sentinels every attempt first
/// asks a Sentinel for the current primary, so the backoff stops at 1 s
/// there; a promoted replica is then found within about a second of its
/// promotion (README, "Redis Sentinel").
pub(crate) fn reconnect_policy_for(url: &str) -> ReconnectPolicy {
    if is_sentinel_url(url) {
        ReconnectPolicy::new_exponential(0, 100, 1_000, 2)
    } else {
        reconnect_policy()
    }
}

/// True for `redis-sentinel://` and `rediss-sentinel://` URLs.
pub fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(scheme, _)| scheme.ends_with("-sentinel"))
}

/// The URL forms agentq takes, for error messages.
pub(crate) const URL_FORMS: &str = "use redis://host:port, rediss:// for TLS, \
     redis-cluster://host:port?node=host:port for a Redis Cluster, or \
     redis-sentinel://sentinel:26379?sentinelServiceName=NAME&node=sentinel2:26379 for a \
     primary watched by Sentinels";

/// A fred builder for `url` with agentq's connection settings: reconnect
/// forever with capped backoff ([`reconnect_policy_for`]), TCP_NODELAY,
/// 5 s to connect, commands timing out after `timeout`. Every client agentq
/// makes (the queue's, the acknowledged-enqueue one, the workers' wake
/// subscriber) comes from here, so every URL form works for all of them.
pub(crate) fn client_builder(url: &str, timeout: Duration) -> Result<Builder, QueueError> {
    let config = Config::from_url(url).map_err(|e| {
        QueueError::Invalid(format!(
            "redis URL {} is not valid ({e}); {URL_FORMS}",
            crate::model::redact::redact_url(url)
        ))
    })?;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(10);
            c.max_command_attempts = 3;
            c.tcp = TcpConfig {
                nodelay: Some(true),
                ..Default::default()
            };
        })
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
        })
        .set_policy(reconnect_policy_for(url));
    Ok(builder)
}

/// Build a fred client that reconnects forever with capped backoff, so a
/// Redis restart (or a Sentinel failover) pauses agentq instead of killing
/// it; commands time out after `timeout`.
fn build_client(url: &str, timeout: Duration) -> Result<Client, QueueError> {
    Ok(client_builder(url, timeout)?.build()?)
}

impl Queue {
    /// Connect, load the scripts and return a handle.
    pub async fn connect(cfg: QueueConfig) -> Result<Queue, QueueError> {
        Self::connect_with(cfg, scripts::Scripts::new()).await
    }

    /// For the simulation test only (feature `test-clock`): like
    /// [`Queue::connect`], but the scripts take their time from the
    /// partition's `B:testclock` key (ms) whenever the test has set it.
    #[cfg(feature = "test-clock")]
    #[doc(hidden)]
    pub async fn connect_with_test_clock(cfg: QueueConfig) -> Result<Queue, QueueError> {
        Self::connect_with(cfg, scripts::Scripts::with_test_clock()).await
    }

    async fn connect_with(
        cfg: QueueConfig,
        scripts: scripts::Scripts,
    ) -> Result<Queue, QueueError> {
        if cfg.namespace.is_empty() || cfg.namespace.contains(['{', '}', ':']) {
            return Err(QueueError::Invalid(format!(
                "namespace {:?} must be non-empty without '{{', '}}' or ':'",
                cfg.namespace
            )));
        }
        if cfg.partitions == 0 || cfg.partitions > 1024 {
            return Err(QueueError::Invalid("partitions must be 1..=1024".into()));
        }
        let client = build_client(&cfg.redis_url, cfg.command_timeout)?;
        if let Err(e) = client.init().await {
            return Err(topology_error(&cfg.redis_url, e));
        }
        check_not_cluster_node(&client, &cfg.redis_url).await?;
        scripts.load(&client).await?;
        let acked = if cfg.min_replicas_ack > 0 {
            if cfg.min_replicas_timeout >= cfg.command_timeout {
                return Err(QueueError::Invalid(format!(
                    "min_replicas_timeout ({:?}) must be shorter than command_timeout ({:?})",
                    cfg.min_replicas_timeout, cfg.command_timeout
                )));
            }
            let acked = build_client(&cfg.redis_url, cfg.command_timeout)?;
            if let Err(e) = acked.init().await {
                return Err(topology_error(&cfg.redis_url, e));
            }
            Some(acked)
        } else {
            None
        };
        let replicas_short = Arc::new(
            (0..cfg.partitions)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
        );
        let queue = Queue {
            client,
            acked,
            replicas_short,
            cfg: Arc::new(cfg),
            scripts: Arc::new(scripts),
        };
        queue.record_layout().await?;
        queue.log_shard_spread();
        Ok(queue)
    }

    /// Record the partition count in every partition (`B:meta`), or check
    /// it against what is recorded: a namespace is laid out once, and a
    /// process (or a client calling the enqueue script) that computes
    /// partitions differently would put tenants where their limits are not.
    async fn record_layout(&self) -> Result<(), QueueError> {
        let n = self.cfg.partitions;
        for p in 0..n {
            let key = self.keys(p).key(&["meta"]);
            // Read first: a full Redis (noeviction) refuses the write, and a
            // namespace in use is already recorded.
            let mut recorded: Option<u32> = self.client.hget(&key, "partitions").await?;
            if recorded.is_none() {
                let fresh: bool = self
                    .client
                    .hsetnx(&key, "partitions", n)
                    .await
                    .map_err(|e| QueueError::from_script(QueueError::Redis(e)))?;
                if fresh {
                    continue;
                }
                recorded = self.client.hget(&key, "partitions").await?;
            }
            if recorded != Some(n) {
                return Err(QueueError::Invalid(format!(
                    "namespace {:?} is laid out in {} partitions, but this process uses {n}: \
                     set --partitions (AGENTQ_PARTITIONS) to {} (the count is fixed for the \
                     life of a namespace)",
                    self.cfg.namespace,
                    recorded.map_or("an unknown number of".to_string(), |r| r.to_string()),
                    recorded.map_or("the original count".to_string(), |r| r.to_string()),
                )));
            }
        }
        Ok(())
    }

    /// On a Redis Cluster: the primary (`host:port`) that owns each
    /// partition's slot, from the client's cached slot map. None when not
    /// clustered.
    pub fn partition_shards(&self) -> Option<BTreeMap<u32, String>> {
        let state = self.client.cached_cluster_state()?;
        (0..self.partitions())
            .map(|p| {
                let slot = fred::util::redis_keyslot(self.keys(p).base().as_bytes());
                let owner = state.get_server(slot)?;
                Some((p, format!("{}:{}", owner.host, owner.port)))
            })
            .collect()
    }

    /// Say how partitions map to shards, and warn when some shard gets none
    /// (all of a partition's keys live on the shard owning its slot).
    fn log_shard_spread(&self) {
        let Some(owners) = self.partition_shards() else {
            return;
        };
        let primaries = self
            .client
            .cached_cluster_state()
            .map_or(0, |s| s.unique_primary_nodes().len());
        let used: std::collections::BTreeSet<&String> = owners.values().collect();
        if used.len() < primaries {
            tracing::warn!(
                partitions = self.partitions(),
                shards_used = used.len(),
                primaries,
                "some cluster shards own no partition of this namespace and get no queue traffic: \
                 raise --partitions (a fixed setting per namespace; see README, Redis Cluster)"
            );
        } else {
            tracing::debug!(?owners, "partitions on cluster shards");
        }
    }

    /// The underlying fred client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration this handle was built with.
    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Redis's clock (`TIME`), the one clock every script decides by.
    pub async fn server_time(&self) -> Result<chrono::DateTime<chrono::Utc>, QueueError> {
        let t: Vec<String> = self
            .client
            .custom(fred::cmd!("TIME"), Vec::<Value>::new())
            .await?;
        let secs = t.first().and_then(|s| s.parse::<i64>().ok());
        let micros = t.get(1).and_then(|s| s.parse::<u32>().ok());
        match (secs, micros) {
            (Some(s), Some(us)) => chrono::DateTime::from_timestamp(s, us * 1000)
                .ok_or_else(|| QueueError::Protocol(format!("TIME out of range: {t:?}"))),
            _ => Err(QueueError::Protocol(format!(
                "unexpected TIME reply: {t:?}"
            ))),
        }
    }

    /// Number of partitions.
    pub fn partitions(&self) -> u32 {
        self.cfg.partitions
    }

    /// Key builder for partition `p`.
    pub fn keys(&self, p: u32) -> Keys {
        Keys::new(&self.cfg.namespace, p)
    }

    /// The partition of a tenant.
    pub fn partition_of(&self, tenant: &str) -> u32 {
        partition_of(tenant, self.cfg.partitions)
    }

    /// The partition of a job id, checked against this layout.
    pub fn partition_of_job(&self, id: &str) -> Result<u32, QueueError> {
        match partition_of_job(id) {
            Some(p) if p < self.cfg.partitions => Ok(p),
            _ => Err(QueueError::NotFound(id.to_string())),
        }
    }

    async fn call(&self, name: ScriptName, p: u32, args: Vec<String>) -> Result<Value, QueueError> {
        let args = args.into_iter().map(Value::from).collect();
        self.scripts
            .call(&self.client, name, self.keys(p).base(), args)
            .await
            .map_err(QueueError::from_script)
    }

    /// The enqueue script on partition `p`, then `WAIT` for
    /// `min_replicas_ack` replicas, pipelined on the dedicated `acked`
    /// connection (`WAIT` counts the replicas that confirmed every write
    /// this connection made before it, so it must follow the script on the
    /// same connection; both are written at most once). The script's reply,
    /// flat, once enough replicas confirmed; [`QueueError::NotReplicated`]
    /// otherwise.
    async fn enqueue_acked(
        &self,
        acked: &Client,
        p: u32,
        args: Vec<String>,
    ) -> Result<Vec<String>, QueueError> {
        let want = self.cfg.min_replicas_ack;
        let timeout = self.cfg.min_replicas_timeout;
        let base = self.keys(p).base().to_string();
        let args = args.into_iter().map(Value::from).collect();
        let (reply, mut confirmed) = self
            .scripts
            .call_then_wait(acked, ScriptName::Enqueue, &base, args, want, timeout)
            .await
            .map_err(QueueError::from_script)?;
        let flat = strings(reply)?;
        // An idempotency key that found an earlier job wrote nothing, so the
        // WAIT above only covered this connection's own earlier writes; the
        // earlier job may have come through another connection. A no-op
        // write (the partition count plus 0) moves this connection's offset
        // past it, and a second WAIT covers it.
        if confirmed >= i64::from(want) && flat.iter().skip(1).step_by(2).any(|c| c != "1") {
            confirmed =
                scripts::touch_then_wait(acked, &self.keys(p).key(&["meta"]), want, timeout)
                    .await
                    .map_err(QueueError::from_script)?;
        }
        if confirmed < i64::from(want) {
            let ids: Vec<&str> = flat.iter().step_by(2).map(String::as_str).collect();
            let named = match ids.len() {
                1 => format!("job {}", ids[0]),
                n if n <= 5 => format!("jobs {}", ids.join(", ")),
                n => format!("jobs {} and {} more", ids[..5].join(", "), n - 5),
            };
            return Err(QueueError::NotReplicated(format!(
                "enqueued on the Redis primary, but {confirmed} of the {want} replicas required \
                 (--min-replicas-ack) confirmed {named} within {} ms; a failover now could lose \
                 it: retry with the same idempotency key (safe: it answers with the same job), or \
                 check the replicas (INFO replication)",
                timeout.as_millis()
            )));
        }
        Ok(flat)
    }

    /// Enqueue one job.
    pub async fn enqueue(&self, spec: &JobSpec) -> Result<Enqueued, QueueError> {
        let mut v = self.enqueue_batch(std::slice::from_ref(spec)).await?;
        v.pop()
            .ok_or_else(|| QueueError::Protocol("empty enqueue reply".into()))
    }

    /// Enqueue many jobs: one script call per partition touched. Within a
    /// partition the batch is all-or-nothing.
    pub async fn enqueue_batch(&self, specs: &[JobSpec]) -> Result<Vec<Enqueued>, QueueError> {
        for (i, s) in specs.iter().enumerate() {
            s.validate(self.cfg.max_payload).map_err(|e| match e {
                QueueError::TooLarge(m) if specs.len() > 1 => {
                    QueueError::TooLarge(format!("job {}: {m}", i + 1))
                }
                QueueError::Invalid(m) if specs.len() > 1 => {
                    QueueError::Invalid(format!("job {}: {m}", i + 1))
                }
                other => other,
            })?;
        }
        let mut by_part: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, s) in specs.iter().enumerate() {
            by_part
                .entry(self.partition_of(&s.tenant))
                .or_default()
                .push(i);
        }
        let mut out: Vec<Option<Enqueued>> = vec![None; specs.len()];
        for (p, idx) in by_part {
            let mut args = Vec::with_capacity(1 + idx.len() * 10);
            args.push("1".to_string());
            for &i in &idx {
                args.extend(specs[i].wire_fields());
            }
            let flat = match &self.acked {
                None => strings(self.call(ScriptName::Enqueue, p, args).await?)?,
                Some(acked) => self.enqueue_acked(acked, p, args).await?,
            };
            if flat.len() != idx.len() * 2 {
                return Err(QueueError::Protocol(format!(
                    "enqueue returned {} values",
                    flat.len()
                )));
            }
            for (n, &i) in idx.iter().enumerate() {
                let created = flat[2 * n + 1] == "1";
                out[i] = Some(Enqueued {
                    id: flat[2 * n].clone(),
                    created,
                });
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Claim up to `batch` jobs of partition `p` from `queues` for
    /// `call`'s worker, each with a lease of `lease`. Also says how long
    /// until the next delayed job or rate/quota-held tenant becomes due,
    /// measured by Redis's clock (so a worker's skewed clock cannot turn it
    /// into a busy loop), and the admissible weight left (`batch` 0 only
    /// asks for these). Repeated with the same `call` (after an error), it
    /// hands out the jobs the first call did, if that one ran.
    ///
    /// With [`QueueConfig::min_replicas_ack`] above 0, a claim (of at least
    /// one job) is followed by `WAIT` like an enqueue, and its jobs are
    /// returned only once enough replicas confirmed it, so no failover to a
    /// replica that confirmed it can hand them to another worker under the
    /// same attempt number while the caller runs them. Otherwise they are
    /// handed back unstarted and the claim fails with
    /// [`QueueError::NotReplicated`] (see `claim_acked`).
    pub async fn claim(
        &self,
        p: u32,
        call: &Call,
        batch: usize,
        lease: Duration,
        queues: &[String],
    ) -> Result<Claimed, QueueError> {
        let mut args = vec![
            call.worker().to_string(),
            call.id().to_string(),
            batch.to_string(),
            lease.as_millis().to_string(),
        ];
        args.extend(queues.iter().cloned());
        match &self.acked {
            Some(acked) if batch > 0 => self.claim_acked(acked, p, call, args).await,
            _ => claimed_from(p, strings(self.call(ScriptName::Claim, p, args).await?)?),
        }
    }

    /// The claim script on partition `p`, then `WAIT` for
    /// `min_replicas_ack` replicas, pipelined on the `acked` connection
    /// exactly as [`Self::enqueue_acked`] does (each written at most once;
    /// a connection lost in between fails the claim as `Unknown`, and the
    /// worker repeats it with the same call id: the repeat renews the
    /// leases of the jobs it hands out again, a write, so its `WAIT` covers
    /// the first claim too). The claimed jobs once enough replicas
    /// confirmed; otherwise they are handed back and the call fails with
    /// [`QueueError::NotReplicated`].
    async fn claim_acked(
        &self,
        acked: &Client,
        p: u32,
        call: &Call,
        args: Vec<String>,
    ) -> Result<Claimed, QueueError> {
        use std::sync::atomic::Ordering;
        let want = self.cfg.min_replicas_ack;
        let timeout = self.cfg.min_replicas_timeout;
        let short = &self.replicas_short[p as usize];
        // After a claim the replicas did not confirm, check that they
        // answer before claiming again (a no-op write and its WAIT), so a
        // replica outage does not turn every claim into a hand-back (each
        // one an attempt and a `lost` ledger row).
        if short.load(Ordering::Relaxed) {
            let confirmed =
                scripts::touch_then_wait(acked, &self.keys(p).key(&["meta"]), want, timeout)
                    .await
                    .map_err(QueueError::from_script)?;
            if confirmed < i64::from(want) {
                return Err(QueueError::NotReplicated(format!(
                    "claims wait for replicas: {confirmed} of the {want} replicas required \
                     (--min-replicas-ack) answered within {} ms; nothing claimed: check the \
                     replicas (INFO replication)",
                    timeout.as_millis()
                )));
            }
        }
        let base = self.keys(p).base().to_string();
        let args = args.into_iter().map(Value::from).collect();
        let (reply, confirmed) = self
            .scripts
            .call_then_wait(acked, ScriptName::Claim, &base, args, want, timeout)
            .await
            .map_err(QueueError::from_script)?;
        let claimed = claimed_from(p, strings(reply)?)?;
        short.store(confirmed < i64::from(want), Ordering::Relaxed);
        if confirmed >= i64::from(want) || claimed.jobs.is_empty() {
            return Ok(claimed);
        }
        // Not confirmed: the primary may lose this claim in a failover, and
        // the replica promoted then hands the jobs out again under the same
        // attempt numbers, so they must not run here. Hand them back with
        // the release script (what a worker's shutdown uses). That is safe
        // whatever the primary holds: the script releases an attempt only
        // if the job is running under that attempt number *for this
        // worker*, so on the primary that holds this claim the jobs are
        // ready again at once (the attempt does not count against
        // max_attempts; the ledger gets a `lost` record of 0 ms), and on a
        // promoted replica that never got the claim it touches nothing (the
        // job is ready there, or running under another worker's claim).
        // If the release cannot be sent or its reply is lost, the jobs stay
        // claimed by this worker, which never starts them and never
        // extends their leases: the reaper hands them on when the leases
        // lapse (or this worker's repeated claim, same call id, gets them
        // again once replicas confirm it). Either way nothing runs them
        // meanwhile, so the worst case is a delay of one lease.
        let back: Vec<HandBack> = claimed
            .jobs
            .iter()
            .map(|j| HandBack {
                key: j.key(),
                run_ms: 0,
            })
            .collect();
        let ids: Vec<&str> = claimed.jobs.iter().map(|j| j.id.as_str()).collect();
        let named = match ids.len() {
            1 => format!("job {}", ids[0]),
            n if n <= 5 => format!("jobs {}", ids.join(", ")),
            n => format!("jobs {} and {} more", ids[..5].join(", "), n - 5),
        };
        let reason = "claim not confirmed by replicas (--min-replicas-ack): handed back unstarted";
        let handed = match self
            .release(p, &Call::new(call.worker()), reason, &back)
            .await
        {
            Ok(r) => format!("handed back unstarted ({} released)", r.released),
            Err(e) => format!(
                "not started; handing them back failed ({e}): the reaper hands them on when \
                 their leases lapse"
            ),
        };
        Err(QueueError::NotReplicated(format!(
            "claimed on the Redis primary, but {confirmed} of the {want} replicas required \
             (--min-replicas-ack) confirmed {named} within {} ms, so a failover could hand \
             them out again: {handed}; check the replicas (INFO replication)",
            timeout.as_millis()
        )))
    }

    /// Complete attempts of partition `p` (fenced by attempt number).
    /// Repeated with the same `call` (after an error), it answers as the
    /// first call did, if that one ran.
    pub async fn complete(
        &self,
        p: u32,
        call: &Call,
        done: &[Completion],
    ) -> Result<Completed, QueueError> {
        let mut args = Vec::with_capacity(2 + done.len() * 15);
        args.push(call.worker().to_string());
        args.push(call.id().to_string());
        for c in done {
            args.extend(c.wire_fields());
        }
        let flat = strings(self.call(ScriptName::Complete, p, args).await?)?;
        let Some((events, statuses)) = flat.split_first() else {
            return Err(QueueError::Protocol("empty complete reply".into()));
        };
        let statuses = statuses
            .iter()
            .map(|s| {
                CompleteStatus::parse(s)
                    .ok_or_else(|| QueueError::Protocol(format!("complete said {s:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Completed {
            statuses,
            events: QueueEvent::parse_all(events),
        })
    }

    /// Extend the leases of `held` (attempts on partition `p`); returns the
    /// attempts to kill: those whose lease is lost (reaped, or the job moved
    /// on), and those whose job was cancelled while they run (their leases
    /// are extended: they hold their slot until their completion closes
    /// them as `cancelled`).
    pub async fn extend(
        &self,
        p: u32,
        lease: Duration,
        held: &[AttemptKey],
    ) -> Result<Extended, QueueError> {
        let mut args = vec![lease.as_millis().to_string()];
        for key in held {
            args.push(key.id.clone());
            args.push(key.attempt.to_string());
        }
        let flat = strings(self.call(ScriptName::Extend, p, args).await?)?;
        let mut out = Extended::default();
        for c in flat.chunks_exact(3) {
            let attempt = c[1]
                .parse()
                .map_err(|_| QueueError::Protocol(format!("extend said attempt {:?}", c[1])))?;
            let key = AttemptKey::new(c[0].clone(), attempt);
            match c[2].as_str() {
                "lost" => out.lost.push(key),
                "cancel" => out.cancelled.push(key),
                why => return Err(QueueError::Protocol(format!("extend said {why:?}"))),
            }
        }
        Ok(out)
    }

    /// Run the reaper on partition `p` unless another worker ran it within
    /// `guard`. Returns how many expired attempts were reaped (None: skipped).
    pub async fn reap(&self, p: u32, guard: Duration, max: usize) -> Result<Reaped, QueueError> {
        let args = vec![guard.as_millis().max(1).to_string(), max.to_string()];
        let (n, events) = count_and_events(self.call(ScriptName::Reap, p, args).await?)?;
        Ok(Reaped {
            ran: n >= 0,
            reaped: n.max(0) as u64,
            events: QueueEvent::parse_all(&events),
        })
    }

    /// Hand running attempts (on partition `p`) back to ready at once.
    /// Repeated with the same `call`, it answers as the first call did.
    pub async fn release(
        &self,
        p: u32,
        call: &Call,
        reason: &str,
        held: &[HandBack],
    ) -> Result<Released, QueueError> {
        let mut args = vec![
            call.worker().to_string(),
            call.id().to_string(),
            reason.to_string(),
        ];
        for h in held {
            args.extend([
                h.key.id.clone(),
                h.key.attempt.to_string(),
                h.run_ms.to_string(),
            ]);
        }
        let (n, events) = count_and_events(self.call(ScriptName::Release, p, args).await?)?;
        Ok(Released {
            released: n.max(0) as u64,
            events: QueueEvent::parse_all(&events),
        })
    }

    /// Pause (`on`) or resume a queue, or one tenant on it. Returns whether
    /// anything changed. A queue pause applies to every partition.
    pub async fn set_paused(
        &self,
        queue: &str,
        tenant: Option<&str>,
        on: bool,
    ) -> Result<bool, QueueError> {
        job::validate_name("queue", queue)?;
        let flag = if on { "1" } else { "0" }.to_string();
        if let Some(t) = tenant {
            job::validate_name("tenant", t)?;
            let v = self
                .call(
                    ScriptName::Pause,
                    self.partition_of(t),
                    vec![queue.into(), t.into(), flag],
                )
                .await?;
            return Ok(matches!(v, Value::Integer(1)));
        }
        let mut changed = false;
        for p in 0..self.partitions() {
            let v = self
                .call(
                    ScriptName::Pause,
                    p,
                    vec![queue.into(), String::new(), flag.clone()],
                )
                .await?;
            changed |= matches!(v, Value::Integer(1));
        }
        Ok(changed)
    }

    /// How long succeeded jobs of `queue` keep their hash once finished
    /// (`None`: the partition's `retention_ms`, 24 h unless set; zero:
    /// removed at once, like BullMQ's removeOnComplete). Their ledger
    /// records are written either way, and dead jobs always stay until
    /// purged. Applies to every partition from the next completion on.
    pub async fn set_keep_completed(
        &self,
        queue: &str,
        keep: Option<Duration>,
    ) -> Result<(), QueueError> {
        job::validate_name("queue", queue)?;
        if keep.is_some_and(|d| d > MAX_KEEP_COMPLETED) {
            let d = crate::model::units::format_duration(keep.unwrap_or_default());
            return Err(QueueError::Invalid(format!(
                "keep_completed {d} is longer than 365d"
            )));
        }
        for p in 0..self.partitions() {
            let key = self.keys(p).key(&["qkeep"]);
            match keep {
                Some(d) => {
                    let ms = d.as_millis() as u64; // at most 365 d
                    let _: i64 = self.client.hset(&key, (queue, ms)).await?;
                }
                None => {
                    let _: i64 = self.client.hdel(&key, queue).await?;
                }
            }
        }
        Ok(())
    }

    /// Retry (`retry` true) or purge the one dead job `id` (the operator
    /// API and the dashboard act on one job). Returns the job as it was
    /// when it was changed; None if it is not dead (or stopped being so
    /// meanwhile: the dead-letter script checks again atomically).
    pub async fn change_dead_job(
        &self,
        id: &str,
        retry: bool,
    ) -> Result<Option<inspect::JobInfo>, QueueError> {
        let info = inspect::job_info(self, id).await?;
        if info.state != "dead" {
            return Ok(None);
        }
        let jobs = [id.to_string()];
        let done = self
            .dead_jobs(retry, &info.queue, None, Duration::ZERO, &jobs)
            .await?;
        Ok((done.values().sum::<u64>() > 0).then_some(info))
    }

    /// Retry (`retry` true) or purge dead jobs of `queue`: the given `jobs`,
    /// or all of `tenant`'s (every tenant's if None) dead for at least
    /// `older_than`. Returns how many per tenant.
    pub async fn dead_jobs(
        &self,
        retry: bool,
        queue: &str,
        tenant: Option<&str>,
        older_than: Duration,
        jobs: &[String],
    ) -> Result<BTreeMap<String, u64>, QueueError> {
        job::validate_name("queue", queue)?;
        let mut by_part: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for id in jobs {
            by_part
                .entry(self.partition_of_job(id)?)
                .or_default()
                .push(id.clone());
        }
        let parts: Vec<u32> = match (jobs.is_empty(), tenant) {
            (false, _) => by_part.keys().copied().collect(),
            (true, Some(t)) => vec![self.partition_of(t)],
            (true, None) => (0..self.partitions()).collect(),
        };
        const BATCH: usize = 1000;
        let mut counts = BTreeMap::new();
        for p in parts {
            loop {
                let mut args = vec![
                    if retry { "retry" } else { "purge" }.to_string(),
                    queue.to_string(),
                    tenant.unwrap_or("").to_string(),
                    older_than.as_millis().to_string(),
                    BATCH.to_string(),
                ];
                args.extend(by_part.get(&p).cloned().unwrap_or_default());
                let done = strings(self.call(ScriptName::Dead, p, args).await?)?;
                for t in &done {
                    *counts.entry(t.clone()).or_default() += 1;
                }
                if done.len() < BATCH || !jobs.is_empty() {
                    break;
                }
            }
        }
        Ok(counts)
    }

    /// Delete every ready and delayed job of `queue` (running jobs are left
    /// alone). Returns how many per tenant.
    pub async fn purge_waiting(&self, queue: &str) -> Result<BTreeMap<String, u64>, QueueError> {
        job::validate_name("queue", queue)?;
        const BATCH: usize = 1000;
        let mut counts = BTreeMap::new();
        for p in 0..self.partitions() {
            loop {
                let done = strings(
                    self.call(
                        ScriptName::Purge,
                        p,
                        vec![queue.to_string(), BATCH.to_string()],
                    )
                    .await?,
                )?;
                for t in &done {
                    *counts.entry(t.clone()).or_default() += 1;
                }
                if done.len() < BATCH {
                    break;
                }
            }
        }
        Ok(counts)
    }

    /// Cancel a job that has not finished. Returns its state before
    /// (`ready` or `delayed`: cancelled now; `running`: being cancelled;
    /// anything else, `cancelled` included: left as it was). A running
    /// job's attempt is marked and the worker holding it told to kill it
    /// (`cancel.lua`); it keeps its tenant slot until its completion (or
    /// the reaper, or a shutdown hand-back) closes it as `cancelled` (one
    /// ledger record with the worker's measured time, no retry), unless it
    /// had succeeded already. Repeating the call is harmless: a job being
    /// cancelled answers `running` again (and its worker is told again).
    pub async fn cancel(&self, id: &str) -> Result<String, QueueError> {
        let p = self.partition_of_job(id)?;
        match self
            .call(ScriptName::Cancel, p, vec![id.to_string()])
            .await?
        {
            Value::String(s) if s.is_empty() => Err(QueueError::NotFound(id.to_string())),
            Value::String(s) => Ok(s.to_string()),
            Value::Bytes(b) if b.is_empty() => Err(QueueError::NotFound(id.to_string())),
            Value::Bytes(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            other => Err(QueueError::Protocol(format!("cancel said {other:?}"))),
        }
    }

    /// Raise `tenant`'s usage counter for `month` (`YYYY-MM`, UTC) to at
    /// least `ms`, atomically with completions (never lowering it). Returns
    /// the counter before and after.
    pub async fn raise_usage(
        &self,
        tenant: &str,
        month: &str,
        ms: u64,
    ) -> Result<UsageRaised, QueueError> {
        job::validate_name("tenant", tenant)?;
        let reply = self
            .call(
                ScriptName::UsageRaise,
                self.partition_of(tenant),
                vec![tenant.to_string(), month.to_string(), ms.to_string()],
            )
            .await?;
        match strings(reply)?.as_slice() {
            [before, after] => Ok(UsageRaised {
                before_ms: before.parse().unwrap_or(0),
                after_ms: after.parse().unwrap_or(0),
            }),
            other => Err(QueueError::Protocol(format!("usage_raise said {other:?}"))),
        }
    }

    /// Delete every key of this namespace (all partitions). For tests and the
    /// demo's own namespace; never call it on a namespace in use.
    pub async fn delete_namespace(&self) -> Result<u64, QueueError> {
        use futures::TryStreamExt;
        let pattern = format!("{{{}:*", self.cfg.namespace);
        // In a cluster SCAN sees one node's keys: scan every primary.
        let keys: Vec<fred::types::Key> = if self.client.is_clustered() {
            self.client
                .scan_cluster_buffered(pattern, Some(500), None)
                .try_collect()
                .await?
        } else {
            self.client
                .scan_buffered(pattern, Some(500), None)
                .try_collect()
                .await?
        };
        // One DEL per partition and chunk: a multi-key DEL must stay in one slot.
        let mut by_tag: BTreeMap<String, Vec<fred::types::Key>> = BTreeMap::new();
        for k in keys {
            let text = k.as_str().unwrap_or_default();
            let tag = text.split_once('}').map_or(text, |(t, _)| t).to_string();
            by_tag.entry(tag).or_default().push(k);
        }
        let mut n = 0;
        for group in by_tag.values() {
            for chunk in group.chunks(500) {
                let d: u64 = self.client.del(chunk.to_vec()).await?;
                n += d;
            }
        }
        Ok(n)
    }

    /// Write limit fields of a tenant, a tier or the defaults (tiers and
    /// defaults on every partition). A value of `None` resets that field.
    pub async fn set_limit_fields(
        &self,
        target: crate::model::limits::Target<'_>,
        fields: &[(&str, Option<String>)],
    ) -> Result<(), QueueError> {
        use crate::model::limits::Target;
        let who = match target {
            Target::Tenant(t) => {
                job::validate_name("tenant", t)?;
                t.to_string()
            }
            Target::Tier(name) => {
                job::validate_name("tier", name)?;
                format!("tier:{name}")
            }
            Target::Defaults => String::new(),
        };
        let mut args = vec![who];
        for (f, v) in fields {
            args.push(f.to_string());
            args.push(v.clone().unwrap_or_default());
        }
        let parts: Vec<u32> = match target {
            Target::Tenant(t) => vec![self.partition_of(t)],
            _ => (0..self.partitions()).collect(),
        };
        for p in parts {
            self.call(ScriptName::TenantSet, p, args.clone()).await?;
        }
        Ok(())
    }
}

/// What a lease extension ([`Queue::extend`]) says to kill.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extended {
    /// Attempts whose lease is gone (reaped, or the job moved on).
    pub lost: Vec<AttemptKey>,
    /// Attempts whose job was cancelled while they run (`cancel.lua`):
    /// still leased, to be killed and completed.
    pub cancelled: Vec<AttemptKey>,
}

/// A usage counter before and after [`Queue::raise_usage`], agent ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageRaised {
    /// Before.
    pub before_ms: u64,
    /// After (never lower than before).
    pub after_ms: u64,
}

/// A clear error for a `redis-cluster://` URL that points at a server
/// without cluster support; other connection errors pass through.
fn topology_error(url: &str, e: fred::error::Error) -> QueueError {
    if *e.kind() == fred::error::ErrorKind::Sentinel && is_sentinel_url(url) {
        return QueueError::Redis(fred::error::Error::new(
            fred::error::ErrorKind::Sentinel,
            format!("no primary found through the Sentinels ({})", e.details()),
        ));
    }
    if e.details().contains("cluster support disabled") {
        return QueueError::Invalid(format!(
            "Redis at {} is not a cluster: use redis://host:port for a single server",
            crate::model::redact::redact_url(url)
        ));
    }
    QueueError::Redis(e)
}

/// Refuse a plain `redis://` URL that points at a Redis Cluster node: keys
/// of slots that node does not own would be refused with MOVED.
async fn check_not_cluster_node(client: &Client, url: &str) -> Result<(), QueueError> {
    if client.is_clustered() {
        return Ok(());
    }
    // Servers (or proxies) that refuse INFO are taken as plain servers.
    let info: String = match client.info(Some(fred::types::InfoKind::Cluster)).await {
        Ok(info) => info,
        Err(_) => return Ok(()),
    };
    if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
        return Err(QueueError::Invalid(format!(
            "Redis at {} is a Redis Cluster node: use redis-cluster://host:port \
             (add ?node=host:port for more seed nodes)",
            crate::model::redact::redact_url(url)
        )));
    }
    Ok(())
}

/// A claim script's reply on partition `p`, parsed.
fn claimed_from(p: u32, flat: Vec<String>) -> Result<Claimed, QueueError> {
    let [first, events, weight, rest @ ..] = flat.as_slice() else {
        return Err(QueueError::Protocol("short claim reply".into()));
    };
    let events = QueueEvent::parse_all(events);
    let weight = weight.parse::<f64>().unwrap_or(0.0).max(0.0);
    let due_in = match first.parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(ms) => Some(Duration::from_millis(ms)),
    };
    if rest.len() % 12 != 0 {
        return Err(QueueError::Protocol(format!(
            "claim returned {} values",
            flat.len()
        )));
    }
    let num = |s: &String| s.parse::<i64>().unwrap_or(0);
    let jobs = rest
        .chunks_exact(12)
        .map(|c| ClaimedJob {
            id: c[0].clone(),
            attempt: num(&c[1]) as u32,
            partition: p,
            tenant: c[2].clone(),
            queue: c[3].clone(),
            kind: c[4].clone(),
            payload: c[5].clone(),
            timeout_ms: num(&c[6]).max(0) as u64,
            memory: num(&c[7]).max(0) as u64,
            enqueued_at_ms: num(&c[8]),
            started_at_ms: num(&c[9]),
            max_timeout_ms: num(&c[10]).max(0) as u64,
            max_memory: num(&c[11]).max(0) as u64,
        })
        .collect();
    Ok(Claimed {
        jobs,
        due_in,
        weight,
        events,
    })
}

/// A `{ count, events }` reply.
fn count_and_events(v: Value) -> Result<(i64, String), QueueError> {
    match strings(v)?.as_slice() {
        [n, events] => Ok((n.parse().unwrap_or(0), events.clone())),
        other => Err(QueueError::Protocol(format!(
            "expected {{count, events}}, got {other:?}"
        ))),
    }
}

/// Flatten a script reply (array of strings/integers) into strings.
fn strings(v: Value) -> Result<Vec<String>, QueueError> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.to_string()),
                Value::Bytes(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
                Value::Integer(n) => Ok(n.to_string()),
                Value::Double(d) => Ok(d.to_string()),
                Value::Null => Ok(String::new()),
                other => Err(QueueError::Protocol(format!("unexpected item {other:?}"))),
            })
            .collect(),
        Value::Null => Ok(Vec::new()),
        other => Err(QueueError::Protocol(format!(
            "expected an array, got {other:?}"
        ))),
    }
}
