"""The Lua scripts of ``RedisStore``: each runs atomically on the server.

Every script touches the keys of one cluster slot only (one job's, one user's, or
one shard's: ``RedisKeyspace``); what spans entities is a sequence of them,
run in the order ``redis_steps`` gives and documented in ``redis_keys``. Key and
argument layouts are documented here and at the call sites. The scripts hold no
policy of their own: which statuses are terminal or live, what an interrupted job's
last entry says and which entries a commit appends are decided in Python
(``protocol.lifecycle``, ``stores.shared``) and passed in; a script only checks that
the job is still where Python saw it (its ``seq``, its owner) and applies the change.

Leases (running entries, a job's ``lease_at``, outbox and sweep claims) are on Redis's
clock: a script reads ``TIME`` and adds what the caller says is ahead of its present
(``RedisFrame.ahead``: an ``ahead`` argument below is such a number of seconds).
"""

__all__ = [
    "CLAIM",
    "COMMIT",
    "CREATE_JOB",
    "CREATE_RESERVE",
    "CREATE_UNDO",
    "CREATE_USER",
    "EXPIRY_TAKE",
    "FINISH_INSTANCE",
    "FINISH_USER",
    "HANDOVER",
    "NOTIFY_CLAIM",
    "NOTIFY_INSERT",
    "RENEW",
    "SCAN",
    "WATCH",
]

# ``clock(ahead)``: Redis's time plus ``ahead`` seconds; ``stamp(t)``: ``t`` as a score
# (microseconds kept).
_CLOCK = """
local now_read
local function clock(ahead)
  if not now_read then
    local t = redis.call('TIME')  -- once per script: one command, one present
    now_read = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return now_read + tonumber(ahead)
end
local function stamp(t) return string.format('%.6f', t) end
"""

# -- create: user slot, then a shard, then job slot ---------------------------------------------

# User slot. KEYS: msg, user index, thread index, user running. ARGV: job id, created at,
# now (ahead), the per-user limit, the lease's end (ahead) ('' for the last three: no
# capacity is taken).
# Returns the other job's id if the message id is taken by one, '!user' past the limit,
# '' when the key is this job's (again, for a retry: an entry that still counts is not
# counted twice).
CREATE_USER = (
    _CLOCK
    + """
local existing = redis.call('GET', KEYS[1])
if existing and existing ~= ARGV[1] then return existing end
if ARGV[3] ~= '' then
  local now = clock(ARGV[3])
  local held = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if not held or tonumber(held) < now then
    if redis.call('ZCOUNT', KEYS[4], stamp(now), '+inf') >= tonumber(ARGV[4]) then return '!user' end
  end
  redis.call('ZADD', KEYS[4], stamp(clock(ARGV[5])), ARGV[1])
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return ''
"""
)

# A shard. KEYS: its running set. ARGV: job id, now (ahead), the shard's share of the
# cluster-wide limit, the lease's end (ahead). Returns '!full' when the shard has no room,
# else the lease's end on Redis's clock (the job holds a running entry until then).
CREATE_RESERVE = (
    _CLOCK
    + """
local now = clock(ARGV[2])
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not held or tonumber(held) < now then
  if redis.call('ZCOUNT', KEYS[1], stamp(now), '+inf') >= tonumber(ARGV[3]) then return '!full' end
end
local lease = stamp(clock(ARGV[4]))
redis.call('ZADD', KEYS[1], lease, ARGV[1])
return lease
"""
)

# User slot: CREATE_USER undone (the cluster was full). KEYS as CREATE_USER's. ARGV: job id.
CREATE_UNDO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
for i = 2, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""

# Job slot. KEYS: job. ARGV: the record's fields. Writes the record unless it exists:
# returns 1 if this call inserted it.
CREATE_JOB = """
if redis.call('HEXISTS', KEYS[1], 'job_id') == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# -- commit: job slot; a terminal one then the user slot, then the job's shard -------------

ANNOUNCE_LIMIT = 65536
"""Bytes of entries an announcement carries at most: past it, followers read them from the
store, so no subscriber's output buffer holds large messages. (Not in ``__all__``, which
lists the scripts.)"""

# KEYS: job, log. Returns {0} if the job is gone, {3} if it has ended already (ARGV[8]: a
# JSON list of the terminal statuses) or is held by another owner than ARGV[9] (a writer
# whose job another instance took over is fenced off), {2, stored_seq} if its seq is not
# ARGV[2] (nothing changed: the caller plans again from stored_seq), {1, receivers, log
# bytes} when applied (the record's field ``log_bytes`` sums the bytes of the batches
# appended, for the quota of stored bytes, ``redis_quota``, written with the other fields).
# The fence is one HMGET.
# Python planned the entries (only new ones) and the progress (never behind the log)
# against ARGV[2], and passes only the fields that changed since its last commit. The
# fields (ARGV[10]...) of a terminal commit (ARGV[5]) carry its outbox entry (field
# ``outbox``): the end and its effect land together. A non-terminal commit is announced on
# the job's channel (ARGV[7], sharded: the job's slot; '' while the writer knows of no
# follower) with its entries (``ID SEQ JSON``: a follower need not read them; over 64 KiB
# of them, ``ID SEQ `` and followers read, so no subscriber's output buffer holds large
# messages); ``receivers`` is how many instances got it (-1: not announced). A terminal
# commit is announced after its last step (``RedisSteps.finish``): a watcher woken by it
# finds the slots freed too (one that reads meanwhile sees the end, which is final).
COMMIT = f"""
local seq, status, owner, log_bytes =
  unpack(redis.call('HMGET', KEYS[1], 'seq', 'status', 'owner', 'log_bytes'))
