-- lib/jobs.lua: adding a validated job, shared by enqueue.lua and
-- schedule_fire.lua, so a scheduled job has exactly the hash layout,
-- counters, tenant sets and sched-set sync of an enqueued one.
--
-- Usage: local adds = new_adds(); for each job: add_job(adds, job, now, seq)
-- (seq: a number reserved from B:seq by the caller); then flush_adds(adds)
-- and finish(). `job` has tenant, queue, kind, payload, timeout_ms, memory,
-- delay_ms, priority, max_attempts (0 = default) and idem ("" = none), all
-- already validated (names, partition, payload, caps) by the caller.

local function new_adds()
  -- ready: ready-set key -> { score, id, ... }; queues, tenants: names seen
  -- for the first time in B:tq (added to B:queues, B:tenants); touched:
  -- tenants with new ready work (their sched sets re-synced).
  return { ready = {}, queues = {}, tenants = {}, touched = {} }
end

-- Write one job; returns its id (`<partition>-<hex ms><hex seq>`).
local function add_job(adds, job, now, seq)
  local partition = B:match(':(%d+)}$') or '0'
  local id = string.format('%s-%x%06x', partition, now, seq % 16777216)
  if job.idem ~= '' then
    redis.call('SET', k('idem', job.tenant, job.idem), id, 'PX', default('idem_ttl_ms'))
  end
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
  -- B:queues and B:tenants only grow; a tenant whose B:tq entry lists
  -- the queue was added to both by an earlier enqueue (two commands
  -- fewer for most single enqueues).
  if not tenant_queues(job.tenant)[job.queue] then
    adds.queues[job.queue] = true
    adds.tenants[job.tenant] = true
  end
  if delayed then
    redis.call('ZADD', k('q', job.queue, 'delayed'), ready_at, id)
    stat(job.queue, job.tenant, 'delayed', 1)
  else
    local rk = k('q', job.queue, 't', job.tenant)
    local list = adds.ready[rk]
    if not list then
      list = {}
      adds.ready[rk] = list
      tq_add(job.tenant, job.queue)
    end
    list[#list + 1] = score
    list[#list + 1] = id
    stat(job.queue, job.tenant, 'ready', 1)
    adds.touched[job.tenant] = true
  end
  if delayed then
    feed(job.tenant, job.queue, id, 'enqueued', 'run_at', ready_at)
  else
    feed(job.tenant, job.queue, id, 'enqueued')
  end
  return id
end

-- Write what add_job gathered: the ready sets, the names seen, and the
-- sched sets of the tenants with new ready work. Call finish() after it.
local function flush_adds(adds)
  for rk, list in pairs(adds.ready) do call_chunked('ZADD', rk, list) end
  local function set_members(m)
    local list = {}
    for x in pairs(m) do list[#list + 1] = x end
    return list
  end
  if next(adds.queues) then call_chunked('SADD', k('queues'), set_members(adds.queues)) end
  if next(adds.tenants) then call_chunked('SADD', k('tenants'), set_members(adds.tenants)) end
  for t in pairs(adds.touched) do sync_tenant(t) end
end
