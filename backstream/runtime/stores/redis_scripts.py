"""The Lua scripts of ``RedisStore``: each runs atomically on the server.

Key and argument layouts are documented at the call sites in ``redis_store``.
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

COMMIT = """
local seq = redis.call('HGET', KEYS[1], 'seq')
if not seq then return 0 end
seq = tonumber(seq)
local last = tonumber(ARGV[3])
if ARGV[4] ~= '' and last > seq then
  if tonumber(ARGV[2]) > seq + 1 then return redis.error_reply('gap: commit after ' .. seq) end
  redis.call('XADD', KEYS[2], last .. '-0', 'e', ARGV[4])
end
if last >= seq then redis.call('HSET', KEYS[1], unpack(ARGV, 9)) end
if ARGV[5] == '1' then
  local ttl = tonumber(ARGV[6])
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
  redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
end
redis.call('PUBLISH', ARGV[8], ARGV[1] .. ' ' .. last)
return 1
"""

RECOVER = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= '"running"' and status ~= '"awaiting_approval"' then
  redis.call('ZREM', KEYS[5], ARGV[1])
  if KEYS[6] ~= '' then redis.call('ZREM', KEYS[6], ARGV[1]) end
  return 0
end
local lease = redis.call('HGET', KEYS[1], 'lease_until')
if lease and lease ~= 'null' and tonumber(lease) > tonumber(ARGV[2]) then return 0 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq')) + 1
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch')) + 1
local event = '[{"seq":' .. seq ..
  ',"status":"interrupted","error":null,"finish_reason":null,"usage":null,"kind":"status"}]'
redis.call('XADD', KEYS[2], seq .. '-0', 'e', event)
redis.call('HSET', KEYS[1], 'status', '"interrupted"', 'seq', seq, 'epoch', epoch, 'updated_at', ARGV[2],
  'finished_at', ARGV[2], 'expires_at', ARGV[4], 'lease_until', 'null')
local ttl = tonumber(ARGV[3])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if KEYS[6] ~= '' then redis.call('ZREM', KEYS[6], ARGV[1]) end
redis.call('PUBLISH', ARGV[5], ARGV[1] .. ' ' .. seq)
return 1
"""

RENEW = """
for i, job_id in ipairs(ARGV) do
  if i > 1 then
    local key = KEYS[1] .. ':job:' .. job_id
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'lease_until', ARGV[1])
      local user = cjson.decode(redis.call('HGET', key, 'user'))
      redis.call('ZADD', KEYS[1] .. ':running', 'XX', ARGV[1], job_id)
      redis.call('ZADD', KEYS[1] .. ':running:' .. string.len(user) .. ':' .. user, 'XX', ARGV[1], job_id)
    end
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
