-- The half-open probe: the first caller after the cooldown wins it (won = 1) and holds it for cfg.lease ms
-- (its outcome closes or re-opens the breaker; if none comes, the next caller after the lease wins).
-- A closed breaker lets everyone through (won = 1, nothing changes).
if b.state ~= 'open' then
  return reply(0, 1)
end
if now < b.opened_until or now < b.probe_until then
  return reply(0, 0)
end
b.probe_until = now + cfg.lease
return reply(1, 1)