if not seq then return {{0}} end
local ended = {{}}
for _, name in ipairs(cjson.decode(ARGV[8])) do ended[cjson.encode(name)] = true end
if ended[status] then return {{3}} end
if ARGV[9] ~= '' and owner ~= ARGV[9] then return {{3}} end
if tonumber(seq) ~= tonumber(ARGV[2]) then return {{2, tonumber(seq)}} end
local logged = tonumber(log_bytes) or 0
local fields = {{}}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[2], ARGV[3] .. '-0', 'e', ARGV[4])
  logged = logged + string.len(ARGV[4])
  fields[#fields + 1] = 'log_bytes'
  fields[#fields + 1] = tostring(logged)
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if ARGV[5] == '1' then
  local ttl = tonumber(ARGV[6])
  for i = 1, 2 do redis.call('PEXPIRE', KEYS[i], ttl) end
elseif ARGV[7] ~= '' then
  local entries = ARGV[4]
  if #entries > {ANNOUNCE_LIMIT} then entries = '' end
  return {{1, redis.call('SPUBLISH', ARGV[7], ARGV[1] .. ' ' .. ARGV[3] .. ' ' .. entries)}}
end
return {{1, -1, logged}}
"""

# User slot. KEYS: user running, msg. ARGV: job id, the idempotency key's time to live (ms).
# Idempotent.
FINISH_USER = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""

# The job's shard. KEYS: running, expiry, outbox, outbox due, outbox claims, the owner's
# outbox claims. ARGV: job id, its expiry, the outbox entry, the owner ('': unclaimed),
# the claim's end (ahead), how long the owner's set outlives its last claim (ms), '1' for the
# terminal commit's own first call (write the entry whatever the running set says),
# '0' for a repair (write it only if the job is still in the running set: then no
# earlier call wrote it, so the entry is never written twice). Returns 1 if written.
# (The job's channel lives in the job's slot: the caller announces the end after it.)
FINISH_INSTANCE = (
    _CLOCK
    + """
local was_listed = redis.call('ZREM', KEYS[1], ARGV[1])
local write = ARGV[7] == '1' or was_listed == 1
if write then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
    redis.call('ZADD', KEYS[4], stamp(clock(ARGV[5])), ARGV[1])
    if ARGV[4] ~= '' then
      redis.call('HSET', KEYS[5], ARGV[1], ARGV[4])
      redis.call('SADD', KEYS[6], ARGV[1])
      redis.call('PEXPIRE', KEYS[6], ARGV[6])
    end
  end
end
return write and 1 or 0
"""
)

# -- leases: job slot (the running entries follow from Python) -------------------------------

# KEYS: job. ARGV: now (ahead), a JSON list of the live statuses (as stored: JSON strings),
# the new owner (JSON), its lease's end as the owner's clock reads it (the record's
# ``lease_until``, JSON) and on Redis's (ahead). Hands a live job whose lease (``lease_at``,
# Redis's clock) lapsed to the new owner (epoch + 1; the seq it had is appended to the JSON
# list ``epoch_ends``, as text: no float formatting) and returns {the new epoch, the lease's
# end on Redis's clock}; {0} if its lease still holds, {-1} if the job is gone, {-2} if it is
# no longer live (a terminal commit whose later steps did not land: repaired by the caller).
HANDOVER = (
    _CLOCK
    + """
local live = {}
for _, status in ipairs(cjson.decode(ARGV[2])) do live[cjson.encode(status)] = true end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {-1} end
if not live[status] then return {-2} end
local lease = redis.call('HGET', KEYS[1], 'lease_at')
if lease and tonumber(lease) > clock(ARGV[1]) then return {0} end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch')) + 1
local lease_at = stamp(clock(ARGV[5]))
local ends = redis.call('HGET', KEYS[1], 'epoch_ends')
ends = ends and ends ~= '[]' and string.sub(ends, 1, -2) .. ',' or '['
ends = ends .. redis.call('HGET', KEYS[1], 'seq') .. ']'
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'lease_until', ARGV[4], 'lease_at', lease_at,
  'epoch', tostring(epoch), 'epoch_ends', ends)
return {epoch, lease_at}
"""
)

# -- instances alive: the store's own slot ---------------------------------------------------

# KEYS: instances. ARGV: the instance, the end of its announcement (ahead). Drops the
# announcements that lapsed, then adds or renews this one; returns the instances alive.
ANNOUNCE = (
    _CLOCK
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', stamp(clock('0')))
redis.call('ZADD', KEYS[1], stamp(clock(ARGV[2])), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)

# KEYS: instances. ARGV: now (ahead). Returns the instances whose announcements have not
# lapsed.
ALIVE = (
    _CLOCK
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. stamp(clock(ARGV[1])), '+inf')
"""
)

