//! Redis key layout.
//!
//! Every key of a partition starts with the partition base `{<ns>:<p>}`; the
//! braces make the whole base the Redis Cluster hash tag, so each script
//! touches exactly one slot. With `B` the base:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `B:seq` | string | job sequence counter |
//! | `B:job:<id>` | hash | one job: spec, state, attempts, timestamps, last error, result, latest `progress`, `cancel` (the attempt a cancel marked) |
//! | `B:idem:<tenant>:<key>` | string (TTL) | job id for an idempotency key |
//! | `B:queues`, `B:tenants` | set | names seen |
//! | `B:q:<q>:t:<t>` | zset | tenant `t`'s ready jobs in queue `q`, by priority then age |
//! | `B:q:<q>:sched` | zset | admissible tenants with ready work in `q`, by pass (virtual time) |
//! | `B:q:<q>:delayed` | zset | delayed jobs (retries and `--delay`), by run-at ms |
//! | `B:q:<q>:dead` | zset | dead jobs, by time of death |
//! | `B:q:<q>:stats` | hash | counters `ready`, `delayed`, `running`, `dead`, `delayed:<tenant>`, `dead:<tenant>` |
//! | `B:tq` | hash | tenant → the queues where it has ready jobs, space-separated |
//! | `B:tenant:<t>` | hash | tenant limits (`max_concurrency`, `max_timeout_ms`, `max_memory`, `weight`, `tier`) |
//! | `B:defaults` | hash | limits for tenants that set none, and partition settings |
//! | `B:running` | hash | tenant -> running jobs (the fleet-wide concurrency count) |
//! | `B:qvt` | hash | queue → its virtual time (the pass of the latest pick by a pool serving it) |
//! | `B:qkeep` | hash | queue → how long its succeeded jobs keep their hash, in ms (absent: `retention_ms`; 0: removed on success) |
//! | `B:q:<q>:pass` | hash | tenant → what it owes on q (its pass when it left q's sched set ahead of q's virtual time) |
//! | `B:qw` | hash | queue → total weight of the tenants in its sched set |
//! | `B:q:<q>:dt:<t>` | zset | tenant t's dead jobs in q, by time of death |
//! | `B:calls:<worker>` | hash (TTL) | a worker's last claim/complete/release call id and reply |
//! | `B:meta` | hash | `partitions`: the namespace's partition count |
//! | `B:paused` | set | `q:<q>` (queue paused) and `qt:<q>:<t>` (tenant paused on a queue) |
//! | `B:leases` | zset | running job id -> lease deadline (Redis time, ms) |
//! | `B:outbox` | stream | ledger records waiting for PostgreSQL (consumer group `ledger`) |
//! | `B:tier:<name>`, `B:tiers` | hash, set | published tiers |
//! | `B:usage:<t>` | hash | month (`YYYY-MM`) -> agent ms (the quota counter); `YYYY-MM:tok` -> tokens (token price steps); `YYYY-MM:cost` -> micro-dollars (spend caps) |
//! | `B:gcra` | hash | tenant -> theoretical arrival time of its next start |
//! | `B:throttled`, `B:held` | zset, hash | tenants held by rate or quota: when they may start, and why |
//! | `B:starts:<t>:<minute>` | string (TTL) | starts per minute (expected-rate alert) |
//! | `B:sampler` | string (PX) | the worker currently sampling gauges |
//! | `B:reaper` | string (PX) | guard: one reaper run per interval across the fleet |
//! | `B:wake` | pub/sub channel | "a tenant became claimable" for idle workers |
//! | `B:schedule:<t>:<name>` | hash | one recurring schedule: `cron` + `tz` or `every_ms`, the job, `missed`, what it last fired |
//! | `B:schedules` | zset | `<t>:<name>` -> next-due slot (ms) of each schedule of the partition |
//! | `B:schedules:<t>` | set | tenant t's schedule names |
//! | `B:schedtick` | string (PX) | (partition 0) guard: one schedules pass per tick across the fleet |
//! | `B:webhook:<t>` | hash | tenant t's alert webhook: `url`, `secret`, `events` |
//! | `B:alerts`, `B:alerts:tries`, `B:alerts:dead` | stream, hash, stream | tenant alerts waiting for delivery (group `webhooks`), failed attempts per entry, alerts given up on |
//! | `B:events:<t>` | stream (PX) | tenant t's job events, bounded by `events_max` and `events_ttl_ms` (`job_events`) |
//! | `B:qfeed` | hash | queue → `0` when its jobs publish no events |
//! | `B:api:revoked` | stream (partition 0 only) | revoked API key prefixes, read by every `agentq serve` (`http::api::key_cache`) |

/// The base key (hash tag included) of partition `p` in namespace `ns`.
pub fn base(ns: &str, p: u32) -> String {
    format!("{{{ns}:{p}}}")
}

/// The partition a tenant's jobs and limits live in: FNV-1a (32-bit) of the
/// tenant name modulo the partition count. Part of the wire format: clients
/// that enqueue through the script directly must compute the same.
pub fn partition_of(tenant: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in tenant.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions
}

/// The partition encoded in a job id (`<partition>-<hex>`), if well formed.
pub fn partition_of_job(id: &str) -> Option<u32> {
    let (p, rest) = id.split_once('-')?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    p.parse().ok()
}

/// Key builder for one partition, for the few reads done outside scripts.
#[derive(Clone, Debug)]
pub struct Keys {
    base: String,
}

impl Keys {
    /// Keys of partition `p` in namespace `ns`.
    pub fn new(ns: &str, p: u32) -> Self {
        Keys { base: base(ns, p) }
    }
    /// The partition base (`KEYS[1]` of every script).
    pub fn base(&self) -> &str {
        &self.base
    }
    /// `B:<parts joined by ':'>`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut s = self.base.clone();
        for p in parts {
            s.push(':');
            s.push_str(p);
        }
        s
    }
    /// The hash of one job.
    pub fn job(&self, id: &str) -> String {
        self.key(&["job", id])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_name_their_partition() {
        assert_eq!(partition_of_job("3-18f3a2b4c5d00002a"), Some(3));
        assert_eq!(partition_of_job("x-12"), None);
        assert_eq!(partition_of_job("0-"), None);
        assert_eq!(partition_of_job("0-zz"), None);
    }

    #[test]
    fn tenants_spread_over_partitions_stably() {
        assert_eq!(partition_of("acme", 1), 0);
        // FNV-1a 32 of "a" is 0xe40c292c
        assert_eq!(partition_of("a", 1 << 31), 0xe40c292c % (1 << 31));
        let used: std::collections::HashSet<u32> = (0..100)
            .map(|i| partition_of(&format!("t{i}"), 4))
            .collect();
        assert_eq!(used.len(), 4);
    }
}
