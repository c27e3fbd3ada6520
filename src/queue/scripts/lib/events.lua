-- lib/events.lua: what a script reports besides its answer, and the tenant
-- alerts it records.

-- Events for the worker to log and export (quota thresholds, spend caps,
-- rate alerts), returned by the scripts that produce them as `kind:tenant`
-- words.
local events = {}

-- Tenant alerts (README, "Tenant alerts"). A tenant with a webhook has the
-- hash B:webhook:<t> (url, secret, events = the alert groups it takes,
-- comma-separated). An event of such a tenant whose group (the kind up to
-- its first '_': quota, spend, rate, dead) is taken is appended to the
-- partition's alert stream B:alerts in this same atomic step, so an alert
-- is durable exactly when the change that raised it is; the webhook duty
-- delivers it. A tenant without a webhook costs one HGET per call in which
-- it raised an event (events are rare), and nothing is stored.
local alert_groups_cache = {}
local function alert_groups(t)
  local v = alert_groups_cache[t]
  if v == nil then
    v = redis.call('HGET', k('webhook', t), 'events') or false
    if v then v = ',' .. v .. ',' end
    alert_groups_cache[t] = v
  end
  return v
end

-- Record alert `kind` of tenant t if its webhook takes it; `...` are extra
-- field/value pairs (text or numbers).
local function alert(kind, t, ...)
  if t == nil or t == '' then return end
  local groups = alert_groups(t)
  if not groups then return end
  local group = kind:match('^[^_]+') or kind
  if not groups:find(',' .. group .. ',', 1, true) then return end
  redis.call('XADD', k('alerts'), '*', 'tenant', t, 'kind', kind, ...)
end

-- Report event word s (`quota_80:acme`); any `<kind>:<tenant>` word is also
-- an alert for that tenant's webhook.
local function event(s)
  events[#events + 1] = s
  local kind, t = s:match('^([^:]+):(.+)$')
  if kind then alert(kind, t) end
end

-- A job went dead (finish_attempt): alert `dead` with the job's id, queue,
-- kind, attempts and last error (cut to 1,000 bytes).
local function alert_dead(id, job, a)
  alert('dead', job.tenant, 'job', id, 'queue', job.queue or '', 'job_kind', job.kind or '',
    'attempts', job.attempts or '0', 'error', string.sub(a.error or '', 1, 1000))
end
