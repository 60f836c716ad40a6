-- A probe that ended saying nothing about the deployment (the client left, its own input was refused) frees
-- its claim at once rather than at the end of its lease: the next caller probes. Only the claim it made:
-- ARGV[12] is the probe_until its claim set (a later claim is another caller's, and stays).
local token = tonumber(ARGV[12])
if b.state == 'open' and b.probe_until > 0 and b.probe_until == token then
  b.probe_until = 0
  return reply(1, 0)
end
return reply(0, 0)
