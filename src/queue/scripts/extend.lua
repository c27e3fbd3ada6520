-- extend.lua: extend the leases of a worker's running attempts (heartbeat).
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  lease duration in ms, counted from now (Redis server time)
-- ARGV[2..] pairs: id, token
-- Returns  id, token of each attempt whose lease that token no longer holds
--          (expired and reaped, or finished elsewhere), flat; the worker
--          kills those attempts at once.
-- Invariant: only the current holder (matching attempt token) can extend a
--          lease, and deadlines come from the Redis clock, never a worker's.

local lease_ms = tonumber(ARGV[1])
local now = now_ms()
local lost = {}
for i = 2, #ARGV - 1, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local v = redis.call('HMGET', k('job', id), 'state', 'attempts')
  if v[1] == 'running' and v[2] == token then
    redis.call('ZADD', k('leases'), 'XX', now + lease_ms, id)
    redis.call('HSET', k('job', id), 'hb', now)
  else
    lost[#lost + 1] = id
    lost[#lost + 1] = token
  end
end
return lost
