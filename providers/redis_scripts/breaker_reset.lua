-- Closed, with no failures, an empty window and the base cooldown (an admin, a passing health check).
close()
return reply(1, 1)
