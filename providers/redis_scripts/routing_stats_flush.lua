-- One process's exchange of routing statistics (providers/routing/stats.py, stats_flush): what it sends
-- is applied, and every process's view comes back, in one round trip every ~250 ms.
--
-- KEYS[1] set of instance names that reported requests in flight
-- KEYS[2] this instance's hash of requests in flight (deployment id -> count), expiring BUSY_TTL after the
--         last exchange so that a dead process stops counting
-- KEYS[3] this minute's hash of counts ("r:<id>" requests, "t:<id>" tokens) for the rpm/tpm caps
-- KEYS[4] hash of latency averages ("l:<id>" whole call, "f:<id>" time to first token), seconds
-- KEYS[5] the last batch number of this instance applied: a flush retried after a lost reply (the client
--         sends a command again on a fresh connection) adds its counts and samples once
-- ARGV: instance, busy key prefix, busy ttl ms, minute ttl ms, averages ttl ms, alpha, batch number,
--       n busy, (id, count) * n, n counts, (id, requests, tokens) * n, n samples, (id, kind, n, mean) * n
-- Other instances' busy hashes are read by name (prefix .. instance): a single Redis, not a cluster.
-- Returns {busy of the other instances (id, sum)...}, {this minute's hash}, {the averages hash}.

local instance = ARGV[1]
local busy_prefix = ARGV[2]
local busy_ttl = tonumber(ARGV[3])
local minute_ttl = tonumber(ARGV[4])
local averages_ttl = tonumber(ARGV[5])
local alpha = tonumber(ARGV[6])
local batch = tonumber(ARGV[7])
local i = 8

local fresh = batch > tonumber(redis.call('GET', KEYS[5]) or '-1')
if fresh then redis.call('SET', KEYS[5], ARGV[7], 'PX', minute_ttl) end

local n_busy = tonumber(ARGV[i])
i = i + 1
redis.call('DEL', KEYS[2])
if n_busy > 0 then
  for _ = 1, n_busy do
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  redis.call('PEXPIRE', KEYS[2], busy_ttl)
  redis.call('SADD', KEYS[1], instance)
end

local n_counts = tonumber(ARGV[i])
i = i + 1
for _ = 1, n_counts do
  if fresh then
    local requests = tonumber(ARGV[i + 1])
    local tokens = tonumber(ARGV[i + 2])
    if requests ~= 0 then redis.call('HINCRBY', KEYS[3], 'r:' .. ARGV[i], requests) end
    if tokens ~= 0 then redis.call('HINCRBY', KEYS[3], 't:' .. ARGV[i], tokens) end
  end
  i = i + 3
end
if n_counts > 0 then redis.call('PEXPIRE', KEYS[3], minute_ttl) end

local n_samples = tonumber(ARGV[i])
i = i + 1
for _ = 1, n_samples do
  if fresh then
    local field = ARGV[i + 1] .. ':' .. ARGV[i]
    local n = tonumber(ARGV[i + 2])
    local mean = tonumber(ARGV[i + 3])
    local old = tonumber(redis.call('HGET', KEYS[4], field))
    local new = mean
    if old then new = old + (1 - (1 - alpha) ^ n) * (mean - old) end
    redis.call('HSET', KEYS[4], field, string.format('%.17g', new))
  end
  i = i + 4
end
if n_samples > 0 then redis.call('PEXPIRE', KEYS[4], averages_ttl) end

local sums = {}
local order = {}
for _, other in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if other ~= instance then
    local flat = redis.call('HGETALL', busy_prefix .. other)
    if #flat == 0 then
      redis.call('SREM', KEYS[1], other)  -- expired (its process died) or nothing in flight any more
    end
    for j = 1, #flat, 2 do
      local id = flat[j]
      if sums[id] == nil then
        sums[id] = 0
        order[#order + 1] = id
      end
      sums[id] = sums[id] + tonumber(flat[j + 1])
    end
  end
end
local busy = {}
for _, id in ipairs(order) do
  busy[#busy + 1] = id
  busy[#busy + 1] = tostring(sums[id])
end

return {busy, redis.call('HGETALL', KEYS[3]), redis.call('HGETALL', KEYS[4])}
