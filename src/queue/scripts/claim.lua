-- claim.lua: admit and lease up to `batch` jobs from the given queues, fairly.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  worker id (recorded on the job, used in logs and the ledger)
-- ARGV[2]  batch size (free local slots)
-- ARGV[3]  lease duration in ms
-- ARGV[4..] queue names to claim from
-- Returns  { next_due_ms, events, job1..., job2..., ... } where next_due_ms
--          is the earliest time a delayed job or a throttled tenant becomes
--          due (0 if none), events is a space-separated list such as
--          "rate_2x:acme" (may be empty), and each job is 12 values: id, attempt (the fencing token), tenant, queue,
--          kind, payload, timeout_ms, memory, enqueued_at, started_at,
--          max_timeout_ms, max_memory.
--
-- Fairness: each queue's sched set holds the admissible tenants with ready
-- work, scored by pass (virtual time). The tenant with the lowest pass across
-- the requested queues is served next and its pass advances by 1e6 / weight
-- (stride scheduling), so backlogged tenants start jobs in proportion to
-- their weights and a light tenant is served within one pick of arriving.
-- Invariant: a tenant at its concurrency cap, over its monthly quota or
-- beyond its start rate (GCRA) is in no sched set, so it can never be
-- admitted past those limits, whichever worker runs this script.

local worker, batch, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local queues = {}
for i = 4, #ARGV do
  if redis.call('SISMEMBER', k('paused'), 'q:' .. ARGV[i]) == 0 then
    queues[#queues + 1] = ARGV[i]
  end
end

-- Promote due delayed jobs (bounded per call) and find the next due time.
local next_due = 0
local woken = {}
for _, q in ipairs(queues) do
  local dk = k('q', q, 'delayed')
  local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, 200)
  for _, id in ipairs(due) do
    redis.call('ZREM', dk, id)
    local v = redis.call('HMGET', k('job', id), 'tenant', 'score')
    if v[1] then
      stat(q, v[1], 'delayed', -1)
      redis.call('HSET', k('job', id), 'ready_at', now)
      redis.call('HDEL', k('job', id), 'run_at')
      make_ready(id, q, v[1], tonumber(v[2]))
      woken[v[1]] = true
    end
  end
  local first = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
  if first[2] then
    local due_at = tonumber(first[2])
    if next_due == 0 or due_at < next_due then next_due = due_at end
  end
end
-- Tenants held by rate or quota whose time has come are admissible again.
for _, t in ipairs(redis.call('ZRANGEBYSCORE', k('throttled'), '-inf', now, 'LIMIT', 0, 200)) do
  redis.call('ZREM', k('throttled'), t)
  woken[t] = true
end
for t in pairs(woken) do sync_tenant(t) end

-- Count a start against the tenant's rate (GCRA) and its expected rate.
local function count_start(t, l)
  if l.rate > 0 then
    local T = gcra(l)
    local tat = tonumber(redis.call('HGET', k('gcra'), t)) or 0
    redis.call('HSET', k('gcra'), t, math.max(tat, now) + T)
  end
  if l.expected_rate_per_min > 0 then
    local key = k('starts', t, tostring(math.floor(now / 60000)))
    local n = redis.call('INCR', key)
    if n == 1 then redis.call('PEXPIRE', key, 120000) end
    if n == 2 * l.expected_rate_per_min + 1 then event('rate_2x:' .. t) end
  end
end

local out = { next_due, '' }
local claimed = 0
local guard = batch * 4 + 16
while claimed < batch and guard > 0 do
  guard = guard - 1
  local best_q, best_t, best_pass = nil, nil, nil
  for _, q in ipairs(queues) do
    local head = redis.call('ZRANGE', k('q', q, 'sched'), 0, 0, 'WITHSCORES')
    if head[1] then
      local p = tonumber(head[2])
      if best_pass == nil or p < best_pass then
        best_q, best_t, best_pass = q, head[1], p
      end
    end
  end
  if best_q == nil then break end
  local q, t = best_q, best_t
  local popped = redis.call('ZPOPMIN', k('q', q, 't', t))
  if popped[1] then
    local id = popped[1]
    local jk = k('job', id)
    local attempt = redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HSET', jk, 'state', 'running', 'started_at', now, 'worker', worker, 'hb', now)
    redis.call('ZADD', k('leases'), now + lease_ms, id)
    redis.call('HINCRBY', k('running'), t, 1)
    stat(q, t, 'ready', -1)
    stat(q, t, 'running', 1)
    local v = redis.call('HMGET', jk, 'kind', 'payload', 'timeout_ms', 'memory', 'enqueued_at')
    local l = limits(t)
    out[#out + 1] = id
    out[#out + 1] = attempt
    out[#out + 1] = t
    out[#out + 1] = q
    out[#out + 1] = v[1]
    out[#out + 1] = v[2]
    out[#out + 1] = tonumber(v[3]) or 0
    out[#out + 1] = tonumber(v[4]) or 0
    out[#out + 1] = tonumber(v[5]) or now
    out[#out + 1] = now
    out[#out + 1] = l.max_timeout_ms
    out[#out + 1] = l.max_memory
    claimed = claimed + 1
    -- advance the tenant's virtual time; vt never moves backwards
    local vt = tonumber(redis.call('GET', k('vt'))) or 0
    if best_pass > vt then redis.call('SET', k('vt'), best_pass) end
    redis.call('HSET', k('pass'), t, best_pass + math.floor(1000000 / math.max(l.weight, 0.001)))
    count_start(t, l)
  end
  if redis.call('EXISTS', k('q', q, 't', t)) == 0 then
    redis.call('SREM', k('tq', t), q)
    redis.call('ZREM', k('q', q, 'sched'), t)
  end
  sync_tenant(t)
end
-- Tenants throttled before or during this claim become due at their score.
local first_throttled = redis.call('ZRANGE', k('throttled'), 0, 0, 'WITHSCORES')
if first_throttled[2] then
  local at = tonumber(first_throttled[2])
  if next_due == 0 or at < next_due then next_due = at end
end
finish()
out[1] = next_due
out[2] = table.concat(events, ' ')
return out
