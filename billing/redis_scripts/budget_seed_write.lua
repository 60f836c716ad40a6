-- Start a counter at the spend its rebuild computed, unless another process did first, or a request
-- settled on it since the rebuild read it (then the rebuild reads again).
-- KEYS: [hash, settled zset, counters index]; ARGV: spent, key_ttl_ms, the settled ids the rebuild saw...
-- Returns 'ok', 'exists' or 'changed'.
local h, settled = KEYS[1], KEYS[2]
if redis.call('HEXISTS', h, 'spent') == 1 then
  return 'exists'
end
if redis.call('ZCARD', settled) ~= #ARGV - 2 then
  return 'changed'
end
for i = 3, #ARGV do
  if not redis.call('ZSCORE', settled, ARGV[i]) then
    return 'changed'
  end
end
redis.call('HSET', h, 'spent', ARGV[1])
redis.call('HSETNX', h, 'reserved', 0)
redis.call('PEXPIRE', h, ARGV[2])
redis.call('SADD', KEYS[3], h)
return 'ok'
