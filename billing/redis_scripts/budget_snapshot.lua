-- Read one budget counter for reconciliation, after expiring its stale reservations and forgetting
-- settles older than the memory window.
-- KEYS: [hash, expiry zset, settled zset]; ARGV: now_ms, settled_memory_ms
-- Returns {'missing'} or {'ok', spent, reserved, {open request ids}, {settled request ids}, {their amounts}}.
local h, exp, settled = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
if redis.call('HEXISTS', h, 'spent') == 0 then
  return {'missing'}
end
local stale = redis.call('ZRANGEBYSCORE', exp, '-inf', now)
for _, r in ipairs(stale) do
  local amount = redis.call('HGET', h, 'r:' .. r)
  if amount then
    redis.call('HINCRBY', h, 'reserved', string.format('%.0f', -tonumber(amount)))
    redis.call('HDEL', h, 'r:' .. r)
  end
end
if #stale > 0 then
  redis.call('ZREMRANGEBYSCORE', exp, '-inf', now)
end
local forgotten = redis.call('ZRANGEBYSCORE', settled, '-inf', now - tonumber(ARGV[2]))
for _, r in ipairs(forgotten) do
  redis.call('HDEL', h, 's:' .. r)
end
if #forgotten > 0 then
  redis.call('ZREMRANGEBYSCORE', settled, '-inf', now - tonumber(ARGV[2]))
end
local open = redis.call('ZRANGE', exp, 0, -1)
local settled_ids = redis.call('ZRANGE', settled, 0, -1)
local amounts = {}
for i, r in ipairs(settled_ids) do
  amounts[i] = redis.call('HGET', h, 's:' .. r) or '0'
end
local values = redis.call('HMGET', h, 'spent', 'reserved')
return {'ok', values[1], values[2] or '0', open, settled_ids, amounts}
