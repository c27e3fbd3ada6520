-- lib/attempt.lua: leases, and closing an attempt (charge, record, route).

-- Lease deadlines added and removed in this call, written in one command each.
local lease_adds, lease_rems = {}, {}
local function lease_add(id, deadline)
  lease_adds[#lease_adds + 1] = deadline
  lease_adds[#lease_adds + 1] = id
end
local function lease_rem(id) lease_rems[#lease_rems + 1] = id end

-- Close a running attempt: free the tenant slot, drop the lease, write the
-- outbox record, then route the job: succeeded, retry (delayed by backoff_ms,
-- or ready at once when backoff_ms is 0), or dead. `a` carries the attempt's
-- outcome and usage. Returns the job's new state.
-- Charge an attempt to its tenant's usage this month (the quota counter) and
-- price it; emits quota threshold events when 80% or 100% is crossed.
-- Usage of tenants without a quota or price steps is summed and written once
-- by finish(), and priced flat: floor(run_ms x price/60000 + tokens x
-- price/1000). A tenant with price steps (README, "Volume pricing") has
-- its month's counter read and incremented here, per attempt (HINCRBY is
-- the read), so two attempts in any two calls never price the same minutes:
-- each is priced at the steps of the usage it actually added. A tenant with
-- a spend cap adds the cost to B:usage:<t> field <month>:cost, which the
-- admission check (hold_reason) reads.
local usage_delta = {}
local charge_now, charge_month = nil, nil
local function charge(t, run_ms, tokens, now)
  local l = limits(t)
  charge_note = nil
  local msteps, ksteps = price_steps(l.price_minute_steps), price_steps(l.price_ktok_steps)
  local cap = l.spend_cap_micros
  if now ~= charge_now then charge_now, charge_month = now, month_of(now) end
  local ukey = k('usage', t)
  local used = nil
  if l.quota_ms > 0 or msteps then
    used = redis.call('HINCRBY', ukey, charge_month, run_ms)
    if l.quota_ms > 0 then
      for _, pct in ipairs({ 80, 100 }) do
        local line = l.quota_ms * pct / 100
        if used >= line and used - run_ms < line then event('quota_' .. pct .. ':' .. t) end
      end
    end
  else
    usage_delta[t] = (usage_delta[t] or 0) + run_ms
  end
  local cost
  if not (msteps or ksteps) then
    cost = math.floor(run_ms * l.price_minute_micros / 60000 + tokens * l.price_ktok_micros / 1000)
    if cap <= 0 then return cost end
  else
    local notes = {}
    if msteps then
      notes[1] = 'u' .. (used - run_ms)
      cost = graduated(msteps, 60000, used - run_ms, run_ms, 'm', notes)
    else
      cost = step_amount(run_ms, l.price_minute_micros, 60000)
      if run_ms > 0 then notes[#notes + 1] = 'm0:' .. l.price_minute_micros .. ':' .. run_ms .. ':' .. cost end
    end
    tokens = math.floor(tokens)
    if ksteps and tokens > 0 then
      local tused = redis.call('HINCRBY', ukey, charge_month .. ':tok', tokens)
      notes[#notes + 1] = 'k' .. (tused - tokens)
      cost = cost + graduated(ksteps, 1000, tused - tokens, tokens, 't', notes)
    elseif tokens > 0 then
      local c = step_amount(tokens, l.price_ktok_micros, 1000)
      notes[#notes + 1] = 't0:' .. l.price_ktok_micros .. ':' .. tokens .. ':' .. c
      cost = cost + c
    end
    charge_note = table.concat(notes, ' ')
  end
  if cap > 0 and cost > 0 then
    local spent = redis.call('HINCRBY', ukey, charge_month .. ':cost', cost)
    for _, pct in ipairs({ 80, 100 }) do
      local line = cap * pct / 100
      if spent >= line and spent - cost < line then event('spend_' .. pct .. ':' .. t) end
    end
  end
  return cost
end

-- How long a succeeded job of queue q keeps its hash, in ms as text:
-- B:qkeep field q (`Queue::set_keep_completed`), else the partition's
-- retention_ms. "0" removes it on success (BullMQ's removeOnComplete).
local keep_cache = {}
local removed_jobs = {} -- job hashes to delete, one DEL at flush_state
local function keep_completed(q)
  local v = keep_cache[q]
  if v == nil then
    v = redis.call('HGET', k('qkeep'), q)
    -- Only whole ms reach PEXPIRE: a field edited by hand must not make
    -- every completion on the queue fail.
    if not (v and v:match('^%d+$')) then v = retention_str() end
    keep_cache[q] = v
  end
  return v
end

-- The job events of an attempt's end (lib/feed.lua): succeeded or
-- cancelled, or failed followed by the job's next state (retrying or dead).
local function feed_attempt_end(id, job, a, state, now)
  local t, q, n = job.tenant, job.queue, job.attempts
  if state == 'succeeded' then
    local size = a.result and #a.result or 0
    if size > default('events_result_max') then
      -- kept on the job, not in each retained event: a tenant's 10,000
      -- events could otherwise hold 10,000 results of up to 1 MiB
      feed(t, q, id, 'succeeded', 'attempt', n, 'result_bytes', size)
    elseif size > 0 then
      feed(t, q, id, 'succeeded', 'attempt', n, 'result', a.result)
    else
      feed(t, q, id, 'succeeded', 'attempt', n)
    end
    return
  end
  if state == 'cancelled' then
    feed(t, q, id, 'cancelled', 'attempt', n)
    return
  end
  feed(t, q, id, 'failed', 'attempt', n, 'outcome', a.outcome, 'error', a.error or '')
  if state == 'dead' then
    feed(t, q, id, 'dead', 'attempt', n)
  else
    local due = (state == 'delayed') and (now + a.backoff_ms) or now
    feed(t, q, id, 'retrying', 'attempt', n, 'run_at', due)
  end
end

local function finish_attempt(id, job, a, now)
  local q, t = job.queue, job.tenant
  -- A cancelled attempt (cancel.lua marked it: job field cancel = its
  -- number) closes as cancelled whoever closes it (its worker's completion,
  -- the reaper, a hand-back) and whatever it says, unless it succeeded: a
  -- task that finished before the kill keeps its success.
  if job.cancel and job.cancel == job.attempts and a.outcome ~= 'succeeded' then
    local why = (a.error and a.error ~= '') and ('; ' .. a.error) or ''
    a.outcome, a.permanent, a.backoff_ms = 'cancelled', true, 0
    a.error = 'cancelled while running' .. why
  end
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
  elseif a.outcome == 'cancelled' then
    -- a marked attempt (above): no retry, not dead-lettered
    state = 'cancelled'
  elseif a.permanent or used >= (tonumber(job.max_attempts) or 1) then
    state = 'dead'
  elseif (a.backoff_ms or 0) > 0 then
    state = 'delayed'
  else
    state = 'ready'
  end
  sync_later(t)
  feed_attempt_end(id, job, a, state, now)
  if state == 'dead' then alert_dead(id, job, a) end -- lib/events.lua: the tenant's webhook
  local keep = (state == 'succeeded' and keep_completed(q))
    or (state == 'cancelled' and retention_str())
  if keep == '0' then
    -- The queue keeps no succeeded jobs: the ledger record above is the
    -- attempt's account, so the hash goes (one DEL per call for all of them,
    -- by flush_state; nothing reads it again in this call: a second
    -- completion of the same attempt is answered from the first).
    removed_jobs[#removed_jobs + 1] = jk
    return state
  end
  -- One HSET per attempt: a retry's due time goes with its outcome.
  local due_field = (state == 'delayed' and 'run_at') or (state == 'ready' and 'ready_at') or nil
  if due_field then
    local due = (state == 'delayed') and (now + a.backoff_ms) or now
    redis.call('HSET', jk, 'state', state, 'outcome', a.outcome, 'finished_at', now_str(),
      'last_error', a.error or '', 'result', a.result or '', due_field, due)
  else
    redis.call('HSET', jk, 'state', state, 'outcome', a.outcome, 'finished_at', now_str(),
      'last_error', a.error or '', 'result', a.result or '')
  end
  if keep then
    redis.call('PEXPIRE', jk, keep)
    -- the worker field stays: it names who ran the finished job
    return state
  end
  redis.call('HDEL', jk, 'worker')
  if state == 'dead' then
    redis.call('ZADD', k('q', q, 'dead'), now, id)
    redis.call('ZADD', k('q', q, 'dt', t), now, id)
    stat(q, t, 'dead', 1)
  elseif state == 'delayed' then
    redis.call('ZADD', k('q', q, 'delayed'), now + a.backoff_ms, id)
    stat(q, t, 'delayed', 1)
  else
    index_ready(id, q, t, tonumber(job.score))
  end
  return state
end

local JOB_FIELDS = { 'state', 'tenant', 'queue', 'kind', 'attempts', 'base',
  'max_attempts', 'enqueued_at', 'ready_at', 'started_at', 'score', 'worker', 'cancel' }
local function load_job(id)
  local v = redis.call('HMGET', k('job', id), unpack(JOB_FIELDS))
  if not v[1] then return nil end
  local job = {}
  for i, f in ipairs(JOB_FIELDS) do job[f] = v[i] end
  return job
end
