-- Admission in one round trip: expire stale reservations, clamp max_tokens to what every budget
-- still pays for, check the sliding-window rate limits, check the budgets, and only if all pass,
-- record the request in every window and reserve its worst-case cost on every budget counter.
--
-- Money is in integer units of 1e-10 USD (the ledger's precision), tokens are plain integers.
-- An admitted request also leaves its record (billing/services/inflight.py) in its process's in-flight
-- hash, and refreshes that process's heartbeat, in this same step.
--
-- KEYS (the last one is this request's admission marker, see below), for each budget counter i:
--       [hash (spent, reserved, r:<rid>, s:<rid>), expiry zset, settled zset]
--       then for each rate scope j: [requests zset, tokens zset, token amounts hash (<rid>, sum)]
--       then: in-flight hash of the process, epoch key, heartbeat key of the process, instances set
-- ARGV: now_ms, request_id, reservation_ttl_ms, n_counters, n_rate_scopes, fixed_cost, token_price,
--       requested_max_tokens (-1: clamp), cap, prompt_tokens, choices, window_ms,
--       likely_prompt_tokens (the prompt's likely size, which alone makes a request too large for a tokens
--       window; -1: prompt_tokens), window_max_tokens (the client's own max_tokens, which the tokens windows count;
--       -1: it set none), answers (the attempts that may answer: a stream resumed on failure is billed each one's
--       prompt and each resumed one's prefill, at most its reply, so a token budget holds prompt and reply each time),
--       then per counter: metric ('cost' | 'tokens'), limit, key_ttl_ms; per rate scope: rpm, tpm (-1: none)
--       then: record (JSON, without its amounts; '': none, for a request that holds nothing and is never
--       settled, counted in requests-per-minute windows alone), restart_grace_ms, heartbeat_ttl_ms, instance id
-- Returns 'ok max_tokens cost tokens', then per scope ' rpm rpm_remaining rpm_reset_ms tpm tpm_remaining
-- tpm_reset_ms' (one space-separated string); or {'seed', {counter indexes}}, {'wait', ms},
-- {'quota', i, spent, reserved, needed} or
-- {'rate', j, 'requests' | 'tokens', limit, used, requested, retry_after_ms (-1: never fits), then per scope
-- rpm, rpm_remaining, rpm_reset_ms, tpm, tpm_remaining, tpm_reset_ms as the refusal found them}.
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local resv_ttl = tonumber(ARGV[3])
local nb = tonumber(ARGV[4])
local nr = tonumber(ARGV[5])
local fixed = tonumber(ARGV[6])
local price = tonumber(ARGV[7])
local requested = tonumber(ARGV[8])
local cap = tonumber(ARGV[9])
local prompt = tonumber(ARGV[10])
local choices = tonumber(ARGV[11])
local window = tonumber(ARGV[12])
local likely_prompt = tonumber(ARGV[13])
if likely_prompt < 0 then
  likely_prompt = prompt
end
local window_max = tonumber(ARGV[14])
local answers = tonumber(ARGV[15])
local kx = 3 * nb + 3 * nr
local ax = 15 + 3 * nb + 2 * nr
local inflight, epoch_key, heartbeat, instances = KEYS[kx + 1], KEYS[kx + 2], KEYS[kx + 3], KEYS[kx + 4]

-- Lua turns large numbers into "1e+15", which HINCRBY refuses: always pass integers through this.
local function int(x)
  return string.format('%.0f', x)
end

-- The last key marks an admission done, with its answer: a call retried because its reply was lost with
-- its connection answers the same and reserves nothing twice (billing/services/counters.py).
local marker = KEYS[#KEYS]
local done = redis.call('GET', marker)
if done then
  return done
end

local missing = {}
for i = 1, nb do
  if redis.call('HEXISTS', KEYS[3 * i - 2], 'spent') == 0 then
    missing[#missing + 1] = i
  end
end
if #missing > 0 then
  -- A counter is rebuilt from the ledger plus the reservations live processes re-asserted. After Redis
  -- lost its data (no epoch), they need a few heartbeats to notice and re-assert: until then, wait.
  -- Redis's own clock, since the processes' clocks may disagree (or, in tests, stand still).
  local t = redis.call('TIME')
  local rnow = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    redis.call('SET', epoch_key, int(rnow))
    epoch = rnow
  end
  local wait = tonumber(epoch) + tonumber(ARGV[ax + 2]) - rnow
  if wait > 0 then
    return {'wait', int(wait)}
  end
  return {'seed', missing}
end

local counters = {}
for i = 1, nb do
  local h, exp = KEYS[3 * i - 2], KEYS[3 * i - 1]
  local a = 15 + 3 * (i - 1)
  -- A reservation whose request never settled (its process died) gives its amount back.
  local stale = redis.call('ZRANGEBYSCORE', exp, '-inf', now)
  for _, r in ipairs(stale) do
    local amount = redis.call('HGET', h, 'r:' .. r)
    if amount then
      redis.call('HINCRBY', h, 'reserved', int(-tonumber(amount)))
      redis.call('HDEL', h, 'r:' .. r)
    end
  end
  if #stale > 0 then
    redis.call('ZREMRANGEBYSCORE', exp, '-inf', now)
  end
  local values = redis.call('HMGET', h, 'spent', 'reserved')
  counters[i] = {
    metric = ARGV[a + 1],
    limit = tonumber(ARGV[a + 2]),
    ttl = tonumber(ARGV[a + 3]),
    spent = tonumber(values[1]),
    reserved = tonumber(values[2] or '0'),
  }
end

local max_tokens = requested
if requested < 0 then
  max_tokens = cap
  local tightest = 0
  for i, c in ipairs(counters) do
    local left = c.limit - c.spent - c.reserved
    local affordable
    if c.metric == 'cost' then
      left = left - fixed
      if price > 0 then
        affordable = math.floor(left / (price * choices))
      elseif left >= 0 then
        affordable = cap
      else
        affordable = -1
      end
    else
      affordable = math.floor((left - prompt * answers) / (choices * answers))
    end
    if affordable < max_tokens then
      max_tokens = affordable
      tightest = i
    end
  end
  if max_tokens < 1 then
    local c = counters[tightest]
    local needed = (prompt + choices) * answers
    if c.metric == 'cost' then
      needed = fixed + math.ceil(choices * price)
    end
    return {'quota', tightest, int(c.spent), int(c.reserved), int(needed)}
  end
end
local completion = max_tokens * choices
local cost = fixed + math.ceil(completion * price)
local tokens = (prompt + completion) * answers
-- The tokens-per-minute windows count the client's own max_tokens, or the prompt alone when it set none (the
-- max_tokens picked above, or one a parameter rule sends, pays for the budgets, not for the windows): the rest is
-- counted when it settles.
local window_tokens = prompt
if window_max >= 0 then
  window_tokens = prompt + math.min(window_max, max_tokens) * choices
end
-- Only a request whose likely size is over a limit is too large for it; one whose bound alone is over counts as
-- the whole limit (billing/services/ratelimits.py, window_amount and too_large), corrected when it settles.
local likely_tokens = window_tokens - prompt + likely_prompt

-- Every window is checked: refused, the answer is one that no wait lets through (the request is larger than
-- the limit, or the limit is 0), else the one that frees last, so that a client coming back after its wait
-- does not find another window still full.
local scopes = {}
local refusal = nil
local function refuse(answer, retry, limit)
  if retry < 0 or limit <= 0 then
    retry = math.huge
  end
  if refusal == nil or retry > refusal.retry then
    refusal = {answer = answer, retry = retry}
  end
end
for j = 1, nr do
  local k = 3 * nb + 3 * (j - 1)
  local rq, tk, th = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local a = 15 + 3 * nb + 2 * (j - 1)
  local s = {rpm = tonumber(ARGV[a + 1]), tpm = tonumber(ARGV[a + 2]), rq = rq, tk = tk, th = th}
  local cutoff = now - window
  if s.rpm >= 0 then
    redis.call('ZREMRANGEBYSCORE', rq, '-inf', cutoff)
    s.used_requests = redis.call('ZCARD', rq)
    if s.used_requests + 1 > s.rpm then
      -- Room comes back when the entry that makes the window one too full leaves it.
      local retry = window
      local index = s.used_requests - s.rpm
      local entry = redis.call('ZRANGE', rq, index, index, 'WITHSCORES')
      if entry[2] then
        retry = tonumber(entry[2]) + window - now
      end
      refuse({'rate', j, 'requests', s.rpm, s.used_requests, 1, int(retry)}, retry, s.rpm)
    end
  end
  if s.tpm >= 0 then
    local old = redis.call('ZRANGEBYSCORE', tk, '-inf', cutoff)
    for _, r in ipairs(old) do
      local amount = redis.call('HGET', th, r)
      if amount then
        redis.call('HINCRBY', th, 'sum', int(-tonumber(amount)))
        redis.call('HDEL', th, r)
      end
    end
    if #old > 0 then
      redis.call('ZREMRANGEBYSCORE', tk, '-inf', cutoff)
    end
    s.used_tokens = tonumber(redis.call('HGET', th, 'sum') or '0')
    s.amount = math.min(window_tokens, s.tpm)
    if likely_tokens > s.tpm or s.tpm <= 0 then
      refuse({'rate', j, 'tokens', s.tpm, int(s.used_tokens), int(likely_tokens), '-1'}, -1, s.tpm)
    elseif s.used_tokens + s.amount > s.tpm then
      local retry = -1
      local excess = s.used_tokens + s.amount - s.tpm
      local entries = redis.call('ZRANGE', tk, 0, -1, 'WITHSCORES')
      local freed = 0
      for e = 1, #entries, 2 do
        freed = freed + tonumber(redis.call('HGET', th, entries[e]) or '0')
        if freed >= excess then
          retry = tonumber(entries[e + 1]) + window - now
          break
        end
      end
      refuse({'rate', j, 'tokens', s.tpm, int(s.used_tokens), int(s.amount), int(retry)}, retry, s.tpm)
    end
  end
  scopes[j] = s
end
-- The time until a window's oldest entry leaves it (0: empty).
local function reset_of(zset)
  local oldest = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if oldest[2] then
    return tonumber(oldest[2]) + window - now
  end
  return 0
end
if refusal then
  -- Every scope's windows as they are, the request not counted: a 429 tells both dimensions, as OpenAI's do.
  local answer = refusal.answer
  for _, s in ipairs(scopes) do
    if s.rpm >= 0 then
      answer[#answer + 1] = int(s.rpm)
      answer[#answer + 1] = int(s.rpm - s.used_requests)
      answer[#answer + 1] = int(reset_of(s.rq))
    else
      answer[#answer + 1] = '-1'
      answer[#answer + 1] = '-1'
      answer[#answer + 1] = '-1'
    end
    if s.tpm >= 0 then
      answer[#answer + 1] = int(s.tpm)
      answer[#answer + 1] = int(s.tpm - s.used_tokens)
      answer[#answer + 1] = int(reset_of(s.tk))
    else
      answer[#answer + 1] = '-1'
      answer[#answer + 1] = '-1'
      answer[#answer + 1] = '-1'
    end
  end
  return answer
end

for i, c in ipairs(counters) do
  local amount = tokens
  if c.metric == 'cost' then
    amount = cost
  end
  if c.spent + c.reserved + amount > c.limit then
    return {'quota', i, int(c.spent), int(c.reserved), int(amount)}
  end
end

for i, c in ipairs(counters) do
  local h, exp = KEYS[3 * i - 2], KEYS[3 * i - 1]
  local amount = tokens
  if c.metric == 'cost' then
    amount = cost
  end
  redis.call('HINCRBY', h, 'reserved', int(amount))
  redis.call('HSET', h, 'r:' .. rid, int(amount))
  redis.call('ZADD', exp, int(now + resv_ttl), rid)
  redis.call('PEXPIRE', h, int(c.ttl))
  redis.call('PEXPIRE', exp, int(c.ttl))
end

if ARGV[ax + 1] ~= '' then
  local record = cjson.decode(ARGV[ax + 1])
  record['cost'] = int(cost)
  record['tokens'] = int(tokens)
  record['max_tokens'] = int(max_tokens)
  redis.call('HSET', inflight, rid, cjson.encode(record))
  redis.call('SET', heartbeat, '1', 'PX', ARGV[ax + 3])
  redis.call('SADD', instances, ARGV[ax + 4])
end

local result = {'ok', int(max_tokens), int(cost), int(tokens)}
for _, s in ipairs(scopes) do
  if s.rpm >= 0 then
    redis.call('ZADD', s.rq, int(now), rid)
    redis.call('PEXPIRE', s.rq, int(window + 1000))
    local oldest = redis.call('ZRANGE', s.rq, 0, 0, 'WITHSCORES')
    result[#result + 1] = int(s.rpm)
    result[#result + 1] = int(s.rpm - s.used_requests - 1)
    result[#result + 1] = int(tonumber(oldest[2]) + window - now)
  else
    result[#result + 1] = '-1'
    result[#result + 1] = '-1'
    result[#result + 1] = '-1'
  end
  if s.tpm >= 0 then
    redis.call('ZADD', s.tk, int(now), rid)
    redis.call('HSET', s.th, rid, int(s.amount))
    redis.call('HINCRBY', s.th, 'sum', int(s.amount))
    redis.call('PEXPIRE', s.tk, int(window + 1000))
    redis.call('PEXPIRE', s.th, int(window + 1000))
    local oldest = redis.call('ZRANGE', s.tk, 0, 0, 'WITHSCORES')
    result[#result + 1] = int(s.tpm)
    result[#result + 1] = int(s.tpm - s.used_tokens - s.amount)
    result[#result + 1] = int(tonumber(oldest[2]) + window - now)
  else
    result[#result + 1] = '-1'
    result[#result + 1] = '-1'
    result[#result + 1] = '-1'
  end
end
-- One string, not an array: the client reads an array element by element, which cost more than the rest
-- of its work on this reply (billing/services/counters.py splits it).
local reply = table.concat(result, ' ')
redis.call('SET', marker, reply, 'PX', 60000)
return reply
