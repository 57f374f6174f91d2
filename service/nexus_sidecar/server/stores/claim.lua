-- Claim ownership of one session: a new owner epoch, returned with the stored state.
--
-- KEYS[1]  state hash key (fields "step", "blob", "full", "delta", "epoch"; see cas.lua)
-- ARGV[1]  "claim": epoch + 1 and return {epoch, step, blob, delta} (false when absent)
--          "close": epoch + 1 and drop the state; the hash is the tombstone: every writer
--          holding an older epoch is fenced, so no stale checkpoint can resurrect the session
-- ARGV[2]  sliding TTL in milliseconds, "0" = no expiry
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if ARGV[1] == 'close' then
  redis.call('HDEL', KEYS[1], 'step', 'blob', 'full', 'delta')
  return {epoch, false, false, false}
end
local v = redis.call('HMGET', KEYS[1], 'step', 'blob', 'delta')
return {epoch, v[1], v[2], v[3]}
