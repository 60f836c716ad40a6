-- Open now, whatever the counts say (an admin, a failing health check): a closed breaker opens for the base
-- cooldown; a half-open one re-opens for twice its cooldown, as after a failed probe; an open one stays as it is.
if b.state ~= 'open' then
  open_for(cfg.base)
  return reply(1, 0)
end
if now < b.opened_until then
  return reply(0, 0)
end
open_for(math.min(b.cooldown * 2, cfg.max))
return reply(1, 0)
