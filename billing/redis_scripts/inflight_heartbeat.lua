-- A process holding in-flight records says it is alive, and learns which Redis epoch it talks to: an
-- epoch it has not seen yet means Redis lost its data, and the process re-asserts its records.
-- KEYS: [heartbeat key of the process, instances set, epoch key]; ARGV: instance id, heartbeat_ttl_ms
-- Returns the epoch (Redis's clock in ms when it was set; set now if Redis has none).
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  local t = redis.call('TIME')
  epoch = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('SET', KEYS[3], epoch)
end
return epoch