# KEYS: job. ARGV: the lease's end as the owner's clock reads it (JSON), the owner (JSON),
# the lease's end (ahead). Renews the lease only if the owner holds the job; returns its
# end on Redis's clock if it did, '' if not.
RENEW = (
    _CLOCK
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return '' end
local lease_at = stamp(clock(ARGV[3]))
redis.call('HSET', KEYS[1], 'lease_until', ARGV[1], 'lease_at', lease_at)
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[1], 'handoffs', 1) end
return lease_at
"""
)

# -- the outbox: a shard ------------------------------------------------------------------------

# KEYS: outbox, outbox due, outbox claims, the owner's outbox claims. ARGV: now (ahead), the
# claim's end (ahead), limit, owner, how long the owner's set outlives its last claim (ms: a dead
# instance's set goes by itself). Claims the owner's entries first, then those whose claim lapsed by
# now, and returns them (their JSON).
CLAIM = (
    _CLOCK
    + """
local now, claim_end = stamp(clock(ARGV[1])), stamp(clock(ARGV[2]))
local out, taken = {}, {}
local function take(id)
  taken[id] = true
  local entry = redis.call('HGET', KEYS[1], id)
  if not entry then
    redis.call('ZREM', KEYS[2], id)
    redis.call('SREM', KEYS[4], id)
    return
  end
  redis.call('ZADD', KEYS[2], claim_end, id)
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
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)) do
    if #out >= limit then break end
    if not taken[id] then take(id) end
  end
end
return out
"""
)

# -- housekeeping: a shard -------------------------------------------------------------------

# KEYS: expiry, expiry taken. ARGV: now (the caller's clock: expiry times are its), now
# (ahead), the end of the sweeper's claim (ahead), limit. Takes up to ``limit`` jobs: those
# whose claim by another sweep lapsed (it died mid-batch), then expired ones (moved from the
# expiry index: no other sweep sees them), each claimed until the claim's end; returns
# their ids.
EXPIRY_TAKE = (
    _CLOCK
    + """
local limit = tonumber(ARGV[4])
local out = redis.call('ZRANGE', KEYS[2], '-inf', stamp(clock(ARGV[2])), 'BYSCORE', 'LIMIT', 0, limit)
if #out < limit then
  local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, limit - #out)
  if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
  for _, id in ipairs(due) do table.insert(out, id) end
end
local claim_end = stamp(clock(ARGV[3]))
for _, id in ipairs(out) do redis.call('ZADD', KEYS[2], claim_end, id) end
return out
"""
)

# KEYS: the shard's scan claim, running. ARGV: owner, now (ahead), the claim's end (ahead),
# limit. Unless another owner's claim holds, claims the shard's orphan scan and returns up
# to ``limit`` jobs whose lease lapsed; false if another owner scans it.
SCAN = (
    _CLOCK
    + """
local now = clock(ARGV[2])
local held = redis.call('HMGET', KEYS[1], 'owner', 'until')
if held[1] and held[1] ~= ARGV[1] and tonumber(held[2]) > now then return false end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'until', stamp(clock(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], 3600000)
return redis.call('ZRANGE', KEYS[2], '-inf', '(' .. stamp(now), 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[4]))
"""
)

# -- notifications: job slot, then user slot --------------------------------------------------

# Job slot. KEYS: watching. ARGV: the watch id, the end of its presence (ahead), 'XX' to
# renew only (a watch that ended is not brought back) or ''. Watch presence is on Redis's
# clock, like leases: a watcher on an instance whose clock is behind still counts.
WATCH = (
    _CLOCK
    + """
if ARGV[3] == 'XX' then
  return redis.call('ZADD', KEYS[1], 'XX', 'CH', stamp(clock(ARGV[2])), ARGV[1])
end
return redis.call('ZADD', KEYS[1], stamp(clock(ARGV[2])), ARGV[1])
"""
)

# Job slot. KEYS: watching, notified, seen. ARGV: now (ahead), '1' if a watch that saw the end counts,
# the notified mark's time to live (ms). Returns 1, and marks the job notified, if nobody
# watches it and it had no notification of this kind yet (never twice).
NOTIFY_CLAIM = (
    _CLOCK
    + """
if redis.call('ZCOUNT', KEYS[1], stamp(clock(ARGV[1])), '+inf') > 0 then return 0 end
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then return 0 end
return 1
"""
)

# User slot. KEYS: the inbox's hash and order. ARGV: the notification's id, payload (JSON),
# time, the inbox's bound (the oldest go), the user's channel (sharded: the user's slot).
# Adds it and announces it to the instances that hold a connection of the user.
NOTIFY_INSERT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
end
redis.call('SPUBLISH', ARGV[5], ARGV[2])
return 1
"""
