"""The Lua scripts of ``RedisStore``: each runs atomically on the server.

Key and argument layouts are documented at the call sites in ``redis``. The
scripts hold no policy of their own: which statuses are terminal or live, what
an interrupted job's last entry says and which entries a commit appends are
decided in Python (``protocol.lifecycle``, ``stores.shared``) and passed in; a
script only checks that the job is still where Python saw it (its ``seq``, its
owner) and applies the change. Key names come from ``RedisKeyspace``.
"""

__all__ = ["CLAIM", "COMMIT", "CREATE", "HANDOVER", "NOTIFY", "RENEW"]

CREATE = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
if ARGV[3] ~= '' then
  if redis.call('ZCOUNT', KEYS[5], ARGV[3], '+inf') >= tonumber(ARGV[4]) then return '!server' end
  if redis.call('ZCOUNT', KEYS[6], ARGV[3], '+inf') >= tonumber(ARGV[5]) then return '!user' end
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
  redis.call('ZADD', KEYS[6], ARGV[6], ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return ''
"""

# KEYS: job, log, msg, expiry, running, user running, outbox, outbox due, outbox claims,
# the owner's outbox claims.
# Returns {0} if the job is gone, {3} if it has ended already (ARGV[9]: a JSON list of
# the terminal statuses) or is held by another owner than ARGV[10] (a writer whose job
# another instance took over is fenced off), {2, stored_seq} if its seq is not ARGV[2]
# (nothing changed: the caller plans again from stored_seq), {1} when applied. Python
# planned the entries (only new ones) and the progress (never behind the log) against
# ARGV[2]. A terminal commit (ARGV[5]) also writes its outbox entry (ARGV[11]), claimed by
# the writer's instance (ARGV[12], if any) until ARGV[13].
COMMIT = """
local seq = redis.call('HGET', KEYS[1], 'seq')
if not seq then return {0} end
local ended = {}
for _, status in ipairs(cjson.decode(ARGV[9])) do ended[cjson.encode(status)] = true end
if ended[redis.call('HGET', KEYS[1], 'status')] then return {3} end
if ARGV[10] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[10] then return {3} end
if tonumber(seq) ~= tonumber(ARGV[2]) then return {2, tonumber(seq)} end
if ARGV[4] ~= '' then redis.call('XADD', KEYS[2], ARGV[3] .. '-0', 'e', ARGV[4]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 14))
if ARGV[5] == '1' then
  local ttl = tonumber(ARGV[6])
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
  redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('HSET', KEYS[7], ARGV[1], ARGV[11])
  redis.call('ZADD', KEYS[8], ARGV[13], ARGV[1])
  if ARGV[12] ~= '' then
    redis.call('HSET', KEYS[9], ARGV[1], ARGV[12])
    redis.call('SADD', KEYS[10], ARGV[1])
    redis.call('PEXPIRE', KEYS[10], ARGV[6])
  end
end
redis.call('PUBLISH', ARGV[8], ARGV[1] .. ' ' .. ARGV[3])
return {1}
"""

# KEYS: job, running, user running. ARGV: job id, now, a JSON list of the live statuses
# (as stored: JSON strings), the new owner (JSON), its lease. Hands a live job whose lease
# lapsed to the new owner (epoch + 1) and returns the new epoch; 0 otherwise (no longer
# live, or its lease still holds).
HANDOVER = """
local live = {}
for _, status in ipairs(cjson.decode(ARGV[3])) do live[cjson.encode(status)] = true end
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not live[status] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
local lease = redis.call('HGET', KEYS[1], 'lease_until')
if lease and lease ~= 'null' and tonumber(lease) > tonumber(ARGV[2]) then return 0 end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch')) + 1
redis.call('HSET', KEYS[1], 'owner', ARGV[4], 'lease_until', ARGV[5], 'epoch', tostring(epoch))
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return epoch
"""

# KEYS[1] is the running set; then, per job, its record and its user's running set. ARGV:
# the lease's end, the owner (JSON), then the job ids. Only the owner's leases are renewed.
RENEW = """
for i = 2, #KEYS, 2 do
  if redis.call('HGET', KEYS[i], 'owner') == ARGV[2] then
    local job_id = ARGV[i / 2 + 2]
    redis.call('HSET', KEYS[i], 'lease_until', ARGV[1])
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], job_id)
    redis.call('ZADD', KEYS[i + 1], 'XX', ARGV[1], job_id)
  end
end
return 1
"""

# KEYS: outbox, outbox due, outbox claims, the owner's outbox claims. ARGV: now, the claim's
# end, limit, owner, how long the owner's set outlives its last claim (ms: a dead
# instance's set goes by itself). Claims the owner's entries first, then those whose claim lapsed by
# now, and returns them (their JSON).
CLAIM = """
local out, taken = {}, {}
local function take(id)
  taken[id] = true
  local entry = redis.call('HGET', KEYS[1], id)
  if not entry then
    redis.call('ZREM', KEYS[2], id)
    redis.call('SREM', KEYS[4], id)
    return
  end
  redis.call('ZADD', KEYS[2], ARGV[2], id)
  redis.call('HSET', KEYS[3], id, ARGV[4])
  redis.call('SADD', KEYS[4], id)
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
  table.insert(out, entry)
end
local limit = tonumber(ARGV[3])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if #out >= limit then break end
  if redis.call('HGET', KEYS[3], id) == ARGV[4] then take(id) else redis.call('SREM', KEYS[4], id) end
end
if #out < limit then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, limit)) do
    if #out >= limit then break end
    if not taken[id] then take(id) end
  end
end
return out
"""

NOTIFY = """
if redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf') > 0 then return 0 end
if ARGV[9] == '1' and redis.call('EXISTS', KEYS[6]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then return 0 end
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[8]) then return 0 end
redis.call('HSET', KEYS[4], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4])
local extra = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[6])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[5], 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, extra - 1)
  redis.call('HDEL', KEYS[4], unpack(old))
end
redis.call('PUBLISH', ARGV[7], ARGV[3])
return 1
"""
