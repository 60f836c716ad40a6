-- Shared head of every breaker transition (breaker_record, breaker_claim, breaker_release, breaker_trip,
-- breaker_reset): loaded in front of each of them, so that each transition is still one atomic script.
-- The Python twin is providers/routing/breaker_machine.py (Machine): change both together.
--
-- KEYS: [breaker hash, index of open breakers, version counter, epoch of the data (breaker_epoch.lua)]
-- ARGV: deployment id, now (ms since the epoch), failures to open, error rate (%), window (ms),
--       minimum volume, base cooldown (ms), max cooldown (ms), probe lease (ms), window buckets,
--       change channel, then the transition's own arguments from ARGV[12].
--
-- The hash: state ('open', or absent: closed), failures (consecutive), opened_until, cooldown and
-- probe_until (ms), v (the version of its last change), and the window's buckets o:<n> / f:<n> (calls
-- that succeeded / failed in bucket n). A closed breaker with no failures and no window has no hash.
local key, index, version_key = KEYS[1], KEYS[2], KEYS[3]
local id = ARGV[1]
local now = tonumber(ARGV[2])
local cfg = {
  failures = tonumber(ARGV[3]),
  rate = tonumber(ARGV[4]),
  window = tonumber(ARGV[5]),
  volume = tonumber(ARGV[6]),
  base = tonumber(ARGV[7]),
  max = tonumber(ARGV[8]),
  lease = tonumber(ARGV[9]),
  buckets = tonumber(ARGV[10]),
}
local channel = ARGV[11]

local fields = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do
  fields[raw[i]] = raw[i + 1]
end
local b = {
  state = fields.state or 'closed',
  failures = tonumber(fields.failures) or 0,
  opened_until = tonumber(fields.opened_until) or 0,
  cooldown = tonumber(fields.cooldown) or cfg.base,
  probe_until = tonumber(fields.probe_until) or 0,
  v = tonumber(fields.v) or 0,
}

local function fmt(x)
  return string.format('%.0f', x)
end

local function bucket_ms()
  return math.max(1, math.floor(cfg.window / cfg.buckets))
end

local function clear_window()
  for name, _ in pairs(fields) do
    if string.match(name, '^[of]:') then
      redis.call('HDEL', key, name)
      fields[name] = nil
    end
  end
end

-- Calls and failures in the window (the current bucket and the buckets - 1 before it); older buckets go.
local function window_counts()
  local current = math.floor(now / bucket_ms())
  local calls, failed = 0, 0
  for name, value in pairs(fields) do
    local kind, n = string.match(name, '^([of]):(%d+)$')
    if kind then
      if tonumber(n) <= current - cfg.buckets then
        redis.call('HDEL', key, name)
        fields[name] = nil
      else
        calls = calls + tonumber(value)
        if kind == 'f' then
          failed = failed + tonumber(value)
        end
      end
    end
  end
  return calls, failed
end

local function window_add(ok, failed)
  local current = math.floor(now / bucket_ms())
  if ok > 0 then
    fields['o:' .. current] = redis.call('HINCRBY', key, 'o:' .. current, ok)
  end
  if failed > 0 then
    fields['f:' .. current] = redis.call('HINCRBY', key, 'f:' .. current, failed)
  end
end

local function open_for(ms)
  b.state = 'open'
  b.cooldown = ms
  b.opened_until = now + ms
  b.probe_until = 0
  clear_window()
  redis.call('SADD', index, id)
end

local function close()
  b.state = 'closed'
  b.failures = 0
  b.opened_until = 0
  b.cooldown = cfg.base
  b.probe_until = 0
  fields = {}
  redis.call('DEL', key)
  redis.call('SREM', index, id)
end

local function save()
  if b.state == 'closed' and b.failures == 0 and next(fields) == nil then
    return
  end
  redis.call('HSET', key, 'state', b.state, 'failures', b.failures, 'opened_until', fmt(b.opened_until),
    'cooldown', fmt(b.cooldown), 'probe_until', fmt(b.probe_until), 'v', fmt(b.v))
  redis.call('PEXPIRE', key, fmt(cfg.window + 2 * cfg.max + cfg.lease))
end

-- The transition's answer: {changed, won, state, failures, opened_until, cooldown, probe_until, version}.
-- A change gets the next version and is published for every process's local view, with the epoch of the
-- data it changed: read after Redis lost that data, the message is of a version counter that is gone.
local function reply(changed, won)
  if changed == 1 then
    b.v = redis.call('INCR', version_key)
  end
  save()
  local view = {id, b.state, b.failures, fmt(b.opened_until), fmt(b.cooldown), fmt(b.probe_until), fmt(b.v)}
  if changed == 1 then
    table.insert(view, breaker_epoch(KEYS[4]))
    redis.call('PUBLISH', channel, table.concat(view, ' '))
  end
  return {changed, won, b.state, b.failures, fmt(b.opened_until), fmt(b.cooldown), fmt(b.probe_until), fmt(b.v)}
end
