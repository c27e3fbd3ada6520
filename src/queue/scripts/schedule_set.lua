-- schedule_set.lua: add, replace or remove a tenant's recurring schedule.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}": the tenant's partition
-- ARGV[1]  "add" or "rm"
-- ARGV[2]  tenant
-- ARGV[3]  schedule name
-- ARGV[4]  (add) its first next-due slot, ms (computed by the caller from
--          its cron expression or interval, after Redis's clock)
-- ARGV[5..] (add) field, value pairs of the schedule's hash (tenant, name,
--          cron + tz or every_ms, queue, kind, payload, options, missed)
-- Returns  add: 1. rm: 1 if the schedule existed, else 0.
-- Invariant: a schedule is its hash B:schedule:<t>:<name>, member
--          "<t>:<name>" of zset B:schedules (scored by next-due) and
--          <name> in set B:schedules:<t>, all three or none; a replaced
--          schedule starts over (counters, next-due), so a fire step
--          computed for the old one finds next-due changed and does nothing.

local op, t, name = ARGV[1], ARGV[2], ARGV[3]
local hk, member = k('schedule', t, name), t .. ':' .. name
if op == 'rm' then
  redis.call('DEL', hk)
  redis.call('SREM', k('schedules', t), name)
  return redis.call('ZREM', k('schedules'), member)
elseif op == 'add' then
  local first = tonumber(ARGV[4])
  if not first or #ARGV < 6 or #ARGV % 2 ~= 0 then
    return redis.error_reply('ERR agentq invalid: schedule_set add needs a first slot and field pairs')
  end
  redis.call('DEL', hk)
  redis.call('HSET', hk, unpack(ARGV, 5))
  redis.call('ZADD', k('schedules'), first, member)
  redis.call('SADD', k('schedules', t), name)
  return 1
end
return redis.error_reply('ERR agentq invalid: schedule_set op must be add or rm')
