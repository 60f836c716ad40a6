-- Put back one request this live process settled, whose ledger row is not written yet, after Redis lost
-- it: its settled record (with the row, for the sweep if the process dies before the commit), and on
-- every budget counter Redis lost (no 'spent' yet) the settle it remembers (s:<rid>), which the counter's
-- rebuild counts while the row is on its way to the ledger, as it would have before the restart. A counter
-- that has its 'spent' is left alone: it never lost the settle, or it was rebuilt already (reconciliation
-- then corrects it from the ledger).
--
-- KEYS: [in-flight hash of the process], then for each budget counter i: [hash, settled zset]
-- ARGV: request_id, settled record (JSON), now_ms, n_counters, then per counter: spent (its units), key_ttl_ms
-- Returns 1.
local rid = ARGV[1]
local nb = tonumber(ARGV[4])
redis.call('HSETNX', KEYS[1], rid, ARGV[2])
for i = 1, nb do
  local h, settled = KEYS[2 * i], KEYS[2 * i + 1]
  local spent, ttl = ARGV[4 + 2 * i - 1], ARGV[4 + 2 * i]
  if redis.call('HEXISTS', h, 'spent') == 0 then
    if redis.call('HSETNX', h, 's:' .. rid, spent) == 1 then
      redis.call('ZADD', settled, ARGV[3], rid)
    end
    redis.call('PEXPIRE', h, ttl)
    redis.call('PEXPIRE', settled, ttl)
  end
end
return 1
