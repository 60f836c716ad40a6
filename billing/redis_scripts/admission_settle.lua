-- Settle one request: release its reservation, add what it really cost, and correct its entry in
-- the tokens-per-minute windows. Idempotent for as long as the settled entry is remembered.
--
-- Removes the request's in-flight record, or, given a settled record (its ledger row, on its way to the
-- database), replaces it with that: the record then goes when the row is written, and a process killed
-- before has its row written by the lost-request sweep. A counter Redis lost (no 'spent' yet) still
-- remembers the settle (s:<rid>), so that the counter's rebuild counts it while its ledger row is on its way.
--
-- KEYS, for each budget counter i: [hash, expiry zset, settled zset]; then for each rate scope j:
--       [tokens zset, token amounts hash]; then the in-flight hash of the process that admitted it
-- ARGV: request_id, now_ms, n_counters, n_rate_scopes, cost, tokens, settled_memory_ms,
--       then per counter: metric, key_ttl_ms; then, optionally, the settled record
-- Returns 'ok', then per counter ' <spent before> <spent after>' ('-1' when the counter is gone), one string;
-- or {'duplicate'}.
local rid = ARGV[1]
local now = tonumber(ARGV[2])
local nb = tonumber(ARGV[3])
local nr = tonumber(ARGV[4])
local cost = ARGV[5]
local tokens = ARGV[6]
local memory = tonumber(ARGV[7])

local function int(x)
  return string.format('%.0f', x)
end

local settled_record = ARGV[8 + 2 * nb]
if settled_record then
  redis.call('HSET', KEYS[3 * nb + 2 * nr + 1], rid, settled_record)
else
  redis.call('HDEL', KEYS[3 * nb + 2 * nr + 1], rid)
end
for i = 1, nb do
  if redis.call('HEXISTS', KEYS[3 * i - 2], 's:' .. rid) == 1 then
    return {'duplicate'}
  end
end

local result = {'ok'}
for i = 1, nb do
  local h, exp, settled = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local metric = ARGV[7 + 2 * (i - 1) + 1]
  local ttl = ARGV[7 + 2 * (i - 1) + 2]
  local amount = redis.call('HGET', h, 'r:' .. rid)
  if amount then
    redis.call('HINCRBY', h, 'reserved', int(-tonumber(amount)))
    redis.call('HDEL', h, 'r:' .. rid)
    redis.call('ZREM', exp, rid)
  end
  local actual = tokens
  if metric == 'cost' then
    actual = cost
  end
  local before = redis.call('HGET', h, 'spent')
  -- Remembered for a while so that reconciliation (and a rebuild) can count a settle whose ledger row is
  -- not written yet.
  redis.call('HSET', h, 's:' .. rid, actual)
  redis.call('ZADD', settled, int(now), rid)
  local forgotten = redis.call('ZRANGEBYSCORE', settled, '-inf', int(now - memory))
  for _, r in ipairs(forgotten) do
    redis.call('HDEL', h, 's:' .. r)
  end
  if #forgotten > 0 then
    redis.call('ZREMRANGEBYSCORE', settled, '-inf', int(now - memory))
  end
  redis.call('PEXPIRE', settled, ttl)
  redis.call('PEXPIRE', h, ttl)
  if before then
    local after = redis.call('HINCRBY', h, 'spent', actual)
    result[#result + 1] = before
    result[#result + 1] = int(after)
  else
    result[#result + 1] = '-1'
    result[#result + 1] = '-1'
  end
end

for j = 1, nr do
  local tk, th = KEYS[3 * nb + 2 * j - 1], KEYS[3 * nb + 2 * j]
  local reserved = redis.call('HGET', th, rid)
  if reserved then
    redis.call('HINCRBY', th, 'sum', int(tonumber(tokens) - tonumber(reserved)))
    redis.call('HSET', th, rid, tokens)
  end
end
-- One string, as admission_acquire.lua's answer, for the same reason.
return table.concat(result, ' ')
