-- schedule_fire.lua: fire due slots of recurring schedules (compare-and-set).
--
-- KEYS[1]  partition base, e.g. "{agentq:0}": the partition of every
--          schedule's tenant (a schedule lives in its tenant's partition)
-- ARGV     four fields per schedule, repeated:
--          member   "<tenant>:<name>" (of zset B:schedules)
--          expected the schedule's next-due slot (ms) as the caller read it
--          fire     the slot (ms) to enqueue a job for, or "" for none (every
--                   slot from expected up to next is skipped)
--          next     the schedule's next-due slot after this call (ms), > fire
--                   and > expected
--          Lua cannot read cron expressions: the caller (src/duties/
--          schedules.rs) computes fire and next from the schedule's cron or
--          interval and the missed-slot policy; this script decides whether
--          anything happens.
-- Returns  a flat array, four values per schedule: member, status, job id
--          ("" if none), detail. Status is
--          fired    a job was enqueued for slot `fire` (detail: the slot)
--          skipped  no job: `fire` was "", next-due moved on
--          refused  no job: the tenant's caps refuse the job's timeout or
--                   memory now (detail: why, also kept as last_error);
--                   next-due moved on, so the schedule does not stall
--          forbidden no job: the schedule's queue or kind is no longer
--                   among the tenant's allowed ones (B:allowed:<t>, set by
--                   `agentq tenant set --allowed-queues/--allowed-kinds`
--                   after the schedule was made; detail: why, also kept as
--                   last_error); next-due moved on
--          moved    nothing: next-due is no longer `expected` (another worker
--                   fired this slot, the schedule was replaced, or this call
--                   is a repeat after a lost reply)
--          gone     nothing: no such schedule (removed)
--          early    nothing: `expected` or `fire` is after Redis's clock
-- Invariant: each slot of a schedule fires at most once fleet-wide: a slot
--          fires only in the call that moves next-due from `expected` to
--          `next` > `expected`, atomically (compare-and-set on the score in
--          B:schedules); its job also carries the idempotency key
--          "schedule:<name>:<slot>", so even a replaced schedule firing the
--          same slot again within the idempotency TTL enqueues nothing. The
--          job is written by add_job (lib/jobs.lua), exactly as enqueue.lua
--          writes one. "Due" is judged by Redis's clock (now_ms). A schedule
--          never enqueues a job its tenant could not enqueue over the HTTP
--          API now: restrictions (allowed queues and kinds) and caps are read
--          at each fire, in this same atomic call.

local N = 4
local count = #ARGV / N
if count ~= math.floor(count) then
  return redis.error_reply('ERR agentq invalid: expected 4*n arguments, got ' .. #ARGV)
end
local K_SCHEDULES = k('schedules')
-- Whether `name` is in the comma-separated `list` (absent: no restriction,
-- as the HTTP API reads B:allowed:<t>).
local function listed(list, name)
  if not list then return true end
  for x in string.gmatch(list, '[^,]+') do
    if x == name then return true end
  end
  return false
end
-- Why tenant t may not enqueue this schedule's job now, or nil.
local function forbidden(t, s)
  local a = redis.call('HMGET', k('allowed', t), 'queues', 'kinds')
  if not listed(a[1], s.queue or '') then
    return 'queue ' .. tostring(s.queue) .. ' is not allowed for tenant ' .. t ..
      ' (allowed queues: ' .. a[1] .. ')'
  elseif not listed(a[2], s.kind or '') then
    return 'kind ' .. tostring(s.kind) .. ' is not allowed for tenant ' .. t ..
      ' (allowed kinds: ' .. a[2] .. ')'
  end
  return nil
end
local now = now_ms()
local adds = new_adds()
local out = {}
for j = 1, count do
  local o = (j - 1) * N
  local member, expected = ARGV[o + 1], tonumber(ARGV[o + 2])
  local fire_text, nxt = ARGV[o + 3], tonumber(ARGV[o + 4])
  local fire = tonumber(fire_text)
  if not expected or not nxt or (fire_text ~= '' and not fire) or nxt <= expected
      or (fire and (fire < expected or nxt <= fire)) then
    return redis.error_reply('ERR agentq invalid: schedule ' .. member ..
      ': expected, fire and next must be ms with expected <= fire < next')
  end
  local status, id, detail = nil, '', ''
  local score = tonumber(redis.call('ZSCORE', K_SCHEDULES, member))
  if not score then
    status = 'gone'
  elseif score ~= expected then
    status = 'moved'
    detail = tostring(score)
  elseif expected > now or (fire and fire > now) then
    status = 'early'
  else
    local tenant, name = member:match('^([^:]+):(.+)$')
    local hk = k('schedule', tenant, name)
    local s = read_hash(hk)
    if fire then
      local job = {
        tenant = tenant, queue = s.queue, kind = s.kind, payload = s.payload or '{}',
        timeout_ms = tonumber(s.timeout_ms) or 0, memory = tonumber(s.memory) or 0,
        delay_ms = 0, priority = tonumber(s.priority) or 0,
        max_attempts = tonumber(s.max_attempts) or 0,
        idem = 'schedule:' .. name .. ':' .. fire_text,
      }
      local l = limits(tenant)
      local why = forbidden(tenant, s)
      if why then
        status = 'forbidden'
        detail = why
      elseif job.timeout_ms > l.max_timeout_ms then
        detail = 'timeout ' .. fmt_ms(job.timeout_ms) .. ' exceeds tenant ' .. tenant ..
          "'s max_timeout of " .. fmt_ms(l.max_timeout_ms)
      elseif job.memory > l.max_memory then
        detail = 'memory ' .. fmt_bytes(job.memory) .. ' exceeds tenant ' .. tenant ..
          "'s max_memory of " .. fmt_bytes(l.max_memory)
      end
      if detail ~= '' then
        status = status or 'refused'
        redis.call('HSET', hk, 'last_error', 'slot ' .. fire_text .. ': ' .. detail)
      else
        status = 'fired'
        detail = fire_text
        id = redis.call('GET', k('idem', tenant, job.idem))
        if not id then
          id = add_job(adds, job, now, redis.call('INCR', k('seq')))
        end
        redis.call('HSET', hk, 'last_slot', fire_text, 'last_job', id, 'last_fired_at', now)
        redis.call('HDEL', hk, 'last_error')
        redis.call('HINCRBY', hk, 'fired', 1)
      end
    else
      status = 'skipped'
    end
    redis.call('ZADD', K_SCHEDULES, nxt, member)
  end
  out[#out + 1] = member
  out[#out + 1] = status
  out[#out + 1] = id
  out[#out + 1] = detail
end
flush_adds(adds)
finish()
return out
