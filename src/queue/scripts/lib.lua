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
--  * tenant t is a member of B:q:<q>:sched iff it has ready jobs in q,
--    neither q nor t on q is paused, and t is admissible (running < cap,
--    usage this month below its quota, within its start rate); its score is
--    its pass on q, never below q's virtual time (B:qvt field q).
--  * B:qw field q is the sum of the weights of the members of q's sched set
--    (workers split their slots across partitions by it).
--  * a tenant held by quota or rate is in B:throttled, scored by the time it
--    may start again, with the reason in B:held; claim re-admits it then.
--  * the counters in B:q:<q>:stats equal the cardinalities they describe.

local B = KEYS[1]
-- Key of up to four parts under the partition base (no table per call: this
-- runs for every key of every job).
local function k(a, b, c, d)
  if d then return B .. ':' .. a .. ':' .. b .. ':' .. c .. ':' .. d end
  if c then return B .. ':' .. a .. ':' .. b .. ':' .. c end
  if b then return B .. ':' .. a .. ':' .. b end
  return B .. ':' .. a
end
-- Write a flat list of arguments with one command per chunk (Lua's unpack
-- has a stack limit).
local function call_chunked(cmd, key, args)
  for i = 1, #args, 1000 do
    redis.call(cmd, key, unpack(args, i, math.min(i + 999, #args)))
  end
end
-- Call fn with list in slices of at most n elements.
local function each_chunk(list, n, fn)
  for i = 1, #list, n do fn({ unpack(list, i, math.min(i + n - 1, #list)) }) end
end
-- Table t[key], created empty on first use.
local function sub(t, key)
  local v = t[key]
  if v == nil then
    v = {}
    t[key] = v
  end
  return v
end

local K_RUNNING, K_HELD = k('running'), k('held')
local K_THROTTLED, K_PAUSED, K_LEASES = k('throttled'), k('paused'), k('leases')
local K_QVT, K_QW = k('qvt'), k('qw')

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
-- The marker line below is where builds with the `test-clock` feature put
-- the simulation test's clock (src/queue/scripts.rs); in every other build
-- it stays a comment, so production scripts cannot be steered.
local now_cached = nil
local function now_ms()
  if not now_cached then
    local t = redis.call('TIME')
    now_cached = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    -- @test-clock
  end
  return now_cached
end
-- The same as a string: numbers passed to redis.call are formatted with
-- sprintf each time, which costs more than the command itself.
local now_text = nil
local function now_str()
  if not now_text then now_text = tostring(now_ms()) end
  return now_text
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

local retention_text = nil
local function retention_str()
  if not retention_text then retention_text = tostring(default('retention_ms')) end
  return retention_text
end

-- Limits of a tenant: its own setting, else its tier's (B:tier:<name>), else
-- the partition default, else built-in. HGETALL, not HMGET of every field:
-- most tenants set few fields or none, and most calls touch many tenants.
local limits_cache = {}
local LIMIT_FIELDS = { 'max_concurrency', 'max_timeout_ms', 'max_memory', 'weight', 'rate',
  'rate_period_ms', 'burst', 'quota_ms', 'price_minute_micros', 'price_ktok_micros',
  'expected_rate_per_min' }
local function read_hash(key)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end
-- Resolved limits of a tier (or of no tier: name ''), built once per call;
-- a tenant's limits table holds only its own settings and falls back to
-- these through a metatable, since building an 11-field table per tenant
-- cost more than the commands of a claim.
local bases = {}
local function base_limits(tier_name)
  local b = bases[tier_name]
  if b then return b end
  local tier = (tier_name ~= '') and read_hash(k('tier', tier_name)) or {}
  local l = {}
  for _, f in ipairs(LIMIT_FIELDS) do l[f] = tonumber(tier[f]) or default(f) end
  b = { limits = l, meta = { __index = l } }
  bases[tier_name] = b
  return b
end
local function limits(t)
  local l = limits_cache[t]
  if l then return l end
  local own = read_hash(k('tenant', t))
  local base = base_limits(own.tier or '')
  own.tier = nil
  if next(own) == nil then
    l = base.limits
  else
    l = {}
    for f, v in pairs(own) do l[f] = tonumber(v) end
    setmetatable(l, base.meta)
  end
  limits_cache[t] = l
  return l
end

-- A worker's last call of each kind (claim, complete, release) and its
-- reply, so that the same call repeated after a lost reply (the worker
-- retries with the same call id) answers as the first did instead of
-- acting twice: hash B:calls:<worker>, fields <kind> = the call id and
-- <kind>:r = the reply; it expires an hour after the worker's last call.
-- An empty call id opts out.
local function remembered(worker, kind, call)
  if call == '' then return nil end
  local v = redis.call('HMGET', k('calls', worker), kind, kind .. ':r')
  if v[1] == call then return v[2] end
  return nil
end
local function remember(worker, kind, call, reply)
  if call == '' then return end
  local key = k('calls', worker)
  redis.call('HSET', key, kind, call, kind .. ':r', reply)
  redis.call('PEXPIRE', key, 3600000)
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

-- Per-call state. A script call is atomic, so what it reads stays true until
-- it changes it itself; these caches read each value once and finish()
-- writes each change back once, however many jobs of a batch touched it.
-- A number field of a hash per tenant (running count, pass): each field is
-- read once (nh_get, or many at once by prefetch), changes are marked in
-- `dirty`, and nh_flush writes them back with one HSET.
local function number_hash(key) return { key = key, vals = {}, dirty = {} } end
local function nh_get(h, f)
  local v = h.vals[f]
  if v == nil then
    v = tonumber(redis.call('HGET', h.key, f)) or 0
    h.vals[f] = v
  end
  return v
end
local function nh_flush(h)
  local args = {}
  for f in pairs(h.dirty) do
    args[#args + 1] = f
    args[#args + 1] = h.vals[f]
    h.dirty[f] = nil
  end
  if #args > 0 then call_chunked('HSET', h.key, args) end
end

-- The accessors below run several times per job: they read the value
-- tables directly and call nh_get only on a miss.
local RUNNING = number_hash(K_RUNNING)
local run_vals, run_dirty = RUNNING.vals, RUNNING.dirty
local function running(t) return run_vals[t] or nh_get(RUNNING, t) end
local function add_running(t, d)
  run_vals[t] = running(t) + d
  run_dirty[t] = true
end

-- The queues where tenant t has ready work: field t of hash B:tq, the queue
-- names joined by spaces (names never hold one). One hash, not a set per
-- tenant, so a call reads the queues of all its tenants with one HMGET
-- (prefetch) and writes the changes back with one HSET/HDEL (finish).
local K_TQ = k('tq')
local tq_cache, tq_dirty = {}, {}
local function parse_queues(s)
  local qs = {}
  if s then
    for q in string.gmatch(s, '%S+') do qs[q] = true end
  end
  return qs
end
local function tenant_queues(t)
  local qs = tq_cache[t]
  if qs == nil then
    qs = parse_queues(redis.call('HGET', K_TQ, t))
    tq_cache[t] = qs
  end
  return qs
end
local function tq_add(t, q)
  local qs = tenant_queues(t)
  if not qs[q] then
    qs[q] = true
    tq_dirty[t] = true
  end
end
local function tq_rem(t, q)
  local qs = tenant_queues(t)
  if qs[q] then
    qs[q] = nil
    tq_dirty[t] = true
  end
end
local function flush_tq()
  local sets, dels = {}, {}
  for t in pairs(tq_dirty) do
    local names = {}
    for q in pairs(tq_cache[t]) do names[#names + 1] = q end
    if #names > 0 then
      sets[#sets + 1] = t
      sets[#sets + 1] = table.concat(names, ' ')
    else
      dels[#dels + 1] = t
    end
  end
  tq_dirty = {}
  if #sets > 0 then call_chunked('HSET', K_TQ, sets) end
  if #dels > 0 then call_chunked('HDEL', K_TQ, dels) end
end

-- Read running counts and queues of many tenants with one HMGET each.
local function prefetch(tenants)
  local need = {}
  for _, t in ipairs(tenants) do
    if run_vals[t] == nil then need[#need + 1] = t end
  end
  each_chunk(need, 500, function(part)
    local r = redis.call('HMGET', K_RUNNING, unpack(part))
    local qs = redis.call('HMGET', K_TQ, unpack(part))
    for j, t in ipairs(part) do
      run_vals[t] = tonumber(r[j]) or 0
      if tq_cache[t] == nil then tq_cache[t] = parse_queues(qs[j]) end
    end
  end)
end

-- A tenant's weight (its share among backlogged tenants) and its stride:
-- each start moves its pass on by 1e6 / weight.
local function weight(t) return math.max(limits(t).weight, 0.001) end
local function stride(t) return math.floor(1000000 / weight(t)) end

-- Virtual time of queue q: the lowest pass picked so far by a claim that
-- serves q (B:qvt field q); never moves backwards. Picks take the lowest
-- pass, so every pass in q's sched set is at least q's virtual time.
-- One per queue, not per partition: a busy queue's picks must not move the
-- clock of a quiet queue served by another pool.
local vt_cache, vt_dirty = {}, {}
local function get_vt(q)
  local v = vt_cache[q]
  if v == nil then
    v = tonumber(redis.call('HGET', K_QVT, q))
    if v == nil then
      -- First use of the queue (or a namespace from before per-queue
      -- virtual time): start at its head, so nobody there gains or loses,
      -- and keep it (a later pick at that same pass would not raise it, and
      -- an unwritten virtual time would fall back to 0 once the set empties).
      v = tonumber(redis.call('ZRANGE', k('q', q, 'sched'), 0, 0, 'WITHSCORES')[2]) or 0
      vt_dirty[q] = true
    end
    vt_cache[q] = v
  end
  return v
end
local function raise_vt(q, p)
  if p > get_vt(q) then
    vt_cache[q] = p
    vt_dirty[q] = true
  end
end

-- What a tenant still owes on a queue it left (its pass there, when that
-- was ahead of the queue's virtual time): hash B:q:<q>:pass, tenant ->
-- pass, read and written once per call.
local saved_cache, saved_dirty = {}, {}
local function saved_pass(q, t)
  local c = sub(saved_cache, q)
  local v = c[t]
  if v == nil then
    v = tonumber(redis.call('HGET', k('q', q, 'pass'), t)) or false
    c[t] = v
  end
  return v
end
local function set_saved(q, t, v)
  sub(saved_cache, q)[t] = v
  sub(saved_dirty, q)[t] = true
end
local function flush_saved()
  for q, d in pairs(saved_dirty) do
    local sets, dels = {}, {}
    for t in pairs(d) do
      local v = saved_cache[q][t]
      if v then
        sets[#sets + 1] = t
        sets[#sets + 1] = v
      else
        dels[#dels + 1] = t
      end
    end
    if #sets > 0 then call_chunked('HSET', k('q', q, 'pass'), sets) end
    if #dels > 0 then call_chunked('HDEL', k('q', q, 'pass'), dels) end
  end
  saved_dirty = {}
end

-- Changes to the admissible weight of each queue (B:qw), summed per call.
local qw_delta = {}
local function add_weight(q, d) qw_delta[q] = (qw_delta[q] or 0) + d end

-- Lease deadlines added and removed in this call, written in one command each.
local lease_adds, lease_rems = {}, {}
local function lease_add(id, deadline)
  lease_adds[#lease_adds + 1] = deadline
  lease_adds[#lease_adds + 1] = id
end
local function lease_rem(id) lease_rems[#lease_rems + 1] = id end

-- Members of B:paused ("q:<queue>" and "qt:<queue>:<tenant>"), read once.
local paused_cache = nil
local function paused_member(m)
  if paused_cache == nil then
    paused_cache = {}
    for _, x in ipairs(redis.call('SMEMBERS', K_PAUSED)) do paused_cache[x] = true end
  end
  return paused_cache[m] == true
end

-- Whether B:held may hold anyone (so a tenant's HDEL can be skipped if not).
local held_any = nil
local function any_held()
  if held_any == nil then held_any = redis.call('HLEN', K_HELD) > 0 end
  return held_any
end


-- Scores in the sched sets as this call knows them (false: not a member),
-- and whether each tenant was a member in Redis (so flush_sched knows who
-- joined or left, for the admissible weight).
local sched_cache, sched_orig = {}, {}
local function sched_seen(q, t, s)
  sub(sched_cache, q)[t] = s
  sub(sched_orig, q)[t] = s ~= false
end
local function sched_score(q, t)
  local s = sub(sched_cache, q)[t]
  if s == nil then
    s = tonumber(redis.call('ZSCORE', k('q', q, 'sched'), t)) or false
    sched_seen(q, t, s)
  end
  return s
end
-- Changes to sched sets are written by flush_sched(), one ZADD and one ZREM
-- per queue, before anything reads a sched set from Redis and by finish().
local sched_dirty = {}
local function sched_set(q, t, p)
  sched_cache[q][t] = p
  sub(sched_dirty, q)[t] = true
end
local function flush_sched()
  for q, d in pairs(sched_dirty) do
    local adds, rems = {}, {}
    local orig = sub(sched_orig, q)
    for t in pairs(d) do
      local p = sched_cache[q][t]
      if p then
        adds[#adds + 1] = p
        adds[#adds + 1] = t
      else
        rems[#rems + 1] = t
      end
      local member = p ~= false
      if orig[t] ~= member then
        add_weight(q, member and weight(t) or -weight(t))
        orig[t] = member
      end
    end
    if #adds > 0 then call_chunked('ZADD', k('q', q, 'sched'), adds) end
    if #rems > 0 then call_chunked('ZREM', k('q', q, 'sched'), rems) end
  end
  sched_dirty = {}
end
-- Read the sched scores of many tenants on queue q with one ZMSCORE.
local function prefetch_sched(q, tenants)
  local c = sub(sched_cache, q)
  local need = {}
  for _, t in ipairs(tenants) do
    if c[t] == nil then need[#need + 1] = t end
  end
  each_chunk(need, 500, function(part)
    local scores = redis.call('ZMSCORE', k('q', q, 'sched'), unpack(part))
    for j, t in ipairs(part) do sched_seen(q, t, tonumber(scores[j]) or false) end
  end)
end

-- Tenant t enters q's sched set: at q's virtual time, or later by what it
-- still owes there (its saved pass), but never more than one stride later.
-- So time away (idle, at its cap, held by rate or quota, paused) earns no
-- credit, and nothing that happened on other queues pushes it behind the
-- tenants here: it is picked within one round of them. Returns true if it
-- entered.
local function sched_enter(q, t)
  if sched_score(q, t) ~= false then return false end
  local vt = get_vt(q)
  local p = vt
  local owed = saved_pass(q, t)
  if owed then
    p = math.min(math.max(owed, vt), vt + stride(t))
    set_saved(q, t, false)
  end
  sched_set(q, t, p)
  return true
end
-- Tenant t leaves q's sched set, keeping what it owes (a pass ahead of q's
-- virtual time) for when it comes back.
local function sched_leave(q, t)
  local s = sched_score(q, t)
  if s == false then return end
  if s > get_vt(q) then set_saved(q, t, s) end
  sched_set(q, t, false)
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
local pending_stats = {} -- queue -> { field -> delta }
local function stat(q, t, state, delta)
  local fields = sub(pending_stats, q)
  fields[state] = (fields[state] or 0) + delta
  -- Per-tenant ready and running counts are ZCARD of the tenant's ready set
  -- and B:running, so only the rarer states are counted per tenant.
  if state == 'delayed' or state == 'dead' then
    local per = state .. ':' .. t
    fields[per] = (fields[per] or 0) + delta
  end
end

-- Whether queue q, or tenant t on it, is paused.
local function paused_on(q, t)
  return paused_member('q:' .. q) or paused_member('qt:' .. q .. ':' .. t)
end

-- Set when a tenant entered a sched set in this call; see finish().
local entered_any = false

-- Recompute tenant t's membership in the sched set of every queue where it has
-- ready work (see sched_enter for where it enters). Returns true if it
-- entered any set (callers wake idle workers then).
local function sync_tenant(t)
  local qs = tenant_queues(t)
  local has_work = next(qs) ~= nil
  local reason, until_ms = nil, nil
  if has_work then reason, until_ms = hold_reason(t) end
  if reason == 'quota' or reason == 'rate' then
    redis.call('ZADD', K_THROTTLED, until_ms, t)
    redis.call('HSET', K_HELD, t, reason)
    held_any = true
  elseif any_held() and redis.call('HDEL', K_HELD, t) == 1 then
    redis.call('ZREM', K_THROTTLED, t)
  end
  if not has_work then return false end
  local admissible = reason == nil
  local entering = false
  for q in pairs(qs) do
    if admissible and not paused_on(q, t) then
      if sched_enter(q, t) then entering = true end
    else
      sched_leave(q, t)
    end
  end
  if entering then entered_any = true end
  return entering
end

-- Tenant t has no ready job left in queue q.
local function ready_ran_dry(q, t)
  tq_rem(t, q)
  sched_leave(q, t)
end

-- Recount q's admissible weight from its sched set (after a tier or the
-- defaults changed many tenants' weights at once).
local function recount_weight(q)
  local sum = 0
  for _, t in ipairs(redis.call('ZRANGE', k('q', q, 'sched'), 0, -1)) do sum = sum + weight(t) end
  redis.call('HSET', K_QW, q, sum)
  qw_delta[q] = nil
end

-- Index job id (its hash already says state "ready") in its tenant's ready set.
local function index_ready(id, q, t, score)
  redis.call('ZADD', k('q', q, 't', t), score, id)
  tq_add(t, q)
  stat(q, t, 'ready', 1)
end

-- Put job id (fields already in its hash) into its tenant's ready set.
local function make_ready(id, q, t, score)
  redis.call('HSET', k('job', id), 'state', 'ready')
  index_ready(id, q, t, score)
end

-- Append one attempt's usage record to the ledger outbox. The record is
-- packed into one field, r: the values in the order of PACKED_FIELDS in
-- src/ledger.rs joined by tabs (the worker id last), and e: the error text.
-- One field instead of 21 makes this XADD several times cheaper; tenant,
-- queue and kind are validated names and the rest are numbers, so no value
-- but the last can hold a tab.
local function outbox(id, job, a, enq, started, finished, run_ms, cost)
  local T = '\t'
  redis.call('XADD', k('outbox'), '*', 'r', id .. T .. job.attempts .. T .. job.tenant ..
    T .. job.queue .. T .. (job.kind or '') .. T .. a.outcome .. T .. enq .. T .. started ..
    T .. finished .. T .. math.max(0, started - (tonumber(job.ready_at) or enq)) .. T ..
    run_ms .. T .. (a.cpu_ms or '') .. T .. (a.peak_rss or '') .. T .. (a.exit_code or '') ..
    T .. (a.signal or '') .. T .. (a.api_calls or '') .. T .. (a.input_tokens or '') .. T ..
    (a.output_tokens or '') .. T .. cost .. T .. (job.worker or ''), 'e', a.error or '')
end

-- Close a running attempt: free the tenant slot, drop the lease, write the
-- outbox record, then route the job: succeeded, retry (delayed by backoff_ms,
-- or ready at once when backoff_ms is 0), or dead. `a` carries the attempt's
-- outcome and usage. Returns the job's new state.
-- Charge an attempt to its tenant's usage this month (the quota counter) and
-- price it; emits quota threshold events when 80% or 100% is crossed.
-- Usage of tenants without a quota is summed and written once by finish().
local usage_delta = {}
local function charge(t, run_ms, tokens, now)
  local l = limits(t)
  if l.quota_ms > 0 then
    local used = redis.call('HINCRBY', k('usage', t), month_of(now), run_ms)
    for _, pct in ipairs({ 80, 100 }) do
      local line = l.quota_ms * pct / 100
      if used >= line and used - run_ms < line then event('quota_' .. pct .. ':' .. t) end
    end
  else
    usage_delta[t] = (usage_delta[t] or 0) + run_ms
  end
  return math.floor(run_ms * l.price_minute_micros / 60000 + tokens * l.price_ktok_micros / 1000)
end

local function finish_attempt(id, job, a, now)
  local q, t = job.queue, job.tenant
  lease_rem(id)
  add_running(t, -1)
  stat(q, t, 'running', -1)
  local started = tonumber(job.started_at) or now
  local enq = tonumber(job.enqueued_at) or started
  local finished = now
  local run_ms = math.max(0, math.floor(a.run_ms or (finished - started)))
  local tokens = (tonumber(a.input_tokens) or 0) + (tonumber(a.output_tokens) or 0)
  local cost = charge(t, run_ms, tokens, now)
  outbox(id, job, a, job.enqueued_at or enq, job.started_at or started, now_str(), run_ms, cost)
  local jk = k('job', id)
  local used = (tonumber(job.attempts) or 0) - (tonumber(job.base) or 0)
  local state
  if a.outcome == 'succeeded' then
    state = 'succeeded'
  elseif a.permanent or used >= (tonumber(job.max_attempts) or 1) then
    state = 'dead'
  elseif (a.backoff_ms or 0) > 0 then
    state = 'delayed'
  else
    state = 'ready'
  end
  redis.call('HSET', jk, 'state', state, 'outcome', a.outcome, 'finished_at', now_str(),
    'last_error', a.error or '', 'result', a.result or '')
  if state == 'succeeded' then
    redis.call('PEXPIRE', jk, retention_str())
    -- the worker field stays: it names who ran the finished job
  elseif state == 'dead' then
    redis.call('HDEL', jk, 'worker')
    redis.call('ZADD', k('q', q, 'dead'), now, id)
    redis.call('ZADD', k('q', q, 'dt', t), now, id)
    stat(q, t, 'dead', 1)
  elseif state == 'delayed' then
    redis.call('HDEL', jk, 'worker')
    redis.call('HSET', jk, 'run_at', now + a.backoff_ms)
    redis.call('ZADD', k('q', q, 'delayed'), now + a.backoff_ms, id)
    stat(q, t, 'delayed', 1)
  else
    redis.call('HDEL', jk, 'worker')
    redis.call('HSET', jk, 'ready_at', now)
    index_ready(id, q, t, tonumber(job.score))
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
local function flush_state()
  flush_sched()
  flush_tq()
  -- absolute values: this call read each count before changing it
  nh_flush(RUNNING)
  flush_saved()
  for q in pairs(vt_dirty) do redis.call('HSET', K_QVT, q, vt_cache[q]) end
  vt_dirty = {}
  for q, d in pairs(qw_delta) do
    if d ~= 0 then redis.call('HINCRBYFLOAT', K_QW, q, d) end
  end
  qw_delta = {}
  if #lease_rems > 0 then call_chunked('ZREM', K_LEASES, lease_rems) end
  if #lease_adds > 0 then call_chunked('ZADD', K_LEASES, lease_adds) end
  lease_adds, lease_rems = {}, {}
  if next(usage_delta) then
    local month = month_of(now_ms())
    for t, ms in pairs(usage_delta) do redis.call('HINCRBY', k('usage', t), month, ms) end
  end
  usage_delta = {}
  for q, fields in pairs(pending_stats) do
    local key = k('q', q, 'stats')
    for f, delta in pairs(fields) do
      if delta ~= 0 then redis.call('HINCRBY', key, f, delta) end
    end
  end
  pending_stats = {}
end

local function finish()
  for t in pairs(pending_sync) do sync_tenant(t) end
  pending_sync = {}
  flush_state()
  if entered_any then redis.call('PUBLISH', k('wake'), '1') end
end
