-- lib/limits.lua: a tenant's limits (own, tier, defaults, built-in) and its
-- start-rate arithmetic (GCRA). BUILTIN comes first, generated from Rust.

-- Human units for error messages: 3600000 -> "1h", 268435456 -> "256MiB".
-- `units` runs from the largest; `base` names the smallest.
local function fmt_units(v, units, base)
  for _, u in ipairs(units) do
    if v >= u[1] and v % u[1] == 0 then return (v / u[1]) .. u[2] end
  end
  return v .. base
end
local function fmt_ms(ms)
  return fmt_units(ms, { { 86400000, 'd' }, { 3600000, 'h' }, { 60000, 'm' }, { 1000, 's' } }, 'ms')
end
local function fmt_bytes(b)
  return fmt_units(b, { { 1099511627776, 'TiB' }, { 1073741824, 'GiB' }, { 1048576, 'MiB' },
    { 1024, 'KiB' } }, 'B')
end

local defaults_cache, defaults_text = nil, {}
local function default(field)
  if defaults_cache == nil then
    defaults_cache = {}
    local flat = redis.call('HGETALL', k('defaults'))
    for i = 1, #flat, 2 do
      defaults_cache[flat[i]] = tonumber(flat[i + 1])
      defaults_text[flat[i]] = flat[i + 1]
    end
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
  'expected_rate_per_min', 'spend_cap_micros' }
-- Text fields: graduated price schedules, "from:micros,..." or "none"
-- (src/model/limits.rs, PriceSteps); see price_steps() below.
local STEP_FIELDS = { 'price_minute_steps', 'price_ktok_steps' }
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
  for _, f in ipairs(STEP_FIELDS) do
    default(f)
    l[f] = tier[f] or defaults_text[f]
  end
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
    for f, v in pairs(own) do l[f] = tonumber(v) or v end
    setmetatable(l, base.meta)
  end
  limits_cache[t] = l
  return l
end

-- GCRA: the emission interval and tolerance of a tenant's start rate.
local function gcra(l)
  local T = l.rate_period_ms / l.rate
  local burst = (l.burst > 0) and l.burst or l.rate
  return T, (burst - 1) * T
end

-- A price schedule (field price_minute_steps or price_ktok_steps of the
-- limits) as a list of { from, micros }, or false for none (flat price):
-- parsed once per call per distinct text, so a tenant without steps pays
-- one table lookup.
local steps_parsed = {}
local function price_steps(text)
  if not text then return false end
  local st = steps_parsed[text]
  if st ~= nil then return st end
  st = {}
  for from, p in string.gmatch(text, '(%d+):(%d+)') do st[#st + 1] = { tonumber(from), tonumber(p) } end
  if #st == 0 then st = false end
  steps_parsed[text] = st
  return st
end

-- floor(q * p / per) exactly in doubles (integers below 2^53 are exact):
-- q = a * per + r, so it is a * p + floor(r * p / per), with r * p below
-- per * 10^9 <= 6e13 and a * p at most the bill itself. math.fmod is exact
-- for doubles; dividing an exact multiple of per is exact too. The Rust
-- copy is model::limits::step_amount.
local function step_amount(q, p, per)
  local r = math.fmod(q, per)
  local x = r * p
  local xr = math.fmod(x, per)
  return ((q - r) / per) * p + (x - xr) / per
end

-- Graduated price of usage before..before+qty of the month on `steps`:
-- per step, its part's amount after minus before (each floored per step),
-- so a month's attempts sum to the price of the month's total usage
-- whatever order they were charged in. Appends one note word per step the
-- attempt used: <tag><from>:<micros>:<qty>:<amount>. Returns the amount.
local function graduated(steps, per, before, qty, tag, notes)
  if qty <= 0 then return 0 end
  local after = before + qty
  local total = 0
  for i = 1, #steps do
    local from, p = steps[i][1], steps[i][2]
    if after <= from then break end
    local nxt = steps[i + 1]
    local to = nxt and nxt[1]
    if not to or before < to then
      local lo = math.max(before, from) - from
      local hi = ((to and to < after) and to or after) - from
      local amt = step_amount(hi, p, per) - step_amount(lo, p, per)
      total = total + amt
      notes[#notes + 1] = tag .. from .. ':' .. p .. ':' .. (hi - lo) .. ':' .. amt
    end
  end
  return total
end

-- How charge() priced the attempt whose outbox record is written next
-- (lib/outbox.lua adds it as field b), or nil: only tenants with price
-- steps get one.
local charge_note = nil
