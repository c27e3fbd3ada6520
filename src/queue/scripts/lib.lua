-- lib.lua: shared helpers prepended to every agentq script at load time.
--
-- Every script receives KEYS[1] = the partition base, e.g. "{agentq:0}". All
-- other keys are derived from it, so every key a script touches carries the
-- same hash tag and lives in one Redis Cluster slot (no CROSSSLOT by
-- construction). The key layout is documented in README.md ("Redis key
-- layout") and in src/queue/keys.rs; keep the three in step.
--
-- Invariants kept by the helpers below (and therefore by every script):
--  * B:running[t] equals the number of jobs of tenant t in state "running"
--    (every transition in or out of "running" goes through claim_one,
--    finish_attempt or the reaper, each of which adjusts it exactly once).
--  * tenant t is a member of B:q:<q>:sched iff it has ready jobs in q, is not
--    paused on q, and is admissible (running < cap, usage this month below
--    its quota, within its start rate); its score is its pass.
--  * a tenant held by quota or rate is in B:throttled, scored by the time it
--    may start again, with the reason in B:held; claim re-admits it then.
--  * the counters in B:q:<q>:stats equal the cardinalities they describe.

local B = KEYS[1]
local function k(...) return B .. ':' .. table.concat({...}, ':') end

-- Built-in defaults, used when neither the tenant nor B:defaults sets a field.
local BUILTIN = {
  max_concurrency = 10,
  max_timeout_ms = 3600000,       -- 1h
  max_memory = 4294967296,        -- 4GiB
  weight = 1,
  max_payload = 1048576,          -- 1MiB
  idem_ttl_ms = 86400000,         -- 24h
  retention_ms = 86400000,        -- 24h for finished jobs
  default_max_attempts = 3,
  rate = 0,                       -- starts per rate_period_ms; 0 = unlimited
  rate_period_ms = 1000,
  burst = 0,                      -- extra starts allowed at once; 0 = rate
  quota_ms = 0,                   -- agent-ms per calendar month (UTC); 0 = none
  price_minute_micros = 10000,    -- $0.01 per agent-minute
  price_ktok_micros = 0,          -- per 1,000 tokens reported
  expected_rate_per_min = 0,      -- alert at twice this start rate; 0 = off
}

-- Human units for error messages: 3600000 -> "1h", 268435456 -> "256MiB".
local function fmt_ms(ms)
  for _, u in ipairs({ { 86400000, 'd' }, { 3600000, 'h' }, { 60000, 'm' }, { 1000, 's' } }) do
    if ms >= u[1] and ms % u[1] == 0 then return (ms / u[1]) .. u[2] end
  end
  return ms .. 'ms'
end
local function fmt_bytes(b)
  for _, u in ipairs({ { 1099511627776, 'TiB' }, { 1073741824, 'GiB' }, { 1048576, 'MiB' }, { 1024, 'KiB' } }) do
    if b >= u[1] and b % u[1] == 0 then return (b / u[1]) .. u[2] end
  end
  return b .. 'B'
end

-- Redis server time in ms, read once per script call: every deadline and
-- timestamp that decides ownership comes from here, never a worker's clock.
local now_cached = nil
local function now_ms()
  if not now_cached then
    local t = redis.call('TIME')
    now_cached = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now_cached
end

-- Calendar month (UTC) of a ms timestamp: "YYYY-MM", and the ms at which the
-- next month starts (civil-from-days, Howard Hinnant's algorithm).
local function days_to_civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400 + ((m <= 2) and 1 or 0)
  return y, m
end
local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function month_of(ms)
  local y, m = days_to_civil(math.floor(ms / 86400000))
  return string.format('%04d-%02d', y, m)
end
local function next_month_ms(ms)
  local y, m = days_to_civil(math.floor(ms / 86400000))
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return days_from_civil(y, m) * 86400000
end

local defaults_cache = nil
local function default(field)
  if defaults_cache == nil then
    defaults_cache = {}
    local flat = redis.call('HGETALL', k('defaults'))
    for i = 1, #flat, 2 do defaults_cache[flat[i]] = tonumber(flat[i + 1]) end
  end
  return defaults_cache[field] or BUILTIN[field]
end

-- Limits of a tenant: its own setting, else its tier's (B:tier:<name>), else
-- the partition default, else built-in.
local limits_cache = {}
local LIMIT_FIELDS = { 'max_concurrency', 'max_timeout_ms', 'max_memory', 'weight', 'rate',
  'rate_period_ms', 'burst', 'quota_ms', 'price_minute_micros', 'price_ktok_micros',
  'expected_rate_per_min' }
local function limits(t)
  local l = limits_cache[t]
  if l then return l end
  local own = redis.call('HMGET', k('tenant', t), 'tier', unpack(LIMIT_FIELDS))
  local tier = {}
  if own[1] then tier = redis.call('HMGET', k('tier', own[1]), unpack(LIMIT_FIELDS)) end
  l = { tier = own[1] }
  for i, f in ipairs(LIMIT_FIELDS) do
    l[f] = tonumber(own[i + 1]) or tonumber(tier[i]) or default(f)
  end
  limits_cache[t] = l
  return l
end

-- Events for the worker to log and export (quota thresholds, rate alerts),
-- returned by the scripts that produce them.
local events = {}
local function event(s) events[#events + 1] = s end

-- GCRA: the emission interval and tolerance of a tenant's start rate.
local function gcra(l)
  local T = l.rate_period_ms / l.rate
  local burst = (l.burst > 0) and l.burst or l.rate
  return T, (burst - 1) * T
end

local function running(t)
  return tonumber(redis.call('HGET', k('running'), t)) or 0
end

-- Why tenant t may not start a job now ('cap', 'quota', 'rate'), or nil; for
-- quota and rate also when it may start again (ms).
local function hold_reason(t)
  local l = limits(t)
  if running(t) >= l.max_concurrency then return 'cap', nil end
  local now = now_ms()
  if l.quota_ms > 0 then
    local used = tonumber(redis.call('HGET', k('usage', t), month_of(now))) or 0
    if used >= l.quota_ms then return 'quota', next_month_ms(now) end
  end
  if l.rate > 0 then
    local tat = tonumber(redis.call('HGET', k('gcra'), t)) or 0
    local T, tau = gcra(l)
    if tat - now > tau then return 'rate', math.ceil(tat - tau) end
  end
  return nil, nil
end

-- Tenants whose admission must be re-checked before the script ends (once
-- each, however many of their attempts the script closed).
local pending_sync = {}
local function sync_later(t) pending_sync[t] = true end

-- Queue counters change many times per batch; they are only read outside
-- scripts, so changes are summed here and written once per field by finish().
local pending_stats = {}
local function stat(q, t, state, delta)
  local key = k('q', q, 'stats')
  local fields = pending_stats[key]
  if not fields then
    fields = {}
    pending_stats[key] = fields
  end
  fields[state] = (fields[state] or 0) + delta
  local per = state .. ':' .. t
  fields[per] = (fields[per] or 0) + delta
end


local function paused_on(q, t)
  return redis.call('SISMEMBER', k('paused'), 'qt:' .. q .. ':' .. t) == 1
end

-- Set when a tenant entered a sched set in this call; see finish().
local entered_any = false

-- Recompute tenant t's membership in the sched set of every queue where it has
-- ready work. A tenant (re)entering a sched set starts at max(pass, vt), so
-- idle time earns no credit. Returns true if it entered any set (callers wake
-- idle workers then).
local function sync_tenant(t)
  local qs = redis.call('SMEMBERS', k('tq', t))
  local reason, until_ms = nil, nil
  if #qs > 0 then reason, until_ms = hold_reason(t) end
  if reason == 'quota' or reason == 'rate' then
    redis.call('ZADD', k('throttled'), until_ms, t)
    redis.call('HSET', k('held'), t, reason)
  elseif redis.call('HDEL', k('held'), t) == 1 then
    redis.call('ZREM', k('throttled'), t)
  end
  if #qs == 0 then return false end
  local admissible = reason == nil
  local pass = tonumber(redis.call('HGET', k('pass'), t)) or 0
  local want, entering = {}, false
  for i, q in ipairs(qs) do
    want[i] = admissible and not paused_on(q, t)
    if want[i] and not redis.call('ZSCORE', k('q', q, 'sched'), t) then entering = true end
  end
  if entering then
    entered_any = true
    local vt = tonumber(redis.call('GET', k('vt'))) or 0
    if pass < vt then
      pass = vt
      redis.call('HSET', k('pass'), t, pass)
    end
  end
  for i, q in ipairs(qs) do
    if want[i] then
      redis.call('ZADD', k('q', q, 'sched'), pass, t)
    else
      redis.call('ZREM', k('q', q, 'sched'), t)
    end
  end
  return entering
end

-- Put job id (fields already in its hash) into its tenant's ready set.
local function make_ready(id, q, t, score)
  redis.call('ZADD', k('q', q, 't', t), score, id)
  redis.call('SADD', k('tq', t), q)
  redis.call('HSET', k('job', id), 'state', 'ready')
  stat(q, t, 'ready', 1)
end

-- Append one attempt's usage record to the ledger outbox. `r` holds the fields.
local OUTBOX_FIELDS = {
  'job', 'attempt', 'tenant', 'queue', 'kind', 'outcome', 'enqueued_at',
  'started_at', 'finished_at', 'wait_ms', 'run_ms', 'cpu_ms', 'peak_rss',
  'exit_code', 'signal', 'worker', 'api_calls', 'input_tokens', 'output_tokens',
  'cost_micros', 'error',
}
local function outbox(r)
  local args = { k('outbox'), '*' }
  for _, f in ipairs(OUTBOX_FIELDS) do
    args[#args + 1] = f
    args[#args + 1] = tostring(r[f] or '')
  end
  redis.call('XADD', unpack(args))
end

-- Close a running attempt: free the tenant slot, drop the lease, write the
-- outbox record, then route the job: succeeded, retry (delayed by backoff_ms,
-- or ready at once when backoff_ms is 0), or dead. `a` carries the attempt's
-- outcome and usage. Returns the job's new state.
-- Charge an attempt to its tenant's usage this month (the quota counter) and
-- price it; emits quota threshold events when 80% or 100% is crossed.
local function charge(t, run_ms, tokens, now)
  local l = limits(t)
  local month = month_of(now)
  local used = redis.call('HINCRBY', k('usage', t), month, run_ms)
  if l.quota_ms > 0 then
    for _, pct in ipairs({ 80, 100 }) do
      local line = l.quota_ms * pct / 100
      if used >= line and used - run_ms < line then event('quota_' .. pct .. ':' .. t) end
    end
  end
  return math.floor(run_ms * l.price_minute_micros / 60000 + tokens * l.price_ktok_micros / 1000)
end

local function finish_attempt(id, job, a, now)
  local q, t = job.queue, job.tenant
  redis.call('ZREM', k('leases'), id)
  redis.call('HINCRBY', k('running'), t, -1)
  stat(q, t, 'running', -1)
  local started = tonumber(job.started_at) or now
  local enq = tonumber(job.enqueued_at) or started
  local finished = now
  local run_ms = math.max(0, math.floor(a.run_ms or (finished - started)))
  local tokens = (tonumber(a.input_tokens) or 0) + (tonumber(a.output_tokens) or 0)
  local cost = charge(t, run_ms, tokens, now)
  outbox({
    job = id, attempt = job.attempts, tenant = t, queue = q, kind = job.kind,
    outcome = a.outcome, enqueued_at = enq, started_at = started,
    finished_at = finished, wait_ms = math.max(0, started - (tonumber(job.ready_at) or enq)),
    run_ms = run_ms, cpu_ms = a.cpu_ms, cost_micros = cost,
    peak_rss = a.peak_rss, exit_code = a.exit_code, signal = a.signal,
    worker = job.worker, api_calls = a.api_calls, input_tokens = a.input_tokens,
    output_tokens = a.output_tokens, error = a.error,
  })
  local jk = k('job', id)
  redis.call('HSET', jk, 'outcome', a.outcome, 'finished_at', finished,
    'last_error', a.error or '', 'result', a.result or '')
  redis.call('HDEL', jk, 'worker')
  local state
  local used = (tonumber(job.attempts) or 0) - (tonumber(job.base) or 0)
  if a.outcome == 'succeeded' then
    state = 'succeeded'
    redis.call('HSET', jk, 'state', state)
    redis.call('PEXPIRE', jk, default('retention_ms'))
  elseif a.permanent or used >= (tonumber(job.max_attempts) or 1) then
    state = 'dead'
    redis.call('HSET', jk, 'state', state)
    redis.call('ZADD', k('q', q, 'dead'), now, id)
    stat(q, t, 'dead', 1)
  elseif (a.backoff_ms or 0) > 0 then
    state = 'delayed'
    redis.call('HSET', jk, 'state', state, 'run_at', now + a.backoff_ms)
    redis.call('ZADD', k('q', q, 'delayed'), now + a.backoff_ms, id)
    stat(q, t, 'delayed', 1)
  else
    state = 'ready'
    redis.call('HSET', jk, 'ready_at', now)
    make_ready(id, q, t, tonumber(job.score))
  end
  sync_later(t)
  return state
end

local JOB_FIELDS = { 'state', 'tenant', 'queue', 'kind', 'attempts', 'base',
  'max_attempts', 'enqueued_at', 'ready_at', 'started_at', 'score', 'worker' }
local function load_job(id)
  local v = redis.call('HMGET', k('job', id), unpack(JOB_FIELDS))
  if not v[1] then return nil end
  local job = {}
  for i, f in ipairs(JOB_FIELDS) do job[f] = v[i] end
  return job
end

-- Every script that changes jobs ends with this: re-sync the tenants it
-- touched, write the summed counters, and tell idle workers (subscribed to
-- B:wake) if a tenant became claimable, so a busy fleet is not woken by
-- every completion.
local function finish()
  for t in pairs(pending_sync) do sync_tenant(t) end
  pending_sync = {}
  for key, fields in pairs(pending_stats) do
    for f, delta in pairs(fields) do
      if delta ~= 0 then redis.call('HINCRBY', key, f, delta) end
    end
  end
  pending_stats = {}
  if entered_any then redis.call('PUBLISH', k('wake'), '1') end
end
