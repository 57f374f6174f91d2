-- Compare-and-set of one session's durable state on its step number. Atomic: Redis runs a
-- script alone, and the single key keeps it inside one Cluster slot.
--
-- KEYS[1]  state hash key, fields "step" (newest checkpoint), "blob" (the full checkpoint),
--          "full" (its step), "delta" (changes since it, at "step"; absent when step = full)
-- ARGV[1]  incoming step: decimal digits, no leading zeros, 0 .. 2^63-1
-- ARGV[2]  blob (binary-safe): a full checkpoint, or a delta when ARGV[5] is set
-- ARGV[3]  sliding TTL in milliseconds, "0" = no expiry
-- ARGV[4]  the writer's owner epoch (decimal), or "" for no epoch check
-- ARGV[5]  "" for a full checkpoint; else the step of the full checkpoint the delta applies to
--
-- Returns {1, step} when written, {0, stored_step} when refused (stored step >= incoming),
-- {2, step} when refused because this very step is stored under the writer's own epoch (its own
-- earlier write: a command the client retried after a timeout although Redis had executed it),
-- {-2, stored_full} when a delta's full checkpoint is not the stored one (or none is stored:
-- a delta never brings back a closed session), {-1, stored_epoch} when fenced (another replica
-- claimed the session: a newer epoch).
-- A refused put still refreshes the TTL: the session is alive, only this writer is stale.

-- Steps are compared as digit strings (length first, then bytes) rather than with tonumber:
-- Lua numbers are doubles and would confuse steps above 2^53.
local function step_lt(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end

local ttl = tonumber(ARGV[3])
local epoch = false
if ARGV[4] ~= '' then
  epoch = redis.call('HGET', KEYS[1], 'epoch')
  if epoch and epoch ~= ARGV[4] then
    return {-1, epoch}
  end
end
local stored = redis.call('HGET', KEYS[1], 'step')
if stored and not step_lt(stored, ARGV[1]) then
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  if epoch and stored == ARGV[1] then
    return {2, stored}
  end
  return {0, stored}
end
if ARGV[5] ~= '' then
  local full = redis.call('HGET', KEYS[1], 'full')
  if not stored or not full or full ~= ARGV[5] then
    return {-2, full or ''}
  end
  redis.call('HSET', KEYS[1], 'step', ARGV[1], 'delta', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'step', ARGV[1], 'blob', ARGV[2], 'full', ARGV[1])
  redis.call('HDEL', KEYS[1], 'delta')
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
return {1, ARGV[1]}
