"""The Lua scripts of ``RedisStore``: each runs atomically on the server.

Key and argument layouts are documented at the call sites in ``redis``. The
scripts hold no policy of their own: which statuses are terminal or live, what
an interrupted job's last entry says and which entries a commit appends are
decided in Python (``protocol.lifecycle``, ``stores.shared``) and passed in; a
script only checks that the job is still where Python saw it (its ``seq``) and
applies the change.
"""

__all__ = ["COMMIT", "CREATE", "NOTIFY", "RECOVER", "RENEW"]

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

# Returns {0} if the job is gone, {2, stored_seq} if its seq is not ARGV[2] (nothing
# changed: the caller plans again from stored_seq), {1} when applied. Python planned the
# entries (only new ones) and the progress (never behind the log) against ARGV[2].
COMMIT = """
local seq = redis.call('HGET', KEYS[1], 'seq')
if not seq then return {0} end
if tonumber(seq) ~= tonumber(ARGV[2]) then return {2, tonumber(seq)} end
if ARGV[4] ~= '' then redis.call('XADD', KEYS[2], ARGV[3] .. '-0', 'e', ARGV[4]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
if ARGV[5] == '1' then
  local ttl = tonumber(ARGV[6])
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
  redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
end
redis.call('PUBLISH', ARGV[8], ARGV[1] .. ' ' .. ARGV[3])
return {1}
"""

# ARGV[6] is a JSON list of the live statuses (as stored: JSON strings). Returns 1 when
# this call ended the job, 0 otherwise (no longer live, lease still held, or it moved on
# since Python read it).
RECOVER = """
local live = {}
for _, status in ipairs(cjson.decode(ARGV[6])) do live[cjson.encode(status)] = true end
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not live[status] then
  redis.call('ZREM', KEYS[5], ARGV[1])
  if KEYS[6] ~= '' then redis.call('ZREM', KEYS[6], ARGV[1]) end
  return 0
end
local lease = redis.call('HGET', KEYS[1], 'lease_until')
if lease and lease ~= 'null' and tonumber(lease) > tonumber(ARGV[2]) then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'seq')) ~= tonumber(ARGV[7]) then return 0 end
redis.call('XADD', KEYS[2], ARGV[8] .. '-0', 'e', ARGV[9])
redis.call('HSET', KEYS[1], unpack(ARGV, 10))
local ttl = tonumber(ARGV[3])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if KEYS[6] ~= '' then redis.call('ZREM', KEYS[6], ARGV[1]) end
redis.call('PUBLISH', ARGV[5], ARGV[1] .. ' ' .. ARGV[8])
return 1
"""

# KEYS[1] is the running set; then, per job, its record and its user's running set.
RENEW = """
for i = 2, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local job_id = ARGV[i / 2 + 1]
    redis.call('HSET', KEYS[i], 'lease_until', ARGV[1])
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], job_id)
    redis.call('ZADD', KEYS[i + 1], 'XX', ARGV[1], job_id)
  end
end
return 1
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
