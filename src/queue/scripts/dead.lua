-- dead.lua: retry or purge dead jobs of a queue.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  "retry" or "purge"
-- ARGV[2]  queue name
-- ARGV[3]  tenant name, or "" for every tenant (a tenant's dead jobs are
--          read from its own index, B:q:<q>:dt:<t>, so other tenants' dead
--          jobs never hide them)
-- ARGV[4]  only jobs dead for at least this many ms (0: any)
-- ARGV[5]  most jobs to act on in this call
-- ARGV[6..] job ids (optional): act on exactly these, if dead in this queue
-- Returns  the tenant of each job acted on (callers count per tenant; fewer
--          than ARGV[5] means there is nothing more to do).
-- Invariant: a retried job gets fresh attempts (max_attempts again; its
--          attempt numbers keep counting so ledger rows stay unique) and
--          re-enters scheduling like a new job; a purged job is gone with
--          its counters. Dead counters always equal the dead set's size.

local op, q, tenant = ARGV[1], ARGV[2], ARGV[3]
local older, max = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local dk = k('q', q, 'dead')
local ids = {}
if #ARGV >= 6 then
  for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  local from = (tenant == '') and dk or k('q', q, 'dt', tenant)
  ids = redis.call('ZRANGEBYSCORE', from, '-inf', now - older, 'LIMIT', 0, max)
end
local out = {}
local touched = {}
for _, id in ipairs(ids) do
  if #out >= max then break end
  local died = redis.call('ZSCORE', dk, id)
  local t = redis.call('HGET', k('job', id), 'tenant')
  if died and t and (tenant == '' or t == tenant) and tonumber(died) <= now - older then
    redis.call('ZREM', dk, id)
    redis.call('ZREM', k('q', q, 'dt', t), id)
    stat(q, t, 'dead', -1)
    local jk = k('job', id)
    if op == 'retry' then
      redis.call('HSET', jk, 'base', redis.call('HGET', jk, 'attempts') or 0, 'ready_at', now)
      make_ready(id, q, t, tonumber(redis.call('HGET', jk, 'score')) or 0)
      feed(t, q, id, 'retrying', 'run_at', now)
      touched[t] = true
    else
      redis.call('DEL', jk)
    end
    out[#out + 1] = t
  end
end
for t in pairs(touched) do sync_tenant(t) end
finish()
return out
