-- Move a counter's spend by the difference reconciliation found against the ledger.
-- KEYS: [hash]; ARGV: delta. Returns the new spend, or false when the counter is gone.
if redis.call('HEXISTS', KEYS[1], 'spent') == 0 then
  return false
end
return redis.call('HINCRBY', KEYS[1], 'spent', ARGV[1])
