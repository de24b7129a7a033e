-- Compare-and-swap of one entry, atomic on the server.
-- KEYS[1]: the entry (a hash with fields `value` and `version`).
-- KEYS[2]: the counter that hands out versions (same hash slot as the entry on a cluster).
-- ARGV[1]: the expected version ('' = the entry must be absent).
-- ARGV[2]: the new value.  ARGV[3]: the TTL in milliseconds ('' = no expiry).
-- Returns the new version, or false on a conflict.
local current = redis.call('HGET', KEYS[1], 'version')
if ARGV[1] == '' then
  if current then return false end
elseif current ~= ARGV[1] then
  return false
end
local version = redis.call('INCR', KEYS[2])
if version == 1 then
  -- The counter was lost (restart without persistence, flush): reseed it from the
  -- server's clock in microseconds, above every version issued before the loss.
  local now = redis.call('TIME')
  version = tonumber(now[1]) * 1000000 + tonumber(now[2])
  redis.call('SET', KEYS[2], string.format('%d', version))
end
redis.call('HSET', KEYS[1], 'value', ARGV[2], 'version', string.format('%d', version))
if ARGV[3] == '' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return version
