-- Every open breaker, for a process that re-reads them all (at start, then every few seconds, in case it
-- missed a change message). KEYS: [index of open breakers, version counter, epoch]; ARGV: breaker key prefix.
-- Returns {epoch, version counter, then per open breaker: id, state, failures, opened_until, cooldown,
-- probe_until, v}; a breaker whose hash expired leaves the index. The epoch (breaker_epoch.lua): a process
-- that knew another one knows that Redis lost what it held.
local epoch = breaker_epoch(KEYS[3])
local out = {epoch, redis.call('GET', KEYS[2]) or '0'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = redis.call('HMGET', ARGV[1] .. id, 'state', 'failures', 'opened_until', 'cooldown', 'probe_until', 'v')
  if f[1] == 'open' then
    table.insert(out, id)
    for i = 1, 6 do
      table.insert(out, f[i] or '0')
    end
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
