"""The quota's scripts (``redis_quota`` says what they keep): text only, so that the
connection registers them without importing the quota's steps."""

from __future__ import annotations

__all__ = ["CHARGE", "LAPSE_BATCH", "RELEASE", "RUNNING_LAPSE_S", "SCRIPTS", "SETTLE"]

RUNNING_LAPSE_S = 86_400.0
"""A job's charge lapses this long after its creation if its end never reached the store."""
LAPSE_BATCH = 100
"""Lapsed charges a create drops at most (the rest go with the user's next creates)."""

# Shared by the scripts: KEYS[1] the sum, KEYS[2] the charges, KEYS[3] the lapse times.
_ADD = """
local function add(delta)
  if delta ~= 0 and redis.call('INCRBY', KEYS[1], delta) <= 0 then redis.call('DEL', KEYS[1]) end
end
"""

# ARGV: job id, the request's bytes, the limit ('': none), now, when the charge lapses.
# Drops lapsed charges, then returns {1, stored} once the job holds its charge (made now,
# or by an earlier call: a retry), {0, stored} if it would take the sum past the limit.
CHARGE = (
    _ADD
    + f"""
for _, id in ipairs(redis.call('ZRANGE', KEYS[3], '-inf', ARGV[4], 'BYSCORE', 'LIMIT', 0, {LAPSE_BATCH})) do
  local held = redis.call('HGET', KEYS[2], id)
  if held then
    redis.call('HDEL', KEYS[2], id)
    add(-tonumber(held))
  end
  redis.call('ZREM', KEYS[3], id)
end
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {{1, stored}} end
if ARGV[3] ~= '' and stored + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return {{0, stored}} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
add(tonumber(ARGV[2]))
return {{1, stored}}
"""
)

# ARGV: job id, its charge from now on, when it lapses. Only a job that holds a charge is
# charged again (idempotent: the same charge again changes nothing). Returns 1 if it was.
SETTLE = (
    _ADD
    + """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
add(tonumber(ARGV[2]) - tonumber(held))
return 1
"""
)

# ARGV: job id. Releases and deletes its charge; returns 1 if it held one.
# ARGV: the jobs' ids (one user's). Returns how many held a charge (each released once).
RELEASE = (
    _ADD
    + """
local released = 0
for _, id in ipairs(ARGV) do
  redis.call('ZREM', KEYS[3], id)
  local held = redis.call('HGET', KEYS[2], id)
  if held then
    redis.call('HDEL', KEYS[2], id)
    add(-tonumber(held))
    released = released + 1
  end
end
return released
"""
)

SCRIPTS = {"quota_charge": CHARGE, "quota_settle": SETTLE, "quota_release": RELEASE}
