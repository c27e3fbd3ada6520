-- enqueue.lua: add one or more jobs to a partition (wire format v1).
--
-- KEYS[1]  partition base, e.g. "{agentq:0}": the partition of every job's
--          tenant (FNV-1a 32 of the tenant name modulo the namespace's
--          partition count, which B:meta records; a job for a tenant of
--          another partition is refused: it would bypass that tenant's caps)
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
--          never clipped; each job is counted in exactly one state counter;
--          a payload is accepted exactly when src/queue/payload.rs accepts it
--          (json_check below; shared vectors in tests/payloads.rs).

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

-- FNV-1a 32 of s, as src/queue/keys.rs computes it. Exact in doubles:
-- 16777619 = 2^24 + 403, so h * 16777619 mod 2^32 is split in two.
local function fnv1a(s)
  local h = 2166136261
  for i = 1, #s do
    h = bit.bxor(h, s:byte(i))
    if h < 0 then h = h + 4294967296 end
    h = ((h % 256) * 16777216 + h * 403) % 4294967296
  end
  return h
end
local parts = tonumber(redis.call('HGET', k('meta'), 'partitions'))
local this_part = tonumber(B:match(':(%d+)}$'))
if not parts or not this_part then
  return redis.error_reply('ERR agentq invalid: ' .. B .. ' is not an initialized agentq partition ' ..
    '(no layout record at ' .. k('meta') .. '): connect any agentq process (worker, serve or CLI) ' ..
    'to the namespace once, with its --partitions setting')
end

-- json_check(s): nil when s is an acceptable payload, else why. The rule
-- and the algorithm are src/queue/payload.rs, step for step: RFC 8259, valid
-- UTF-8, no control character or unpaired surrogate escape in a string, at
-- most 127 nested arrays and objects, every number below 1e308 (judged from
-- its decimal exponent). Iterative; string.find skips plain runs in C.
local MAX_DEPTH, MAX_EXPONENT = 127, 307
local function json_check(s)
  local pos, n = 1, #s
  local function fail(what) return what .. ' at byte ' .. (pos - 1) end
  local function ws() pos = s:find('[^ \t\n\r]', pos) or (n + 1) end
  local function hex4_at(at) -- the value of uXXXX at `at` (the u)
    if s:sub(at, at) ~= 'u' then return nil end
    local h = s:sub(at + 1, at + 4)
    if #h ~= 4 or h:find('[^0-9a-fA-F]') then return nil end
    return tonumber(h, 16)
  end
  local function utf8_seq()
    local b = s:byte(pos)
    local len
    if b >= 0xC2 and b <= 0xDF then len = 2
    elseif b >= 0xE0 and b <= 0xEF then len = 3
    elseif b >= 0xF0 and b <= 0xF4 then len = 4
    else return false end
    local b2 = s:byte(pos + 1)
    if not b2 then return false end
    local lo, hi = 0x80, 0xBF
    if b == 0xE0 then lo = 0xA0 elseif b == 0xED then hi = 0x9F
    elseif b == 0xF0 then lo = 0x90 elseif b == 0xF4 then hi = 0x8F end
    if b2 < lo or b2 > hi then return false end
    for i = 2, len - 1 do
      local c = s:byte(pos + i)
      if not c or c < 0x80 or c > 0xBF then return false end
    end
    pos = pos + len
    return true
  end
  local function str()
    pos = pos + 1
    while true do
      pos = s:find('["\\%z\1-\31\128-\255]', pos)
      if not pos then pos = n + 1; return fail('unterminated string') end
      local b = s:byte(pos)
      if b == 34 then pos = pos + 1; return nil end
      if b == 92 then
        local e = s:sub(pos + 1, pos + 1)
        if e:find('^["\\/bfnrt]$') then
          pos = pos + 2
        elseif e == 'u' then
          local unit = hex4_at(pos + 1)
          if not unit then pos = pos + 1; return fail('invalid \\u escape') end
          pos = pos + 6
          if unit >= 0xD800 and unit <= 0xDBFF then
            local low = (s:sub(pos, pos) == '\\') and hex4_at(pos + 1)
            if not low or low < 0xDC00 or low > 0xDFFF then return fail('unpaired surrogate escape') end
            pos = pos + 6
          elseif unit >= 0xDC00 and unit <= 0xDFFF then
            return fail('unpaired surrogate escape')
          end
        else
          pos = pos + 1
          return fail('invalid escape')
        end
      elseif b < 32 then
        return fail('control character in a string')
      elseif not utf8_seq() then
        return fail('invalid UTF-8')
      end
    end
  end
  local function digits()
    local from = pos
    pos = s:find('[^0-9]', pos) or (n + 1)
    return pos - from
  end
  local function number()
    local start = pos
    if s:byte(pos) == 45 then pos = pos + 1 end
    local int_from = pos
    if s:byte(pos) == 48 then
      pos = pos + 1
    elseif digits() == 0 then
      return fail('invalid number')
    end
    local int = s:sub(int_from, pos - 1)
    local frac = ''
    if s:byte(pos) == 46 then
      pos = pos + 1
      local from = pos
      if digits() == 0 then return fail('invalid number') end
      frac = s:sub(from, pos - 1)
    end
    local exp = 0
    local c = s:byte(pos)
    if c == 101 or c == 69 then
      pos = pos + 1
      local negative = s:byte(pos) == 45
      c = s:byte(pos)
      if c == 43 or c == 45 then pos = pos + 1 end
      local from = pos
      if digits() == 0 then return fail('invalid number') end
      local text = s:sub(from, pos - 1)
      exp = (#text > 15) and 1e15 or tonumber(text)
      if negative then exp = -exp end
    end
    local first = (int .. frac):find('[1-9]')
    if first and #int - first + exp > MAX_EXPONENT then
      pos = start
      return fail('number out of range (1e308 or more)')
    end
    return nil
  end
  local function key()
    if s:byte(pos) ~= 34 then return fail('expected a string key') end
    local e = str()
    if e then return e end
    ws()
    if s:byte(pos) ~= 58 then return fail("expected ':'") end
    pos = pos + 1
    ws()
    return nil
  end
  local stack = {}
  ws()
  while true do
    local b = s:byte(pos)
    local e = nil
    local opened = false
    if b == 91 or b == 123 then
      pos = pos + 1
      if #stack >= MAX_DEPTH then return fail('nesting deeper than ' .. MAX_DEPTH) end
      stack[#stack + 1] = b
      ws()
      if s:byte(pos) == b + 2 then
        pos = pos + 1
        stack[#stack] = nil
      else
        if b == 123 then e = key() end
        opened = true
      end
    elseif b == 34 then e = str()
    elseif b == 116 then if s:sub(pos, pos + 3) == 'true' then pos = pos + 4 else e = fail('unexpected word') end
    elseif b == 102 then if s:sub(pos, pos + 4) == 'false' then pos = pos + 5 else e = fail('unexpected word') end
    elseif b == 110 then if s:sub(pos, pos + 3) == 'null' then pos = pos + 4 else e = fail('unexpected word') end
    elseif b == 45 or (b and b >= 48 and b <= 57) then e = number()
    elseif b then e = fail('unexpected character')
    else e = fail('unexpected end') end
    if e then return e end
    if not opened then
      -- after a value: close containers, or a comma and the next value
      while true do
        ws()
        local open = stack[#stack]
        if not open then
          if pos <= n then return fail('trailing characters') end
          return nil
        end
        if s:byte(pos) == open + 2 then
          pos = pos + 1
          stack[#stack] = nil
        else
          if s:byte(pos) ~= 44 then return fail("expected ',' or a closing bracket") end
          pos = pos + 1
          ws()
          if open == 123 then
            e = key()
            if e then return e end
          end
          break
        end
      end
    end
  end
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
  local home = (parts > 1) and (fnv1a(job.tenant) % parts) or 0
  if home ~= this_part then
    return bad('invalid', 'tenant ' .. job.tenant .. ' belongs to partition ' .. home .. ' of ' ..
      parts .. ', not ' .. this_part .. ': send it with KEYS[1] = the base of partition ' ..
      '(FNV-1a 32 of the tenant name) mod ' .. parts)
  end
  for _, f in ipairs({ 'timeout_ms', 'memory', 'delay_ms', 'priority', 'max_attempts' }) do
    if job[f] == nil then return bad('invalid', f .. ' is not an integer in range') end
  end
  if #job.payload > default('max_payload') then
    return bad('invalid', 'payload is ' .. #job.payload .. ' bytes, over the limit of ' ..
      default('max_payload') .. ' bytes; store large inputs elsewhere and pass a reference')
  end
  local why = json_check(job.payload)
  if why then return bad('invalid', 'payload is not valid JSON: ' .. why) end
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
local out = {}
-- One INCRBY reserves the sequence numbers of the whole batch.
local seq = redis.call('INCRBY', k('seq'), count) - count
local distinct, seen = {}, {}
for _, job in ipairs(jobs) do
  if not seen[job.tenant] then
    seen[job.tenant] = true
    distinct[#distinct + 1] = job.tenant
  end
end
prefetch(distinct)
local adds = new_adds()
for _, job in ipairs(jobs) do
  local existing = nil
  if job.idem ~= '' then
    existing = redis.call('GET', k('idem', job.tenant, job.idem))
  end
  if existing then
    out[#out + 1] = existing
    out[#out + 1] = 0
  else
    seq = seq + 1
    out[#out + 1] = add_job(adds, job, now, seq)
    out[#out + 1] = 1
  end
end
flush_adds(adds)
finish()
return out
