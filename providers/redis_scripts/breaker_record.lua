-- Outcomes of calls to one deployment, in the order they ended, summed up by the process that saw them:
-- ARGV[12] calls that succeeded, ARGV[13] calls that failed, ARGV[14] failures after the last success.
-- Closed: they join the window; the breaker opens after cfg.failures consecutive failures, or when more than
-- cfg.rate % of at least cfg.volume calls in the window failed. Open: ignored until the cooldown is over.
-- Half-open (open, cooldown over): the last outcome decides: a failure re-opens for twice the cooldown
-- (at most cfg.max), a success closes (and the cooldown is back to its base).
local ok, failed, tail = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])

if b.state == 'open' then
  if now < b.opened_until then
    return reply(0, 0)
  end
  if tail > 0 then
    open_for(math.min(b.cooldown * 2, cfg.max))
    return reply(1, 0)
  end
  if ok > 0 then
    close()
    return reply(1, 0)
  end
  return reply(0, 0)
end

window_add(ok, failed)
if ok > 0 then
  b.failures = tail
else
  b.failures = b.failures + failed
end
local calls, bad = window_counts()
if b.failures >= cfg.failures or (calls >= cfg.volume and bad * 100 > cfg.rate * calls) then
  open_for(cfg.base)
  return reply(1, 0)
end
return reply(0, 0)
