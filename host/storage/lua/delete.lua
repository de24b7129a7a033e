-- Delete one entry if its version matches, atomic on the server.
-- KEYS[1]: the entry.  ARGV[1]: the expected version ('' = any).
-- Returns 1 deleted, 0 absent, -1 conflict.
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return 0 end
if ARGV[1] ~= '' and current ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
return 1
