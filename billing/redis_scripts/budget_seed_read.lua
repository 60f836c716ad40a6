-- What a counter's rebuild needs besides the ledger: the requests still holding a reservation on it
-- (re-asserted after Redis lost it) and the settles it remembers.
-- KEYS: [hash, expiry zset, settled zset]
-- Returns {'exists'} when the counter has its 'spent' already, else {'ok', {open ids}, {settled ids}, {amounts}}.
local h, exp, settled = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HEXISTS', h, 'spent') == 1 then
  return {'exists'}
end
local open = redis.call('ZRANGE', exp, 0, -1)
local settled_ids = redis.call('ZRANGE', settled, 0, -1)
local amounts = {}
for i, r in ipairs(settled_ids) do
  amounts[i] = redis.call('HGET', h, 's:' .. r) or '0'
end
return {'ok', open, settled_ids, amounts}
