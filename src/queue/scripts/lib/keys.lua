-- lib/keys.lua: keys of the partition and small table helpers.
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
