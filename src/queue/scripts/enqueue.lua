-- enqueue.lua: add one or more jobs to a partition (wire format v1).
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  wire format version, must be "1"
-- ARGV[2..] ten fields per job, repeated:
--          tenant, queue, kind, payload (JSON text), timeout_ms (0 = kind's
--          default), memory_bytes (0 = kind's default), delay_ms, priority
--          (-100..100, higher runs first), max_attempts (0 = default),
--          idempotency_key ("" = none)
-- Returns  a flat array: id1, created1, id2, created2, ... where created is 1
--          for a new job and 0 when an idempotency key returned an earlier job.
-- Errors   "ERR agentq invalid: ..." or "ERR agentq over_cap: ..." (prefixed
--          with "job N: " when the batch holds more than one job)
--          The whole batch is validated before anything is written, so a
--          refused batch writes nothing.
-- Invariant: a requested timeout or memory above the tenant's cap is refused,
--          never clipped; each job is counted in exactly one state counter.

if ARGV[1] ~= '1' then
  return redis.error_reply('ERR agentq invalid: unsupported wire format version ' ..
    tostring(ARGV[1]) .. ' (this server speaks 1)')
end
local N = 10
local count = (#ARGV - 1) / N
if count < 1 or count ~= math.floor(count) then
  return redis.error_reply('ERR agentq invalid: expected 1 + 10*n arguments, got ' .. #ARGV)
end

local function name_ok(s)
  return #s >= 1 and #s <= 64 and s:match('^[%w][%w_%.%-]*$') ~= nil
end
local function int_field(s, lo, hi)
  local n = tonumber(s)
  if n == nil or n ~= math.floor(n) or n < lo or n > hi then return nil end
  return n
end

local jobs = {}
for j = 1, count do
  local o = 1 + (j - 1) * N
  local job = {
    tenant = ARGV[o + 1], queue = ARGV[o + 2], kind = ARGV[o + 3], payload = ARGV[o + 4],
    timeout_ms = int_field(ARGV[o + 5], 0, 1e15), memory = int_field(ARGV[o + 6], 0, 1e18),
    delay_ms = int_field(ARGV[o + 7], 0, 1e15), priority = int_field(ARGV[o + 8], -100, 100),
    max_attempts = int_field(ARGV[o + 9], 0, 1000), idem = ARGV[o + 10],
  }
  local function bad(kind, msg)
    local where = (count > 1) and ('job ' .. j .. ': ') or ''
    return redis.error_reply('ERR agentq ' .. kind .. ': ' .. where .. msg)
  end
  for _, f in ipairs({ 'tenant', 'queue', 'kind' }) do
    if not name_ok(job[f]) then
      return bad('invalid', f .. ' "' .. job[f]:sub(1, 80) ..
        '" must be 1-64 characters of letters, digits, "_", "." or "-", starting with a letter or digit')
    end
  end
  for _, f in ipairs({ 'timeout_ms', 'memory', 'delay_ms', 'priority', 'max_attempts' }) do
    if job[f] == nil then return bad('invalid', f .. ' is not an integer in range') end
  end
  if #job.payload > default('max_payload') then
    return bad('invalid', 'payload is ' .. #job.payload .. ' bytes, over the limit of ' ..
      default('max_payload') .. ' bytes; store large inputs elsewhere and pass a reference')
  end
  local ok = pcall(cjson.decode, job.payload)
  if not ok then return bad('invalid', 'payload is not valid JSON') end
  if #job.idem > 200 then return bad('invalid', 'idempotency key is longer than 200 bytes') end
  local l = limits(job.tenant)
  if job.timeout_ms > l.max_timeout_ms then
    return bad('over_cap', 'requested timeout ' .. fmt_ms(job.timeout_ms) .. ' exceeds tenant ' ..
      job.tenant .. "'s max_timeout of " .. fmt_ms(l.max_timeout_ms) ..
      ': ask for less, or raise it with agentq tenant set ' .. job.tenant .. ' --max-timeout')
  end
  if job.memory > l.max_memory then
    return bad('over_cap', 'requested memory ' .. fmt_bytes(job.memory) .. ' exceeds tenant ' ..
      job.tenant .. "'s max_memory of " .. fmt_bytes(l.max_memory) ..
      ': ask for less, or raise it with agentq tenant set ' .. job.tenant .. ' --max-memory')
  end
  jobs[j] = job
end

local now = now_ms()
local partition = B:match(':(%d+)}$') or '0'
local out = {}
local touched = {}
-- One INCRBY reserves the sequence numbers of the whole batch.
local seq = redis.call('INCRBY', k('seq'), count) - count
local new_queues, new_tenants = {}, {}
local distinct = {}
for _, job in ipairs(jobs) do
  if not new_tenants[job.tenant] then
    new_tenants[job.tenant] = true
    distinct[#distinct + 1] = job.tenant
  end
end
prefetch(distinct)
local ready_adds = {} -- ready-set key -> { score, id, score, id, ... }
for _, job in ipairs(jobs) do
  local existing = nil
  local idem_key = nil
  if job.idem ~= '' then
    idem_key = k('idem', job.tenant, job.idem)
    existing = redis.call('GET', idem_key)
  end
  if existing then
    out[#out + 1] = existing
    out[#out + 1] = 0
  else
    seq = seq + 1
    local id = string.format('%s-%x%06x', partition, now, seq % 16777216)
    if idem_key then redis.call('SET', idem_key, id, 'PX', default('idem_ttl_ms')) end
    local score = (100 - job.priority) * 1099511627776 + seq
    local max_attempts = job.max_attempts
    if max_attempts == 0 then max_attempts = default('default_max_attempts') end
    local ready_at = now + job.delay_ms
    local delayed = job.delay_ms > 0
    -- Fields at their default (0, "", ready_at = enqueued_at) are left out:
    -- every reader treats a missing one as the default, and a queued job
    -- costs Redis memory for each field it holds.
    local jk = k('job', id)
    if job.timeout_ms == 0 and job.memory == 0 and job.priority == 0 and job.idem == ''
        and not delayed then
      redis.call('HSET', jk, 'tenant', job.tenant, 'queue', job.queue, 'kind', job.kind,
        'payload', job.payload, 'max_attempts', max_attempts, 'enqueued_at', now,
        'score', score, 'state', 'ready')
    else
      local f = { 'tenant', job.tenant, 'queue', job.queue, 'kind', job.kind,
        'payload', job.payload, 'max_attempts', max_attempts, 'enqueued_at', now,
        'score', score, 'state', delayed and 'delayed' or 'ready' }
      if job.timeout_ms ~= 0 then f[#f + 1] = 'timeout_ms'; f[#f + 1] = job.timeout_ms end
      if job.memory ~= 0 then f[#f + 1] = 'memory'; f[#f + 1] = job.memory end
      if job.priority ~= 0 then f[#f + 1] = 'priority'; f[#f + 1] = job.priority end
      if job.idem ~= '' then f[#f + 1] = 'idem'; f[#f + 1] = job.idem end
      if delayed then
        f[#f + 1] = 'ready_at'; f[#f + 1] = ready_at
        f[#f + 1] = 'run_at'; f[#f + 1] = ready_at
      end
      redis.call('HSET', jk, unpack(f))
    end
    new_queues[job.queue] = true
    new_tenants[job.tenant] = true
    if delayed then
      redis.call('ZADD', k('q', job.queue, 'delayed'), ready_at, id)
      stat(job.queue, job.tenant, 'delayed', 1)
    else
      local rk = k('q', job.queue, 't', job.tenant)
      local adds = ready_adds[rk]
      if not adds then
        adds = {}
        ready_adds[rk] = adds
        tq_add(job.tenant, job.queue)
      end
      adds[#adds + 1] = score
      adds[#adds + 1] = id
      stat(job.queue, job.tenant, 'ready', 1)
      touched[job.tenant] = true
    end
    out[#out + 1] = id
    out[#out + 1] = 1
  end
end
for rk, adds in pairs(ready_adds) do call_chunked('ZADD', rk, adds) end
local function set_members(m)
  local list = {}
  for x in pairs(m) do list[#list + 1] = x end
  return list
end
if next(new_queues) then call_chunked('SADD', k('queues'), set_members(new_queues)) end
if next(new_tenants) then call_chunked('SADD', k('tenants'), set_members(new_tenants)) end
for t in pairs(touched) do sync_tenant(t) end
finish()
return out
