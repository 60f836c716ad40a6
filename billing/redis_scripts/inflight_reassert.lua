-- Put back one request this live process still holds, after Redis lost it: its record and its
-- reservation on every budget counter. A counter Redis lost is left without 'spent', so that admission
-- rebuilds it (from the ledger and the settles it remembers) once every process has re-asserted.
-- Does nothing for a request that settled meanwhile (s:<rid> on a counter), or that is there already.
--
-- KEYS: [in-flight hash of the process], then for each budget counter i: [hash, expiry zset]
-- ARGV: request_id, record (JSON), now_ms, reservation_ttl_ms, n_counters, then per counter: amount, key_ttl_ms
-- Returns 1 if the request was re-asserted, 0 if it had settled.
local rid = ARGV[1]
local nb = tonumber(ARGV[5])
for i = 1, nb do
  if redis.call('HEXISTS', KEYS[2 * i], 's:' .. rid) == 1 then
    return 0
  end
end
redis.call('HSETNX', KEYS[1], rid, ARGV[2])
local expires = string.format('%.0f', tonumber(ARGV[3]) + tonumber(ARGV[4]))
for i = 1, nb do
  local h, exp = KEYS[2 * i], KEYS[2 * i + 1]
  local amount, ttl = ARGV[5 + 2 * i - 1], ARGV[5 + 2 * i]
  if redis.call('HSETNX', h, 'r:' .. rid, amount) == 1 then
    redis.call('HINCRBY', h, 'reserved', amount)
    redis.call('ZADD', exp, expires, rid)
  end
  redis.call('PEXPIRE', h, ttl)
  redis.call('PEXPIRE', exp, ttl)
end
return 1
