-- Loaded in front of every breaker script. The epoch of the breakers' data in this Redis: set by the first
-- script that finds none (Redis started empty, or lost what it held), so that a process that knew another
-- epoch knows that the data it read is gone (breaker_snapshot.lua), and a change message of that data,
-- which carries its epoch (breaker_common.lua), is not taken for news about the data Redis holds now.
local function breaker_epoch(key)
  local epoch = redis.call('GET', key)
  if not epoch then
    local t = redis.call('TIME')
    epoch = t[1] .. '.' .. t[2]
    redis.call('SET', key, epoch)
  end
  return epoch
end
