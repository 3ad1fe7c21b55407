"""The Lua scripts of the Redis backend: every write is one script, run atomically by Redis.

Each script checks before its first write (existence, the task's shared prompt, key types), so
no command after the first write can fail: a script writes everything or nothing. The ``#!lua``
shebang makes Redis refuse a writing script up front when it is out of memory.
"""

# KEYS: [1] the record hash, [2] the name index, [3] the task's shared-prompt hash (for a
# shared prompt: the record hash again), [4] the last versions of deleted names (hash).
# ARGV: [1] name, [2] blob, [3] shared id, [4] meta JSON, [5] now, [6] mode (create | replace
# | upsert), [7] channel, [8] kind (task | shared), [9] index type (zset | set), [10] the
# version a replace expects to find ('' for any).
# Returns {new version, created}, or {-1} (exists), {-2} (absent), {-3} (no shared prompt),
# {-4} (the stored version is not the expected one).
PUT_SCRIPT = """#!lua
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[6] == 'create' and exists then return {-1} end
if ARGV[6] == 'replace' and not exists then return {-2} end
if ARGV[10] ~= '' and exists and redis.call('HGET', KEYS[1], 'version') ~= ARGV[10] then
  return {-4}
end
if ARGV[8] == 'task' and redis.call('EXISTS', KEYS[3]) == 0 then return {-3} end
local function has_type(key, wanted)
  local t = redis.call('TYPE', key)['ok']
  return t == 'none' or t == wanted
end
if not (has_type(KEYS[1], 'hash') and has_type(KEYS[2], ARGV[9])
        and has_type(KEYS[4], 'hash')) then
  return redis.error_reply('WRONGTYPE a rankone key (' .. KEYS[1] .. ', ' .. KEYS[2] .. ', ' ..
                           KEYS[4] .. ') holds another type; is this database shared?')
end
local version
if exists then
  version = redis.call('HINCRBY', KEYS[1], 'version', 1)
else
  -- a name deleted and created again continues its versions: (name, version) stays unique
  local last = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
  version = last + 1
  redis.call('HSET', KEYS[1], 'version', version, 'created', ARGV[5])
  if last > 0 then redis.call('HDEL', KEYS[4], ARGV[1]) end
end
redis.call('HSET', KEYS[1], 'blob', ARGV[2], 'shared', ARGV[3], 'meta', ARGV[4],
           'updated', ARGV[5])
if ARGV[9] == 'zset' then
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
else
  redis.call('SADD', KEYS[2], ARGV[1])
end
redis.call('PUBLISH', ARGV[7],
           cjson.encode({action='put', kind=ARGV[8], name=ARGV[1], version=version}))
return {version, redis.call('HGET', KEYS[1], 'created')}
"""

# KEYS: [1] the task hash, [2] the task index, [3] the last versions of deleted names.
# ARGV: [1] name, [2] channel.
# Returns the deleted version, or 0 if there was no such task.
DELETE_SCRIPT = """#!lua
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return 0 end
if redis.call('TYPE', KEYS[3])['ok'] ~= 'none' and redis.call('TYPE', KEYS[3])['ok'] ~= 'hash' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[3] .. ' holds another type')
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], version)
redis.call('PUBLISH', ARGV[2],
           cjson.encode({action='delete', kind='task', name=ARGV[1],
                         version=tonumber(version)}))
return tonumber(version)
"""
